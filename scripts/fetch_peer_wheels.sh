#!/usr/bin/env bash
# Download the peers' wheels for the device machine (CPython 3.12, manylinux x86_64) into
# .whl/peers/<peer>/ (git-ignored; pass `carry: [".whl/peers", ".peers"]` to the device run, the
# second for llama.cpp's prebuilt tools, copied below). They are
# never project dependencies: scripts/peers.py installs them at run time with
#   pip install --no-index --no-deps --target /tmp/peer-<peer> .whl/peers/<peer>/*.whl
# Several --platform tags, because pip does not widen manylinux_2_28 to the older
# manylinux_2_17 / manylinux2014 wheels (tokenizers 0.22.1 only ships those).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl/peers}
PIP=${PIP:-python -m pip}
opts=(download --only-binary=:all: --no-deps --python-version 3.12 --implementation cp
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64)

fetch() {
    local peer=$1
    shift
    mkdir -p "$DEST/$peer"
    $PIP "${opts[@]}" -d "$DEST/$peer" "$@"
}

# Upstream oLLM (PyPI name `ollm`, like this project) with the transformers stack it runs with
# (it fails with transformers 5.x); requests is imported by oLLM and transformers 4.x but is no
# longer on the device machine. torch, accelerate, safetensors, numpy, regex, pyyaml, tqdm,
# filelock, fsspec come from the machine.
fetch ollm ollm==1.0.3 transformers==4.57.0 huggingface_hub==0.36.0 tokenizers==0.22.1 \
    requests urllib3 idna charset_normalizer certifi
# AirLLM 4.0 runs on the machine's transformers 5.x; its other requirements (scipy,
# sentencepiece) are only imported by model families the benchmark does not use.
fetch airllm airllm==4.0.0

# llama.cpp: the prebuilt llama-bench and GGUF writer are copied, not downloaded (building takes
# about 95 minutes on 2 cores); scripts/peers.py reads them from .peers/llamacpp (git-ignored,
# carried to the device machine).
LLAMACPP_TOOLS=${LLAMACPP_TOOLS:-/work/shared/tools/llamacpp}
if [ -d "$LLAMACPP_TOOLS" ]; then
    mkdir -p .peers
    rm -rf .peers/llamacpp
    cp -r "$LLAMACPP_TOOLS" .peers/llamacpp
    chmod -R u+w .peers/llamacpp
    grep -qx '/.peers/' .git/info/exclude 2>/dev/null || echo '/.peers/' >> .git/info/exclude
    du -sh .peers/llamacpp
fi

du -sh "$DEST"/* "$DEST"
