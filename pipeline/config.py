"""Typed, validated views of `params.yaml`: one frozen dataclass per section.

This module is the only reader of `params.yaml`. Every value is checked when a section is
built, from `params.yaml` or directly in Python: an unknown key (a typo), a wrong type or an
out-of-range value raises a `ParamsError` (a `ValueError`) that names `section.key`, what
was found and what is allowed.

A field's allowed range is declared next to it, `n_steps: Annotated[int, Ge(1)] = 400`, and
enforced by one generic check (`Section.__post_init__`); a `Hint` is appended to the field's
errors. The few rules that are not a range (a multiple of another key, a pattern) live in the
section's `_check`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml

DTypeName = Literal["auto", "float32", "bfloat16", "float16"]

ComputeDTypeName = Literal["auto", "bfloat16", "float32"]
"""Dtype of a transcoder's matmuls; its parameters stay float32."""


class ParamsError(ValueError):
    """A bad value in `params.yaml`, or in a section built in Python: the message names
    `section.key`, what was found and what is allowed."""


def _fail(where: str, msg: str) -> typing.NoReturn:
    raise ParamsError(f"`{where}` {msg}")


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(path) -> bool:
    """True for a URL with a scheme (`s3://...`: a store on object storage), false for a
    local path."""
    return isinstance(path, str) and _URL.match(path) is not None


def url_problem(url: str) -> str | None:
    """What is wrong with `url` as the place of an activation store, or None: a URL whose
    scheme fsspec knows, naming a `.zarr` prefix (a new dump deletes what an older store
    left under it, so never a bucket's root)."""
    import fsspec

    if not is_url(url):
        return f"must be a URL such as s3://bucket/acts.zarr, got {url!r}"
    scheme = url.split("://", 1)[0].lower()
    if scheme not in fsspec.available_protocols():
        return f"has the scheme {scheme!r}, which fsspec does not know (s3, gs, az, memory, ...), in {url!r}"
    if not url.rstrip("/").endswith(".zarr"):
        return f"must name a `.zarr` prefix, e.g. s3://bucket/acts.zarr, got {url!r}"
    return None


@dataclass(frozen=True)
class Bound:
    """Range marker for `Annotated`: a lower or upper bound on a field, inclusive or not
    (written `Ge(1)`, `Gt(0)`, `Le(9)`, `Lt(1)`)."""

    value: float
    lower: bool
    inclusive: bool

    def admits(self, x) -> bool:
        if self.lower:
            return x >= self.value if self.inclusive else x > self.value
        return x <= self.value if self.inclusive else x < self.value


def Ge(value: float) -> Bound:
    return Bound(value, lower=True, inclusive=True)


def Gt(value: float) -> Bound:
    return Bound(value, lower=True, inclusive=False)


def Le(value: float) -> Bound:
    return Bound(value, lower=False, inclusive=True)


def Lt(value: float) -> Bound:
    return Bound(value, lower=False, inclusive=False)


@dataclass(frozen=True)
class Hint:
    """Marker for `Annotated`: advice appended to every error of the field (`...; {text}`)."""

    text: str


@dataclass(frozen=True)
class _FieldSpec:
    """A section field's type without its markers, and the markers."""

    tp: Any
    lower: Bound | None
    upper: Bound | None
    hint: str | None


@cache
def _field_specs(cls: type) -> dict[str, _FieldSpec]:
    """Each field of section `cls`, read from its `Annotated[...]` type."""
    hints = typing.get_type_hints(cls, include_extras=True)
    specs = {}
    for f in dataclasses.fields(cls):
        tp, marks = hints[f.name], ()
        if typing.get_origin(tp) is Annotated:
            tp, *marks = typing.get_args(tp)
        (lower,) = [m for m in marks if isinstance(m, Bound) and m.lower] or [None]  # at most one of each
        (upper,) = [m for m in marks if isinstance(m, Bound) and not m.lower] or [None]
        (hint,) = [m.text for m in marks if isinstance(m, Hint)] or [None]
        specs[f.name] = _FieldSpec(tp, lower, upper, hint)
    return specs


