"""sha256 of every artifact of the tiny end-to-end pipeline, to check that a refactor
leaves the bytes unchanged.

    python -m scripts.tiny_artifacts --out before.json            # on the old commit
    python -m scripts.tiny_artifacts --compare before.json         # on the new one

Builds the tiny random model at `--model-dir` (the same path both times: the model stage
records `model.name`), runs `dvc repro` on the tiny configuration of `tests/dvc_repo.py`
in a temporary copy of this checkout, and hashes every stage output. `--compare` lists
the files whose bytes differ (and those only one side has) and exits 1 if any does,
except those named with `--allow` (formats a change means to alter).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from tests.dvc_repo import Pipeline, file_hashes, make_tiny_repo, run
from tests.tiny import make_model


def tiny_artifact_hashes(model_dir: Path) -> dict[str, str]:
    if not (model_dir / "config.json").is_file():
        make_model("llama", model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        repo, env = make_tiny_repo(Path(tmp) / "repo", model_dir)
        run(["dvc", "repro"], repo, env)
        outs = [o for s in Pipeline(repo).stages.values() for o in s.outs]
        return file_hashes(repo, outs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "clt-tiny-model")
    parser.add_argument("--out", type=Path, help="write the hashes here (JSON)")
    parser.add_argument("--compare", type=Path, help="hashes (JSON) to compare with")
    parser.add_argument("--allow", nargs="*", default=[], help="files allowed to differ")
    args = parser.parse_args()
    hashes = tiny_artifact_hashes(args.model_dir)
    if args.out:
        args.out.write_text(json.dumps(hashes, indent=1, sort_keys=True) + "\n")
    if not args.compare:
        print(f"{len(hashes)} files hashed")
        return
    before = json.loads(args.compare.read_text())
    differ = sorted(k for k in set(before) | set(hashes) if before.get(k) != hashes.get(k))
    for name in differ:
        status = "only before" if name not in hashes else "only after" if name not in before else "differs"
        print(f"{status:12} {name}{' (allowed)' if name in args.allow else ''}")
    same = len(set(before) & set(hashes)) - sum(1 for k in differ if k in before and k in hashes)
    print(f"{same} files identical, {len(differ)} differ")
    sys.exit(1 if set(differ) - set(args.allow) else 0)


if __name__ == "__main__":
    main()
