"""Module surgery: swap a submodule, named by its dotted path, for another."""
from __future__ import annotations

from torch import nn


def replace_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)
