"""Staged precision: a switch at step 0 is the pure low-bit generation, at the end the pure high-precision
one (tokens and every logit the sampler saw, bit for bit); in between the precision changes exactly at the
scheduled step — on LLaDA and Dream, with the kernel and the fake backend."""
import copy

import pytest
import torch

from dllmq.api import load_model
from dllmq.cli import main
from dllmq.diffusion import encode_prompts, generate
from dllmq.errors import DllmqError
from dllmq.models.loading import save_model
from dllmq.models.random_models import random_model
from dllmq.quant import QuantConfig, quantize, save_quantized
from dllmq.quant.backend import KernelLinear, set_backend
from dllmq.quant.qlinear import QuantLinear
from dllmq.quant.staged import W8A8, PrecisionSwitch, StagedSpec, parse_staged, stage, staged_from_fp

LOW = dict(method="rtn", wbits=4, group_size=64)          # the int4 kernel on the CPU
STEPS = 8
# Dream's random config resized so that W4-g64 and W8A8 both get kernels (K a multiple of 32).
DREAM_SHAPE = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=1, intermediate_size=256)


@pytest.fixture(scope="module", params=["llada", "dream"])
def family(request):
    """(fp model, tokenizer, prompt ids [2, P], generation settings) per sampler."""
    if request.param == "llada":
        model, tok, _ = load_model("dllmq-tiny")
        ids, mask = encode_prompts(tok, ["The capital of France is", "Two plus two is"])   # left-padded
        assert not mask.all()
        settings = dict(gen_length=16, steps=STEPS, block_length=8)   # two blocks: steps count across them
        return model, tok, ids, mask, settings
    model, tok = random_model("random-dream", seed=2, **DREAM_SHAPE)
    ids = torch.randint(0, 200, (2, 6), generator=torch.Generator().manual_seed(0))
    return model, tok, ids, None, dict(max_new_tokens=12, steps=STEPS, alg="entropy")


def quantized(fp, tok, settings: dict, backend: str):
    model = copy.deepcopy(fp)
    quantize(model, tok, QuantConfig(**settings), progress=False)
    set_backend(model, backend)
    return model


def pure_sides(fp, tok, high: str, backend: str):
    """The models the staged one must reproduce: (pure high precision, pure low-bit)."""
    pure_high = copy.deepcopy(fp) if high == "fp" else quantized(fp, tok, W8A8, backend)
    return pure_high, quantized(fp, tok, LOW, backend)


def run(model, tok, ids, mask, settings, **extra):
    """(tokens, [logits of every forward], [(args, kwargs) of every forward])."""
    logits, inputs = [], []

    def record(module, args, kwargs, out) -> None:   # returns None: the output is left as it is
        logits.append(out.clone())
        inputs.append((args, kwargs))
    handle = model.register_forward_hook(record, with_kwargs=True)
    try:
        out = generate(model, tok, ids, attention_mask=mask, **settings, **extra)
    finally:
        handle.remove()
    return out, logits, inputs


def assert_same_run(a, b):
    tokens_a, logits_a, _ = a
    tokens_b, logits_b, _ = b
    assert torch.equal(tokens_a, tokens_b)
    assert len(logits_a) == len(logits_b) == STEPS
    assert all(torch.equal(x, y) for x, y in zip(logits_a, logits_b))


# --- the schedule --------------------------------------------------------------------------------

def test_parse_and_round():
    assert parse_staged("fp:first=0.25") == StagedSpec("fp", "first", 0.25)
    assert parse_staged(" W8A8 : LAST = 1 ") == StagedSpec("w8a8", "last", 1.0)
    assert str(parse_staged("w8a8:last=0.5")) == "w8a8:last=0.5"
    assert parse_staged("fp:first=0.25").high_steps(10) == range(0, 3)      # 2.5 rounds up
    assert parse_staged("fp:last=0.25").high_steps(10) == range(7, 10)
    assert parse_staged("fp:first=0.05").high_steps(8) == range(0, 0)       # 0.4 rounds down
    assert parse_staged("fp:last=0.0625").high_steps(8) == range(7, 8)      # 0.5 rounds up
    assert parse_staged("fp:first=1").high_steps(8) == range(0, 8)
    for bad in ("fp", "fp:first", "fp:first=x", "fp:first=-0.1", "fp:first=1.5", "fp:middle=0.5", "int4:first=0.5",
                "fp:first=nan", "fp:first=inf"):
        with pytest.raises(DllmqError):
            parse_staged(bad)


