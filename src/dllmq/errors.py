"""The one exception type a user sees: its message is a complete sentence that says what to do."""


class DllmqError(Exception):
    """A problem with the user's input or environment; the CLI prints it and exits with code 2."""
