"""Where in the denoising a model departs from a reference: teacher-forced trajectory flips.

The reference model (full precision) generates with LLaDA's sampler and its state after every step
is recorded (`record_trajectory`). Another model (quantized) is then run on the *reference's* states
(`teacher_forced_flips`): at step s it sees exactly the state the reference saw, makes its own choice
of which masked positions to reveal and with which tokens, and the run continues from the reference's
next state whatever it chose. A flip at step s is a row where its choice differs from the reference's.
Because both see the same state, a flip is the model's own error at that step, not the echo of an
earlier divergence; the flip rate by step shows where in the denoising quantization error bites.

LLaDA's sampler only (the mini tasks' generation); greedy decoding (temperature 0) makes a choice a
function of the state, so the reference compared with itself has no flip at all.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dllmq.diffusion.llada_sampler import llada_generate


@dataclass
class Trajectory:
    prompt_ids: Tensor                 # [B, P]
    attention_mask: Tensor | None      # [B, P] or None
    settings: dict                     # gen_length, steps, block_length, ... (LLaDA sampler)
    states: list[Tensor]               # per step: [B, P + gen_length] state after the step (CPU)

    @property
    def steps(self) -> int:
        return len(self.states)


@torch.no_grad()
def record_trajectory(model: torch.nn.Module, prompt_ids: Tensor, attention_mask: Tensor | None = None,
                      **settings) -> Trajectory:
    """Generate with LLaDA's sampler and keep the state after every step."""
    states: list[Tensor] = []
    llada_generate(model, prompt_ids, attention_mask=attention_mask,
                   callback=lambda step, x: states.append(x.cpu()), **settings)
    return Trajectory(prompt_ids, attention_mask, dict(settings), states)


@torch.no_grad()
def teacher_forced_flips(model: torch.nn.Module, traj: Trajectory) -> list[list[int]]:
    """[row][step] 1 where the model, from the reference's state before the step, reveals other positions
    or other tokens than the reference did at that step; else 0."""
    mine: list[Tensor] = []
    llada_generate(model, traj.prompt_ids, attention_mask=traj.attention_mask, teacher_states=traj.states,
                   callback=lambda step, x: mine.append(x.cpu()), **traj.settings)
    flips = torch.stack([(a != b).any(dim=1) for a, b in zip(mine, traj.states)], dim=1)  # [B, steps]
    return flips.long().tolist()


__all__ = ["Trajectory", "record_trajectory", "teacher_forced_flips"]
