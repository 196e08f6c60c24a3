import contextlib
import dataclasses
import itertools
import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import loader, train
from pipeline.checkpoint import Checkpoint
from pipeline.clt import CLTShape, CrossLayerTranscoder, load_transcoder
from pipeline.clt_ops import jumprelu, needs_grad_mask
from pipeline.config import TrainConfig, parse_params
from pipeline.dump import run as run_dump
from pipeline.loader import ActivationLoader, Batch, massive_rows, split_mask
from pipeline.store import NORMS, ActivationStore
from pipeline.train import (
    compile_pays,
    compiled_jumprelu_terms,
    normalise,
    penalty_terms,
    run,
    sample_rows,
)
from tests.tiny import TEXT


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("store")
    corpus = tmp / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": TEXT * 3 + str(i)}) for i in range(40)))
    model_dir = tiny_model_dir("llama")
    raw = {
        "paths": {"model_dir": str(model_dir), "activations": str(tmp / "act.zarr")},
        "model": {"name": str(model_dir), "dtype": "float32"},
        "corpus": {"path": str(corpus), "context_len": 16},
        "dump": {
            "n_tokens": 2048,
            "batch_size": 8,
            "shard_tokens": 256,
            "chunk_tokens": 64,
            "dtype": "bfloat16",
        },
        "runtime": {"device": "cpu"},
    }
    run_dump(parse_params(raw), progress=False)
    return raw


def _params(tmp_path, base, **train):
    raw = {
        **base,
        "paths": {**base["paths"], "transcoder": str(tmp_path / "tc"), "metrics": str(tmp_path / "metrics")},
        "train": {
            "d_transcoder": 16,
            "n_steps": 12,
            "batch_size": 64,
            "checkpoint_every": 4,
            "buffer_shards": 2,
            "val_fraction": 0.2,
            "sparsity_coef": 0.01,
            "lr": 3e-3,
            "kl_steps": 0,  # the KL phase runs the model: its own test turns it on
            **train,
        },
    }
    return parse_params(raw)


def test_loader_is_deterministic_excludes_bos_and_resumes_mid_epoch(tiny_store):
    store = ActivationStore(tiny_store["paths"]["activations"])
    loader = ActivationLoader(store, batch_size=50, buffer_shards=3, seed=1)
    batches = [b.x.clone() for b in loader.epoch(0)]
    assert len(batches) == loader.batches_per_epoch
    again = [b.x for b in loader.epoch(0, start_batch=5)]
    for a, b in zip(batches[5:], again):
        torch.testing.assert_close(a, b)
    # BOS rows have a fixed residual (same token, position 0): none may appear
    bos = store.read("resid_mid", 0, 1)[0]
    for b in batches:
        assert not (b == bos).all(dim=(1, 2)).any()
    val = ActivationLoader(store, batch_size=10, split="val", val_fraction=0.2)
    assert 0 < val.n_rows < loader.n_rows
    # the endless stream crosses epochs: the end of epoch 0, then the start of epoch 1
    n = loader.batches_per_epoch
    with contextlib.closing(loader.batches(n - 2)) as stream:
        crossing = [b.x for b in itertools.islice(stream, 4)]
    expected = batches[-2:] + [b.x for b in itertools.islice(loader.epoch(1), 2)]
    for a, b in zip(crossing, expected, strict=True):
        torch.testing.assert_close(a, b)


def test_massive_rows_come_from_the_stored_norms_without_reading_mlp_out(tiny_store, tmp_path, monkeypatch):
    """The dump's `mlp_out_norm` gives exactly the rows of a pass over `mlp_out` (a store
    without that array, as older dumps wrote), and finding them reads no `mlp_out`."""
    src = Path(tiny_store["paths"]["activations"])
    old = tmp_path / "old.zarr"
    shutil.copytree(src, old)
    shutil.rmtree(old / NORMS)
    stores = ActivationStore(src), ActivationStore(old)
    assert stores[0].has_norms and not stores[1].has_norms
    keep = split_mask(stores[0].array("doc_ids")[:], stores[0].array("positions")[:], "train", 0.05)
    expected = massive_rows(stores[1], keep, 3.0)
    assert 0 < expected.sum() < len(expected) // 4

    def no_reads(*args, **kwargs):
        raise AssertionError("read mlp_out")

    monkeypatch.setattr(stores[0], "read_rows", no_reads)
    np.testing.assert_array_equal(massive_rows(stores[0], keep, 3.0), expected)
    monkeypatch.setattr(loader, "NORM_BLOCK_SHARDS", 3)  # blocks of shards that do not divide the store
    for store in stores:
        np.testing.assert_array_equal(massive_rows(store, keep, 3.0), expected)


