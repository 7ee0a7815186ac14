"""The `paper` profile of SmoothQuant and DuQuant against small re-statements of the study's code (QDLM's
DuQuant fork: generate_act_scale_shift.py, main.py, quantize/duquant.py, quantize/utils.py,
models/transformation.py, quantize/quantizer.py, models/int_llada_layer.py), written here from reading it.
The re-statements follow the study's loops and names on purpose; the dllmq profile must NOT agree with
them, so each test can fail."""
import math
import random

import pytest
import torch
from torch import nn

from dllmq.data.text import calibration_windows
from dllmq.models.random_models import random_model
from dllmq.quant import QuantConfig
from dllmq.quant.activations import QKVQuantizer
from dllmq.quant.block import BlockContext
from dllmq.quant.config import OPTIONAL
from dllmq.quant.methods.smoothquant import SmoothQuant
from dllmq.quant.pipeline import capture_block_inputs
from dllmq.quant.smoothing import InputScale

W4A4 = dict(wbits=4, abits=4, group_size=-1)


def _ids(n=3, length=24, seed=0):
    return torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(seed))


# -- item 4: the calibration windows of generate_act_scale_shift.py / main.py ------------------------------
def study_get_wikitext2_windows(ids, nsamples, seed, seqlen):
    """datautils.get_wikitext2: random.seed(seed), then per sample one random.randint start."""
    random.seed(seed)
    out = []
    for _ in range(nsamples):
        i = random.randint(0, ids.shape[1] - seqlen - 1)
        out.append(ids[:, i:i + seqlen])
    return torch.cat(out)


@pytest.mark.parametrize("method", ["smoothquant", "duquant"])
def test_paper_calibration_is_the_studys_seed_2_windowing(method):
    paper = QuantConfig(method, profile="paper", family="llada", **W4A4)
    assert (paper.seed, paper.calibration.nsamples, paper.calibration.seqlen) == (2, 128, 2048)
    assert QuantConfig(method, **W4A4).seed == 0
    ids = torch.arange(5000)[None]
    ours = calibration_windows(ids[0], 16, 64, seed=paper.seed)
    assert torch.equal(ours, study_get_wikitext2_windows(ids, 16, 2, 64))
    assert not torch.equal(calibration_windows(ids[0], 16, 64, seed=0), ours)


# -- item 5: SmoothQuant's smoothing as quantize/duquant.py + smooth_and_let_inplace do it -----------------
STUDY_PAIRS = {   # duquant(): the keys are matched as fragments of a linear's name
    "llada": {"q_proj": "qkv", "attn_out": "out", "up_proj": "fc1", "ff_out": "down"},
    "dream": {"q_proj": "qkv", "o_proj": "out", "up_proj": "fc1", "down_proj": "down"},
}
CLIPMIN = 1e-5


def study_act_scales(model, ids):
    """get_act_scales: max |x| per input channel of every nn.Linear, over the calibration windows."""
    scales, hooks = {}, []
    for i, block in enumerate(model.get_blocks()):
        for name, m in block.named_modules():
            if isinstance(m, nn.Linear):
                def hook(m, x, y, key=(i, name)):
                    t = x[0].reshape(-1, x[0].shape[-1]).abs().amax(0).float()
                    scales[key] = torch.maximum(scales[key], t) if key in scales else t
                hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():
        for row in ids:
            model(row[None])
    for h in hooks:
        h.remove()
    return scales


