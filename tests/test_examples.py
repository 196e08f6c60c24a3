"""The `examples` stage against a naive float32 reference on a tiny store and transcoder."""

import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import pipeline.examples as E
from pipeline.clt import export_transcoder, load_transcoder
from pipeline.config import ExamplesConfig, parse_params
from pipeline.dump import run as run_dump
from pipeline.heatmap import feature_activations
from pipeline.model import load_model
from pipeline.store import ActivationStore
from tests.tiny import TEXT, make_transcoder

CONTEXT = 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_model_dir):
    """A tiny store (2048 tokens, 8 shards of 256) and a random transcoder exported for it."""
    tmp = tmp_path_factory.mktemp("examples")
    corpus = tmp / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": TEXT * 3 + f" {i} " * i}) for i in range(40)))
    model_dir = tiny_model_dir("llama")
    raw = {
        "paths": {
            "model_dir": str(model_dir),
            "activations": str(tmp / "act.zarr"),
            "transcoder": str(tmp / "tc"),
            "examples": str(tmp / "examples"),
            "features": str(tmp / "features"),
        },
        "model": {"name": str(model_dir), "dtype": "float32"},
        "corpus": {"path": str(corpus), "context_len": CONTEXT},
        "dump": {
            "n_tokens": 2048,
            "batch_size": 8,
            "shard_tokens": 256,
            "chunk_tokens": 64,
            "dtype": "float32",
        },
        "examples": {
            "top_k": 5,
            "context_before": 4,
            "context_after": 2,
            "compute_dtype": "float32",
            "histogram_bins": 8,
        },
        "runtime": {"device": "cpu"},
    }
    params = parse_params(raw)
    run_dump(params, progress=False)
    torch.manual_seed(1)
    transcoder = make_transcoder(d_tc=24)
    with torch.no_grad():
        transcoder.W_enc.mul_(3)  # activations spread over a range, a few features never fire
        transcoder.b_enc[:, :3] = -50
    export_transcoder(transcoder, tmp / "tc", model_name="tiny")
    return params


def naive_acts(params, n_tokens=None) -> tuple[torch.Tensor, np.ndarray]:
    """Reference activations (n_layers, n_tokens, d_tc), float32, BOS rows zero."""
    store = ActivationStore(params.paths.activations)
    transcoder = load_transcoder(params.paths.transcoder)
    n = n_tokens or store.n_tokens
    x = store.read("resid_mid", 0, n).float()
    positions = store.array("positions")[:n]
    with torch.no_grad():
        acts = torch.stack([transcoder.encode_layer(x[:, l], l) for l in range(x.shape[1])])
    acts[:, positions == 0] = 0
    return acts, store.array("token_ids")[:n]


def collect(params, **changes):
    cfg = dataclasses.replace(params.examples, **changes)
    store = ActivationStore(params.paths.activations)
    transcoder = load_transcoder(params.paths.transcoder)
    states, scan = E.collect_examples(store, transcoder, cfg, progress=False)
    tables = [state.finalize(chunk, scan.n_scanned) for chunk, state in states]
    examples = {k: np.concatenate([t[0][k] for t in tables]) for k in tables[0][0]}
    features = {k: np.concatenate([t[1][k] for t in tables]) for k in tables[0][1] if k != "interval_edges"}
    values, lengths = (np.concatenate(x) for x in zip(*(t[1]["interval_edges"] for t in tables)))
    features["interval_edges"] = np.split(values, np.cumsum(lengths)[:-1])
    return examples, features, cfg


def rows_of(examples, layer, feature, group):
    sel = (examples["layer"] == layer) & (examples["feature"] == feature) & (examples["group"] == group)
    return {k: v[sel] for k, v in examples.items()}


@pytest.fixture(scope="module")
def fp32(tiny):
    return collect(tiny)


def test_statistics_match_naive(tiny, fp32):
    _, features, _ = fp32
    acts, _ = naive_acts(tiny)
    L, n, F = acts.shape
    n_scanned = n // CONTEXT * (CONTEXT - 1)
    fires = acts > 0
    count = fires.sum(1).reshape(-1).numpy()
    np.testing.assert_array_equal(features["n_firing"], count)
    np.testing.assert_array_equal(features["dead"], count == 0)
    assert features["dead"].any() and not features["dead"].all()
    np.testing.assert_allclose(features["frequency"], count / n_scanned)
    masked = torch.where(fires, acts, torch.inf).amin(1).reshape(-1).numpy()
    alive = count > 0
    np.testing.assert_allclose(features["act_min"][alive], masked[alive], rtol=1e-5)
    np.testing.assert_allclose(features["act_max"], acts.amax(1).reshape(-1).numpy(), rtol=1e-5)
    mean = (acts.sum(1).reshape(-1) / np.maximum(count, 1)).numpy()
    np.testing.assert_allclose(features["act_mean"], mean, rtol=1e-5)
    assert (features["act_min"][~alive] == 0).all() and (features["histogram"][~alive] == 0).all()


