"""The training checkpoint: everything a resumed run needs to continue exactly, written
atomically and without pickles, as one safetensors file of tensor slices per rank plus a
JSON index, so that a run checkpointed on N ranks resumes on any number
(`pipeline.train.Trainer` saves and loads it).
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline.atomic import remove
from pipeline.distributed import World, barrier, gather_objects

logger = logging.getLogger(__name__)


class Checkpoint:
    """An atomic checkpoint of everything a resumed run needs to continue exactly, as a
    folder that every rank sees and that holds no pickle:

    - `rank-<r>.safetensors`: rank r's slice of every sharded tensor (the model's parameters
      and their Adam moments `exp_avg`, `exp_avg_sq`); rank 0's file also holds the tensors
      that are the same on every rank (`b_dec`, the scales);
    - `meta.json` (rank 0): the run's fingerprint, `step`, `history`, `bandwidth`, Adam's
      per-parameter `step` counts (`optimizer`), and per tensor its whole shape, its feature
      dim (null: the same on every rank) and which file holds which [start, stop) of it.

    So a run checkpointed on N ranks resumes on any number: each rank reads only the parts
    of the files that overlap its features (`read_tensors`). Every rank calls `save` (the
    ranks' files are written between two barriers, then rank 0 renames the staging folder
    into place) and `load`."""

    def __init__(self, folder: Path, fingerprint: dict, here: World = World()):
        self.path = folder / "checkpoint"
        self.fingerprint = fingerprint
        self.here = here

    def load(self, template: dict) -> dict | None:
        """The saved state with its tensors read into (copies of) `template["tensors"]`, this
        rank's slices (`template["feature_dims"]`, `template["features"]`, as `save` takes them),
        or None when there is none or it was written with other settings."""
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            return None
        meta = json.loads(meta_path.read_text())
        if meta.pop("fingerprint") != json.loads(json.dumps(self.fingerprint)):
            logger.warning("ignoring %s: written with other settings", self.path)
            return None
        layout = meta.pop("tensors")
        tensors = read_tensors(
            self.path, layout, template["tensors"], template["feature_dims"], template["features"]
        )
        return {**meta, "tensors": tensors}

    def save(self, *, tensors: dict, feature_dims: dict, features: tuple[int, int], **meta) -> None:
        """Write this rank's `tensors`: each one's slice [start, stop) = `features` along its
        feature dim (`feature_dims`), or, for the tensors whose dim is None, the whole tensor
        (rank 0 only); `meta` (JSON) goes to `meta.json`."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        if self.here.main:
            remove(tmp)
            tmp.mkdir(parents=True)
        self._barrier("train: checkpoint staged")
        file = f"rank-{self.here.rank}.safetensors"
        mine = {
            name: t.detach().cpu().contiguous()
            for name, t in tensors.items()
            if feature_dims[name] is not None or self.here.main
        }
        save_file(mine, tmp / file)
        ranges = [(file, list(features))]
        if self.here.distributed:
            ranges = gather_objects(ranges[0])  # on rank 0, once every rank has written
        if self.here.main:
            layout = {
                name: describe_tensor(t, feature_dims[name], ranges, main=file) for name, t in tensors.items()
            }
            meta_json = json.dumps({"fingerprint": self.fingerprint, **meta, "tensors": layout})
            (tmp / "meta.json").write_text(meta_json)
            remove(self.path)
            tmp.rename(self.path)
        self._barrier("train: checkpoint saved")

    def _barrier(self, name: str) -> None:
        """`barrier` for a checkpoint of several ranks: one of `World()` is saved by one
        process alone, while the others of a job may be elsewhere (the KL phase, rank 0's)."""
        if self.here.distributed:
            barrier(name)


def adam(parameters, lr: float, device: torch.device) -> torch.optim.Adam:
    """The Adam both training phases use (and `adam_tensors` / `load_adam` save and load):
    fused where torch has the kernel (one pass over each parameter instead of ~8: 5x faster
    on this CPU, where unfused Adam took a third of a training step)."""
    fused = device.type in ("cpu", "cuda")
    return torch.optim.Adam(parameters, lr=lr, betas=(0.9, 0.999), fused=fused)


