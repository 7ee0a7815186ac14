"""Why GPTQ's settings matter on SmolLM2-135M-Instruct: every linear's held-out output error, per setting.

The protocol of compare_tools_smollm2.py (calibration windows from the first 80 % of the wiki text,
held-out windows from the last 20 %). The full-precision model is run once over both; for every
block linear the Gram matrix of its inputs is kept: calibration H (what GPTQ minimises) and held-out
G, also split into the first token of each window (the attention sink, where SmolLM2's massive
activations sit) and the rest. Then each setting quantizes every linear from its calibration H
alone (inputs from the full-precision model, so the settings are compared on identical problems)
and the relative held-out output error ||(W - Q) X|| / ||W X|| is computed from G. Printed per
setting: the error averaged over layers of each role, on all held-out tokens and without the sink
tokens, and on how many of the 210 linears the setting beats round-to-nearest.

    python benchmarks/gptq_layer_errors_smollm2.py [--bits 4 --group 64 --nsamples 64 --heldout 16]
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch

SETTINGS = {
    "reference (study)": dict(damp=0.01),
    "+ damp 0.05": dict(damp=0.05),
    "+ act-order": dict(damp=0.01, act_order=True),
    "+ act-order, damp 0.05": dict(damp=0.05, act_order=True),
    "+ group act-order": dict(damp=0.01, group_act_order=True),
    "+ group act-order, damp 0.05": dict(damp=0.05, group_act_order=True),
    "+ static grids": dict(damp=0.01, static_grids=True),
    "+ grid search": dict(damp=0.01, grid_search=True),
    "+ act-order, damp 0.05, grid search": dict(damp=0.05, act_order=True, grid_search=True),
    "+ group act-order, damp 0.05, grid search": dict(damp=0.05, group_act_order=True, grid_search=True),
    "+ group act-order, damp 0.05, static grids, grid search": dict(damp=0.05, group_act_order=True,
                                                                     static_grids=True, grid_search=True),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--heldout", type=int, default=16, help="held-out windows")
    p.add_argument("--settings", type=json.loads, default=None, help='JSON {"name": {setting: value}} instead')
    p.add_argument("--json", help="write the per-layer errors here")
    args = p.parse_args()

    from dllmq import load_model
    from dllmq.data import calibration_windows, load_corpus, tokenize_text
    from dllmq.diffusion.perplexity import split_windows
    from dllmq.models.smollm2 import smollm2_checkpoint
    from dllmq.quant.gptq_solver import HessianAccumulator, gptq_quantize
    from dllmq.quant.rounding import rtn_weight
    from dllmq.quant.specs import WeightSpec

    model, tok, _ = load_model(smollm2_checkpoint(), dtype="float32")
    text = load_corpus("wiki", "train").rstrip("\n") + "\n\n" + load_corpus("wiki", "heldout")
    ids = tokenize_text(tok, text)
    cut = int(0.8 * ids.numel())
    calib = calibration_windows(ids[:cut], args.nsamples, args.seqlen, 0)
    heldout = split_windows(ids[cut:], args.seqlen, args.heldout)
    family = model.family
    blocks = model.get_blocks()
    names = [(i, g.linears[0]) for i in range(len(blocks)) for g in family.groups]

    def grams(windows, split_sink):
        dtype = torch.float32
        acc = {key: (HessianAccumulator(blocks[key[0]].get_submodule(key[1]).in_features, "cpu", dtype),
                     HessianAccumulator(blocks[key[0]].get_submodule(key[1]).in_features, "cpu", dtype))
               for key in names}

        def hook(key):
            def fn(m, a, out):
                x = a[0]
                if split_sink:
                    acc[key][0].add(x[:, :1])
                    acc[key][1].add(x[:, 1:])
                else:
                    acc[key][0].add(x)
            return fn
        handles = [blocks[i].get_submodule(n).register_forward_hook(hook((i, n))) for i, n in names]
        with torch.no_grad():
            for rows in windows.split(4):
                model(rows)
        for h in handles:
            h.remove()
        return acc

    start = time.perf_counter()
    cache = f"/tmp/dllmq_layer_grams_{args.nsamples}_{args.seqlen}_{args.heldout}.pt"
    try:
        cal, held = torch.load(cache, weights_only=False)
    except OSError:
        cal = grams(calib, False)
        held = grams(heldout, True)
        torch.save((cal, held), cache)
    print(f"Gram matrices of {len(names)} inputs in {time.perf_counter() - start:.0f} s", flush=True)

    settings = args.settings or SETTINGS
    spec = WeightSpec(args.bits, args.group, sym=True)
    layers = [(i, g, n) for i in range(len(blocks)) for g in family.groups for n in g.linears]

    def quad(A, S):
        return float(((A @ S.double()) * A).sum())

    norms = {}
    for i, g, n in layers:
        W = blocks[i].get_submodule(n).weight.detach().double()
        sink, rest = held[(i, g.linears[0])]
        norms[f"{i}.{n}"] = (quad(W, sink.S), quad(W, rest.S))

    def errors(quantize):
        out = {}
        for i, g, n in layers:
            W = blocks[i].get_submodule(n).weight.detach().float()
            sink, rest = held[(i, g.linears[0])]
            Q = quantize(W, cal[(i, g.linears[0])][0].H)
            D = (W - Q).double()
            e_sink, e_rest = quad(D, sink.S), quad(D, rest.S)
            n_sink, n_rest = norms[f"{i}.{n}"]
            out[f"{i}.{n}"] = (math.sqrt((e_sink + e_rest) / (n_sink + n_rest)), math.sqrt(e_rest / n_rest),
                               math.sqrt(e_sink / n_sink))
        return out

    results = {"RTN": errors(lambda W, H: rtn_weight(W, spec).weight)}
    torch.set_num_threads(1)
    for name, options in settings.items():
        t = time.perf_counter()
        results[name] = errors(lambda W, H: gptq_quantize(W, H, args.bits, args.group, True, **options)[0])
        print(f"  {name}: {time.perf_counter() - t:.0f} s", flush=True)

    roles = [g.role.value for g in family.groups]
    print(f"\nW{args.bits} g{args.group} sym, {args.nsamples} x {args.seqlen} calibration tokens, {args.heldout} "
          f"held-out windows: mean relative output error per role (all held-out tokens | without the sink token), "
          f"linears better than RTN (all | without sink | sink only)")
    print("| setting | " + " | ".join(roles) + " | better than RTN |")
    print("|---|" + "---|" * (len(roles) + 1))
    rtn = results["RTN"]
    for name, res in results.items():
        cells = []
        for g in family.groups:
            keys = [f"{i}.{n}" for i in range(len(blocks)) for n in g.linears]
            a = sum(res[k][0] for k in keys) / len(keys)
            b = sum(res[k][1] for k in keys) / len(keys)
            cells.append(f"{a:.4f} / {b:.4f}")
        wins = [sum(res[k][j] < rtn[k][j] for k in res) for j in range(3)]
        better = "" if name == "RTN" else f"{wins[0]} / {wins[1]} / {wins[2]} of {len(res)}"
        print(f"| {name} | " + " | ".join(cells) + f" | {better} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main()
