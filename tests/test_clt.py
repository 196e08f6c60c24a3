import pytest
import torch

from pipeline.clt import (
    CLTShape,
    CrossLayerTranscoder,
    export_transcoder,
    jumprelu,
    load_transcoder,
    raw_space,
)
from pipeline.clt_ops import ste_window


def make(kind="clt", activation="jumprelu", n_layers=4, d_model=16, d_tc=32, k=4):
    model = CrossLayerTranscoder(CLTShape(n_layers, d_model, d_tc, kind=kind, activation=activation, k=k))
    with torch.no_grad():
        model.b_enc.normal_(0, 0.1)
        model.b_dec.normal_(0, 0.1)
        model.log_threshold.uniform_(-3, -1)
        model.input_scale.uniform_(0.5, 2)
        model.output_scale.uniform_(0.5, 2)
    return model


def naive_decode(model, acts):
    """Reference: y_l' = sum_{l <= l'} W_dec_l[:, l' - l]^T a_l + b_dec_l' (per-layer: l = l' only)."""
    L = model.shape.n_layers
    out = torch.zeros(acts.shape[1], L, model.shape.d_model)
    for target in range(L):
        sources = range(target + 1) if model.shape.kind == "clt" else [target]
        for l in sources:
            out[:, target] += acts[l] @ model.W_dec[l][:, target - l if model.shape.kind == "clt" else 0]
        out[:, target] += model.b_dec[target]
    return out


