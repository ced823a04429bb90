#!/usr/bin/env bash
# On the CUDA machine:  OUT=results bash bench/gpu-run.sh [KIT] [probe options...]
# Unpacks the kit made by bench/gpu-kit.sh, puts it ahead of the machine's own packages, and runs bench/gpu_probe.py
# on the Llama-3.1-8B shape (PROBE_SHAPE to change); the rows land in $OUT/gpu_measured.json (a copy of ours, with
# the new rows appended) and the log in $OUT/probe.log. Copy that file over bench/gpu_measured.json to keep them.
set -u
export PYTHONUNBUFFERED=1
kit=$(cd "${1:-.gpu}" && pwd); shift || true
out=${OUT:-$PWD/probe-out}; mkdir -p "$out"; out=$(cd "$out" && pwd)
mkdir -p /tmp/appliance-site /tmp/appliance-proj
tar xzf "$kit/site.tgz" -C /tmp/appliance-site && tar xzf "$kit/project.tgz" -C /tmp/appliance-proj \
  || { echo "unpack failed"; exit 1; }
export PYTHONPATH=/tmp/appliance-proj:/tmp/appliance-site
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
cd /tmp/appliance-proj
cp bench/gpu_measured.json "$out/gpu_measured.json"
timeout "${PROBE_TIMEOUT:-540}" python3 bench/gpu_probe.py --shape "${PROBE_SHAPE:-llama-3.1-8b-instruct}" \
  --tokenizer "$kit/tokenizer" --measured "$out/gpu_measured.json" --deadline "${PROBE_DEADLINE:-420}" "$@" 2>&1 \
  | tee "$out/probe.log" | grep -v -E 'it/s\]|s/it\]'
echo "probe exit ${PIPESTATUS[0]}"
