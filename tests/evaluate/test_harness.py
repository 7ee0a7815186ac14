"""The lm-evaluation-harness adapter on random models: equal to direct calls of dllmq.diffusion, and
tiny local tasks (tests/evaluate/data) run end to end through the harness and through run_eval."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import dllmq  # noqa: E402
from dllmq.diffusion import generate_text, greedy_matches, loglikelihood, mc_loglikelihood  # noqa: E402
from dllmq.errors import DllmqError  # noqa: E402
from dllmq.evaluate import harness  # noqa: E402
from dllmq.evaluate import presets as P  # noqa: E402
from dllmq.evaluate.runner import EvalOptions, run_eval  # noqa: E402

DATA = Path(__file__).parent / "data"
TASKS = DATA / "tasks"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny models thrash with more threads on a shared 2-core machine
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def llada():
    return dllmq.load_model("random-llada", seed=1)


@pytest.fixture(scope="module")
def lm(llada):
    model, tok, _ = llada
    return harness.DllmqLM("random-llada", model=model, tokenizer=tok, mc_num=8, batch_size=4, gen_length=16,
                           steps=16, block_length=8, progress=False)


def req(kind, args, task=None, doc_id=None, idx=0):
    return Instance(kind, {}, args, idx, metadata=(task, doc_id, 1))


@pytest.fixture(scope="module")
def task_manager():
    return TaskManager(include_path=str(TASKS), include_defaults=False)


def test_registered_under_dllmq():
    from lm_eval.api.registry import get_model

    assert get_model("dllmq") is harness.DllmqLM


def test_loglikelihood_equals_direct_monte_carlo(lm, llada):
    model, tok, _ = llada
    context, continuation = "Question: what is up?\nAnswer:", " the sky above"
    (ll, is_greedy), = lm.loglikelihood([req("loglikelihood", (context, continuation))])
    ctx_ids = tok(context)["input_ids"]
    cont_ids = tok(context + continuation)["input_ids"][len(ctx_ids):]
    assert cont_ids == tok(continuation)["input_ids"]  # byte-level: the split is the obvious one
    direct = mc_loglikelihood(model, ctx_ids, cont_ids, mc_num=8, batch_size=4, seed=0)
    assert ll == direct
    assert is_greedy == greedy_matches(model, ctx_ids, cont_ids)


def test_single_token_answer_is_exact(lm, llada):
    model, tok, _ = llada
    ctx, cont = tok("Answer:")["input_ids"], tok("B")["input_ids"]
    assert len(cont) == 1
    (one, _), = lm.loglikelihood([req("loglikelihood", ("Answer:", "B"))])
    exact = mc_loglikelihood(model, ctx, cont, mc_num=1, batch_size=1)
    assert one == exact  # scored with mc_num=1 ...
    # ... which is what any mc_num gives: every draw masks the one token
    assert abs(mc_loglikelihood(model, ctx, cont, mc_num=8, batch_size=4) - exact) < 1e-4


def test_greedy_flag_only_where_a_task_can_read_it(lm, llada, monkeypatch):
    calls = []
    real = harness.DllmqLM.score

    def spy(self, ctx, cont, *, greedy=True):
        calls.append(greedy)
        return real(self, ctx, cont, greedy=greedy)

    monkeypatch.setattr(harness.DllmqLM, "score", spy)
    choices = [req("loglikelihood", ("Q:", f" {c}"), "mc", 7, i) for i, c in enumerate("ab")]
    single = req("loglikelihood", ("Q:", " c"), "ll", 3)
    out = lm.loglikelihood(choices + [single])
    assert calls == [False, False, True]
    assert out[0][1] is False and out[1][1] is False


def test_dream_loglikelihood_prepends_bos_and_matches():
    model, tok, _ = dllmq.load_model("random-dream", seed=2)
    lm = harness.DllmqLM("random-dream", model=model, tokenizer=tok, mc_num=4, batch_size=4, progress=False)
    assert lm.add_bos
    (ll, _), = lm.loglikelihood([req("loglikelihood", ("Hi", " there"))])
    ctx = [tok.bos_token_id] + tok("Hi")["input_ids"]
    cont = tok(" there")["input_ids"]
    assert ll == loglikelihood(model, ctx, cont, mc_num=4, batch_size=4, seed=0)


def test_generate_until_equals_direct_generation(lm, llada):
    model, tok, _ = llada
    contexts = ["Once upon a time", "Hello"]
    outs = lm.generate_until([req("generate_until", (c, {"until": ["\n\n"]})) for c in contexts])
    for c, o in zip(contexts, outs):
        direct = generate_text(model, tok, [c], stop_strings=["\n\n"], gen_length=16, steps=16, block_length=8)[0]
        assert o == direct


def test_generate_until_batches_and_keeps_request_order(llada):
    model, tok, _ = llada
    lm3 = harness.DllmqLM("random-llada", model=model, tokenizer=tok, gen_batch_size=3, gen_length=16, steps=16,
                          block_length=8, progress=False)
    contexts = ["a much longer prompt here", "mid prompt", "short"]  # already longest first
    outs = lm3.generate_until([req("generate_until", (c, {"until": []})) for c in contexts])
    direct = generate_text(model, tok, contexts, gen_length=16, steps=16, block_length=8)
    assert outs == direct
    reordered = lm3.generate_until([req("generate_until", (c, {"until": []})) for c in reversed(contexts)])
    assert reordered == list(reversed(direct))


def test_stop_sequences_are_honoured(lm):
    full, = lm.generate_until([req("generate_until", ("Once upon a time", {"until": []}))])
    assert len(full) > 4
    stop = full[3:5]
    cut, = lm.generate_until([req("generate_until", ("Once upon a time", {"until": [stop]}))])
    assert cut == full[: full.index(stop)]


def test_gen_length_follows_request_when_not_set(llada):
    model, tok, _ = llada
    lm = harness.DllmqLM("random-llada", model=model, tokenizer=tok, progress=False)
    s = lm.generation_settings(max_gen_toks=20)
    assert s["gen_length"] == 20 and s["block_length"] == 20 and s["steps"] == 20
    s = lm.generation_settings(max_gen_toks=64)
    assert (s["gen_length"], s["block_length"], s["steps"]) == (64, 32, 64)


def test_loglikelihood_rolling_is_a_finite_bound(lm):
    out = lm.loglikelihood_rolling([req("loglikelihood_rolling", ("some text to score",))])
    assert len(out) == 1 and out[0] < 0 and torch.isfinite(torch.tensor(out[0]))


def test_tiny_tasks_end_to_end_through_simple_evaluate(task_manager, llada):
    results = lm_eval.simple_evaluate(
        model="dllmq", model_args="pretrained=random-llada,mc_num=4,batch_size=4,gen_length=16,steps=16,progress=false",
        tasks=["dllmq_tiny_mc", "dllmq_tiny_gen"], task_manager=task_manager, log_samples=True,
        bootstrap_iters=0, device="cpu")
    mc, gen = results["results"]["dllmq_tiny_mc"], results["results"]["dllmq_tiny_gen"]
    assert 0.0 <= mc["acc,none"] <= 1.0 and "acc_norm,none" in mc
    assert 0.0 <= gen["exact_match,none"] <= 1.0
    assert results["n-samples"]["dllmq_tiny_mc"]["effective"] == 4
    assert results["n-samples"]["dllmq_tiny_gen"]["effective"] == 3
    # a logged likelihood equals a direct Monte Carlo call with the same seed
    model, tok, _ = dllmq.load_model("random-llada")
    sample = results["samples"]["dllmq_tiny_mc"][0]
    context, continuation = sample["arguments"][0]
    ctx = tok(context)["input_ids"]
    cont = tok(context + continuation)["input_ids"][len(ctx):]
    assert sample["resps"][0][0][0] == mc_loglikelihood(model, ctx, cont, mc_num=4, batch_size=4, seed=0)
    # a logged generation equals a direct generation, cut at the task's stop strings
    gsample = results["samples"]["dllmq_tiny_gen"][0]
    prompt = gsample["arguments"][0][0]
    direct = generate_text(model, tok, [prompt], stop_strings=["\n", "Question:"], gen_length=16, steps=16,
                           block_length=16)[0]
    assert gsample["resps"][0][0] == direct


def test_harness_cli_runs_with_dllmq_model(tmp_path, monkeypatch):
    original = TaskManager.__init__
    monkeypatch.setattr(TaskManager, "__init__",
                        lambda self, *a, **k: original(self, *a, **{**k, "include_defaults": False}))
    harness.main(["--model", "dllmq", "--model_args", "pretrained=random-llada,mc_num=4,progress=false",
                  "--batch_size", "4", "--device", "cpu", "--tasks", "dllmq_tiny_mc", "--include_path", str(TASKS),
                  "--limit", "2", "--output_path", str(tmp_path)])
    files = list(tmp_path.rglob("results_*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert "acc,none" in data["results"]["dllmq_tiny_mc"]


def test_run_eval_writes_results_with_provenance(tmp_path, llada):
    out = tmp_path / "res" / "results.json"
    report = run_eval(llada[:2], "dllmq_tiny_mc,dllmq_tiny_hub",
                      EvalOptions(include_path=TASKS, include_defaults=False, data_dir=DATA / "hub", offline=True,
                                  out=out, log_samples=True, model_name="random-llada",
                                  overrides={"mc_num": 4, "gen_length": 16}, progress=False, limit=2))
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(report, default=str))
    t = saved["tasks"]["dllmq_tiny_mc"]
    assert t["metric"] == "acc,none" and 0 <= t["value"] <= 1 and t["n_samples"] == 2 and t["n_total"] == 4
    assert t["stderr"] is not None and t["settings"]["mc_num"] == 4
    assert saved["tasks"]["dllmq_tiny_hub"]["n_samples"] == 2
    prov = saved["provenance"]
    assert prov["limit"] == 2 and prov["seed"] == 0 and prov["data_dir"].endswith("hub")
    assert {"dllmq", "torch", "transformers", "lm_eval"} <= set(prov["versions"])
    assert saved["model"]["family"] == "llada" and saved["model"]["quantization_config"] is None
    rows = [json.loads(line) for line in Path(prov["samples_file"]).read_text().splitlines()]
    assert {r["task"] for r in rows} == {"dllmq_tiny_mc", "dllmq_tiny_hub"}
    assert not list(out.parent.glob(".*tmp"))  # nothing half-written left behind


def test_run_eval_on_a_quantized_directory_records_its_quantization_config(tmp_path):
    from dllmq.quant import QuantConfig, quantize, save_quantized

    model, tok, _ = dllmq.load_model("random-llada", seed=3)
    quantize(model, tok, QuantConfig(method="rtn", wbits=4, group_size=32, nsamples=2, seqlen=32), progress=False)
    path = save_quantized(model, tok, tmp_path / "q")
    options = EvalOptions(include_path=TASKS, include_defaults=False, limit=1, overrides={"mc_num": 2}, progress=False)
    report = run_eval(str(path), "dllmq_tiny_mc", options)
    qc = report["model"]["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["bits"] == 4 and "dllmq" in qc
    assert report["model"]["path"] == str(path)
    in_memory = run_eval((model, tok), "dllmq_tiny_mc", options)
    assert in_memory["model"]["quantization_config"] == qc
    assert in_memory["tasks"]["dllmq_tiny_mc"]["metrics"] == report["tasks"]["dllmq_tiny_mc"]["metrics"]


def test_missing_dataset_offline_is_one_clear_error():
    with pytest.raises(DllmqError) as err:
        run_eval("random-llada", "dllmq_tiny_hub",
                 EvalOptions(include_path=TASKS, include_defaults=False, offline=True))
    msg = str(err.value)
    assert "dllmq-test/tiny_qa" in msg and "--data-dir" in msg and "dllmq_tiny_hub" in msg


def test_code_tasks_need_the_opt_in():
    with pytest.raises(DllmqError, match="allow-code-execution"):
        run_eval("random-llada", "code", EvalOptions(include_defaults=False))


def test_humaneval_runs_offline_through_the_sandbox(tmp_path, llada):
    report = run_eval(llada[:2], "humaneval",
                      EvalOptions(allow_code_execution=True, include_defaults=False, offline=True, limit=2,
                                  overrides={"gen_length": 16}, out=tmp_path / "he.json", log_samples=True,
                                  progress=False))
    t = report["tasks"]["humaneval"]
    assert t["metric"] == "pass@1,sandbox" and t["value"] == 0.0 and t["n_samples"] == 2 and t["n_total"] == 164
    assert report["provenance"]["sandbox"]["guard"] is True
    rows = [json.loads(line) for line in Path(report["provenance"]["samples_file"]).read_text().splitlines()]
    assert rows[0]["filtered_resps"][0]["status"] != "passed"


def test_presets_match_the_reference_table():
    assert P.resolve_tasks("general") == ["mmlu", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "piqa"]
    assert P.resolve_tasks("math,code") == ["gsm8k", "minerva_math", "humaneval", "mbpp"]
    assert len(P.resolve_tasks("all")) == 10 and P.resolve_tasks("gsm8k,math") == ["gsm8k", "minerva_math"]
    llada = {t: P.model_settings(P.preset_for(t), "llada") for t in P.GROUPS["all"]}
    assert llada["mmlu"]["mc_num"] == 1 and P.preset_for("mmlu").num_fewshot == 5
    assert all(llada[t]["mc_num"] == 128 for t in ("arc_easy", "arc_challenge", "hellaswag", "winogrande", "piqa"))
    assert (llada["gsm8k"]["gen_length"], llada["gsm8k"]["steps"], llada["gsm8k"]["block_length"]) == (256, 256, 32)
    assert llada["minerva_math"]["block_length"] == 64 and P.preset_for("gsm8k").num_fewshot == 4
    assert llada["humaneval"]["gen_length"] == 512 and P.preset_for("mbpp").num_fewshot == 3
    dream = P.model_settings(P.preset_for("gsm8k"), "dream")
    assert dream["gen_length"] == 256 and dream["steps"] == 256 and dream["alg"] == "entropy" and "block_length" not in dream
    over = P.model_settings(P.preset_for("gsm8k"), "llada", {"gen_length": 16, "mc_num": None})
    assert (over["gen_length"], over["steps"], over["block_length"]) == (16, 16, 16)
    with pytest.raises(DllmqError):
        P.model_settings(P.preset_for("gsm8k"), "llada", {"bogus": 1})


class OracleLM(lm_eval.api.model.LM):
    """Answers every generation request with a fixed completion per prompt (no model)."""

    def __init__(self, answers):
        super().__init__()
        self.answers = answers

    def generate_until(self, requests, disable_tqdm=False):
        return [self.answers[r.args[0]] for r in requests]

    def loglikelihood(self, requests, disable_tqdm=False):
        raise NotImplementedError

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        raise NotImplementedError


def test_sandboxed_humaneval_scores_correct_and_wrong_completions():
    from dllmq.evaluate.humaneval import humaneval_problems, humaneval_task

    problems = humaneval_problems()[:4]
    answers = {p["prompt"]: p["canonical_solution"] for p in problems[:3]}
    answers[problems[3]["prompt"]] = "    return None\n"
    tm = TaskManager(include_defaults=False)
    results = lm_eval.simple_evaluate(model=OracleLM(answers), tasks=[humaneval_task(allow_code_execution=True)],
                                      task_manager=tm, limit=4, confirm_run_unsafe_code=True, bootstrap_iters=0)
    assert results["results"]["humaneval"]["pass@1,sandbox"] == 0.75


def test_mbpp_from_data_dir_through_the_sandbox(llada):
    report = run_eval(llada[:2], "mbpp", EvalOptions(allow_code_execution=True, include_defaults=False,
                                                     data_dir=DATA / "hub", offline=True, overrides={"gen_length": 16},
                                                     progress=False))
    t = report["tasks"]["mbpp"]
    assert t["n_samples"] == 1 and t["value"] == 0.0 and t["num_fewshot"] == 3


def test_paper_tasks_run_on_local_data_with_their_presets(llada):
    """The harness's own arc_easy and gsm8k tasks, their data from --data-dir (tests/evaluate/data/hub holds
    a few made-up rows in the Hub datasets' schema), with the presets' shots and headline metrics."""
    report = run_eval(llada[:2], "arc_easy,gsm8k",
                      EvalOptions(data_dir=DATA / "hub", offline=True, overrides={"mc_num": 2, "gen_length": 16},
                                  progress=False))
    arc, gsm = report["tasks"]["arc_easy"], report["tasks"]["gsm8k"]
    assert arc["metric"] == "acc,none" and arc["n_samples"] == 2 and arc["num_fewshot"] == 0
    assert gsm["metric"] == "exact_match,flexible-extract" and gsm["n_samples"] == 2 and gsm["num_fewshot"] == 4
    assert "exact_match,strict-match" in gsm["metrics"]
    assert gsm["settings"]["steps"] == 16 and gsm["settings"]["block_length"] == 16