def study_smooth(model, ids, alpha=0.5):
    """duquant() with --smooth: s per pair from the named linear's weight max, CLIPMIN floors, then
    smooth_and_let_inplace (truncate_number at 1e-2; under GQA the v -> out fold raises and the out
    projection divides its input online instead). Returns the online divisions {block: s_out}."""
    act_scales = study_act_scales(model, ids)
    fam = model.family.name
    online = {}
    for i, block in enumerate(model.get_blocks()):
        p = {}
        for name, module in block.named_modules():
            if isinstance(module, nn.Linear):
                for key in STUDY_PAIRS[fam]:
                    if key in name:
                        act = act_scales[(i, name)].to(module.weight.dtype).clamp(min=CLIPMIN)
                        weight = module.weight.abs().max(dim=0)[0].clamp(min=CLIPMIN)
                        p[STUDY_PAIRS[fam][key]] = (act.pow(alpha) / weight.pow(1 - alpha)).clamp(min=CLIPMIN)
        for k in p:   # truncate_number(module, 1e-2): |s| < 1e-2 becomes 1e-2 (s > 0 here)
            small = p[k].abs() < 1e-2
            p[k][small] = p[k][small].sign() * 1e-2
        names = ({"norm": "attn_norm", "qkv": ["q_proj", "k_proj", "v_proj"], "ffn": "ff_norm",
                  "fc1": ["up_proj", "ff_proj"], "up": "up_proj", "down": "ff_out", "v": "v_proj", "o": "attn_out"}
                 if fam == "llada" else
                 {"norm": "input_layernorm", "qkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                  "ffn": "post_attention_layernorm", "fc1": ["mlp.up_proj", "mlp.gate_proj"], "up": "mlp.up_proj",
                  "down": "mlp.down_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj"})
        get = block.get_submodule
        with torch.no_grad():
            for norm, fcs, s in ((names["norm"], names["qkv"], p["qkv"]), (names["ffn"], names["fc1"], p["fc1"])):
                get(norm).weight.div_(s)                        # smooth_ln_fcs_inplace (shifts are 0)
                for fc in fcs:
                    get(fc).weight.mul_(s.view(1, -1))
            for fc1, fc2, s in ((names["up"], names["down"], p["down"]), (names["v"], names["o"], p["out"])):
                v, o = get(fc1), get(fc2)
                if v.out_features != o.in_features:              # smooth_fc_fc_inplace fails -> smooth_fc_inplace
                    o.weight.mul_(s.view(1, -1))
                    online[i] = s
                    continue
                if v.bias is not None:
                    v.bias.div_(s.view(-1))
                v.weight.div_(s.view(-1, 1))
                o.weight.mul_(s.view(1, -1))
    return online


def _dllmq_smooth(model, ids, config):
    method = SmoothQuant(config)
    inputs, rope, mask = capture_block_inputs(model, ids, torch.device("cpu"), torch.device("cpu"))
    for i, block in enumerate(model.get_blocks()):
        ctx = BlockContext(block, i, inputs, rope, mask, torch.device("cpu"), config)
        method.smooth(ctx)
        inputs = ctx.run(keep_outputs=True)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", ["random-llada", "random-dream"])
def test_paper_smoothquant_smooths_as_the_study(name):
    ids = _ids()
    study, _ = random_model(name, seed=5, dtype=torch.float64)
    with torch.no_grad():   # a few large channels, so that floors and weight maxima matter
        for block in study.get_blocks():
            block.get_submodule(study.family.groups[0].source).weight[[3, 17]] *= 40.0
    ours, dllmq = (random_model(name, seed=5, dtype=torch.float64)[0] for _ in range(2))
    ours.load_state_dict(study.state_dict()), dllmq.load_state_dict(study.state_dict())
    with torch.no_grad():
        before = ours(ids)
    fam = study.family.name
    online = study_smooth(study, ids)
    _dllmq_smooth(ours, ids, QuantConfig("smoothquant", profile="paper", family=fam, **W4A4))
    _dllmq_smooth(dllmq, ids, QuantConfig("smoothquant", **W4A4))
    want, got, default = _state(study), _state(ours), _state(dllmq)
    for key, w in want.items():
        assert torch.allclose(got[key], w, rtol=1e-5, atol=1e-9), key   # dllmq takes maxima in float32
    assert any(not torch.allclose(default[k], w, rtol=1e-3) for k, w in want.items())   # the test can fail
    # Dream (GQA): v -> out divides online, and the full-precision function is unchanged
    assert bool(online) == (fam == "dream")
    for i, s in online.items():
        o = ours.get_blocks()[i].get_submodule("self_attn.o_proj")
        assert isinstance(o.input_transform, InputScale) and torch.allclose(o.input_transform.scale.double(), s, rtol=1e-5)
    with torch.no_grad():
        after = ours(ids)
    assert ((after - before).norm() / before.norm()).item() < 1e-10


