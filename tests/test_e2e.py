"""`dvc repro` on a tiny configuration in a temporary copy of the repository."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.store import ActivationStore
from tests.tiny import TEXT

ROOT = Path(__file__).resolve().parents[1]
COPY = ["pipeline", "stages", "dvc.yaml", "params.yaml", ".dvc/config", ".dvcignore", "data/.gitignore"]


def run(cmd, cwd, env):
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture
def tiny_repo(tmp_path, tiny_model_dir):
    repo = tmp_path / "repo"
    for name in COPY:
        src, dst = ROOT / name, repo / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, dst)
    (repo / "data" / "corpus").mkdir(parents=True)
    docs = [json.dumps({"text": TEXT * 2 + str(i)}) for i in range(30)]
    (repo / "data" / "corpus" / "tiny.jsonl").write_text("\n".join(docs))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["model"]["name"] = str(tiny_model_dir("llama"))
    params["model"]["dtype"] = "float32"
    params["corpus"].update(path="data/corpus/tiny.jsonl", context_len=16)
    params["dump"].update(n_tokens=512, batch_size=4, shard_tokens=128, chunk_tokens=64)
    params["train"].update(
        d_transcoder=16, n_steps=6, batch_size=64, checkpoint_every=2, buffer_shards=2, val_fraction=0.2
    )
    params["evaluate"].update(n_sequences=4, batch_size=2)
    params["runtime"]["device"] = "cpu"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env["PYTHONPATH"] = str(repo)
    run(["git", "init", "-q"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], repo, env)
    return repo, env


def test_dvc_repro_on_tiny_config(tiny_repo):
    repo, env = tiny_repo
    run(["dvc", "repro"], repo, env)
    store = ActivationStore(repo / "data" / "activations.zarr")
    assert store.n_tokens == 512 and store.schema.n_layers == 3
    weights = repo / "data" / "model" / "model.safetensors"
    assert weights.stat().st_nlink == 2  # linked to the DVC cache, not copied twice
    assert (repo / "data" / "transcoder" / "W_dec_2.safetensors").is_file()
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
