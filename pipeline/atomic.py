"""Writing artifacts so that a crash never leaves a half-written one in place.

Everything is built at a staging path beside its destination (`<name>.partial` for a
folder, `<name>.tmp` for a file, or another suffix the caller names) and moved into place
with one rename, so a reader, DVC, or a resumed run sees the old artifact or the new one,
never a mixture. `tests/dvc_repo.py` `STAGING_SUFFIXES` lists the suffixes that may be
left behind by a killed run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def remove(path: Path) -> None:
    """Delete a file or a folder tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def move_into_place(staging: Path, out: Path) -> None:
    """Replace `out` (a file or a folder, if any) with `staging`."""
    if out.is_dir() and not out.is_symlink():
        shutil.rmtree(out)
    os.replace(staging, out)


@contextlib.contextmanager
def staged(out: str | Path, *, suffix: str = ".partial", folder: bool = False) -> Iterator[Path]:
    """A fresh staging path beside `out` (what an earlier run left there is removed; with
    `folder` it is created as an empty folder); when the block finishes without an error,
    the staging path replaces `out`. After an error it is left for the next run to remove."""
    out = Path(out)
    staging = out.with_name(out.name + suffix)
    remove(staging)
    if folder:
        staging.mkdir(parents=True)
    yield staging
    move_into_place(staging, out)


def write_json(path: str | Path, data) -> None:
    """`data` as indented UTF-8 JSON at `path`, atomically."""
    with staged(path, suffix=".tmp") as tmp:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
