"""Memory-mapped reading of (possibly sharded) safetensors checkpoints.

Tensors come back as zero-copy views into a private (copy-on-write) memory map, so loading a
checkpoint in its own dtype costs about the file size in memory, not two or three times it.
`MappedTensors.read_unmapped` reads one tensor into fresh memory with plain file reads instead, for
tensors converted as they load: their pages never become part of the process's mapped (resident) memory.
Writing goes through the `safetensors` library.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import struct
from pathlib import Path

import torch

from dllmq.errors import DllmqError

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
# Bytes per element of every safetensors dtype (the ones dllmq reads are in _DTYPES).
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
                "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def read_header(path: Path) -> tuple[int, dict]:
    """(offset of the data section, header dict); checks the file is complete."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise DllmqError(f"{path} is truncated (no safetensors header); re-download or re-save it.")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, 100_000_000):
            raise DllmqError(f"{path} is not a valid safetensors file (header length {n} exceeds the file).")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise DllmqError(f"{path} has a corrupt safetensors header; re-download or re-save it.") from None
    if not isinstance(header, dict):
        raise DllmqError(f"{path} has a corrupt safetensors header; re-download or re-save it.")
    header.pop("__metadata__", None)
    for name, entry in header.items():
        if not _entry_ok(entry):
            raise DllmqError(f"{path} has a corrupt safetensors header (the entry of {name} is malformed); "
                             "re-download or re-save it.")
    data_end = max((e["data_offsets"][1] for e in header.values()), default=0)
    if 8 + n + data_end > size:
        raise DllmqError(
            f"{path} is truncated: its header describes {8 + n + data_end} bytes but the file has {size}; "
            "re-download or re-save it."
        )
    return 8 + n, header


def _entry_ok(entry) -> bool:
    """A header entry has a dtype name, a shape of sizes and data offsets 0 <= begin <= end."""
    if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str):
        return False
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    ints = lambda xs: isinstance(xs, list) and all(isinstance(x, int) and x >= 0 for x in xs)  # noqa: E731
    return ints(shape) and ints(offsets) and len(offsets) == 2 and offsets[0] <= offsets[1]


def verify_file(path: Path) -> dict:
    """Check one safetensors file from its header alone (no tensor data is read): the header length
    and JSON, and that the byte ranges it declares fit the file, match each tensor's shape and dtype,
    and do not overlap. Returns the header; raises a DllmqError naming the file."""
    start, header = read_header(path)   # header length, JSON, every range within the file
    spans = []
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        size = _DTYPE_BYTES.get(entry["dtype"])
        if size is not None and end - begin != size * math.prod(entry["shape"]):
            raise DllmqError(f"{path} is corrupt: tensor {name} declares {end - begin} bytes, but its shape "
                             f"{entry['shape']} in {entry['dtype']} needs {size * math.prod(entry['shape'])}; "
                             "re-download or re-save it.")
        spans.append((begin, end, name))
    spans.sort()
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            raise DllmqError(f"{path} is corrupt: tensors {first} and {second} overlap; re-download or re-save it.")
    return header


def verify_checkpoint(directory: Path) -> list[Path]:
    """verify_file for every safetensors file of a checkpoint directory (each shard its index names,
    and that each shard holds the tensors the index places in it); the files checked, [] when the
    directory has no safetensors at all (a config-only directory)."""
    if not (directory / INDEX_NAME).is_file() and not any(directory.glob("*.safetensors")):
        return []
    files = checkpoint_files(directory)
    shards = sorted(set(files.values()))
    for shard in shards:
        header = verify_file(shard)
        for name in (n for n, p in files.items() if p == shard):
            if name not in header:
                raise DllmqError(f"The shard index places {name} in {shard.name}, but that file does not contain it.")
    return shards


