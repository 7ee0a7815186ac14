import pytest
import torch

from dllmq.models.loading import save_model
from dllmq.models.random_models import random_model

FAMILY_MODELS = ["random-llada", "random-dream", "random-llama"]


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture(params=FAMILY_MODELS)
def family_model(request):
    """(name, model, tokenizer) for each built-in family."""
    model, tokenizer = random_model(request.param, seed=1)
    return request.param, model, tokenizer


@pytest.fixture
def saved_llada(tmp_path):
    model, tokenizer = random_model("random-llada", seed=3)
    return save_model(model, tokenizer, tmp_path / "llada"), model


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run the tests marked slow (left out by default)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
