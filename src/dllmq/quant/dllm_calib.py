"""dLLM-aware calibration (issue 19): calibrate on what a diffusion model sees, weight what it commits.

A masked diffusion LLM never reads clean text at inference: it reads a partly masked sequence whose
mask ratio falls from 1 to 0 over the denoising steps. Two calibration options follow from that:

- Masked calibration (`mask_schedule`, DLLMQuant's TMAS idea): every calibration window gets a mask
  ratio p drawn from a schedule, and each of its maskable tokens is replaced by the mask token
  independently with probability p, exactly as LLaDA's pre-training forward process (and
  dllmq.train) places masks. Schedules:
    `uniform`                  p = (1 - eps) t + eps, t over (0, 1] (pre-training's distribution)
    `sampler[:steps=S,gen_length=G,block_length=B]`
                               the mask ratios LLaDA's sampler visits over its steps (the fraction
                               of the answer still masked before each step)
    `0.25,0.5,1.0`             a fixed list of ratios
  Ratios are drawn stratified (window i of n from quantile (i + u)/n), so even a few windows cover
  the schedule evenly; the masks themselves are seeded Bernoulli draws.
- Trajectory calibration (`trajectory[:steps=S,gen_length=G,block_length=B,states=K]`): the
  full-precision model runs LLaDA's sampler from the first seqlen - G tokens of each calibration
  window as the prompt, and K states it visits (evenly spaced over its steps, the all-masked start
  included) become calibration windows: the masks exactly where the sampler leaves them, not drawn.
- Certainty weighting (`weighting`, DLLMQuant's CGQ / FAIR-Calib idea): each calibration token gets
  a weight from its mask status and the full-precision model's confidence, and GPTQ's Hessian
  (H = 2/N sum_t w_t x_t x_t^T) and AWQ's losses are weighted by it. Unmasked tokens weigh
  `unmasked`, masked ones `masked`, and the masked tokens the sampler would commit within the next
  `k` steps (the k * ceil(maskable / steps) most confident masked tokens of the window, by the FP
  model's top probability, as low-confidence remasking picks them) weigh `frontier`.
    `certainty`                masked=1, unmasked=0.5, frontier=2, k=4, steps=128
    `masked=1,unmasked=0.5,frontier=2,k=4,steps=128`   any of them (the rest as in `certainty`)

Prompt positions (the `maskable` mask is False there) are never masked and weigh `unmasked`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from dllmq.errors import DllmqError

NONE = "none"
EPS = 1e-3   # LLaDA's forward process: p = (1 - eps) t + eps (dllmq.train.loop uses the same)
SAMPLER_DEFAULTS = {"steps": 128, "gen_length": 128, "block_length": 128}   # llada_generate's defaults
TRAJECTORY_DEFAULTS = {**SAMPLER_DEFAULTS, "states": 4}
WEIGHTING_DEFAULTS = {"masked": 1.0, "unmasked": 0.5, "frontier": 2.0, "k": 4, "steps": 128}
SCHEDULE_HELP = ("none (clean text, the default), uniform (ratio uniform over the diffusion time, as in "
                 "pre-training), sampler or sampler:steps=S,gen_length=G,block_length=B (the ratios LLaDA's sampler "
                 "visits), trajectory or trajectory:steps=S,gen_length=G,block_length=B,states=K (K states of the FP "
                 "sampler run from each window's first tokens), or a list of ratios in (0, 1] such as 0.25,0.5,1.0")
WEIGHTING_HELP = ("none (the default), certainty (masked=1, unmasked=0.5, frontier=2, k=4, steps=128), or "
                  "key=value pairs among masked, unmasked, frontier, k, steps")


# -- parsing: a setting's value -> its canonical string (what saved configs and study keys record) ---------
def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise DllmqError(f"--mask-schedule {text!r} is not a ratio; give {SCHEDULE_HELP}.") from None


def _key_values(text: str, allowed: dict, flag: str, help_text: str) -> dict:
    out = dict(allowed)
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in allowed:
            raise DllmqError(f"{flag} has {part!r}; give {help_text}.")
        try:
            out[key] = type(allowed[key])(float(value)) if isinstance(allowed[key], int) else float(value)
        except ValueError:
            raise DllmqError(f"{flag} has {part!r}, whose value is not a number; give {help_text}.") from None
        if isinstance(allowed[key], int) and float(value) != out[key]:
            raise DllmqError(f"{flag} has {part!r}; {key} must be a whole number.")
    return out


def parse_mask_schedule(value: Any) -> str:
    """The canonical form of a mask schedule (raises DllmqError with what to give instead)."""
    if value is None or value is False:
        return NONE
    if isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise DllmqError(f"--mask-schedule must be {SCHEDULE_HELP}; got {value!r}.")
    text = value.strip().lower()
    if text in (NONE, "uniform"):
        return text
    if text == "trajectory" or text.startswith("trajectory:"):
        s = sampler_settings(text, TRAJECTORY_DEFAULTS)
        if s == TRAJECTORY_DEFAULTS:
            return "trajectory"
        return "trajectory:" + ",".join(f"{k}={s[k]}" for k in TRAJECTORY_DEFAULTS)
    if text == "sampler" or text.startswith("sampler:"):
        s = sampler_settings(text)
        if s == SAMPLER_DEFAULTS:
            return "sampler"
        return "sampler:" + ",".join(f"{k}={s[k]}" for k in SAMPLER_DEFAULTS)
    ratios = [_number(r) for r in text.split(",") if r.strip()]
    if not ratios or not all(0 < r <= 1 for r in ratios):
        raise DllmqError(f"--mask-schedule ratios must lie in (0, 1], got {value!r}; give {SCHEDULE_HELP}.")
    return ",".join(f"{r:.12g}" for r in ratios)


def sampler_settings(text: str, defaults: dict = SAMPLER_DEFAULTS) -> dict:
    """steps / gen_length / block_length (and states) of a `sampler[:...]` or `trajectory[:...]`
    schedule, checked as the sampler checks them."""
    kind, _, rest = text.partition(":")
    s = _key_values(rest, defaults, f"--mask-schedule {kind}", f"{kind}:" + ",".join(f"{k}=N" for k in defaults))
    if min(s.values()) < 1:
        raise DllmqError(f"--mask-schedule {text}: steps, gen_length and block_length must be positive.")
    if s["gen_length"] % s["block_length"] or s["steps"] % (s["gen_length"] // s["block_length"]):
        raise DllmqError(f"--mask-schedule {text}: gen_length must be a multiple of block_length and steps a multiple "
                         "of the number of blocks, as the sampler requires.")
    return s


def parse_weighting(value: Any) -> str:
    """The canonical form of a certainty weighting: `none`, or every key=value spelled out."""
    if value is None or value is False:
        return NONE
    if not isinstance(value, str) or not value.strip():
        raise DllmqError(f"--weighting must be {WEIGHTING_HELP}; got {value!r}.")
    text = value.strip().lower()
    if text == NONE:
        return NONE
    w = weighting_settings(text)
    return ",".join(f"{k}={w[k]:g}" for k in WEIGHTING_DEFAULTS)


def weighting_settings(text: str) -> dict:
    if text == "certainty":
        return dict(WEIGHTING_DEFAULTS)
    w = _key_values(text, WEIGHTING_DEFAULTS, "--weighting", WEIGHTING_HELP)
    if min(w["masked"], w["unmasked"], w["frontier"]) < 0 or max(w["masked"], w["unmasked"], w["frontier"]) == 0:
        raise DllmqError("--weighting weights must be >= 0 and not all 0.")
    if w["k"] < 0 or w["steps"] < 1:
        raise DllmqError("--weighting needs k >= 0 and steps >= 1.")
    return w


# -- the schedules --------------------------------------------------------------------------------------
def sampler_ratios(steps: int, gen_length: int, block_length: int) -> list[float]:
    """The fraction of the answer still masked before each of LLaDA's sampler steps (its linear
    schedule within each semi-autoregressive block, blocks left to right)."""
    from dllmq.diffusion.llada_sampler import linear_schedule   # the sampler's own per-step reveal counts

    blocks = gen_length // block_length
    per_block = steps // blocks
    reveal = linear_schedule(torch.tensor([block_length]), per_block)[0].tolist()
    ratios = []
    for b in range(blocks):
        masked = gen_length - b * block_length
        for n in reveal:
            ratios.append(masked / gen_length)
            masked -= n
    return ratios


def window_ratios(schedule: str, n: int, generator: torch.Generator) -> Tensor:
    """[n] mask ratios for n windows from a canonical schedule, stratified: window i takes the
    schedule's quantile (i + u_i) / n (u_i uniform), so any n covers the schedule evenly."""
    if is_trajectory(schedule):
        raise ValueError("a trajectory schedule has no ratios to draw; its windows come from trajectory_windows")
    u = (torch.arange(n, dtype=torch.float64) + torch.rand(n, generator=generator, dtype=torch.float64)) / n
    if schedule == "uniform":
        t = 1 - u                                   # t in (0, 1]
        return (1 - EPS) * t + EPS
    if schedule.startswith("sampler"):
        table = sampler_ratios(**sampler_settings(schedule))
    else:
        table = [float(r) for r in schedule.split(",")]
    idx = (u * len(table)).long().clamp_(max=len(table) - 1)
    return torch.tensor(table, dtype=torch.float64)[idx]


