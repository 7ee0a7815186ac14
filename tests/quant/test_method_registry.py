"""A new method is one class and one registry line: a toy method defined and registered here alone runs
through quantize -> save -> load -> the CLI -> a study cell, with its own setting and online transform."""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import dllmq
from dllmq.cli import main
from dllmq.errors import DllmqError
from dllmq.models.family import Role
from dllmq.models.random_models import random_model
from dllmq.quant import Method, QuantConfig, quantize, register, save_quantized
from dllmq.quant.block import BlockContext
from dllmq.quant.config import PRESETS, SHARED
from dllmq.quant.methods.base import WEIGHT_ONLY
from dllmq.quant.modules import replace_module
from dllmq.quant.online import OnlineLinear
from dllmq.quant.registry import get_method, method_names, methods, unregister
from dllmq.quant.rounding import round_block
from dllmq.quant.specs import MethodSettings, setting
from dllmq.study import store
from dllmq.study.config import parse_study_config
from dllmq.study.grid import method_name, rotation_methods, weight_only_methods
from dllmq.study.runner import run_study


class SignFlip(nn.Module):
    """x -> x * d for a fixed +-1 vector d (its own inverse); a buffer, so saved models keep it."""

    def __init__(self, n: int):
        super().__init__()
        self.register_buffer("signs", torch.ones(n))

    def forward(self, x):
        return x * self.signs.to(x.dtype)


@dataclass(frozen=True)
class FlipSettings(MethodSettings):
    flip_seed: int = setting(0, "seed of the sign pattern", flag="--flip-seed")


class FlipRound(Method):
    """Flip the sign of a seeded half of every linear's input channels (folded into the weights, undone
    online), then round to nearest."""

    name = "fliprtn"
    display_name = "FlipRTN"
    kind = WEIGHT_ONLY
    Settings = FlipSettings

    @classmethod
    def needs_calibration(cls, settings) -> bool:
        return False

    def quantize_block(self, ctx: BlockContext):
        gen = torch.Generator().manual_seed(self.settings.flip_seed * 1000 + ctx.index)
        for name in ctx.family.block_linears:
            lin = OnlineLinear.wrap(ctx.linear(name))
            flip = SignFlip(lin.in_features)
            flip.signs.copy_(torch.randint(0, 2, (lin.in_features,), generator=gen).float() * 2 - 1)
            with torch.no_grad():
                lin.weight.mul_(flip.signs.to(lin.weight.dtype)[None, :])
            lin.input_transform = flip
            replace_module(ctx.block, name, lin)
        return round_block(ctx, self.config.weight)

    def input_transform(self, role: Role, in_features: int) -> nn.Module | None:
        return SignFlip(in_features)


@pytest.fixture
def flip_method():
    register(FlipRound)
    yield FlipRound
    unregister(FlipRound.name)


IDS = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))


def test_registry_lists_the_studys_methods_in_its_order():
    assert method_names() == ("rtn", "gptq", "awq", "smoothquant", "quarot", "duquant")
    assert [m.display_name for m in methods()] == ["RTN", "GPTQ", "AWQ", "SmoothQuant", "QuaRot", "DuQuant"]
    assert weight_only_methods() == ("rtn", "gptq", "awq") and rotation_methods() == ("quarot", "duquant")
    with pytest.raises(DllmqError, match="Unknown method 'nope'"):
        get_method("nope")
    with pytest.raises(ValueError, match="registered already"):
        register(type("Other", (FlipRound,), {"name": "gptq"}))
    with pytest.raises(ValueError, match="other than 'fp'"):
        register(type("Fp", (FlipRound,), {"name": "fp"}))


def test_toy_method_quantize_save_load(tmp_path, flip_method):
    model, tok = random_model("random-llada", seed=2)
    with torch.no_grad():
        fp = model(IDS)
    quantize(model, tok, QuantConfig("fliprtn", wbits=8, group_size=32, flip_seed=3), progress=False)
    flips = [m for m in model.modules() if isinstance(m, SignFlip)]
    assert len(flips) == 7 * model.config.n_layers and all((f.signs == -1).any() for f in flips)
    out = save_quantized(model, tok, tmp_path / "q")
    saved = json.loads((out / "config.json").read_text())["quantization_config"]["dllmq"]
    assert saved["method"] == "fliprtn" and saved["flip_seed"] == 3
    loaded, _, _ = dllmq.load_model(out)
    with torch.no_grad():
        q = model(IDS)
        assert torch.equal(q, loaded(IDS))       # the loader rebuilt the transforms through build_runtime
    assert (q - fp).norm() / fp.norm() < 0.05    # 8-bit weights behind an exact sign flip: close to FP