def _check_range(where: str, value: Any, spec: _FieldSpec) -> None:
    """Raise naming `where` unless `value` lies within the field's declared bounds."""
    lo, hi = spec.lower, spec.upper
    if all(b is None or b.admits(value) for b in (lo, hi)):
        return
    if lo is not None and hi is not None:
        if lo.inclusive and hi.inclusive and spec.tp is int:
            allowed = f"in {lo.value}..{hi.value}"
        else:
            left, right = "[" if lo.inclusive else "(", "]" if hi.inclusive else ")"
            allowed = f"in {left}{lo.value}, {hi.value}{right}"
    else:
        bound = lo or hi
        allowed = f"{'>' if bound.lower else '<'}{'=' if bound.inclusive else ''} {bound.value}"
    _fail(where, f"must be {allowed}, got {value}")


class Section:
    """Base of the section dataclasses: every field is checked when an instance is made, however
    it is made (`params.yaml`, `dataclasses.replace`, `TrainConfig(k=4)` in a test)."""

    _section: ClassVar[str]
    """The section's name in `params.yaml`, the `section` of every error's `section.key`."""

    def __post_init__(self):
        for name, spec in _field_specs(type(self)).items():
            where = f"{self._section}.{name}"
            try:
                value = _check_type(where, getattr(self, name), spec.tp)
                _check_range(where, value, spec)
            except ValueError as e:
                if spec.hint is None:
                    raise
                raise ParamsError(f"{e}; {spec.hint}") from None
            object.__setattr__(self, name, value)  # a lossless conversion, e.g. int to float
        self._check()

    def _check(self) -> None:
        """The section's rules that are not a field's range; run once every field has passed."""


@dataclass(frozen=True)
class PathsConfig(Section):
    """Where each stage reads and writes; `dvc.yaml` interpolates the same values."""

    _section = "paths"

    model_dir: str = "data/model"
    """The resolved model, materialised as a plain Hugging Face folder."""
    activations: str = "data/activations.zarr"
    """The Zarr store of MLP inputs and outputs written by `dump` (a local folder, or an
    fsspec URL such as `s3://bucket/acts.zarr` outside DVC); with `dump.store_url`, the
    store's manifest, a `.json` file."""
    transcoder: str = "data/transcoder"
    """The trained transcoder in circuit-tracer's folder format, written by `train`."""
    metrics: str = "metrics"
    """Folder of DVC metrics (`train.json`, `evaluate.json`) and plots (`train_curve.csv`)."""
    examples: str = "data/examples"
    """Parquet tables of every feature's examples and statistics, written by `examples`."""
    features: str = "data/features"
    """Packed features in circuit-tracer's binary format (docs/formats.md), written by `pack`."""
    prompts: str = "data/prompts"
    """Folder of `*.txt` prompts, one per file; the file name (without .txt) is the graph's slug."""
    graphs: str = "data/graphs"
    """Attribution graphs (`{slug}.json`, `{slug}.png`, `graph-metadata.json`), written by `graphs`."""
    plots: str = "metrics/plots"
    """Pictures of the dictionary (`*.png`) and their data (`*.csv`, DVC plots), written by `plots`."""


@dataclass(frozen=True)
class ModelConfig(Section):
    """Which language model to trace."""

    _section = "model"

    name: str = "smollm2-135m-instruct"
    """A built-in alias (see `pipeline.model.ALIASES`), a Hugging Face id, a local Hugging
    Face folder, or a `.gguf` file."""
    dtype: DTypeName = "auto"
    """Compute dtype of the model's forward passes; `auto`: bfloat16 on CUDA and on CPUs
    with native bf16 matmuls (AMX, AVX-512 bf16: ~4x float32), float32 elsewhere (emulated
    bf16 is ~200x slower) (`pipeline.runtime.fast_dtype`)."""


