"""The command line: each bad input is one sentence on stderr and exit code 2, never a traceback."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from dllmq.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(capsys, argv, *fragments):
    code, out, err = run(capsys, *argv)
    assert code == 2, (code, out, err)
    assert "Traceback" not in err
    line = err.strip()
    assert line.startswith("error: ") and "\n" not in line, err
    for fragment in fragments:
        assert fragment in line, line


def test_inspect_builtin_and_real_configs(capsys):
    code, out, _ = run(capsys, "inspect", "random-llada")
    assert code == 0 and "llada" in out and "W4-g128" in out
    code, out, _ = run(capsys, "inspect", "dream-7b", "--json")
    data = json.loads(out)
    assert data["kv_heads"] == 4 and data["shift_logits"] is True
    assert data["memory_bytes"]["W4-g128"] < 0.4 * data["memory_bytes"]["bf16"]


def test_inspect_directory_reads_only_the_config(capsys, tmp_path):
    from dllmq.models.config import real_config
    (tmp_path / "config.json").write_text(json.dumps(real_config("llada-8b")))   # no weights at all
    code, out, _ = run(capsys, "inspect", str(tmp_path))
    assert code == 0 and "8,015,581,184" in out


def test_missing_directory(capsys, tmp_path):
    assert_user_error(capsys, ["inspect", str(tmp_path / "nope")], "No model directory")


def test_missing_config(capsys, tmp_path):
    assert_user_error(capsys, ["generate", str(tmp_path), "--prompt", "hi"], "config.json")


def test_unknown_model_type(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert_user_error(capsys, ["inspect", str(tmp_path)], "gpt2")


@pytest.fixture
def checkpoint(saved_llada):
    return saved_llada[0]


def test_missing_tensor(capsys, checkpoint):
    path = checkpoint / "model.safetensors"
    tensors = load_file(str(path))
    del tensors["model.transformer.blocks.1.up_proj.weight"]
    save_file(tensors, str(path))
    assert_user_error(capsys, ["generate", str(checkpoint), "--prompt", "hi", "--gen-length", "8"],
                      "blocks.1.up_proj.weight")


def test_truncated_safetensors(capsys, checkpoint):
    path = checkpoint / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert_user_error(capsys, ["ppl", str(checkpoint), "--data", str(path.parent / "config.json")], "truncated")


def test_shape_mismatch(capsys, checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    config["mlp_hidden_size"] = 512
    (checkpoint / "config.json").write_text(json.dumps(config))
    assert_user_error(capsys, ["generate", str(checkpoint), "--prompt", "hi"], "shape")


def test_pickle_weights_are_refused(capsys, checkpoint):
    (checkpoint / "model.safetensors").unlink()
    (checkpoint / "pytorch_model.bin").write_bytes(b"not unpickled")
    assert_user_error(capsys, ["generate", str(checkpoint), "--prompt", "hi"], "never unpickles")


def test_generation_setting_errors(capsys):
    assert_user_error(capsys, ["generate", "random-llada", "--prompt", "hi", "--gen-length", "64",
                               "--block-length", "24"], "multiple of block_length")
    assert_user_error(capsys, ["generate", "random-llada", "--prompt", "hi", "--gen-length", "64",
                               "--block-length", "32", "--steps", "33"], "steps")
    assert_user_error(capsys, ["generate", "random-llada", "--prompt", "   "], "prompt")


def test_ppl_bad_data(capsys, tmp_path):
    assert_user_error(capsys, ["ppl", "random-dream", "--data", str(tmp_path / "none.txt")], "none.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert_user_error(capsys, ["ppl", "random-dream", "--data", str(empty)], "empty")


def test_generate_and_ppl_run(capsys, tmp_path):
    code, out, _ = run(capsys, "generate", "random-llada", "--prompt", "Hello", "--gen-length", "16",
                       "--steps", "8", "--block-length", "8")
    assert code == 0
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    code, out, _ = run(capsys, "ppl", "random-dream", "--data", str(text), "--seqlen", "64", "--mc-num", "2",
                       "--max-windows", "2")
    assert code == 0 and "ppl" in out and "bound" in out


def test_console_script_exit_code(tmp_path):
    """The installed entry point, in a real process: exit 2 and one line, no traceback."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2] / "src"))
    proc = subprocess.run([sys.executable, "-m", "dllmq.cli", "inspect", str(tmp_path / "x")],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


def test_python_dash_m_dllmq_is_the_command():
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2] / "src"))
    proc = subprocess.run([sys.executable, "-m", "dllmq", "--help"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and "quantize" in proc.stdout and "study" in proc.stdout


def test_eval_mini_tasks_on_a_builtin_model(capsys, tmp_path):
    out = tmp_path / "mini.json"
    code = main(["eval", "random-llada", "--tasks", "mini_general,mini_math", "--limit", "2", "--out", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    assert set(data["tasks"]) == {"mini_general", "mini_math"}
    assert all(r["n"] == 2 and 0 <= r["acc"] <= 1 for r in data["tasks"].values())
    # mini_general also reports lm-eval's length-normalised accuracy, printed and stored
    assert 0 <= data["tasks"]["mini_general"]["acc_norm"] <= 1 and "acc_norm" not in data["tasks"]["mini_math"]
    assert "acc_norm" in capsys.readouterr().out


def test_kv_cache_is_opt_in_and_recorded(capsys, tmp_path):
    out = tmp_path / "mini.json"
    assert main(["eval", "random-llada", "--tasks", "mini_math", "--limit", "2", "--kv-cache", "dual",
                 "--out", str(out)]) == 0
    assert "approximate decoding" in capsys.readouterr().err
    assert json.loads(out.read_text())["kv_cache"] == "dual"
    code, text, _ = run(capsys, "generate", "random-llada", "--prompt", "hi", "--gen-length", "8", "--block-length",
                        "4", "--kv-cache", "prefix")
    assert code == 0 and text.strip() != ""


def test_import_dllmq_and_help_load_no_torch():
    """`import dllmq` and `dllmq --help` stay light; the top-level names still resolve on first use, and the
    help that loads no subcommand module lists the same commands as the full parser."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2] / "src"))
    code = ("import sys, contextlib, io, dllmq\nfrom dllmq.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try:\n        main(['--help'])\n    except SystemExit:\n        pass\n"
            "print([m for m in ('torch', 'transformers', 'lm_eval') if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", (proc.stdout, proc.stderr)
    import dllmq
    from dllmq.api import load_model
    from dllmq.cli import build_parser
    from dllmq.models.loading import save_model
    assert dllmq.load_model is load_model and dllmq.save_model is save_model
    assert build_parser().format_help() == build_parser("").format_help()


# ----------------------------------------------------------------------------- refused before the model loads
@pytest.fixture
def no_model_load(monkeypatch):
    """The bad inputs below must be refused before any model is loaded: loading one fails the test."""
    import dllmq.cli.common as common

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")
    monkeypatch.setattr(common, "load_model", refuse)


def counts_and_windows(tmp_path) -> list:
    """Non-positive counts, out-of-range numbers and windows longer than the model's context, per subcommand."""
    out = str(tmp_path / "out")
    prompt = ["generate", "--prompt", "hi"]
    return [
        (prompt + ["--steps", "0"], "--steps must be at least 1 (leave it out for one step per generated token)"),
        (prompt + ["--steps", "-3"], "--steps must be at least 1"),
        (prompt + ["--gen-length", "0"], "--gen-length must be at least 1"),
        (prompt + ["--block-length", "0"], "--block-length must be at least 1"),
        (prompt + ["--top-k", "0"], "--top-k must be at least 1"),
        (prompt + ["--top-p", "1.5"], "--top-p must be in (0, 1]"),
        (prompt + ["--temperature", "-1"], "--temperature must be at least 0"),
        (prompt + ["--cfg", "-0.5"], "--cfg must be at least 0"),
        (prompt + ["--gen-length", "64", "--block-length", "24"], "multiple of block_length"),
        (["generate", "random-dream", "--prompt", "hi", "--kv-cache", "dual"], "needs LLaDA's block-wise sampler"),
        (["eval", "--tasks", "gsm8k", "--kv-cache", "prefix"], "applies to the mini generation tasks only"),
        (prompt + ["--dtype", "int3"], "Unknown dtype"),
        (["ppl", "--seqlen", "1"], "--seqlen must be at least 2"),
        (["ppl", "--mc-num", "0"], "--mc-num must be at least 1"),
        (["ppl", "--batch-size", "0"], "--batch-size must be at least 1"),
        (["ppl", "--max-windows", "0"], "--max-windows must be at least 1"),
        (["ppl", "--seqlen", "4096"], "longer than the model's context of 1024"),
        (["eval", "--tasks", "mini_code", "--limit", "0"], "--limit must be a positive number"),
        (["eval", "--tasks", "mini_general", "--limit", "-1"], "--limit must be a positive number"),
        (["eval", "--tasks", "mini_math", "--limit", "0.5"], "not a whole number"),
        (["eval", "--tasks", "general", "--limit", "0"], "--limit must be a positive number"),
        (["eval", "--tasks", "gsm8k", "--limit", "2.5"], "whole number"),
        (["eval", "--tasks", "gsm8k", "--mc-num", "0"], "--mc-num must be at least 1"),
        (["eval", "--tasks", "gsm8k", "--steps", "0"], "--steps must be at least 1"),
        (["eval", "--tasks", "gsm8k", "--gen-length", "-4"], "--gen-length must be at least 1"),
        (["eval", "--tasks", "gsm8k", "--num-fewshot", "-1"], "--num-fewshot must be at least 0"),
        (["eval", "--tasks", "humaneval", "--sandbox-workers", "0"], "--sandbox-workers must be at least 1"),
        (["eval", "--tasks", "mini", "--limit", "inf"], "--limit must be a positive number"),
        (["eval", "--tasks", "mini", "--data-dir", str(tmp_path / "nowhere")], "--data-dir"),
        (["eval", "--tasks", "gsm8k", "--include-path", str(tmp_path / "nowhere")], "--include-path"),
        (["bench", "--steps", "0"], "--steps must be at least 1"),
        (["bench", "--repeats", "0"], "--repeats must be at least 1"),
        (["bench", "--batch", "0"], "--batch must be at least 1"),
        (["bench", "--threads", "0"], "--threads must be at least 1"),
        (["bench", "--seq-len", "2048"], "longer than the model's context of 1024"),
        (["bench", "--seq-len", "64", "--gen-length", "64"], "--gen-length must be between 1 and --seq-len - 1"),
        (["bench", "--seq-len", "128", "--gen-length", "64", "--block-length", "32", "--steps", "3"], "steps (3)"),
        (["outliers", "--nsamples", "0", "--out", out], "--nsamples must be at least 1"),
        (["outliers", "--batch-size", "0", "--out", out], "--batch-size must be at least 1"),
        (["outliers", "--normal-min-frac", "0", "--out", out], "--normal-min-frac must be in (0, 1]"),
        (["outliers", "--massive-threshold", "0", "--out", out], "--massive-threshold must be positive"),
        (["outliers", "--seqlen", "4096", "--out", out], "longer than the model's context of 1024"),
        (["outliers", "--calib", str(tmp_path / "none.txt"), "--out", out], "none.txt"),
        (["quantize", "--method", "gptq", "--calib", str(tmp_path / "none.txt"), "--seqlen", "4096", "--out", out],
         "none.txt"),    # the missing file is named, not the window that is also wrong
        (["quantize", "--method", "awq", "--calib", str(tmp_path / "notes.csv"), "--out", out], "neither .txt"),
        (["quantize", "--method", "gptq", "--seqlen", "4096", "--out", out], "longer than the model's context"),
        (["study", "--limit", "0", "--dry-run"], "--limit must be a positive number"),
    ]


def test_usage_errors_are_one_sentence_too(capsys, no_model_load):
    """argparse's own errors (unknown flag, wrong type, unknown choice) keep exit code 2 and become one line."""
    assert_user_error(capsys, ["generate", "--prompt", "hi", "--steps", "many"], "dllmq generate: argument --steps",
                      "see dllmq generate --help")
    assert_user_error(capsys, ["ppl", "--bogus"], "unrecognized arguments: --bogus")
    assert_user_error(capsys, ["quantize", "--out", "q", "--weight-method", "awq"], "invalid choice")
    assert_user_error(capsys, ["generate"], "--prompt")
    assert_user_error(capsys, ["quantise"], "invalid choice", "see dllmq --help")
    assert_user_error(capsys, [], "COMMAND")


def test_bad_counts_and_windows_are_refused_before_the_model_loads(capsys, tmp_path, no_model_load):
    (tmp_path / "notes.csv").write_text("a,b\n")
    for argv, fragment in counts_and_windows(tmp_path):
        assert_user_error(capsys, argv, fragment)
    assert not (tmp_path / "out").exists()


DEVICE_COMMANDS = [["generate", "--prompt", "hi"], ["ppl"], ["quantize", "--out", "never"], ["eval", "--tasks", "mini"],
                   ["bench"], ["outliers", "--out", "never"], ["study", "--dry-run"]]


def test_devices_are_checked_up_front_and_say_what_there_is(capsys, monkeypatch, no_model_load):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for command in DEVICE_COMMANDS:
        assert_user_error(capsys, command + ["--device", "cuda"],
                          "--device cuda was given but this machine has no CUDA GPU; use --device cpu.")
    for command in (["quantize", "--out", "never"], ["study", "--dry-run"]):
        assert_user_error(capsys, command + ["--calib-device", "cuda:0"], "--calib-device cuda:0 was given",
                          "no CUDA GPU")
    assert_user_error(capsys, ["generate", "--prompt", "hi", "--device", "gpu"],
                      "--device 'gpu' is not a device name", "available here: cpu")
    assert_user_error(capsys, ["ppl", "--device", "cuda:x"], "is not a device name")
    assert_user_error(capsys, ["bench", "--device", "mps"], "no Apple GPU (MPS)")
    assert_user_error(capsys, ["eval", "--device", "meta"], "not a device dllmq runs on")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert_user_error(capsys, ["generate", "--prompt", "hi", "--device", "cuda:1"],
                      "--device cuda:1 was given but this machine has 1 CUDA GPU (cuda:0)")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert_user_error(capsys, ["quantize", "--out", "never", "--calib-device", "cuda:2"],
                      "has 2 CUDA GPUs (cuda:0 to cuda:1)")


# ----------------------------------------------------------------------------- inspect reads the safetensors headers
def test_inspect_flags_truncated_and_corrupt_safetensors(capsys, checkpoint):
    path = checkpoint / "model.safetensors"
    data = path.read_bytes()
    assert run(capsys, "inspect", str(checkpoint))[0] == 0
    path.write_bytes(data[:-100])
    assert_user_error(capsys, ["inspect", str(checkpoint)], str(path), "truncated")
    path.write_bytes(data[:5])
    assert_user_error(capsys, ["inspect", str(checkpoint)], str(path), "truncated")
    n = int.from_bytes(data[:8], "little")
    path.write_bytes(data[:8] + b"{" * n + data[8 + n:])                       # header bytes, not JSON
    assert_user_error(capsys, ["inspect", str(checkpoint)], str(path), "corrupt")
    header = json.loads(data[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [3] + header[name]["shape"]                      # declares more than it holds
    text = json.dumps(header, separators=(",", ":")).encode().ljust(n)   # same length: padded with spaces
    assert len(text) == n
    path.write_bytes(data[:8] + text + data[8 + n:])
    assert_user_error(capsys, ["inspect", str(checkpoint)], str(path), "corrupt", name)
    (checkpoint / "model.safetensors").unlink()                               # a config-only directory is fine
    assert run(capsys, "inspect", str(checkpoint))[0] == 0


def test_inspect_checks_every_shard_of_a_sharded_checkpoint(capsys, tmp_path):
    from dllmq.models.loading import save_model
    from dllmq.models.random_models import random_model

    model, tok = random_model("random-llada", seed=3)
    out = save_model(model, tok, tmp_path / "sharded", max_shard_bytes=300_000)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2 and run(capsys, "inspect", str(out))[0] == 0
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) - 10])
    assert_user_error(capsys, ["inspect", str(out)], shards[1].name, "truncated")
    shards[1].write_bytes(data)
    shards[-1].unlink()
    assert_user_error(capsys, ["inspect", str(out)], shards[-1].name, "missing")
