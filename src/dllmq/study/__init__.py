"""The study: the grid runner, the results store, the report."""