def test_loader_leaves_out_massive_activation_rows(tiny_store):
    """`max_norm_ratio` drops exactly the train rows whose MLP output norm at some layer
    exceeds the ratio times the layer's median (naive recomputation here), from every batch."""
    store = ActivationStore(tiny_store["paths"]["activations"])
    keep = split_mask(store.array("doc_ids")[:], store.array("positions")[:], "train", 0.05)
    norms = store.read("mlp_out", 0, store.n_tokens).float().norm(dim=-1)  # (n_tokens, n_layers)
    first = store.schema.shard_rows(0)
    first_rows = torch.from_numpy(keep[first[0] : first[1]]).nonzero().flatten() + first[0]
    ratio = (norms / norms[first_rows].median(dim=0).values).max(dim=1).values
    ratio[~torch.from_numpy(keep)] = 0
    top = ratio.sort(descending=True).values
    threshold = float(top[2] + top[3]) / 2  # exactly three rows above it
    flagged = massive_rows(store, keep, threshold)
    assert flagged.sum() == 3 and set(flagged.nonzero()[0]) == set(
        (ratio > threshold).nonzero().flatten().tolist()
    )
    assert not massive_rows(store, keep, 0).any()
    plain = ActivationLoader(store, batch_size=50, seed=1)
    loader = ActivationLoader(store, batch_size=50, seed=1, max_norm_ratio=threshold)
    assert loader.n_rows == plain.n_rows - 3
    dropped = store.read("mlp_out", 0, store.n_tokens)[torch.from_numpy(flagged)]
    for batch in loader.epoch(0):
        assert not (batch.y[:, None] == dropped[None]).all(dim=(2, 3)).any()


def test_loader_errors_reach_the_training_loop(tiny_store, monkeypatch):
    store = ActivationStore(tiny_store["paths"]["activations"])
    loader = ActivationLoader(store, batch_size=50, buffer_shards=1)

    def broken(*args, **kwargs):
        raise OSError("disk on fire")

    monkeypatch.setattr(store, "read_rows", broken)
    with pytest.raises(OSError, match="disk on fire"):
        next(iter(loader.epoch(0)))


def test_training_reduces_error_and_exports(tiny_store, tmp_path):
    # The paper's loss: the default weights layer 0 16x, which on 3 layers and 30 steps
    # trades the other layers' NMSE for layer 0's (its own test is below).
    params = _params(tmp_path, tiny_store, n_steps=30, layer0_weight=1.0)
    metrics = run(params, progress=False)
    curve = (tmp_path / "metrics" / "train_curve.csv").read_text().splitlines()
    assert len(curve) == 31
    first, last = float(curve[1].split(",")[3]), float(curve[-1].split(",")[3])
    assert last < first
    assert 0 <= metrics["mean"]["nmse"] < 1.0
    assert json.loads((tmp_path / "metrics" / "train.json").read_text())["mean"] == metrics["mean"]
    loaded = load_transcoder(tmp_path / "tc")
    assert loaded.shape.n_layers == 3 and loaded.shape.d_transcoder == 16
    assert not (tmp_path / "tc.partial").exists()


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_topk_exports_jumprelu_with_same_l0(tiny_store, tmp_path, activation):
    params = _params(tmp_path, tiny_store, activation=activation, k=4)
    metrics = run(params, progress=False)
    assert 2 <= metrics["mean"]["l0"] <= 6  # calibrated thresholds give ~k on held-out rows


def kill_after_checkpoint(params, monkeypatch, n: int = 2) -> None:
    """Train with `params` until just after the `n`th checkpoint is saved, then stop as a
    kill would (a KeyboardInterrupt); the checkpoint is left for a resumed run."""
    original = Checkpoint.save
    calls = {"n": 0}

    def crash_after_checkpoint(self, **state):
        original(self, **state)
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt("killed")

    with monkeypatch.context() as patch:
        patch.setattr(Checkpoint, "save", crash_after_checkpoint)
        with pytest.raises(KeyboardInterrupt):
            run(params, progress=False)


