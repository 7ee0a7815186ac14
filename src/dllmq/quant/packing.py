"""Pack b-bit integer codes into int32 words, GPTQ's layout, and back.

The codes along one dim form a little-endian bit stream: code ``j`` occupies bits
``j*b .. j*b + b - 1`` of the stream, and stream bit ``k`` is bit ``k % 32`` of word ``k // 32``.
For 2, 4 and 8 bits that is GPTQ's layout (``32 / b`` codes per word, code ``j`` at bit ``j*b``);
for 3 bits it is GPTQ's 3-bit layout (32 codes in 3 words, codes straddling word boundaries), and
it works the same for any width from 2 to 8. The packed dim is padded with zero codes to a whole
number of words, ``ceil(n * b / 32)``; unpacking takes the original length back.

Words are stored as int32 (the bit pattern of an unsigned 32-bit word, as GPTQ stores them);
unpacked codes come back as uint8. The work is vectorised over whole tensors (a Python loop
runs only over the 32 code slots of a block) and chunked over blocks so that the int64 scratch
stays small for 12288 x 4096 matrices (about 0.1 s each way for one on 2 CPU cores).
"""
from __future__ import annotations

import math

import torch

from dllmq.errors import DllmqError
from dllmq.quant.primitives import check_bits

WORD_BITS = 32
# Values per chunk (8 MiB of int64 scratch): bounds peak memory on big matrices, and keeps
# temporaries small enough that the allocator reuses them (larger chunks measured slower).
_CHUNK_ELEMENTS = 1 << 20


def packed_length(length: int, bits: int) -> int:
    """Number of int32 words that hold ``length`` codes of ``bits`` bits."""
    return math.ceil(length * bits / WORD_BITS)


