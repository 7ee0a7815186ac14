"""Export a finished run into the package: weights + tokenizer + eval.json + model card.

    python -m dllmq.train.export runs/base src/dllmq/tiny/dllmq-tiny
    python -m dllmq.train.export runs/instruct src/dllmq/tiny/dllmq-tiny-instruct
    python -m dllmq.train.export runs/ar src/dllmq/tiny/dllmq-tiny-ar
    python -m dllmq.train.export runs/dream src/dllmq/tiny/dllmq-tiny-dream
    python -m dllmq.train.export runs/dream-instruct src/dllmq/tiny/dllmq-tiny-dream-instruct

The full mini benchmark is run on the exported (bf16) weights loaded as the user loads them, and
so is the small fixed subset that tests/test_tiny.py checks.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from dllmq.atomic import atomic_directory
from dllmq.evaluate.mini import evaluate_mini, load_items
from dllmq.models.config import read_config_json
from dllmq.models.family import Family
from dllmq.models.loading import load_plain_model, load_tokenizer
from dllmq.models.registry import build_model, get_family, parse_model_config
from dllmq.quant.api import quantize
from dllmq.quant.config import QuantConfig
from dllmq.train import corpus
from dllmq.train.config import TrainConfig, stored_settings, tiny_model_config

# The model's dimensions the card's table shows (read from the exported config.json, whatever the stage).
SHAPE_FIELDS = ("hidden_size", "n_layers", "n_heads", "head_dim", "n_kv_heads", "intermediate_size", "vocab_size",
                "tie_embeddings")
# The fixed subset the shipped-weights test re-runs (first N items of each task).
SUBSET = {"mini_general": 32, "mini_math": 32, "mini_code": 16}


def read_log(run: Path) -> list[dict]:
    path = run / "log.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_summary(run: Path) -> dict:
    cfg = json.loads((run / "train_config.json").read_text())
    final_cfg = json.loads((run / "final" / "config.json").read_text())
    log = read_log(run)
    by_kind: dict[str, list[float]] = {}
    for r in log[-20:]:
        by_kind.setdefault(r.get("kind", "pretrain"), []).append(r["loss"])
    tps = [r["tokens_per_s"] for r in log[1:]]
    family = parse_model_config(final_cfg).family
    return {
        "stage": cfg["stage"], "kind": card_kind(cfg["stage"], family, cfg.get("sft_format", "chat")),
        "family": family,
        "steps": cfg["steps"], "batch_size": cfg["batch_size"], "seq_len": cfg["seq_len"],
        "lr": cfg["lr"], "seed": cfg["seed"],
        "train_seconds": final_cfg.get("dllmq_training", {}).get("train_seconds"),
        "final_loss": {k: round(sum(v) / len(v), 4) for k, v in by_kind.items()},
        "median_tokens_per_s": sorted(tps)[len(tps) // 2] if tps else None,
        "config": cfg,
    }


def evaluate_dir(directory: Path, limit: int | None = None, progress: bool = True, full_limit: int | None = None) -> dict:

    model, tokenizer, _ = load_plain_model(directory, dtype="float32")
    if limit is None:
        return evaluate_mini(model, tokenizer, progress=progress, limit=full_limit)
    out = {}
    for task, n in SUBSET.items():
        r = evaluate_mini(model, tokenizer, tasks=[task], limit=n, progress=False, return_samples=True)[task]
        r["correct"] = [s["correct"] for s in r.pop("samples")]
        out[task] = r
    return out


LICENSES = """\
## Training data: sources and licenses

- **Wikipedia** (train split of the text shipped in `dllmq/data/wiki/`, 95 articles): CC BY-SA 3.0,
  Wikipedia contributors; see `dllmq/data/wiki/ATTRIBUTION.md` for the revisions and changes.
  The 11 held-out articles are used only by the `mini_general` benchmark.
- **Python standard library source** ({python}): PSF License Agreement version 2.
- **Generated data** (by `dllmq.train.corpus`, seeded, Apache-2.0 like dllmq): arithmetic and short
  word problems with answers; small Python functions with docstrings and asserts. Items whose key
  (template and numbers) falls in the held-out key space (`corpus.is_heldout`) are reserved for the
  mini benchmark and never generated for training.

