"""dllmq's model inside lm-evaluation-harness: the `dllmq` LM class.

Importing this module registers the class under the name `dllmq` in lm_eval's model registry, so
any harness task runs on a full-precision or dllmq-quantized diffusion model:

    import dllmq.evaluate.harness                      # registers "dllmq"
    lm_eval.simple_evaluate(model="dllmq", model_args="pretrained=q/,mc_num=128", tasks=["arc_easy"])

lm_eval 0.4.x has no plugin entry point for models, so its own `lm_eval` command cannot see the
class unless something imports it first. This module is therefore also the harness's CLI with the
class registered; every `lm_eval` flag works the same:

    python -m dllmq.evaluate.harness --model dllmq --model_args pretrained=q/,mc_num=128 --tasks arc_easy \
        --batch_size 32

Model arguments win over the harness's own flags where both are given. Note that the harness's
--batch_size (default 1) is the Monte Carlo batch here, as in LLaDA's own adapter: pass
--batch_size 32 (or batch_size=32 in --model_args) for speed; the estimate stays unbiased either way.
On a machine without CUDA, the harness's default device "cuda" falls back to the CPU with a warning.

How requests are answered:

- loglikelihood(context, continuation): the context and continuation are tokenized together and
  split as the harness does for causal models (trailing context spaces move to the continuation);
  a diffusion model scores the continuation with dllmq's Monte Carlo estimate (`mc_num` draws,
  `batch_size` rows per forward pass, `cfg` guidance, the same `seed` for every request, so a
  request's value does not depend on its neighbours); a causal model gets its exact value. An
  answer of one token is scored with mc_num=1, which is exact and gives the same value as any
  mc_num (every draw masks that one token). The greedy flag is whether greedy decoding of the
  masked answer reproduces it (`greedy_matches`, one forward pass per answer token); with
  greedy="auto" it is computed only for requests that are alone for their document - multiple-
  choice tasks send one request per choice and never read the flag - and is False otherwise.
- generate_until(context, gen_kwargs): diffusion generation with the family's sampler (LLaDA:
  gen_length / steps / block_length / remasking / temperature / cfg; Dream: steps / alg /
  temperature / top_p / top_k), prompts left-padded in batches of `gen_batch_size`; the answer is
  cut at the first end-of-text token and then at the first of the request's `until` strings.
  gen_length is the model argument when given, else the request's max_gen_toks (256 by default),
  rounded up to a multiple of block_length; steps default to gen_length and block_length to 32
  (or gen_length when 32 does not divide it).
- loglikelihood_rolling(text): the Monte Carlo ELBO of the text in disjoint windows of the model's
  length, each conditioned on the text before it (a lower bound on log p for diffusion models).

Model arguments (all optional): pretrained (built-in name, directory, quantized directory or Hub
id), mc_num, batch_size, gen_batch_size, cfg, gen_length, steps, block_length, remasking,
temperature, alg, alg_temp, top_p, top_k, sampler, dtype, device, seed, chat, add_bos, greedy,
max_length, progress, likelihood (llada: the estimator above; dream: Dream's evaluation estimator,
`bernoulli_mc_loglikelihood`, with EOS appended to every continuation and no greedy flag),
max_new_tokens (when gen_length is not given: the generation length is the request's max_gen_toks capped
at this, or this when the request gives none, as Dream's study evaluation does), nll_type (with likelihood dream: mc, or Dream's autoregressive-order variants ar_ftb / ar_btf,
`dream_ar_loglikelihood`), stop_strings (false: generations are cut at end-of-text only, not at the request's `until`),
gen_prefix (text every answer opens with, written after the prompt; the answer returned follows it),
bos_with_chat (with add_bos, BOS also before a chat-formatted prompt, as the study's Dream model does).
"""
from __future__ import annotations

import importlib
import logging
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, simple_parse_args_string
from tqdm.auto import tqdm

