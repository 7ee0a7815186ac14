"""Activation outlier profiling: planted outliers are found exactly, statistics equal a slow direct
computation, masking feeds the right inputs, quantized models are profiled after their transforms."""
import argparse
import json
import math
import sys

import numpy as np
import pytest
import torch

import dllmq
from dllmq.analysis.outliers import OutlierThresholds, profile_outliers, write_outlier_report
from dllmq.cli.outliers import add_parser
from dllmq.errors import DllmqError
from dllmq.models.random_models import random_model
from dllmq.quant.online import seen_input

NO_PLOTS = dict(surface_layers=0)


def _ids(windows=3, length=32, seed=0):
    """Byte-level token ids that are never special tokens (the mask id is 258)."""
    return torch.randint(3, 250, (windows, length), generator=torch.Generator().manual_seed(seed))


def _llada():
    model, tok = random_model("random-llada", seed=1)
    return model, tok, model.family


def _capture(module, store):
    return module.register_forward_pre_hook(lambda m, a: store.append(seen_input(m, a[0]).detach().clone()))


def _slow_stats(x: np.ndarray, t: OutlierThresholds) -> dict:
    """The module docstring's definitions, computed the textbook way on the full [windows, T, C] input."""
    a = np.abs(x.astype(np.float64))
    w, seqlen, c = a.shape
    med = np.array([np.sort(a[i].ravel())[(a[i].size - 1) // 2] for i in range(w)])  # lower median
    v = x.astype(np.float64).ravel()
    d = v - v.mean()
    normal = (a > t.normal_ratio * med[:, None, None]).reshape(-1, c).mean(axis=0)
    massive = a > np.maximum(t.massive_ratio * med, t.massive_floor)[:, None, None]
    return {"max": a.max(), "median": np.sort(med)[(w - 1) // 2], "kurtosis": (d ** 4).mean() / (d ** 2).mean() ** 2,
            "mean": v.mean(), "std": v.std(), "channel_max": a.max(axis=(0, 1)), "token_max": a.max(axis=2),
            "normal": normal, "massive_channel": massive.sum(axis=(0, 1)), "massive_token": massive.any(axis=2)}


def test_stats_equal_slow_direct_computation():
    model, tok, fam = _llada()
    blocks = model.get_blocks()
    seen = {"down": [], "q": []}
    handles = [_capture(blocks[1].ff_out, seen["down"]), _capture(blocks[0].q_proj, seen["q"])]
    # 5 windows in batches of 2: reductions must merge across uneven batches exactly
    t = OutlierThresholds(normal_ratio=2.0, normal_min_frac=0.3, massive_ratio=20.0, massive_floor=0.05)
    report = profile_outliers(model, tok, input_ids=_ids(5), mask_ratios=(0,), batch_size=2, thresholds=t, **NO_PLOTS)
    for h in handles:
        h.remove()
    for key, (block, name) in {"down": (1, "ff_out"), "q": (0, "q_proj")}.items():
        x = torch.cat(seen[key]).numpy()
        slow = _slow_stats(x, t)
        s = report.linear(block, name)
        assert s.n_tokens == 5 * 32 and s.in_features == x.shape[-1]
        assert s.max_abs == pytest.approx(slow["max"], rel=1e-6)
        assert s.median_abs == pytest.approx(slow["median"], rel=1e-6)
        assert s.kurtosis == pytest.approx(slow["kurtosis"], rel=1e-6)
        assert s.mean == pytest.approx(slow["mean"], rel=1e-5, abs=1e-9)
        assert s.std == pytest.approx(slow["std"], rel=1e-6)
        np.testing.assert_allclose(s.channel_max.numpy(), slow["channel_max"], rtol=1e-6)
        np.testing.assert_allclose(s.token_max.numpy(), slow["token_max"], rtol=1e-6)
        np.testing.assert_allclose(s.normal_fraction.numpy(), slow["normal"])
        np.testing.assert_array_equal(s.massive_channel.numpy(), slow["massive_channel"])
        np.testing.assert_array_equal(s.massive_token.numpy(), slow["massive_token"])
    # the loose thresholds make the comparison non-trivial: some values are flagged
    assert report.linear(1, "ff_out").massive_count > 0
    # q/k/v read the same input: identical statistics (the shared reduction is reused, not recomputed)
    q, v = report.linear(0, "q_proj"), report.linear(0, "v_proj")
    assert (q.max_abs, q.kurtosis) == (v.max_abs, v.kurtosis)


def test_kurtosis_of_known_distributions():
    """Through the real hooks: inputs with a known kurtosis (Gaussian 3, uniform 1.8, two-point 1)."""
    model, tok, fam = _llada()
    lin = model.get_blocks()[0].ff_out
    n = lin.in_features
    gen = torch.Generator().manual_seed(0)
    cases = {3.0: torch.randn(2, 512, n, generator=gen), 1.8: torch.rand(2, 512, n, generator=gen) * 2 - 1,
             1.0: torch.randint(0, 2, (2, 512, n), generator=gen).float() * 2 - 1}
    for expected, x in cases.items():
        h = lin.register_forward_pre_hook(lambda m, a, x=x: (x,))
        report = profile_outliers(model, tok, input_ids=_ids(2, 512), mask_ratios=(0,), batch_size=2, **NO_PLOTS)
        h.remove()
        assert report.linear(0, "ff_out").kurtosis == pytest.approx(expected, abs=0.05)


def _normal_channels(report, t=OutlierThresholds()):
    return {s.layer: s.normal_channels(t) for s in report.profiles[0].linears if s.normal_channels(t)}


def test_planted_normal_outlier_channel_found_only_where_planted():
    model, tok, fam = _llada()
    ids = _ids(4)
    before = _normal_channels(profile_outliers(model, tok, input_ids=ids, mask_ratios=(0,), **NO_PLOTS))
    channel = 37
    with torch.no_grad():
        model.get_blocks()[1].ff_norm.weight[channel] *= 50
    report = profile_outliers(model, tok, input_ids=ids, mask_ratios=(0,), **NO_PLOTS)
    after = _normal_channels(report)
    assert before.get("1.ff_proj") is None and before.get("1.up_proj") is None
    assert after["1.ff_proj"] == [channel] and after["1.up_proj"] == [channel]
    # nothing upstream of or beside the FFN norm changes (block 1's down input is downstream of it)
    for layer in set(before) | set(after):
        if layer not in ("1.ff_proj", "1.up_proj", "1.ff_out"):
            assert before.get(layer) == after.get(layer), layer
    s = report.linear(1, "ff_proj")
    assert int(s.channel_max.argmax()) == channel
    # any massive value of the gate/up input sits in the planted channel
    assert set(s.massive_channels()) <= {channel}
    d = report.to_dict()["profiles"][0]["linears"]
    entry = next(e for e in d if (e["block"], e["name"]) == (1, "up_proj"))
    assert entry["normal_outliers"]["n_channels"] == 1 and entry["normal_outliers"]["channels"][0][0] == channel
    assert entry["top_channels"][0][0] == channel


class _Plant:
    """A pre-hook on a linear that writes a huge value at fixed token positions and one channel."""

    def __init__(self, positions, channel, value=1000.0):
        self.positions, self.channel, self.value = positions, channel, value

    def __call__(self, module, args):
        x = args[0].clone()
        x[:, self.positions, self.channel] = self.value
        return (x,)


def test_planted_massive_activations_found_exactly():
    model, tok, fam = _llada()
    ids = _ids(3)
    positions, channel = [0, 5, 17, 30], 101
    handle = model.get_blocks()[1].ff_out.register_forward_pre_hook(_Plant(positions, channel))
    report = profile_outliers(model, tok, input_ids=ids, mask_ratios=(0, 0.5), seed=3, **NO_PLOTS)
    handle.remove()
    for profile in report.profiles:
        with_massive = [s for s in profile.linears if s.massive_count]
        assert [s.layer for s in with_massive] == ["1.ff_out"]
        s = with_massive[0]
        assert s.massive_channels() == [channel]
        assert s.massive_count == 3 * len(positions)
        assert s.massive_positions() == [(w, p) for w in range(3) for p in positions]
        expected = len(positions) / ids.shape[1]
        assert s.massive_token_fraction == pytest.approx(expected)
        assert profile.massive_token_fraction() == pytest.approx(expected)
        assert profile.massive_token_fraction("down") == pytest.approx(expected)
        assert profile.massive_token_fraction("qkv") == 0.0
        # split by token type: planted positions that are (not) masked, over (un)masked tokens
        planted = torch.zeros_like(profile.is_mask)
        planted[:, positions] = True
        split = profile.fraction_by_token_type()
        if profile.mask_ratio == 0:
            assert split["masked"] is None and split["unmasked"] == pytest.approx(expected)
        else:
            m = profile.is_mask
            assert split["masked"] == pytest.approx(float(planted[m].float().mean()))
            assert split["unmasked"] == pytest.approx(float(planted[~m].float().mean()))
            entry = next(e for e in profile.to_dict(report.thresholds)["linears"] if e["name"] == "ff_out"
                         and e["block"] == 1)
            assert entry["massive"]["mask_token_share"] == pytest.approx(float(m[planted].float().mean()))
    # a value far above the median but under the absolute floor is not massive (a near-dead layer)
    handle = model.get_blocks()[1].ff_out.register_forward_pre_hook(_Plant(positions, channel, value=3.0))
    floor = OutlierThresholds(massive_floor=5.0)
    low = profile_outliers(model, tok, input_ids=ids, mask_ratios=(0,), thresholds=floor, **NO_PLOTS)
    handle.remove()
    s = low.linear(1, "ff_out")
    assert s.max_abs == 3.0 > floor.massive_ratio * s.median_abs and s.massive_count == 0


def test_mask_ratios_feed_the_right_inputs():
    model, tok, fam = _llada()
    ids = _ids(2)
    fed = []
    handle = model.get_embedding().register_forward_pre_hook(lambda m, a: fed.append(a[0].clone()))
    report = profile_outliers(model, tok, input_ids=ids, mask_ratios=(1.0, 0, 0.25, 0.5), seed=7,
                              surface_layers=1, surface_mask_ratios=(0.5,))
    handle.remove()
    mask_id = model.config.mask_token_id
    assert report.mask_ratios == [0.0, 0.25, 0.5, 1.0]
    assert torch.equal(fed[0], ids)                         # clean text unchanged
    masked = [fed[1] == mask_id, fed[2] == mask_id]
    assert (masked[0].sum(1) == 8).all() and (masked[1].sum(1) == 16).all()
    assert not (masked[0] & ~masked[1]).any()               # nested: same seed ranks the positions
    assert (masked[0] | (fed[1] == ids)).all()              # unmasked positions keep their token
    assert (fed[3] == mask_id).all()                        # ratio 1: all mask tokens
    assert torch.equal(report.profile(1.0).is_mask, fed[3] == mask_id)
    assert torch.equal(report.profile(0.25).is_mask, masked[0])
    assert torch.equal(fed[4], fed[2][:1])                  # surface: window 0 at ratio 0.5
    # all-mask input to a bidirectional model: every position sees the same thing, so every token's
    # activations are equal (RoPE only turns q and k; v is identical)
    for s in report.profile(1.0).linears:
        assert torch.allclose(s.token_max, s.token_max[0, 0].expand_as(s.token_max), rtol=1e-4), s.layer
    surface = report.surfaces[0]
    assert surface.mask_ratio == 0.5 and surface.shape[0] == surface.matrix.shape[0] == 32
    # deterministic: the same call gives the same numbers
    again = profile_outliers(model, tok, input_ids=ids, mask_ratios=(1.0, 0, 0.25, 0.5), seed=7,
                             surface_layers=1, surface_mask_ratios=(0.5,))
    assert json.dumps(again.to_dict()) == json.dumps(report.to_dict())


def test_causal_model_profiles_clean_text_only_with_a_note():
    model, tok = random_model("random-llama", seed=1)
    report = profile_outliers(model, tok, input_ids=_ids(2, 16), mask_ratios=(0, 0.5, 1.0), **NO_PLOTS)
    assert report.mask_ratios == [0.0] and "mask" in report.notes[0]
    assert len(report.profiles[0].linears) == 2 * len(model.family.block_linears)
    with pytest.raises(DllmqError):
        profile_outliers(model, tok, input_ids=_ids(2, 16), mask_ratios=(1.5,), **NO_PLOTS)


def test_quantized_model_is_profiled_after_its_online_transform(tmp_path):
    model, tok, fam = _llada()
    ids = _ids(3)
    fp = profile_outliers(model, tok, input_ids=ids, mask_ratios=(0, 1.0), **NO_PLOTS)
    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    from dllmq.quant import QuantConfig, quantize, save_quantized
    quantize(model, tok, QuantConfig(method="quarot", wbits=4, abits=4, nsamples=2, seqlen=32, calib=str(calib)),
             progress=False)
    save_quantized(model, tok, tmp_path / "q")
    qmodel, qtok, qfam = dllmq.load_model(tmp_path / "q")
    seen = []
    handle = _capture(qmodel.get_blocks()[0].ff_out, seen)
    q = profile_outliers(qmodel, qtok, qfam, input_ids=ids, mask_ratios=(0, 1.0), **NO_PLOTS)
    handle.remove()
    down = q.linear(0, "ff_out")
    assert down.transformed and not q.linear(0, "q_proj").transformed
    # recorded after the Hadamard: exactly what seen_input gives
    assert down.max_abs == pytest.approx(float(torch.cat(seen[:1]).abs().max()), rel=1e-6)
    for block in range(2):
        a, b = fp.linear(block, "ff_out"), q.linear(block, "ff_out")
        assert b.max_abs / b.median_abs < 0.5 * (a.max_abs / a.median_abs)   # rotation flattens outliers
        assert b.kurtosis < a.kurtosis
    assert q.settings["quantization"]["method"] == "quarot"


def _main(argv):
    """What dllmq.cli.main does with a subcommand: parse, run, a DllmqError becomes exit code 2."""
    parser = argparse.ArgumentParser(prog="dllmq")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except DllmqError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _user_error(capsys, argv, fragment):
    code = _main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert fragment in err, err


def test_cli_writes_json_and_plots_and_refuses_bad_input(capsys, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text("Diffusion language models denoise masked tokens in parallel. " * 30)
    out = tmp_path / "out"
    argv = ["outliers", "random-llada", "--calib", str(calib), "--nsamples", "2", "--seqlen", "32",
            "--mask-ratios", "0,0.5,1", "--surface-layers", "1", "--out", str(out)]
    assert _main(argv) == 0
    printed = capsys.readouterr().out
    assert "by mask ratio" in printed and "worst linears" in printed
    data = json.loads((out / "outliers.json").read_text())
    assert data["mask_ratios"] == [0.0, 0.5, 1.0] and len(data["profiles"]) == 3
    assert len(data["profiles"][0]["linears"]) == 14
    assert data["plots"] and sorted(p.name for p in out.iterdir()) == sorted(data["plots"] + ["outliers.json"])
    for name in data["plots"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {"max_abs_by_depth.png", "massive_tokens_vs_mask_ratio.png"} <= set(data["plots"])
    assert not math.isnan(data["profiles"][0]["linears"][0]["kurtosis"])
    _user_error(capsys, argv, "already exists")
    _user_error(capsys, ["outliers", "no-such-model", "--out", str(tmp_path / "x")], "no-such-model")
    _user_error(capsys, ["outliers", "random-llada", "--mask-ratios", "0,2", "--out", str(tmp_path / "y")],
                "mask-ratios")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    # --overwrite replaces the directory; no temporary directories are left beside it
    assert _main(argv[:-2] + ["--no-plots", "--overwrite", "--out", str(out)]) == 0
    assert [p.name for p in out.iterdir()] == ["outliers.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "out"]


def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    model, tok, fam = _llada()
    report = profile_outliers(model, tok, input_ids=_ids(1), mask_ratios=(0,), surface_layers=1)
    import dllmq.analysis.plots as plots

    def broken(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(plots, "plot_max_by_depth", broken)
    with pytest.raises(RuntimeError):
        write_outlier_report(report, tmp_path / "r")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    paths = write_outlier_report(report, tmp_path / "r")
    assert [p.name for p in paths][0] == "outliers.json" and all(p.exists() for p in paths)
    assert paths[1].name == "surface_block{}_{}.png".format(report.surfaces[0].block, report.surfaces[0].name)
