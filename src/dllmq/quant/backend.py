"""Which arithmetic a quantized model runs: fake quantization (the reference) or real integer kernels.

``set_backend(model, "kernel")`` swaps every QuantLinear for the kernel layer that fits it and
returns how many layers run each kernel; ``set_backend(model, "fake")`` swaps them back, and the
QuantLinear it rebuilds is buffer-for-buffer the one it replaced (the kernel layers keep the
integer codes, scales and zeros, never a float copy of the weight).

Kernels (see kernels.py for the arithmetic):

=============  ==========================================================  ============================
kernel         runs                                                        for
=============  ==========================================================  ============================
int8_dynamic   per-token int8 activations x int8 weights, ``torch._int_mm``  per-channel weights <= 8 bit
               (4-bit activations and weights are int8 values too)          with an activation quantizer
int4_weight    packed int4 weights: the CPU int4 op (few rows, 16-bit) or   weight-only <= 4 bit, groups
               a per-call dequantization + dense GEMM (always on CUDA)      of 32k (act-order permuted)
int8_weight    int8 weights x float activations, ``_weight_int8pack_mm``    weight-only 5-8 bit,
               (CPU) or a per-call dequantization + dense GEMM (CUDA)       per-channel
fake           the QuantLinear itself (quantize-dequantize)                 everything else, with reason
=============  ==========================================================  ============================

Kernel layers are for inference: they run under no_grad (no gradients flow through them).
Layers whose input transform is an online Hadamard or a DuQuant rotation keep it (the fast
Hadamard, not a dense matrix); K/V quantizers (``kv_hook``) stay fake quantization.
A kernel-backed layer's ``state_dict`` is the QuantLinear one, so a model can be saved either way.

``dllmq.load_model(path, backend="kernel")`` does not load first and convert after: ``kernel_stream``
has the loader hand over each quantized linear as soon as its tensors are read (with plain file reads,
not through the checkpoint's memory map), and ``convert_layer`` — the same function set_backend uses —
turns it into its kernel layer before the next is read. Peak memory: the low-bit model plus one layer.
"""
from __future__ import annotations

import ctypes
import logging
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dllmq.errors import DllmqError
from dllmq.models.loading import Stream
from dllmq.models.registry import build_model, parse_model_config
from dllmq.quant import kernels as K
from dllmq.quant.activations import ActQuantizer
from dllmq.quant.dequant_linear import reuse_for_same_input
from dllmq.quant.format import prepare_quantized
from dllmq.quant.modules import replace_module
from dllmq.quant.packing import pack_codes, unpack_codes
from dllmq.quant.formats import FP8
from dllmq.quant.qlinear import QuantLinear
from dllmq.quant.qlinear_fp import FPQuantLinear

log = logging.getLogger(__name__)

BACKENDS = ("kernel", "fake")
FAKE = "fake"


# --- the layers ---------------------------------------------------------------------------------

class KernelLinear(nn.Module):
    """Shared parts of the kernel layers: shapes, the optional input transform and activation
    quantizer carried over from the QuantLinear, the bias, and the way back to a QuantLinear."""

    kernel = "?"

    def __init__(self, source: QuantLinear) -> None:
        super().__init__()
        self.in_features, self.out_features = source.in_features, source.out_features
        self.bits, self.group_size = source.bits, source.group_size
        self.scale_dtype = source.scales.dtype
        self.input_transform = source.input_transform
        self.act_quantizer = source.act_quantizer
        self.register_buffer("bias", None if source.bias is None else source.bias.detach().clone(),
                             persistent=False)

    # The way back, exact: subclasses give codes [K, N], zeros [G, N], scales [G, N], g_idx [K].
    def _reference_parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def to_quantlinear(self) -> QuantLinear:
        """The QuantLinear this layer was built from, buffer for buffer."""
        codes, zeros, scales, g_idx = self._reference_parts()
        device = codes.device
        q = QuantLinear(self.in_features, self.out_features, self.bits, self.group_size,
                        bias=self.bias is not None, scale_dtype=self.scale_dtype,
                        bias_dtype=None if self.bias is None else self.bias.dtype, device=device)
        q.qweight.copy_(pack_codes(codes, self.bits, dim=0))
        q.qzeros.copy_(pack_codes(zeros, self.bits, dim=1))
        q.scales.copy_(scales)
        q.g_idx.copy_(g_idx)
        if self.bias is not None:
            q.bias.copy_(self.bias)
        q.input_transform, q.act_quantizer = self.input_transform, self.act_quantizer
        return q

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        # Saved as the QuantLinear it stands for, so save_quantized works on a kernel-backed model.
        for name, tensor in self.to_quantlinear()._buffers.items():
            if tensor is not None:
                destination[prefix + name] = tensor

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        raise DllmqError("Load a quantized checkpoint with the fake backend first, then call set_backend.")

    def storage_bytes(self) -> int:
        """Bytes of this layer's weight representation (bias excluded)."""
        return sum(b.numel() * b.element_size() for n, b in self._buffers.items() if b is not None and n != "bias")

    def _flat_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_transform is not None:
            x = self.input_transform(x)
        return x.reshape(-1, x.shape[-1])

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, kernel={self.kernel}")


