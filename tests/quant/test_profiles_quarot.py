"""QuaRot's `paper` profile (docs/fidelity.md, item 8) against literal re-statements of QuaRot's
fake_quant code as the study ran it (QDLM's QuaRot fork: quant_utils.py WeightQuantizer / ActQuantizer /
sym_quant, gptq_utils.py GPTQ.fasterquant, rotation_utils.py rotate_ov_proj / QKRotationWrapper, main.py
online_partial_had), written here from reading that code. dllmq's own QuaRot must not agree with them,
so each test can fail."""
import copy
import math

import pytest
import torch

import dllmq
from dllmq.models.family import Role
from dllmq.quant import QuantConfig, quantize, save_quantized
from dllmq.quant.activations import ActQuantizer
from dllmq.quant.gptq_solver import gptq_quantize
from dllmq.quant.hadamard import CrossHeadHadamard
from dllmq.quant.methods.quarot import TokenKVQuantizer, rotate_model

PAPER = dict(profile="paper", family="llada", wbits=4, abits=4, group_size=-1)


def sylvester(n):
    """What fast_hadamard_transform multiplies by (power-of-two n), unnormalised."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h


# -- quant_utils.py -------------------------------------------------------------------------------------
def quarot_sym_quant_dequant(x, scale, maxq):
    """sym_quant + sym_dequant: codes clamp(round(x / scale), -(maxq + 1), maxq)."""
    return scale * torch.clamp(torch.round(x / scale), -(maxq + 1), maxq)


def quarot_weight_find_params(x, bits, grid=100, maxshrink=0.8, norm=2.4):
    """WeightQuantizer.configure(bits, perchannel=True, sym=True, mse=True).find_params(x)."""
    maxq = torch.tensor(2 ** (bits - 1) - 1)
    tmp = torch.zeros(x.shape[0])
    xmin = torch.minimum(x.min(1)[0], tmp)
    xmax = torch.maximum(x.max(1)[0], tmp)
    xmax = torch.maximum(torch.abs(xmin), xmax).clamp(min=1e-5)
    scale = xmax / maxq
    best = torch.full([x.shape[0]], float("inf"))
    for i in range(int(maxshrink * grid)):
        p = 1 - i / grid
        scale1 = p * xmax / maxq
        q = quarot_sym_quant_dequant(x, scale1.unsqueeze(1), maxq)
        err = (q - x).abs().pow(norm).sum(1)
        better = err < best
        if torch.any(better):
            best[better] = err[better]
            scale[better] = scale1[better]
    # dllmq codes against the float16 scale it stores (docs/fidelity.md item 11 (d))
    return scale.half().float().unsqueeze(1), maxq


def quarot_fasterquant(W, H, bits, percdamp=0.01, blocksize=128):
    """GPTQ.fasterquant with groupsize -1, actorder False: the per-channel grid found once on W."""
    W, H = W.clone().float(), H.clone()
    scale, maxq = quarot_weight_find_params(W, bits)
    columns = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    idx = torch.arange(columns)
    H[idx, idx] += percdamp * torch.mean(torch.diag(H))
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1 = W[:, i1:i2].clone()
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            q = quarot_sym_quant_dequant(w.unsqueeze(1), scale, maxq).flatten()
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return Q


def quarot_act_quant(x, bits, clip_ratio=1.0):
    """ActQuantizer.configure(bits, groupsize=-1, sym=True, clip_ratio).find_params(x), then forward."""
    maxq = torch.tensor(2 ** (bits - 1) - 1)
    init_shape = x.shape
    rx = x.reshape((-1, x.shape[-1]))
    tmp = torch.zeros(rx.shape[0])
    xmin = torch.minimum(rx.min(1)[0], tmp) * clip_ratio
    xmax = torch.maximum(rx.max(1)[0], tmp) * clip_ratio
    xmax = torch.maximum(torch.abs(xmin), xmax)
    zero_rows = xmax == 0
    scale = (xmax / maxq).unsqueeze(1).repeat(1, rx.shape[-1])
    scale[zero_rows] = 1
    return quarot_sym_quant_dequant(x, scale.reshape(init_shape), maxq)


def _layer(seed, rows=48, cols=256):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4096, cols, generator=g) * torch.linspace(0.2, 3, cols)
    W = torch.randn(rows, cols, generator=g) * 0.05
    W[:, 7] *= 8   # an outlier column, so a row's max decides its grid
    return W, 2 / X.shape[0] * X.T @ X


def test_paper_quarot_gptq_is_quarots_fasterquant_on_its_signed_grid():
    W, H = _layer(5)
    ref = quarot_fasterquant(W, H, 4)
    paper = QuantConfig("quarot", **PAPER)
    step = None
    for config, expect in ((paper, True), (QuantConfig("quarot", wbits=4, abits=4, group_size=-1,
                                                       **{k: v for k, v in paper.to_dict().items()
                                                          if k in ("damp", "act_order", "static_groups",
                                                                   "grid_points", "grid_min_shrink")}), False)):
        Q, scale, zero, g_idx = gptq_quantize(W, H, 4, -1, config.weight.sym, **config.settings.solver_options(),
                                              signed_grid=config.settings.signed_grid)
        assert g_idx is None and torch.all(zero == 8)
        same = torch.isclose(Q, ref, atol=1e-6, rtol=1e-5).float().mean().item()
        if expect:
            step = scale
            assert same > 0.999, same
            # the signed grid: a row's largest |w| sits on code +7 or -8 of its own scale, never outside
            assert torch.all(Q.abs() <= 8 * step + 1e-7)
        else:   # dllmq's symmetric grid (2 max / 15) with QuaRot's other settings: a different model
            assert same < 0.5, same


def test_signed_grid_activation_quantizer_is_quarots():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 17, 64, generator=g) * torch.linspace(0.1, 4, 64)
    x[0, 3] = 0   # an all-zero token: scale 1, stays zero
    for bits in (4, 8):
        ours = ActQuantizer(bits, symmetric=True, clip_ratio=1.0, signed_grid=True)(x)
        assert torch.allclose(ours, quarot_act_quant(x, bits), atol=1e-6, rtol=0)
        dllmq_grid = ActQuantizer(bits, symmetric=True, clip_ratio=1.0)(x)
        assert not torch.allclose(dllmq_grid, quarot_act_quant(x, bits), atol=1e-6, rtol=0)


def test_token_kv_quantizer_is_quarots_qk_wrapper_and_v_out_quantizer():
    """QKRotationWrapper.forward (k_groupsize -1): q and k through hadamard_transform (scale 1/sqrt(d)) in
    float32, K per token over hidden_size = heads * head_dim; V: v_proj's out_quantizer per token."""
    g = torch.Generator().manual_seed(2)
    b, heads, length, d = 2, 4, 9, 32
    q, k, v = (torch.randn(b, heads, length, d, generator=g) for _ in range(3))
    k[..., 5] += 6   # a K outlier channel, what the Hadamard spreads
    H = (sylvester(d) / math.sqrt(d)).float()
    q_ref, k_rot = q @ H, k @ H
    token_k = k_rot.transpose(1, 2).reshape(-1, heads * d)
    k_ref = quarot_act_quant(token_k, 8).reshape(b, length, heads, d).transpose(1, 2)
    v_rows = v.transpose(1, 2).reshape(b, length, heads * d)      # what v_proj outputs
    v_ref = quarot_act_quant(v_rows, 8).reshape(b, length, heads, d).transpose(1, 2)
    q2, k2, v2 = TokenKVQuantizer(8, clip_ratio=1.0, signed_grid=True)(q, k, v)
    assert torch.allclose(q2, q_ref, atol=1e-5) and torch.allclose(k2, k_ref, atol=1e-5)
    assert torch.allclose(v2, v_ref, atol=1e-6)
    # dllmq's K/V quantizer (per head, groups of 128, asymmetric) is a different computation
    from dllmq.quant.activations import KVQuantizer
    _, k3, _ = KVQuantizer(8, 128, 1.0, rotate_qk=True)(q, k, v)
    assert not torch.allclose(k3, k_ref, atol=1e-5)