@dataclass
class MaskedWindows:
    """Calibration windows as the model sees them while denoising."""
    ids: Tensor        # [n, L] with mask tokens
    masked: Tensor     # [n, L] bool: which positions hold the mask token
    maskable: Tensor   # [n, L] bool: False on prompt positions (never masked)
    ratios: Tensor     # [n] the ratio each window was masked with (trajectory: the fraction of the answer masked)


def mask_windows(ids: Tensor, schedule: str, mask_id: int, seed: int = 0,
                 maskable: Tensor | None = None) -> MaskedWindows:
    """Mask `ids` [n, L] per a canonical schedule: a ratio per window, then every maskable token
    independently with that probability (LLaDA's forward process). Seeded; prompt positions
    (`maskable` False) are never masked."""
    n, length = ids.shape
    generator = torch.Generator().manual_seed(seed)
    ratios = window_ratios(schedule, n, generator)
    maskable = torch.ones_like(ids, dtype=torch.bool) if maskable is None else maskable.bool()
    masked = (torch.rand(n, length, generator=generator, dtype=torch.float64) < ratios[:, None]) & maskable
    return MaskedWindows(ids.masked_fill(masked, mask_id), masked, maskable, ratios)


def is_trajectory(schedule: str) -> bool:
    return schedule.startswith("trajectory")


