"""`python -m dllmq.study`: the `dllmq study` command on its own."""
import sys

from dllmq.study.runner import main

sys.exit(main())
