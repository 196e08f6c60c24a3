import random

import numpy as np
import pytest
import torch

from tests.tiny import make_model


@pytest.fixture(autouse=True)
def seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Factory: a tiny random model folder per architecture, built once per session."""
    cache = {}

    def get(arch: str = "llama"):
        if arch not in cache:
            cache[arch] = make_model(arch, tmp_path_factory.mktemp(f"model-{arch}"))
        return cache[arch]

    return get
