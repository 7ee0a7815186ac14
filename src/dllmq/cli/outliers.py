"""`dllmq outliers`: profile activation outliers of a model (full precision or quantized) and write
outliers.json + PNG plots to --out."""
from __future__ import annotations

import argparse
from pathlib import Path

from dllmq.analysis.outliers import OutlierThresholds, format_summary, profile_outliers, write_outlier_report
from dllmq.cli.commands import help_of
from dllmq.cli.common import add_model_args, load, model_config, require_at_least, require_fraction, require_positive
from dllmq.data import check_corpus
from dllmq.errors import DllmqError

DESCRIPTION = """\
Profile the input of every linear in every block over calibration text, at several mask ratios of
the input (0 = clean text ... 1 = all mask tokens; a diffusion LLM sees all of them while denoising).
Records max |x|, per-channel and per-token maxima, median |x|, kurtosis, normal outlier channels
(large on most tokens) and massive values (single values far above the layer's median), and writes
outliers.json with PNG plots to --out. On a dllmq-quantized directory, layers with an online input
transform (QuaRot's Hadamard, DuQuant) are recorded after the transform: what the quantizer sees."""

EPILOG = """\
examples:
  dllmq outliers random-llada --out out/
  dllmq outliers LLaDA-8B-Instruct/ --device cuda --nsamples 8 --seqlen 256 --out llada_outliers/
  dllmq outliers q_quarot/ --mask-ratios 0,0.5,1 --out quarot_outliers/   # a quantized model
  dllmq outliers MODEL --massive-threshold 1000 --massive-floor 10 --out strict/
"""


def add_parser(sub) -> None:
    """Add the `outliers` subcommand to an argparse subparsers object."""
    p = sub.add_parser("outliers", help=help_of("outliers"),
                       description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, model_help="built-in name, checkpoint or quantized directory, or Hub id",
                   seed_help="seed for the windows and the masked positions (default: 0)")
    p.add_argument("--calib", default="wiki",
                   help="text: wiki (offline, shipped; default), wikitext2, pile, or a .txt/.jsonl file")
    p.add_argument("--nsamples", type=int, default=8, help="calibration windows (default 8)")
    p.add_argument("--seqlen", type=int, default=256, help="tokens per window (default 256)")
    p.add_argument("--mask-ratios", default="0,0.25,0.5,0.75,1.0",
                   help="comma-separated fractions of masked input tokens (default 0,0.25,0.5,0.75,1.0; "
                        "causal models: 0 only)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    p.add_argument("--normal-threshold", type=float, default=10.0,
                   help="normal outlier: |x| > this x the layer's median ... (default 10)")
    p.add_argument("--normal-min-frac", type=float, default=0.5,
                   help="... on at least this fraction of tokens (default 0.5)")
    p.add_argument("--massive-threshold", type=float, default=100.0,
                   help="massive value: |x| > this x the layer's median ... (default 100)")
    p.add_argument("--massive-floor", type=float, default=1.0,
                   help="... and |x| > this absolute value, so a near-dead layer does not count (default 1)")
    p.add_argument("--top-k", type=int, default=8, help="largest channels / tokens listed per linear (default 8)")
    p.add_argument("--surface-layers", type=int, default=3,
                   help="worst layers drawn as token x channel surfaces (default 3)")
    p.add_argument("--no-plots", action="store_true", help="write outliers.json only")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=run)


def _ratios(text: str) -> list[float]:
    try:
        ratios = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise DllmqError(f"--mask-ratios must be comma-separated numbers in [0, 1], got {text!r}.") from None
    if not ratios or any(not 0.0 <= r <= 1.0 for r in ratios):
        raise DllmqError(f"--mask-ratios must be comma-separated numbers in [0, 1], got {text!r}.")
    return ratios


def run(args) -> None:
    out = Path(args.out)
    if out.exists() and not args.overwrite:  # refuse before loading and profiling, not after
        raise DllmqError(f"{out} already exists; choose another --out or pass --overwrite.")
    ratios = _ratios(args.mask_ratios)
    require_at_least(args, 1, "--nsamples", "--seqlen", "--batch-size", "--top-k")
    require_at_least(args, 0, "--surface-layers", "--massive-floor")
    require_positive(args, "--normal-threshold", "--massive-threshold")
    require_fraction(args, "--normal-min-frac")
    check_corpus(args.calib)
    context = model_config(args.model).max_seq_len
    if args.seqlen > context:
        raise DllmqError(f"--seqlen {args.seqlen} is longer than the model's context of "
                         f"{context} tokens; use a shorter window.")
    thresholds = OutlierThresholds(normal_ratio=args.normal_threshold, normal_min_frac=args.normal_min_frac,
                                   massive_ratio=args.massive_threshold, massive_floor=args.massive_floor,
                                   top_k=args.top_k)
    model, tokenizer, family = load(args, backend="fake")
    report = profile_outliers(model, tokenizer, family, calib=args.calib, nsamples=args.nsamples,
                              seqlen=args.seqlen, mask_ratios=ratios, seed=args.seed, batch_size=args.batch_size,
                              thresholds=thresholds, surface_layers=args.surface_layers,
                              model_name=str(args.model), progress=True)
    written = write_outlier_report(report, out, plots=not args.no_plots, overwrite=args.overwrite)
    print(format_summary(report))
    print(f"wrote {out}: " + ", ".join(p.name for p in written))
