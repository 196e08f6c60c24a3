"""Every user error is one `Error:` line on stderr, no traceback: exit code 2 for a bad
params value or command line (a usage error), 1 for anything else; `CLT_DEBUG=1` shows
the traceback. Checked for `clt` commands in-process and for `python -m stages.X` (what
`dvc repro` runs) in a subprocess."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pipeline.cli import main as cli
from pipeline.clt import export_transcoder
from tests.dvc_repo import ROOT, set_param, tiny_params, write_tiny_corpus
from tests.tiny import make_transcoder


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_model_dir):
    """A folder with the tiny params.yaml, its materialised model, a dumped store and a
    random exported transcoder (so each case fails at the input it breaks, nothing earlier)."""
    root = tmp_path_factory.mktemp("cli-errors")
    write_tiny_corpus(root)
    params = tiny_params(yaml.safe_load((ROOT / "params.yaml").read_text()), tiny_model_dir("llama"))
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        for stage in ("model", "dump"):
            result = CliRunner().invoke(cli, [stage])
            assert result.exit_code == 0, result.output
    finally:
        os.chdir(cwd)
    export_transcoder(make_transcoder(), root / "data" / "transcoder", model_name="tiny")
    return root


def empty_prompts(root):
    shutil.rmtree(root / "data" / "prompts")
    (root / "data" / "prompts").mkdir()


def binary_prompt(root):
    (root / "data" / "prompts" / "bad.txt").write_bytes(b"caf\xe9 au lait")


def long_prompt(root):
    (root / "data" / "prompts" / "long.txt").write_text("one two " * 200)


def binary_corpus(root):
    (root / "data" / "corpus" / "tiny.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')


def drop_decoder(root):
    (root / "data" / "transcoder" / "W_dec_1.safetensors").unlink()


def truncate_shard(root):
    shard = root / "data" / "activations.zarr" / "mlp_out" / "c" / "0" / "0" / "0"
    shard.write_bytes(shard.read_bytes()[:-100])


def with_param(section: str, key: str, value):
    return lambda root: set_param(root, section, key, value)


def no_examples(root):
    shutil.rmtree(root / "data" / "examples", ignore_errors=True)


CASES = {
    # name: (command line, how to break the working copy, exit code, the message says)
    "lr out of range": (["train"], with_param("train", "lr", 5), 2, r"`train\.lr` must be"),
    "unknown key": (
        ["dump"],
        with_param("dump", "n_tokenz", 8),
        2,
        r"`dump\.n_tokenz` is not",
    ),
    "wrong type": (
        ["graphs"],
        with_param("graphs", "png", "yes"),
        2,
        r"`graphs\.png` must be",
    ),
    "missing params file": (["train", "--params", "nope.yaml"], None, 1, r"nope\.yaml not found"),
    "bad option": (["feature", "x", "1"], None, 2, r"'x' is not a valid integer"),
    "empty prompt folder": (["graphs"], empty_prompts, 1, r"has no \.txt files"),
    "non-UTF-8 prompt": (["graphs"], binary_prompt, 1, r"bad\.txt is not valid UTF-8"),
    "prompt too long": (["graphs"], long_prompt, 1, r"long\.txt is \d+ tokens.*graphs\.max_n_pos"),
    "missing store": (["info", "nowhere.zarr"], None, 1, r"nowhere\.zarr does not exist.*dvc repro dump"),
    "truncated shard": (["info"], truncate_shard, 1, r"mlp_out.*dvc (pull|repro dump)"),
    "missing transcoder file": (
        ["evaluate"],
        drop_decoder,
        1,
        r"missing W_dec_1.*dvc repro train",
    ),
    "missing feature": (["feature", "0", "3"], no_examples, 1, r"dvc repro examples|examples"),
    "model name mismatch": (
        ["dump"],
        with_param("model", "name", "no-such/model"),
        1,
        r"no-such/model.*dvc repro model",
    ),
    "non-UTF-8 corpus": (["dump"], binary_corpus, 1, r"tiny\.jsonl.*UTF-8"),
    "export without a model": (
        ["export-corpus", "data/corpus", "out.jsonl.gz", "--n-tokens", "9"],
        lambda root: shutil.rmtree(root / "data" / "model"),
        1,
        r"no model at data/model.*dvc repro model",
    ),
    "preset with a typo": (
        ["preset", "preset.yaml"],
        lambda root: (root / "preset.yaml").write_text("train:\n  n_step: 9\n"),
        2,
        r"`train\.n_step` is not",
    ),
}


@pytest.mark.parametrize("name", CASES)
def test_user_error_is_one_line(name, workdir, tmp_path, monkeypatch):
    args, breaks, code, message = CASES[name]
    root = tmp_path / "w"
    shutil.copytree(workdir, root, symlinks=True)
    if breaks is not None:
        breaks(root)
    monkeypatch.chdir(root)
    monkeypatch.delenv("CLT_DEBUG", raising=False)
    result = CliRunner().invoke(cli, args)
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    assert "Traceback" not in result.output
    assert result.exit_code == code, result.output
    assert re.search(message, errors[0]), errors[0]


def run_module(args: list[str], cwd: Path, **env) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "CLT_DEBUG"}
    environ.update(PYTHONPATH=str(ROOT), **env)
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd, env=environ, capture_output=True, text=True, timeout=120
    )


def test_stage_entry_point_prints_one_line(workdir, tmp_path):
    """What `dvc repro` runs: one `Error:` line and exit code 2 for a bad value; the
    traceback with CLT_DEBUG=1."""
    root = tmp_path / "w"
    shutil.copytree(workdir, root, symlinks=True)
    set_param(root, "train", "n_steps", 0)
    result = run_module(["stages.train"], root)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == ["Error: `train.n_steps` must be >= 1, got 0"], result.stderr
    debug = run_module(["stages.train"], root, CLT_DEBUG="1")
    assert debug.returncode != 0 and "Traceback" in debug.stderr
    empty_prompts(root)
    set_param(root, "train", "n_steps", 6)
    result = run_module(["stages.graphs"], root)
    assert result.returncode == 1
    assert [line for line in result.stderr.splitlines() if "Error" in line or "Traceback" in line] == [
        f"Error: prompts folder {Path('data/prompts')} has no .txt files; add one prompt per .txt file"
    ]