def mmap_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file as a view into a private memory map."""
    start, header = read_header(path)
    with open(path, "rb") as f:
        if path.stat().st_size == 0:
            return {}
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    tensors = {}
    for name, entry in header.items():
        dtype = _DTYPES.get(entry["dtype"])
        if dtype is None:
            raise DllmqError(f"{path}: tensor {name} has dtype {entry['dtype']}, which dllmq does not read.")
        begin, end = entry["data_offsets"]
        count = 1
        for dim in entry["shape"]:
            count *= dim
        if count == 0:
            tensors[name] = torch.empty(entry["shape"], dtype=dtype)
            continue
        if (end - begin) != count * torch.empty((), dtype=dtype).element_size():
            raise DllmqError(f"{path}: tensor {name} has a byte size that does not match its shape; the file is corrupt.")
        flat = torch.frombuffer(mm, dtype=dtype, count=count, offset=start + begin)
        tensors[name] = flat.view(entry["shape"])
    return tensors


class MappedTensors(dict):
    """name -> tensor, as load_tensors returns them (memory-mapped views), remembering where each view
    came from so that `read_unmapped` can read it without the map."""

    def __init__(self) -> None:
        super().__init__()
        self.sources: dict[str, tuple[torch.Tensor, Path, int]] = {}   # name -> (the view, file, offset)

    def read_unmapped(self, name: str) -> torch.Tensor:
        """The tensor ``name`` in fresh memory. A view load_tensors made is read from its file with plain
        reads (its pages never enter the map, so they never count as this process's memory); a tensor put
        here since (e.g. one a loader hook converted) is in its own memory already and comes back as it is."""
        tensor = self[name]
        view, path, offset = self.sources.get(name, (None, None, 0))
        if view is not tensor:
            return tensor
        out = torch.empty(tensor.shape, dtype=tensor.dtype)
        nbytes = out.numel() * out.element_size()
        if nbytes == 0:
            return out
        buffer = memoryview(out.view(-1).view(torch.uint8).numpy())
        with open(path, "rb", buffering=0) as f:
            done = 0
            while done < nbytes:
                n = os.preadv(f.fileno(), [buffer[done:]], offset + done)
                if n <= 0:
                    raise DllmqError(f"{path} ended while reading {name}; the file is truncated.")
                done += n
        return out


def checkpoint_files(directory: Path) -> dict[str, Path]:
    """tensor name -> file, from the shard index or the single file."""
    index = directory / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DllmqError(f"{index} is not a valid shard index (it needs a 'weight_map').") from None
        files = {name: directory / shard for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise DllmqError(f"The shard index lists {shard.name}, which is missing from {directory}.")
        return files
    single = directory / SINGLE_NAME
    if single.is_file():
        return {name: single for name in read_header(single)[1]}
    found = sorted(p.name for p in directory.glob("*.safetensors"))
    if len(found) == 1:
        path = directory / found[0]
        return {name: path for name in read_header(path)[1]}
    if (directory / "pytorch_model.bin").exists() or list(directory.glob("*.bin")):
        raise DllmqError(
            f"{directory} holds only pickled .bin weights, which dllmq never unpickles; convert them to safetensors first."
        )
    raise DllmqError(f"{directory} has no model.safetensors or {INDEX_NAME}.")


def load_tensors(directory: Path) -> MappedTensors:
    files = checkpoint_files(directory)
    tensors = MappedTensors()
    for path in sorted(set(files.values())):
        start, header = read_header(path)
        shard = mmap_tensors(path)
        for name in (n for n, p in files.items() if p == path):
            if name not in shard:
                raise DllmqError(f"The shard index places {name} in {path.name}, but that file does not contain it.")
            tensors[name] = shard[name]
            tensors.sources[name] = (shard[name], path, start + header[name]["data_offsets"][0])
    return tensors


def save_tensors(tensors: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int | None = None,
                 metadata: dict[str, str] | None = None) -> None:
    """Write one file, or shards of at most `max_shard_bytes` plus the standard index."""
    from safetensors.torch import save_file

    seen: set[int] = set()
    unique = {}
    for k, v in tensors.items():  # safetensors refuses shared storage: give repeats their own copy
        v = v.detach().contiguous().cpu()
        ptr = v.untyped_storage().data_ptr()
        unique[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    tensors = unique
    sizes = {k: v.numel() * v.element_size() for k, v in tensors.items()}
    if not max_shard_bytes or sum(sizes.values()) <= max_shard_bytes:
        save_file(tensors, str(directory / SINGLE_NAME), metadata=metadata or {"format": "pt"})
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    used = 0
    for name, t in tensors.items():
        if shards[-1] and used + sizes[name] > max_shard_bytes:
            shards.append({})
            used = 0
        shards[-1][name] = t
        used += sizes[name]
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / fname), metadata=metadata or {"format": "pt"})
        weight_map.update({name: fname for name in shard})
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2))
