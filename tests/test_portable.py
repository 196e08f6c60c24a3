"""Artifacts do not know where they live: the tiny pipeline run in two checkouts at
different paths writes byte-identical outputs, none holding an absolute path, and a clone
elsewhere `dvc pull`s them with `dvc status` clean."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from tests.dvc_repo import Pipeline, file_hashes, git_commit, make_tiny_repo, run
from tests.test_dvc_remote import push_clone_pull

MODEL = "tiny-model"
"""The tiny model's folder inside each checkout: `model.name` is relative, like an alias,
so `config.yaml`'s `model_name` and `data/model/source.json` hold no path either (with an
absolute `model.name` they would repeat it, as the user wrote it)."""


def checkout(where: Path, model_dir: Path) -> tuple[Path, dict]:
    def relative_model(params: dict) -> None:
        params["model"]["name"] = MODEL

    repo, env = make_tiny_repo(where, model_dir, extra_params=relative_model)
    shutil.copytree(model_dir, repo / MODEL)
    git_commit(repo, env, "tiny model")
    run(["dvc", "repro"], repo, env)
    git_commit(repo, env, "dvc repro")
    return repo, env


def strings(value):
    """Every string in a parsed JSON/YAML value, keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from strings(k)
            yield from strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings(v)


def path_like(repo: Path, tmp: Path) -> list[str]:
    """Values of config.yaml and of every JSON file of the graphs folder that are absolute
    paths or mention `tmp`, as `file: value`."""
    pipeline = Pipeline(repo)
    files = [repo / pipeline.params["paths"]["transcoder"] / "config.yaml"]
    files += sorted((repo / pipeline.params["paths"]["graphs"]).rglob("*.json"))
    found = []
    for path in files:
        data = yaml.safe_load(path.read_text()) if path.suffix == ".yaml" else json.loads(path.read_text())
        for s in strings(data):
            if s.startswith("/") or str(tmp) in s or str(tmp.resolve()) in s:
                found.append(f"{path.relative_to(repo)}: {s!r}")
    return found


@pytest.mark.slow
def test_two_checkouts_write_identical_artifacts(tmp_path, tiny_model_dir):
    model_dir = tiny_model_dir("llama")
    a, env = checkout(tmp_path / "a" / "repo", model_dir)
    b, _ = checkout(tmp_path / "bbbbbbbb" / "deeper" / "repo", model_dir)
    outs = [o for s in Pipeline(a).stages.values() for o in s.outs]
    ours, theirs = file_hashes(a, outs), file_hashes(b, outs)
    assert ours, "no artifacts"
    assert [p for p in ours.keys() | theirs.keys() if ours.get(p) != theirs.get(p)] == []
    graphs = Pipeline(a).params["paths"]["graphs"]
    assert any(p.startswith(f"{graphs}/.cache/") for p in ours)  # the cache is part of the output
    scan = yaml.safe_load((a / "data" / "transcoder" / "config.yaml").read_text())["scan"]
    assert scan == f"./feature-data/{MODEL}"
    assert path_like(a, tmp_path) == []
    push_clone_pull(a, env, tmp_path / "a" / "clone")  # the default remote is beside `repo`
