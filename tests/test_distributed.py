"""The `dump`, `examples` and `graphs` stages on 2 CPU processes (torchrun, gloo) write the
bytes of one process; a killed 2-process dump resumes on one; a lost rank fails the job
within the timeout, naming the rank; `CLT_NPROC` changes no stage's hash.

The one-process reference is the session's tiny repository after `dvc repro`
(`built_tiny_repo`); each test changes a copy of it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import pipeline.examples as E
from pipeline.config import ExamplesConfig
from pipeline.distributed import World
from pipeline.examples.stats import PairwiseSum
from tests.dvc_repo import copy_repo, file_hashes, run

LIMIT_S = 300
"""Wall-clock limit of every command here (`timeout=`)."""


def stage(repo: Path, env: dict, name: str, *, nproc: int = 2, torchrun: bool = True, **extra):
    """Run stage `name` in `repo`: under torchrun with `nproc` processes, or as `python -m
    stages.<name>` (with `CLT_NPROC`, say, in `extra`)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [*(launcher if torchrun else [sys.executable]), "-m", f"stages.{name}"]
    return subprocess.run(
        cmd, cwd=repo, env={**env, **extra}, capture_output=True, text=True, timeout=LIMIT_S
    )


def ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"{result.args} failed:\n{result.stdout}\n{result.stderr}"


@pytest.mark.slow
def test_dump_on_two_processes_writes_the_bytes_of_one(built_tiny_repo, tmp_path):
    repo, env = copy_repo(built_tiny_repo, tmp_path / "repo")
    store = repo / "data" / "activations.zarr"
    reference = file_hashes(built_tiny_repo, ["data/activations.zarr"])
    shutil.rmtree(store)
    result = stage(repo, env, "dump", torchrun=False, CLT_NPROC="2")  # run_stage re-runs it under torchrun
    ok(result)
    assert "torch.distributed.run --standalone --nproc_per_node=2 -m stages.dump" in result.stderr
    assert file_hashes(repo, ["data/activations.zarr"]) == reference


@pytest.mark.slow
def test_killed_two_process_dump_resumes_on_one_process(built_tiny_repo, tmp_path):
    repo, env = copy_repo(built_tiny_repo, tmp_path / "repo")
    reference = file_hashes(built_tiny_repo, ["data/activations.zarr"])
    shutil.rmtree(repo / "data" / "activations.zarr")
    start = time.monotonic()
    result = stage(repo, env, "dump", CLT_FAULT="dump-shard-1@1", CLT_DIST_TIMEOUT="20")
    seconds = time.monotonic() - start
    assert result.returncode != 0
    assert "rank: 1" in result.stderr and "SIGKILL" in result.stderr, result.stderr  # torchrun's summary
    assert seconds < 20 + 60, f"the job took {seconds:.0f} s to fail"
    done = {p.name for p in (repo / "data" / "activations.zarr.partial" / "progress").iterdir()}
    assert "1" in done and "3" not in done  # rank 1 died after its first shard
    ok(stage(repo, env, "dump", torchrun=False))  # one process writes the rest
    assert file_hashes(repo, ["data/activations.zarr"]) == reference


@pytest.mark.slow
def test_hung_rank_fails_the_others_at_the_barrier_naming_it(built_tiny_repo, tmp_path):
    repo, env = copy_repo(built_tiny_repo, tmp_path / "repo")
    shutil.rmtree(repo / "data" / "activations.zarr")
    start = time.monotonic()
    result = stage(repo, env, "dump", CLT_FAULT="dump-shard-1@1:hang", CLT_DIST_WORK_TIMEOUT="5")
    seconds = time.monotonic() - start
    assert result.returncode != 0
    error = next(line for line in result.stderr.splitlines() if line.startswith("Error: "))
    assert error.startswith("Error: rank 0/2: RuntimeError: rank 0: waiting for every rank at 'dump: shards")
    assert "Ranks 1 failed to pass monitoredBarrier in 5000 ms" in error
    assert seconds < 5 + 60, f"the job took {seconds:.0f} s to fail"


@pytest.mark.slow
def test_examples_on_two_processes_write_the_bytes_of_one(built_tiny_repo, tmp_path):
    repo, env = copy_repo(built_tiny_repo, tmp_path / "repo")
    shutil.rmtree(repo / "data" / "examples")
    ok(stage(repo, env, "examples"))
    assert file_hashes(repo, ["data/examples"]) == file_hashes(built_tiny_repo, ["data/examples"])


