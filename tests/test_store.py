import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from pipeline.codec import FP8, SCALE_BYTES, decode, encode
from pipeline.config import parse_params
from pipeline.dump import run
from pipeline.loader import ActivationLoader
from pipeline.model import get_trunk, load_model
from pipeline.shards import fast_path_ok, file_layout
from pipeline.store import ACTIVATIONS, ActivationStore, StoreWriter
from tests.tiny import ARCHS, TEXT


def _params(tmp_path, model_dir, **dump):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 40)
    raw = {
        "paths": {"model_dir": str(model_dir), "activations": str(tmp_path / "act.zarr")},
        "model": {"name": str(model_dir), "dtype": dump.pop("model_dtype", "float32")},
        "corpus": {"path": str(corpus), "context_len": 16},
        "dump": {
            "n_tokens": 256,
            "batch_size": 3,
            "shard_tokens": 64,
            "chunk_tokens": 32,
            "dtype": "bfloat16",
            **dump,
        },
        "runtime": {"device": "cpu"},
    }
    return parse_params(raw)


def _store_bytes(path):
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, path)] = fh.read()
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_store_roundtrip_matches_direct_forward(arch, tiny_model_dir, tmp_path):
    params = _params(tmp_path, tiny_model_dir(arch))
    run(params, progress=False)
    store = ActivationStore(params.paths.activations)
    assert store.n_tokens == 256
    ids = torch.from_numpy(store.array("token_ids")[:]).long().reshape(-1, 16)
    assert (ids[:, 0] == 0).all()
    np.testing.assert_array_equal(store.array("positions")[:], np.tile(np.arange(16), 16))
    model, _ = load_model(params.paths.model_dir, dtype=torch.float32, device=torch.device("cpu"))
    captured = {}
    layer0 = model.get_submodule({"gpt2": "transformer.h.1"}.get(arch, "model.layers.1"))

    def grab(module, args, kwargs):
        captured["x"] = args[0] if args else kwargs["hidden_states"]

    h = layer0.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        get_trunk(model)(input_ids=ids[5:7])
    h.remove()
    resid = store.read("resid_mid", 5 * 16, 7 * 16)
    out = store.read("mlp_out", 5 * 16, 7 * 16)
    assert resid.dtype == torch.bfloat16
    expected = captured["x"].reshape(-1, model.config.hidden_size)  # input of block 1
    torch.testing.assert_close((resid[:, 0].float() + out[:, 0].float()), expected, rtol=2e-2, atol=2e-2)
    attrs = store.group.attrs.asdict()
    assert attrs["complete"] and attrs["schema_version"] == 1 and attrs["dtype"] == "bfloat16"
    assert attrs["hooks"] == {"resid_mid": "hook_resid_mid", "mlp_out": "hook_mlp_out"}
    assert store.array("resid_mid").attrs["logical_dtype"] == "bfloat16"


def test_killed_dump_resumes_to_the_same_bytes(tiny_model_dir, tmp_path, monkeypatch):
    params = _params(tmp_path, tiny_model_dir("llama"), model_dtype="bfloat16")
    run(params, progress=False)
    reference = _store_bytes(params.paths.activations)
    shutil.rmtree(params.paths.activations)

    original = StoreWriter.write_shard

    def crash_mid_shard(self, shard, arrays):
        if shard == 2:  # half of the shard is on disk, it has no completion marker
            self.group["resid_mid"][128:192] = arrays["resid_mid"]
            raise KeyboardInterrupt("killed")
        return original(self, shard, arrays)

    monkeypatch.setattr(StoreWriter, "write_shard", crash_mid_shard)
    with pytest.raises(KeyboardInterrupt):
        run(params, progress=False)
    partial = tmp_path / "act.zarr.partial"
    done = sorted(int(name) for name in os.listdir(partial / "progress"))  # 3 may be done too
    assert 2 not in done and {0, 1} <= set(done)
    with pytest.raises(FileNotFoundError, match="interrupted dump"):
        ActivationStore(params.paths.activations)
    monkeypatch.setattr(StoreWriter, "write_shard", original)
    calls = []
    monkeypatch.setattr(
        StoreWriter, "write_shard", lambda self, s, a: (calls.append(s), original(self, s, a))
    )
    run(params, progress=False)
    assert calls == [s for s in range(4) if s not in done]  # only the unfinished shards
    assert _store_bytes(params.paths.activations) == reference
    assert not partial.exists()