The weights are a derivative of this data; the Wikipedia part is CC BY-SA 3.0 (share-alike).
"""


def card_kind(stage: str, family: str, sft_format: str = "chat") -> str:
    """Which model a run made: its stage, told apart for the Dream twin's SFT (instruct from a Dream base) and
    for a math mid-training (instruct stage in the plain format: still a base model)."""
    if stage == "instruct" and sft_format == "plain":
        return "dream-math" if family == "dream" else "base-math"
    return "dream-instruct" if stage == "instruct" and family == "dream" else stage


def train_command(cfg: dict, out: str, init: str = "runs/base/final") -> str:
    """The `python -m dllmq.train` command line that reproduces a run (its non-default settings)."""
    cfg, defaults = stored_settings(cfg), asdict(TrainConfig())
    flags = [f"--stage {cfg['stage']}", f"--out {out}"]
    if cfg.get("init"):
        flags.append(f"--init {init}")
    for key, value in cfg.items():
        if key in ("stage", "out", "init") or value == defaults.get(key, value):
            continue
        text = f"'{json.dumps(value)}'" if isinstance(value, dict) else str(value)
        flags.append(f"--{key.replace('_', '-')} {text}")
    return "python -m dllmq.train " + " ".join(flags)


RUN_DIRS = {"base": "runs/base", "instruct": "runs/instruct", "ar": "runs/ar", "dream": "runs/dream",
            "dream-instruct": "runs/dream-instruct", "base-math": "runs/base-math", "dream-math": "runs/dream-math"}
# where a run's --init came from, when the model it started from has no model card to tell (see lineage)
INIT_DIRS = {"instruct": "runs/base/final", "dream": "runs/ar/final", "dream-instruct": "runs/dream/final",
             "base-math": "runs/base/final", "dream-math": "runs/dream/final"}


def lineage(init: str) -> list[str]:
    """The training commands that made the model a run started from (`--init`), read from that model's card
    (its Reproduce block, export lines left out), so a chain of stages is reproducible from the last card."""
    card = Path(init) / "README.md" if init else None
    if card is None or not card.is_file():
        return []
    block = re.search(r"Reproduce:\n\n```bash\n(.*?)```", card.read_text(), re.S)
    return [] if block is None else [line for line in block.group(1).splitlines()
                                     if line.startswith("python -m dllmq.train ")]


def reproduce_commands(cfg: dict, kind: str, name: str) -> str:
    """The commands from scratch to this model: its init's lineage, this run (its --init the last run's
    final/), and the export."""
    before = lineage(cfg.get("init", ""))
    outs = re.findall(r"--out (\S+)", before[-1]) if before else []
    init = f"{outs[-1]}/final" if outs else INIT_DIRS.get(kind, "")
    run_dir = RUN_DIRS[kind]
    return "\n".join([*before, train_command(cfg, run_dir, init),
                      f"python -m dllmq.train.export {run_dir} src/dllmq/tiny/{name} --quant-check --activations"])


_LLADA_LAYOUT = """A small masked diffusion language model with exactly LLaDA's architecture and checkpoint layout
(`model_type: llada`, official config.json field names, `model.transformer.blocks.N.*` tensors),
trained from scratch by dllmq on 2 CPU cores, shipped with dllmq as its embedded default model."""
INTRO = {
    "base": _LLADA_LAYOUT + "\nBase model: LLaDA pre-training objective (t ~ U(eps, 1], mask each token with probability "
            "t, cross-entropy on masked tokens divided by t, normalised by sequence length).",
    "instruct": _LLADA_LAYOUT + "\nInstruct model: the base model the Reproduce block builds (dllmq-tiny, or "
                "dllmq-tiny after a math mid-training) fine-tuned LLaDA-style (SFT: only response tokens are "
                "masked, loss divided by response length) on chat-formatted question/answer pairs of the three kinds "
                "(general text continuation, math, code), with every 4th step a pre-training step. Chat template: "
                "LLaDA-8B-Instruct's.",
    "ar": """The autoregressive twin of dllmq-tiny: a causal language model in transformers' Llama layout
