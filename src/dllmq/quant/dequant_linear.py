"""What every fake-quantized linear does on its forward pass, whatever its storage layout: the online
input transform, the activation quantizer, then a matmul with the dequantized weight (kept dense
between forwards only inside qlinear.keep_dequantized_weights)."""
from __future__ import annotations

import itertools
import threading
import weakref

import torch
import torch.nn.functional as F
from torch import nn


class _LastInput(threading.local):
    """The last (input, transform, quantizer) -> prepared input, one entry per thread."""

    source: weakref.ref | None = None
    version = -1
    key: tuple | None = None
    prepared: torch.Tensor | None = None


_last = _LastInput()


def _share_key(transform: nn.Module | None, quantizer: nn.Module | None) -> tuple | None:
    """Equal for two (transform, quantizer) pairs that compute the same function now; None: do not share.
    A transform is itself at its parameters' and buffers' current versions (so a reloaded DuQuant rotation is seen);
    a quantizer must say what it computes (ActQuantizer.share_key: dynamic ones with equal settings)."""
    if quantizer is None:
        qkey = None
    else:
        qkey = getattr(quantizer, "share_key", None)
        if qkey is None:
            return None
    if transform is None:
        tkey = None
    else:
        state = itertools.chain(transform.parameters(), transform.buffers())
        tkey = (id(transform), tuple(t._version for t in state))
    return tkey, qkey


def prepared_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """input_transform then act_quantizer applied to x, as `module` would apply them.

    Linears that read the same tensor (q/k/v, gate/up) with the same transform and equal quantizers get
    the one result computed for the first of them: the same function of the same input, so the same bits.
    The entry holds x only weakly (it ends when x is freed) and is not used once x is changed in place."""
    transform, quantizer = module.input_transform, module.act_quantizer
    if transform is None and quantizer is None:
        return x
    key = None if x.is_inference() else _share_key(transform, quantizer)  # inference tensors: no version

    def prepare() -> torch.Tensor:
        y = transform(x) if transform is not None else x
        return quantizer(y) if quantizer is not None else y

    return reuse_for_same_input(x, key, prepare)


def reuse_for_same_input(x: torch.Tensor, key: tuple | None, compute):
    """``compute()``, or what it returned for the last call of this thread if that was for this very tensor
    ``x``, unchanged since, and an equal ``key`` (None: never shared). One entry; it holds x only weakly.
    Inference tensors have no version counter, so they are never shared."""
    if key is None or x.is_inference():
        return compute()
    if _last.source is not None and _last.source() is x and _last.version == x._version and _last.key == key:
        return _last.prepared
    y = compute()
    _last.source, _last.version, _last.key, _last.prepared = weakref.ref(x, _forget), x._version, key, y
    return y


def _forget(_ref: weakref.ref) -> None:
    if _last.source is _ref:
        _last.source, _last.key, _last.prepared = None, None, None


class DequantizingLinear(nn.Module):
    """Base of QuantLinear (integer codes) and FPQuantLinear (FP8 / FP4 codes): a subclass stores its
    codes and scales, sets `input_transform`, `act_quantizer` and `bias`, and defines
    `dequantized_weight()`."""

    input_transform: nn.Module | None
    act_quantizer: nn.Module | None
    bias: torch.Tensor | None

    # Set only inside keep_dequantized_weights(): the dense weight kept between forwards (not state).
    _keep_weight = False
    _kept_weight: torch.Tensor | None = None

    def dequantized_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = prepared_input(self, x)
        weight = self._kept_weight
        if weight is None or weight.dtype != x.dtype:
            weight = self.dequantized_weight().to(x.dtype)
            if self._keep_weight:
                self._kept_weight = weight
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, weight, bias)