@pytest.mark.parametrize(
    "change, field, value",
    [({"dtype": "float16"}, "dtype", "float16"), ({"model_dtype": "bfloat16"}, "compute_dtype", "bfloat16")],
)
def test_changed_settings_discard_partial_store(
    tiny_model_dir, tmp_path, monkeypatch, caplog, change, field, value
):
    """A partial store written with other settings, the model's compute dtype included, is
    rebuilt rather than resumed: its shards would not be those of the new settings."""
    params = _params(tmp_path, tiny_model_dir("llama"))
    monkeypatch.setattr(StoreWriter, "finalize", lambda self: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        run(params, progress=False)
    monkeypatch.undo()
    other = _params(tmp_path, tiny_model_dir("llama"), **change)
    run(other, progress=False)
    assert "written with other settings" in caplog.text
    assert getattr(ActivationStore(other.paths.activations).schema, field) == value


def test_readers_refuse_incomplete_or_corrupted_stores(tiny_model_dir, tmp_path):
    params = _params(tmp_path, tiny_model_dir("llama"))
    run(params, progress=False)
    path = params.paths.activations
    shard = os.path.join(path, "mlp_out", "c", "1", "0", "0")
    os.remove(shard)
    with pytest.raises(ValueError, match="missing 2 of 8 chunks"):
        ActivationStore(path)
    group = zarr.open_group(path, mode="r+")
    group.attrs["complete"] = False
    with pytest.raises(ValueError, match="incomplete"):
        ActivationStore(path)
    with pytest.raises(FileNotFoundError, match="run `dvc repro dump`"):
        ActivationStore(tmp_path / "nothing.zarr")


def test_float8_codec_rounds_to_the_nearest_e4m3_value():
    """`encode` against a naive reference: the nearest of all finite e4m3 values to each
    value over its row's scale, and the scale as float32 bytes after the values."""
    x = torch.randn(64, 3, 40) * torch.tensor([1e-3, 1.0, 300.0]).view(1, 3, 1)
    x[0, 0] = 0  # a row of zeros stays zeros
    stored = encode(x, FP8)
    assert stored.dtype == torch.uint8 and stored.shape == (64, 3, 40 + SCALE_BYTES)
    table = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    table = table[table.isfinite()].double()
    amax = x.abs().amax(-1, keepdim=True).double().clamp_min(1e-30)
    # the smallest bfloat16 >= max / 448, as float32 bytes
    floor = (amax.float() / 448).bfloat16()
    bf16_scale = torch.where(floor.float() < (amax.float() / 448), torch.nextafter(floor, floor + 1), floor)
    scaled = x.double() / bf16_scale.double()
    nearest = table[(scaled.unsqueeze(-1) - table).abs().argmin(-1)]
    got = stored[..., :40].view(torch.float8_e4m3fn).double()
    assert (got == nearest).double().mean() > 0.999  # ties may round either way
    scale = stored[..., 40:].contiguous().view(torch.float32)
    torch.testing.assert_close(scale, bf16_scale.float(), rtol=0, atol=0)
    decoded = decode(stored, FP8)
    formula = (got.float() * scale).bfloat16()  # docs/formats.md's decode
    torch.testing.assert_close(decoded, formula, rtol=0, atol=0)
    # a store with float32 scales (not bfloat16 values) decodes by the formula too
    odd = stored.clone()
    odd[..., 40:] = (scale * (1 + 2**-12)).view(torch.uint8)
    torch.testing.assert_close(
        decode(odd, FP8), (got.float() * (scale * (1 + 2**-12))).bfloat16(), rtol=0, atol=0
    )
    assert decoded.dtype == torch.bfloat16
    assert ((decoded.float() - x).abs() <= amax.float() * (2**-4 + 2**-8)).all()
    assert (decoded[0, 0] == 0).all()
    assert decode(stored[:0], FP8).shape == (0, 3, 40)  # e.g. a shard with no rows kept


def test_float8_store_halves_the_bytes_and_reads_back_close(tiny_model_dir, tmp_path):
    """A float8 store of the same tokens: half the bytes of bfloat16 (plus 4 per row), and
    every reader (read, read_rows, the training loader) gets bfloat16 within the e4m3
    rounding of each row's scale of the float32 store's values."""
    model_dir = tiny_model_dir("llama")
    stores = {}
    for dtype in ("float32", "bfloat16", FP8):
        (tmp_path / dtype).mkdir()
        params = _params(tmp_path / dtype, model_dir, dtype=dtype)
        run(params, progress=False)
        stores[dtype] = ActivationStore(params.paths.activations)
    ref, fp8 = stores["float32"], stores[FP8]
    assert fp8.group.attrs["dtype"] == FP8 and "encoding" in fp8.array("mlp_out").attrs
    # raw shards like the others: one-read fast path, and sizes checked when opened
    assert all(fast_path_ok(fp8.group[n]) and file_layout(fp8.group[n]) for n in ACTIVATIONS)
    d = ref.schema.d_model
    size = {k: os.path.getsize(Path(v.path) / "mlp_out" / "c" / "0" / "0" / "0") for k, v in stores.items()}
    assert size[FP8] < size["bfloat16"] * (d + SCALE_BYTES) / (2 * d) + 1024
    for name in ACTIVATIONS:
        x = ref.read(name, 0, ref.n_tokens)
        whole, shard = fp8.read(name, 0, ref.n_tokens), fp8.to_torch(fp8.read_rows(name, 64, 128))
        assert whole.dtype == shard.dtype == torch.bfloat16
        assert ((whole.float() - x).abs() <= x.abs().amax(-1, keepdim=True) * (2**-4 + 2**-8)).all()
        assert torch.equal(shard, whole[64:128])
    loaders = [ActivationLoader(s, batch_size=32, val_fraction=0.0) for s in (ref, fp8)]
    a, b = (next(iter(loader.batches())) for loader in loaders)
    assert b.x.dtype == torch.bfloat16
    # left stored for the training device to decode (`Batch.on`): the same values
    raw = next(iter(ActivationLoader(fp8, batch_size=32, val_fraction=0.0, decode_on_host=False).batches()))
    assert raw.x.dtype == torch.uint8 and raw.stored == FP8
    assert all(torch.equal(u, v) for u, v in zip(raw.on(torch.device("cpu")), b.on(torch.device("cpu"))))
    with open(Path(fp8.path) / "mlp_out" / "c" / "1" / "0" / "0", "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match="is 100 bytes, expected"):
        ActivationStore(fp8.path)
    bound = a.y.abs().amax(-1, keepdim=True) * (2**-4 + 2**-8) + 1e-6
    assert ((b.y.float() - a.y).abs() <= bound).all()


def test_misaligned_write_is_rejected(tiny_model_dir, tmp_path):
    params = _params(tmp_path, tiny_model_dir("llama"))
    run(params, progress=False)
    schema = ActivationStore(params.paths.activations).schema
    writer = StoreWriter(tmp_path / "w.zarr", schema, np.zeros(256), np.zeros(256), np.zeros(256))
    bad = {n: np.zeros((10, schema.n_layers, schema.d_model), np.uint16) for n in ACTIVATIONS}
    with pytest.raises(ValueError, match=r"rows \[0, 64\) is not aligned"):
        writer.write_shard(0, bad)


@pytest.mark.parametrize("dtype", ["bfloat16", FP8])
def test_nan_activations_are_a_clear_error(tiny_model_dir, tmp_path, dtype):
    model_dir = tmp_path / "nan-model"
    shutil.copytree(tiny_model_dir("llama"), model_dir)
    model, _ = load_model(model_dir, dtype=torch.float32, device=torch.device("cpu"))
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.fill_(float("nan"))
    model.save_pretrained(model_dir)
    params = _params(tmp_path, model_dir, dtype=dtype)
    with pytest.raises(ValueError, match="mlp_out of layer 1 has NaN/inf"):
        run(params, progress=False)


def test_float16_overflow_is_a_clear_error(tiny_model_dir, tmp_path):
    model_dir = tmp_path / "big-model"
    shutil.copytree(tiny_model_dir("llama"), model_dir)
    model, _ = load_model(model_dir, dtype=torch.float32, device=torch.device("cpu"))
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(1e6)
    model.save_pretrained(model_dir)
    with pytest.raises(ValueError, match="float16 overflow"):
        run(_params(tmp_path, model_dir, dtype="float16"), progress=False)


def test_context_len_beyond_model_maximum(tiny_model_dir, tmp_path):
    params = _params(tmp_path, tiny_model_dir("llama"))
    raw = {
        "paths": vars(params.paths),
        "model": vars(params.model),
        "corpus": {**vars(params.corpus), "context_len": 512},
        "dump": {"n_tokens": 1024, "shard_tokens": 1024},
        "runtime": {"device": "cpu"},
    }
    with pytest.raises(ValueError, match="supports at most 256 positions"):
        run(parse_params(raw), progress=False)


@pytest.mark.parametrize("aligned", [True, False])
def test_fast_shard_writer_matches_zarr_bytes(tmp_path, aligned):
    from pipeline.shards import aligned_empty, fast_path_ok, write_shard_file

    def make(name):
        group = zarr.open_group(str(tmp_path / f"{name}.zarr"), mode="w")
        return group.create_array(
            "a",
            shape=(128, 4, 512),
            chunks=(16, 4, 512),
            shards=(64, 4, 512),
            dtype="uint16",
            compressors=None,
            fill_value=0,
            config={"write_empty_chunks": True},
        )

    values = aligned_empty((64, 4, 512), np.uint16) if aligned else np.empty((64, 4, 512), np.uint16)
    values[:] = np.random.randint(0, 65535, size=values.shape, dtype=np.uint16)
    reference, fast = make("reference"), make("fast")
    assert fast_path_ok(fast)
    reference[64:128] = values
    write_shard_file(tmp_path / "fast.zarr" / "a" / "c" / "1" / "0" / "0", values, chunk_rows=16)
    ref_bytes = (tmp_path / "reference.zarr" / "a" / "c" / "1" / "0" / "0").read_bytes()
    assert (tmp_path / "fast.zarr" / "a" / "c" / "1" / "0" / "0").read_bytes() == ref_bytes
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "fast.zarr" / "a"))[64:128], values)