# --- exactness at both ends, on both samplers and backends -----------------------------------

@pytest.mark.parametrize("backend", ["kernel", "fake"])
@pytest.mark.parametrize("high", ["fp", "w8a8"])
def test_ends_equal_pure_generations(family, high, backend):
    fp, tok, ids, mask, settings = family
    pure_high, pure_low = pure_sides(fp, tok, high, backend)
    staged = staged_from_fp(copy.deepcopy(fp), tok, QuantConfig(**LOW), f"{high}:first=0.5", backend=backend)
    if backend == "kernel":
        assert any(isinstance(m, KernelLinear) for m in staged.modules())
    low_run, high_run = run(pure_low, tok, ids, mask, settings), run(pure_high, tok, ids, mask, settings)
    assert not all(torch.equal(a, b) for a, b in zip(low_run[1], high_run[1]))   # the sides do differ
    for spec in (f"{high}:first=0", f"{high}:last=0"):
        assert_same_run(run(staged, tok, ids, mask, settings, staged=spec), low_run)
    for spec in (f"{high}:first=1", f"{high}:last=1"):
        assert_same_run(run(staged, tok, ids, mask, settings, staged=spec), high_run)
    assert staged.staged.control.high is False   # left at the low-bit default


@pytest.mark.parametrize("backend", ["kernel", "fake"])
@pytest.mark.parametrize("spec", ["fp:first=0.5", "w8a8:last=0.3"])
def test_mid_switch_changes_precision_at_that_step(family, spec, backend):
    """Which side ran at each step (hooks on both sides of a switch), and each step's logits equal the
    scheduled side's pure model on the state the staged run was in."""
    fp, tok, ids, mask, settings = family
    spec = parse_staged(spec)
    pure_high, pure_low = pure_sides(fp, tok, spec.high, backend)
    staged = staged_from_fp(copy.deepcopy(fp), tok, QuantConfig(**LOW), spec, backend=backend)
    switch = next(m for m in staged.modules() if isinstance(m, PrecisionSwitch))
    sides, steps = [], []
    switch.high.register_forward_pre_hook(lambda *a: sides.append("high"))
    switch.low.register_forward_pre_hook(lambda *a: sides.append("low"))
    _, logits, inputs = run(staged, tok, ids, mask, settings, before_step=steps.append)
    assert steps == list(range(STEPS))
    expected = ["high" if i in spec.high_steps(STEPS) else "low" for i in range(STEPS)]
    assert sides == expected and 0 < expected.count("high") < STEPS
    with torch.no_grad():
        for i, ((args, kwargs), seen) in enumerate(zip(inputs, logits)):
            assert torch.equal(seen, (pure_high if expected[i] == "high" else pure_low)(*args, **kwargs))


# --- what is switched and what is shared ---------------------------------------------------------

def test_rtn_switches_exactly_the_quantized_linears_and_shares_the_rest():
    fp, tok = random_model("random-llada", seed=1)
    pure_low = quantized(fp, tok, LOW, "kernel")
    linears = [p for p, m in pure_low.named_modules() if isinstance(m, (QuantLinear, KernelLinear))]
    embedding = fp.get_embedding().weight
    staged = stage(copy.deepcopy(fp), quantized(fp, tok, LOW, "kernel"), "fp:first=0.5")
    assert staged.staged.switched == linears
    assert torch.equal(staged.get_embedding().weight, embedding)
    held = {id(t) for t in [*staged.parameters(), *staged.buffers()]}
    # every FP tensor outside the linears is held once (the low side's), plus the FP weights of the linears
    assert len(held) == len(list(pure_low.parameters())) + len(list(pure_low.buffers())) + len(linears)


def test_quarot_switches_what_its_rotation_changed():
    """QuaRot rotates the embedding, norms and head and adds a K/V quantizer (a kv_hook the FP model lacks):
    those switch too, and both ends are still exact."""
    fp, tok = random_model("random-llada", seed=1)
    config = dict(method="quarot", wbits=4, abits=4, kv_bits=4, nsamples=2, seqlen=32)
    pure_low = quantized(fp, tok, config, "kernel")
    staged = staged_from_fp(copy.deepcopy(fp), tok, QuantConfig(**config), "fp:first=0.5")
    switched = set(staged.staged.switched)
    assert {fp.family.embed, f"{fp.family.blocks}.0.kv_hook", fp.family.lm_head} <= switched
    ids = torch.randint(0, 200, (1, 5), generator=torch.Generator().manual_seed(1))
    settings = dict(gen_length=8, steps=STEPS, block_length=8)
    logits = lambda model, **kw: run(model, tok, ids, None, settings, **kw)   # noqa: E731
    assert_same_run(logits(staged, staged="fp:first=0"), logits(pure_low))
    assert_same_run(logits(staged, staged="fp:last=1"), logits(fp))


