#!/usr/bin/env bash
# Download the serving stack's wheels for the device machine (CPython 3.12, manylinux x86_64)
# into .whl/serve/ (git-ignored; pass `carry: [".whl/serve"]` to the device run). The machine has
# torch, transformers and numpy but not FastAPI, uvicorn, prometheus-client or the openai client;
# scripts/gpu/serve.py installs these wheels at run time with
#   pip install --no-index --no-deps --target /tmp/ollm-serve-wheels .whl/serve/*.whl
# Versions are those of the development venv (`pip list`), so the device runs what the tests ran.
# --no-deps: the list below is the whole import chain, nothing more (no numpy, no torch).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl/serve}
PIP=${PIP:-python -m pip}
mkdir -p "$DEST"
# Several --platform tags: pip does not widen manylinux_2_28 to the older manylinux_2_17 wheels.
$PIP download --only-binary=:all: --no-deps --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$DEST" \
    fastapi==0.165.0 starlette==1.10.0 annotated-doc==0.0.7 opentelemetry-api==1.45.2 \
    pydantic==2.14.4 pydantic-core==2.50.5 typing-inspection==0.4.5 annotated-types==0.8.0 \
    typing-extensions==4.16.0 \
    uvicorn==0.54.0 h11==0.16.0 click==8.5.1 \
    anyio==4.16.0 sniffio==1.3.1 idna==3.20 \
    prometheus-client==0.26.0 \
    openai==3.57.0 jiter==0.19.0 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 \
    httpx==0.28.1 httpcore==1.0.9 certifi==2026.10.19.post1
du -sh "$DEST"
