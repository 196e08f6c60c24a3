"""Fresh machine: what `scripts/setup.sh` installs is what the pipeline imports.

CI (`.ci/run`) runs the README's test command in a fresh clone, where `scripts/setup.sh`
builds a brand-new `.venv`: an install step missing there fails CI. These tests catch the
same mistakes here, where the developer's `.venv` may hold packages installed by hand.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys

import tomllib

from tests.dvc_repo import ROOT, imported_modules

LOCAL = {"pipeline", "stages", "bench", "tests", "scripts"}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {normalise(re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0]) for req in project["dependencies"]}


def optional_imports(path) -> set[str]:
    """Modules imported inside `try: ... except ImportError` (an optional feature that says
    what to install, such as `datasets` for `hf:` corpora)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Try) and any(
            isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
            for h in node.handlers
        ):
            for inner in node.body:
                for sub in ast.walk(inner):
                    if isinstance(sub, ast.Import):
                        found.update(a.name for a in sub.names)
                    elif isinstance(sub, ast.ImportFrom) and sub.module:
                        found.add(sub.module)
    return found


def test_pipeline_imports_only_declared_dependencies():
    """Every third-party module that `pipeline/` or `stages/` imports (lazily or not) comes
    from a distribution listed in pyproject's `dependencies` (optional features aside)."""
    distributions = importlib.metadata.packages_distributions()
    problems = []
    for path in sorted((ROOT / "pipeline").rglob("*.py")) + sorted((ROOT / "stages").glob("*.py")):
        for module in imported_modules(ROOT, path) - optional_imports(path):
            top = module.split(".")[0]
            if top in sys.stdlib_module_names or top in LOCAL or top == "__future__":
                continue
            dists = {normalise(d) for d in distributions.get(top, [])}
            if not dists & declared():
                problems.append(f"{path.relative_to(ROOT)} imports {top} (from {sorted(dists) or '?'})")
    assert not problems, "add to pyproject.toml `dependencies`:\n" + "\n".join(sorted(set(problems)))


def test_ci_runs_the_readme_commands():
    """The README's quick start is two commands; CI runs the test one verbatim."""
    readme = (ROOT / "README.md").read_text()
    commands = re.search(r"## Quick start\n```bash\n(.*?)```", readme, re.S).group(1).splitlines()
    assert len(commands) == 2 and commands[0].endswith("dvc repro") and commands[1].endswith("pytest")
    assert commands[1] in (ROOT / ".ci" / "run").read_text()
