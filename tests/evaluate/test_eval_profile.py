"""`--profile paper` for evaluation: Dream's likelihood estimator against a literal re-statement of the
study's lm-eval model (`lm_eval/models/dream_base.py`: `_forward_process`, `_eval_target_nll_mc`,
`_encode_pair`), the paper presets for Dream, and the CLI's answer to a bad profile."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

import dllmq  # noqa: E402
from dllmq.cli import main  # noqa: E402
from dllmq.diffusion import bernoulli_mc_loglikelihood  # noqa: E402
from dllmq.diffusion.logits import raw_logits  # noqa: E402
from dllmq.evaluate import harness  # noqa: E402
from dllmq.evaluate import presets as P  # noqa: E402


@pytest.fixture(scope="module")
def dream():
    model, tok, _ = dllmq.load_model("random-dream", dtype="float32")
    return model, tok


def study_dream_nll_mc(model, prefix, target, mc_num, batch_size, eps, generator, mask_id):
    """dream_base._eval_target_nll_mc with log_type 'ftb' and its _forward_process; the global RNG
    replaced by `generator`, drawn in the same order; get_logits' shift written out."""
    seq = torch.cat([prefix, target])[None, :].repeat((batch_size, 1))
    loss_acc = []
    for _ in range(max(mc_num // batch_size, 1)):
        perturbed_seq = seq.clone()
        b, l = seq.shape
        u0 = torch.rand(1, generator=generator, dtype=torch.float32)
        indices = torch.arange(b).float()
        t = (u0 + indices / b) % 1
        p_mask = (1 - eps) * t + eps
        p_mask = p_mask[:, None].repeat(1, l)
        mask_indices = torch.rand((b, l), generator=generator) < p_mask
        mask_indices[:, 0] = False
        mask_indices[:, -1] = False
        noisy_batch = torch.where(mask_indices, mask_id, seq)
        perturbed_seq[:, -len(target):] = noisy_batch[:, -len(target):]
        mask_indices = perturbed_seq == mask_id
        logits = raw_logits(model, perturbed_seq)
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        loss = F.cross_entropy(logits[mask_indices], seq[mask_indices], reduction="none") / p_mask[mask_indices]
        loss_acc.append(loss.sum().item() / batch_size)
    return -sum(loss_acc) / len(loss_acc)


@pytest.mark.parametrize("mc_num, batch", [(8, 4), (1, 4), (6, 3)])
def test_bernoulli_estimator_is_dreams(dream, mc_num, batch):
    model, _ = dream
    prefix, target = torch.tensor([256, 17, 40, 41, 9]), torch.tensor([33, 34, 35, 257])
    ours = bernoulli_mc_loglikelihood(model, prefix, target, mc_num=mc_num, batch_size=batch, seed=5)
    theirs = study_dream_nll_mc(model, prefix, target, mc_num, batch, 1e-3, torch.Generator().manual_seed(5),
                                model.config.mask_token_id)
    assert ours == pytest.approx(theirs, rel=1e-5)


def test_paper_presets_for_dream_only():
    gsm = P.model_settings(P.preset_for("gsm8k"), "dream", profile="paper")
    assert (gsm["temperature"], gsm["top_p"], gsm["alg"], gsm["stop_strings"]) == (0.0, 0.95, "entropy", False)
    mmlu = P.model_settings(P.preset_for("mmlu"), "dream", profile="paper")
    assert (mmlu["likelihood"], mmlu["mc_num"], mmlu["batch_size"]) == ("dream", 1, 32)
    for task in P.GROUPS["all"]:   # LLaDA's presets are the study's already
        assert P.model_settings(P.preset_for(task), "llada", profile="paper") == \
            P.model_settings(P.preset_for(task), "llada")
    assert "likelihood" not in P.model_settings(P.preset_for("piqa"), "dream")
    with pytest.raises(dllmq.errors.DllmqError, match="Unknown profile"):
        P.model_settings(P.preset_for("piqa"), "dream", profile="exact")


def test_dream_likelihood_appends_eos_and_scores_with_dreams_estimator(dream):
    model, tok = dream
    lm = harness.DllmqLM("random-dream", model=model, tokenizer=tok, mc_num=4, batch_size=2, likelihood="dream",
                         progress=False)
    (ll, greedy), = lm.loglikelihood([Instance("loglikelihood", {}, ("The cat", " sat"), 0)])
    ctx, cont = lm._encode_pair("The cat", " sat")
    ctx, cont = lm._fit(ctx, cont + [lm.eot_token_id])
    assert greedy is False
    assert ll == pytest.approx(bernoulli_mc_loglikelihood(model, ctx, cont, mc_num=4, batch_size=2, seed=0))
    assert lm.settings()["likelihood"] == "dream"
    with pytest.raises(dllmq.errors.DllmqError, match="likelihood must be llada or dream"):
        harness.DllmqLM("random-dream", model=model, tokenizer=tok, likelihood="exact")


def test_eval_bad_profile_is_one_sentence(capsys):
    assert main(["eval", "random-llada", "--tasks", "piqa", "--profile", "exact"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: Unknown --profile 'exact'; choose dllmq or paper."


# -- item 9: Dream's autoregressive-order variants (nll_type ar_ftb / ar_btf) ----------------------------
def study_dream_nll_ar(model, prefix, target, nll_type, batch_size, mask_id):
    """dream_base._eval_target_nll_ar with log_type 'ftb' (its default), line by line; get_logits' shift
    written out."""
    prefix, target = prefix.unsqueeze(0), target.unsqueeze(0)
    perturbed_ = target.repeat(target.shape[1], 1).clone().contiguous()
    mask_index = torch.ones((perturbed_.shape[1], perturbed_.shape[1]), dtype=torch.bool)
    mask_index = torch.triu(mask_index) if nll_type == "ar_ftb" else torch.tril(mask_index)
    perturbed_[mask_index] = mask_id
    perturbed_seq = torch.cat([prefix.repeat(perturbed_.shape[0], 1), perturbed_], dim=-1)
    logits_ = []
    num = -(-len(perturbed_seq) // batch_size)
    for i in range(num):
        chunk = perturbed_seq[i * batch_size: min((i + 1) * batch_size, len(perturbed_seq))]
        logits = raw_logits(model, chunk)
        logits_.append(torch.cat([logits[:, :1], logits[:, :-1]], dim=1))
    logits = torch.cat(logits_, dim=0)
    temp_index = torch.ones((perturbed_.shape[1], perturbed_.shape[1]), dtype=torch.bool)
    temp_index = torch.triu(temp_index, diagonal=1) if nll_type == "ar_ftb" else torch.tril(temp_index, diagonal=-1)
    mask_index[temp_index] = False
    logits_index = torch.cat([torch.zeros((perturbed_.shape[1], prefix.shape[1]), dtype=torch.bool), mask_index],
                             dim=-1)
    return -F.cross_entropy(logits[logits_index], target[0], reduction="sum").item()


@pytest.mark.parametrize("nll_type, batch", [("ar_ftb", 2), ("ar_btf", 3), ("ar_ftb", 32)])
def test_autoregressive_order_estimators_are_dreams(dream, nll_type, batch):
    from dllmq.diffusion import dream_ar_loglikelihood
    model, _ = dream
    prefix, target = torch.tensor([256, 17, 40, 41, 9]), torch.tensor([33, 34, 35, 36, 257])
    theirs = study_dream_nll_ar(model, prefix, target, nll_type, batch, model.config.mask_token_id)
    ours = dream_ar_loglikelihood(model, prefix, target, order=nll_type[3:], batch_size=batch)
    assert ours == pytest.approx(theirs, rel=1e-5)
    other = "ar_btf" if nll_type == "ar_ftb" else "ar_ftb"    # the two orders are different estimators
    assert abs(study_dream_nll_ar(model, prefix, target, other, batch, model.config.mask_token_id) - ours) > 1e-3


def test_harness_nll_type_picks_the_dream_variant(dream):
    from dllmq.diffusion import dream_ar_loglikelihood
    model, tok = dream
    lm = harness.DllmqLM("random-dream", model=model, tokenizer=tok, batch_size=4, likelihood="dream",
                         nll_type="ar_btf", progress=False)
    (ll, greedy), = lm.loglikelihood([Instance("loglikelihood", {}, ("The cat", " sat on"), 0)])
    ctx, cont = lm._encode_pair("The cat", " sat on")
    ctx, cont = lm._fit(ctx, cont + [lm.eot_token_id])     # EOS appended, as for mc
    assert greedy is False and ll == pytest.approx(dream_ar_loglikelihood(model, ctx, cont, order="btf"))
    assert lm.settings()["nll_type"] == "ar_btf"
    plain = harness.DllmqLM("random-dream", model=model, tokenizer=tok, likelihood="dream", progress=False)
    assert "nll_type" not in plain.settings()      # provenance of mc runs reads as before
    with pytest.raises(dllmq.errors.DllmqError, match="needs likelihood=dream"):
        harness.DllmqLM("random-dream", model=model, tokenizer=tok, nll_type="ar_ftb")
    with pytest.raises(dllmq.errors.DllmqError, match="nll_type must be mc, ar_ftb, ar_btf"):
        harness.DllmqLM("random-dream", model=model, tokenizer=tok, likelihood="dream", nll_type="ar")
    settings = P.model_settings(P.preset_for("piqa"), "dream", {"nll_type": "ar_ftb"}, profile="paper")
    assert settings["nll_type"] == "ar_ftb" and settings["likelihood"] == "dream"


# -- item 10: Dream's generation lengths as the study ran them ------------------------------------------
def test_paper_dream_generation_lengths_are_the_studys(dream):
    """AutoGPTQ/quantize.py and llm-awq/entry.py defaults (--max_new_tokens 768 --diffusion_steps 512,
    temperature 0, top_p 0.95) for math and MBPP; scripts/dream_gptq_code.sh for HumanEval (128 / 128,
    temperature 0.08, top_p 0.9, alg_temp 0, chat template, 0-shot)."""
    for task in ("gsm8k", "minerva_math", "mbpp"):
        s = P.model_settings(P.preset_for(task), "dream", profile="paper")
        assert "gen_length" not in s and (s["max_new_tokens"], s["steps"]) == (768, 512)
        assert (s["temperature"], s["top_p"], s["stop_strings"]) == (0.0, 0.95, False)
    he = P.model_settings(P.preset_for("humaneval"), "dream", profile="paper")
    assert (he["max_new_tokens"], he["steps"], he["temperature"], he["top_p"], he["alg_temp"], he["chat"]) == \
        (128, 128, 0.08, 0.9, 0.0, True) and P.num_fewshot(P.preset_for("humaneval")) == 0
    assert "max_new_tokens" not in P.model_settings(P.preset_for("gsm8k"), "dream")   # dllmq's presets as before
    # dream_base.generate_until: min(gen_kwargs.get("max_gen_toks", max_new_tokens), max_new_tokens)
    model, tok = dream
    lm = harness.DllmqLM("random-dream", model=model, tokenizer=tok, max_new_tokens=768, steps=512, progress=False)
    for asked in (None, 256, 1024):
        expect = min(768 if asked is None else asked, 768)
        got = lm.generation_settings(asked)
        assert (got["gen_length"], got["steps"]) == (expect, 512)
    assert lm.settings()["max_new_tokens"] == 768
    plain = harness.DllmqLM("random-dream", model=model, tokenizer=tok, progress=False)
    assert "max_new_tokens" not in plain.settings() and plain.generation_settings(None)["gen_length"] == 256
    given = harness.DllmqLM("random-dream", model=model, tokenizer=tok, max_new_tokens=768, gen_length=40,
                            progress=False)
    assert given.generation_settings(1024)["gen_length"] == 40     # an explicit length wins