def test_toy_method_on_the_command_line_and_in_a_study(tmp_path, capsys, flip_method):
    out = tmp_path / "q"
    assert main(["quantize", "random-llada", "--method", "fliprtn", "--flip-seed", "5", "--wbits", "4",
                 "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["quantization_config"]["dllmq"]["flip_seed"] == 5
    capsys.readouterr()
    assert main(["quantize", "random-llada", "--method", "gptq", "--flip-seed", "5", "--out", str(tmp_path / "x")]) == 2
    assert "--flip-seed is a setting of fliprtn, not of gptq" in capsys.readouterr().err

    config = parse_study_config({"models": ["random-llada"], "tasks": ["mini_math"], "limit": 2,
                           "methods": ["fp", {"name": "fliprtn", "bits": ["W4A16-g128"], "flip_seed": 2}]})
    run_study(config, tmp_path / "study.db", tmp_path / "cache", progress=False)
    rows = {r["method"]: r for r in store.read_results(tmp_path / "study.db")}
    assert set(rows) == {"fp", "fliprtn"} and rows["fliprtn"]["n"] == 2 and 0 <= rows["fliprtn"]["value"] <= 1
    assert method_name("fliprtn") == "FlipRTN"


def test_study_config_checks_a_methods_own_settings(flip_method):
    base = {"models": ["random-llada"], "tasks": ["mini_math"]}
    with pytest.raises(DllmqError, match=r"methods\[0\].damp is not a setting of fliprtn"):
        parse_study_config({**base, "methods": [{"name": "fliprtn", "bits": ["W4A16-g128"], "damp": 0.1}]})
    config = parse_study_config({**base, "methods": [{"name": "gptq", "bits": ["W4A16-g128"], "act_order": True}]})
    assert config.methods[0].quant_config("W4A16-g128", config.calibration, 0).settings.act_order is True


@pytest.mark.parametrize("method", method_names())
def test_flat_form_round_trips_for_every_method(method):
    preset = "W4A4" if get_method(method).kind == "weight-activation" else "W4A16-g128"
    config = QuantConfig(method, **PRESETS[preset], nsamples=3, seqlen=16, seed=4)
    flat = config.to_dict()
    assert list(flat)[:len(SHARED) + 1] == ["method", *SHARED]
    assert set(flat) - {"method", *SHARED} == set(config.method_class.Settings.listed_names())   # optional ones only where set
    assert QuantConfig.from_dict(flat) == config and QuantConfig.from_dict(flat).to_dict() == flat


def test_unknown_method_setting_is_one_sentence():
    with pytest.raises(DllmqError, match="rtn does not take damp; it has no settings of its own"):
        QuantConfig("rtn", damp=0.1)
    with pytest.raises(DllmqError, match="awq does not take alpha; its settings are awq_grid"):
        QuantConfig("awq", alpha=0.5)
    with pytest.raises(DllmqError, match="GPTQ damping"):
        QuantConfig("gptq", damp=2.0)


def test_configs_saved_by_older_versions_still_read():
    """Before the registry every saved config listed every method's settings (with None for unused)."""
    legacy = {"method": "duquant", "wbits": 4, "group_size": -1, "sym": False, "abits": 4, "kv_bits": 16,
              "alpha": 0.6, "act_clip": 0.9, "act_sym": False, "weight_clip": 0.8, "kv_group_size": 128,
              "kv_clip": 0.95, "weight_method": "gptq", "rotation_block": 128, "rotation_steps": 256, "calib": "wiki",
              "nsamples": 128, "seqlen": 2048, "seed": 0, "damp": 0.01, "blocksize": 128, "act_order": False,
              "static_groups": True, "awq_grid": 20, "awq_duo_scaling": False, "awq_clip": True,
              "awq_max_shrink": 0.5, "awq_clip_tokens": 512}
    config = QuantConfig.from_dict(legacy)
    assert config == QuantConfig("duquant", wbits=4, abits=4)
    assert (config.weight.clip, config.act.clip, config.settings.alpha) == (0.8, 0.9, 0.6)
    gptq = QuantConfig.from_dict({**legacy, "method": "gptq", "abits": 16, "alpha": None, "act_clip": None,
                                  "act_sym": None, "weight_clip": None, "group_size": 128})
    # the legacy config names the study's damping and natural order (GPTQ's defaults before issue 15); the
    # grid search it lacks is read as what it ran (min/max grids), not as today's default
    assert gptq == QuantConfig("gptq", damp=0.01, act_order=False, grid_search=False)
    assert gptq.weight.group_size == 128
    assert QuantConfig.from_dict({**legacy, "method": "awq", "abits": 16}).settings.awq_search_tokens == 0
