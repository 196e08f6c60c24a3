"""A tiny copy of the repository for tests that run DVC, and what those tests read from it.

`make_tiny_repo` is the one definition of the tiny configuration (`tiny_params`): every
test that runs `dvc repro` (test_e2e.py, test_dvc_*.py) builds the same repository.
`Pipeline` reads `dvc.yaml` and `params.yaml` generically (stages, their params, deps and
outputs, and the DAG between them), so the tests follow the stages that exist.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml

from tests.tiny import TEXT

ROOT = Path(__file__).resolve().parents[1]
COPY = ["pipeline", "stages", "dvc.yaml", "params.yaml", ".dvc/config", ".dvcignore", "data/.gitignore"]
"""What a tiny repository copies from this one (`pipeline/` and `stages/` are the stage deps)."""
STAGING_SUFFIXES = (".partial", ".export", ".tmp")
"""Names an interrupted stage may leave behind; a finished run leaves none of them."""


def tiny_params(params: dict, model_dir: Path) -> dict:
    """Shrink the default `params.yaml` (parsed, changed in place) to run in seconds on CPU."""
    params["model"]["name"] = str(model_dir)
    params["model"]["dtype"] = "float32"
    params["corpus"].update(path="data/corpus/tiny.jsonl", context_len=16)
    params["dump"].update(n_tokens=512, batch_size=4, shard_tokens=128, chunk_tokens=64)
    params["train"].update(
        d_transcoder=16,
        n_steps=6,
        batch_size=64,
        checkpoint_every=2,
        buffer_shards=2,
        val_fraction=0.2,
        kl_steps=2,
        kl_batch_size=2,
    )
    params["evaluate"].update(n_sequences=4, batch_size=2)
    params["examples"].update(top_k=5, context_before=4, context_after=2, n_intervals=3)
    params["graphs"].update(max_feature_nodes=16, batch_size=16)
    params["runtime"]["device"] = "cpu"
    return params


def write_tiny_corpus(repo: Path) -> None:
    (repo / "data" / "corpus").mkdir(parents=True, exist_ok=True)
    docs = [json.dumps({"text": TEXT * 2 + str(i)}) for i in range(30)]
    (repo / "data" / "corpus" / "tiny.jsonl").write_text("\n".join(docs))
    (repo / "data" / "prompts").mkdir(parents=True, exist_ok=True)  # the `graphs` stage's input
    (repo / "data" / "prompts" / "france.txt").write_text("The capital of France is\n")
    (repo / "data" / "prompts" / "count.txt").write_text("One two three four\n")


def dvc_env(repo: Path) -> dict[str, str]:
    """The environment for `dvc` in `repo`: this venv's tools first, stages importable."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env["PYTHONPATH"] = str(repo)
    env["DVC_NO_ANALYTICS"] = "1"
    for who in ("AUTHOR", "COMMITTER"):  # git (and `dvc exp`) commit in the copy
        env.setdefault(f"GIT_{who}_NAME", "test")
        env.setdefault(f"GIT_{who}_EMAIL", "test@example.com")
    return env


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    """Run `cmd`, failing the test with its output if it fails; return its stdout."""
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def run_failing(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    """Run `cmd`, which must fail; return its stdout and stderr."""
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode != 0, f"{cmd} succeeded:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def git_commit(repo: Path, env: dict[str, str], message: str) -> None:
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", message], repo, env)


def set_param(repo: Path, section: str, key: str, value) -> None:
    """Set `section.key` of `repo`'s params.yaml."""
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params[section][key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def make_tiny_repo(repo: Path, model_dir: Path, *, extra_params=None) -> tuple[Path, dict[str, str]]:
    """Copy the pipeline into a new git repository at `repo` with the tiny configuration.

    `extra_params(params)` may change the parsed params further before they are written.
    Returns the repository and the environment to run `dvc` in it.
    """
    for name in COPY:
        src, dst = ROOT / name, repo / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, dst)
    write_tiny_corpus(repo)
    params = tiny_params(yaml.safe_load((repo / "params.yaml").read_text()), model_dir)
    if extra_params is not None:
        extra_params(params)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = dvc_env(repo)
    run(["git", "init", "-q"], repo, env)
    git_commit(repo, env, "init")
    return repo, env


def copy_repo(src: Path, dst: Path) -> tuple[Path, dict[str, str]]:
    """A copy of a (reproduced) tiny repository, its git history and DVC cache included."""
    shutil.copytree(src, dst, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    return dst, dvc_env(dst)


# --- reading dvc.yaml -------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    name: str
    cmd: str
    deps: tuple[str, ...]
    outs: tuple[str, ...]
    """Every output: `outs`, `metrics` and `plots` entries."""
    params: tuple[str, ...]
    """`section` (the whole section) or `section.key`, from params.yaml."""


class Pipeline:
    """The stages of `dvc.yaml` with `${...}` interpolated from `params.yaml`, and their DAG."""

    def __init__(self, repo: Path = ROOT):
        self.repo = Path(repo)
        self.params = yaml.safe_load((self.repo / "params.yaml").read_text())
        raw = yaml.safe_load((self.repo / "dvc.yaml").read_text())
        self.stages = {name: self._stage(name, body) for name, body in raw["stages"].items()}

    def _interpolate(self, text: str) -> str:
        def value(m: re.Match) -> str:
            node = self.params
            for part in m.group(1).strip().split("."):
                node = node[part]
            return str(node)

        return re.sub(r"\$\{([^}]+)\}", value, text)

    def _paths(self, entries: Iterable) -> tuple[str, ...]:
        """Paths of a `deps`/`outs`/`metrics`/`plots` list (plain strings or `{path: options}`)."""
        paths = []
        for entry in entries or ():
            for path in [entry] if isinstance(entry, str) else entry:
                paths.append(os.path.normpath(self._interpolate(path)))
        return tuple(paths)

    def _stage(self, name: str, body: dict) -> Stage:
        params = []
        for entry in body.get("params", ()):
            if isinstance(entry, str):
                params.append(entry)
            else:  # {file: [keys]}
                for file, keys in entry.items():
                    assert file == "params.yaml", f"stage {name} reads params from {file}"
                    params.extend(keys)
        outs = (
            self._paths(body.get("outs")) + self._paths(body.get("metrics")) + self._paths(body.get("plots"))
        )
        return Stage(name, body["cmd"], self._paths(body.get("deps")), outs, tuple(params))

    def upstream(self, name: str) -> set[str]:
        """Stages whose outputs `name` reads directly."""
        return {
            other.name
            for other in self.stages.values()
            for dep in self.stages[name].deps
            for out in other.outs
            if dep == out or dep.startswith(out + "/") or out.startswith(dep + "/")
        } - {name}

    def downstream(self, names: Iterable[str]) -> set[str]:
        """`names` and every stage that depends on them, directly or not."""
        found = set(names)
        while True:
            more = {s for s in self.stages if self.upstream(s) & found} - found
            if not more:
                return found
            found |= more

    def order(self) -> list[str]:
        """Stages in an order where each comes after everything it reads."""
        done: list[str] = []
        while len(done) < len(self.stages):
            ready = [s for s in self.stages if s not in done and self.upstream(s) <= set(done)]
            assert ready, f"dvc.yaml has a cycle among {set(self.stages) - set(done)}"
            done.extend(ready)
        return done

    def stages_reading(self, section: str, key: str) -> set[str]:
        """Stages that list `section.key`, or its whole section, under `params:`."""
        return {s.name for s in self.stages.values() if section in s.params or f"{section}.{key}" in s.params}


# --- reading pipeline imports -----------------------------------------------------------


def module_file(repo: Path, module: str) -> Path | None:
    """The file of `module` (dotted) inside `repo`, or None if it is not one of ours."""
    base = repo.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported_modules(repo: Path, path: Path) -> set[str]:
    """Dotted names `path` imports (any depth in the file, lazy imports included)."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(repo).with_suffix("").parts)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)  # `from pkg import mod`
    return names


def import_closure(repo: Path, path: Path, roots: tuple[str, ...] = ("pipeline",)) -> set[str]:
    """Files (relative to `repo`) of every module under `roots` that `path` imports,
    transitively, with the `__init__.py` of each package on the way (Python runs those too)."""
    seen: set[Path] = set()
    todo = [path]
    while todo:
        current = todo.pop()
        for name in imported_modules(repo, current):
            if name.split(".")[0] not in roots:
                continue
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                found = module_file(repo, ".".join(parts[:i]))
                if found is not None and found not in seen:
                    seen.add(found)
                    todo.append(found)
    return {str(p.relative_to(repo)) for p in seen}


# --- artifacts --------------------------------------------------------------------------


def file_hashes(root: Path, paths: Iterable[str]) -> dict[str, str]:
    """sha256 of every file under each of `paths` (relative to `root`), by relative path."""
    hashes = {}
    for rel in paths:
        path = root / rel
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            if f.is_file():
                hashes[str(f.relative_to(root))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return hashes


def staging_leftovers(root: Path) -> list[str]:
    """Staging files and folders (`*.partial`, `*.export`, `*.tmp`) under `data/` and the metrics."""
    found = []
    for top in ("data", "metrics"):
        for p in (root / top).rglob("*") if (root / top).exists() else ():
            if p.name.endswith(STAGING_SUFFIXES):
                found.append(str(p.relative_to(root)))
    return sorted(found)


def lock_outs(repo: Path) -> dict[str, dict[str, str]]:
    """`{stage: {out path: md5}}` as recorded in `dvc.lock` (empty if there is none)."""
    lock = repo / "dvc.lock"
    if not lock.is_file():
        return {}
    data = yaml.safe_load(lock.read_text()) or {}
    return {
        name: {out["path"]: out.get("md5") for out in body.get("outs", ())}
        for name, body in data.get("stages", {}).items()
    }