@dataclass(frozen=True)
class CorpusConfig(Section):
    """The text the activations are computed on."""

    _section = "corpus"

    path: Annotated[str, Hint("name a file, a folder or an `hf:` dataset")] = "data/corpus/default.jsonl.gz"
    """A .txt / .jsonl(.gz) / .parquet file, a folder of them, or `hf:<dataset id>[:split]`."""
    text_field: str = "text"
    """Column or JSON key holding the text (jsonl, parquet, Hugging Face datasets)."""
    context_len: Annotated[int, Ge(2), Hint("a sequence is BOS plus at least one token")] = 128
    """Tokens per packed sequence, BOS at position 0 included."""


@dataclass(frozen=True)
class DumpConfig(Section):
    """The `dump` stage: model activations to a sharded Zarr store."""

    _section = "dump"

    n_tokens: Annotated[int, Ge(1)] = 98304
    """Tokens to store (rounded down to whole sequences); sized for the disk budget:
    each token stores 2 x n_layers x d_model values."""
    batch_size: Annotated[int, Ge(1)] = 16
    """Sequences per forward pass."""
    shard_tokens: Annotated[int, Ge(1)] = 8192
    """Tokens per shard file (one file per shard per array); a multiple of `chunk_tokens`."""
    chunk_tokens: Annotated[int, Ge(1)] = 512
    """Tokens per inner chunk (the unit a reader can fetch without the whole shard)."""
    dtype: Literal["bfloat16", "float16", "float32", "float8_e4m3"] = "float8_e4m3"
    """Storage dtype. float8_e4m3 (half of bfloat16's bytes): uint8 rows of float8 values
    scaled to each (token, layer) row's max |value|, plus that float32 scale
    (`pipeline.codec.encode`); readers get bfloat16. A CLT trained from it matches one
    trained from bfloat16 (docs/results.md). bfloat16 is stored as uint16 with a
    `logical_dtype` attribute."""
    store_url: str | None = None
    """Write the store to object storage at this URL (`s3://bucket/acts.zarr`, any fsspec
    URL of a `.zarr` prefix) and a manifest of it at `paths.activations` (a `.json` file):
    DVC then caches and hashes the manifest, not the shards (`pipeline/remote.py`); the
    endpoint and credentials come from the environment (`AWS_ENDPOINT_URL`, ...). null: a
    local store at `paths.activations`."""

    def _check(self):
        if self.shard_tokens % self.chunk_tokens:
            _fail(
                "dump.shard_tokens",
                f"must be a multiple of `dump.chunk_tokens` ({self.chunk_tokens}), got {self.shard_tokens}",
            )
        if self.store_url is not None and (problem := url_problem(self.store_url)):
            _fail("dump.store_url", problem)