def test_killed_training_resumes_exactly(tiny_store, tmp_path, monkeypatch):
    reference = run(_params(tmp_path / "a", tiny_store), progress=False)
    params = _params(tmp_path / "b", tiny_store)
    kill_after_checkpoint(params, monkeypatch)
    resumed = run(params, progress=False)
    assert resumed == reference
    a, b = load_transcoder(tmp_path / "a" / "tc"), load_transcoder(tmp_path / "b" / "tc")
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_training_killed_in_the_kl_phase_resumes_it_exactly(tiny_store, tmp_path, monkeypatch, caplog):
    """Checkpoints at MSE steps 4 and 8, then at KL steps 4 and 6: a run killed after KL
    step 4 resumes there (the data order replayed, Adam's state restored) and exports the
    transcoder of an uninterrupted run, bit for bit."""
    kl = {"n_steps": 8, "checkpoint_every": 4, "kl_steps": 6, "kl_batch_size": 2, "kl_lr": 1e-2}
    reference = run(_params(tmp_path / "a", tiny_store, **kl), progress=False)
    params = _params(tmp_path / "b", tiny_store, **kl)
    kill_after_checkpoint(params, monkeypatch, n=3)
    with caplog.at_level("INFO", logger="pipeline.finetune"):
        resumed = run(params, progress=False)
    assert "resuming the KL phase at step 4/6" in caplog.text
    assert resumed == reference
    a, b = load_transcoder(tmp_path / "a" / "tc"), load_transcoder(tmp_path / "b" / "tc")
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert not (tmp_path / "b" / "tc.partial").exists()


