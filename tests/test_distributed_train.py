"""Feature-parallel training (`torchrun --nproc_per_node=2 -m stages.train`, gloo on the CPU)
trains the transcoder of one process, and a checkpoint written on 2 processes resumes on
1 (and one written on 1 resumes on 2) with the result of an uninterrupted run.

float32 throughout (`train.compute_dtype`): the ranks' partial reconstructions are summed
in another order than one process's, so results agree to float32 rounding, not bit for bit.
`d_transcoder` is 32 (16 features per rank): with fewer columns the CPU's matmul picks
another kernel for the encoder, which rounds the pre-activations differently, and one at
its threshold (the initialisation puts one there per feature) fires on one side only.
`batchtopk` is not compared: the tiny corpus repeats itself, so equal tokens tie at the k-th
value of a batch, where one process's `topk` keeps an arbitrary one and the ranks keep all.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.clt import load_transcoder
from pipeline.train import run
from tests.test_train import _params, kill_after_checkpoint, tiny_store  # noqa: F401 (a fixture)

pytestmark = pytest.mark.slow  # each starts torchrun (20-50 s); .ci/run runs them

ROOT = Path(__file__).resolve().parents[1]
FLOAT32 = {"compute_dtype": "float32", "d_transcoder": 32}
LIMIT_S = 120
"""Wall-clock limit of every torchrun here (`timeout=`)."""


def _raw(tmp_path: Path, base: dict, **train) -> dict:
    """The raw params of `_params(tmp_path, base, **FLOAT32, **train)`, for a params.yaml."""
    params = _params(tmp_path, base, **{**FLOAT32, **train})
    paths = {**base["paths"], "transcoder": params.paths.transcoder, "metrics": params.paths.metrics}
    return {**base, "paths": paths, "train": asdict(params.train)}


def torchrun(folder: Path, raw: dict, *, nproc: int = 2, **env) -> subprocess.CompletedProcess:
    """`python -m stages.train` under torchrun with `nproc` processes, params.yaml in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    environ = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CLT_DIST_TIMEOUT": "60", **env}
    return subprocess.run(
        [*cmd, "-m", "stages.train"], cwd=folder, env=environ, capture_output=True, text=True, timeout=LIMIT_S
    )


def ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"{result.args} failed:\n{result.stdout}\n{result.stderr[-4000:]}"


def assert_same_transcoder(a: Path, b: Path) -> None:
    p, q = load_transcoder(a), load_transcoder(b)
    for (name, x), y in zip(p.named_parameters(), q.parameters(), strict=True):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6, msg=name)


def test_two_processes_time_the_decoders_alike(tiny_store, tmp_path):  # noqa: F811
    """At 2048 features `sparse_decoder: auto` times both decoders on the first step; the
    ranks take the slowest rank's timings (one all-reduce), so the run goes through."""
    raw = _raw(tmp_path / "two", tiny_store, d_transcoder=2048, n_steps=3)
    ok(torchrun(tmp_path / "two", raw))
    metrics = yaml.safe_load((tmp_path / "two" / "metrics" / "train.json").read_text())
    assert metrics["mean"]["l0"] > 0


@pytest.mark.parametrize(
    "train",
    [{}, {"activation": "topk", "k": 4}, {"max_grad_norm": 1.0}],
    ids=["jumprelu", "topk", "clipped"],
)
def test_two_processes_train_the_transcoder_of_one(tiny_store, tmp_path, train):  # noqa: F811
    one = _params(tmp_path / "one", tiny_store, **FLOAT32, **train)
    reference = run(one, progress=False)
    ok(torchrun(tmp_path / "two", _raw(tmp_path / "two", tiny_store, **train)))
    assert_same_transcoder(tmp_path / "one" / "tc", tmp_path / "two" / "tc")
    metrics = yaml.safe_load((tmp_path / "two" / "metrics" / "train.json").read_text())
    for key in ("nmse", "l0", "dead_fraction"):
        assert metrics["mean"][key] == pytest.approx(reference["mean"][key], rel=1e-4, abs=1e-6), key


def test_two_processes_run_the_kl_phase_of_one(tiny_store, tmp_path):  # noqa: F811
    """Rank 0 alone fine-tunes the gathered transcoder on KL while rank 1 waits (12 steps
    take seconds, longer than the barriers' timeout of 1 s here), and gets the transcoder
    of one process."""
    kl = {"kl_steps": 12, "kl_batch_size": 2}
    reference = run(_params(tmp_path / "one", tiny_store, **FLOAT32, **kl), progress=False)
    ok(torchrun(tmp_path / "two", _raw(tmp_path / "two", tiny_store, **kl), CLT_DIST_TIMEOUT="1"))
    assert_same_transcoder(tmp_path / "one" / "tc", tmp_path / "two" / "tc")
    metrics = yaml.safe_load((tmp_path / "two" / "metrics" / "train.json").read_text())
    assert metrics["kl_phase"] == pytest.approx(reference["kl_phase"], rel=1e-4, abs=1e-6)


def test_checkpoint_of_two_processes_resumes_on_one(tiny_store, tmp_path):  # noqa: F811
    reference = run(_params(tmp_path / "ref", tiny_store, **FLOAT32), progress=False)
    raw = _raw(tmp_path / "b", tiny_store)
    killed = torchrun(tmp_path / "b", raw, CLT_FAULT="train-step-8@0")
    assert killed.returncode != 0 and "SIGKILL" in killed.stderr, killed.stderr[-4000:]
    params = _params(tmp_path / "b", tiny_store, **FLOAT32)
    resumed = run(params, progress=False)
    assert resumed["mean"] == pytest.approx(reference["mean"], rel=1e-4, abs=1e-6)
    assert_same_transcoder(tmp_path / "ref" / "tc", tmp_path / "b" / "tc")


def test_checkpoint_of_one_process_resumes_on_two(tiny_store, tmp_path, monkeypatch):  # noqa: F811
    reference = run(_params(tmp_path / "ref", tiny_store, **FLOAT32), progress=False)
    params = _params(tmp_path / "b", tiny_store, **FLOAT32)
    kill_after_checkpoint(params, monkeypatch)
    result = torchrun(tmp_path / "b", _raw(tmp_path / "b", tiny_store))
    ok(result)
    assert "resuming training at step 8/12" in result.stderr
    assert_same_transcoder(tmp_path / "ref" / "tc", tmp_path / "b" / "tc")
    metrics = yaml.safe_load((tmp_path / "b" / "metrics" / "train.json").read_text())
    assert metrics["mean"] == pytest.approx(reference["mean"], rel=1e-4, abs=1e-6)


def test_d_transcoder_not_a_multiple_of_the_ranks_is_refused(tiny_store, tmp_path):  # noqa: F811
    result = torchrun(tmp_path / "odd", _raw(tmp_path / "odd", tiny_store, d_transcoder=15))
    assert result.returncode != 0
    assert "`train.d_transcoder` (15) must be a multiple of the number of processes (2)" in result.stderr