@pytest.fixture
def small_store(tiny_model_dir, tmp_path):
    """A complete store of 4 shards of 64 rows (chunks of 32) and its shard size in bytes."""
    params = _params(tmp_path, tiny_model_dir("llama"))
    run(params, progress=False)
    s = ActivationStore(params.paths.activations).schema
    size = s.shard_tokens * s.n_layers * s.d_model * 2 + (s.shard_tokens // s.chunk_tokens) * 16 + 4
    return Path(params.paths.activations), size


def _damaged(path, kind, name, rel, problem):
    return (
        f"activation store {path}: {kind} {name}/{rel} of array {name!r} {problem} (a corrupted or "
        "truncated copy); run `dvc pull` to restore it, or `dvc repro dump` to rebuild the store"
    )


def test_truncated_shard_is_named_when_the_store_opens(small_store):
    path, size = small_store
    shard = path / "mlp_out" / "c" / "1" / "0" / "0"
    assert shard.stat().st_size == size
    original = shard.read_bytes()
    shard.write_bytes(original[:-10])
    with pytest.raises(ValueError) as e:
        ActivationStore(path)
    assert str(e.value) == _damaged(
        path, "shard file", "mlp_out", "c/1/0/0", f"is {size - 10} bytes, expected {size}"
    )
    shard.write_bytes(original)
    ActivationStore(path)
    ids = path / "doc_ids" / "c" / "0"  # 256 int32
    ids.write_bytes(ids.read_bytes()[:-4])
    with pytest.raises(ValueError) as e:
        ActivationStore(path)
    assert str(e.value) == _damaged(path, "file", "doc_ids", "c/0", "is 1020 bytes, expected 1024")


def test_damaged_shard_index_is_named_when_read(small_store):
    """A flipped byte in a shard's index keeps its size, so only a read can see it: every
    read path names the array and the shard file instead of Zarr's bare checksum error."""
    path, size = small_store
    intact = ActivationStore(path).read_rows("resid_mid", 0, 64)
    shard = path / "resid_mid" / "c" / "1" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF  # inside the chunk index, before its crc32c
    shard.write_bytes(bytes(data))
    store = ActivationStore(path)  # same size: opens
    expected = _damaged(
        path, "shard file", "resid_mid", "c/1/0/0", "has a chunk index that fails its crc32c checksum"
    )
    reads = {
        "read": lambda: store.read("resid_mid", 64, 128),
        "read_rows (one shard, fast path)": lambda: store.read_rows("resid_mid", 64, 128),
        "read_rows (part of a shard)": lambda: store.read_rows("resid_mid", 70, 80),
        "array": lambda: store.array("resid_mid")[:],
    }
    for how, read in reads.items():
        with pytest.raises(ValueError) as e:
            read()
        assert str(e.value) == expected, how
        assert "checksum" in str(e.value.__cause__), how  # Zarr's own error, chained
    np.testing.assert_array_equal(store.read_rows("resid_mid", 0, 64), intact)  # other shards still read


def test_unrelated_read_errors_propagate_unchanged(small_store, monkeypatch):
    path, _ = small_store
    store = ActivationStore(path)
    error = ValueError("not about damaged files")

    def fail(self, key):
        raise error

    monkeypatch.setattr(zarr.Array, "__getitem__", fail)
    for read in (lambda: store.read("mlp_out", 0, 10), lambda: store.array("token_ids")[:5]):
        with pytest.raises(ValueError) as e:
            read()
        assert e.value is error