@dataclass(frozen=True)
class TrainConfig(Section):
    """The `train` stage: the transcoder, its loss and its optimisation."""

    _section = "train"

    kind: Literal["clt", "plt"] = "clt"
    """`clt`: cross-layer (each layer decodes to itself and every later layer);
    `plt`: per-layer transcoders (each layer decodes to itself only), the baseline."""
    activation: Literal["jumprelu", "topk", "batchtopk"] = "jumprelu"
    """JumpReLU (trained thresholds, the paper's), or TopK / BatchTopK (converted to
    JumpReLU thresholds with the same per-layer L0 at export)."""
    d_transcoder: Annotated[int, Ge(1)] = 256
    """Features per layer."""
    k: Annotated[int, Ge(1)] = 32
    """Active features per layer and token for topk / batchtopk."""
    n_steps: Annotated[int, Ge(1)] = 400
    """Optimiser steps (of the MSE training; the KL phase's are `kl_steps`)."""
    batch_size: Annotated[int, Ge(1)] = 1024
    """Tokens per step."""
    lr: Annotated[float, Gt(0), Lt(1), Hint("1e-4 to 1e-2 is typical (default 2e-3)")] = 2e-3
    """Adam learning rate (linear warm-up over `warmup_steps`, linear decay over the last 20%)."""
    warmup_steps: Annotated[int, Ge(0)] = 20
    """Steps of the learning rate's linear warm-up (see `lr`)."""
    sparsity_coef: Annotated[float, Ge(0)] = 1.0
    """lambda of the sparsity penalty lambda * tanh(c * ||W_dec_f|| * a_f), ramped linearly
    from 0 over the whole run (jumprelu only)."""
    sparsity_c: Annotated[float, Gt(0)] = 1.0
    """c inside the tanh of the sparsity penalty."""
    pre_act_coef: Annotated[float, Ge(0)] = 3e-6
    """Coefficient of relu(threshold - h) * ||W_dec_f||, which revives dead features."""
    encoder_init: Literal["uniform", "transpose"] = "uniform"
    """`uniform`: W_enc ~ U(+-1/sqrt(d_transcoder)), independent of the decoder (the paper's);
    `transpose`: each feature's encoder column is its decoder row to its own layer, rescaled to
    the uniform draw's norm (the encoder starts reading what the feature writes)."""
    layer0_weight: Annotated[float, Gt(0)] = 16.0
    """Weight of layer 0's reconstruction error in the MSE (1: every layer alike, the paper's
    loss). Layer 0's error reaches every later layer of the spliced model and is the largest
    single source of error influence in a graph: weighting it 16x raises the mean replacement
    score from 0.46 to 0.57 at 400 steps (docs/results.md, "Recipes")."""
    init_threshold: Annotated[float, Gt(0)] = 0.1
    """Initial JumpReLU threshold in the normalised space (inputs have E||x|| = sqrt(d_model))."""
    init_rate: Annotated[float, Gt(0), Lt(1)] = 0.05
    """b_enc is initialised so each feature fires on this fraction of tokens."""
    bandwidth: Annotated[float, Gt(0)] = 0.1
    """Width of the threshold's straight-through rectangle kernel, relative to the standard
    deviation of the pre-activations at initialisation."""
    val_fraction: Annotated[float, Gt(0), Lt(1)] = 0.05
    """Fraction of documents held out for validation (and for `evaluate`)."""
    buffer_shards: Annotated[int, Ge(1)] = 2
    """Shards shuffled together; more mixes better and costs memory (~0.5 GB per shard)."""
    max_norm_ratio: float = 100.0
    """Leave out of training the tokens whose MLP output norm at some layer exceeds this
    multiple of the layer's median ("massive activations": one such token can carry most
    of a batch's loss and gradient); 0 keeps every token. Validation keeps every token."""
    sparse_decoder: Literal["auto", True, False] = "auto"
    """Token-level sparse decoder (touch only the active (token, feature) pairs; the same
    result to rounding): `auto` decodes dense below 2048 features per layer, and from there
    times both on the first step and again whenever L0 has doubled or halved, keeping the
    faster (`pipeline.train.Trainer.pick_decoder`); true / false force it."""
    compile: Literal["auto", True, False] = "auto"
    """Fuse the JumpReLU activation, its straight-through threshold gradient and the loss's
    sparsity and pre-activation terms (~30 passes over every (layer, token, feature)) into
    one loop each way with `torch.compile` (`pipeline.train.jumprelu_terms`): a whole
    training step 1.3-1.5x faster at 8 x 1024 x 4096, for a one-off compile of ~15-60 s.
    `auto`: when a step has at least 2^22 (layer, token, feature) values and a compiler is
    there (CUDA, or a C++ compiler for the CPU)."""
    compute_dtype: ComputeDTypeName = "auto"
    """Compute dtype of the transcoder's matmuls (encoder and dense decoder; bfloat16 gives
    2.3x the tokens/s of float32 at batch 1024 on an AMX CPU; `auto` as `model.dtype`);
    parameters, optimizer state, the JumpReLU threshold and the loss stay float32."""
    kl_steps: Annotated[int, Ge(0)] = 200
    """Steps of a final phase that fine-tunes the trained transcoder through the spliced
    model, the language model frozen, on KL(original || replacement) of the next-token
    predictions plus `kl_mse_coef` x the mean per-layer FVU (`pipeline.finetune`); 0 skips
    it. Each step runs the model twice on `kl_batch_size` training sequences (~3.5 s on 2
    CPU cores at the default sizes). 400 MSE steps and 200 KL steps of 4 sequences beat
    800 MSE steps on every graph and model score, and 100 steps of 8 on top-1 and KL
    (docs/results.md, "The KL phase")."""
    kl_batch_size: Annotated[int, Ge(1)] = 4
    """Sequences per step of the KL phase."""
    kl_lr: Annotated[float, Gt(0), Lt(1)] = 1e-4
    """Adam learning rate of the KL phase (decays linearly to 0)."""
    kl_mse_coef: Annotated[float, Ge(0)] = 1.0
    """Weight of the mean per-layer FVU in the KL phase's loss (it keeps each layer's
    reconstruction, which the graphs' error nodes measure)."""
    checkpoint_every: Annotated[int, Ge(1)] = 50
    """Steps between checkpoints, in the MSE phase and in the KL phase (a killed run resumes
    from the last one)."""
    max_grad_norm: Annotated[float, Ge(0)] = 0.0
    """Clip the gradient to this global norm (of the whole transcoder's gradient, also when
    feature parallel); 0 does not clip."""
    seed: int = 0
    """Seed of the initialisation and of the data order (the same seed retrains bit for bit)."""

    def _check(self):
        if self.activation != "jumprelu" and self.k > self.d_transcoder:
            _fail("train.k", f"must be <= `train.d_transcoder` ({self.d_transcoder}), got {self.k}")
        if self.max_norm_ratio != 0 and self.max_norm_ratio <= 1:
            _fail(
                "train.max_norm_ratio",
                "must be 0 (keep every token) or > 1 (a multiple of the median norm), "
                f"got {self.max_norm_ratio}",
            )


