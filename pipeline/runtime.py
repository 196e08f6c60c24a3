"""Where and how the pipeline runs: device, dtypes, threads, logging, and the stage runner.

Every stage entry point (`python -m stages.<name>`) and every `clt` command goes through
`run_stage` / `report_error`, so a user error (a bad params value, a missing file, a
corrupted store) prints one `Error: ...` line on stderr instead of a traceback. Set
`CLT_DEBUG=1` (or pass `clt --debug`) to get the traceback.

`CLT_NPROC=N` (N > 1) makes `run_stage` re-run a stage that can run distributed under
torchrun with N processes (`python -m torch.distributed.run --standalone
--nproc_per_node=N -m stages.<name>`) unless it already runs under a launcher; the other
stages run on one process as always; `dvc.yaml`'s commands and every stage's hash stay
the same, so `CLT_NPROC=2 dvc repro` re-runs nothing that one process had brought up to
date (see `pipeline.distributed` for what runs where).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys
from collections.abc import Callable

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
"""The dtype names params.yaml and the activation store use, and their torch dtypes."""

DEBUG_ENV = "CLT_DEBUG"
NPROC_ENV = "CLT_NPROC"


def torch_dtype(name: str, device: torch.device | None = None) -> torch.dtype:
    """The torch dtype of a dtype name; `auto` is `fast_dtype(device)`."""
    return fast_dtype(device) if name == "auto" else DTYPES[name]


def fast_dtype(device: torch.device | None = None) -> torch.dtype:
    """bfloat16 where its matmuls run natively (CUDA with bf16, a CPU with AMX or AVX-512
    bf16), else float32: on a CPU without them torch emulates bf16 matmuls at ~1/200 of
    the float32 speed (measured on a 2-core AVX2 EPYC: 0.2 vs 54 GFLOP/s)."""
    device = device or resolve_device("auto")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu" and (torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()):
        return torch.bfloat16
    return torch.float32


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` means CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"`runtime.device` is {name!r} but CUDA is not available; use auto or cpu")
    return device


def configure_torch(num_threads: int) -> None:
    """Apply `runtime.num_threads` (0 keeps torch's default)."""
    if num_threads:
        torch.set_num_threads(num_threads)


_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc's <malloc.h>


@functools.cache
def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for the next allocation instead of handing it
    back to the OS; returns whether it could (False off glibc, where nothing changes).

    PyTorch's CPU tensors come from malloc, and glibc serves every allocation above 32 MB
    (the most `M_MMAP_THRESHOLD` takes) with a fresh `mmap` and unmaps it on free: a
    training step's large tensors (activations of (n_layers, n_tokens, d_tc), gradients,
    the bf16 copy of the decoder) then page-fault all their memory in again, every step.
    With `mmap` off (in every thread: one arena) and the heap never trimmed, they reuse
    the last step's pages: 30 steps of the default `clt train` took 24-27 s instead of
    31 s, with 1.2M page faults instead of 7.7M and the same peak memory. The process
    keeps its peak memory until it exits, as a caching allocator (jemalloc, tcmalloc,
    CUDA's) does, and may hold more than that: a hole left by a freed tensor takes only a
    smaller one (each allocation is 64-byte aligned), so a loop that allocates one size
    between small objects grows the heap until its holes merge (~9x the tensor in
    `tests/test_runtime.py`). The train stage uses it (`pipeline.train.run`), where its
    allocations repeat each step and were measured; other stages keep glibc's default."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))
    return all([bool(mallopt(option, value)) for option, value in settings])


def setup_logging(level: int = logging.INFO) -> None:
    """Log to stderr with timestamps; used by the stage entry points and the CLI."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").lower() not in ("", "0", "false", "no")


def report_error(error: BaseException, *, where: str = "") -> int:
    """Print `error` as one `Error:` line on stderr (after `where`, e.g. `rank 1/2: `);
    returns the exit code: 2 for a bad params value (a usage error), 1 for anything else."""
    from pipeline.config import ParamsError

    if isinstance(error, (ValueError, OSError)):  # ours say what, where and the fix
        message = str(error)
    else:  # a failure of another kind: name it, and how to see where it happened
        message = f"{type(error).__name__}: {error} (set {DEBUG_ENV}=1 for the traceback)"
    message = " ".join(line.strip() for line in message.splitlines() if line.strip())
    print(f"Error: {where}{message}", file=sys.stderr)
    return 2 if isinstance(error, ParamsError) else 1


def nproc() -> int:
    """The processes `CLT_NPROC` asks for (1 when unset)."""
    value = os.environ.get(NPROC_ENV, "1").strip() or "1"
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{NPROC_ENV} must be a whole number of processes >= 1, got {value!r}")
    return int(value)


def torchrun_command(n: int) -> list[str] | None:
    """The command that re-runs this process's `python -m <module>` (or script) under
    torchrun with `n` processes, or None when there is nothing to do: one process, or
    already under a launcher (torchrun sets WORLD_SIZE)."""
    if n == 1 or "WORLD_SIZE" in os.environ:
        return None
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    target = ["-m", spec.name] if spec is not None else [sys.argv[0]]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
    return [*torchrun, *target, *sys.argv[1:]]


def run_stage(run: Callable, params_path: str = "params.yaml", *, distributed: bool = False) -> None:
    """Set up logging, read and validate `params.yaml` (a bad value stops here, before any
    work), apply the `runtime` settings, then call `run(params)`. An error exits with one
    `Error:` line (`report_error`, naming the rank under torchrun), or its traceback with
    `CLT_DEBUG=1`. For a `distributed` stage (one whose `run` splits its work over the
    ranks of `pipeline.distributed`), `CLT_NPROC=N` first replaces the process with N
    processes under torchrun (`torchrun_command`), each of which runs this again."""
    from pipeline.config import load_params

    setup_logging()
    where = ""
    try:
        command = torchrun_command(nproc()) if distributed else None
        if command is not None:
            logging.getLogger(__name__).info("%s=%s: %s", NPROC_ENV, os.environ[NPROC_ENV], " ".join(command))
            sys.stdout.flush()
            sys.stderr.flush()
            os.execv(sys.executable, command)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            where = f"rank {os.environ.get('RANK', '?')}/{os.environ['WORLD_SIZE']}: "
        params = load_params(params_path)
        configure_torch(params.runtime.num_threads)
        run(params)
        # A stage that joined a process group (it imported pipeline.distributed) leaves it;
        # not importing that module here keeps it out of the deps of the stages that do not.
        if "pipeline.distributed" in sys.modules:
            sys.modules["pipeline.distributed"].shutdown()
    except Exception as e:
        if debug_enabled():
            raise
        sys.exit(report_error(e, where=where))