def test_training_from_a_float8_store_matches_bfloat16(tiny_store, tmp_path):
    """The same run from a float8 dump of the same tokens: the whole stage (statistics,
    training, validation) works on it, to about the same validation NMSE."""
    base = {**tiny_store, "dump": {**tiny_store["dump"], "dtype": "float8_e4m3"}}
    base["paths"] = {**tiny_store["paths"], "activations": str(tmp_path / "fp8.zarr")}
    run_dump(parse_params(base), progress=False)
    bf16 = run(_params(tmp_path / "bf16", tiny_store), progress=False)
    fp8 = run(_params(tmp_path / "fp8", base), progress=False)
    assert fp8["mean"]["nmse"] == pytest.approx(bf16["mean"]["nmse"], rel=0.05)
    assert fp8["mean"]["l0"] == pytest.approx(bf16["mean"]["l0"], rel=0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_jumprelu_terms_equal_the_eager_activation_and_terms(dtype):
    """`train.compile`'s fused activation, STE and loss terms: the values and gradients
    of `clt_ops.jumprelu` + `penalty_terms` + `needs_grad_mask`."""
    torch.manual_seed(0)
    h = torch.randn(3, 40, 24, dtype=dtype, requires_grad=True)
    log_threshold = torch.full((3, 24), math.log(0.5)).add_(torch.rand(3, 24) * 0.3).requires_grad_()
    norms = (torch.rand(3, 1, 24) + 0.5).requires_grad_()
    weight = torch.randn(3, 40, 24, dtype=dtype)  # a loss that uses the activations
    bandwidth, results = 0.4, []
    for fused in (False, True):
        if fused:
            acts, sparsity, pre_act, mask = compiled_jumprelu_terms()(
                h, log_threshold, norms, bandwidth, 1.5, True
            )
        else:
            threshold = log_threshold.exp()[:, None]
            acts = jumprelu(h, threshold, bandwidth)
            sparsity, pre_act = penalty_terms(acts, h, threshold, norms, 1.5)
            mask = needs_grad_mask(h, threshold, bandwidth)
        loss = (acts * weight).float().sum() + sparsity + 0.1 * pre_act
        results.append((acts, sparsity, pre_act, mask, *torch.autograd.grad(loss, (h, log_threshold, norms))))
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    for eager, fused in zip(*results):
        torch.testing.assert_close(fused.float(), eager.float(), **tol)


def test_training_with_compile_matches_eager(tiny_store, tmp_path):
    eager = run(_params(tmp_path / "eager", tiny_store, compile=False), progress=False)
    fused = run(_params(tmp_path / "fused", tiny_store, compile=True), progress=False)
    assert fused["mean"]["nmse"] == pytest.approx(eager["mean"]["nmse"], rel=1e-3)
    assert fused["mean"]["l0"] == pytest.approx(eager["mean"]["l0"], rel=1e-2)


def test_compile_is_chosen_for_big_steps_only():
    cfg = parse_params({"train": {}}).train  # the defaults: 1024 tokens x 256 features
    cpu = torch.device("cpu")
    assert compile_pays(cfg, 30, cpu) == (shutil.which("g++") is not None)
    assert not compile_pays(cfg, 3, cpu)  # 1024 x 3 x 256 values: not worth a compile
    assert not compile_pays(dataclasses.replace(cfg, activation="topk"), 30, cpu)
    assert compile_pays(dataclasses.replace(cfg, compile=True), 3, cpu)


def test_normalisation_gives_root_d_norms(tiny_store):
    from pipeline.train import build_transcoder, fit_scales

    store = ActivationStore(tiny_store["paths"]["activations"])
    cfg = _params(__import__("pathlib").Path("/tmp"), tiny_store).train
    model = build_transcoder(store, cfg)
    sample = sample_rows(store, "train", 0.2, 512)
    fit_scales(model, sample)
    x, y = normalise(model, sample["resid_mid"], sample["mlp_out"])
    root_d = store.schema.d_model**0.5
    torch.testing.assert_close(x.norm(dim=-1).mean(0), torch.full((3,), root_d), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y.norm(dim=-1).mean(0), torch.full((3,), root_d), rtol=1e-4, atol=1e-4)


def test_store_from_another_model_is_refused(tiny_store, tmp_path):
    base = {**tiny_store, "model": {**tiny_store["model"], "name": "HuggingFaceTB/SmolLM2-360M"}}
    with pytest.raises(
        ValueError, match="dumped from model .*but `model.name` is 'HuggingFaceTB/SmolLM2-360M'"
    ):
        run(_params(tmp_path, base), progress=False)
    assert not (tmp_path / "tc").exists()


def test_incomplete_or_partial_store_is_refused(tiny_store, tmp_path):
    import shutil

    import zarr

    copy = tmp_path / "act.zarr"
    shutil.copytree(tiny_store["paths"]["activations"], copy)
    base = {**tiny_store, "paths": {**tiny_store["paths"], "activations": str(copy)}}
    os.remove(copy / "resid_mid" / "c" / "1" / "0" / "0")
    with pytest.raises(ValueError, match="resid_mid is missing .* chunks .*`dvc repro dump`"):
        run(_params(tmp_path, base), progress=False)
    zarr.open_group(str(copy), mode="r+").attrs["complete"] = False
    with pytest.raises(ValueError, match="incomplete .*`dvc repro dump`"):
        run(_params(tmp_path, base), progress=False)


@pytest.mark.parametrize(
    "key, value, allowed",
    [
        ("lr", 0.0, r"in \(0, 1\)"),
        ("lr", -1e-3, r"in \(0, 1\)"),
        ("batch_size", 0, ">= 1"),
        ("n_steps", 0, ">= 1"),
        ("d_transcoder", 0, ">= 1"),
        ("val_fraction", 0.0, r"in \(0, 1\)"),
        ("val_fraction", 1.0, r"in \(0, 1\)"),
        ("bandwidth", 0.0, "> 0"),
        ("init_threshold", -0.1, "> 0"),
        ("init_rate", 1.5, r"in \(0, 1\)"),
        ("sparsity_coef", -1.0, ">= 0"),
        ("buffer_shards", 0, ">= 1"),
        ("kind", "sae", "one of clt, plt"),
        ("activation", "relu", "one of jumprelu, topk, batchtopk"),
        ("n_steps", 1.5, "an integer"),
        ("lr_typo", 1e-3, "not a known key"),
        ("max_norm_ratio", 0.5, r"0 \(keep every token\) or > 1"),
    ],
)
def test_out_of_range_train_values_name_the_key(tiny_store, tmp_path, key, value, allowed):
    with pytest.raises(ValueError) as error:
        _params(tmp_path, tiny_store, **{key: value})
    message = str(error.value)
    assert re.search(rf"`train\.{key}` .*{allowed}", message), message
    if key != "lr_typo":  # the value found is in the message too
        assert str(value) in message, message


def test_topk_k_above_d_transcoder_names_both(tiny_store, tmp_path):
    with pytest.raises(ValueError, match=r"`train\.k` must be <= `train\.d_transcoder` \(16\), got 17"):
        _params(tmp_path, tiny_store, activation="topk", k=17)


def test_sparse_decoder_trains_like_the_dense_one(tiny_store, tmp_path):
    # float32: under a bfloat16 `compute_dtype` the two decoders round their bf16 sums in different
    # orders, so the two runs would differ by bf16 rounding at every step
    dense = run(_params(tmp_path / "dense", tiny_store, compute_dtype="float32"), progress=False)
    sparse = run(
        _params(tmp_path / "sparse", tiny_store, sparse_decoder=True, compute_dtype="float32"), progress=False
    )
    for key in ("nmse", "l0", "dead_fraction"):
        assert sparse["mean"][key] == pytest.approx(dense["mean"][key], rel=1e-3, abs=1e-6), key
    a, b = load_transcoder(tmp_path / "dense" / "tc"), load_transcoder(tmp_path / "sparse" / "tc")
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-3, atol=1e-5, msg=name)


