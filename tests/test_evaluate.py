import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

import pipeline.evaluate as evaluate
from pipeline.cli import main as cli
from pipeline.clt import export_transcoder
from pipeline.config import parse_params
from pipeline.dump import run as run_dump
from pipeline.evaluate import evaluate_transcoder, split_sequences
from pipeline.model import get_architecture, get_layers, load_pretrained
from pipeline.splice import splice, zero_ablate
from pipeline.store import ActivationStore
from pipeline.train import run as run_train
from tests.tiny import ARCHS, TEXT, make_transcoder

KEYS = {
    "n_sequences",
    "n_predictions",
    "ce_original",
    "ce_replacement",
    "ce_zero_ablation",
    "ce_recovered",
    "kl_replacement",
    "top1_agreement",
    "per_layer",
}


def random_sequences(n=4, T=12, vocab=300, bos=0):
    ids = torch.randint(3, vocab, (n, T))
    ids[:, 0] = bos
    return ids


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir):
    """Raw params of a tiny store plus a transcoder trained on it for 5 steps."""
    tmp = tmp_path_factory.mktemp("evaluate")
    corpus = tmp / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": TEXT * 3 + str(i)}) for i in range(40)))
    model_dir = tiny_model_dir("llama")
    raw = {
        "paths": {
            "model_dir": str(model_dir),
            "activations": str(tmp / "act.zarr"),
            "transcoder": str(tmp / "tc"),
            "metrics": str(tmp / "metrics"),
        },
        "model": {"name": str(model_dir), "dtype": "float32"},
        "corpus": {"path": str(corpus), "context_len": 16},
        "dump": {"n_tokens": 2048, "batch_size": 8, "shard_tokens": 256, "chunk_tokens": 64},
        "train": {
            "d_transcoder": 16,
            "n_steps": 5,
            "batch_size": 64,
            "checkpoint_every": 5,
            "buffer_shards": 2,
            "val_fraction": 0.2,
        },
        "evaluate": {"n_sequences": 6, "batch_size": 4},
        "runtime": {"device": "cpu"},
    }
    params = parse_params(raw)
    run_dump(params, progress=False)
    run_train(params, progress=False)
    return raw


