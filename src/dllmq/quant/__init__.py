"""How numbers become low-bit: primitives, the quantized linear, the block-by-block pipeline, one
module per method (rtn, gptq, awq) and the saved format."""
from dllmq.quant.api import format_report, make_method, quantize, save_quantized
from dllmq.quant.config import PRESETS, QuantConfig, preset_settings
from dllmq.quant.qlinear import QuantLinear

__all__ = ["PRESETS", "QuantConfig", "QuantLinear", "preset_settings", "format_report", "make_method", "quantize",
           "save_quantized"]
