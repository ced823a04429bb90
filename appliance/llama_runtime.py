"""llama.cpp as this machine runs it: the CPU kernels chosen at run time, and what doctor reports.

The appliance's llama-cpp-python is built portably (packaging/llama-wheel.sh): no host instruction set is
baked in, and the CPU kernels are loadable modules, ``llama_cpp/lib/libggml-cpu-<variant>.so``, one per x86
generation (``x64`` is plain x86-64). ``lib()`` loads the best variant this CPU supports, with llama.cpp's
own scoring (``ggml_backend_load_all_from_path``), when ``llama_cpp`` is imported (the wheel's own
``llama_cpp/_backends.py``): llama.cpp would otherwise look beside the Python executable and in the current
directory, find nothing, and refuse every model ("no backends are loaded").

``APPLIANCE_LLAMA_CPU=<variant>`` forces one variant (``x64`` proves a bundle runs on an older CPU).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import InvalidInput

ENV_FORCE = "APPLIANCE_LLAMA_CPU"
_PREFIX = "libggml-cpu-"
_loaded = False


def lib_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.origin:
        raise InvalidInput("llama-cpp-python is not installed; run scripts/setup.sh.")
    return Path(spec.origin).parent / "lib"


def variants(where: Path | None = None) -> list[str]:
    """The CPU variants shipped (empty for a non-portable build, whose kernels are linked in)."""
    where = where or lib_dir()
    return sorted(p.name[len(_PREFIX):-3] for p in where.glob(f"{_PREFIX}*.so"))


def lib():
    """``import llama_cpp`` with its CPU backend loaded, and llama.cpp's own logging limited to errors.

    The loading itself is the wheel's (``llama_cpp/_backends.py``, from packaging/llama_cpp_backends.py): it runs
    when ``llama_cpp`` is imported, so the package works on its own; here its outcome becomes one sentence."""
    global _loaded
    import logging

    import llama_cpp

    if not _loaded:  # once: lib() is called on hot paths (every generated token's end-of-generation check)
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
        try:
            from llama_cpp import _backends
        except ImportError:
            raise InvalidInput("this llama-cpp-python was not built by packaging/llama-wheel.sh (it has no "
                               "llama_cpp/_backends.py); run scripts/setup.sh again.") from None
        failed = _backends.load(lib_dir())
        if failed:
            raise InvalidInput(failed + ".")
        _loaded = True
    return llama_cpp


def _mapped(pattern: str) -> list[str]:
    """The files this process has mapped whose name matches ``pattern``."""
    maps = Path("/proc/self/maps")
    fields = (line.split(None, 5) for line in (maps.read_text() if maps.exists() else "").splitlines())
    return sorted({f[5] for f in fields if len(f) == 6 and re.search(pattern, f[5])})


def loaded_variant() -> str:
    """Which CPU variant this process runs: read from the libraries it has mapped (llama.cpp unloads the
    variants it scored and did not pick)."""
    found = sorted({Path(p).name[len(_PREFIX):-3] for p in _mapped(re.escape(_PREFIX) + r"[A-Za-z0-9_.]+\.so$")})
    return ", ".join(found) if found else "built in (not a portable build)"


def describe() -> dict:
    """What runs here: the CPU variant loaded, the variants shipped, and llama.cpp's system info (features)."""
    llama_cpp = lib()
    info = llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()
    return {
        "variant": loaded_variant(),
        "forced": os.environ.get(ENV_FORCE) or None,
        "variants": variants(),
        "system_info": info,
        "features": sorted(m.group(1) for m in re.finditer(r"([A-Z0-9_]+) = 1", info)),
        "version": getattr(llama_cpp, "__version__", "?"),
    }


def probe(timeout: float = 60.0) -> dict:
    """``describe()`` in a child process, so that a build that crashes on this CPU is reported, not fatal:
    returns describe()'s fields, or ``{"error": sentence}``."""
    import json
    import subprocess
    import sys

    from .native_crash import signal_text

    code = "import json, appliance.llama_runtime as r; print(json.dumps(r.describe()))"
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"loading llama.cpp's CPU backend did not finish in {timeout:.0f} s."}
    if proc.returncode < 0:
        return {"error": f"loading llama.cpp's CPU backend died of {signal_text(-proc.returncode)}; "
                         "this llama.cpp build does not run on this CPU: rebuild it with scripts/setup.sh."}
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"loading llama.cpp's CPU backend failed ({last})."}
    return json.loads(proc.stdout.strip().splitlines()[-1])