@pytest.mark.slow
def test_graphs_on_two_processes_write_the_bytes_of_one(built_tiny_repo, tmp_path):
    """Against one process with one thread, as torchrun gives each process: on a CPU, torch's
    float32 matmuls in attribution round differently with another number of threads."""
    outputs = ["data/graphs", "metrics/graphs.json"]
    hashes = []
    for nproc in (1, 2):
        repo, env = copy_repo(built_tiny_repo, tmp_path / f"repo{nproc}")
        shutil.rmtree(repo / "data" / "graphs")
        (repo / "metrics" / "graphs.json").unlink()
        ok(stage(repo, env, "graphs", nproc=nproc, OMP_NUM_THREADS="1"))
        hashes.append(file_hashes(repo, outputs))
    assert hashes[0] == hashes[1]
    assert len(hashes[0]) == 11  # 2 graphs (JSON, PNG, 2 cache files), manifest, metadata, metrics


@pytest.mark.slow
def test_switching_the_number_of_processes_reruns_nothing(built_tiny_repo, tmp_path):
    repo, env = copy_repo(built_tiny_repo, tmp_path / "repo")
    two = {**env, "CLT_NPROC": "2"}
    assert "Running stage" not in run(["dvc", "repro"], repo, two)
    # dump re-run on 2 processes gives the same output, so nothing downstream is stale
    assert "Running stage 'dump'" in run(["dvc", "repro", "-f", "--single-item", "dump"], repo, two)
    assert "up to date" in run(["dvc", "status"], repo, env)
    assert "Running stage" not in run(["dvc", "repro"], repo, env)


def test_pairwise_sum_does_not_depend_on_the_split():
    values = [torch.randn(5, dtype=torch.float64) * 10.0 ** torch.randint(-8, 8, (5,)) for _ in range(13)]
    whole = PairwiseSum()
    for b, v in enumerate(values):
        whole.add(b, v)
    for cuts in ([6], [1, 2], [3, 8, 12], [4, 5, 9]):
        parts = []
        for lo, hi in zip([0, *cuts], [*cuts, len(values)]):
            part = PairwiseSum()
            for b in range(lo, hi):
                part.add(b, values[b])
            parts.append(part)
        merged = parts[0]
        for part in parts[:0:-1]:  # in any order
            merged.merge(part)
        assert torch.equal(merged.total(values[0]), whole.total(values[0]))


def test_merged_feature_states_equal_one_scan():
    """The state of a scan split into contiguous ranges of batches, merged, finalizes to
    exactly the columns of one scan (ties in activation included)."""
    cfg = ExamplesConfig(top_k=3, context_before=2, context_after=1, n_intervals=2, examples_per_interval=2)
    F, n_seq, C, n_batches = 6, 4, 8, 10
    g = torch.Generator().manual_seed(0)
    batches = []
    for b in range(n_batches):  # activations on a coarse grid, so many are equal
        h = torch.randint(0, 12, (F, n_seq, C), generator=g).float() * 0.25 * (1 + b % 2) - 0.5
        batches.append(h)
    threshold = torch.full((F,), 0.2)

    def scan(part: range) -> E.FeatureState:
        state = E.FeatureState(F, cfg, torch.float32, "cpu")
        generator = torch.Generator()
        for b in part:
            generator.manual_seed(b)
            state.update(batches[b].clone(), threshold, b * n_seq * C, generator, b)
        return state

    chunk = E.Chunk(((0, 0, F),))
    expected = scan(range(n_batches)).finalize(chunk, n_batches * n_seq * (C - 1))
    for n_parts in (2, 3):
        parts = [scan(World(r, n_parts).block(n_batches)) for r in range(n_parts)][::-1]
        merged = parts[0]
        for part in parts[1:]:  # later rows first: ties are broken by row, not by arrival
            merged.merge(part)
        got = merged.finalize(chunk, n_batches * n_seq * (C - 1))
        for table, want in zip(got, expected):
            for key in want:
                if key == "interval_edges":
                    for a, b in zip(table[key], want[key]):
                        np.testing.assert_array_equal(a, b)
                else:
                    np.testing.assert_array_equal(table[key], want[key], err_msg=key)


def test_nproc_builds_the_torchrun_command(monkeypatch):
    from pipeline.runtime import nproc, torchrun_command

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("CLT_NPROC", "3")
    assert nproc() == 3
    command = torchrun_command(3)
    assert command[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3"]
    assert torchrun_command(1) is None
    monkeypatch.setenv("WORLD_SIZE", "3")  # already under a launcher
    assert torchrun_command(3) is None
    monkeypatch.setenv("CLT_NPROC", "two")
    with pytest.raises(ValueError, match="CLT_NPROC must be a whole number"):
        nproc()