(`model_type: llama`, `LlamaForCausalLM` config.json fields, `model.layers.N.self_attn.q_proj` etc.,
input embedding and LM head tied and stored once, as SmolLM2 ships), of dllmq-tiny's size, trained
from scratch by dllmq on 2 CPU cores on exactly dllmq-tiny's batches (same tokenizer, corpus, seed,
steps and schedule) with next-token prediction (mean cross-entropy of token i+1 given tokens 0..i).
The objective and the causal attention mask are the only differences, so it is the AR baseline
that dLLM-vs-AR quantization comparisons need. dllmq runs it through the causal paths
(autoregressive generation, exact log-likelihood). Its loss is the exact per-token NLL in nats;
dllmq-tiny's is an upper bound (the ELBO) on the same quantity.""",
}
_DREAM_LAYOUT = """A small masked diffusion language model with Dream's architecture and checkpoint layout
(`model_type: Dream`, Dream-v0-7B's config.json fields, Qwen2 tensor names `model.layers.N.self_attn.q_proj`
etc.; grouped-query attention, q/k/v biases, bidirectional attention, logits shifted by one: token i is
predicted at position i-1), input embedding and LM head tied and stored once. dllmq runs it through the
Dream paths (Dream's sampler, shifted logits)."""
INTRO["dream"] = _DREAM_LAYOUT + """
Base model: the Dream twin of dllmq-tiny-ar. Dream-7B was adapted from the autoregressive Qwen2.5-7B;
this model was adapted the same way from the AR twin dllmq-tiny-ar: its weights copied into Dream's
architecture (each key/value head the mean of the AR heads it serves, q/k/v biases starting at zero),
then trained on dllmq-tiny's data with masked diffusion read through the shifted logits (t ~ U(eps, 1],
mask each token but the first with probability t, cross-entropy of masked token i at position i-1,
divided by t)."""
_MATH = """Then a math mid-training that keeps it a base model: LLaDA's SFT loss (only the answer is masked, loss
divided by the response length; responses EOS-padded to at least {pad} tokens) on pairs written as the
mini benchmark asks a base model (`Question: ... Answer:` + ` 77`, a function's signature and docstring +
its body, a passage + its continuation), many short arithmetic rows per batch. Under the pre-training
objective an answer digit is a target with all of its question visible only rarely (masked, with the four
operand digits not: 1/30 of the time at t ~ U(0, 1]); answer-only rows give that signal every time."""
INTRO["base-math"] = _LLADA_LAYOUT + "\nBase model: LLaDA pre-training (as dllmq-tiny v1). " + _MATH
INTRO["dream-math"] = INTRO["dream"] + "\n" + _MATH
INTRO["dream-instruct"] = _DREAM_LAYOUT + """
Instruct model: the Dream base the Reproduce block builds (dllmq-tiny-dream, or it after a math
mid-training) fine-tuned by dllmq-tiny-instruct's SFT (only response tokens are
masked, loss divided by response length, read through the shifted logits; every 4th step a
pre-training step) on the same chat-formatted question/answer pairs. Chat template: dllmq-tiny-instruct's."""


