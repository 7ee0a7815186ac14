"""Fingerprints of every method on every family: a hash of the saved tensors and of the reloaded model's
logits, one line per case. Run it on two checkouts and diff the outputs to show that a change left the
numbers alone:

    PYTHONPATH=old/src python scripts/quant_fingerprint.py > old.txt
    PYTHONPATH=new/src python scripts/quant_fingerprint.py > new.txt && diff old.txt new.txt

Single-threaded, so the hashes do not depend on the machine's core count (about 2 minutes)."""
import hashlib
import tempfile

import torch
from safetensors.torch import load_file

from dllmq import load_model
from dllmq.models.random_models import random_model
from dllmq.quant import QuantConfig, quantize, save_quantized

CASES = [("rtn", dict(wbits=4, group_size=32)), ("gptq", dict(wbits=3, group_size=32)),
         ("awq", dict(wbits=4, group_size=32)), ("gptq", dict(wbits=4, group_size=32, act_order=True)),
         ("awq", dict(wbits=3, group_size=32, awq_duo_scaling=True)), ("smoothquant", dict(wbits=8, abits=8)),
         ("quarot", dict(wbits=4, abits=4, kv_bits=4)), ("quarot", dict(wbits=4, abits=4, weight_method="rtn")),
         ("duquant", dict(wbits=4, abits=4)), ("rtn", dict(wbits=4, abits=4))]


def fingerprint(name: str, method: str, settings: dict) -> tuple[str, str]:
    model, tokenizer = random_model(name, seed=3)
    quantize(model, tokenizer, QuantConfig(method, nsamples=4, seqlen=32, **settings), progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        out = save_quantized(model, tokenizer, f"{tmp}/q")
        tensors = load_file(out / "model.safetensors")
        h = hashlib.sha256()
        for key in sorted(tensors):
            h.update(key.encode())
            h.update(tensors[key].contiguous().view(torch.uint8).numpy().tobytes())
        loaded, _, _ = load_model(out)
        with torch.no_grad():
            logits = loaded((torch.arange(40) % 200)[None]).float()
    return h.hexdigest()[:16], hashlib.sha256(logits.numpy().tobytes()).hexdigest()[:16]


if __name__ == "__main__":
    torch.set_num_threads(1)
    for family in ("random-llada", "random-dream", "random-llama"):
        for method, settings in CASES:
            tensors, logits = fingerprint(family, method, settings)
            print(family, method, settings, "tensors", tensors, "logits", logits, flush=True)
