"""dllmq: quantize diffusion LLMs (LLaDA, Dream) and measure what each choice costs."""
from dllmq.errors import DllmqError
from dllmq.api import load_model
from dllmq.models import save_model

__version__ = "0.1.0"
__all__ = ["DllmqError", "__version__", "load_model", "save_model"]
