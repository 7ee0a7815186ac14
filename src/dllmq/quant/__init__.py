"""How numbers become low-bit: primitives, the quantized linear, the block-by-block pipeline, one
module per method under methods/ (listed by the registry) and the saved format."""
from dllmq.quant.api import format_report, quantize, save_quantized
from dllmq.quant.config import PRESETS, QuantConfig, preset_settings
from dllmq.quant.methods.base import Method
from dllmq.quant.formats import FORMAT_NAMES
from dllmq.quant.qlinear import QuantLinear
from dllmq.quant.qlinear_fp import FPQuantLinear
from dllmq.quant.registry import get_method, method_names, register

__all__ = ["FORMAT_NAMES", "PRESETS", "FPQuantLinear", "Method", "QuantConfig", "QuantLinear", "format_report",
           "get_method", "method_names", "preset_settings", "quantize", "register", "save_quantized"]
