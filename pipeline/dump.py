"""Running the model over packed sequences and writing every layer's MLP input and
output to the activation store.

1. `capture_activations` registers hooks that copy each layer's MLP input (forward
   pre-hook of the module named by `Architecture.mlp_input`) and MLP block output
   (forward hook of `Architecture.mlp_output`) straight into the rows of a host buffer
   in the storage dtype (the `StoreWriter` refuses NaN/inf and float16 overflow).
2. `dump_activations` fills one shard-sized buffer pair batch by batch with forward
   passes of the trunk (no LM head), then hands it to a background writer thread and
   fills the other pair meanwhile, so compute and disk writes overlap.
3. The `StoreWriter` writes whole shards only and makes the run resumable; with
   `dump.store_url` it writes them to object storage and a manifest of the store at
   `paths.activations` (`pipeline.remote`).

Under `torchrun` the shards are split over the ranks (shard u on rank u mod N, data
parallel: each rank runs the whole model on its own shards); the store's bytes are those
of one process (`pipeline.store`).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from pipeline.codec import encode, storage_dtype, storage_view
from pipeline.config import Params
from pipeline.corpus import PackedCorpus, iter_documents, pack_documents
from pipeline.distributed import World, local_device, world
from pipeline.model import (
    bos_token_id,
    get_architecture,
    get_layers,
    get_trunk,
    load_model,
    max_context,
)
from pipeline.runtime import resolve_device, torch_dtype
from pipeline.shards import aligned_empty
from pipeline.store import ACTIVATIONS, StoreSchema, StoreWriter, hash_arrays

logger = logging.getLogger(__name__)


class _Target:
    """The host rows the hooks write the current batch into, in the storage layout of the
    store's logical `dtype` (`pipeline.codec.encode`)."""

    def __init__(self, dtype: str = "float32"):
        self.dtype = dtype
        self.buffers: dict[str, torch.Tensor] | None = None  # name -> (rows, *row_shape)


