"""Crash safety, stage by stage: a stage that must run (its `dvc.lock` entry and outputs
removed) is killed with SIGKILL at seeded random moments of `dvc repro`, then `dvc repro`
runs again (`--no-run-cache`, so the stage itself runs). After each kill `dvc.lock` records no
half-written output (every hash it holds is the uninterrupted run's, and a stage that
`dvc status` calls up to date has exactly the uninterrupted run's files); after the
re-run every artifact equals the uninterrupted run's byte for byte, `dvc status` is
clean and no staging file (`*.partial`, `*.export`, `*.tmp`) is left.

Trials alternate between killing the whole process group (DVC and the stage: a power
cut) and killing the stage's process only (the OOM killer; DVC sees it fail). Kill times
are stratified over the stage's work: from just before its first output (a log line or a
progress bar; the imports before it write nothing) to the end of the uninterrupted run
(DVC committing outputs and `dvc.lock`), measured from the first output of the run being
killed, so that machine load moves both alike.
`CRASH_TRIALS` (default 3) sets the trials per stage.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml

from tests.dvc_repo import (
    ROOT,
    Pipeline,
    dvc_env,
    file_hashes,
    git_commit,
    lock_outs,
    make_tiny_repo,
    run,
    staging_leftovers,
)

logger = logging.getLogger(__name__)
REPRO = ["dvc", "repro", "--no-run-cache"]
"""Run stages themselves, never restore DVC's saved copy of their outputs (its run cache)."""
TRIALS = int(os.environ.get("CRASH_TRIALS", "3"))


def longer_stages(params: dict) -> None:
    """Enough shards, steps and checkpoints that kills land inside the work."""
    params["dump"].update(n_tokens=2048)
    params["train"].update(n_steps=60, checkpoint_every=5)


class Run:
    """A `dvc` command in its own process group, its output lines timestamped."""

    def __init__(self, cmd: list[str], repo: Path, env: dict):
        self.start = time.monotonic()
        self.lines: list[tuple[float, str]] = []
        self.proc = subprocess.Popen(
            cmd,
            cwd=repo,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic() - self.start, line.rstrip()))

    def wait(self) -> int:
        code = self.proc.wait()
        self._reader.join()
        return code

    def first_output(self, timeout: float) -> float:
        """Seconds from the start to the stage's first line of output (a log line or a
        progress bar: its imports are done), waiting for it; or to the command's end."""
        deadline = time.monotonic() + timeout
        while True:
            lines = list(self.lines)
            started = next((i for i, (_, line) in enumerate(lines) if line.startswith("> ")), None)
            if started is not None and started + 1 < len(lines):
                return lines[started + 1][0]
            if self.proc.poll() is not None:
                return time.monotonic() - self.start
            assert time.monotonic() < deadline, f"no output within {timeout} s:\n{self.output()}"
            time.sleep(0.01)

    def output(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def kill(self, *, group: bool) -> bool:
        """SIGKILL the process group, or only the stage (DVC's children); False if it
        had already finished."""
        if self.proc.poll() is not None:
            return False
        if group:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return True
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return False
        for child in children:
            child.send_signal(signal.SIGKILL)
        return bool(children)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir):
    """The uninterrupted run: artifacts, `dvc.lock` outputs, and per stage the time of its
    first output and of its end, running it as the trials do."""
    repo, env = make_tiny_repo(
        tmp_path_factory.mktemp("reference") / "repo", tiny_model_dir("llama"), extra_params=longer_stages
    )
    run(["dvc", "repro"], repo, env)
    git_commit(repo, env, "dvc repro")
    pipeline = Pipeline(repo)
    outs = [o for s in pipeline.stages.values() for o in s.outs]
    timing = {}
    for stage in pipeline.order():
        forget(repo, pipeline, stage)
        r = Run([*REPRO, "--single-item", stage], repo, env)
        assert r.wait() == 0, r.output()
        timing[stage] = (r.first_output(timeout=0), time.monotonic() - r.start)
    logger.info("stage timing (first output, end) in s: %s", timing)
    return repo, file_hashes(repo, outs), lock_outs(repo), timing


def _lock_unreadable(repo: Path, env: dict) -> bool:
    result = subprocess.run(["dvc", "status", "--json"], cwd=repo, env=env, capture_output=True, text=True)
    return result.returncode != 0 and "dvc.lock' validation failed" in result.stderr + result.stdout


