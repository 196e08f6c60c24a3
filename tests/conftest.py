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


@pytest.fixture(scope="session")
def built_tiny_repo(tmp_path_factory, tiny_model_dir):
    """The tiny repository (tests/dvc_repo.py) after `dvc repro`, committed, built once per
    session; tests change copies of it (`tests.dvc_repo.copy_repo`)."""
    from tests.dvc_repo import git_commit, make_tiny_repo, run

    repo, env = make_tiny_repo(tmp_path_factory.mktemp("built") / "repo", tiny_model_dir("llama"))
    run(["dvc", "repro"], repo, env)
    git_commit(repo, env, "dvc repro")
    return repo
