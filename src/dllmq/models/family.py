"""The family description: the one place that knows where things sit in an architecture.

Every method downstream (the forward pass, quantization, profiling, training) asks a `Family` for
module paths by role instead of naming them, so adding an architecture is one file and one registry
entry. A block's linears come in four groups, each under a named role:

    ATTN_IN   q, k, v        read the attention norm's output
    ATTN_OUT  attention out  reads the attention (whose values come from v)
    MLP_IN    gate, up       read the FFN norm's output
    MLP_OUT   down           reads silu(gate) * up

Inside a group the order is fixed (q, k, v; gate, up) and checked when a Family is built, as is
everything else the forward pass and the methods rely on: a layout this description cannot express
(a fused qkv, a missing role, a source that is not the module feeding the group) is refused there.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Role(str, Enum):
    """What a group of linears does in a block. The values are the names results and reports use."""

    ATTN_IN = "qkv"
    ATTN_OUT = "attn_out"
    MLP_IN = "gate_up"
    MLP_OUT = "down"


ROLE_ORDER = (Role.ATTN_IN, Role.ATTN_OUT, Role.MLP_IN, Role.MLP_OUT)   # execution order in a block
_ARITY = {Role.ATTN_IN: 3, Role.ATTN_OUT: 1, Role.MLP_IN: 2, Role.MLP_OUT: 1}

# Which output scores a scale search over a group (AWQ): the block's whole attention sublayer, its
# whole MLP, or the group's own linear.
SCORE_ATTENTION, SCORE_MLP, SCORE_LINEAR = "attention", "mlp", "linear"
_SCORES = (SCORE_ATTENTION, SCORE_MLP, SCORE_LINEAR)


@dataclass(frozen=True)
class LinearGroup:
    """Linears of one block that read the same input and are calibrated together.

    `source` is the module whose output feeds them: a norm (scales fold into its weight) for the
    input groups, or the linear whose output they consume (v for the attention output, up for down).
    `clip_exempt` lists linears whose weights skip a clipping search (q and k: their outputs pass
    through RoPE and a softmax, so matching the linear's own output is the wrong target).
    `scored_on` says which output scores a scale search over the group.
    """

    role: Role
    linears: tuple[str, ...]           # paths relative to the block, in execution order
    source: str                        # path relative to the block
    scored_on: str = SCORE_LINEAR
    clip_exempt: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.role.value

    @property
    def reads_norm(self) -> bool:
        """True when a norm feeds the group (its scales fold into the norm's weight)."""
        return self.role in (Role.ATTN_IN, Role.MLP_IN)

    def clip_search(self, linear: str) -> bool:
        return linear not in self.clip_exempt


@dataclass(frozen=True)
class Family:
    """Where an architecture keeps its parts and how its logits are read.

    Dimensions (heads, FFN size, RoPE) live in the model's `ModelConfig`; this object holds the
    layout, which is the same for every size of a family. `groups` may be empty for a model whose
    blocks dllmq does not quantize (test doubles); otherwise it must describe all four roles.
    """

    name: str                           # "llada", "dream", "llama"
    model_types: tuple[str, ...]        # config.json `model_type` values this family reads
    embed: str                          # path of the token embedding from the model root
    blocks: str                         # path of the ModuleList of decoder blocks
    final_norm: str
    lm_head: str
    groups: tuple[LinearGroup, ...]     # in execution (true-sequential calibration) order
    causal: bool                        # False for diffusion models (bidirectional attention)
    shift_logits: bool                  # True when token i is predicted at position i-1 (Dream)

    def __post_init__(self) -> None:
        if self.groups:
            _check_groups(self.name, self.groups)

    @property
    def is_diffusion(self) -> bool:
        return not self.causal

    @property
    def block_linears(self) -> tuple[str, ...]:
        """Every linear of a block, in execution order."""
        return tuple(name for group in self.groups for name in group.linears)

    def group(self, role: Role | str) -> LinearGroup:
        for g in self.groups:
            if g.role == role:
                return g
        raise KeyError(f"family {self.name!r} has no linear group {role!r}")

    def group_of(self, linear: str) -> LinearGroup:
        """The group a block linear belongs to."""
        for g in self.groups:
            if linear in g.linears:
                return g
        raise KeyError(f"family {self.name!r} has no block linear {linear!r}")

    @property
    def attn_norm(self) -> str:
        return self.group(Role.ATTN_IN).source

    @property
    def ffn_norm(self) -> str:
        return self.group(Role.MLP_IN).source

    @property
    def residual_writers(self) -> tuple[str, ...]:
        """The linears whose outputs are added to the residual stream (attention out, down)."""
        return self.group(Role.ATTN_OUT).linears + self.group(Role.MLP_OUT).linears

    def model_paths(self) -> tuple[str, ...]:
        """Paths from the model root this description names."""
        return (self.embed, self.blocks, self.final_norm, self.lm_head)

    def block_paths(self) -> tuple[str, ...]:
        """Paths inside a block this description names: the norms and every linear."""
        return (self.attn_norm, self.ffn_norm) + self.block_linears


def _check_groups(family: str, groups: tuple[LinearGroup, ...]) -> None:
    def refuse(problem: str) -> ValueError:
        return ValueError(f"family {family!r} cannot be described: {problem}")

    roles = tuple(g.role for g in groups)
    if roles != ROLE_ORDER:
        raise refuse(f"its groups must be the roles {', '.join(r.name for r in ROLE_ORDER)} once each, in "
                     f"execution order, got {', '.join(getattr(r, 'name', str(r)) for r in roles)}")
    by_role = dict(zip(roles, groups))
    for role, group in by_role.items():
        if len(group.linears) != _ARITY[role]:
            raise refuse(f"{role.name} needs {_ARITY[role]} separate linears, got {group.linears} "
                         "(a fused projection is not supported)")
        if group.scored_on not in _SCORES:
            raise refuse(f"{role.name}.scored_on is {group.scored_on!r}; use one of {', '.join(_SCORES)}")
        if not set(group.clip_exempt) <= set(group.linears):
            raise refuse(f"{role.name}.clip_exempt names linears outside the group: {group.clip_exempt}")
    linears = [n for g in groups for n in g.linears]
    if len(set(linears)) != len(linears):
        raise refuse(f"a linear appears in two groups: {linears}")
    v, up = by_role[Role.ATTN_IN].linears[2], by_role[Role.MLP_IN].linears[1]
    if by_role[Role.ATTN_OUT].source != v:
        raise refuse(f"ATTN_OUT must be fed by v ({v}), got {by_role[Role.ATTN_OUT].source!r}")
    if by_role[Role.MLP_OUT].source != up:
        raise refuse(f"MLP_OUT must be fed by up ({up}), got {by_role[Role.MLP_OUT].source!r}")
    norms = (by_role[Role.ATTN_IN].source, by_role[Role.MLP_IN].source)
    if norms[0] == norms[1] or any(n in linears for n in norms):
        raise refuse(f"ATTN_IN and MLP_IN must each be fed by their own norm, got {norms}")
