"""`dvc repro` on a tiny configuration in a temporary copy of the repository.

The tiny configuration (and the copy) is `tests.dvc_repo.tiny_params` / `make_tiny_repo`,
shared with the DVC workflow tests (tests/test_dvc_*.py): a new stage adds its tiny
params there.
"""

import pytest
import yaml

from pipeline.store import ActivationStore
from tests.dvc_repo import make_tiny_repo, run


@pytest.fixture
def tiny_repo(tmp_path, tiny_model_dir):
    return make_tiny_repo(tmp_path / "repo", tiny_model_dir("llama"))


def test_dvc_repro_on_tiny_config(tiny_repo):
    repo, env = tiny_repo
    run(["dvc", "repro"], repo, env)
    store = ActivationStore(repo / "data" / "activations.zarr")
    assert store.n_tokens == 512 and store.schema.n_layers == 3
    weights = repo / "data" / "model" / "model.safetensors"
    assert weights.stat().st_nlink == 2  # linked to the DVC cache, not copied twice
    assert (repo / "data" / "transcoder" / "W_dec_2.safetensors").is_file()
    assert (repo / "data" / "examples" / "examples.parquet").is_file()
    assert (repo / "data" / "examples" / "features.parquet").is_file()
    packed = sorted(p.name for p in (repo / "data" / "features").iterdir())
    assert packed == ["index.json.gz", "layer_0.bin", "layer_1.bin", "layer_2.bin"]
    assert "up to date" in run(["dvc", "status"], repo, env).lower()
    # Changing a dump parameter re-runs dump only.
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["dump"]["batch_size"] = 2
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run(["dvc", "repro"], repo, env)
    assert "Running stage 'dump'" in out and "Running stage 'model'" not in out
    # Changing a train parameter re-runs train only.
    params["train"]["lr"] = params["train"]["lr"] * 2
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run(["dvc", "repro"], repo, env)
    assert "Running stage 'train'" in out
    assert "Running stage 'dump'" not in out and "Running stage 'model'" not in out
