"""Models: the family descriptions, native implementations, loading and saving."""
from dllmq.models.config import ModelConfig
from dllmq.models.family import Family, LinearGroup
from dllmq.models.loading import LoadedModel, load_plain_model, save_model
from dllmq.models.modeling import TransformerLM
from dllmq.models.registry import FAMILIES, get_family

__all__ = ["FAMILIES", "Family", "LinearGroup", "LoadedModel", "ModelConfig", "TransformerLM", "get_family",
           "load_plain_model", "save_model"]