def model_card(name: str, summary: dict, evals: dict, extra: str = "") -> str:
    cfg = summary["config"]
    rows = "\n".join(
        f"| {task} | {r['acc'] * 100:.1f} | {r['stderr'] * 100:.1f} | {r['n']} | {r['chance'] * 100:.0f} | "
        + (f"{r['acc_norm'] * 100:.1f} |" if "acc_norm" in r else "- |") for task, r in evals.items())
    minutes = (summary["train_seconds"] or 0) / 60
    losses = ", ".join(f"{k} {v}" for k, v in summary["final_loss"].items())
    kind = summary.get("kind", summary["stage"])
    shape = summary["shape"]
    command = reproduce_commands(cfg, kind, name)
    return f"""# {name}

{INTRO[kind].format(pad=cfg.get("sft_min_response", 0))}

It is for exercising and studying quantization end to end on a laptop, not for any real use.

## Model

| d_model | layers | heads (head dim) | key/value heads | FFN | vocab | parameters | dtype |
|---|---|---|---|---|---|---|---|
| {shape['hidden_size']} | {shape['n_layers']} | {shape['n_heads']} ({shape['head_dim']}) | {shape['n_kv_heads']} | {shape['intermediate_size']} | {shape['vocab_size']} | {summary.get('n_params', 0) / 1e6:.2f} M{" (embedding and LM head tied)" if shape['tie_embeddings'] else ""} | bfloat16 |

Tokenizer{f" (the one in {cfg['tokenizer']}, copied)" if cfg.get("tokenizer") else ""}: byte-level BPE ({shape['vocab_size']} embedding rows) trained with `tokenizers` on the training corpus,
digits split one per token; special tokens `<|startoftext|>` (BOS), `<|endoftext|>` (EOS, pad),
`<|mdm_mask|>` (mask), `<|start_header_id|>`, `<|end_header_id|>`, `<|eot_id|>`.

## Training

- Steps {cfg['steps']}, batch {cfg['batch_size']} x {cfg['seq_len']} tokens, AdamW (betas 0.9/0.95,
  weight decay {cfg['weight_decay']}), lr {cfg['lr']} with {cfg['warmup']} warmup steps and cosine decay
  to {cfg['min_lr_ratio']} x lr, bf16 autocast, gradient clipping {cfg['grad_clip']}, seed {cfg['seed']}.
- Run time: {minutes:.1f} min on 2 shared CPU cores ({cfg.get('threads') or 'default'} torch threads; median {summary['median_tokens_per_s']} tokens/s).
- Final loss (mean of the last logged windows): {losses}.

Reproduce:

```bash
{command}
```

{LICENSES.format(python=corpus.python_sources_note())}
## Mini benchmark (full precision, shipped bf16 weights run in float32)

| task | accuracy % | stderr | n | chance % | length-normalised % |
|---|---|---|---|---|---|
{rows}

Held-out items from `dllmq/evaluate/mini_data/`; settings in `dllmq/evaluate/mini.py`. mini_general's
length-normalised accuracy is lm-eval's acc_norm (log-likelihood per character of the choice).
{extra}"""


def residual_norm_paths(family: Family, n_layers: int) -> set[str]:
    """The norms that read the residual stream: every block's attention norm and the final norm."""
    return {f"{family.blocks}.{i}.{family.attn_norm}" for i in range(n_layers)} | {family.final_norm}


def extras_markdown(evals: dict, quant: dict | None, acts: dict | None, residual: set[str] = frozenset()) -> str:
    parts = []
    if quant:
        n = next(iter(next(iter(quant.values())).values()))["n"]
        lines = ["", f"## Weight-only quantization check (RTN, asymmetric, per group; first {n} items per task)", "",
                 "| setting | " + " | ".join(evals) + " |", "|---|" + "---|" * len(evals),
                 "| FP (bf16 weights) | " + " | ".join(f"{quant['FP'][t]['acc'] * 100:.1f}" for t in evals) + " |"]
        for name, res in quant.items():
            if name == "FP":
                continue
            cells = [f"{res[t]['acc'] * 100:.1f} ({(res[t]['acc'] - quant['FP'][t]['acc']) * 100:+.1f})" for t in evals]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    if acts:
        resid = {k: v for k, v in acts.items() if k in residual}
        worst = sorted(acts.items(), key=lambda kv: -kv[1]["ratio_to_median"])[:5]
        lines = ["", "## Activations (float32, 64 general contexts + 32 code prompts)", "",
                 "Residual stream entering each block (and the final norm): largest |x|, its channel, and its",
                 "ratio to the median channel's largest |x|:", "",
                 "| where | max abs | channel | max / median channel |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['max']} | {v['channel']} | {v['ratio_to_median']} |" for k, v in resid.items()]
        lines += ["", "Most outlier-dominated linear inputs: " + "; ".join(
            f"{k} (channel {v['channel']}, {v['ratio_to_median']}x median)" for k, v in worst) + "."]
        parts.append("\n".join(lines))
    return "\n".join(parts) + ("\n" if parts else "")


