"""`dllmq quantize --profile / --keep-fp` and the study grid's `profile` key: bad values are one
sentence and exit code 2; good ones are recorded."""
import json

import pytest

from dllmq.cli import main
from dllmq.errors import DllmqError
from dllmq.study.cells import plan_cells
from dllmq.study.config import parse_study_config


def _error(capsys, argv, *fragments):
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 2, (code, out, err)
    line = err.strip()
    assert line.startswith("error: ") and "\n" not in line and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in line, line


@pytest.mark.parametrize("argv, fragment", [
    (["--profile", "papr"], "Unknown --profile 'papr'; choose dllmq or paper"),
    (["--keep-fp", "qkv,o_proj"], "--keep-fp names 'o_proj', which is neither a linear role"),
    (["--keep-fp", " , "], "--keep-fp is empty"),
    (["--method", "smoothquant", "--preset", "W8A8", "--keep-fp", "down"], "--keep-fp works with weight-only"),
])
def test_bad_profile_and_keep_fp(capsys, tmp_path, argv, fragment):
    method = [] if "--method" in argv else ["--method", "gptq"]
    _error(capsys, ["quantize", "random-llada", *method, *argv, "--out", str(tmp_path / "q")], fragment)
    assert not (tmp_path / "q").exists()


def test_quantize_paper_records_the_resolved_settings(capsys, tmp_path):
    out = tmp_path / "q"
    code = main(["quantize", "random-dream", "--method", "gptq", "--profile", "paper", "--nsamples", "2",
                 "--seqlen", "16", "--keep-fp", "down", "--out", str(out)])
    _, err = capsys.readouterr()
    assert code == 0, err
    assert "paper profile (gptq on dream): sym=True, damp=0.01, act_order=False" in err
    assert "2 windows of 16 tokens at random starts" in err
    saved = json.loads((out / "config.json").read_text())["quantization_config"]
    d = saved["dllmq"]
    assert (d["profile"], d["family"], d["sym"], d["damp"], d["keep_fp"]) == ("paper", "dream", True, 0.01, ["down"])
    assert ["mlp.down_proj"] not in saved["modules_in_block_to_quantize"]


def test_study_profile_global_and_per_entry():
    base = {"models": ["random-llada", "random-dream"], "tasks": ["mini_math"]}
    config = parse_study_config({**base, "profile": "paper",
                                 "methods": ["fp", {"name": "gptq", "bits": ["W4A16-g128"]},
                                             {"name": "gptq", "bits": ["W4A16-g128"], "profile": "dllmq",
                                              "label": "gptq-dllmq"}]})
    cells = {(c.model, c.method): c.settings for c in plan_cells(config)}
    llada = cells[("random-llada", "gptq")]
    assert llada["profile"] == "paper" and llada["family"] == "llada" and llada["keep_fp"] == ["qkv"]
    assert llada["sym"] is True and llada["damp"] == 0.01
    assert "keep_fp" not in cells[("random-dream", "gptq")] and cells[("random-dream", "gptq")]["family"] == "dream"
    assert "profile" not in cells[("random-llada", "gptq-dllmq")] and cells[("random-llada", "fp")] == {}
    # the grid's calibration block yields to the study's own windows for a paper entry
    awq = parse_study_config({**base, "methods": [{"name": "awq", "bits": ["W4A16-g128"], "profile": "paper"}]})
    settings = plan_cells(awq)[0].settings
    assert (settings["calib_windows"], settings["nsamples"], settings["seqlen"]) == ("documents", 128, 512)
    with pytest.raises(DllmqError, match="profile is 'exact'; use dllmq or paper"):
        parse_study_config({**base, "profile": "exact", "methods": ["fp"]})
    with pytest.raises(DllmqError, match=r"methods\[0\] at W4A16-g128 is not a valid setting \(Unknown profile"):
        parse_study_config({**base, "methods": [{"name": "gptq", "bits": ["W4A16-g128"], "profile": "exact"}]})


def test_study_global_profile_also_sets_the_evaluation_profile():
    base = {"models": ["random-dream"], "tasks": ["mini_math"], "methods": ["fp"]}
    default, paper = parse_study_config(base), parse_study_config({**base, "profile": "paper"})
    assert default.eval.profile == "dllmq" and "profile" not in default.eval.key_dict()   # old cell keys kept
    assert paper.eval.profile == "paper" and paper.eval.key_dict()["profile"] == "paper"
    assert plan_cells(default)[0].cell_key != plan_cells(paper)[0].cell_key
