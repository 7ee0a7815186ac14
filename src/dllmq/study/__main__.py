"""`python -m dllmq.study`: the `dllmq study` command on its own."""
import sys

from dllmq.cli.study import main

sys.exit(main())
