"""The families dllmq knows: adding one is a module with FAMILY, MODEL_CLASS, parse_config and a line here."""
from __future__ import annotations

from types import ModuleType

from dllmq.errors import DllmqError
from dllmq.models import dream, llada, llama
from dllmq.models.config import ModelConfig
from dllmq.models.family import Family
from dllmq.models.modeling import TransformerLM

FAMILIES: dict[str, ModuleType] = {"llada": llada, "dream": dream, "llama": llama}


def family_module(name: str) -> ModuleType:
    try:
        return FAMILIES[name]
    except KeyError:
        raise DllmqError(f"Unknown model family {name!r}; known families: {', '.join(FAMILIES)}.") from None


def family_for_model_type(model_type: str | None) -> ModuleType:
    for module in FAMILIES.values():
        if model_type in module.FAMILY.model_types:
            return module
    known = ", ".join(t for m in FAMILIES.values() for t in m.FAMILY.model_types)
    raise DllmqError(f"config.json has model_type {model_type!r}, which dllmq cannot load; supported: {known}.")


def parse_model_config(raw: dict) -> ModelConfig:
    """The ModelConfig of a config.json dict, parsed by the family its model_type names."""
    return family_for_model_type(raw.get("model_type")).parse_config(raw)


def get_family(name: str) -> Family:
    return family_module(name).FAMILY


def build_model(config: ModelConfig) -> TransformerLM:
    """The module tree for `config` with uninitialised weights (build under torch.device('meta') to skip memory)."""
    model = family_module(config.family).MODEL_CLASS(config)
    model.tie_weights()
    return model