def adam_tensors(optimizer: torch.optim.Optimizer, named: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """The Adam state of the parameters `named` (name -> parameter) for `Checkpoint.save`:
    tensors `optimizer.<name>.exp_avg` and `.exp_avg_sq` (zeros before the first step), and
    per name its `step` count (`{"step": n}`, a float32 count: exact as a JSON number)."""
    tensors, counts = {}, {}
    for name, p in named.items():
        state = optimizer.state.get(p) or {
            "step": torch.zeros((), dtype=torch.float32),
            "exp_avg": torch.zeros_like(p),
            "exp_avg_sq": torch.zeros_like(p),
        }
        counts[name] = {"step": state["step"].item()}
        for key in ("exp_avg", "exp_avg_sq"):
            tensors[f"optimizer.{name}.{key}"] = state[key]
    return tensors, counts


def load_adam(optimizer: torch.optim.Optimizer, named: dict, tensors: dict, counts: dict) -> None:
    """Set the Adam state of the parameters `named` to what `adam_tensors` saved (`tensors`
    as `Checkpoint.load` read them, `counts`)."""
    names = {id(p): name for name, p in named.items()}
    for group in optimizer.param_groups:
        # where Adam keeps `step`: on the parameter's device when fused, else the CPU
        on_device = group["fused"] or group["capturable"]
        for p in group["params"]:
            name = names[id(p)]
            step = torch.tensor(counts[name]["step"], dtype=torch.float32)
            optimizer.state[p] = {
                "step": step.to(p.device if on_device else "cpu"),
                **{key: tensors[f"optimizer.{name}.{key}"] for key in ("exp_avg", "exp_avg_sq")},
            }


def describe_tensor(t: torch.Tensor, dim: int | None, ranges: list, *, main: str) -> dict:
    """A tensor's entry in a checkpoint's `meta.json`: its whole shape, its feature dim and
    which rank file holds which [start, stop) of it (`ranges`: each rank's file and range),
    or, with `dim` None, the one file (`main`) that holds all of it."""
    if dim is None:
        return {"shape": list(t.shape), "feature_dim": None, "files": {main: None}}
    files = dict(ranges)
    bounds = sorted(files.values())
    assert bounds[0][0] == 0 and all(a[1] == b[0] for a, b in zip(bounds, bounds[1:])), bounds
    shape = [*t.shape[:dim], bounds[-1][1], *t.shape[dim + 1 :]]
    return {"shape": shape, "feature_dim": dim, "files": files}


def read_tensors(
    folder: Path, layout: dict, like: dict, feature_dims: dict, features: tuple[int, int]
) -> dict[str, torch.Tensor]:
    """This rank's slice [start, stop) = `features` (along each tensor's feature dim, or the
    whole tensor where `feature_dims` says None) of every tensor of `like`, read from the
    checkpoint `folder` whose `meta.json` describes them (`layout`), into new tensors of
    `like`'s dtypes and devices. Reads only the overlapping ranges of the rank files
    (`safe_open(...).get_slice`), so a rank never loads another rank's slice."""
    start, stop = features
    out = {}
    with contextlib.ExitStack() as stack:
        opened = {}

        def tensor(file: str, name: str):
            if file not in opened:
                opened[file] = stack.enter_context(safe_open(folder / file, framework="pt", device="cpu"))
            return opened[file].get_slice(name)

        for name, t in like.items():
            entry, dim = layout.get(name), feature_dims[name]
            expected = (dim, [n for i, n in enumerate(t.shape) if i != dim])  # all but the feature dim
            found = None
            if entry is not None:
                found = (entry["feature_dim"], [n for i, n in enumerate(entry["shape"]) if i != dim])
            if found != expected:
                raise ValueError(
                    f"checkpoint {folder} does not match this run's transcoder at {name!r}: expected "
                    f"feature dim {dim} and local shape {list(t.shape)}, found {entry}; delete {folder} "
                    "to start over"
                )
            into = torch.empty_like(t)
            if dim is None:
                (file,) = entry["files"]
                into.copy_(tensor(file, name)[:])
                out[name] = into
                continue
            have = 0
            for file, (lo, hi) in entry["files"].items():
                a, b = max(lo, start), min(hi, stop)
                if a < b:
                    index = (slice(None),) * dim + (slice(a - lo, b - lo),)
                    into.narrow(dim, a - start, b - a).copy_(tensor(file, name)[index])
                    have += b - a
            if have != stop - start:
                raise ValueError(
                    f"checkpoint {folder} holds {have} of features [{start}, {stop}) of {name!r}; "
                    f"delete {folder} to start over"
                )
            out[name] = into
    return out