def test_paper_smoothquant_floor_and_single_linear_maxima_are_the_studys():
    paper = QuantConfig("smoothquant", profile="paper", family="dream", **W4A4).settings
    assert (paper.weight_max, paper.scale_floor, paper.online_division, paper.smooth_pairs) == ("study", 0.01, True,
                                                                                               True)
    flat = QuantConfig("smoothquant", **W4A4).to_dict()
    assert not {"weight_max", "scale_floor", "online_division", "qkv_quant"} & set(flat)   # default keys unchanged
    again = QuantConfig.from_dict(QuantConfig("smoothquant", profile="paper", family="dream", **W4A4).to_dict())
    assert again.settings == paper and again.qkv_quant and again.seed == 2
    # explicit choices win over the profile's Q/K/V quantization; given both, one sentence
    assert not QuantConfig("smoothquant", profile="paper", family="dream", kv_bits=8, **W4A4).qkv_quant
    assert not QuantConfig("smoothquant", profile="paper", family="dream", wformat="mxfp4", aformat="mxfp4").qkv_quant
    from dllmq.errors import DllmqError
    with pytest.raises(DllmqError, match="leave --kv-bits out"):
        QuantConfig("smoothquant", qkv_quant=True, kv_bits=8, **W4A4)
    with pytest.raises(DllmqError, match="give --abits"):
        QuantConfig("rtn", qkv_quant=True)


# -- item 6: Q, K and V at the activation bits (QuantMatMul's quantizers in int_llada_layer.py) --------------
def study_get_hadamard(n):
    """utils.get_hadamard: Sylvester's construction, normalized at every level."""
    if n == 1:
        return torch.tensor([[1.]], dtype=torch.float64)
    h = study_get_hadamard(n // 2)
    return torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)], dim=0) / math.sqrt(2)


def study_per_token_quant(x, n_bits, lac=None, hadamard_block=None):
    """UniformAffineQuantizer.forward, dynamic_method per_token, asymmetric: init_duquant (rotate=None:
    x.reshape(-1, block) @ H when quant_method is duquant), then per_token_dynamic_calibration and fake_quant."""
    if hadamard_block is not None:
        shape = x.shape
        x = x.reshape(-1, hadamard_block).matmul(study_get_hadamard(hadamard_block).to(x)).view(shape)
    xmin, xmax = x.amin([-1], keepdim=True), x.amax([-1], keepdim=True)
    if lac:
        xmax, xmin = lac * xmax, lac * xmin
    scale = ((xmax - xmin) / (2 ** n_bits - 1)).clamp(min=1e-5, max=1e4)
    round_zero_point = (-xmin / scale).clamp(min=-1e4, max=1e4).round()
    x_int = torch.round(x / scale).add(round_zero_point).clamp(0, 2 ** n_bits - 1)
    return x_int.sub(round_zero_point).mul(scale)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("duquant", [False, True])