@dataclass(frozen=True)
class EvaluateConfig(Section):
    """The `evaluate` stage: the transcoder spliced into the model, on held-out text."""

    _section = "evaluate"

    n_sequences: Annotated[int, Ge(1)] = 16
    """Held-out sequences to evaluate on: the first ones in the activation store whose every
    token (BOS aside) comes from a validation document (`train.val_fraction`)."""
    batch_size: Annotated[int, Ge(1)] = 8
    """Sequences per forward pass (each batch runs 3 + n_layers forward passes)."""


@dataclass(frozen=True)
class ExamplesConfig(Section):
    """The `examples` stage: every feature's activating contexts and activation statistics,
    computed from the stored MLP inputs with the exported transcoder."""

    _section = "examples"

    n_tokens: Annotated[int, Ge(0)] = 0
    """Stored tokens to scan from the start, rounded down to whole sequences; 0 scans all."""
    top_k: Annotated[int, Ge(1)] = 20
    """Top-activating contexts per feature; a context is a stored sequence, shown around the
    token where the feature is largest, so at most one example per sequence."""
    context_before: Annotated[int, Ge(0)] = 16
    """Tokens shown before the max-activating token (fewer at a sequence's start; BOS never)."""
    context_after: Annotated[int, Ge(0)] = 8
    """Tokens shown after the max-activating token (fewer at a sequence's end)."""
    n_intervals: Annotated[int, Ge(1), Le(64)] = 5
    """Activation intervals between the feature's smallest and largest activation from which
    contexts are sampled uniformly (their edges fall on a power-of-two grid, see
    `pipeline/examples/stats.py`)."""
    examples_per_interval: Annotated[int, Ge(1)] = 5
    """Contexts sampled from each interval."""
    n_random: Annotated[int, Ge(0)] = 5
    """Contexts sampled uniformly from all contexts where the feature fires."""
    histogram_bins: Annotated[int, Ge(1)] = 32
    """Bins of the activation histogram over [act_min, act_max]."""
    logit_k: Annotated[int, Ge(1)] = 10
    """Top and bottom output tokens of each feature's logit lens."""
    compute_dtype: ComputeDTypeName = "auto"
    """Compute dtype of the encoder matmul (bfloat16 is ~4x faster than float32 on AMX CPUs;
    `auto` as `model.dtype`;
    activations agree to ~3 digits)."""
    seed: int = 0
    """Seed of the random sampling (intervals and random examples)."""


