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
