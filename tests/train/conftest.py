"""Shared fixtures of the training tests."""
from __future__ import annotations

import pytest


@pytest.fixture
def record_samplers(monkeypatch):
    """Patches the mini benchmark's generate_text to record each call's `sampler` (then run as usual);
    returns the list it fills."""
    from dllmq.evaluate import mini

    samplers = []
    real = mini.generate_text

    def spy(*args, sampler=None, **kwargs):
        samplers.append(sampler)
        return real(*args, sampler=sampler, **kwargs)

    monkeypatch.setattr(mini, "generate_text", spy)
    return samplers