from dllmq.api import load_model
from dllmq.diffusion import (bernoulli_mc_loglikelihood, decode_generation, default_sampler, dream_ar_loglikelihood,
                             encode_prompts, format_prompt, generate, greedy_matches, loglikelihood)
from dllmq.diffusion.text import pad_token_id
from dllmq.errors import DllmqError

log = logging.getLogger(__name__)

LIKELIHOODS = ("llada", "dream")   # LLaDA's estimator (k of L masked, weight L/k) or Dream's (Bernoulli, 1/p)
# Dream's estimator variants (its nll_type): Monte Carlo, or the answer scored in autoregressive order
NLL_TYPES = ("mc", "ar_ftb", "ar_btf")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise DllmqError(f"Model argument {name}={value!r} is not a boolean; use true or false.")


def _as_int(name: str, value: Any, allow_none: bool = True) -> int | None:
    if value is None or (allow_none and str(value).lower() in ("none", "")):
        return None
    try:
        out = int(value)
    except (TypeError, ValueError):
        raise DllmqError(f"Model argument {name}={value!r} is not an integer.") from None
    if out < 1:
        raise DllmqError(f"Model argument {name} must be positive, got {out}.")
    return out


def _as_float(name: str, value: Any, allow_none: bool = False) -> float | None:
    if value is None or (allow_none and str(value).lower() in ("none", "")):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise DllmqError(f"Model argument {name}={value!r} is not a number.") from None


