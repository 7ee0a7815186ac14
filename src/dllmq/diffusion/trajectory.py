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

The free-running counterpart, `step_disagreement`, compares two runs that each follow their own states
(`StepRecorder` keeps them while a task generates): at step s, the fraction of the tokens the reference
has committed that the other run does not hold. Teacher-forced flips are the per-step error; this is
the error as it accumulates along the trajectory.
"""
from __future__ import annotations

from collections.abc import Sequence
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


class StepRecorder:
    """A sampler `callback` that keeps the answer part (the last `gen_length` positions) of the state after
    every step, over all the batches of a run: step 1 starts a new batch."""

    def __init__(self, gen_length: int):
        self.gen_length = gen_length
        self._batches: list[list[Tensor]] = []

    def __call__(self, step: int, x: Tensor) -> None:
        if step == 1:
            self._batches.append([])
        self._batches[-1].append(x[:, -self.gen_length:].cpu())

    def states(self) -> list[Tensor]:
        """Per step: [rows of every batch, gen_length], rows in generation order."""
        if not self._batches:
            return []
        steps = {len(b) for b in self._batches}
        if len(steps) != 1:
            raise ValueError(f"batches ran different step counts {sorted(steps)}")
        return [torch.cat([b[s] for b in self._batches]) for s in range(steps.pop())]


def step_disagreement(reference: Sequence[Tensor], states: Sequence[Tensor], mask_id: int) -> list[list[float]]:
    """[row][step]: of the answer tokens the reference has committed by the step (no longer `mask_id`), the
    fraction the other run does not hold at the same position (another token, or still masked); 0 while
    the reference has committed nothing. Both runs of LLaDA's sampler commit equally many tokens per step
    (the schedule depends on the lengths only), so the measure is symmetric. States: per step [rows, G]."""
    if len(reference) != len(states):
        raise ValueError(f"{len(reference)} reference steps against {len(states)}")
    out = []
    for ref, mine in zip(reference, states):
        committed = ref != mask_id
        differ = (committed & (mine != ref)).sum(1)
        n = committed.sum(1)
        out.append([int(d) / int(c) if int(c) else 0.0 for d, c in zip(differ, n)])
    return [list(row) for row in zip(*out)]


__all__ = ["StepRecorder", "Trajectory", "record_trajectory", "step_disagreement", "teacher_forced_flips"]
