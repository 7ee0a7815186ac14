"""`python -m dllmq`: the `dllmq` command."""
import sys

from dllmq.cli import main

sys.exit(main())