def _slots(bits: int) -> list[tuple[int, int, int]]:
    """For each of the 32 codes in a block of ``bits`` words: (code j, word, bit offset)."""
    return [(j, (j * bits) // WORD_BITS, (j * bits) % WORD_BITS) for j in range(WORD_BITS)]


def _as_blocks(t: torch.Tensor, dim: int, n_pad: int) -> tuple[torch.Tensor, int, int]:
    """View ``t`` as ``[pre, n, post]`` around ``dim``, zero-padded along it to ``n_pad``.

    Keeping the packed dim in the middle (no transpose) means slot ``j`` of every block is a
    contiguous run of ``post`` elements, which is what makes dim-0 packing of weights fast.
    """
    pre = math.prod(t.shape[:dim])
    post = math.prod(t.shape[dim + 1 :])
    t3 = t.reshape(pre, t.shape[dim], post)
    if n_pad > t.shape[dim]:
        padded = torch.zeros(pre, n_pad, post, dtype=t.dtype, device=t.device)
        padded[:, : t.shape[dim]] = t3
        t3 = padded
    return t3, pre, post


def _block_step(post: int) -> int:
    """Blocks of 32 codes per chunk, so a chunk's int64 scratch stays near _CHUNK_ELEMENTS."""
    return max(1, _CHUNK_ELEMENTS // (WORD_BITS * max(post, 1)))


def pack_codes(codes: torch.Tensor, bits: int, dim: int = 0) -> torch.Tensor:
    """Pack unsigned ``bits``-bit codes along ``dim`` into int32 words (LSB first).

    The result has the shape of ``codes`` with ``dim`` replaced by ``ceil(n * bits / 32)``.
    """
    check_bits(bits)
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise DllmqError(f"Codes must be an integer tensor, got {codes.dtype}; quantize first.")
    if codes.ndim == 0:
        raise DllmqError("Cannot pack a scalar; pass codes with at least one dim.")
    dim = dim % codes.ndim
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 2**bits - 1):
        raise DllmqError(
            f"Codes fall outside [0, {2**bits - 1}] for {bits}-bit packing; "
            "quantize with the same bit width."
        )
    n = codes.shape[dim]
    blocks = math.ceil(n / WORD_BITS)
    n_words = packed_length(n, bits)
    # 32 codes of b bits fill exactly b words: pack in blocks of 32 codes.
    c3, pre, post = _as_blocks(codes, dim, blocks * WORD_BITS)
    c_blk = c3.reshape(pre * blocks, WORD_BITS, post)
    words = torch.empty(pre * blocks, bits, post, dtype=torch.int32, device=codes.device)
    step = _block_step(post)
    for i in range(0, pre * blocks, step):
        words[i : i + step] = _pack_blocks(c_blk[i : i + step], bits)
    words = words.reshape(pre, blocks * bits, post)[:, :n_words]
    return words.reshape(*codes.shape[:dim], n_words, *codes.shape[dim + 1 :]).contiguous()


def _pack_blocks(c: torch.Tensor, bits: int) -> torch.Tensor:
    """``[k, 32, post]`` codes -> ``[k, bits, post]`` int32 words."""
    c = c.to(torch.int64)
    words = torch.zeros(c.shape[0], bits, c.shape[2], dtype=torch.int64, device=c.device)
    for j, w, off in _slots(bits):
        words[:, w] |= c[:, j] << off
        if off + bits > WORD_BITS:  # the code straddles into the next word
            words[:, w + 1] |= c[:, j] >> (WORD_BITS - off)
    words &= 0xFFFFFFFF
    # Reinterpret the unsigned 32-bit pattern as int32 explicitly (no out-of-range cast).
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack_codes(packed: torch.Tensor, bits: int, length: int, dim: int = 0) -> torch.Tensor:
    """Unpack ``length`` codes along ``dim`` from int32 words; returns uint8 codes."""
    check_bits(bits)
    if packed.dtype != torch.int32:
        raise DllmqError(f"Packed codes must be int32, got {packed.dtype}; pack with pack_codes.")
    if packed.ndim == 0:
        raise DllmqError("Cannot unpack a scalar; pass packed words with at least one dim.")
    dim = dim % packed.ndim
    if packed.shape[dim] != packed_length(length, bits):
        raise DllmqError(
            f"{packed.shape[dim]} packed words cannot hold exactly {length} codes of {bits} bits "
            f"(expected {packed_length(length, bits)}); check the length and bit width."
        )
    blocks = math.ceil(length / WORD_BITS)
    w3, pre, post = _as_blocks(packed, dim, blocks * bits)
    w_blk = w3.reshape(pre * blocks, bits, post)
    codes = torch.empty(pre * blocks, WORD_BITS, post, dtype=torch.uint8, device=packed.device)
    step = _block_step(post)
    for i in range(0, pre * blocks, step):
        codes[i : i + step] = _unpack_blocks(w_blk[i : i + step], bits)
    codes = codes.reshape(pre, blocks * WORD_BITS, post)[:, :length]
    return codes.reshape(*packed.shape[:dim], length, *packed.shape[dim + 1 :]).contiguous()


def _unpack_blocks(w: torch.Tensor, bits: int) -> torch.Tensor:
    """``[k, bits, post]`` int32 words -> ``[k, 32, post]`` uint8 codes, all 32 slots at once (a loop over
    the slots made small fake-quantized layers spend most of their forward here)."""
    word, off, straddles = _slot_tables(bits, w.device)
    w = w.to(torch.int64) & 0xFFFFFFFF  # unsigned view of each word
    codes = w.index_select(1, word) >> off
    if straddles is not None:  # 3, 5, 6, 7 bits: some codes continue in the next word
        nxt = w.index_select(1, (word + 1).clamp(max=bits - 1)) << (WORD_BITS - off)
        codes |= torch.where(straddles, nxt, 0)
    return (codes & (2**bits - 1)).to(torch.uint8)


def _slot_tables(bits: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(word index [32], bit offset [1, 32, 1], straddles-into-the-next-word mask or None) of each slot."""
    slots = _slots(bits)
    word = torch.tensor([wi for _, wi, _ in slots], device=device)
    off = torch.tensor([o for _, _, o in slots], dtype=torch.int64, device=device).view(1, -1, 1)
    cross = [o + bits > WORD_BITS for _, _, o in slots]
    return word, off, (torch.tensor(cross, device=device).view(1, -1, 1) if any(cross) else None)
