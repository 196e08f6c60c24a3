"""Running a stage on N processes with torch.distributed (`torchrun`).

One process needs no launcher: `world()` is then rank 0 of 1 and every collective here is
a no-op. Under `torchrun` (it sets RANK, WORLD_SIZE, MASTER_ADDR, ...) the first call of
`world()` joins the process group: `nccl` when the stage runs on CUDA, `gloo` on CPU, with
a timeout (`CLT_DIST_TIMEOUT` seconds, default 60) so that a rank that died makes the
others fail with an error naming it instead of hanging.
"""

from __future__ import annotations

import datetime
import os
import signal
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

TIMEOUT_ENV = "CLT_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 60
WORK_TIMEOUT_ENV = "CLT_DIST_WORK_TIMEOUT"
DEFAULT_WORK_TIMEOUT_S = 3600
"""How long `wait_for_ranks` waits for the other ranks to finish their share of the work."""
FAULT_ENV = "CLT_FAULT"
"""Tests only: `<point>@<rank>` kills that rank at fault point `<point>` (`fault`);
`<point>@<rank>:hang` makes it hang there instead."""


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def owns(self, index: int) -> bool:
        """Round-robin ownership of work item `index` (a shard, a prompt, a token block)."""
        return index % self.size == self.rank

    def block(self, n: int) -> range:
        """This rank's contiguous share of `n` work items, in rank order (sizes differ by
        at most one): for work whose results are combined in item order."""
        return range(n * self.rank // self.size, n * (self.rank + 1) // self.size)


def launched() -> bool:
    """True under `torchrun` (or any launcher that sets WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))


def world(device: torch.device | None = None) -> World:
    """This process's place in the job; joins the process group on first use under a launcher."""
    if not launched():
        return World()
    if not dist.is_initialized():
        cuda = device is not None and device.type == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout())
        _make_work_group()
    return World(dist.get_rank(), dist.get_world_size())


def local_device(device: torch.device) -> torch.device:
    """On CUDA under a launcher, each rank's own GPU (LOCAL_RANK)."""
    if device.type == "cuda" and launched():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def barrier(name: str) -> None:
    """Wait for every rank; a rank that does not arrive within the timeout fails the job
    with a message naming the barrier."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        dist.monitored_barrier(timeout=timeout(), wait_all_ranks=True) if _gloo() else dist.barrier()
    except RuntimeError as e:
        raise RuntimeError(f"rank {dist.get_rank()}: barrier {name!r} failed: {e}") from e


_work_group = None


def wait_for_ranks(name: str) -> None:
    """Wait for every rank to finish its share of the work (its shards, its graphs), which
    may take longer than `barrier`'s timeout: up to `CLT_DIST_WORK_TIMEOUT` seconds
    (default 3600), on a gloo group of its own (on gloo too: its sends wait as long as
    their group's timeout, whatever `monitored_barrier` is given). A
    rank that died is reported by torchrun at once; one that hangs fails the others here,
    by name."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if _work_group is None:  # a process group that `world` did not make
            _make_work_group()
        dist.monitored_barrier(group=_work_group, timeout=_work_timeout(), wait_all_ranks=True)
    except RuntimeError as e:
        raise RuntimeError(f"rank {dist.get_rank()}: waiting for every rank at {name!r} failed: {e}") from e


def _work_timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=float(os.environ.get(WORK_TIMEOUT_ENV, DEFAULT_WORK_TIMEOUT_S)))


def _make_work_group() -> None:
    """The gloo group of `wait_for_ranks`, made by every rank as it joins the job: made at
    a first wait instead, a hung rank would fail the others in the group's creation, with
    a message that does not name it."""
    global _work_group
    _work_group = dist.new_group(backend="gloo", timeout=_work_timeout())


def _gloo() -> bool:
    return dist.get_backend() == "gloo"


def all_gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order (one process: `[obj]`)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_objects(obj, dst: int = 0) -> list | None:
    """On rank `dst`, every rank's `obj` in rank order; None on the others (one process:
    `[obj]`). Tensors in `obj` should be on the CPU: they are unpickled on their device."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s `obj` on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shutdown() -> None:
    global _work_group
    _work_group = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def fault(point: str) -> None:
    """A fault point for the tests (`CLT_FAULT=<point>@<rank>[:hang]`): this rank kills
    itself with SIGKILL here (or hangs, to test the barrier timeout); a no-op otherwise."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    where, _, mode = spec.partition(":")
    if where != f"{point}@{os.environ.get('RANK', '0')}":
        return
    if mode == "hang":
        while True:
            time.sleep(60)
    os.kill(os.getpid(), signal.SIGKILL)
