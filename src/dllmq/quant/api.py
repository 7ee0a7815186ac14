"""One call per job: quantize a loaded model in place, summarise, save."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from dllmq.data import calibration_set, chat_windows, document_windows
from dllmq.errors import DllmqError
from dllmq.models.describe import human_bytes
from dllmq.models.loading import save_model, state_dict_for_saving
from dllmq.models.modeling import TransformerLM
from dllmq.quant.config import QuantConfig
from dllmq.quant.dllm_calib import (
    NONE,
    certainty_weights,
    fp_confidence,
    is_trajectory,
    mask_windows,
    needs_confidence,
    ratio_summary,
    trajectory_windows,
)
from dllmq.quant.format import quantization_config, read_quantization, tool_config
from dllmq.quant.pipeline import QuantReport, quantize_model
from dllmq.quant.qlinear import QuantLinear
from dllmq.quant.qlinear_fp import FPQuantLinear

log = logging.getLogger(__name__)


def calibration_ids(model: TransformerLM, tokenizer, config: QuantConfig) -> torch.Tensor | None:
    windows = calibration_windows(model, tokenizer, config)
    return None if windows is None else windows[0]


def calibration_windows(model: TransformerLM, tokenizer, config: QuantConfig
                        ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(ids [n, L], maskable [n, L] or None: every token) of the calibration, None when the method needs none.
    Chat windows mark their prompts unmaskable."""
    if not config.needs_calibration:
        return None
    cal = config.calibration
    if cal.seqlen > model.config.max_seq_len:
        raise DllmqError(f"--seqlen {cal.seqlen} is longer than the model's context of "
                         f"{model.config.max_seq_len} tokens; use a shorter calibration window.")
    if tokenizer is None:
        raise DllmqError("Calibration needs the model's tokenizer, and this model directory has none.")
    if cal.windows == "documents":
        return document_windows(tokenizer, cal.source, cal.nsamples, cal.seqlen), None
    if cal.windows == "chat":
        return chat_windows(tokenizer, cal.source, cal.nsamples, cal.seqlen, config.seed)
    return calibration_set(tokenizer, cal.source, cal.nsamples, cal.seqlen, config.seed), None


def check_dllm_aware(model: TransformerLM) -> None:
    """Masked calibration needs a diffusion model with a mask token."""
    if model.family.causal:
        raise DllmqError(f"--mask-schedule calibrates on what a diffusion model sees while denoising; "
                         f"{model.family.name} is an autoregressive family, so leave it out.")
    if model.config.mask_token_id is None:
        raise DllmqError("--mask-schedule needs the model's mask_token_id, and its config has none; set it in "
                         "config.json.")


def dllm_aware_calibration(model: TransformerLM, calib: torch.Tensor, config: QuantConfig, device: torch.device,
                           maskable: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The calibration windows masked per --mask-schedule (seeded by the run's seed; positions where
    `maskable` is False, chat prompts, never) and, with --weighting, each token's weight from its mask
    status and the FP model's confidence."""
    cal = config.calibration
    check_dllm_aware(model)
    if is_trajectory(cal.mask_schedule):
        if maskable is not None:
            raise DllmqError("--mask-schedule trajectory takes its prompts from the first tokens of text windows; "
                             "with --calib-windows chat use a ratio schedule (uniform, sampler or a list) instead.")
        windows = trajectory_windows(model, calib, cal.mask_schedule, seed=config.seed)
    else:
        windows = mask_windows(calib, cal.mask_schedule, int(model.config.mask_token_id), seed=config.seed,
                               maskable=maskable)
    log.info(ratio_summary(windows))
    if cal.weighting == NONE:
        return windows.ids, None
    confidence = fp_confidence(model, windows.ids, device) if needs_confidence(cal.weighting) else None
    return windows.ids, certainty_weights(windows, confidence, cal.weighting)


def quantize(model: TransformerLM, tokenizer, config: QuantConfig, *, device: str | torch.device = "cpu",
             offload_activations: bool = False, progress: bool = True) -> QuantReport:
    """Quantize `model`'s block linears in place with `config`; records the quantization_config on it.
    A paper-profile config is first resolved for the model's family (`QuantConfig.for_family`)."""
    if any(isinstance(m, (QuantLinear, FPQuantLinear)) for m in model.modules()):
        raise DllmqError("This model is already quantized; start from the full-precision checkpoint.")
    config = config.for_family(model.family.name)
    note = config.paper_note()
    if note:
        log.warning(note)
    dllm_aware = config.needs_calibration and config.calibration.mask_schedule != NONE
    if dllm_aware:
        check_dllm_aware(model)
    windows = calibration_windows(model, tokenizer, config)
    calib, maskable = (None, None) if windows is None else windows
    weights = None
    if dllm_aware:
        calib, weights = dllm_aware_calibration(model, calib, config, torch.device(device), maskable)
    report = quantize_model(model, config.make_method(), calib, device=device,
                            offload_activations=offload_activations, progress=progress, token_weights=weights)
    model.config.raw["quantization_config"] = quantization_config(model, config)
    return report


def theoretical_bytes(model: TransformerLM) -> int:
    """Bytes of the packed model: codes at their bit width plus scales, zeros and g_idx for every
    QuantLinear, and every other saved tensor (embedding, norms, head, online transforms) at its dtype.
    The saved file is checked against this."""
    core = ("qweight", "qzeros", "scales", "g_idx")
    total = 0.0
    quantized = set()
    for path, module in model.named_modules():
        if isinstance(module, QuantLinear):
            quantized.update(f"{path}.{name}" for name in core)
            total += module.in_features * module.out_features * module.bits / 8
            total += module.n_groups * module.out_features * (module.scales.element_size() + module.bits / 8)
            total += module.in_features * 4
    for name, tensor in state_dict_for_saving(model).items():
        if name not in quantized:
            total += tensor.numel() * tensor.element_size()
    return int(total)


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))


def save_quantized(model: TransformerLM, tokenizer, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Save a quantized model as a directory every dllmq command reads; a weight-only one also gets the
    quantize_config.json that GPTQ tools look for."""
    saved = read_quantization(model.config.raw)
    tool = None if saved is None else tool_config(model.config.raw["quantization_config"], saved.config)
    extra = {"quantize_config.json": json.dumps(tool, indent=2)} if tool else None
    return save_model(model, tokenizer, out, overwrite=overwrite, extra_files=extra)


def format_report(report: QuantReport, worst: int = 5) -> str:
    lines = [f"{report.method}: {len(report.layers)} linears quantized in {report.seconds:.1f} s, "
             f"peak RSS {human_bytes(report.peak_rss_bytes)}"
             + (f", peak device memory {human_bytes(report.peak_device_bytes)}" if report.peak_device_bytes else "")]
    if report.layers:
        kind = report.layers[0].error_kind
        by_type: dict[str, list[float]] = {}
        for layer in report.layers:
            by_type.setdefault(layer.name.rsplit(".", 1)[-1], []).append(layer.error)
        lines.append(f"relative {kind} error by linear (mean over blocks): " +
                     ", ".join(f"{k} {sum(v) / len(v):.4f}" for k, v in by_type.items()))
        top = sorted(report.layers, key=lambda l: l.error, reverse=True)[:worst]
        lines.append("largest: " + ", ".join(f"{l.name} {l.error:.4f}" for l in top))
    return "\n".join(lines)