@torch.no_grad()
def trajectory_windows(model, ids: Tensor, schedule: str, seed: int = 0) -> MaskedWindows:
    """Calibration windows from the FP sampler's own states: windows are taken `states` at a time as
    prompts (their first L - gen_length tokens), LLaDA's sampler (greedy, low-confidence remasking,
    `seed`) runs on them where the model is, and the states it reads before `states` evenly spaced
    steps (step 0: the prompt and an all-masked answer) are the windows, n in all, in order."""
    from dllmq.diffusion.llada_sampler import llada_generate

    s = sampler_settings(schedule, TRAJECTORY_DEFAULTS)
    n, length = ids.shape
    prompt_len = length - s["gen_length"]
    if prompt_len < 1:
        raise DllmqError(f"--mask-schedule {schedule}: a window of {length} tokens leaves no prompt before "
                         f"gen_length {s['gen_length']}; use a longer --seqlen or a shorter gen_length.")
    k = min(s["states"], s["steps"])
    picks = sorted({round(i * (s["steps"] - 1) / max(1, k - 1)) for i in range(k)})   # 0-based steps, first and last
    mask_id = int(model.config.mask_token_id)
    device = next(model.parameters()).device
    prompts = -(-n // len(picks))
    states: list[Tensor] = []
    for rows in ids[:prompts].split(16):
        prompt = rows[:, :prompt_len]
        start = torch.cat([prompt, prompt.new_full((prompt.shape[0], s["gen_length"]), mask_id)], dim=1)
        seen = {0: start}   # the state read before step i (0-based): the start, or the state after step i

        def keep(step, x):
            if step in picks:
                seen[step] = x.cpu()

        llada_generate(model, prompt.to(device), gen_length=s["gen_length"], steps=s["steps"],
                       block_length=s["block_length"], seed=seed, callback=keep)
        for r in range(prompt.shape[0]):
            states.extend(seen[i][r] for i in picks)
    windows = torch.stack(states[:n])
    maskable = torch.zeros_like(windows, dtype=torch.bool)
    maskable[:, prompt_len:] = True
    masked = (windows == mask_id) & maskable
    ratios = masked.sum(1).double() / s["gen_length"]
    return MaskedWindows(windows, masked, maskable, ratios)


# -- certainty weights ----------------------------------------------------------------------------------
def frontier(confidence: Tensor, masked: Tensor, maskable: Tensor, k: int, steps: int) -> Tensor:
    """[n, L] bool: per window the k * ceil(maskable / steps) most confident masked positions, the
    tokens low-confidence remasking commits within the next k steps (ties: the earlier position)."""
    per_step = (maskable.sum(1) + steps - 1) // steps
    count = torch.minimum(per_step * k, masked.sum(1))
    conf = confidence.masked_fill(~masked, float("-inf"))
    order = torch.sort(conf, dim=1, descending=True, stable=True).indices
    ranks = order.argsort(dim=1)
    return (ranks < count[:, None]) & masked


def certainty_weights(windows: MaskedWindows, confidence: Tensor | None, weighting: str) -> Tensor:
    """[n, L] float32 token weights from mask status and the FP model's confidence at each position."""
    w = weighting_settings(weighting)
    out = torch.where(windows.masked, torch.tensor(w["masked"]), torch.tensor(w["unmasked"])).float()
    if w["k"] > 0 and w["frontier"] != w["masked"]:
        if confidence is None:
            raise ValueError("frontier weights need the FP model's confidence")
        near = frontier(confidence, windows.masked, windows.maskable, int(w["k"]), int(w["steps"]))
        out = torch.where(near, torch.tensor(float(w["frontier"])), out)
    return out


def needs_confidence(weighting: str) -> bool:
    w = weighting_settings(weighting)
    return w["k"] > 0 and w["frontier"] != w["masked"]


@torch.no_grad()
def fp_confidence(model, ids: Tensor, device: torch.device, batch_tokens: int = 4096,
                  head_tokens: int = 512) -> Tensor:
    """[n, L] the full-precision model's top probability for each position's token (the mask token
    excluded, as the samplers exclude it), one block on `device` at a time like calibration."""
    from dllmq.quant.pipeline import capture_block_inputs

    home = next(model.parameters()).device
    hidden, rope, mask = capture_block_inputs(model, ids, device, device, batch_tokens)
    blocks = model.get_blocks()
    for i in range(len(blocks)):
        block = blocks[i].to(device)
        hidden = [block(h, rope, mask) for h in hidden]
        blocks[i] = block.to(home)
    norm, head = model.get_final_norm().to(device), model.get_lm_head().to(device)
    mask_id = getattr(model.config, "mask_token_id", None)
    rows = []
    for h in hidden:
        flat = h.reshape(-1, h.shape[-1])
        conf = []
        for chunk in flat.split(head_tokens):
            logits = head(norm(chunk)).float()
            if mask_id is not None:
                logits[:, mask_id] = float("-inf")
            conf.append(logits.softmax(-1).amax(-1))
        rows.append(torch.cat(conf).reshape(h.shape[:-1]).cpu())
    model.get_final_norm().to(home), model.get_lm_head().to(home)
    conf = torch.cat(rows)
    if model.family.shift_logits:   # Dream: token i is read at position i - 1 (position 0 keeps its own)
        conf = torch.cat([conf[:, :1], conf[:, :-1]], dim=1)
    return conf


def ratio_summary(windows: MaskedWindows) -> str:
    """One line for the log: the masked fraction of maskable tokens, overall and its spread."""
    frac = windows.masked.sum(1).float() / windows.maskable.sum(1).clamp(min=1).float()
    return (f"masked calibration: {windows.masked.sum().item()} of {windows.maskable.sum().item()} maskable tokens "
            f"masked (per window {frac.min():.2f}..{frac.max():.2f}, mean {frac.mean():.2f})")