def _rwlock_unreadable(repo: Path) -> bool:
    path = repo / ".dvc" / "tmp" / "rwlock"
    try:
        json.loads(path.read_text())
    except FileNotFoundError:
        return False
    except ValueError:
        return True
    return False


def check_after_kill(repo: Path, env: dict, pipeline: Pipeline, ref_hashes: dict, ref_lock: dict) -> None:
    """What a crash may leave: stale work, never a wrong record."""
    for stage, outs in lock_outs(repo).items():
        for path, md5 in outs.items():
            assert md5 == ref_lock[stage][path], f"dvc.lock records {path} of {stage} as {md5}"
    flagged = set(json.loads(run(["dvc", "status", "--json"], repo, env)))
    for stage in set(pipeline.stages) - flagged:
        outs = pipeline.stages[stage].outs
        expected = {p: h for p, h in ref_hashes.items() if _under(p, outs)}
        assert file_hashes(repo, outs) == expected, f"{stage}: dvc status says up to date, outputs differ"


def _under(path: str, outs) -> bool:
    return any(path == o or path.startswith(o + "/") for o in outs)


def forget(repo: Path, pipeline: Pipeline, stage: str) -> None:
    """Drop `stage` from `dvc.lock` and delete its outputs, as if it had never run: the next
    `dvc repro --no-run-cache` must compute them (not check them out of the cache, nor keep
    a `persist` output)."""
    path = repo / "dvc.lock"
    lock = yaml.safe_load(path.read_text())
    del lock["stages"][stage]
    path.write_text(yaml.safe_dump(lock, sort_keys=False))
    for out in pipeline.stages[stage].outs:
        target = repo / out
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()


@pytest.mark.slow
@pytest.mark.parametrize("stage", Pipeline(ROOT).order())
def test_killed_stage_reruns_to_the_same_artifacts(reference, stage):
    # In the reference repository itself: artifacts may hold absolute paths (a graph's `scan`).
    repo, ref_hashes, ref_lock, timing = reference
    env = dvc_env(repo)
    pipeline = Pipeline(repo)
    all_outs = sorted({o for s in pipeline.stages.values() for o in s.outs})
    first_output, end = timing[stage]
    rng = random.Random(f"crash-{stage}")
    summary = []
    for trial in range(TRIALS):
        # Stratified over [-10%, 100%] of the work after the first output.
        at = (end - first_output) * (-0.1 + 1.1 * (trial + rng.random()) / TRIALS)
        group = trial % 2 == 0
        forget(repo, pipeline, stage)
        lock_before = (repo / "dvc.lock").read_bytes()
        r = Run([*REPRO, "--single-item", stage], repo, env)
        time.sleep(max(0.0, r.first_output(timeout=60) + at - (time.monotonic() - r.start)))
        killed = r.kill(group=group)
        code = r.wait()
        assert killed or code == 0, r.output()
        if group and _lock_unreadable(repo, env):
            # DVC itself rewrites dvc.lock in place after a stage succeeds: killing DVC in
            # that instant leaves a lock DVC refuses to read (its behaviour, not a stage's;
            # users restore it with `git checkout dvc.lock`). No wrong hash is recorded.
            (repo / "dvc.lock").write_bytes(lock_before)
        if group and _rwlock_unreadable(repo):
            # Likewise DVC's own lock-state file, killed mid-write: empty or cut JSON, which
            # DVC refuses until it is deleted (what DVC's docs tell users to do).
            (repo / ".dvc" / "tmp" / "rwlock").unlink()
        staged = staging_leftovers(repo)
        check_after_kill(repo, env, pipeline, ref_hashes, ref_lock)
        again = Run(REPRO, repo, env)
        assert again.wait() == 0, again.output()
        reran = f"Running stage '{stage}'" in again.output()
        resumed = "resum" in again.output().lower()
        summary.append(
            f"{at:+.2f}s {'group' if group else 'stage'} killed={killed} left={','.join(staged) or '-'} "
            f"reran={reran} resumed={resumed}"
        )
        assert file_hashes(repo, all_outs) == ref_hashes, summary[-1]
        assert lock_outs(repo) == ref_lock, summary[-1]
        assert "up to date" in run(["dvc", "status"], repo, env).lower(), summary[-1]
        assert staging_leftovers(repo) == [], summary[-1]
    print(f"\n{stage} ({TRIALS} trials): " + "; ".join(summary))