def test_qkv_quantizer_is_the_studys_matmul_quantizers(bits, duquant):
    """head_dim 128 = the study's block_size: the reshape(-1, 128) Hadamard acts per head and token."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 128, generator=g, dtype=torch.float64) * 3 + 0.5 for _ in range(3))
    q[..., 7] += 20.0
    lac = 0.9 if duquant else None
    block = 128 if duquant else None
    mine = QKVQuantizer(bits, qk_clip=lac or 1.0, hadamard_block=block)
    got = mine(q, k, v)
    want = (study_per_token_quant(q, bits, lac, block), study_per_token_quant(k, bits, lac, block),
            study_per_token_quant(v, bits))   # v_quant_params: no quant_method, no lac
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-9)
    # on values of one sign the study's grid (zero not widened into the range) is not dllmq's K/V grid
    from dllmq.quant.activations import KVQuantizer
    pos = v.abs() + 10
    mine_v = mine(q, k, pos)[2]
    assert torch.allclose(mine_v, study_per_token_quant(pos, bits), atol=1e-9)
    assert not torch.allclose(KVQuantizer(bits, group_size=128, clip_ratio=1.0)(q, k, pos)[2], mine_v, atol=1e-6)
    if duquant:   # Q and K come back rotated: Q K^T is that of the unrotated Q, K up to quantization
        assert not torch.allclose(got[0], study_per_token_quant(q, bits, lac), atol=1e-3)


@pytest.mark.parametrize("method", ["smoothquant", "duquant"])
def test_paper_profile_quantizes_qkv_and_dllmq_does_not(method):
    from dllmq.quant.pipeline import quantize_model
    model, _ = random_model("random-llada", seed=1)
    extra = {"rotation_steps": 2} if method == "duquant" else {}
    paper = QuantConfig(method, profile="paper", **W4A4, **extra).for_family("llada")
    quantize_model(model, paper.make_method(), _ids(2, 16), progress=False)
    hook = model.get_blocks()[0].kv_hook
    assert isinstance(hook, QKVQuantizer) and hook.bits == 4
    assert (hook.hadamard_block, hook.qk_clip) == ((128, 0.9) if method == "duquant" else (None, 1.0))
    plain, _ = random_model("random-llada", seed=1)
    quantize_model(plain, QuantConfig(method, **W4A4, **extra).make_method(), _ids(2, 16), progress=False)
    assert plain.get_blocks()[0].kv_hook is None
    assert OPTIONAL["qkv_quant"] is False


# -- item 7: DuQuant's rotation as get_rot.py, utils.get_rot and quantizer.py build it -----------------------
def study_exchange(i, j, tensor):
    indices_row = torch.arange(tensor.size(0))
    indices_row[i], indices_row[j] = indices_row[j].item(), indices_row[i].item()
    tensor = tensor[indices_row]
    indices_col = torch.arange(tensor.size(1))
    indices_col[i], indices_col[j] = indices_col[j].item(), indices_col[i].item()
    return tensor[:, indices_col]


def study_rot_pkl(n):
    """get_rot.py main(): the matrix stored in Rot.pkl for order n."""
    R = torch.eye(n, dtype=torch.float64)
    for i in range(n - 1):
        rot_i = torch.eye(n, dtype=torch.float64)
        cos = 1 / math.sqrt(i + 2)
        sin = math.sqrt(i + 1) / math.sqrt(i + 2)
        rot_i[i, i] = rot_i[i + 1, i + 1] = cos
        rot_i[i, i + 1] = -sin
        rot_i[i + 1, i] = sin
        R = torch.matmul(rot_i, R)
    return study_exchange(0, n - 1, R)


def study_get_rot(n, generator):
    """utils.get_rot (its torch.randn drawn from `generator` instead of the global RNG)."""
    R = study_rot_pkl(n)
    random_matrix = torch.randn(n - 1, n - 1, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(random_matrix)
    q = torch.cat([torch.zeros(n - 1, 1, dtype=torch.float64), q], dim=1)
    q = torch.cat([torch.zeros(1, n, dtype=torch.float64), q], dim=0)
    q[0, 0] = 1
    return torch.matmul(R, q)


def study_rotation(weight, block_size, max_rotation_step, generator):
    """UniformAffineQuantizer.rotation with score_func None, other None."""
    _weight = weight.clone()
    hidden_dim = weight.shape[-1]
    exchange_ids, peak_values = [], []
    weight = weight.reshape(-1, block_size)
    Rot = study_get_rot(block_size, generator)
    for j in range(max_rotation_step):
        r, c = divmod(weight.argmax().item(), weight.shape[-1])
        r2, c2 = divmod(weight.argmin().item(), weight.shape[-1])
        peak_values.append((weight[r, c] - weight[r2, c2]).item())
        exchange_id = r if weight[r, c].abs() > weight[r2, c2].abs() else r2
        exchange_ids.append(exchange_id)
        R = study_exchange(0, exchange_id % block_size, Rot.clone())
        weight = torch.matmul(weight, R)
    r, c = divmod(weight.argmax().item(), weight.shape[-1])
    r2, c2 = divmod(weight.argmin().item(), weight.shape[-1])
    peak_values.append((weight[r, c] - weight[r2, c2]).item())
    weight = _weight.clone()
    select_length = torch.argmin(torch.tensor(peak_values)).item()
    exchange_ids = exchange_ids[:select_length]
    R_ = torch.eye(block_size, dtype=torch.float64)
    for exchange_id in exchange_ids:
        R_ = torch.matmul(R_, study_exchange(0, exchange_id % block_size, Rot.clone()))
    return torch.matmul(weight.reshape(-1, block_size), R_).reshape(-1, hidden_dim), R_


def study_permutation_zigzag(weight, block_size):
    hidden_dim = weight.shape[-1]
    weight_max = weight.abs().max(dim=0).values
    pairs = [(i, weight_max[i].item()) for i in range(hidden_dim)]
    pairs.sort(key=lambda x: x[1], reverse=True)
    cur, up = 0, True
    lists = [[] for _ in range(hidden_dim // block_size)]
    for p in pairs:
        lists[cur].append(p)
        if up:
            cur += 1
            if cur == len(lists):
                cur, up = cur - 1, False
        else:
            cur -= 1
            if cur == -1:
                cur, up = cur + 1, True
    for lst in lists:
        lst.sort(key=lambda x: x[1], reverse=True)
    perm = torch.zeros(hidden_dim, dtype=torch.long)
    for i, lst in enumerate(lists):
        perm[i * block_size:(i + 1) * block_size] = torch.tensor([p[0] for p in lst])
    return weight[:, perm], perm


def study_online_duquant_cali(x, block_size, steps, generator):
    """permutation_times 1: rotation, zigzag, rotation. Returns the transformed x, [R1, R2] and the perm."""
    x, R1 = study_rotation(x, block_size, steps, generator)
    x, perm = study_permutation_zigzag(x, block_size)
    x, R2 = study_rotation(x, block_size, steps, generator)
    return x, (R1, R2), perm


def study_init_duquant_weight(w, Rs, perm, block_size):
    """init_duquant on a weight [out, in] with the act quantizer's R and permutation_list copied."""
    shape = w.shape
    w = w.reshape(-1, block_size).matmul(Rs[0]).reshape(shape)[:, perm]
    return w.reshape(-1, block_size).matmul(Rs[1]).reshape(shape)


