"""What a quantization method is: everything dllmq needs to know about one, in one class.

A method module defines a `Method` subclass with its name, kind and settings, the calibration steps
(prepare the model, quantize a block) and `build_runtime`, which gives a block what runs at inference
besides the weights. The registry (dllmq.quant.registry) lists the classes; the config, the
pipeline, the loader, the CLI and the study read everything about a method from there.
"""
from __future__ import annotations

from dataclasses import replace

from torch import nn

from dllmq.models.family import Role
from dllmq.models.modeling import Block, TransformerLM
from dllmq.quant.activations import QKVQuantizer, attach_quantizers
from dllmq.quant.block import BlockContext, QuantizedWeight
from dllmq.quant.formats import FORMAT_NAMES, Format
from dllmq.quant.specs import ActSpec, MethodSettings, WeightSpec

WEIGHT_ONLY = "weight-only"
WEIGHT_ACTIVATION = "weight-activation"
EITHER = "either"    # weight-only, or given activation bits the untransformed weight-activation baseline (RTN)
KINDS = (WEIGHT_ONLY, WEIGHT_ACTIVATION, EITHER)


class Method:
    """A quantization method: observe a block's calibration inputs, transform, quantize.

    Class attributes describe the method; an instance runs it with one QuantConfig (`self.config`,
    its own settings in `self.settings`).
    """

    name: str = ""                    # the registry key: --method, study configs, saved models
    display_name: str = ""            # tables and reports
    kind: str = WEIGHT_ONLY
    transform: str | None = None      # "smoothing" or "rotation": what the study's findings compare
    Settings: type[MethodSettings] = MethodSettings
    # Whether the next block is fed this block's quantized outputs (GPTQ's reference does) or its
    # full-precision ones (AWQ's reference does).
    propagate_quantized: bool = True
    # The method's preferred shared settings, used where a config leaves them unset. Clip ratios apply
    # at 4 bits or fewer (the references tune them there); at more bits clipping only adds error.
    weight_sym: bool = False
    act_sym: bool = False
    low_bit_act_clip: float = 1.0
    low_bit_weight_clip: float = 1.0
    rotate_qk: bool = False           # the K/V quantizer rotates Q and K first (QuaRot)
    # The number formats (dllmq.quant.formats) the method can put weights / activations in, and why not
    # the others (one clause, for the error message).
    weight_formats: tuple[str, ...] = FORMAT_NAMES
    act_formats: tuple[str, ...] = FORMAT_NAMES
    format_note: str = ""

    def __init__(self, config):
        self.config = config
        self.settings = config.settings

    # -- what the method is -----------------------------------------------------------------------
    @classmethod
    def needs_calibration(cls, settings: MethodSettings) -> bool:
        return True

    @classmethod
    def takes_token_weights(cls, settings: MethodSettings) -> bool:
        """Whether calibration weighs tokens (--weighting: GPTQ's Hessian, AWQ's losses); methods whose
        statistics are activation maxima do not."""
        return False

    @classmethod
    def check_weight_format(cls, settings: MethodSettings, fmt: Format) -> None:
        """Raise DllmqError when the method's settings cannot put weights in the (floating-point) format."""

    @classmethod
    def quantizes_activations(cls, act: ActSpec) -> bool:
        return cls.kind == WEIGHT_ACTIVATION or (cls.kind == EITHER and act.enabled)

    # -- the paper profile ------------------------------------------------------------------------
    @classmethod
    def paper_settings(cls, family: str | None) -> dict:
        """The study code's settings for this method on a model of `family` (flat QuantConfig names),
        which `--profile paper` uses where the caller leaves a setting unset. With family None, only
        what does not depend on the family. docs/fidelity.md says where each comes from."""
        return {}

    @classmethod
    def paper_note(cls, family: str | None) -> str | None:
        """One line a paper run prints where it reproduces a quirk of the study's runs (None: none)."""
        return None

    @property
    def study_grid(self) -> bool:
        """Whether weights and activations go on the study's asymmetric grid (SmoothQuant's and DuQuant's
        optional `study_grid` setting; docs/fidelity.md items 5, 6)."""
        return bool(getattr(self.settings, "study_grid", False))

    def weight_spec(self) -> WeightSpec:
        """The grid the method rounds block weights to: the config's, on the study's grid where asked."""
        return replace(self.config.weight, study_grid=True) if self.study_grid else self.config.weight

    # -- calibration ------------------------------------------------------------------------------
    def prepare_model(self, model: TransformerLM) -> None:
        """Model-level work before calibration (QuaRot's rotation of the residual stream)."""

    def quantize_block(self, ctx: BlockContext) -> dict[str, QuantizedWeight]:
        raise NotImplementedError

    # -- what runs at inference -------------------------------------------------------------------
    def input_transform(self, role: Role, in_features: int) -> nn.Module | None:
        """The online transform a linear of `role` runs on its input, as an empty module whose state a
        saved model fills (None: no transform)."""
        return None

    def build_runtime(self, block: Block) -> None:
        """Give a block whose linears are quantized what runs at inference besides the weights: each
        linear's online input transform where it has none yet (after calibration the fitted one is
        already there; when a saved model loads, an empty one that the checkpoint then fills), and the
        activation and K/V quantizers. Called after calibration and when a saved model is loaded."""
        for group in block.family.groups:
            for name in group.linears:
                linear = block.get_submodule(name)
                if getattr(linear, "input_transform", None) is None:
                    linear.input_transform = self.input_transform(group.role, linear.in_features)
        if self.config.weight_activation:
            attach_quantizers(block, self.config.act, self.config.kv, rotate_qk=self.rotate_qk,
                              study_grid=self.study_grid)
            if self.config.qkv_quant:
                block.kv_hook = QKVQuantizer(self.config.act.bits, self.config.act.clip, self.qk_hadamard_block())

    def qk_hadamard_block(self) -> int | None:
        """The order of the Hadamard Q and K get before qkv_quant quantizes them (None: none)."""
        return None