def export_model(run: Path, dest: Path, progress: bool = True, extra: str = "", quant: bool = False,
                 activations: bool = False, full_limit: int | None = None, quant_limit: int | None = 200) -> dict:
    """Copy run/final beside dest, evaluate it, write eval.json and README.md, then put it at dest in
    one step (an existing dest is replaced only by the complete new one)."""
    name = dest.name
    with atomic_directory(dest, overwrite=True) as tmp:
        shutil.copytree(run / "final", tmp, dirs_exist_ok=True)
        started = time.time()
        evals = evaluate_dir(tmp, progress=progress, full_limit=full_limit)
        subset = evaluate_dir(tmp, limit=1)
        summary = run_summary(run)

        config = parse_model_config(read_config_json(tmp))
        summary["n_params"] = config.n_params
        summary["shape"] = {k: getattr(config, k) for k in SHAPE_FIELDS}
        record = {"name": name, "full": evals, "subset": subset, "eval_seconds": round(time.time() - started, 1),
                  "training": {k: v for k, v in summary.items() if k != "config"}}
        q = quant_check(tmp, limit=quant_limit if full_limit is None else full_limit) if quant else None
        a = activation_stats(tmp) if activations else None
        if q:
            record["rtn"] = q
        if a:
            record["activations"] = a
        extra = extras_markdown(evals, q, a, residual_norm_paths(get_family(config.family), config.n_layers)) + extra
        (tmp / "eval.json").write_text(json.dumps(record, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(name, summary, evals, extra))
    return record


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dllmq.train.export", description=__doc__)
    p.add_argument("run", type=Path)
    p.add_argument("dest", type=Path)
    p.add_argument("--quant-check", action="store_true", help="also evaluate RTN W4/W3 g32 and record the change")
    p.add_argument("--activations", action="store_true", help="also record where the large activations are")
    p.add_argument("--quant-limit", type=int, default=200, help="items per task for the RTN check (default 200)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: small batches gain nothing from more, and shared cores lose)")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    record = export_model(args.run, args.dest, quant=args.quant_check, activations=args.activations,
                          quant_limit=args.quant_limit)
    print(json.dumps({k: record[k] for k in ("full", "training")}, indent=2))
    return 0



# ---------------------------------------------------------------------------------------------
# looking at a run and at a shipped model
# ---------------------------------------------------------------------------------------------

def model_from_checkpoint(run: Path):
    """(model, tokenizer, step) from a run's latest checkpoint.pt (float32), e.g. to peek mid-training."""
    cfg = TrainConfig(**json.loads((run / "train_config.json").read_text()))
    tokenizer = load_tokenizer(run / "tokenizer" if (run / "tokenizer").is_dir() else Path(cfg.init))
    if cfg.stage == "instruct":
        raw = read_config_json(Path(cfg.init))
        raw = {**raw, "dllmq_training": {"chat": cfg.sft_format == "chat"}}  # plain: a base model still
    else:
        raw = tiny_model_config(cfg, tokenizer)
    model = build_model(parse_model_config(raw))
    state = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    return model.eval(), tokenizer, state["step"]


def quant_check(directory: Path, settings=((4, 32), (3, 32)), limit: int | None = None) -> dict:
    """RTN weight-only (asymmetric, group g) at each (bits, group): mini accuracies."""
    model, tokenizer, _ = load_plain_model(directory, dtype="float32")
    out = {"FP": evaluate_mini(model, tokenizer, limit=limit, progress=False)}  # the same items, unquantized
    for bits, group in settings:
        model, tokenizer, _ = load_plain_model(directory, dtype="float32")
        quantize(model, tokenizer, QuantConfig(method="rtn", wbits=bits, group_size=group), progress=False)
        out[f"RTN W{bits} g{group}"] = evaluate_mini(model, tokenizer, limit=limit, progress=False)
    return out


def activation_stats(directory: Path, n_items: int = 64) -> dict:
    """Where the large activations are: per block, the |max| of the residual stream (block input)
    and of each linear's input, with the channel it is in and its ratio to the median channel's |max|."""


    model, tokenizer, _ = load_plain_model(directory, dtype="float32")
    texts = [it["context"] for it in load_items("mini_general", n_items)]
    texts += [it["prompt"] for it in load_items("mini_code", n_items // 2)]
    stats: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(module, args):
            x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0)
            stats[name] = torch.maximum(stats[name], x) if name in stats else x
        return fn

    handles = []
    residual = residual_norm_paths(model.family, len(model.get_blocks()))
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or name in residual:
            handles.append(module.register_forward_pre_hook(hook(name)))
    with torch.no_grad():
        for text in texts:
            model(torch.tensor([tokenizer(text)["input_ids"]]))
    for h in handles:
        h.remove()
    report = {}
    for name, per_channel in stats.items():
        top = int(per_channel.argmax())
        report[name] = {"max": round(float(per_channel.max()), 2), "channel": top,
                        "ratio_to_median": round(float(per_channel.max() / per_channel.median().clamp_min(1e-6)), 1)}
    return report


if __name__ == "__main__":
    sys.exit(main())
