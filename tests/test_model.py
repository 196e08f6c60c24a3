import pytest
import torch

from pipeline.dump import _Target, capture_activations
from pipeline.model import (
    get_architecture,
    get_layers,
    get_trunk,
    load_model,
    materialize,
    resolve_source,
)
from tests.tiny import ARCHS


def _capture(model, ids):
    n_layers, d_model = model.config.num_hidden_layers, model.config.hidden_size
    target = _Target()
    target.buffers = {n: torch.zeros(ids.numel(), n_layers, d_model) for n in ("resid_mid", "mlp_out")}
    with capture_activations(model, target), torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    return target.buffers, out


@pytest.mark.parametrize("arch", ARCHS)
def test_hooks_capture_what_the_block_computes(arch, tiny_model_dir):
    model, _ = load_model(tiny_model_dir(arch), dtype=torch.float32, device=torch.device("cpu"))
    ids = torch.randint(3, 300, (2, 10))
    acts, out = _capture(model, ids)
    hidden = out.hidden_states  # hidden[l] is the residual stream entering block l
    final_in = {}
    norm = getattr(get_trunk(model), get_architecture(model).final_norm)
    h = norm.register_forward_pre_hook(lambda m, a: final_in.setdefault("x", a[0]))
    with torch.no_grad():
        model(input_ids=ids)
    h.remove()
    n_layers = model.config.num_hidden_layers
    for layer in range(n_layers):
        nxt = hidden[layer + 1] if layer + 1 < n_layers else final_in["x"]
        total = acts["resid_mid"][:, layer] + acts["mlp_out"][:, layer]
        torch.testing.assert_close(total, nxt.reshape(-1, nxt.shape[-1]), rtol=1e-5, atol=1e-5)
        # resid_mid is not just the block input: attention has been added to it
        assert not torch.allclose(acts["resid_mid"][:, layer], hidden[layer].reshape(total.shape))


def test_mlp_out_is_the_mlp_block_output(tiny_model_dir):
    """Intervention: zeroing the captured MLP output changes the next residual by exactly it."""
    model, _ = load_model(tiny_model_dir("gemma2"), dtype=torch.float32, device=torch.device("cpu"))
    ids = torch.randint(3, 300, (1, 8))
    acts, out = _capture(model, ids)
    block = get_layers(model)[0]
    h = block.post_feedforward_layernorm.register_forward_hook(lambda m, a, o: torch.zeros_like(o))
    with torch.no_grad():
        ablated = model(input_ids=ids, output_hidden_states=True).hidden_states[1]
    h.remove()
    diff = (out.hidden_states[1] - ablated).reshape(-1, model.config.hidden_size)
    torch.testing.assert_close(diff, acts["mlp_out"][:, 0], rtol=1e-5, atol=1e-5)


def test_materialize_roundtrip(tiny_model_dir, tmp_path):
    src = tiny_model_dir("qwen2")
    out = materialize(str(src), tmp_path / "model")
    a, _ = load_model(src, dtype=torch.float32, device=torch.device("cpu"))
    b, _ = load_model(out, dtype=torch.float32, device=torch.device("cpu"))
    ids = torch.randint(3, 300, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(a(input_ids=ids).logits, b(input_ids=ids).logits)
    assert (out / "tokenizer.json").is_file() and (out / "model.safetensors").is_file()
    assert not (tmp_path / "model.partial").exists()
    # loadable by transformers 4.x (circuit-tracer): no transformers-5-only tokenizer class
    assert "TokenizersBackend" not in (out / "tokenizer_config.json").read_text()


def test_unknown_model_name_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="not a known alias"):
        resolve_source("no-such-model")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_source(str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_source(str(tmp_path))


def test_unsupported_architecture_is_a_clear_error():
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    with pytest.raises(ValueError, match="MistralForCausalLM is not supported; supported:"):
        get_architecture(MistralForCausalLM(config))


@pytest.mark.slow
def test_default_model_completes_paris(tmp_path):
    out = materialize("smollm2-135m-instruct", tmp_path / "model")
    model, tok = load_model(out, dtype=torch.bfloat16, device=torch.device("cpu"))
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=2, do_sample=False)
    assert tok.decode(gen[0, ids["input_ids"].shape[1] :]).startswith(" Paris")
