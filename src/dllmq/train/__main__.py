"""`python -m dllmq.train`: train (or resume) a stage; see dllmq.train.loop for the objectives."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import fields

from dllmq.errors import DllmqError
from dllmq.train.loop import TrainConfig, train


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dllmq.train", description=__doc__)
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        value = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            p.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=value,
                           help=f"(default {value})")
        elif isinstance(value, dict):
            p.add_argument(flag, type=json.loads, default=value, help=f"JSON (default {json.dumps(value)})")
        else:
            p.add_argument(flag, type=type(value), default=value, help=f"(default {value})")
    p.add_argument("--minutes", type=float, default=None,
                   help="stop (with a checkpoint) after this much wall time; run again to resume")
    p.add_argument("--export", default=None,
                   help="when the schedule completes, export weights + tokenizer + model card to this directory")
    p.add_argument("--quiet", action="store_true", help="log warnings only (default: progress every --log-every steps)")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(message)s", stream=sys.stderr)
    try:
        cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
        train(cfg, minutes=args.minutes, export=args.export)
    except DllmqError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