@dataclass(frozen=True)
class PackConfig(Section):
    """The `pack` stage: the examples in circuit-tracer's packed feature format (docs/formats.md)."""

    _section = "pack"

    compresslevel: Annotated[int, Ge(1), Le(9)] = 6
    """gzip level of each feature record (1 fastest to 9 smallest)."""


@dataclass(frozen=True)
class GraphsConfig(Section):
    """The `graphs` stage: one attribution graph per prompt file (see `pipeline/graphs.py`)."""

    _section = "graphs"

    max_n_logits: Annotated[int, Ge(1)] = 10
    """Most logit targets per graph."""
    desired_logit_prob: Annotated[float, Gt(0), Le(1)] = 0.95
    """Logit targets are added, most likely first, until their probabilities add up to this."""
    max_feature_nodes: Annotated[int, Ge(1)] = 7500
    """Features that get their own incoming edges, visited in order of influence on the logits
    (circuit-tracer's command-line default). A feature left out is no node at all: its share of
    every node's input drops out, which lowers the graph's scores (docs/results.md, "Recipes")."""
    batch_size: Annotated[int, Ge(1)] = 256
    """Targets per batched backward pass (memory grows with batch_size * n_pos * n_layers * d_model)."""
    update_interval: Annotated[int, Ge(1)] = 4
    """Batches between re-estimates of feature influence."""
    node_threshold: Annotated[float, Gt(0), Le(1)] = 0.8
    """Pruning keeps the nodes that make up this fraction of the influence on the logits."""
    edge_threshold: Annotated[float, Gt(0), Le(1)] = 0.98
    """Pruning keeps the edges that make up this fraction of the remaining influence."""
    max_n_pos: Annotated[int, Ge(2), Hint("a prompt is BOS plus at least one token")] = 128
    """Longest prompt in tokens, BOS included (cost grows with it); also capped by the model's context."""
    png: bool = True
    """Also draw each pruned graph as `{slug}.png`."""


@dataclass(frozen=True)
class PlotsConfig(Section):
    """The `plots` stage: pictures of the dictionary (see `pipeline/plots.py`)."""

    _section = "plots"

    density_bins: Annotated[int, Ge(1)] = 40
    """Bins of the log10 firing frequency histograms."""
    map_layers: Annotated[int, Ge(1)] = 4
    """Layers in the map of decoder directions, evenly spaced from the first to the last."""


@dataclass(frozen=True)
class RuntimeConfig(Section):
    """Where and how to run; not a dependency of any stage (results do not depend on it
    beyond floating-point noise), so changing it re-runs nothing."""

    _section = "runtime"

    device: str = "auto"
    """`auto` (CUDA when available, else CPU), `cpu`, `cuda` or `cuda:N`."""
    num_threads: Annotated[int, Ge(0)] = 0
    """CPU threads for torch; 0 keeps torch's default (one per core)."""

    def _check(self):
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            _fail("runtime.device", f"must be auto, cpu, cuda or cuda:N, got {self.device!r}")


