#!/usr/bin/env bash
# Prepare, on a machine with PyPI, the wheels that bench/gpu_train.sh installs on the GPU machine
# (Python 3.12, x86-64, no network there; its image already has torch, pyarrow, tokenizers,
# safetensors, numpy, pandas...). Ray's wheel is repacked without ray/jars (Java only) to fit the
# 64 MiB the device tool carries. Usage: bench/gpu_wheels.sh  -> .whl/ (git-ignored via .git/info/exclude)
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
PIP=${PIP:-.venv/bin/python -m pip}
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
$PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" -d .whl \
    ray==2.60.0 pydantic==2.14.4 pydantic-core annotated-types typing-inspection jsonschema \
    jsonschema-specifications referencing rpds-py tensorboardX hjson lz4 python-debian better-profanity chardet
# DeepSpeed ships as an sdist; its wheel is pure Python.
$PIP wheel -q --no-deps -w .whl deepspeed==0.19.8
# Ray without its Java payload.
ray_whl=$(ls .whl/ray-*.whl)
tmp=$(mktemp -d)
(cd "$tmp" && unzip -q "$OLDPWD/$ray_whl" && rm -rf ray/jars && sed -i '/^ray\/jars\//d' ray-*.dist-info/RECORD && zip -qr "$OLDPWD/$ray_whl.new" .)
mv "$ray_whl.new" "$ray_whl"
rm -rf "$tmp"
du -sh .whl
