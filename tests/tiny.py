"""Tiny random models for every supported architecture, built from configs (no download)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

ARCHS = ("llama", "qwen2", "gpt2", "gemma2", "gemma3")

TEXT = (
    "The quick brown fox jumps over the lazy dog. A stitch in time saves nine. "
    "All that glitters is not gold. The capital of France is Paris. "
    "One two three four five six seven eight nine ten. "
)


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with a small vocabulary, trained on a few sentences."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<bos>", "<eos>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([TEXT] * 10, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )


def make_config(arch: str, vocab_size: int, n_layers: int = 3, d_model: int = 32):
    common = dict(vocab_size=vocab_size, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    if arch == "gpt2":
        return GPT2Config(n_embd=d_model, n_layer=n_layers, n_head=4, n_positions=256, **common)
    llama_like = dict(
        hidden_size=d_model,
        intermediate_size=2 * d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        **common,
    )
    if arch == "llama":
        return LlamaConfig(**llama_like)
    if arch == "qwen2":
        return Qwen2Config(**llama_like)
    if arch == "gemma2":
        return Gemma2Config(head_dim=d_model // 4, **llama_like)
    if arch == "gemma3":
        return Gemma3TextConfig(head_dim=d_model // 4, sliding_window=16, **llama_like)
    raise ValueError(arch)


def make_model(arch: str, path: str | Path, *, n_layers: int = 3, d_model: int = 32, seed: int = 0):
    """Save a tiny random `arch` model and its tokenizer as a Hugging Face folder at `path`."""
    torch.manual_seed(seed)
    tokenizer = make_tokenizer()
    config = make_config(arch, len(tokenizer), n_layers, d_model)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # larger than the default init so activations are not all tiny
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)


def make_transcoder(kind="clt", n_layers=3, d_model=32, d_tc=24):
    """A random raw-space JumpReLU transcoder whose features fire on some tokens."""
    from pipeline.clt import CLTShape, CrossLayerTranscoder

    tc = CrossLayerTranscoder(CLTShape(n_layers, d_model, d_tc, kind=kind))
    with torch.no_grad():
        tc.b_enc.normal_(0, 0.1)
        tc.b_dec.normal_(0, 0.1)
        tc.log_threshold.uniform_(-3, -1)
    return tc