def test_givens_base_and_random_factor_are_get_rot():
    from dllmq.quant.duquant_rotation import givens_cascade, random_base
    for n in (2, 8, 128):
        assert torch.allclose(givens_cascade(n), study_rot_pkl(n), atol=1e-12)
        a, b = random_base(n, torch.Generator().manual_seed(7)), study_get_rot(n, torch.Generator().manual_seed(7))
        assert torch.allclose(a, b, atol=1e-12) and torch.allclose(a @ a.T, torch.eye(n, dtype=torch.float64),
                                                                    atol=1e-10)


@pytest.mark.parametrize("steps", [0, 3, 40])
def test_paper_duquant_rotation_is_the_studys(steps):
    from dllmq.quant.methods.duquant import DuQuantTransform
    g = torch.Generator().manual_seed(1)
    x = torch.randn(48, 384, generator=g, dtype=torch.float64)
    x[:, [5, 200, 301]] *= 30.0
    x[7, 90] = -80.0
    w = torch.randn(20, 384, generator=g, dtype=torch.float64)
    want, Rs, perm = study_online_duquant_cali(x.clone(), 128, steps, torch.Generator().manual_seed(3))
    t = DuQuantTransform.fit_study(x, torch.ones(384), 128, steps, torch.Generator().manual_seed(3))
    assert torch.equal(t.perm, perm)
    for i in range(3):   # one rotation shared by every block of 128 channels, each side
        assert torch.allclose(getattr(t, f"r1_{i}").double(), Rs[0], atol=1e-6)
        assert torch.allclose(getattr(t, f"r2_{i}").double(), Rs[1], atol=1e-6)
    assert torch.allclose(t.double()(x), want, rtol=1e-5, atol=1e-5)
    assert torch.allclose(t.double().orthogonal(w), study_init_duquant_weight(w, Rs, perm, 128), atol=1e-5)
    if steps:   # dllmq's greedy rotation is another transform
        greedy = DuQuantTransform.fit(x.float(), torch.ones(384), 128, steps)
        assert not torch.allclose(greedy.double()(x), want, atol=1e-2)