def _attn_out_inputs(model):
    seen = []
    [o] = model.family.group(Role.ATTN_OUT).linears
    block = model.get_blocks()[0]
    linear = block.get_submodule(o)
    target = getattr(linear, "input_transform", None)
    hook = (target.register_forward_hook(lambda m, a, out: seen.append(out)) if target is not None else
            linear.register_forward_pre_hook(lambda m, a: seen.append(a[0])))
    ids = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids)
    hook.remove()
    return seen[0], logits


def test_cross_head_gives_the_attention_output_a_full_width_hadamard():
    """rotate_ov_proj (v_proj's outputs times a head_dim Hadamard, per head) and main.py's
    online_partial_had on attn_out (reshape to [-1, heads, head_dim], Hadamard over the heads): what
    attn_out's activation quantizer sees, re-stated on the unrotated model's head outputs."""
    model, _, _ = dllmq.load_model("random-llada", dtype=torch.float64)
    heads, d = model.config.n_heads, model.config.head_dim
    y, logits = _attn_out_inputs(model)
    rotated = copy.deepcopy(model)
    rotate_model(rotated, seed=0, cross_head=True)
    seen, logits2 = _attn_out_inputs(rotated)
    assert torch.allclose(logits, logits2, atol=1e-9)            # the same function
    Hd, Hn = sylvester(d) / math.sqrt(d), sylvester(heads) / math.sqrt(heads)
    per_head = (y.reshape(-1, heads, d) @ Hd)                        # v_proj's offline rotation
    ref = (per_head.transpose(1, 2) @ Hn).transpose(1, 2).reshape(y.shape)
    assert torch.allclose(seen, ref, atol=1e-9)
    # = one full-width Sylvester Hadamard (QuaRot's offline apply_exact_had_to_linear on attn_out)
    assert torch.allclose(seen, y @ (sylvester(heads * d) / math.sqrt(heads * d)), atol=1e-9)
    plain = copy.deepcopy(model)
    rotate_model(plain, seed=0)
    seen_plain, _ = _attn_out_inputs(plain)
    assert not torch.allclose(seen_plain, ref, atol=1e-3)           # dllmq's per-head rotation only


