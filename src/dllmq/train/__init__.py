"""Training dllmq-tiny and dllmq-tiny-instruct from scratch: corpus, tokenizer, LLaDA's objectives.

    python -m dllmq.train --stage base --out runs/base --steps 2400
    python -m dllmq.train --stage instruct --init runs/base/final --out runs/instruct --steps 600
"""
from dllmq.train.loop import TrainConfig, train

__all__ = ["TrainConfig", "train"]