@contextlib.contextmanager
def capture_activations(model: nn.Module, target: _Target) -> Iterator[None]:
    """Copy every layer's MLP input and output into `target.buffers` during forward passes."""
    arch = get_architecture(model)
    handles = []

    def store(name: str, layer: int, hidden: torch.Tensor) -> None:
        dst = target.buffers[name][:, layer]  # (rows, d_model or d_model + 4 for float8)
        dst.copy_(encode(hidden, target.dtype).reshape(dst.shape))

    for layer, block in enumerate(get_layers(model)):

        def pre_hook(module, args, kwargs, layer=layer):
            store("resid_mid", layer, args[0] if args else kwargs["hidden_states"])

        def post_hook(module, args, output, layer=layer):
            store("mlp_out", layer, output[0] if isinstance(output, tuple) else output)

        handles.append(
            block.get_submodule(arch.mlp_input).register_forward_pre_hook(pre_hook, with_kwargs=True)
        )
        handles.append(block.get_submodule(arch.mlp_output).register_forward_hook(post_hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def make_schema(model: nn.Module, model_name: str, corpus: PackedCorpus, cfg) -> StoreSchema:
    """The store schema for dumping `corpus` through `model` with `DumpConfig` `cfg`."""
    n_seqs, context_len = corpus.token_ids.shape
    shard_tokens = cfg.shard_tokens
    if shard_tokens % context_len:
        raise ValueError(
            f"`dump.shard_tokens` ({shard_tokens}) must be a multiple of `corpus.context_len` "
            f"({context_len}) so no sequence straddles two shards"
        )
    return StoreSchema(
        model=model_name,
        architecture=type(model).__name__,
        n_layers=model.config.num_hidden_layers,
        d_model=model.config.hidden_size,
        context_len=context_len,
        n_tokens=n_seqs * context_len,
        shard_tokens=shard_tokens,
        chunk_tokens=min(cfg.chunk_tokens, shard_tokens),
        dtype=cfg.dtype,
        corpus_sha256=hash_arrays(corpus.token_ids, corpus.doc_ids),
        compute_dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
    )


def dump_activations(
    model: nn.Module,
    corpus: PackedCorpus,
    out_path,
    *,
    schema: StoreSchema,
    batch_size: int,
    progress: bool = True,
    world: World = World(),
    manifest=None,
):
    """Write the activations of `corpus` to a complete store at `out_path` (and, for a
    URL, its manifest at local path `manifest`, if given), resuming if possible; with
    several ranks, this rank writes the shards it owns."""
    n_seqs, context_len = corpus.token_ids.shape
    positions = np.broadcast_to(np.arange(context_len, dtype=np.int32), (n_seqs, context_len))
    writer = StoreWriter(
        out_path, schema, corpus.token_ids, corpus.doc_ids, positions, world=world, manifest=manifest
    )
    device = next(model.parameters()).device
    trunk = get_trunk(model)
    shape = (schema.shard_tokens, *schema.row_shape)
    # Two buffer pairs: the hooks fill one while the writer thread writes the other.
    host = [{n: aligned_empty(shape, storage_dtype(schema.dtype)) for n in ACTIVATIONS} for _ in range(2)]
    views = [{n: storage_view(b[n], schema.dtype) for n in ACTIVATIONS} for b in host]
    pending: list[Future | None] = [None, None]
    target = _Target(schema.dtype)
    bar = tqdm(
        total=sum(stop - start for start, stop in map(schema.shard_rows, writer.shards_todo)),
        unit="tok",
        desc="dump",
        disable=not (progress and world.main),  # rank 0's share stands for all
        smoothing=0.1,
    )
    with (
        ThreadPoolExecutor(max_workers=1) as pool,
        capture_activations(model, target),
        torch.inference_mode(),
    ):
        for i, shard in enumerate(writer.shards_todo):
            slot = i % 2
            if pending[slot] is not None:
                pending[slot].result()  # the writer is done with this buffer pair
            start, stop = schema.shard_rows(shard)
            first_seq = start // context_len
            n_shard_seqs = (stop - start) // context_len
            for b0 in range(0, n_shard_seqs, batch_size):
                b1 = min(b0 + batch_size, n_shard_seqs)
                rows = slice(b0 * context_len, b1 * context_len)
                target.buffers = {n: views[slot][n][rows] for n in ACTIVATIONS}
                ids = torch.from_numpy(corpus.token_ids[first_seq + b0 : first_seq + b1]).to(device)
                trunk(input_ids=ids.long(), use_cache=False)
                bar.update(rows.stop - rows.start)
            arrays = {n: host[slot][n][: stop - start] for n in ACTIVATIONS}
            pending[slot] = pool.submit(writer.write_shard, shard, arrays)
            # Surface a failed write now rather than after the whole run.
            other = pending[1 - slot]
            if other is not None and other.done():
                other.result()
        for f in pending:
            if f is not None:
                f.result()
    bar.close()
    return writer.finalize()


def check_materialised(model_dir: str | Path, name: str) -> None:
    """Refuse a model folder that the model stage did not materialise from `model.name`
    `name` (it records the name in `source.json`), so `dump` never runs a stale model.

    A `model.name` that is the folder `model_dir` itself needs no record.
    """
    model_dir = Path(model_dir)
    fix = "run `dvc repro model` (or `clt model`) first"
    if model_dir.resolve() == Path(name).expanduser().resolve():
        return
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model folder {model_dir} (`paths.model_dir`) does not exist; {fix}")
    source = model_dir / "source.json"
    if not source.is_file():
        raise ValueError(
            f"{model_dir} has no source.json, so the model stage did not materialise it from "
            f"`model.name` {name!r}; {fix}"
        )
    try:
        found = json.loads(source.read_text())["model.name"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{source} does not record a `model.name` ({e!r}); {fix}") from e
    if found != name:
        raise ValueError(
            f"`model.name` is {name!r} but {model_dir} holds {found!r} (materialised by the model "
            f"stage); {fix}"
        )


def run(params: Params, *, progress: bool = True):
    """The `dump` stage: pack the corpus and store the model's activations on it."""
    check_materialised(params.paths.model_dir, params.model.name)
    device = resolve_device(params.runtime.device)
    ranks = world(device)
    device = local_device(device)
    model, tokenizer = load_model(
        params.paths.model_dir, dtype=torch_dtype(params.model.dtype, device), device=device
    )
    limit = max_context(model.config)
    if limit is not None and params.corpus.context_len > limit:
        raise ValueError(
            f"`corpus.context_len` is {params.corpus.context_len} but the model supports at most "
            f"{limit} positions; lower it"
        )
    corpus = pack_documents(
        iter_documents(params.corpus.path, params.corpus.text_field),
        tokenizer,
        context_len=params.corpus.context_len,
        n_tokens=params.dump.n_tokens,
        bos_token_id=bos_token_id(tokenizer),
    )
    schema = make_schema(model, params.model.name, corpus, params.dump)
    out, manifest = params.paths.activations, None
    if params.dump.store_url is not None:  # the store on object storage, its manifest for DVC
        out, manifest = params.dump.store_url, params.paths.activations
    if ranks.main:
        logger.info(
            "dumping %d tokens x %d layers x %d dims (%s) to %s in %d shards on %d process(es)",
            schema.n_tokens,
            schema.n_layers,
            schema.d_model,
            schema.dtype,
            out,
            schema.n_shards,
            ranks.size,
        )
    return dump_activations(
        model,
        corpus,
        out,
        schema=schema,
        batch_size=params.dump.batch_size,
        progress=progress,
        world=ranks,
        manifest=manifest,
    )
