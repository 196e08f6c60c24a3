"""Check that a transformers install loads the materialised model folder and predicts sensibly.

Runs under either venv (imports only torch and transformers), so it can compare the project's
.venv (transformers 5.x) with .ct-venv (circuit-tracer's transformers 4.57.x):

    .venv/bin/python    ct/check_model.py --save /tmp/logits_main.pt
    .ct-venv/bin/python ct/check_model.py --save /tmp/logits_ct.pt --compare /tmp/logits_main.pt

Prints transformers' version, the model's rope theta as loaded, the top-1 next token for the
prompt, and (with --compare) the max abs float32 logit difference against another run's logits.
Exits non-zero if the top-1 token is not the expected one or the difference exceeds --atol.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def patch_tokenizers_backend() -> bool:
    """Let transformers 4.x open a tokenizer folder saved by transformers 5.x.

    transformers 5 writes ``"tokenizer_class": "TokenizersBackend"`` into tokenizer_config.json;
    4.x has no such class and AutoTokenizer raises "Tokenizer class TokenizersBackend does not
    exist or is not currently imported". That class is just "the tokenizer.json as is", i.e.
    4.x's PreTrainedTokenizerFast, and AutoTokenizer's last lookup is
    getattr(importlib.import_module("transformers"), name), so an alias there is enough.
    Caveat: in 4.x, importing transformers.processing_utils (nnsight and transformer_lens do)
    replaces sys.modules["transformers"] with a fresh module object (direct_transformers_import),
    dropping an alias set earlier; so import it first and patch the module now in sys.modules.
    No-op on 5.x. Returns True when it patched.
    """
    import importlib

    if hasattr(transformers, "TokenizersBackend"):
        return False
    importlib.import_module("transformers.processing_utils")
    mod = sys.modules["transformers"]
    if not hasattr(mod, "TokenizersBackend"):
        mod.TokenizersBackend = mod.PreTrainedTokenizerFast
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "data" / "model"))
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--expect", default=" Paris", help="expected top-1 next token ('' to skip)")
    ap.add_argument("--save", help="write {input_ids, logits, version} here (torch.save)")
    ap.add_argument("--compare", help="a file written by --save from another run")
    ap.add_argument("--atol", type=float, default=1e-3, help="max allowed abs logit difference")
    args = ap.parse_args()

    torch.manual_seed(0)
    if patch_tokenizers_backend():
        print("note: aliased transformers.TokenizersBackend = PreTrainedTokenizerFast (transformers 4.x)")
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()
    cfg = model.config
    rope = getattr(cfg, "rope_theta", None)
    if rope is None:
        rope = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta")

    plain = tok(args.prompt, return_tensors="pt").input_ids
    # circuit-tracer's ensure_tokenized() tokenizes with add_special_tokens=False and prepends
    # tokenizer.bos_token_id when the first token is not special; check that variant too.
    with_bos = torch.cat([torch.tensor([[tok.bos_token_id]]), plain], dim=1)

    print(f"transformers=={transformers.__version__} torch=={torch.__version__}")
    print(
        f"model={args.model} class={type(model).__name__} rope_theta={rope} "
        f"dtype={next(model.parameters()).dtype} bos_token_id={tok.bos_token_id}"
    )

    ok = True
    results = {"version": transformers.__version__}
    for name, input_ids in (("plain", plain), ("bos", with_bos)):
        with torch.no_grad():
            logits = model(input_ids).logits[0].float()
        top1 = int(logits[-1].argmax())
        top1_str = tok.decode([top1])
        p1 = float(logits[-1].softmax(-1)[top1])
        print(
            f"[{name}] input_ids={input_ids[0].tolist()} top1 next token: id={top1} {top1_str!r} p={p1:.4f}"
        )
        results[name] = {"input_ids": input_ids, "logits": logits}
        if args.expect and top1_str != args.expect:
            print(f"[{name}] FAIL: expected top-1 {args.expect!r}")
            ok = False

    if args.save:
        torch.save(results, args.save)
        print(f"saved logits to {args.save}")
    if args.compare:
        other = torch.load(args.compare, weights_only=True)
        for name in ("plain", "bos"):
            a, b = other[name], results[name]
            if not torch.equal(a["input_ids"], b["input_ids"]):
                print(f"[{name}] FAIL: token ids differ from {args.compare}: {a['input_ids'][0].tolist()}")
                ok = False
                continue
            diff = (a["logits"] - b["logits"]).abs()
            mx = float(diff.max())
            same_top1 = bool((a["logits"].argmax(-1) == b["logits"].argmax(-1)).all())
            print(
                f"[{name}] vs transformers=={other['version']}: max abs logit diff={mx:.3e} "
                f"(last position {float(diff[-1].max()):.3e}); top1 equal at every position: {same_top1}"
            )
            if mx > args.atol:
                print(f"[{name}] FAIL: max abs logit diff {mx:.3e} > atol {args.atol:g}")
                ok = False
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