@pytest.mark.parametrize("kind", ["clt", "plt"])
@pytest.mark.parametrize("sparse", [False, True])
def test_decode_matches_naive_with_gradients(kind, sparse):
    model = make(kind)
    acts = torch.relu(torch.randn(4, 5, 32)) * (torch.rand(4, 5, 32) < 0.2)  # (n_layers, n_tokens, d_tc)
    acts[:, :, :6] = 0  # some features inactive in the whole batch
    acts[:, 2] = 0  # a token with no active feature in any layer
    acts[1] = 0  # a layer with no active pair
    g = torch.randn(5, 4, 16)
    a1 = acts.clone().requires_grad_()
    (model.decode(a1, sparse=sparse) * g).sum().backward()
    grads = [W.grad.clone() for W in model.W_dec]
    model.zero_grad()
    a2 = acts.clone().requires_grad_()
    (naive_decode(model, a2) * g).sum().backward()
    with torch.no_grad():
        torch.testing.assert_close(
            model.decode(acts, sparse=sparse), naive_decode(model, acts), rtol=1e-5, atol=1e-5
        )
    for mine, ref in zip(grads, model.W_dec):
        torch.testing.assert_close(mine, ref.grad, rtol=1e-5, atol=1e-5)
    # the JumpReLU needs gradients only where a feature is active (its mask is 0 elsewhere)
    active = acts != 0 if sparse else torch.ones_like(acts, dtype=torch.bool)
    torch.testing.assert_close(a1.grad[active], a2.grad[active], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["clt", "plt"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("used", ["both", "copies", "norms"])
def test_decoder_weights_match_a_cast_and_a_norm_with_gradients(kind, dtype, used):
    """`decoder_weights`' one-pass backward against autograd through `.to(dtype)` and
    `decoder_norms`, a zero decoder row included (its norm's gradient is 0)."""
    model = make(kind)
    with torch.no_grad():
        model.W_dec[1][3] = 0
    g_norms = torch.randn(4, 32)
    g_copies = [torch.randn(W.shape[0], W[0].numel()).to(dtype) for W in model.W_dec]

    def loss(norms, copies):
        terms = []
        if used != "copies":
            terms.append((norms * g_norms).sum())
        if used != "norms":
            terms += [(W.float() * g.float()).sum() for W, g in zip(copies, g_copies)]
        return sum(terms)

    norms, copies = model.decoder_weights(dtype)
    loss(norms, copies).backward()
    grads = [W.grad.clone() for W in model.W_dec]
    model.zero_grad()
    ref_norms = model.decoder_norms()
    ref_copies = [W.to(dtype).flatten(1) for W in model.W_dec]
    loss(ref_norms, ref_copies).backward()
    torch.testing.assert_close(norms, ref_norms, rtol=0, atol=0)
    for mine, ref in zip(copies, ref_copies):
        assert mine.dtype == dtype
        torch.testing.assert_close(mine, ref, rtol=0, atol=0)
    for mine, W in zip(grads, model.W_dec):
        torch.testing.assert_close(mine, W.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["clt", "plt"])
@pytest.mark.parametrize("activation", ["jumprelu", "topk"])
@pytest.mark.parametrize("autocast", [False, True])
def test_sparse_decoder_gives_dense_outputs_and_gradients_through_the_loss(kind, activation, autocast):
    """The token-level sparse decoder returns 0 as the gradient of inactive acts: check that
    the whole model's outputs and every parameter's gradient still equal the dense path's."""
    model = make(kind, activation)
    x = torch.randn(9, 4, 16)  # (n_tokens, n_layers, d_model)
    y = torch.randn(9, 4, 16)
    results = []
    for sparse in (False, True):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            h, acts, recon = model(x, bandwidth=0.05, sparse=sparse)
        penalty = (torch.tanh(acts.float() * model.decoder_norms()[:, None])).sum()
        loss = (recon.float() - y).pow(2).sum() + 0.1 * penalty
        loss.backward()
        grads = {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}
        results.append((recon.float(), grads))
    (dense, dense_grads), (sparse_, sparse_grads) = results
    tol = {"rtol": 2e-2, "atol": 2e-2} if autocast else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(sparse_, dense, **tol)
    if activation == "jumprelu":  # the STE window was exercised, at inactive features too
        assert dense_grads["log_threshold"].abs().sum() > 0
        with torch.no_grad():
            h = model.pre_acts(x)
            assert (ste_window(h, model.threshold[:, None], 0.05) & (h <= model.threshold[:, None])).any()
    assert sparse_grads.keys() == dense_grads.keys()
    for name, grad in dense_grads.items():
        scale = grad.abs().max().clamp_min(1)
        torch.testing.assert_close(sparse_grads[name] / scale, grad / scale, **tol, msg=name)


@pytest.mark.parametrize("kind", ["clt", "plt"])
def test_sparse_decoder_under_bf16_autocast(kind):
    """bf16 activations under autocast: the sparse path (bf16 gathers, autocast off inside) agrees
    with the float32 reference to bf16 precision, returns bf16, and passes back bf16 gradients."""
    model = make(kind)
    acts = (torch.relu(torch.randn(4, 6, 32)) * (torch.rand(4, 6, 32) < 0.3)).bfloat16().requires_grad_()
    g = torch.randn(6, 4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.decode(acts, sparse=True)
    assert out.dtype == torch.bfloat16
    (out.float() * g).sum().backward()
    assert acts.grad.dtype == torch.bfloat16
    ref_acts = acts.detach().float().requires_grad_()
    model_grads = [W.grad.clone() for W in model.W_dec]
    model.zero_grad()
    ref = naive_decode(model, ref_acts)
    (ref * g).sum().backward()
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    active = acts != 0
    torch.testing.assert_close(acts.grad.float()[active], ref_acts.grad[active], rtol=2e-2, atol=2e-2)
    for mine, W in zip(model_grads, model.W_dec):
        torch.testing.assert_close(mine, W.grad, rtol=2e-2, atol=2e-2)


def test_jumprelu_forward_and_straight_through_gradients():
    h = torch.tensor([0.05, 0.149, 0.151, 0.3, -1.0], requires_grad=True)
    theta = torch.full((5,), 0.15, requires_grad=True)
    out = jumprelu(h, theta, 0.01)
    torch.testing.assert_close(out, torch.tensor([0, 0, 0.151, 0.3, 0]))
    out.sum().backward()
    torch.testing.assert_close(h.grad, torch.tensor([0.0, 0, 1, 1, 0]))
    # rectangle kernel: -(theta / eps) inside |h - theta| < eps / 2, 0 outside
    torch.testing.assert_close(theta.grad, torch.tensor([0, -15.0, -15.0, 0, 0]))


@pytest.mark.parametrize("kind", ["clt", "plt"])
def test_export_folds_normalisation_and_roundtrips(tmp_path, kind):
    model = make(kind)
    x_raw = torch.randn(7, 4, 16) * 3
    x_norm = x_raw * model.input_scale[None, :, None]
    with torch.no_grad():
        _, acts, recon = model(x_norm)
        expected = recon / model.output_scale[None, :, None]
    export_transcoder(model, tmp_path / "tc", model_name="tiny")
    loaded = load_transcoder(tmp_path / "tc")
    with torch.no_grad():
        _, acts2, recon2 = loaded(x_raw)
    torch.testing.assert_close(acts2, acts, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(recon2, expected, rtol=1e-5, atol=1e-5)
    files = sorted(p.name for p in (tmp_path / "tc").iterdir())
    if kind == "clt":
        assert "W_enc_0.safetensors" in files and "W_dec_3.safetensors" in files
    else:
        assert "layer_0.safetensors" in files
    in_memory = raw_space(model)  # what the train stage's KL phase fine-tunes
    assert in_memory.shape == loaded.shape
    for (name, t), (_, ref) in zip(in_memory.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(t, ref), name


def test_topk_and_batchtopk_keep_k_per_layer():
    h = torch.randn(4, 8, 32)  # (n_layers, n_tokens, d_tc)
    for activation in ("topk", "batchtopk"):
        model = make(activation=activation, k=3)
        acts = model.activate(h.abs() + 0.1)
        counts = (acts != 0).sum(-1).float()  # (n_layers, n_tokens)
        if activation == "topk":
            assert (counts == 3).all()
        else:
            torch.testing.assert_close(counts.sum(1), torch.full((4,), 24.0))