def study_duquant_flow(model, ids, block_size, steps, act_bits, lac, w_spec):
    """duquant() with --smooth and quant_method duquant, layer by layer: smoothing from the full-precision
    statistics, rotate_inps = the mean of the block-0 inputs, then per layer its forward on rotate_inps with
    weights and activations quantized, each act quantizer fitting its rotation (online_duquant_cali) on the
    input it receives (k, v copy q's; up copies gate's); the layer's output is the next layer's rotate_inps.
    The activation and weight grids here are dllmq's study grid (ActQuantizer, rtn_weight with study_grid,
    checked against the study's quantizer in test_profiles_study_grid.py): what is under test is the flow.
    Returns per layer, per linear that fits, (R1, R2, perm)."""
    from dllmq.quant.activations import ActQuantizer
    from dllmq.quant.rounding import rtn_weight
    generator = torch.Generator().manual_seed(2)
    online = study_smooth(model, ids)
    inputs, rope, mask = capture_block_inputs(model, ids, torch.device("cpu"), torch.device("cpu"))
    rotate_inps = torch.cat(inputs).mean(dim=0, keepdim=True)
    act_q = ActQuantizer(act_bits, clip_ratio=lac, study_grid=True)
    fitted = []

    def quant_linear(x, lin, params):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).double()
        if params is None:
            xt, Rs, perm = study_online_duquant_cali(x2, block_size, steps, generator)
            params = (Rs, perm)
        else:
            Rs, perm = params
            xt = study_init_duquant_weight(x2, Rs, perm, block_size)
        w = rtn_weight(study_init_duquant_weight(lin.weight.double(), *params, block_size), w_spec).weight
        y = act_q(xt.to(x.dtype)) @ w.to(x.dtype).T
        return (y + lin.bias if lin.bias is not None else y).reshape(*shape[:-1], -1), params

    fam = model.family
    for i, block in enumerate(model.get_blocks()):
        get = block.get_submodule
        qkv, out = fam.group(fam.groups[0].role).linears, fam.groups[1].linears[0]
        gate_up, down = fam.groups[2].linears, fam.groups[3].linears[0]
        block.kv_hook = QKVQuantizer(act_bits, lac, block_size)
        fits = {}
        with torch.no_grad():
            x = rotate_inps
            h = get(fam.groups[0].source)(x)
            q, params = quant_linear(h, get(qkv[0]), None)
            fits[qkv[0]] = params
            k, _ = quant_linear(h, get(qkv[1]), params)
            v, _ = quant_linear(h, get(qkv[2]), params)
            a = block._attend(q, k, v, rope, mask)
            if i in online:
                a = a / online[i]                      # smooth_fc_inplace: x /= smooth_scales, then init_duquant
            o, fits[out] = quant_linear(a, get(out), None)
            x = x + o
            h = get(fam.groups[2].source)(x)
            gate, params = quant_linear(h, get(gate_up[0]), None)
            fits[gate_up[0]] = params
            up, _ = quant_linear(h, get(gate_up[1]), params)
            d, fits[down] = quant_linear(torch.nn.functional.silu(gate) * up, get(down), None)
            rotate_inps = x + d
        fitted.append(fits)
    return fitted


