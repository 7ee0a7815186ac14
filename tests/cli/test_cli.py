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


def test_eval_mini_tasks_on_a_builtin_model(capsys, tmp_path):
    out = tmp_path / "mini.json"
    code = main(["eval", "random-llada", "--tasks", "mini_general,mini_math", "--limit", "2", "--out", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    assert set(data["tasks"]) == {"mini_general", "mini_math"}
    assert all(r["n"] == 2 and 0 <= r["acc"] <= 1 for r in data["tasks"].values())


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