@dataclass(frozen=True)
class Params:
    """All of `params.yaml`."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    dump: DumpConfig = field(default_factory=DumpConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    examples: ExamplesConfig = field(default_factory=ExamplesConfig)
    pack: PackConfig = field(default_factory=PackConfig)
    graphs: GraphsConfig = field(default_factory=GraphsConfig)
    plots: PlotsConfig = field(default_factory=PlotsConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self):
        """The rules across sections: the manifest workflow needs both of its keys."""
        manifest = self.paths.activations.endswith(".json")
        if self.dump.store_url is not None and not manifest:
            _fail(
                "paths.activations",
                "must be a `.json` file (the manifest, e.g. data/activations.json) when "
                f"`dump.store_url` is set, got {self.paths.activations!r}",
            )
        if manifest and self.dump.store_url is None:
            _fail(
                "dump.store_url",
                f"must be set (e.g. s3://bucket/acts.zarr) when `paths.activations` is a manifest "
                f"({self.paths.activations!r}), or set `paths.activations` to a `.zarr` folder",
            )


_YAML12_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")
"""Numbers YAML 1.2 reads as floats that PyYAML (YAML 1.1) leaves as strings, e.g. `1e-3`."""


def _check_type(where: str, value: Any, tp: Any) -> Any:
    """Return `value` converted to `tp` where that is lossless, else raise naming `where`."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            _fail(where, f"must be one of {', '.join(map(str, allowed))}; got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(where, value, arg)
            except ValueError as e:
                errors.append(str(e))
        _fail(where, f"has the wrong type: {'; '.join(errors)}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            _fail(where, f"must be a list, got {value!r}")
        return [_check_type(f"{where}[{i}]", v, item) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            _fail(where, f"must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(where, f"must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _YAML12_FLOAT.fullmatch(value):
            value = float(value)  # `1e-3`: a float in YAML 1.2 (DVC), a string to PyYAML
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(where, f"must be a number, got {value!r}")
        if not math.isfinite(value):
            _fail(where, f"must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            _fail(where, f"must be a string, got {value!r}")
        if not value.strip():
            _fail(where, f"must be a non-empty string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {where}")


def build_section(cls: type[Section], name: str, raw: Any):
    """Build section `cls`, named `name`, from the mapping `raw`: unknown keys are rejected
    here, types and ranges by `Section.__post_init__`."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        _fail(name, f"must be a mapping of keys to values, got {raw!r}")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        _fail(
            f"{name}.{unknown[0]}",
            f"is not a known key of `{name}`; known keys: {', '.join(sorted(fields))}",
        )
    return cls(**raw)


def parse_params(raw: dict[str, Any]) -> Params:
    """Validate a parsed `params.yaml` mapping; sections this version does not know are an error."""
    if not isinstance(raw, dict):
        raise ParamsError(f"params.yaml must be a mapping of sections, got {type(raw).__name__}")
    hints = typing.get_type_hints(Params)
    known = {f.name for f in dataclasses.fields(Params)}
    unknown = sorted(set(raw) - known)
    if unknown:
        _fail(unknown[0], f"is not a known section of params.yaml; known: {', '.join(sorted(known))}")
    return Params(**{k: build_section(hints[k], k, v) for k, v in raw.items()})


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate `params.yaml`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run from the repository root or pass its path")
    with path.open() as f:
        raw = yaml.safe_load(f) or {}
    return parse_params(raw)


def preset_overrides(preset: str | Path, base: str | Path = "params.yaml") -> list[str]:
    """A preset file as `dvc exp run -S` overrides (`section.key=value`, one per key).

    A preset is a YAML mapping of sections to the keys it changes (`presets/gpu.yaml`).
    It is checked on top of `base` as `params.yaml` would be, so a typo or an out-of-range
    value fails here, naming `section.key`, and not in the middle of a run. Strings are
    double-quoted for DVC's (Hydra's) override grammar; since the overrides are meant for
    the shell's word splitting, `dvc exp run $(clt preset FILE)`, a value may not hold
    whitespace."""
    with Path(preset).open() as f:
        changes = yaml.safe_load(f) or {}
    with Path(base).open() as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(changes, dict) or not all(isinstance(v, dict) for v in changes.values()):
        raise ParamsError(f"{preset}: a preset maps sections to mappings of the keys it changes")
    merged = {name: dict(keys) for name, keys in raw.items()}
    for name, keys in changes.items():
        merged.setdefault(name, {}).update(keys)
    parse_params(merged)
    overrides = []
    for name, keys in changes.items():
        for key, value in keys.items():
            where = f"{name}.{key}"
            if isinstance(value, (dict, list)):
                _fail(where, "a preset sets plain values (a number, a string, true/false or null)")
            if isinstance(value, str):
                if re.search(r"\s", value):
                    _fail(where, f"a preset's string may not hold whitespace, got {value!r}")
                text = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
            else:
                text = yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()
            overrides.append(f"{where}={text}")
    return overrides
