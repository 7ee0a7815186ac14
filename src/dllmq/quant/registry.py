"""The quantization methods dllmq knows, in the study's order. Everything else reads them from here:
QuantConfig (settings and defaults), the pipeline and the loader (`build_runtime`), the CLI (the
--method choices and each method's flags) and the study (names, order, kinds).

A new method is a module under dllmq/quant/methods/ with a `Method` subclass, and one line below
(or a `register(MyMethod)` call from the user's own code)."""
from __future__ import annotations

from dllmq.errors import DllmqError
from dllmq.quant.methods.awq import AWQ
from dllmq.quant.methods.base import KINDS, Method
from dllmq.quant.methods.duquant import DuQuant
from dllmq.quant.methods.gptq import GPTQ
from dllmq.quant.methods.quarot import QuaRot
from dllmq.quant.methods.rtn import RTN
from dllmq.quant.methods.smoothquant import SmoothQuant
from dllmq.quant.specs import MethodSettings

RESERVED_NAMES = ("fp",)  # the study's full-precision row
_METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Add a method (usable as a class decorator). Its name must be new, lowercase and not 'fp'."""
    name = cls.name
    if not name or name != name.lower() or name in RESERVED_NAMES:
        raise ValueError(f"{cls.__name__}.name must be a new lowercase name other than 'fp', got {name!r}")
    if name in _METHODS and _METHODS[name] is not cls:
        raise ValueError(f"a method named {name!r} is registered already ({_METHODS[name].__name__})")
    if cls.kind not in KINDS:
        raise ValueError(f"{cls.__name__}.kind must be one of {', '.join(KINDS)}, got {cls.kind!r}")
    if not (isinstance(cls.Settings, type) and issubclass(cls.Settings, MethodSettings)):
        raise ValueError(f"{cls.__name__}.Settings must be a MethodSettings dataclass")
    _METHODS[name] = cls
    return cls


def unregister(name: str) -> None:
    _METHODS.pop(name, None)


def method_names() -> tuple[str, ...]:
    return tuple(_METHODS)


def methods() -> tuple[type[Method], ...]:
    return tuple(_METHODS.values())


def get_method(name: str) -> type[Method]:
    try:
        return _METHODS[name.lower()]
    except KeyError:
        raise DllmqError(f"Unknown method {name!r}; choose one of {', '.join(_METHODS)}.") from None


for _cls in (RTN, GPTQ, AWQ, SmoothQuant, QuaRot, DuQuant):
    register(_cls)