@pytest.mark.parametrize("name,block", [("random-llada", 128), ("random-dream", 8)])
def test_paper_duquant_fits_on_the_mean_window_through_quantized_layers(name, block):
    from dllmq.quant.pipeline import quantize_model
    ids, steps = _ids(4, 24), 6
    study, _ = random_model(name, seed=5, dtype=torch.float64)
    ours, _ = random_model(name, seed=5, dtype=torch.float64)
    config = QuantConfig("duquant", profile="paper", rotation_block=block, rotation_steps=steps,
                         **W4A4).for_family(study.family.name)
    want = study_duquant_flow(study, ids, block, steps, 4, 0.9, config.make_method().weight_spec())
    quantize_model(ours, config.make_method(), ids, progress=False)
    for i, fits in enumerate(want):
        for lin, ((R1, R2), perm) in fits.items():
            t = ours.get_blocks()[i].get_submodule(lin).input_transform
            assert torch.equal(t.perm, perm), (i, lin)
            assert torch.allclose(t.r1_0.double(), R1, atol=1e-6) and torch.allclose(t.r2_0.double(), R2, atol=1e-6)
    if name == "random-dream":   # GQA: the out projection divides by s inside its transform
        assert not torch.allclose(ours.get_blocks()[0].self_attn.o_proj.input_transform.inv_smooth, torch.ones(112))


@pytest.mark.parametrize("method", ["smoothquant", "duquant"])
def test_paper_models_save_and_reload_with_their_online_pieces(tmp_path, method):
    """random-dream (GQA): SmoothQuant's online division and DuQuant's shared rotations, and the Q/K/V
    quantizer, come back from the checkpoint; the reloaded model computes the same logits."""
    import dllmq
    from dllmq.quant import quantize, save_quantized
    model, tok, _ = dllmq.load_model("random-dream", dtype="float32")
    extra = {"rotation_block": 8, "rotation_steps": 4} if method == "duquant" else {}
    quantize(model, tok, QuantConfig(method, profile="paper", nsamples=2, seqlen=16, **W4A4, **extra), progress=False)
    out = save_quantized(model, tok, tmp_path / "q")
    again, _, _ = dllmq.load_model(str(out), dtype="float32")
    from dllmq.quant.methods.duquant import DuQuantTransform
    o = again.get_blocks()[0].self_attn.o_proj.input_transform
    assert isinstance(o, InputScale if method == "smoothquant" else DuQuantTransform)
    divides = o.scale if method == "smoothquant" else 1 / o.inv_smooth
    assert not torch.allclose(divides, torch.ones_like(divides))   # v -> out under GQA: divided online
    assert isinstance(again.get_blocks()[0].kv_hook, QKVQuantizer)
    qc = again.config.raw["quantization_config"]["dllmq"]
    assert qc["qkv_quant"] and qc["seed"] == 2 and qc["profile"] == "paper"
    ids = torch.randint(0, 250, (2, 12))
    with torch.no_grad():
        assert torch.allclose(model(ids), again(ids), atol=1e-5)


@pytest.mark.parametrize("seed_flag, seed", [([], 2), (["--seed", "5"], 5)])
def test_cli_paper_smoothquant_takes_the_studys_seed_unless_given(tmp_path, capsys, seed_flag, seed):
    import json
    from dllmq.cli import main
    out = tmp_path / "q"
    code = main(["quantize", "random-dream", "--method", "smoothquant", "--preset", "W4A4", "--profile", "paper",
                 "--nsamples", "2", "--seqlen", "16", *seed_flag, "--out", str(out)])
    _, err = capsys.readouterr()
    assert code == 0, err
    qc = json.loads((out / "config.json").read_text())["quantization_config"]["dllmq"]
    assert qc["seed"] == seed and qc["qkv_quant"] and qc["weight_max"] == "study" and qc["online_division"]
    assert f"seed={seed}" in err
