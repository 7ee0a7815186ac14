"""The family description: every path it names resolves in the model it describes (built on the meta
device at the real sizes), and a layout it cannot express is refused when it is built."""
from dataclasses import replace

import pytest
import torch
from torch import nn

from dllmq.models.config import real_config
from dllmq.models.family import ROLE_ORDER, SCORE_LINEAR, Family, LinearGroup, Role
from dllmq.models.modeling import RMSNorm
from dllmq.models.registry import FAMILIES, build_model, parse_model_config

REAL = {"llada": "llada-8b", "dream": "dream-7b", "llama": "smollm2-135m"}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_path_resolves_on_the_real_architecture(name):
    with torch.device("meta"):
        model = build_model(parse_model_config(real_config(REAL[name])))
    family = model.family
    assert family is FAMILIES[name].FAMILY
    for path in family.model_paths():
        model.get_submodule(path)
    assert isinstance(model.get_embedding(), nn.Embedding) and isinstance(model.get_final_norm(), RMSNorm)
    assert len(model.get_blocks()) == model.config.n_layers
    block = model.get_blocks()[-1]
    for path in family.block_paths():
        block.get_submodule(path)
    assert isinstance(block.get_submodule(family.attn_norm), RMSNorm)
    assert isinstance(block.get_submodule(family.ffn_norm), RMSNorm)
    assert [g.role for g in family.groups] == list(ROLE_ORDER)
    for group in family.groups:
        for linear in group.linears:
            assert isinstance(block.get_submodule(linear), nn.Linear)
            assert family.group_of(linear) is group
        if not group.reads_norm:  # a linear source feeds exactly the group's input width (up -> down)
            assert isinstance(block.get_submodule(group.source), nn.Linear)
    c = model.config
    q, k, v = (block.get_submodule(n) for n in family.group(Role.ATTN_IN).linears)
    gate, up = (block.get_submodule(n) for n in family.group(Role.MLP_IN).linears)
    [down] = (block.get_submodule(n) for n in family.group(Role.MLP_OUT).linears)
    assert (q.out_features, k.out_features) == (c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim)
    assert v.out_features == k.out_features and gate.out_features == up.out_features == c.intermediate_size
    assert (down.in_features, down.out_features) == (c.intermediate_size, c.hidden_size)
    assert family.group(Role.ATTN_IN).clip_exempt == family.group(Role.ATTN_IN).linears[:2]   # q and k
    assert family.residual_writers == family.group(Role.ATTN_OUT).linears + family.group(Role.MLP_OUT).linears


def _llada_groups():
    return FAMILIES["llada"].FAMILY.groups


@pytest.mark.parametrize("change, problem", [
    (lambda g: (replace(g[0], linears=("qkv_proj",)),) + g[1:], "fused projection"),
    (lambda g: g[:3], "once each"),
    (lambda g: (g[1], g[0]) + g[2:], "execution order"),
    (lambda g: g[:1] + (replace(g[1], source="k_proj"),) + g[2:], "ATTN_OUT must be fed by v"),
    (lambda g: g[:3] + (replace(g[3], source="ff_proj"),), "MLP_OUT must be fed by up"),
    (lambda g: g[:2] + (replace(g[2], source="attn_norm"),) + g[3:], "their own norm"),
    (lambda g: (replace(g[0], clip_exempt=("ff_out",)),) + g[1:], "clip_exempt"),
    (lambda g: (replace(g[0], scored_on="everything"),) + g[1:], "scored_on"),
    (lambda g: g[:3] + (replace(g[3], linears=("up_proj",)),), "two groups"),
])
def test_layouts_the_description_cannot_express_are_refused(change, problem):
    with pytest.raises(ValueError, match=problem):
        replace(FAMILIES["llada"].FAMILY, groups=change(_llada_groups()))


def test_a_family_without_groups_is_allowed_for_models_dllmq_does_not_quantize():
    family = Family("toy", ("toy",), "tok", "blocks", "norm", "head", (), causal=False, shift_logits=False)
    assert family.block_linears == ()
    assert LinearGroup(Role.MLP_OUT, ("down",), "up").scored_on == SCORE_LINEAR
