#!/usr/bin/env bash
# Build what a CUDA machine with Python 3.12 and torch (but none of our other packages, and no network) needs to run
# bench/gpu_probe.py:  KIT/site.tgz (the pinned packages it lacks, unpacked wheels, Liger's kernels included),
# KIT/project.tgz (this working tree's tracked and new files) and KIT/tokenizer (SmolLM2's, for random weights).
# Run from the project root with .venv set up:   bench/gpu-kit.sh .gpu      (keep .gpu out of git)
# Then on the CUDA machine:                      OUT=results bash bench/gpu-run.sh .gpu
set -euo pipefail
kit=${1:?usage: bench/gpu-kit.sh KIT_DIR}
mkdir -p "$kit"; tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
# The CUDA machine has torch (with triton), accelerate, safetensors, tokenizers, huggingface-hub, numpy, pandas,
# pyarrow, psutil, nvidia-ml-py, rich, pyyaml, jinja2, scipy, xxhash, fsspec: carry only what it lacks, at our pins.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$tmp/whl" \
  bitsandbytes==0.50.2 trl==1.16.0 peft==0.21.2 transformers==5.23.0 datasets==5.2.0 dill==0.4.1 \
  multiprocess==0.70.19 gguf==0.19.0 cryptography==50.0.2 cffi==2.1.1 pycparser==3.12 pydantic==2.14.3 \
  pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 datasketch==2.0.0 regex==2026.11.19 \
  liger-kernel==0.8.5
mkdir -p "$tmp/site"
for w in "$tmp"/whl/*.whl; do unzip -q -o "$w" -d "$tmp/site"; done
# bitsandbytes ships one library per CUDA version: keep the CPU one and CUDA 13's (torch 2.11 there is cu130).
find "$tmp/site/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name '*_cpu.so' ! -name '*_cuda13*' -delete
tar czf "$kit/site.tgz" -C "$tmp/site" .
git ls-files -z --cached --others --exclude-standard | tar czf "$kit/project.tgz" --null -T -
.venv/bin/python - "$kit/tokenizer" <<'PY'
import sys
from transformers import AutoTokenizer
from appliance.models import default_gguf
g = default_gguf()
AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name).save_pretrained(sys.argv[1])
PY
du -sh "$kit"