@pytest.mark.parametrize("kind", ["clt", "plt"])
def test_splice_helpers_match_forward(kind):
    tc = make_transcoder(kind, n_layers=4, d_model=16, d_tc=32)
    x = torch.randn(10, 4, 16)  # (n_tokens, n_layers, d_model)
    with torch.no_grad():
        _, acts, recon = tc(x)
        mine = [tc.encode_layer(x[:, l], l) for l in range(4)]
        for l in range(4):
            torch.testing.assert_close(mine[l], acts[l], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(tc.decode_layer(mine, l), recon[:, l], rtol=1e-5, atol=1e-5)
    assert (acts != 0).any() and (acts == 0).any()


@pytest.mark.parametrize("kind", ["clt", "plt"])
@pytest.mark.parametrize("spliced", [[0, 1, 2, 3], [2]])
def test_decode_from_matches_decode_layer_and_its_gradient(kind, spliced):
    """The splice's per-source terms sum to `decode_layer`, and the decoders' gradients agree."""
    tc = make_transcoder(kind, n_layers=4, d_model=16, d_tc=32)
    acts = [tc.encode_layer(x, l).detach() for l, x in enumerate(torch.randn(4, 10, 16))]
    weights = torch.randn(4, 10, 16)  # a loss that weighs every output element differently

    def loss_and_grads(recon):
        loss = sum((recon[t] * weights[t]).sum() for t in spliced)
        return loss, torch.autograd.grad(loss, list(tc.W_dec), allow_unused=True)

    targets = {l: [t for t in spliced if l in tc.source_layers(t)] for l in range(4)}
    terms = {
        (l, t): part for l in range(4) for t, part in zip(targets[l], tc.decode_from(acts[l], l, targets[l]))
    }
    mine = {t: tc.b_dec[t] + sum(terms[l, t] for l in tc.source_layers(t)) for t in spliced}
    loss, grads = loss_and_grads(mine)
    ref_loss, ref_grads = loss_and_grads({t: tc.decode_layer(acts, t) for t in spliced})
    torch.testing.assert_close(loss, ref_loss)
    for g, ref in zip(grads, ref_grads):
        assert (g is None) == (ref is None)  # a layer that writes to no spliced layer
        if g is not None:
            torch.testing.assert_close(g, ref)


@pytest.mark.parametrize("arch", ARCHS)
def test_splice_keeps_bos_and_changes_the_rest(arch, tiny_model_dir):
    model, _ = load_pretrained(str(tiny_model_dir(arch)), dtype=torch.float32)
    tc = make_transcoder()
    ids = random_sequences()
    with torch.no_grad():
        original = model(input_ids=ids).logits
        for intervention in (splice(model, tc, range(3)), splice(model, tc, [1]), zero_ablate(model)):
            with intervention:
                logits = model(input_ids=ids).logits
            torch.testing.assert_close(logits[:, 0], original[:, 0])
            assert not torch.allclose(logits[:, 1:], original[:, 1:], atol=1e-4)
        torch.testing.assert_close(model(input_ids=ids).logits, original)  # hooks removed


def test_one_layer_splice_reads_the_unchanged_model(tiny_model_dir):
    """Layer 2 alone: its MLP output is decoded from features of the original MLP inputs of
    layers 0..2, and every other layer's MLP output is the original's."""
    model, _ = load_pretrained(str(tiny_model_dir("llama")), dtype=torch.float32)
    tc = make_transcoder()
    arch, blocks = get_architecture(model), get_layers(model)
    ids = random_sequences()
    seen: dict[str, dict[int, torch.Tensor]] = {"resid_mid": {}, "mlp_out": {}}

    def capture():
        handles = []
        for l, block in enumerate(blocks):

            def pre(m, args, kwargs, l=l):
                seen["resid_mid"][l] = (args[0] if args else kwargs["hidden_states"]).clone()

            def post(m, args, output, l=l):
                seen["mlp_out"][l] = output.clone()

            handles.append(
                block.get_submodule(arch.mlp_input).register_forward_pre_hook(pre, with_kwargs=True)
            )
            handles.append(block.get_submodule(arch.mlp_output).register_forward_hook(post))
        return handles

    with torch.no_grad():
        handles = capture()
        model(input_ids=ids)
        original = {k: dict(v) for k, v in seen.items()}
        for h in handles:
            h.remove()
        with splice(model, tc, [2]):
            handles = capture()  # registered after the splice's hooks: sees the spliced output
            model(input_ids=ids)
            for h in handles:
                h.remove()
        acts = [tc.encode_layer(original["resid_mid"][l], l) for l in range(3)]
        expected = tc.decode_layer(acts, 2)
    for l in (0, 1):
        torch.testing.assert_close(seen["mlp_out"][l], original["mlp_out"][l])
    torch.testing.assert_close(seen["resid_mid"][2], original["resid_mid"][2])
    torch.testing.assert_close(seen["mlp_out"][2][:, 1:], expected[:, 1:])
    torch.testing.assert_close(seen["mlp_out"][2][:, 0], original["mlp_out"][2][:, 0])


def test_exact_reconstruction_recovers_everything(tiny_model_dir, monkeypatch):
    """A 'transcoder' that is the true MLP (features = MLP input, decoder = the MLP itself)
    makes the replacement model the original: KL 0, top-1 1, CE-loss recovered 1."""
    model, _ = load_pretrained(str(tiny_model_dir("llama")), dtype=torch.float32)
    blocks = get_layers(model)
    tc = make_transcoder()
    monkeypatch.setattr(tc, "encode_layer", lambda x, layer: x)

    def decode_from(acts, layer, targets):  # the true MLP of `layer`, nothing into later layers
        # .forward: without re-entering the splice's own hooks
        mlp = blocks[layer].mlp.forward(blocks[layer].post_attention_layernorm.forward(acts))
        return tuple(mlp if t == layer else torch.zeros_like(mlp) for t in targets)

    monkeypatch.setattr(tc, "decode_from", decode_from)
    with torch.no_grad():
        tc.b_dec.zero_()
    m = evaluate_transcoder(model, tc, random_sequences(n=5), batch_size=2, progress=False)
    assert m["n_sequences"] == 5 and m["n_predictions"] == 5 * 10
    assert m["ce_zero_ablation"] > m["ce_original"]
    assert m["ce_replacement"] == pytest.approx(m["ce_original"], abs=1e-5)
    assert m["ce_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert m["kl_replacement"] == pytest.approx(0.0, abs=1e-5)
    assert m["top1_agreement"] == 1.0
    for row in m["per_layer"]:
        assert row["kl"] == pytest.approx(0.0, abs=1e-5) and row["top1_agreement"] == 1.0
        assert row["ce_recovered"] == pytest.approx(1.0, abs=1e-4)


def test_zero_transcoder_equals_zero_ablation(tiny_model_dir):
    model, _ = load_pretrained(str(tiny_model_dir("llama")), dtype=torch.float32)
    tc = make_transcoder()
    with torch.no_grad():
        tc.b_dec.zero_()
        for W in tc.W_dec:
            W.zero_()
    m = evaluate_transcoder(model, tc, random_sequences(), batch_size=3, progress=False)
    assert m["ce_replacement"] == pytest.approx(m["ce_zero_ablation"], abs=1e-6)
    assert m["ce_recovered"] == pytest.approx(0.0, abs=1e-6)
    assert m["kl_replacement"] > 0


@pytest.mark.parametrize("split", ["val", "train"])
def test_split_sequences_hold_only_their_split(tiny_run, split):
    from pipeline.loader import split_mask

    store = ActivationStore(tiny_run["paths"]["activations"])
    ids = split_sequences(store, split, 0.2, 1000)
    assert 0 < len(ids) < store.n_tokens // 16
    T = store.schema.context_len
    mask = split_mask(store.array("doc_ids")[:], store.array("positions")[:], split, 0.2).reshape(-1, T)
    all_ids = store.array("token_ids")[:].reshape(-1, T)
    seqs = {tuple(s) for s, v in zip(all_ids, mask) if v[1:].all()}
    assert {tuple(s) for s in ids} <= seqs
    assert len(split_sequences(store, split, 0.2, 2)) == 2


def test_stage_writes_metrics(tiny_run, tmp_path, monkeypatch):
    from stages.evaluate import main

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_run))
    monkeypatch.chdir(tmp_path)
    main()
    metrics = json.loads((Path(tiny_run["paths"]["metrics"]) / "evaluate.json").read_text())
    assert set(metrics) == KEYS
    assert metrics["n_sequences"] == 6 and metrics["n_predictions"] == 6 * 14
    assert [row["layer"] for row in metrics["per_layer"]] == [0, 1, 2]
    assert set(metrics["per_layer"][0]) == {"layer", "ce", "ce_recovered", "kl", "top1_agreement"}
    for key in KEYS - {"per_layer"}:
        assert math.isfinite(metrics[key]), key
    assert 0 <= metrics["top1_agreement"] <= 1 and metrics["kl_replacement"] >= 0