class DllmqLM(TemplateLM):
    """lm-evaluation-harness model backed by a dllmq model (LLaDA, Dream, or a causal Llama)."""

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> DllmqLM:
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> DllmqLM:
        """Model arguments win over the harness's own flags (--batch_size, --device), which it
        passes alongside them; the harness would otherwise fail on the duplicate."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    def __init__(
        self,
        pretrained: str = "dllmq-tiny",
        *,
        model: torch.nn.Module | None = None,
        tokenizer: Any = None,
        mc_num: int = 128,
        batch_size: int | str | None = 32,
        gen_batch_size: int = 1,
        cfg: float = 0.0,
        gen_length: int | None = None,
        steps: int | None = None,
        block_length: int | None = None,
        remasking: str = "low_confidence",
        temperature: float = 0.0,
        alg: str = "entropy",
        alg_temp: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        sampler: str | None = None,
        dtype: str = "auto",
        device: str | None = "cpu",
        seed: int = 0,
        chat: bool | str = False,
        add_bos: bool | str | None = None,
        greedy: bool | str = "auto",
        max_length: int | None = None,
        progress: bool | str = True,
        likelihood: str = "llada",
        stop_strings: bool | str = True,
        nll_type: str = "mc",
        max_new_tokens: int | None = None,
        gen_prefix: str | None = None,
        bos_with_chat: bool | str = False,
        **unused: Any,
    ) -> None:
        super().__init__()
        unused.pop("max_batch_size", None)
        if unused:
            log.warning("dllmq model ignores unknown arguments: %s", ", ".join(sorted(unused)))
        device = str(device or "cpu")
        if device.startswith("cuda") and not torch.cuda.is_available():
            log.warning("device %s requested (the harness's default) but CUDA is not available; using the CPU", device)
            device = "cpu"
        self.seed = int(seed)
        if model is None:
            model, tokenizer, _family = load_model(pretrained, dtype=dtype, device=device, seed=self.seed)
            self.model_path = str(pretrained)
        else:
            self.model_path = str(pretrained) if pretrained else type(model).__name__
        if tokenizer is None:
            raise DllmqError(
                f"The model {self.model_path} has no tokenizer; evaluation needs one (put the tokenizer files "
                "next to config.json)."
            )
        self.model, self.tokenizer = model.eval(), tokenizer
        self.family = model.family
        self._device = next(model.parameters()).device
        self.mc_num = _as_int("mc_num", mc_num, allow_none=False)
        self.batch_size = 32 if batch_size in (None, "auto") or str(batch_size).startswith("auto") else \
            _as_int("batch_size", batch_size, allow_none=False)
        self.gen_batch_size = _as_int("gen_batch_size", gen_batch_size, allow_none=False)
        self.cfg = _as_float("cfg", cfg)
        self.gen_length = _as_int("gen_length", gen_length)
        self.steps = _as_int("steps", steps)
        self.block_length = _as_int("block_length", block_length)
        self.remasking = str(remasking)
        self.temperature = _as_float("temperature", temperature)
        self.alg = str(alg)
        self.alg_temp = _as_float("alg_temp", alg_temp, allow_none=True)
        self.top_p = _as_float("top_p", top_p, allow_none=True)
        self.top_k = _as_int("top_k", top_k)
        self.sampler = None if sampler in (None, "", "auto", "none") else str(sampler)
        self.chat = _as_bool("chat", chat)
        self.add_bos = (self.family.name == "dream") if add_bos in (None, "auto", "none") else _as_bool("add_bos", add_bos)
        self.greedy = "auto" if str(greedy).lower() == "auto" else _as_bool("greedy", greedy)
        model_limit = getattr(model.config, "max_seq_len", None)
        self.max_length = _as_int("max_length", max_length) or model_limit or 4096
        self.progress = _as_bool("progress", progress)
        self.dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        if likelihood not in LIKELIHOODS:
            raise DllmqError(f"likelihood must be {' or '.join(LIKELIHOODS)}, got {likelihood!r}.")
        self.likelihood = str(likelihood)
        if nll_type not in NLL_TYPES:
            raise DllmqError(f"nll_type must be {', '.join(NLL_TYPES)}, got {nll_type!r}.")
        if nll_type != "mc" and self.likelihood != "dream":
            raise DllmqError(f"nll_type {nll_type} is a variant of Dream's likelihood; it needs likelihood=dream "
                             "(--profile paper on a Dream model).")
        self.nll_type = str(nll_type)
        self.max_new_tokens = _as_int("max_new_tokens", max_new_tokens)
        # the opening of every answer, written after the (chat-formatted) prompt: the study's HumanEval
        # prefills "```python\n" (presets.PAPER_DREAM_TASK); the answer returned is what follows it
        self.gen_prefix = "" if gen_prefix in (None, "", "none") else str(gen_prefix)
        # add_bos also before a chat-formatted prompt (the study's Dream model prepends BOS to every prompt)
        self.bos_with_chat = _as_bool("bos_with_chat", bos_with_chat)
        self.stop_strings = _as_bool("stop_strings", stop_strings)
        # only(request) -> bool: answer just the requests it accepts (the others get None). The whole list
        # still decides what an accepted request gets (the greedy flag's count per document, the generation
        # batches), so each answer is the one a call with the whole list gives (harness_shards' shards).
        self.only: Callable[[Any], bool] | None = None

    # ------------------------------------------------------------------ harness plumbing
    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return int(eos if eos is not None else getattr(self.model.config, "eos_token_id", 0))

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return int(bos) if bos is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "") or self.model_path).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.tokenizer, "chat_template", None) or ""

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise DllmqError("The tokenizer has no chat template; drop --apply_chat_template for a base model.")
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        bos_text = getattr(self.tokenizer, "bos_token", None)
        templated = bool(bos_text) and string.startswith(bos_text)
        if add_special_tokens is None:
            add_special_tokens = not templated
        ids = list(self.tokenizer(string, add_special_tokens=add_special_tokens)["input_ids"])
        bos = self.tokenizer.bos_token_id
        if self.add_bos and bos is not None and (not ids or ids[0] != bos) and add_special_tokens:
            ids = [int(bos)] + ids
        return ids

    def get_model_info(self) -> dict:
        return {"model_path": self.model_path, "family": self.family.name, "dtype": self.dtype,
                "dllmq_settings": self.settings()}

    def settings(self) -> dict:
        """The settings that decide every number this model produces (for provenance)."""
        return {"mc_num": self.mc_num, "batch_size": self.batch_size, "gen_batch_size": self.gen_batch_size,
                "cfg": self.cfg, "gen_length": self.gen_length, "steps": self.steps,
                "block_length": self.block_length, "remasking": self.remasking, "temperature": self.temperature,
                "alg": self.alg, "alg_temp": self.alg_temp, "top_p": self.top_p, "top_k": self.top_k,
                "sampler": self.sampler, "seed": self.seed, "chat": self.chat, "add_bos": self.add_bos,
                "greedy": self.greedy, "max_length": self.max_length, "likelihood": self.likelihood,
                "stop_strings": self.stop_strings,
                **({"nll_type": self.nll_type} if self.nll_type != "mc" else {}),
                **({"max_new_tokens": self.max_new_tokens} if self.max_new_tokens else {}),
                **({"gen_prefix": self.gen_prefix} if self.gen_prefix else {}),
                **({"bos_with_chat": True} if self.bos_with_chat else {})}

    # ------------------------------------------------------------------ loglikelihood
    def _wrap_chat(self, context: str) -> str:
        return format_prompt(self.tokenizer, context, chat=True)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        args = [req.args for req in requests]
        per_doc = Counter((getattr(r, "task_name", None), getattr(r, "doc_id", None)) for r in requests)
        need_greedy = []
        for r in requests:
            key = (getattr(r, "task_name", None), getattr(r, "doc_id", None))
            if self.greedy == "auto":
                need_greedy.append(key == (None, None) or per_doc[key] == 1)
            else:
                need_greedy.append(bool(self.greedy))
        encoded = []
        for context, continuation in args:
            if self.chat:
                context = self._wrap_chat(context)
            if context == "":
                cont = self.tok_encode(continuation, add_special_tokens=False)
                encoded.append(([self.prefix_token_id], cont))
            else:
                encoded.append(self._encode_pair(context, continuation))
        if self.likelihood == "dream" and not self.family.causal:
            # Dream's evaluation appends EOS to the continuation (never masked, so never scored itself)
            encoded = [(ctx, list(cont) + [self.eot_token_id]) for ctx, cont in encoded]
        out = []
        bar = tqdm(total=len(encoded), desc="dllmq loglikelihood", disable=disable_tqdm or not self.progress)
        for req, (context, continuation), (ctx_ids, cont_ids), greedy in zip(requests, args, encoded, need_greedy):
            if self.only is not None and not self.only(req):
                out.append(None)
                bar.update(1)
                continue
            ll, is_greedy = self.score(ctx_ids, cont_ids, greedy=greedy)
            out.append((ll, is_greedy))
            self.cache_hook.add_partial("loglikelihood", (context, continuation), (ll, is_greedy))
            bar.update(1)
        bar.close()
        return out

    def _fit(self, ctx_ids: Sequence[int], cont_ids: Sequence[int]) -> tuple[list[int], list[int]]:
        """Left-truncate the context so context + continuation fit the model (as the harness does)."""
        ctx_ids, cont_ids = list(ctx_ids), list(cont_ids)
        if not cont_ids:
            raise DllmqError("A request has an empty continuation; there is nothing to score.")
        if len(cont_ids) >= self.max_length:
            raise DllmqError(
                f"A continuation of {len(cont_ids)} tokens does not fit the model's {self.max_length}-token window.")
        room = self.max_length - len(cont_ids)
        if len(ctx_ids) > room:
            ctx_ids = ctx_ids[len(ctx_ids) - room:]
        if not ctx_ids:
            ctx_ids = [self.prefix_token_id]
        return ctx_ids, cont_ids

    def score(self, ctx_ids: Sequence[int], cont_ids: Sequence[int], *, greedy: bool = True) -> tuple[float, bool]:
        """(log p(continuation | context), greedy flag) from token ids: what loglikelihood returns."""
        ctx_ids, cont_ids = self._fit(ctx_ids, cont_ids)
        if self.likelihood == "dream" and not self.family.causal and self.nll_type != "mc":
            order = self.nll_type.removeprefix("ar_")   # one row per answer token, deterministic
            ll = dream_ar_loglikelihood(self.model, ctx_ids, cont_ids, order=order, batch_size=self.batch_size)
            return float(ll), False
        if self.likelihood == "dream" and not self.family.causal:
            # Dream's estimator: max(mc_num // batch, 1) batches of batch_size rows, whatever the answer's length
            ll = bernoulli_mc_loglikelihood(self.model, ctx_ids, cont_ids, mc_num=self.mc_num,
                                            batch_size=self.batch_size, seed=self.seed)
            return float(ll), False   # Dream's evaluation never computes the greedy flag
        mc_num = 1 if len(cont_ids) == 1 else self.mc_num
        batch = min(self.batch_size, mc_num)
        ll = loglikelihood(self.model, ctx_ids, cont_ids, mc_num=mc_num, batch_size=batch, cfg=self.cfg,
                           seed=self.seed)
        is_greedy = bool(greedy_matches(self.model, ctx_ids, cont_ids, cfg=self.cfg)) if greedy else False
        return float(ll), is_greedy

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        return [self.score(ctx, cont, greedy=self.greedy is True) for _, ctx, cont in requests]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Sum over disjoint windows of log p(window | preceding text) (Monte Carlo for diffusion)."""
        out = []
        for req in tqdm(requests, desc="dllmq loglikelihood_rolling", disable=disable_tqdm or not self.progress):
            (string,) = req.args
            if self.only is not None and not self.only(req):
                out.append(None)
                continue
            ids = self.tok_encode(string, add_special_tokens=False)
            if not ids:
                out.append(0.0)
                continue
            windows = map(make_disjoint_window, get_rolling_token_windows(
                token_list=ids, prefix_token=self.prefix_token_id, max_seq_len=self.max_length - 1, context_len=1))
            total = sum(self.score(ctx, cont, greedy=False)[0] for ctx, cont in windows)
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
        return out

    # ------------------------------------------------------------------ generation
    def generation_settings(self, max_gen_toks: int | None = None) -> dict:
        """The sampler settings for one request: gen_length / steps / block_length resolved."""
        if self.gen_length or not self.max_new_tokens:
            gen_length = self.gen_length or int(max_gen_toks or 256)
        else:   # Dream's study evaluation: the request's max_gen_toks, capped at max_new_tokens
            gen_length = min(int(max_gen_toks or self.max_new_tokens), self.max_new_tokens)
        name = self.sampler or default_sampler(self.model)
        if name == "causal":
            return {"gen_length": gen_length, "temperature": self.temperature, "top_p": self.top_p,
                    "top_k": self.top_k, "seed": self.seed}
        block = self.block_length or (32 if gen_length % 32 == 0 else gen_length)
        if name == "llada" and gen_length % block:
            gen_length = -(-gen_length // block) * block  # whole blocks, as LLaDA's sampler needs
        settings = {"gen_length": gen_length, "steps": self.steps or gen_length, "temperature": self.temperature,
                    "seed": self.seed}
        if name == "llada":
            settings.update(block_length=block, remasking=self.remasking, cfg=self.cfg)
        else:
            settings.update(alg=self.alg, alg_temp=self.alg_temp, top_p=self.top_p, top_k=self.top_k)
        return settings

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        items = []
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.get("until") or []
            if isinstance(until, str):
                until = [until]
            settings = self.generation_settings(gen_kwargs.get("max_gen_toks"))
            templated = bool(getattr(self.tokenizer, "bos_token", None)) and context.startswith(self.tokenizer.bos_token)
            chat = self.chat and not templated
            text = (format_prompt(self.tokenizer, context, chat=chat) if chat else context) + self.gen_prefix
            items.append((i, text, chat or templated, tuple(until), settings))
        # batch requests that share settings, longest prompt first (less padding), in a fixed order
        order = sorted(items, key=lambda it: (repr(sorted(it[4].items())), it[2], -len(it[1]), it[0]))
        results: dict[int, str] = {}
        bar = tqdm(total=len(items), desc="dllmq generate_until", disable=disable_tqdm or not self.progress)
        pos = 0
        while pos < len(order):
            head = order[pos]
            batch = [head]
            while (len(batch) < self.gen_batch_size and pos + len(batch) < len(order)
                   and order[pos + len(batch)][4] == head[4] and order[pos + len(batch)][2] == head[2]):
                batch.append(order[pos + len(batch)])
            pos += len(batch)
            if self.only is not None and not any(self.only(requests[it[0]]) for it in batch):
                results.update((it[0], None) for it in batch)
                bar.update(len(batch))
                continue
            texts = [it[1] for it in batch]
            ids, mask = encode_prompts(self.tokenizer, texts, chat=head[2])
            if self.add_bos and (not head[2] or self.bos_with_chat) and self.tokenizer.bos_token_id is not None:
                ids, mask = _prepend_bos(ids, mask, int(self.tokenizer.bos_token_id), pad_token_id(self.tokenizer))
            ids, mask = self._fit_prompt(ids, mask, head[4]["gen_length"])
            out = generate(self.model, self.tokenizer, ids, sampler=self.sampler,
                           attention_mask=None if bool(mask.all()) else mask, **head[4])
            for it, row in zip(batch, range(len(batch))):
                stops = it[3] if self.stop_strings else ()   # off: cut at end-of-text only (Dream's study runs)
                text = decode_generation(self.tokenizer, out[row:row + 1], ids.shape[1], stop_strings=stops,
                                         model=self.model)[0]
                results[it[0]] = text
                self.cache_hook.add_partial("generate_until", requests[it[0]].args, text)
            bar.update(len(batch))
        bar.close()
        return [results[i] for i in range(len(items))]

    def _fit_prompt(self, ids: torch.Tensor, mask: torch.Tensor, gen_length: int):
        room = self.max_length - gen_length
        if room < 1:
            raise DllmqError(f"gen_length {gen_length} leaves no room for the prompt in the model's "
                             f"{self.max_length}-token window; lower gen_length.")
        if ids.shape[1] > room:
            log.warning("prompt of %d tokens left-truncated to %d to fit gen_length %d", ids.shape[1], room, gen_length)
            ids, mask = ids[:, -room:], mask[:, -room:]
            if not bool(mask.any(dim=1).all()):
                raise DllmqError("A prompt became all padding after truncation; lower gen_length.")
        return ids, mask


def _prepend_bos(ids: torch.Tensor, mask: torch.Tensor, bos: int, pad: int):
    """Put BOS right before each row's first real token (rows are left-padded)."""
    rows = []
    for row, m in zip(ids.tolist(), mask.tolist()):
        real = [t for t, keep in zip(row, m) if keep]
        if real and real[0] == bos:
            rows.append(real)
        else:
            rows.append([bos] + real)
    width = max(len(r) for r in rows)
    new_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    new_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        new_ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        new_mask[i, width - len(r):] = True
    return new_ids, new_mask


if __name__ != "__main__":  # run as a script, main() imports the module and registers it there
    register_model("dllmq")(DllmqLM)


def main(argv: list[str] | None = None) -> int:
    """lm_eval's own command line with the `dllmq` model registered."""
    from lm_eval.__main__ import cli_evaluate  # lm_eval's own CLI module: only for this entry point

    importlib.import_module("dllmq.evaluate.harness")  # registers "dllmq" under its importable name

    saved = list(sys.argv)
    if argv is not None:
        sys.argv = ["lm_eval", *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    from dllmq.evaluate.harness import main as _main

    raise SystemExit(_main())