def test_refusals():
    fp, tok = random_model("random-llada", seed=1)
    ids = torch.randint(0, 200, (1, 4))
    with pytest.raises(DllmqError, match="staged model"):
        generate(fp, tok, ids, gen_length=4, steps=4, staged="fp:first=0.5")
    staged = staged_from_fp(copy.deepcopy(fp), tok, QuantConfig(**LOW), "fp:first=0.5")
    with pytest.raises(DllmqError, match="high precision is fp"):
        generate(staged, tok, ids, gen_length=4, steps=4, staged="w8a8:first=0.5")
    other, _ = random_model("random-llada", seed=1, n_layers=1)
    with pytest.raises(DllmqError, match="not the one"):
        stage(other, quantized(fp, tok, LOW, "fake"), "fp:first=0.5")
    with pytest.raises(DllmqError, match="two precisions"):
        save_quantized(staged, tok, "/nonexistent/never-written")
    causal, ctok = random_model("random-llama", seed=1)
    with pytest.raises(DllmqError, match="autoregressive"):
        stage(copy.deepcopy(causal), quantized(causal, ctok, LOW, "fake"), "fp:first=0.5")


# --- from checkpoints, and the command line -------------------------------------------------------

def test_cli_staged_generation(tmp_path, capsys):
    fp, tok = random_model("random-llada", seed=3)
    fp_dir = save_model(fp, tok, tmp_path / "fp")
    q_dir = save_quantized(quantized(fp, tok, LOW, "fake"), tok, tmp_path / "q")
    base = ["generate", str(q_dir), "--prompt", "hello", "--gen-length", "8", "--steps", "8"]

    def text(*extra):
        assert main([*base, *extra]) == 0
        return capsys.readouterr().out
    low = text()
    assert main(["generate", str(fp_dir), "--prompt", "hello", "--gen-length", "8", "--steps", "8"]) == 0
    high = capsys.readouterr().out
    assert text("--staged", "fp:first=0", "--staged-source", str(fp_dir)) == low
    assert text("--staged", "fp:last=1", "--staged-source", str(fp_dir)) == high
    for argv, fragment in [(["--staged", "fp:middle=0.5", "--staged-source", str(fp_dir)], "first or last"),
                           (["--staged", "fp:first=2", "--staged-source", str(fp_dir)], "between 0 and 1"),
                           (["--staged", "fp:first=0.5"], "--staged-source"),
                           (["--staged-source", str(fp_dir)], "give --staged too"),
                           (["--staged", "fp:first=0.5", "--staged-source", str(q_dir)], "itself quantized")]:
        assert main([*base, *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and fragment in err, err
    assert main(["generate", str(fp_dir), "--prompt", "x", "--staged", "fp:first=0.5", "--staged-source",
                 str(fp_dir)]) == 2
    assert "full-precision model" in capsys.readouterr().err


def test_benchmark_dry_run_runs_every_cuda_configuration():
    """benchmarks/staged_generate.py's GPU path (all configurations in one process), on the CPU at toy sizes."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    script = root / "benchmarks" / "staged_generate.py"
    env = dict(os.environ, PYTHONPATH=str(root / "src"), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(script), "--dry-run"], capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = [line.split()[0] for line in result.stdout.splitlines() if "tok/s" in line]
    assert rows == ["fp", "w8a8", "w4a4", "w4a16", "w4a4+w8a8:first=0.25", "w4a4+w8a8:first=0.5",
                    "w4a4+fp:first=0.25", "w4a16+fp:first=0.25"]
    assert "int8_dynamic 28" in result.stdout     # a staged W4A4 + W8A8 model: both sides on the int8 kernel
    if not torch.cuda.is_available():
        refused = subprocess.run([sys.executable, str(script), "--device", "cuda"], capture_output=True, text=True,
                                 env=env, timeout=120)
        assert refused.returncode != 0 and "no CUDA GPU" in refused.stderr