def test_bfloat16_training_matches_float32(tiny_store, tmp_path):
    """`compute_dtype: bfloat16` (bf16 matmuls, float32 parameters, threshold and loss) reaches the same
    validation metrics as float32 training, to bf16 precision."""
    bf16 = run(_params(tmp_path / "bf16", tiny_store, compute_dtype="bfloat16"), progress=False)
    fp32 = run(_params(tmp_path / "fp32", tiny_store, compute_dtype="float32"), progress=False)
    assert bf16["mean"]["nmse"] == pytest.approx(fp32["mean"]["nmse"], rel=0.02)
    assert bf16["mean"]["l0"] == pytest.approx(fp32["mean"]["l0"], rel=0.05, abs=0.2)


def test_sparse_decoder_param(tiny_store, tmp_path):
    assert _params(tmp_path, tiny_store).train.sparse_decoder == "auto"
    for value in (True, False):
        assert _params(tmp_path, tiny_store, sparse_decoder=value).train.sparse_decoder is value
    with pytest.raises(ValueError, match=r"`train\.sparse_decoder` must be one of auto, True, False"):
        _params(tmp_path, tiny_store, sparse_decoder="yes")


def _tiny_trainer(**cfg) -> tuple[train.Trainer, Batch]:
    """A trainer of 2 layers x 64 features on random inputs, and a batch for it."""
    torch.manual_seed(0)
    model = CrossLayerTranscoder(CLTShape(n_layers=2, d_model=16, d_transcoder=64))
    x = torch.randn(128, 2, 16)
    config = dataclasses.replace(TrainConfig(), batch_size=128, compute_dtype="float32", compile=False, **cfg)
    trainer = train.Trainer.from_inputs(model, config, x, device=torch.device("cpu"))
    return trainer, Batch(x=x, y=torch.randn_like(x))


def test_auto_decoder_is_timed_at_the_start_and_when_l0_moves(monkeypatch):
    """`auto` times both decoders on the first step, keeps the faster until the L0 has
    doubled or halved, then times again and switches only to a clearly faster one; a
    resumed run goes on with the recorded choice without timing."""
    timings = iter(
        [{"dense": 1.0, "sparse": 0.5}, {"dense": 0.95, "sparse": 1.0}, {"dense": 0.5, "sparse": 1.0}]
    )
    timed_at = []

    def fake_seconds(trainer, x, y, lam):
        timed_at.append(trainer.steps_done)
        return next(timings)

    monkeypatch.setattr(train, "decoder_seconds", fake_seconds)
    monkeypatch.setattr(train, "SPARSE_MIN_D_TRANSCODER", 64)
    trainer, batch = _tiny_trainer(sparse_decoder="auto")
    picks = [trainer.train_step(batch)["sparse_decoder"] for _ in range(2)]
    history = trainer.history
    history[-1]["l0"] = history[0]["timed_l0"] * 2.5  # L0 moved: timed again, within the margin
    picks.append(trainer.train_step(batch)["sparse_decoder"])
    history[-1]["l0"] = history[2]["timed_l0"] / 2.5  # moved again: dense now clearly faster
    picks.append(trainer.train_step(batch)["sparse_decoder"])
    assert timed_at == [0, 2, 3] and picks == [True, True, True, False]
    assert history[0]["decoder_seconds"] == {"dense": 1.0, "sparse": 0.5}
    resumed, _ = _tiny_trainer(sparse_decoder="auto")
    resumed.load_state_dict(trainer.state_dict())
    assert resumed.train_step(batch)["sparse_decoder"] is False and timed_at == [0, 2, 3]


def test_auto_decoder_is_dense_for_small_dictionaries_and_flags_are_not_timed(monkeypatch):
    monkeypatch.setattr(train, "decoder_seconds", lambda *args: pytest.fail("timed"))
    for value, sparse in (("auto", False), (True, True), (False, False)):
        trainer, batch = _tiny_trainer(sparse_decoder=value)
        assert trainer.train_step(batch)["sparse_decoder"] is sparse


