"""The family grid (issue 17): AR twin vs LLaDA-style vs Dream-style.

- the causal measures (next-token KL / top-1 / exact NLL, teacher-forced continuation flips) against slow
  textbook versions, and 0 / 1 against the reference itself;
- the FP cell's massive-activation rows against a model with a planted massive activation (known positions);
- a very small version of the families grid on random tiny models of the three families with every method,
  plus a planned shipped model that is not shipped (skipped with its reason, in the summary and the report);
- `--config families` resolving to the shipped grid.
"""
from __future__ import annotations

import pytest
import torch

from dllmq.data import mask_windows
from dllmq.diffusion.next_token import (build_next_token_reference, compare_next_token, continuation_flips,
                                        record_continuation)
from dllmq.errors import DllmqError
from dllmq.models.random_models import random_model
from dllmq.study import store
from dllmq.study.config import MeasureSettings, load_config, parse_study_config
from dllmq.study.measures import outlier_rows, position_buckets
from dllmq.study.report import build_report
from dllmq.study.runner import format_summary, run_study

torch.set_num_threads(1)


def _perturbed(name: str, scale: float = 0.05, seed: int = 1):
    model, tok = random_model(name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.get_blocks()[0].parameters():
            p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=g))
    return model, tok


def _windows(n: int = 3, length: int = 24, vocab: int = 250, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------- causal measures
def test_next_token_measures_match_a_textbook_computation():
    fp, _ = random_model("random-llama")
    q, _ = _perturbed("random-llama")
    windows = _windows()
    ref = build_next_token_reference(fp, windows, batch_size=2)
    same = compare_next_token(fp, ref)
    assert same.kl == [0.0] * 3 and same.top1 == [1.0] * 3 and same.nll == same.nll_ref

    div = compare_next_token(q, ref)
    with torch.no_grad():
        for w in range(windows.shape[0]):
            kls, agree, nll_q, nll_p = [], [], [], []
            for t in range(1, windows.shape[1]):   # position t predicted from tokens < t, one prefix at a time
                lp = torch.log_softmax(fp(windows[w:w + 1, :t])[0, -1].double(), -1)
                lq = torch.log_softmax(q(windows[w:w + 1, :t])[0, -1].double(), -1)
                kls.append(float((lp.exp() * (lp - lq)).sum()))
                agree.append(int(lp.argmax() == lq.argmax()))
                nll_q.append(-float(lq[windows[w, t]]))
                nll_p.append(-float(lp[windows[w, t]]))
            n = len(kls)
            assert div.kl[w] == pytest.approx(sum(kls) / n, rel=1e-4, abs=1e-7)
            assert div.top1[w] == pytest.approx(sum(agree) / n)
            assert div.nll[w] == pytest.approx(sum(nll_q) / n, rel=1e-5)
            assert div.nll_ref[w] == pytest.approx(sum(nll_p) / n, rel=1e-5)
    assert all(k > 0 for k in div.kl)

    # the coarsened reference (top tokens + one bucket) gives a lower bound of the full KL
    small = build_next_token_reference(fp, windows, batch_size=3, max_reference_bytes=1)
    assert small.top_index is not None
    coarse = compare_next_token(q, small)
    assert all(c <= f + 1e-9 for c, f in zip(coarse.kl, div.kl)) and coarse.top1 == div.top1


def test_next_token_measures_refuse_a_diffusion_model():
    model, _ = random_model("random-llada")
    with pytest.raises(DllmqError, match="causal model"):
        build_next_token_reference(model, _windows())


def test_continuation_flips_match_stepwise_teacher_forcing():
    fp, _ = random_model("random-llama")
    q, _ = _perturbed("random-llama", scale=0.5)
    prompts = torch.tensor([[5, 6, 7, 8], [0, 9, 10, 11]])
    mask = torch.tensor([[True] * 4, [False, True, True, True]])    # left padding, as encode_prompts makes it
    stop = int(fp.config.eos_token_id)
    cont = record_continuation(fp, prompts, mask, gen_length=6)
    assert continuation_flips(fp, cont) == [[0] * n for n in cont.steps]

    flips = continuation_flips(q, cont)
    with torch.no_grad():
        for row in range(2):
            real = cont.ids[row][torch.cat([mask[row], torch.ones(cont.ids.shape[1] - 4, dtype=torch.bool)])]
            n_prompt = int(mask[row].sum())
            expect = []
            for i in range(cont.steps[row]):   # the cell's next token given FP's prefix vs FP's own choice
                prefix = real[:n_prompt + i][None]
                a = int(q(prefix)[0, -1].argmax())
                b = int(fp(prefix)[0, -1].argmax())
                expect.append(int(a != b))
                assert b == int(real[n_prompt + i]) or int(real[n_prompt + i - 1]) == stop
            assert flips[row] == expect
    # a continuation that stops: steps end at the stop token
    cut = record_continuation(fp, prompts, mask, gen_length=6, stop_ids=[int(cont.ids[0, 4])])
    assert cut.steps[0] == 1


# ------------------------------------------------------------------------------------------- massive activations
def _plant_massive(model, token: int, channel: int = 3):
    """Token `token` alone gets a value far above the rest at block 0's first norm (so only its positions carry
    a massive value, in block 0's q/k/v input; v ignores the channel, so attention does not carry it on)."""
    emb = next(m for m in model.modules() if isinstance(m, torch.nn.Embedding))
    block = model.get_blocks()[0]
    norm = next(m for n, m in block.named_modules() if "norm" in n)
    v = next(m for n, m in block.named_modules() if n.endswith("v_proj"))
    with torch.no_grad():
        v.weight[:, channel] = 0.0
        emb.weight[:, channel] = 0.0
        emb.weight[token, channel] = 1.0
        norm.weight[channel] = 1000.0


@pytest.mark.parametrize("name", ["random-llama", "random-llada"])
def test_outlier_rows_find_a_planted_massive_activation(name):
    model, _ = random_model(name)
    token = 42
    _plant_massive(model, token)
    windows = _windows(n=2, length=20, seed=3)
    windows[windows == token] = 43
    windows[0, 0], windows[0, 5], windows[1, 17] = token, token, token
    settings = MeasureSettings(windows=2, seqlen=20, ratios=(0.5, 1.0), outliers=2, batch_size=1)
    rows = {(r["measure"], r["param"]): r for r in outlier_rows(model, windows, settings, seed=7, setup="s")}

    is_token = (windows == token).float()
    assert rows[("massive_frac", "0")]["units"] == pytest.approx(is_token.mean(1).tolist())
    for a, b in position_buckets(20):
        key = ("massive_pos", str(a) if a == b else f"{a}-{b}")
        assert rows[key]["units"] == pytest.approx(is_token[:, a:b + 1].mean(1).tolist())
    if name == "random-llama":   # no mask token: clean text only
        assert not any(m == "massive_frac" and p != "0" for m, p in rows)
    else:                        # a masked occurrence of the token is a mask token: no massive value there
        mask_id = model.config.mask_token_id
        for r in (0.5, 1.0):
            kept = ((mask_windows(windows, r, mask_id, 7) == token)).float().mean(1).tolist()
            assert rows[("massive_frac", f"{r:g}")]["units"] == pytest.approx(kept)
        assert rows[("massive_frac", "1")]["value"] == 0.0


def test_position_buckets():
    assert position_buckets(1) == [(0, 0)]
    assert position_buckets(20) == [(0, 0), (1, 1), (2, 3), (4, 7), (8, 15), (16, 19)]
    assert position_buckets(128)[-1] == (64, 127)


# ------------------------------------------------------------------------------------------- the grid
@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    from dllmq.data import heldout_text
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(heldout_text("wiki")[:20_000])
    return str(path)


def small_families_grid(calib: str) -> dict:
    """The families grid's shape on random tiny models: every method at one of its bit configs, all four bit
    configs covered, a handful of items and windows; dllmq-tiny-future stands for a planned model not shipped."""
    return {"models": ["random-llama", "random-llada", "random-dream", "dllmq-tiny-future"],
            "methods": ["fp", {"name": "rtn", "bits": ["W4A16-g128"]}, {"name": "gptq", "bits": ["W3A16-g128"]},
                        {"name": "awq", "bits": ["W3A16-g128"]}, {"name": "smoothquant", "bits": ["W8A8"]},
                        {"name": "quarot", "bits": ["W4A4"]}, {"name": "duquant", "bits": ["W4A4"]}],
            "tasks": ["mini_math", "mini_code"], "limit": 2,
            "calibration": {"calib": calib, "nsamples": 2, "seqlen": 32},
            "measures": {"windows": 2, "seqlen": 32, "elbo_mc": 1, "trajectory": 2, "outliers": 2}}


@pytest.fixture
def planned(monkeypatch):
    """A model announced but not shipped (dllmq.tiny.PLANNED), whatever this release ships."""
    monkeypatch.setattr("dllmq.tiny.PLANNED", {"dllmq-tiny-future": "a model announced for later"})


def test_small_families_grid_runs_every_method_on_every_family(calib, tmp_path, planned):
    config = parse_study_config(small_families_grid(calib))
    db = tmp_path / "families.db"
    summary = run_study(config, db, cache=None, progress=False)
    assert summary.ok and summary.count("done") == 21, format_summary(summary)
    assert list(summary.unavailable) == ["dllmq-tiny-future"]
    assert "SKIPPED dllmq-tiny-future: dllmq-tiny-future (a model announced for later)" in format_summary(summary)

    cells = store.read_cells(db)
    skipped = [c for c in cells if c["model"] == "dllmq-tiny-future"]
    assert len(skipped) == 7 and {c["status"] for c in skipped} == {"unavailable"}
    assert "not shipped with this dllmq yet" in skipped[0]["error"]

    by_cell: dict[str, set[str]] = {}
    for m in store.read_measures(db):
        by_cell.setdefault(m["cell_key"], set()).add(m["measure"])
    done = {c["cell_key"]: c for c in cells if c["status"] == "done"}
    for key, c in done.items():
        got = by_cell[key]
        if c["model"] == "random-llama":
            assert {"kl_next", "top1_next", "nll", "nll_fp", "traj_flip"} <= got and "kl" not in got
        else:
            assert {"kl", "top1", "elbo_nll", "traj_flip"} <= got and "kl_next" not in got
        assert ("massive_frac" in got) == (c["method"] == "fp")

    report = build_report(db, plots=False)
    md = report.markdown
    section = md[md.index("## Model families"):]
    assert "dllmq-tiny-future: not run (dllmq-tiny-future (a model announced for later)" in section
    head = section[section.index("| setting"):].splitlines()[0]
    assert head.index("random-llama (autoregressive)") < head.index("random-llada (LLaDA-style)") \
        < head.index("random-dream (Dream-style)")
    assert "KL next-token" in head and "KL@0.5" in head
    for label in ("RTN W4A16", "GPTQ W3A16", "AWQ W3A16", "SmoothQuant W8A8", "QuaRot W4A4", "DuQuant W4A4",
                  "mean over 6 settings"):
        assert f"| {label}" in section
    outliers = section[section.index("| massive tokens %"):]
    assert "| mask ratio 0.5" in outliers and "n/a (causal)" in outliers and "| position 0 (clean text)" in outliers
    assert "Model families" in report.html
    llama = report.facts.evidence["random-llama"]
    assert all(s.kl_next is not None and s.ppl_exact for s in llama.settings.values())

    again = run_study(config, db, cache=None, progress=False)   # a rerun: nothing computed, still skipped
    assert again.count("skipped") == 21 and again.count("done") == 0 and list(again.unavailable) == ["dllmq-tiny-future"]


def test_a_grid_of_only_unshipped_models_fails_with_one_sentence(tmp_path, capsys, planned):
    from dllmq.cli.study import main as study_main
    cfg = tmp_path / "only.yaml"
    cfg.write_text("models: [dllmq-tiny-future]\nmethods: [fp]\ntasks: [mini_math]\n")
    assert study_main(["--config", str(cfg), "--db", str(tmp_path / "x.db")]) == 2
    err = capsys.readouterr().err
    assert "No model of the grid can run here" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------- the shipped grid
def test_config_families_resolves_to_the_shipped_grid():
    config = load_config("families")
    assert config.source == "families.yaml"
    assert config.models == ("dllmq-tiny-ar", "dllmq-tiny", "dllmq-tiny-dream")
    assert {m.name for m in config.methods} == {"fp", "rtn", "gptq", "awq", "smoothquant", "quarot", "duquant"}
    assert sorted({b for m in config.methods if m.name != "fp" for b in m.bits}) == \
        ["W3A16-g128", "W4A16-g128", "W4A4", "W8A8"]
    assert sum(len(m.bits) for m in config.methods) == 13 and config.measures.outliers == 8
    assert load_config("dllm_aware").source == "dllm_aware.yaml"
    default = load_config(None)
    assert default.models == ("dllmq-tiny", "dllmq-tiny-instruct") and default.measures.outliers == 0
    assert "outliers" not in default.measures.key_dict()    # the default grid's cell keys are unchanged
    with pytest.raises(DllmqError, match="families"):
        load_config("no-such-grid")


def test_dry_run_of_the_families_grid_runs_every_shipped_twin(capsys, tmp_path):
    from dllmq.cli.study import main as study_main
    assert study_main(["--config", "families", "--dry-run", "--db", str(tmp_path / "f.db")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("39 cells (3 models x 13 method/bits x 1 seeds)")
    assert "39 todo" in out and "no-model" not in out and "cannot be read yet" not in out


def test_dry_run_names_a_planned_model_not_shipped(capsys, tmp_path, planned):
    from dllmq.cli.study import main as study_main
    cfg = tmp_path / "grid.yaml"
    cfg.write_text("models: [dllmq-tiny, dllmq-tiny-future]\nmethods: [fp]\ntasks: [mini_math]\n")
    assert study_main(["--config", str(cfg), "--dry-run", "--db", str(tmp_path / "f.db")]) == 0
    out = capsys.readouterr().out
    assert "note: dllmq-tiny-future cannot be read yet (dllmq-tiny-future (a model announced for later)" in out
    assert "1 todo, 1 no-model" in out
