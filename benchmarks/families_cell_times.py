"""CPU seconds of the families grid's cells (docs/study.md, "Families"), before the AR twin ships: dllmq-tiny
against an untrained causal Llama of the AR twin's exact shape (dllmq.train's AR config at dllmq-tiny's widths,
tied embeddings, dllmq-tiny's tokenizer). The untrained model's numbers are meaningless; its seconds are those
of the causal path at the real size (an upper bound: it never emits the stop token, so it always generates the
full budget).

    OMP_NUM_THREADS=1 python benchmarks/families_cell_times.py --out /tmp/families-times

Runs the families grid's settings FP, RTN W4A16 and DuQuant W4A4 (the cheapest and the dearest method) on both
models at 1 thread and prints each cell's CPU seconds (time.process_time between the cell's claim and its end).
"""
from __future__ import annotations

import argparse
import shutil
import time
from importlib import resources
from pathlib import Path

import torch
import yaml


def untrained_ar_twin(out: Path) -> Path:
    from dllmq.api import load_model
    from dllmq.models.loading import save_model
    from dllmq.models.modeling import init_weights
    from dllmq.models.registry import build_model, parse_model_config
    from dllmq.tiny import checkpoint_dir
    from dllmq.train.config import TrainConfig, llama_tiny_config

    tiny, tokenizer, _ = load_model("dllmq-tiny")
    raw = tiny.config.raw
    cfg = TrainConfig(stage="ar", tokenizer=str(checkpoint_dir("dllmq-tiny")), d_model=raw["d_model"],
                      n_layers=raw["n_layers"], n_heads=raw["n_heads"], mlp_hidden_size=raw["mlp_hidden_size"],
                      max_sequence_length=raw["max_sequence_length"], vocab_size=raw["vocab_size"])
    model = build_model(parse_model_config(llama_tiny_config(cfg, tokenizer)))
    init_weights(model, seed=0)
    model.tie_weights()
    save_model(model.eval(), tokenizer, out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="scratch folder (replaced)")
    args = p.parse_args()
    from dllmq.study.config import parse_study_config
    from dllmq.study.runner import run_study

    torch.set_num_threads(1)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    ar = untrained_ar_twin(out / "ar-untrained")
    data = yaml.safe_load(resources.files("dllmq.study").joinpath("families.yaml").read_text(encoding="utf-8"))
    data.update(models=[str(ar), "dllmq-tiny"],
                methods=["fp", {"name": "rtn", "bits": ["W4A16-g128"]}, {"name": "duquant", "bits": ["W4A4"]}])
    config = parse_study_config(data, "families.yaml (timed settings)")
    started: dict[str, float] = {}

    def hook(event, cell, task):
        if event == "claimed":
            started[cell.cell_key] = time.process_time()
        elif event == "finished":
            name = "AR (untrained)" if cell.model == str(ar) else cell.model
            print(f"{name} {cell.method} {cell.bits}: {time.process_time() - started[cell.cell_key]:.1f} CPU-s",
                  flush=True)

    run_study(config, out / "times.db", cache=None, progress=False, hook=hook)


if __name__ == "__main__":
    main()