def test_timing_the_decoders_leaves_the_step_unchanged(monkeypatch):
    """The timed passes leave no gradient behind: the step equals one made with the
    chosen decoder directly."""
    monkeypatch.setattr(train, "SPARSE_MIN_D_TRANSCODER", 64)
    timed, batch = _tiny_trainer(sparse_decoder="auto")
    record = timed.train_step(batch)
    assert all(0 < s < math.inf for s in record["decoder_seconds"].values())
    direct, _ = _tiny_trainer(sparse_decoder=record["sparse_decoder"])
    direct.train_step(batch)
    for (name, a), b in zip(timed.model.named_parameters(), direct.model.parameters()):
        assert torch.equal(a, b), name


def test_transpose_init_points_each_encoder_column_along_its_own_layer_decoder_row():
    torch.manual_seed(0)
    store = type("S", (), {"schema": type("Schema", (), {"n_layers": 3, "d_model": 16})()})()
    cfg = dataclasses.replace(TrainConfig(), d_transcoder=32)
    torch.manual_seed(1)
    uniform = train.build_transcoder(store, cfg)
    torch.manual_seed(1)
    transposed = train.build_transcoder(store, dataclasses.replace(cfg, encoder_init="transpose"))
    for l in range(3):
        W_dec, W_enc = transposed.W_dec[l][:, 0, :], transposed.W_enc[l]  # (F, d), (d, F)
        cosine = torch.nn.functional.cosine_similarity(W_enc.T, W_dec, dim=1)
        torch.testing.assert_close(cosine, torch.ones(32))
        torch.testing.assert_close(W_enc.norm(dim=0), uniform.W_enc[l].norm(dim=0))
        torch.testing.assert_close(transposed.W_dec[l], uniform.W_dec[l])  # the decoder is the same draw


def test_layer0_weight_adds_layer0s_squared_error_to_the_loss():
    trainer, batch = _tiny_trainer()
    x, y = batch.x, batch.y
    terms = {
        w: train.loss_terms(
            trainer.model, x, y, lam=0.5, cfg=dataclasses.replace(trainer.cfg, layer0_weight=w), bandwidth=0.1
        )
        for w in (1.0, 3.0)
    }
    with torch.no_grad():
        recon = trainer.model(x.float(), bandwidth=0.1)[2]
    layer0 = ((recon[:, 0] - y[:, 0]) ** 2).sum() / len(y)
    assert terms[3.0]["mse"] == terms[1.0]["mse"]  # the logged MSE stays every layer's, unweighted
    torch.testing.assert_close(terms[3.0]["total"], terms[1.0]["total"] + 2 * layer0)


def test_kl_phase_lowers_the_held_out_kl_and_keeps_the_trained_thresholds(tiny_store, tmp_path):
    """`train.kl_steps` fine-tunes the trained transcoder through the spliced model: the same
    run without it gives the same thresholds (the phase leaves them, and training is the
    same), and a higher KL on held-out sequences."""
    from pipeline.evaluate import evaluate_transcoder, split_sequences
    from pipeline.model import load_pretrained

    kl = {"kl_batch_size": 4, "kl_lr": 1e-2, "kl_mse_coef": 0.1}
    plain = _params(tmp_path / "plain", tiny_store, n_steps=8, **kl)
    tuned = _params(tmp_path / "tuned", tiny_store, n_steps=8, kl_steps=15, **kl)
    assert "kl_phase" not in run(plain, progress=False)
    phase = run(tuned, progress=False)["kl_phase"]
    assert phase["steps"] == 15 and phase["kl_last"] < phase["kl_first"]
    a, b = load_transcoder(tmp_path / "plain" / "tc"), load_transcoder(tmp_path / "tuned" / "tc")
    assert torch.equal(a.log_threshold, b.log_threshold) and not torch.equal(a.W_dec[0], b.W_dec[0])
    model, _ = load_pretrained(tiny_store["paths"]["model_dir"], dtype=torch.float32)
    store = ActivationStore(tiny_store["paths"]["activations"])
    ids = torch.from_numpy(split_sequences(store, "val", 0.2, 16))
    kls = [
        evaluate_transcoder(model, tc, ids, batch_size=8, progress=False)["kl_replacement"] for tc in (a, b)
    ]
    assert kls[1] < kls[0], kls
