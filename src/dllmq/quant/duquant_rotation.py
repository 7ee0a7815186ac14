"""DuQuant's rotation as the study's code builds it (QDLM's DuQuant fork: get_rot.py, utils.get_rot,
quantize/quantizer.py `rotation` / `online_duquant_cali`), for the paper profile. dllmq's own greedy
Hadamard variant lives in methods/duquant.py.

- The base matrix of order b: a cascade of b - 1 Givens rotations (angle with cos 1/sqrt(i+2)) with rows
  and columns 0 and b-1 exchanged, times diag(1, Q), Q the orthogonal factor of a (b-1) x (b-1) Gaussian
  matrix drawn afresh for every fitted rotation.
- One rotation of order b shared by every block of b channels: the activations [tokens, n] are read as
  rows of b values (`reshape(-1, b)`); each step finds the largest and the smallest entry, takes the ROW
  index of the one larger in magnitude (the study's code; a row is a token's block, not a channel) modulo
  b, swaps that index with 0 in the base matrix and multiplies. After `steps` steps the prefix with the
  smallest max - min is kept.
- Then the zigzag permutation over the channels' maxima and a second rotation built the same way.
"""
from __future__ import annotations

import math

import torch


def givens_cascade(n: int) -> torch.Tensor:
    """get_rot.py: R = rot_{n-2} ... rot_1 rot_0 (rot_i rotates coordinates i, i+1 by cos 1/sqrt(i+2)), then
    rows and columns 0 and n-1 exchanged (float64)."""
    R = torch.eye(n, dtype=torch.float64)
    for i in range(n - 1):
        rot = torch.eye(n, dtype=torch.float64)
        cos, sin = 1 / math.sqrt(i + 2), math.sqrt(i + 1) / math.sqrt(i + 2)
        rot[i, i] = rot[i + 1, i + 1] = cos
        rot[i, i + 1], rot[i + 1, i] = -sin, sin
        R = rot @ R
    return exchange(R, 0, n - 1)


def exchange(R: torch.Tensor, i: int, j: int) -> torch.Tensor:
    """utils.exchange_row_col: rows i, j swapped, then columns i, j."""
    idx = torch.arange(R.shape[0])
    idx[i], idx[j] = j, i
    return R[idx][:, idx]


def random_base(n: int, generator: torch.Generator) -> torch.Tensor:
    """utils.get_rot: the Givens cascade times diag(1, Q), Q from the QR of an (n-1) x (n-1) Gaussian draw."""
    R = givens_cascade(n)
    if n == 1:
        return R
    q, _ = torch.linalg.qr(torch.randn(n - 1, n - 1, generator=generator, dtype=torch.float64))
    full = torch.zeros(n, n, dtype=torch.float64)
    full[0, 0] = 1
    full[1:, 1:] = q
    return R @ full


def _peak(w: torch.Tensor) -> tuple[float, int]:
    """max - min of w and the row of the entry larger in magnitude (quantizer.rotation's score)."""
    flat_max, flat_min = int(w.argmax()), int(w.argmin())
    cols = w.shape[-1]
    hi, lo = w.reshape(-1)[flat_max], w.reshape(-1)[flat_min]
    row = flat_max // cols if hi.abs() > lo.abs() else flat_min // cols
    return float(hi - lo), row


def fit_rotation(x: torch.Tensor, block: int, steps: int, generator: torch.Generator) -> torch.Tensor:
    """The [block, block] rotation quantizer.rotation keeps for x [tokens, k * block] (float64)."""
    base = random_base(block, generator)
    w = x.reshape(-1, block).double()
    rows, peaks = [], []
    for _ in range(steps):
        peak, row = _peak(w)
        peaks.append(peak)
        rows.append(row)
        w = w @ exchange(base, 0, row % block)
    peaks.append(_peak(w)[0])
    keep = int(torch.argmin(torch.tensor(peaks)))   # the first of the smallest peaks
    R = torch.eye(block, dtype=torch.float64)
    for row in rows[:keep]:
        R = R @ exchange(base, 0, row % block)
    return R
