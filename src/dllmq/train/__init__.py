"""Training dllmq-tiny and dllmq-tiny-instruct from scratch (corpus, tokenizer, LLaDA's objectives),
and their autoregressive twin dllmq-tiny-ar (the same batches, next-token prediction).

    python -m dllmq.train --stage base --out runs/base --steps 2400
    python -m dllmq.train --stage instruct --init runs/base/final --out runs/instruct --steps 600
    python -m dllmq.train --stage ar --tokenizer src/dllmq/tiny/dllmq-tiny --out runs/ar --steps 2400
"""
from dllmq.train.loop import TrainConfig, train

__all__ = ["TrainConfig", "train"]
