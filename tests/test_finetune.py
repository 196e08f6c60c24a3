import pytest
import torch

from pipeline.evaluate import evaluate_transcoder
from pipeline.finetune import kl_finetune, layer_fvu, original_pass
from pipeline.model import get_architecture, get_layers, load_pretrained
from tests.tiny import make_transcoder


def sequences(n=8, T=12, vocab=300):
    ids = torch.randint(3, vocab, (n, T))
    ids[:, 0] = 0
    return ids


def test_original_pass_captures_every_layer_after_bos(tiny_model_dir):
    model, _ = load_pretrained(str(tiny_model_dir("llama")), dtype=torch.float32)
    ids = sequences(n=2, T=5)
    arch, seen = get_architecture(model), {}
    handles = [
        block.get_submodule(arch.mlp_output).register_forward_hook(
            lambda m, a, out, l=l: seen.update({l: out.detach().clone()})
        )
        for l, block in enumerate(get_layers(model))
    ]
    with torch.no_grad():
        reference = torch.log_softmax(model(input_ids=ids).logits[:, 1:-1].float(), -1)
    for h in handles:
        h.remove()
    logp, acts = original_pass(model, ids, 3)
    torch.testing.assert_close(logp, reference)
    assert acts["mlp_out"].shape == (2 * 4, 3, 32)
    for l in range(3):
        torch.testing.assert_close(acts["mlp_out"][:, l], seen[l][:, 1:].reshape(-1, 32))


def test_layer_fvu_is_the_mean_of_one_minus_r2_per_layer_and_so_is_its_gradient():
    tc = make_transcoder()
    x, y = torch.randn(50, 3, 32), torch.randn(50, 3, 32)
    fvu, l0 = layer_fvu(tc, x, y)
    grads = torch.autograd.grad(fvu, list(tc.W_dec))
    _, acts, recon = tc(x)
    naive = (
        sum(((recon[:, l] - y[:, l]) ** 2).sum() / ((y[:, l] - y[:, l].mean(0)) ** 2).sum() for l in range(3))
        / 3
    )
    torch.testing.assert_close(fvu, naive)
    for g, ref in zip(grads, torch.autograd.grad(naive, list(tc.W_dec))):
        torch.testing.assert_close(g, ref)
    torch.testing.assert_close(l0, (acts != 0).float().sum(-1).mean())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kl_finetune_lowers_kl_and_touches_only_the_transcoder(tiny_model_dir, dtype):
    model, _ = load_pretrained(str(tiny_model_dir("llama")), dtype=torch.float32)
    tc = make_transcoder()
    ids = sequences()
    before = evaluate_transcoder(model, tc, ids, batch_size=8, progress=False)["kl_replacement"]
    lm = {k: v.clone() for k, v in model.state_dict().items()}
    threshold = tc.log_threshold.detach().clone()
    w_enc = tc.W_enc.detach().clone()
    history = kl_finetune(
        model, tc, ids, n_steps=40, batch_size=4, lr=1e-2, mse_coef=0.1, compute_dtype=dtype, progress=False
    )
    after = evaluate_transcoder(model, tc, ids, batch_size=8, progress=False)["kl_replacement"]
    assert len(history) == 40 and set(history[0]) == {"step", "loss", "kl", "fvu", "l0"}
    assert after < 0.5 * before, (before, after)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in lm.items())
    assert not any(p.requires_grad for p in model.parameters())
    assert torch.equal(tc.log_threshold, threshold) and not torch.equal(tc.W_enc, w_enc)