def test_cli_generate(tiny_run, tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tiny_run))
    result = CliRunner().invoke(
        cli, ["generate", "--prompt", "The quick brown", "--max-new-tokens", "4", "--params", str(path)]
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["prompt", "original", "replacement"]


def _run_with(raw, **paths):
    return evaluate.run(parse_params({**raw, "paths": {**raw["paths"], **paths}}), progress=False)


def test_missing_transcoder_says_to_train(tiny_run, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no config.yaml.*dvc repro train"):
        _run_with(tiny_run, transcoder=str(tmp_path / "nothing"))


@pytest.mark.parametrize("n_layers, d_model", [(2, 32), (3, 16)])
def test_transcoder_for_another_model_is_refused(tiny_run, tmp_path, n_layers, d_model):
    export_transcoder(make_transcoder(n_layers=n_layers, d_model=d_model), tmp_path / "tc", model_name="x")
    message = (
        rf"n_layers={n_layers}, d_model={d_model}, but the model .* n_layers=3, d_model=32.*dvc repro train"
    )
    with pytest.raises(ValueError, match=message):
        _run_with(tiny_run, transcoder=str(tmp_path / "tc"))


def test_no_held_out_sequences_is_an_error(tiny_run):
    raw = {**tiny_run, "train": {**tiny_run["train"], "val_fraction": 0.001}}
    with pytest.raises(ValueError, match=r"no stored sequence .* validation documents.*train.val_fraction"):
        _run_with(raw)


def test_bad_evaluate_params_name_the_key():
    with pytest.raises(ValueError, match="`evaluate.batch_size` must be >= 1, got 0"):
        parse_params({"evaluate": {"batch_size": 0}})
    with pytest.raises(ValueError, match="`evaluate.n_seqs` is not a known key of `evaluate`"):
        parse_params({"evaluate": {"n_seqs": 3}})