def test_histogram_and_quantiles_are_within_one_fine_bin(tiny, fp32):
    _, features, cfg = fp32
    acts, _ = naive_acts(tiny)
    flat = acts.permute(0, 2, 1).reshape(-1, acts.shape[1])  # (layer * feature, tokens)
    for i in np.flatnonzero(~features["dead"]):
        v = np.sort(flat[i][flat[i] > 0].numpy().astype(np.float64))
        lo, hi = features["act_min"][i], features["act_max"][i]
        width = 2.0 ** math.ceil(math.log2(hi) + 1e-12) / E.FINE_BINS  # the fine grid's bin
        hist = features["histogram"][i]
        assert hist.sum() == len(v)
        edges = np.linspace(lo, hi, cfg.histogram_bins + 1)
        ours = np.concatenate([[0], np.cumsum(hist)])
        for x, c in zip(edges, ours):  # counts below each edge agree up to the values near it
            exact = np.searchsorted(v, x, side="right")
            near = np.sum(np.abs(v - x) <= width)
            assert abs(c - exact) <= near + 1, (i, x, c, exact, near)
        q = features["quantile_values"][i]
        reference = v[-(-np.arange(1, 101) * len(v) // 100) - 1]  # the ceil(p n)-th smallest
        np.testing.assert_allclose(q, reference, atol=width * 1.001)
        assert q[-1] == pytest.approx(hi)


def test_top_examples_match_naive(tiny, fp32):
    examples, features, cfg = fp32
    acts, token_ids = naive_acts(tiny)
    L, n, F = acts.shape
    per_seq = acts.view(L, n // CONTEXT, CONTEXT, F)
    seq_max = per_seq.amax(2)  # (L, n_seq, F)
    for l in range(L):
        for f in range(F):
            top = rows_of(examples, l, f, 0)
            firing = seq_max[l, :, f][seq_max[l, :, f] > 0]
            expected = np.sort(firing.numpy())[::-1][: cfg.top_k]
            np.testing.assert_allclose(top["activation"], expected, rtol=1e-5)
            assert list(top["rank"]) == list(range(len(expected)))
            for row, value, window in zip(top["row"], top["activation"], top["window"]):
                s, position = divmod(int(row), CONTEXT)
                assert position >= 1
                assert acts[l, row, f] == pytest.approx(value, rel=1e-6)
                assert seq_max[l, s, f] == pytest.approx(value, rel=1e-6)  # one example per sequence
                offsets = np.arange(-cfg.context_before, cfg.context_after + 1)
                inside = (position + offsets >= 1) & (position + offsets < CONTEXT)
                reference = acts[l, row + offsets[inside], f].numpy()
                np.testing.assert_allclose(window[inside], reference, rtol=1e-5, atol=1e-7)
                assert (window[~inside] == 0).all()


@pytest.mark.parametrize("per_interval", [1000, 2])
def test_intervals_sample_exactly_their_contexts(tiny, per_interval):
    """With room for every context, each interval holds exactly the contexts whose max lies
    in it; with less, a subset of them of the configured size."""
    examples, features, cfg = collect(tiny, examples_per_interval=per_interval, n_intervals=3)
    acts, _ = naive_acts(tiny)
    L, n, F = acts.shape
    seq_max = acts.view(L, n // CONTEXT, CONTEXT, F).amax(2)
    for i in np.flatnonzero(~features["dead"]):
        l, f = divmod(int(i), F)
        edges = features["interval_edges"][i]
        assert edges[0] == features["act_min"][i] and edges[-1] == features["act_max"][i]
        assert (np.diff(edges) > 0).all() and 1 <= len(edges) - 1 <= 3
        contexts = seq_max[l, :, f].numpy()
        seen = 0
        for k in range(len(edges) - 1):  # interval_k covers edges[-2 - k] .. edges[-1 - k]
            lo, hi = edges[-2 - k], edges[-1 - k]
            inside = np.flatnonzero((contexts >= lo) & ((contexts < hi) if k else (contexts <= hi)))
            got = rows_of(examples, l, f, 1 + k)
            sequences = got["row"] // CONTEXT
            assert len(set(sequences)) == len(sequences)
            assert set(sequences) <= set(inside)
            assert len(sequences) == min(per_interval, len(inside))
            np.testing.assert_allclose(got["activation"], contexts[sequences], rtol=1e-5)
            seen += len(inside)
        assert seen == (contexts > 0).sum()


def test_random_examples_are_firing_contexts(tiny):
    examples, features, cfg = collect(tiny, n_random=1000)
    acts, _ = naive_acts(tiny)
    L, n, F = acts.shape
    seq_max = acts.view(L, n // CONTEXT, CONTEXT, F).amax(2)
    code = cfg.n_intervals + 1
    for l in range(L):
        for f in range(F):
            got = rows_of(examples, l, f, code)
            assert sorted(got["row"] // CONTEXT) == list(np.flatnonzero(seq_max[l, :, f] > 0))


def test_bfloat16_agrees_with_float32(tiny, fp32):
    examples, features, _ = collect(tiny, compute_dtype="bfloat16")
    ref_examples, ref_features, _ = fp32
    np.testing.assert_allclose(features["act_max"], ref_features["act_max"], rtol=2e-2, atol=1e-2)
    # firing decisions differ only for activations within bf16 rounding of the threshold
    diff = np.abs(features["n_firing"] - ref_features["n_firing"])
    assert diff.sum() <= 0.01 * ref_features["n_firing"].sum()
    for i in np.flatnonzero(~ref_features["dead"]):
        l, f = divmod(int(i), 24)
        ours, ref = rows_of(examples, l, f, 0), rows_of(ref_examples, l, f, 0)
        np.testing.assert_allclose(ours["activation"], ref["activation"], rtol=2e-2, atol=1e-2)


def test_sketch_keeps_the_smallest_keys_per_group():
    """Streaming random candidates through `admit`/`write` (with group merges by `coarsen`)
    keeps exactly the m smallest keys of every group, as a naive sort does."""
    g = torch.Generator().manual_seed(0)
    F, G, m = 7, 4, 3
    sketch = E.Sketch(F, G, m, width=2, dtype=torch.float32, device="cpu")
    offered = {(f, b): [] for f in range(F) for b in range(G)}
    for step in range(12):
        n = int(torch.randint(1, 9, (1,), generator=g))
        keys = torch.rand(F, n, generator=g)
        keys[torch.rand(F, n, generator=g) < 0.3] = math.inf
        groups = torch.randint(0, G, (F, n), generator=g)
        features = torch.arange(F)
        i, j, slots = sketch.admit(features, groups, keys)
        payload = keys[i, j]
        sketch.write(
            features[i], slots, payload, torch.zeros_like(slots), payload, payload[:, None].repeat(1, 2)
        )
        for f in range(F):
            for c in range(n):
                if math.isfinite(keys[f, c]):
                    offered[(f, int(groups[f, c]))].append(float(keys[f, c]))
        if step == 6:  # the grid doubles for features 0 and 3: bands (0, 1) and (2, 3) merge
            sketch.coarsen(torch.tensor([0, 3]), 2)
            for f in (0, 3):
                merged = {b: offered[(f, 2 * b)] + offered[(f, 2 * b + 1)] for b in range(G // 2)}
                for b in range(G):
                    offered[(f, b)] = merged.get(b, [])
    for f in range(F):
        for b in range(G):
            kept = sketch.keys[f, b * m : (b + 1) * m]
            assert sorted(kept[torch.isfinite(kept)].tolist()) == sorted(offered[(f, b)])[:m]
            assert torch.equal(
                sketch.values[f, b * m : (b + 1) * m][torch.isfinite(kept)], kept[torch.isfinite(kept)]
            )


def test_fine_histogram_growth_is_exact():
    """A histogram built while the grid doubles equals one built on the final grid."""
    cfg = ExamplesConfig(top_k=1)
    state = E.FeatureState(3, cfg, torch.float32, "cpu")
    threshold = torch.zeros(3)
    values = []
    for scale in (0.3, 1.0, 7.0, 100.0):
        h = torch.rand(3, 2, 8) * scale
        h[:, :, 0] = -math.inf
        state._grow(h.amax(dim=(1, 2)), threshold)
        state.update_tokens(h, threshold)
        values.append(h[:, :, 1:].reshape(3, -1))
    values = torch.cat(values, 1)
    for f in range(3):
        e = int(state.exponent[f])
        bins = (values[f] * E.FINE_BINS / 2.0**e).long()
        assert values[f].max() < 2.0**e
        assert torch.equal(state.hist[f].long(), torch.bincount(bins, minlength=E.FINE_BINS))


def test_logit_lens_matches_naive(tiny):
    transcoder = load_transcoder(tiny.paths.transcoder)
    model, _ = load_model(tiny.paths.model_dir, dtype=torch.float32, device=torch.device("cpu"))
    unembed, gain = E.unembedding(model)
    assert torch.equal(gain, model.model.norm.weight.float())
    assert torch.equal(unembed, model.lm_head.weight.float())
    lens = E.logit_lens(transcoder, unembed, gain, 4, chunk=5)
    for l in range(transcoder.shape.n_layers):
        direction = transcoder.W_dec[l].detach().sum(1)  # every output layer of the decoder
        logits = (direction * gain) @ unembed.t()
        np.testing.assert_array_equal(lens[l]["top_ids"], logits.topk(4).indices.numpy())
        np.testing.assert_allclose(
            lens[l]["bottom_values"], logits.topk(4, largest=False).values.numpy(), rtol=1e-5
        )


def test_stage_writes_sorted_parquet_readable_by_pandas_and_pyarrow(tiny):
    pd = pytest.importorskip("pandas")
    E.run(tiny, progress=False)
    folder = Path(tiny.paths.examples)
    assert sorted(p.name for p in folder.iterdir()) == ["examples.parquet", "features.parquet"]
    examples = pq.ParquetFile(folder / "examples.parquet")
    assert examples.schema_arrow.remove_metadata() == E.EXAMPLES_SCHEMA
    assert pq.ParquetFile(folder / "features.parquet").schema_arrow.remove_metadata() == E.FEATURES_SCHEMA
    meta = json.loads(examples.schema_arrow.metadata[b"clt_examples"])
    assert meta["n_tokens"] == 2048 and meta["examples"]["top_k"] == 5
    table = examples.read().to_pandas()
    keys = list(zip(table["layer"], table["feature"]))
    assert keys == sorted(keys)
    # row groups hold disjoint feature ranges, so a filtered read touches one of them
    assert examples.metadata.num_row_groups > 1
    one = pd.read_parquet(folder / "examples.parquet", filters=[("layer", "==", 1), ("feature", "==", 5)])
    assert len(one) > 0 and set(one["group"]) <= {"top", "random"} | {f"interval_{i}" for i in range(5)}
    expected = table[(table["layer"] == 1) & (table["feature"] == 5)].reset_index(drop=True)
    assert one.reset_index(drop=True)[["rank", "activation", "token_index"]].equals(
        expected[["rank", "activation", "token_index"]]
    )
    row = one.iloc[0]
    assert row["group"] == "top" and row["token_acts"][row["max_index"]] == pytest.approx(row["activation"])
    store = ActivationStore(tiny.paths.activations)
    start = row["token_index"] - row["max_index"]
    assert list(row["token_ids"]) == list(store.array("token_ids")[start : start + len(row["token_ids"])])
    assert row["doc_id"] == store.array("doc_ids")[row["token_index"]]
    features = pd.read_parquet(folder / "features.parquet")
    assert len(features) == 3 * 24 and features["dead"].sum() == 9  # 3 features per layer never fire
    assert len(features["histogram"][0]) == 8 and len(features["quantile_values"][0]) == 100
    assert len(features["top_logit_ids"][0]) == 10


@pytest.mark.parametrize("reader", ["polars", "duckdb"])
def test_readable_by_other_engines(tiny, reader):
    module = pytest.importorskip(reader)
    E.run(tiny, progress=False)
    path = str(Path(tiny.paths.examples) / "examples.parquet")
    if reader == "polars":
        frame = module.read_parquet(path).filter((module.col("layer") == 1) & (module.col("feature") == 5))
        assert frame.height > 0
    else:
        n = module.sql(f"SELECT count(*) FROM '{path}' WHERE layer = 1 AND feature = 5").fetchone()[0]
        assert n > 0


def test_bad_input_is_a_clear_error(tiny, tmp_path):
    store = ActivationStore(tiny.paths.activations)
    transcoder = load_transcoder(tiny.paths.transcoder)
    with pytest.raises(ValueError, match=r"`examples.top_k` is 500 but only 128 sequences"):
        E.plan_scan(store, transcoder, ExamplesConfig(top_k=500))
    with pytest.raises(ValueError, match=r"`examples.n_tokens` is 9999 but .* holds 2048 tokens"):
        E.plan_scan(store, transcoder, ExamplesConfig(n_tokens=9999))
    with pytest.raises(ValueError, match=r"less than one sequence \(16 tokens\)"):
        E.plan_scan(store, transcoder, ExamplesConfig(n_tokens=10, top_k=1))
    other = export_transcoder(make_transcoder(d_model=16), tmp_path / "other", model_name="x")
    with pytest.raises(ValueError, match=r"d_model=16, but the activation store .* d_model=32"):
        E.plan_scan(store, load_transcoder(other), ExamplesConfig())

    class Empty:
        path = store.path
        schema = dataclasses.replace(store.schema, n_tokens=0)

    with pytest.raises(ValueError, match=r"holds 0 tokens, not one whole sequence"):
        E.plan_scan(Empty(), transcoder, ExamplesConfig())


def test_batches_are_read_ahead_and_stop_with_the_consumer(tiny, monkeypatch):
    """`iter_batches` gives every row once, in order; a consumer that stops early ends the
    reading thread, and a failed read reaches the consumer."""
    store = ActivationStore(tiny.paths.activations)
    batches = list(E.iter_batches(store, 1000, 256))
    assert [start for start, _ in batches] == [0, 256, 512, 768]
    np.testing.assert_array_equal(
        np.concatenate([v for _, v in batches]), store.read_rows("resid_mid", 0, 1000)
    )
    real, reads = store.read_rows, []
    monkeypatch.setattr(
        store, "read_rows", lambda name, start, stop: reads.append(start) or real(name, start, stop)
    )
    stream = E.iter_batches(store, 2048, 16)  # 128 batches
    next(stream)
    stream.close()  # joins the reading thread
    n_read = len(reads)
    time.sleep(0.3)
    assert len(reads) == n_read <= 3  # the one consumed, one queued, one being read

    def broken(*args, **kwargs):
        raise OSError("disk on fire")

    monkeypatch.setattr(store, "read_rows", broken)
    with pytest.raises(OSError, match="disk on fire"):
        next(E.iter_batches(store, 1000, 256))


def test_scans_a_prefix_of_whole_sequences(tiny):
    _, features, _ = collect(tiny, n_tokens=500, top_k=2)
    acts, _ = naive_acts(tiny, n_tokens=496)  # rounded down to 31 sequences of 16
    np.testing.assert_array_equal(features["n_firing"], (acts > 0).sum(1).reshape(-1).numpy())


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r"`examples.top_k` must be >= 1, got 0"):
        parse_params({"examples": {"top_k": 0}})
    with pytest.raises(ValueError, match=r"`examples.context_after` must be >= 0, got -1"):
        parse_params({"examples": {"context_after": -1}})
    with pytest.raises(ValueError, match=r"`pack.compresslevel` must be in 1..9, got 0"):
        parse_params({"pack": {"compresslevel": 0}})


def test_feature_activations_match_the_store(tiny):
    """The heatmap's forward pass sees the same MLP inputs the dump stored."""
    store = ActivationStore(tiny.paths.activations)
    transcoder = load_transcoder(tiny.paths.transcoder)
    model, _ = load_model(tiny.paths.model_dir, dtype=torch.float32, device=torch.device("cpu"))
    ids = store.array("token_ids")[CONTEXT : 2 * CONTEXT].tolist()  # the second stored sequence
    acts, _ = naive_acts(tiny, n_tokens=2 * CONTEXT)
    for layer, feature in [(0, 5), (2, 17)]:
        ours = feature_activations(model, transcoder, ids, layer, feature)
        np.testing.assert_allclose(ours, acts[layer, CONTEXT:, feature].numpy(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"no layer 3 feature 0: the transcoder has layers 0..2"):
        feature_activations(model, transcoder, ids, 3, 0)


def test_cli_feature_and_heatmap(tiny, tmp_path):
    import yaml
    from click.testing import CliRunner

    from pipeline.cli import main

    E.run(tiny, progress=False)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"paths": dataclasses.asdict(tiny.paths), "runtime": {"device": "cpu"}}))
    result = CliRunner().invoke(main, ["feature", "1", "5", "-n", "2", "--params", str(params)], color=True)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].endswith("layer 1 feature 5\x1b[0m") and "fires on" in lines[1]
    top = [line for line in lines if "\x1b[43m" in line]  # the max token on a yellow background
    assert len(top) == 2
    dead = CliRunner().invoke(main, ["feature", "0", "1", "--params", str(params)])
    assert "dead" in dead.output
    missing = CliRunner().invoke(main, ["feature", "9", "1", "--params", str(params)])
    assert missing.exit_code == 1
    assert (
        missing.stderr.startswith("Error: ")
        and "no layer 9 feature 1: layers are 0..2, features 0..23" in missing.stderr
    )
    png = tmp_path / "heat.png"
    text = "The quick brown fox jumps over the lazy dog."
    args = [
        "heatmap",
        "--layer",
        "1",
        "--feature",
        "5",
        "--text",
        text,
        "-o",
        str(png),
        "--params",
        str(params),
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "max activation" in result.output
