"""The DVC workflow on a tiny copy of the repository: targeted re-runs, stage deps that
list every imported module, experiments, metrics and plots.

Stages, their params and deps are read from `dvc.yaml` (`tests.dvc_repo.Pipeline`), so
these tests follow whatever stages exist.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import typing
from pathlib import Path

import pytest

from pipeline.config import Params, parse_params
from tests.dvc_repo import (
    ROOT,
    Pipeline,
    copy_repo,
    dvc_env,
    git_commit,
    import_closure,
    run,
    run_failing,
    set_param,
)


@pytest.fixture
def repo(built_tiny_repo, tmp_path):
    return copy_repo(built_tiny_repo, tmp_path / "repo")


def changed_value(section: str, key: str, value):
    """A different value of `section.key` that still validates, or None if there is none
    to guess (strings: names, paths)."""
    tp = typing.get_type_hints(typing.get_type_hints(Params)[section])[key]
    if typing.get_origin(tp) is typing.Literal:
        candidates = [v for v in typing.get_args(tp) if v != value]
    elif tp is bool:
        candidates = [not value]
    elif tp is int:
        candidates = [value * 2, value + 1]
    elif tp is float:
        candidates = [value * 2, value / 2]
    else:
        return None
    for candidate in candidates:
        if candidate == value:
            continue
        try:
            parse_params({section: {key: candidate}})
        except ValueError:
            continue
        return candidate
    return None


def stage_status(repo: Path, env) -> dict[str, list]:
    return json.loads(run(["dvc", "status", "--json"], repo, env))


def templated_keys(pipeline: Pipeline) -> set[str]:
    """`section.key`s that `dvc.yaml` interpolates (paths: changing them changes the stages)."""
    text = (pipeline.repo / "dvc.yaml").read_text()
    return {f"{s}.{k}" for s, body in pipeline.params.items() for k in body if f"${{{s}.{k}}}" in text}


def param_changes(pipeline: Pipeline, *, runnable: bool) -> list[list[tuple[str, str, object]]]:
    """Changes to try, in groups: per params section read by a stage, its keys in order (the
    first one is the section's change; a later one stands in when a real run rejects a
    value), then one group per key that some stage lists on its own (`model.name`,
    `train.val_fraction`). Each change is `(section, key, new value)`. With `runnable`,
    only values that might run (no made-up model names or paths)."""
    skip = templated_keys(pipeline)
    listed = {p for s in pipeline.stages.values() for p in s.params if "." in p}
    groups = []
    for section, body in pipeline.params.items():
        group = []
        for key, value in body.items():
            name = f"{section}.{key}"
            if name in skip or not pipeline.stages_reading(section, key):
                continue
            new = changed_value(section, key, value)
            if new is None and not runnable and isinstance(value, str):
                new = value + "-changed"
            if new is None:
                continue
            if name in listed:
                groups.append([(section, key, new)])
            else:
                group.append((section, key, new))
        if group:
            groups.append(group)
    return groups


def test_stage_deps_list_every_imported_module():
    """Each stage's `deps` lists its module and every `pipeline/` module it imports
    (transitively, package `__init__.py` files included), and no other library module."""
    pipeline = Pipeline(ROOT)
    problems = []
    for stage in pipeline.stages.values():
        module = stage.cmd.removeprefix("python -m ").strip()
        assert stage.cmd == f"python -m stages.{stage.name}", f"stage {stage.name}: cmd is {stage.cmd!r}"
        entry = ROOT / "stages" / f"{stage.name}.py"
        needed = import_closure(ROOT, entry) | {f"stages/{stage.name}.py"}
        listed = {d for d in stage.deps if d.endswith(".py")}
        if missing := sorted(needed - listed):
            problems.append(f"stage {stage.name} ({module}) imports but does not list: {missing}")
        if extra := sorted(listed - needed):
            problems.append(f"stage {stage.name} lists modules it does not import: {extra}")
        others = {f"stages/{s}.py" for s in pipeline.stages} - {f"stages/{stage.name}.py"}
        if imported := sorted(import_closure(ROOT, entry, roots=("stages",)) & others):
            problems.append(f"stage {stage.name} imports another stage: {imported}")
    assert not problems, "\n".join(problems)


def test_every_params_section_is_read_by_a_stage_or_by_none_on_purpose():
    """Sections no stage lists change nothing (`runtime`) or are paths that dvc.yaml
    interpolates; anything else unread is a missing `params:` entry."""
    pipeline = Pipeline(ROOT)
    templated = templated_keys(pipeline)
    for section, body in pipeline.params.items():
        for key in body:
            if not pipeline.stages_reading(section, key) and f"{section}.{key}" not in templated:
                assert section == "runtime", f"`{section}.{key}` is not a param of any stage in dvc.yaml"


def test_param_change_flags_exactly_its_stages(repo):
    """Changing one value per section: `dvc status` flags exactly the stages that list it,
    and `dvc repro` would run those and everything downstream of them, nothing else."""
    repo, env = repo
    pipeline = Pipeline(repo)
    changes = [group[0] for group in param_changes(pipeline, runnable=False)]
    assert {s for s, _, _ in changes} >= {"model", "corpus", "train"}
    original = (repo / "params.yaml").read_text()
    for section, key, value in changes:
        set_param(repo, section, key, value)
        direct = pipeline.stages_reading(section, key)
        status = stage_status(repo, env)
        assert set(status) == direct, f"changing {section}.{key}: dvc status flags {set(status)}"
        for name, entries in status.items():
            (entry,) = entries
            assert list(entry) == ["changed deps"] and list(entry["changed deps"]) == ["params.yaml"], entry
            assert set(entry["changed deps"]["params.yaml"]) <= {section, f"{section}.{key}"}, entry
        out = run(["dvc", "repro", "--dry", "--force-downstream"], repo, env)
        would_run = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
        assert would_run == pipeline.downstream(direct), f"changing {section}.{key}"
        (repo / "params.yaml").write_text(original)
    # Settings that no stage reads change nothing.
    for key, value in pipeline.params.get("runtime", {}).items():
        new = changed_value("runtime", key, value)
        if new is not None:
            set_param(repo, "runtime", key, new)
    assert stage_status(repo, env) == {}


@pytest.mark.slow
def test_param_change_reruns_its_stage_and_downstream_only(repo):
    """The real thing, one runnable change per section: `dvc repro` runs the stages that
    read it, possibly their downstream stages (those whose inputs then changed), nothing
    else, and leaves `dvc status` clean. A value the stage rejects (naming the key: the
    tiny data cannot take every value) is put back and the section's next key is tried."""
    repo, env = repo
    pipeline = Pipeline(repo)
    for group in param_changes(pipeline, runnable=True):
        for section, key, value in group:
            before = (repo / "params.yaml").read_text()
            set_param(repo, section, key, value)
            direct = pipeline.stages_reading(section, key)
            result = subprocess.run(["dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True)
            if result.returncode != 0:
                assert f"`{section}.{key}`" in result.stderr, result.stdout + result.stderr
                (repo / "params.yaml").write_text(before)
                run(["dvc", "repro"], repo, env)
                continue
            ran = {
                line.split("'")[1] for line in result.stdout.splitlines() if line.startswith("Running stage")
            }
            assert direct <= ran <= pipeline.downstream(direct), f"changing {section}.{key} ran {ran}"
            assert stage_status(repo, env) == {}
            break
        else:
            pytest.fail(f"no runnable change among {group}")


def test_module_edit_flags_exactly_the_stages_importing_it(repo):
    """An edit to any library module flags exactly the stages that import it."""
    repo, env = repo
    pipeline = Pipeline(repo)
    modules = sorted((repo / "pipeline").rglob("*.py")) + sorted((repo / "stages").glob("*.py"))
    for path in modules:
        path.write_text(path.read_text() + "# edited\n")
    status = stage_status(repo, env)
    for stage in pipeline.stages.values():
        entry = repo / "stages" / f"{stage.name}.py"
        expected = import_closure(repo, entry) | {f"stages/{stage.name}.py"}
        changes = [c["changed deps"] for c in status.get(stage.name, [])]
        assert len(changes) == 1, f"stage {stage.name}: {status.get(stage.name)}"
        assert set(changes[0]) == expected, f"stage {stage.name}"
        assert set(changes[0].values()) == {"modified"}


def test_bad_param_stops_the_stage_naming_the_key(repo):
    """A value out of range stops `dvc repro` before any work, naming `section.key`."""
    repo, env = repo
    lock = (repo / "dvc.lock").read_text()
    set_param(repo, "train", "lr", 2.0)
    out = run_failing(["dvc", "repro"], repo, env)
    assert "`train.lr` must be in (0, 1), got 2.0" in out
    assert (repo / "dvc.lock").read_text() == lock


def test_experiment_run_and_show(repo):
    """`dvc exp run -S train.lr=...` runs train and what follows; `dvc exp show` lists it
    with its params and the metrics of every stage that writes some."""
    repo, env = repo
    pipeline = Pipeline(repo)
    lr = pipeline.params["train"]["lr"] * 2
    run(["dvc", "exp", "run", "-n", "double-lr", "-S", f"train.lr={lr}"], repo, env)
    rows = json.loads(run(["dvc", "exp", "show", "--json"], repo, env))
    exps = [e for row in rows for e in (row.get("experiments") or [])]
    (exp,) = [e for e in exps if e.get("name") == "double-lr"]
    data = exp["revs"][0]["data"]
    assert data["params"]["params.yaml"]["data"]["train"]["lr"] == lr
    metric_files = {p for s in pipeline.stages.values() for p in s.outs if p.endswith(".json")}
    assert set(data["metrics"]) >= metric_files >= {"metrics/train.json", "metrics/evaluate.json"}
    assert data["metrics"]["metrics/train.json"]["data"]["mean"]["nmse"] > 0
    # The baseline's metrics differ: the experiment really retrained.
    baseline = rows[0]["rev"] == "workspace" and rows[1] or rows[0]
    assert (
        baseline["data"]["metrics"]["metrics/train.json"]["data"]
        != (data["metrics"]["metrics/train.json"]["data"])
    )
    assert "double-lr" in run(["dvc", "exp", "show"], repo, env)


def default_run_repo(dst: Path) -> tuple[Path, dict]:
    """A git repository holding this repository's pipeline definition and committed metrics
    (the default run's), without its multi-GB artifacts."""
    for name in ["dvc.yaml", "params.yaml", ".dvc/config", ".dvcignore"]:
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        (dst / name).write_bytes((ROOT / name).read_bytes())
    metrics = Pipeline(ROOT).params["paths"]["metrics"]
    shutil.copytree(ROOT / metrics, dst / metrics)  # metrics/plots/ too (the plots stage's)
    env = dvc_env(dst)
    run(["git", "init", "-q"], dst, env)
    git_commit(dst, env, "default run")
    return dst, env


def test_metrics_and_plots_show_on_default_run(tmp_path):
    """`dvc metrics show` lists the default run's metrics; `dvc plots show` renders the
    training curves to HTML."""
    repo, env = default_run_repo(tmp_path / "repo")
    metrics = json.loads(run(["dvc", "metrics", "show", "--json"], repo, env))
    data = metrics[""]["data"] if "" in metrics else metrics["workspace"]["data"]
    assert 0 < data["metrics/train.json"]["data"]["mean"]["nmse"] < 2
    assert "ce_recovered" in data["metrics/evaluate.json"]["data"]
    table = run(["dvc", "metrics", "show"], repo, env)
    assert "mean.nmse" in table and "ce_recovered" in table
    out = tmp_path / "plots"
    run(["dvc", "plots", "show", "-o", str(out)], repo, env)
    html = (out / "index.html").read_text()
    assert "vega" in html.lower() and "train_curve.csv" in html and "nmse" in html