def test_paper_quarot_runs_saves_and_reloads(tmp_path):
    model, tok, _ = dllmq.load_model("random-llada", dtype="float32")
    quantize(model, tok, QuantConfig("quarot", **{**PAPER, "family": None}, nsamples=2, seqlen=16), progress=False)
    block = model.get_blocks()[0]
    assert isinstance(block.kv_hook, TokenKVQuantizer) and block.kv_hook.spec.bits == 8
    assert isinstance(block.attn_out.input_transform, CrossHeadHadamard)
    assert block.q_proj.act_quantizer.spec.signed_grid and block.q_proj.act_quantizer.spec.clip_ratio == 1.0
    out = save_quantized(model, tok, tmp_path / "q")
    again, _, _ = dllmq.load_model(str(out), dtype="float32")
    ids = torch.randint(0, 250, (1, 10))
    with torch.no_grad():
        assert torch.equal(model(ids), again(ids))
    saved = again.config.raw["quantization_config"]["dllmq"]
    assert saved["signed_grid"] and saved["cross_head"] and saved["kv_per_token"] and saved["kv_bits"] == 8
    # the default profile lists none of the three, and runs dllmq's quantizers
    ours = QuantConfig("quarot", wbits=4, abits=4, group_size=-1)
    assert not {"signed_grid", "cross_head", "kv_per_token"} & set(ours.to_dict())


def test_cross_head_needs_a_buildable_hadamard():
    with pytest.raises(dllmq.errors.DllmqError, match="No Hadamard matrix of order 7"):
        CrossHeadHadamard(7)
