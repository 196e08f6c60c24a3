"""`dvc push` and `dvc pull` of this repository's artifacts vs. copying the same files,
measured side by side.

    python -m bench.dvc_remote [--where /tmp] [--keep]

Works on the committed `dvc.lock` and the artifacts already in `.dvc/cache` (run after
`dvc repro`); it never changes this repository. In a temporary folder under `--where`:
1. `git clone` this repository as `push/`, pointed at this repository's cache (nothing is
   copied), and `dvc push` to a fresh local remote (`remote/`);
2. `git clone` again as `pull/` (its own empty cache) and `dvc pull` from that remote;
3. `cp -r` of the workspace artifacts, the same bytes, as the yardstick.
Prints files, bytes, seconds and each DVC step's time relative to the plain copy.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def sh(cmd: list[str], cwd: Path) -> float:
    """Run `cmd` (failing loudly) and return its wall time in seconds."""
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def cached_outs() -> list[tuple[str, int, int]]:
    """(path, files, bytes) of every output in dvc.lock that DVC caches (metrics and plots
    are `cache: false`: git holds them and DVC does not push them)."""
    lock = yaml.safe_load((ROOT / "dvc.lock").read_text())
    outs = []
    for stage in lock["stages"].values():
        for out in stage.get("outs", ()):
            in_git = subprocess.run(
                ["git", "ls-files", "--error-unmatch", out["path"]], cwd=ROOT, capture_output=True
            )
            if in_git.returncode != 0:
                outs.append((out["path"], out.get("nfiles", 1), out["size"]))
    return outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--where", default=tempfile.gettempdir(), help="folder for the clones and the remote")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args()
    dvc = str(Path(sys.executable).with_name("dvc"))
    outs = cached_outs()
    n_files = sum(n for _, n, _ in outs)
    n_bytes = sum(b for _, _, b in outs)
    tmp = Path(tempfile.mkdtemp(prefix="bench-dvc-remote-", dir=args.where))
    try:
        remote = tmp / "remote"
        sh(["git", "clone", "-q", str(ROOT), "push"], tmp)
        push = tmp / "push"
        sh([dvc, "cache", "dir", "--local", str(ROOT / ".dvc" / "cache")], push)
        sh([dvc, "remote", "add", "--local", "-d", "bench", str(remote)], push)
        t_push = sh([dvc, "push", "-j", "4"], push)
        sh(["git", "clone", "-q", str(ROOT), "pull"], tmp)
        pull = tmp / "pull"
        sh([dvc, "remote", "add", "--local", "-d", "bench", str(remote)], pull)
        t_pull = sh([dvc, "pull", "-j", "4"], pull)
        (tmp / "copy").mkdir()
        t_copy = sh(["cp", "-r", *[str(ROOT / p) for p, _, _ in outs], str(tmp / "copy")], ROOT)
        remote_files = sum(1 for p in remote.rglob("*") if p.is_file())
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"artifacts: {', '.join(p for p, _, _ in outs)}")
    print(f"{n_files} files, {n_bytes / 1e9:.2f} GB (remote holds {remote_files} files incl. .dir listings)")
    print(f"{'step':<26}{'seconds':>9}{'GB/s':>8}{'vs cp -r':>10}")
    for name, t in [
        ("cp -r (yardstick)", t_copy),
        ("dvc push (local remote)", t_push),
        ("dvc pull (fresh clone)", t_pull),
    ]:
        print(f"{name:<26}{t:>9.1f}{n_bytes / 1e9 / t:>8.2f}{t / t_copy:>10.2f}")


if __name__ == "__main__":
    main()