def _codes_and_zeros(q: QuantLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """Unsigned codes [K, N] and zero points [G, N] of a QuantLinear (uint8)."""
    codes = unpack_codes(q.qweight, q.bits, q.in_features, dim=0)
    zeros = unpack_codes(q.qzeros, q.bits, q.out_features, dim=1)
    return codes, zeros


class Int8DynamicLinear(KernelLinear):
    """Per-channel int8 weights x per-token int8 activations through ``torch._int_mm``."""

    kernel = "int8_dynamic"

    def __init__(self, source: QuantLinear) -> None:
        super().__init__(source)
        codes, zeros = _codes_and_zeros(source)
        weight, w_zero, w_sum = K.int8_weight_parts(codes.t(), zeros[0], source.bits)
        self.register_buffer("weight", weight.contiguous(), persistent=False)   # int8 [N, K]
        self.register_buffer("w_zero", w_zero, persistent=False)
        self.register_buffer("w_sum", w_sum, persistent=False)
        self.register_buffer("zeros", zeros.clone(), persistent=False)          # uint8 [1, N]
        self.register_buffer("scales", source.scales.detach().clone(), persistent=False)
        quantizer: ActQuantizer = source.act_quantizer
        self.act_bits, self.act_sym = quantizer.spec.bits, quantizer.spec.symmetric
        self.act_clip, self.act_signed = quantizer.spec.clip_ratio, quantizer.spec.signed_grid

    def _reference_parts(self):
        # int8_weight_parts shifted by the zero point below 8 bits and by 128 at 8 bits
        shift = self.zeros[0].to(torch.int32)[:, None] if self.bits <= 7 else 128
        codes = self.weight.to(torch.int32) + shift
        g_idx = torch.zeros(self.in_features, dtype=torch.int32, device=self.weight.device)
        return codes.t().to(torch.uint8), self.zeros, self.scales, g_idx

    def _apply(self, fn, recurse=True):
        self._w_scale = None   # the float32 copy of the scales follows the buffers' device
        return super()._apply(fn, recurse)

    _w_scale: torch.Tensor | None = None

    def _rows(self, h: torch.Tensor, reuse: bool) -> K.Int8Rows:
        quantizer = self.act_quantizer
        static = (quantizer.static_scale, quantizer.static_zero) if quantizer.static else None
        return K.quantize_rows(h, self.act_bits, self.act_sym, self.act_clip, static, reuse=reuse,
                               row_sum=self.w_zero is not None, signed_grid=self.act_signed)

    @torch.no_grad()  # integer kernels are inference-only
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        h = self._flat_input(x)
        if self._w_scale is None:
            self._w_scale = self.scales[0].float()
        # q/k/v (and gate/up) read one tensor with equal dynamic quantizers: quantize it once for all of them
        share = self.act_quantizer.share_key   # None for a static grid: that is the layer's own
        key = None if share is None or self.input_transform is not None or not share_rows(h.device) else \
            ("int8_rows", share)
        # codes in the CPU's scratch buffer only when not shared: the next quantization overwrites them
        rows = reuse_for_same_input(x, key, lambda: self._rows(h, reuse=key is None and h.device.type == "cpu"))
        y = K.int8_linear(rows, self.weight, self._w_scale, self.w_zero, self.w_sum, self.bias, dtype)
        return y.reshape(*shape[:-1], self.out_features)


def share_rows(device: torch.device) -> bool:
    """Whether kernel layers share one input's quantized rows. Off the CPU, where allocations are cheap and
    each small op costs a kernel launch; on the CPU the codes live in a scratch buffer that the next
    quantization overwrites, and the sharing bought nothing measurable there."""
    return device.type != "cpu"


class Int4WeightLinear(KernelLinear):
    """Weights of at most 4 bits packed for the int4 op, float activations."""

    kernel = "int4_weight"

    def __init__(self, source: QuantLinear, group: int, perm: torch.Tensor | None, layout: K.Int4Layout) -> None:
        super().__init__(source)
        self.layout, self.group = layout, group
        n, k = source.out_features, source.in_features
        self.n_pad = K.round_up(n, layout.block)
        codes, zeros = _codes_and_zeros(source)
        if perm is not None:   # act-order: input channels sorted by group, the input follows at run time
            codes = codes.index_select(0, perm)
        eff = source.effective_group_size
        source_group = (torch.arange(k // group, device=codes.device) * group) // eff
        pad = self.n_pad - n
        codes_nk = torch.nn.functional.pad(codes.t(), (0, 0, 0, pad))   # uint8: widened a chunk at a time
        self.register_buffer("packed", K.pack_int4(codes_nk.cpu(), layout.block).to(codes.device),
                             persistent=False)
        self.register_buffer("zeros", torch.nn.functional.pad(zeros.index_select(0, source_group), (0, pad)),
                             persistent=False)                                  # uint8 [K/group, N_pad]
        self.register_buffer("scales", torch.nn.functional.pad(
            source.scales.detach().index_select(0, source_group), (0, pad)), persistent=False)
        self.register_buffer("perm", perm, persistent=False)
        self.register_buffer("g_idx", None if perm is None else source.g_idx.detach().clone(), persistent=False)
        self._sz: dict[torch.dtype, torch.Tensor] = {}
        self.last_path = ""

    def _apply(self, fn, recurse=True):
        self._sz = {}  # the op's scale/zero tensor follows the buffers' device and dtype
        return super()._apply(fn, recurse)

    def _op_scales(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self._sz:
            self._sz[dtype] = K.int4_scales_zeros(self.scales, self.zeros, dtype)
        return self._sz[dtype]

    def _reference_parts(self):
        n, k = self.out_features, self.in_features
        codes = K.unpack_int4(self.packed.cpu(), self.n_pad, k, self.layout)[:, :n].to(self.packed.device)
        if self.perm is not None:
            codes = torch.empty_like(codes).index_copy_(0, self.perm, codes)
        eff = k if self.group_size == -1 else self.group_size
        n_groups = -(-k // eff)
        rows = torch.arange(n_groups, device=codes.device) * (eff // self.group)
        zeros, scales = self.zeros.index_select(0, rows)[:, :n], self.scales.index_select(0, rows)[:, :n]
        g_idx = self.g_idx if self.g_idx is not None else \
            (torch.arange(k, device=codes.device) // eff).to(torch.int32)
        return codes, zeros, scales, g_idx

    @torch.no_grad()  # integer kernels are inference-only
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        h = self._flat_input(x)   # weight-only: choose_kernel gives layers with an act_quantizer int8_dynamic
        if self.perm is not None:
            h = h.index_select(1, self.perm)
        # the CPU op's scale/zero table; off the CPU the packed bytes are dequantized (K.int4_linear)
        cpu_op = h.device.type == "cpu" and h.dtype in (torch.bfloat16, torch.float16)
        sz = self._op_scales(h.dtype) if cpu_op else None
        y, self.last_path = K.int4_linear(h, self.packed, self.out_features, self.layout, self.scales,
                                          self.zeros, sz, self.group, self.bias)
        return y.reshape(*shape[:-1], self.out_features)


class Int8WeightLinear(KernelLinear):
    """5-8 bit per-channel weights as int8 times float activations (``_weight_int8pack_mm``)."""

    kernel = "int8_weight"

    def __init__(self, source: QuantLinear) -> None:
        super().__init__(source)
        codes, zeros = _codes_and_zeros(source)
        weight, w_zero, _ = K.int8_weight_parts(codes.t(), zeros[0], source.bits)
        self.register_buffer("weight", weight.contiguous(), persistent=False)
        self.register_buffer("w_zero", w_zero, persistent=False)
        self.register_buffer("zeros", zeros.clone(), persistent=False)
        self.register_buffer("scales", source.scales.detach().clone(), persistent=False)

    _reference_parts = Int8DynamicLinear._reference_parts

    @torch.no_grad()  # integer kernels are inference-only
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        h = self._flat_input(x)
        y = K.int8_weight_linear(h.contiguous(), self.weight, self.scales[0].float(), self.w_zero, self.bias)
        return y.reshape(*shape[:-1], self.out_features)


class FP8ScaledMMLinear(KernelLinear):
    """FP8 E4M3 weights (per-channel scales) x per-token FP8 E4M3 activations through ``torch._scaled_mm``
    with row-wise scales, on a CUDA GPU that has it (compute capability 9.0+). Checked against fake quantization
    by a GPU-only test and by benchmarks/gpu_check.py (H200, 2026-11-30: 4.7e-3 relative in bf16)."""

    kernel = "fp8_scaled_mm"

    def __init__(self, source: FPQuantLinear) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = source.in_features, source.out_features
        self.bits, self.group_size, self.format = source.bits, source.group_size, source.format
        self.scale_dtype = torch.float32
        self.input_transform, self.act_quantizer = source.input_transform, source.act_quantizer
        self.register_buffer("bias", None if source.bias is None else source.bias.detach().clone(), persistent=False)
        self.register_buffer("weight", source.codes.detach().clone().view(torch.float8_e4m3fn), persistent=False)
        # float32 [N, 1] (torch._scaled_mm's row-wise scales), even if the model was cast to bf16
        self.register_buffer("scales", source.scales.detach().float().clone(), persistent=False)

    def to_quantlinear(self) -> FPQuantLinear:
        q = FPQuantLinear(self.in_features, self.out_features, self.format, bias=self.bias is not None,
                          bias_dtype=None if self.bias is None else self.bias.dtype, device=self.weight.device)
        q.codes.copy_(self.weight.view(torch.uint8))
        q.scales.copy_(self.scales)
        if self.bias is not None:
            q.bias.copy_(self.bias)
        q.input_transform, q.act_quantizer = self.input_transform, self.act_quantizer
        return q

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        h = self._flat_input(x)
        a, a_scale = K.quantize_fp8_rows(h)                      # the fake quantizer's codes, [M, 1] amax / 448
        # scales [N, 1] viewed as the [1, N] row-wise scale_b (contiguous, no copy)
        y = torch._scaled_mm(a, self.weight.t(), scale_a=a_scale, scale_b=self.scales.view(1, -1).float(),
                             out_dtype=torch.bfloat16 if dtype == torch.float32 else dtype)
        y = y.to(dtype)
        if self.bias is not None:
            y = y + self.bias.to(dtype)
        return y.reshape(*shape[:-1], self.out_features)


def fp8_kernel_available(device: torch.device | str | None = None) -> bool:
    """Whether ``torch._scaled_mm`` with row-wise FP8 scales can run here (a CUDA GPU of compute capability 9.0+)."""
    if not (torch.cuda.is_available() and hasattr(torch, "_scaled_mm") and hasattr(torch, "float8_e4m3fn")):
        return False
    return torch.cuda.get_device_capability(torch.device(device or "cuda")) >= (9, 0)


FP_KERNEL_REFUSAL = ("the FP8 kernel (torch._scaled_mm) needs a CUDA GPU of compute capability 9.0+ (H100 / H200) "
                     "and there is none here")


def choose_fp_kernel(q: FPQuantLinear, device: str | None = None) -> Choice:
    """The kernel for a floating-point layer: FP8 weights with FP8 activations on a capable GPU, else fake."""
    device = device or q.codes.device.type
    if q.format != FP8:
        return Choice(FAKE, f"no {q.format} kernel in dllmq (its matmuls need Blackwell-class GPUs)")
    act = q.act_quantizer
    if not (isinstance(act, ActQuantizer) and act.format == FP8):
        return Choice(FAKE, "FP8 weights without FP8 activations have no kernel (torch._scaled_mm takes two FP8 "
                            "operands)")
    if device != "cuda" or not fp8_kernel_available():
        return Choice(FAKE, FP_KERNEL_REFUSAL)
    if q.in_features % 16 or q.out_features % 16:
        return Choice(FAKE, "torch._scaled_mm needs K and N multiples of 16")
    return Choice(FP8ScaledMMLinear.kernel)


KERNEL_LAYERS: dict[str, type[KernelLinear]] = {
    cls.kernel: cls for cls in (Int8DynamicLinear, Int4WeightLinear, Int8WeightLinear, FP8ScaledMMLinear)}


# --- choosing ---------------------------------------------------------------------------------

@dataclass
class Choice:
    """The kernel one QuantLinear gets, or "fake" and why."""

    kernel: str
    reason: str = ""
    group: int = 0
    perm: torch.Tensor | None = None


def _act_order_perm(q: QuantLinear) -> tuple[bool, torch.Tensor | None]:
    """(ok, perm): perm sorts the input channels so every group is one contiguous run of the
    group size (None when they already are); ok is False when no such order exists."""
    eff = q.effective_group_size
    if q.g_idx.is_meta:
        return True, None
    natural = torch.arange(q.in_features, device=q.g_idx.device) // eff
    g_idx = q.g_idx.long()
    if torch.equal(g_idx, natural):
        return True, None
    perm = torch.argsort(g_idx, stable=True)
    return torch.equal(g_idx.index_select(0, perm), natural), perm


def choose_kernel(q: QuantLinear, device: str | None = None) -> Choice:
    """The fastest exact kernel for a QuantLinear on its device (or on ``device``, for planning
    from a meta model: act-order is then assumed to have equal-size groups), or why there is none."""
    if isinstance(q, FPQuantLinear):
        return choose_fp_kernel(q, device)
    device = device or q.qweight.device.type
    n, k = q.out_features, q.in_features
    if device not in ("cpu", "cuda"):
        return Choice(FAKE, f"no integer kernels on {device}")
    if q.act_quantizer is not None:
        if not isinstance(q.act_quantizer, ActQuantizer):
            return Choice(FAKE, f"unknown activation quantizer {type(q.act_quantizer).__name__}")
        if q.act_quantizer.fmt.is_float:
            return Choice(FAKE, f"integer weights with {q.act_quantizer.format} activations have no kernel")
        if q.act_quantizer.spec.study_grid:   # its zero points may lie outside the codes' range (int8 shifts)
            return Choice(FAKE, "the study's activation grid (--profile paper) has no int8 kernel")
        if q.n_groups != 1:
            return Choice(FAKE, "grouped weights with quantized activations (int8 GEMM needs per-channel scales)")
        if not K.int32_safe(k):
            return Choice(FAKE, f"int32 accumulation could overflow for K = {k}")
        if device == "cuda" and (k % 8 or n % 8):
            return Choice(FAKE, "CUDA int8 GEMM needs K and N multiples of 8")
        return Choice("int8_dynamic")
    if q.bits <= 4:
        layout = K.int4_layout()
        if layout is None:
            return Choice(FAKE, "this PyTorch build lacks a usable int4 packing op")
        group = K.kernel_group(q.effective_group_size, k)
        if group is None:
            return Choice(FAKE, f"group size {q.effective_group_size} / K = {k} not a multiple of 32")
        ok, perm = _act_order_perm(q)
        if not ok:
            return Choice(FAKE, "act-order groups of unequal size")
        return Choice("int4_weight", group=group, perm=perm)
    if q.n_groups != 1:
        return Choice(FAKE, f"grouped {q.bits}-bit weights (the int8 weight-only op is per-channel)")
    return Choice("int8_weight")


def to_kernel(q: QuantLinear | FPQuantLinear, choice: Choice | None = None) -> KernelLinear | None:
    """The kernel layer for ``q`` (None when it falls back to fake quantization)."""
    choice = choice or choose_kernel(q)
    if choice.kernel == FAKE:
        return None
    if choice.kernel == "int4_weight":
        layout = K.int4_layout()
        assert layout is not None
        return Int4WeightLinear(q, choice.group, choice.perm, layout)
    return KERNEL_LAYERS[choice.kernel](q)


# --- whole models -----------------------------------------------------------------------------

@dataclass
class BackendReport:
    """What each quantized layer runs after set_backend: kernel per layer, fallback reasons."""

    backend: str
    layers: dict[str, str] = field(default_factory=dict)     # module path -> kernel
    reasons: dict[str, str] = field(default_factory=dict)    # module path -> why fake

    def counts(self) -> dict[str, int]:
        return dict(Counter(self.layers.values()))

    def summary(self) -> str:
        """One line, e.g. ``fake 2, int8_dynamic 12 [fake: grouped weights ...: 2]``."""
        if not self.layers:
            return "no quantized layers (full precision)"
        parts = [f"{k} {v}" for k, v in sorted(self.counts().items())]
        why = Counter(self.reasons.values())
        text = ", ".join(parts)
        if why:
            text += " [fake: " + "; ".join(f"{r}: {c}" for r, c in why.most_common()) + "]"
        return text


def convert(model: nn.Module, backend: str) -> BackendReport:
    """Switch every quantized layer of ``model`` to ``backend`` ("kernel" or "fake") in place."""
    if backend not in BACKENDS:
        raise DllmqError(f"Unknown backend {backend!r}; use kernel or fake.")
    report = BackendReport(backend)
    for path, module in list(model.named_modules()):
        if isinstance(module, KernelLinear):
            if backend == FAKE:
                replace_module(model, path, module.to_quantlinear())
                report.layers[path] = FAKE
            else:
                report.layers[path] = module.kernel
        elif isinstance(module, (QuantLinear, FPQuantLinear)):
            if backend == FAKE:
                report.layers[path] = FAKE
                continue
            layer = convert_layer(path, module, report)
            if layer is not module:
                replace_module(model, path, layer)
    if report.reasons:
        log.info("kernel backend: %s", report.summary())
    refused = {r for path, r in report.reasons.items() if isinstance(model.get_submodule(path), FPQuantLinear)}
    if refused:   # the formats' kernels are refused in one sentence; fake quantization still runs
        log.warning("Floating-point layers run fake quantization: %s.", "; ".join(sorted(refused)))
    return report


def convert_layer(path: str, module: QuantLinear | FPQuantLinear, report: BackendReport) -> nn.Module:
    """The kernel layer for one quantized linear, or the linear itself when no kernel fits (the reason goes
    to ``report``). The one way a QuantLinear's tensors become a kernel layer: set_backend on a loaded model
    and the streaming loader (kernel_stream) both come here."""
    choice = choose_kernel(module)
    layer = to_kernel(module, choice)
    if layer is None:
        report.layers[path], report.reasons[path] = FAKE, choice.reason
        return module
    report.layers[path] = layer.kernel
    release_freed_memory()
    return layer


def kernel_stream(report: BackendReport | None = None) -> Stream:
    """For ``load_checkpoint(stream=...)``: each quantized linear becomes its kernel layer as soon as its
    tensors are read, so a quantized model loads for the kernel backend at about its packed size (plus one
    layer's working set) instead of holding the whole checkpoint while it converts. The layers equal those
    of loading with the fake backend and then calling set_backend(model, "kernel"), buffer for buffer."""
    report = report if report is not None else BackendReport("kernel")
    return Stream(claims=lambda m: isinstance(m, (QuantLinear, FPQuantLinear)),
                  convert=lambda path, m: convert_layer(path, m, report))


def release_freed_memory() -> None:
    """Hand memory freed by a layer conversion's temporaries back to the OS. glibc keeps freed heap pages,
    and they piled up across layers: a 1B W4A16 load peaked at 2.8 GiB (1.5 GiB trimming after each layer)
    and kept 0.8-1.4 GiB after conversion, more than its 0.5 GiB of weights."""
    if sys.platform != "linux":
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl): nothing to trim this way
        pass


def set_backend(model: nn.Module, backend: str) -> dict[str, int]:
    """Run ``model``'s quantized layers on real kernels ("kernel") or fake quantization ("fake");
    returns the number of layers per kernel (e.g. ``{"int8_dynamic": 14}``); {} for a full-precision
    model. Switching back to "fake" restores the exact QuantLinear layers."""
    return convert(model, backend).counts()


def backend_report(model: nn.Module) -> BackendReport:
    """What the quantized layers of ``model`` run now (fake layers get the reason a kernel would not fit)."""
    report = BackendReport("mixed")
    for path, module in model.named_modules():
        if isinstance(module, KernelLinear):
            report.layers[path] = module.kernel
        elif isinstance(module, (QuantLinear, FPQuantLinear)):
            report.layers[path] = FAKE
            choice = choose_kernel(module)
            report.reasons[path] = choice.reason if choice.kernel == FAKE else "backend set to fake"
    return report


def plan_kernels(raw_config: dict, device: str = "cpu") -> BackendReport:
    """The kernel each quantized layer of a saved model would run on ``device``, from its
    config.json alone (for `dllmq inspect`; no weights are read)."""
    with torch.device("meta"):
        model = build_model(parse_model_config(raw_config))
        prepare_quantized(model, raw_config)
    report = BackendReport("kernel")
    for path, module in model.named_modules():
        if isinstance(module, (QuantLinear, FPQuantLinear)):
            choice = choose_kernel(module, device)
            report.layers[path] = choice.kernel
            if choice.kernel == FAKE:
                report.reasons[path] = choice.reason
    return report


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the quantized layers' weight storage as they are held now (fake or kernel)."""
    total = 0
    for module in model.modules():
        if isinstance(module, (KernelLinear, QuantLinear, FPQuantLinear)):
            total += module.storage_bytes()
    return total
