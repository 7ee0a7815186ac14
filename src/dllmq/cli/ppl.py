"""`dllmq ppl`: perplexity of MODEL on a text (an ELBO bound for diffusion models, exact for causal ones)."""
from __future__ import annotations

from dllmq.cli.commands import help_of
from dllmq.cli.common import add_backend_arg, add_model_args, load, model_config, require_at_least
from dllmq.data import CORPORA, load_corpus, tokenize_text
from dllmq.diffusion import perplexity
from dllmq.errors import DllmqError


def add_parser(sub) -> None:
    p = sub.add_parser("ppl", help=help_of("ppl"),
                       description="Perplexity of MODEL on a text file. For a masked diffusion model this is "
                                   "exp(Monte Carlo ELBO bound on the per-token NLL), an upper bound on the true "
                                   "perplexity, comparable across quantizations of the same model; for a causal "
                                   "model it is the ordinary perplexity.")
    add_model_args(p)
    add_backend_arg(p, "fake")
    p.add_argument("--data", default="wiki",
                   help="wiki (held-out offline Wikipedia shipped with dllmq; default), wikitext2 (test split, "
                        "needs HF datasets + network or cache), or a .txt / .jsonl file")
    p.add_argument("--seqlen", type=int, default=512, help="window length in tokens (default 512)")
    p.add_argument("--mc-num", type=int, default=16, help="Monte Carlo samples per window (diffusion; default 16)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward pass (default 8)")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate at most this many windows")
    p.set_defaults(func=run)


def run(args) -> None:
    require_at_least(args, 2, "--seqlen")
    require_at_least(args, 1, "--mc-num", "--batch-size", "--max-windows")
    text = load_corpus(args.data, "heldout")   # files are read whole; named sets give their held-out split
    context = model_config(args.model).max_seq_len
    if args.seqlen > context:
        raise DllmqError(f"--seqlen {args.seqlen} is longer than the model's context of {context} tokens; "
                         "use a shorter window.")
    model, tokenizer, family = load(args)
    if tokenizer is None:
        raise DllmqError(f"{args.model} has no tokenizer files, so it cannot read text.")
    result = perplexity(model, tokenize_text(tokenizer, text), seqlen=args.seqlen, mc_num=args.mc_num,
                        batch_size=args.batch_size, max_windows=args.max_windows, seed=args.seed, progress=True)
    kind = "ELBO bound (upper bound on perplexity)" if result.is_bound else "exact causal perplexity"
    source = f"{args.data} (held out)" if args.data in CORPORA else args.data
    print(f"ppl {result.ppl:.4f}  nll/token {result.nll:.4f}  tokens {result.n_tokens}  windows {result.n_windows}"
          f"  [{kind}; {source}]")
