"""Shipped inside the appliance's llama-cpp-python wheel as ``llama_cpp/_backends.py`` (packaging/llama-wheel.sh
copies it there and calls ``load`` right after ``llama_cpp`` loads libllama).

Why: the portable build makes llama.cpp's CPU kernels loadable modules (``lib/libggml-cpu-<variant>.so``), and
llama.cpp registers none until one is loaded; llama-cpp-python never asks, so ``import llama_cpp`` alone then
``Llama(...)`` failed with "no backends are loaded". Loading them here, at import, makes the package work on its
own, in a user's script as in the appliance.

This file must not import the appliance (it lives in another package). ``APPLIANCE_LLAMA_CPU=<variant>`` forces
one variant, as in the appliance; a failure is not raised at import (``error`` says why, and the appliance's
``llama_runtime`` turns it into one sentence), so ``import llama_cpp`` itself never breaks.
"""

from __future__ import annotations

import ctypes
import os
import re
from pathlib import Path

ENV_FORCE = "APPLIANCE_LLAMA_CPU"
PREFIX = "libggml-cpu-"
error: str | None = None
_done = False


def variants(where: Path) -> list[str]:
    """The CPU variants shipped (empty for a non-portable build, whose kernels are linked in)."""
    return sorted(p.name[len(PREFIX):-3] for p in Path(where).glob(f"{PREFIX}*.so"))


def mapped(pattern: str) -> list[str]:
    """The files this process has mapped whose name matches ``pattern``."""
    maps = Path("/proc/self/maps")
    fields = (line.split(None, 5) for line in (maps.read_text() if maps.exists() else "").splitlines())
    return sorted({f[5] for f in fields if len(f) == 6 and re.search(pattern, f[5])})


def load(where: Path) -> str | None:
    """Load the best CPU variant this CPU runs (llama.cpp's own scoring), or the forced one; once. Returns
    (and keeps in ``error``) why nothing loaded, else None."""
    global error, _done
    if _done:
        return error
    _done = True
    where = Path(where)
    # The libggml that libllama itself loaded (its soname, e.g. libggml.so.0): the wheel holds libggml.so,
    # .so.0 and .so.0.x as separate copies, and loading another copy would register the backend in a registry
    # llama.cpp never reads.
    found = [p for p in mapped(r"/libggml\.so[.0-9]*$") if Path(p).parent == where] or [str(where / "libggml.so")]
    try:
        ggml = ctypes.CDLL(found[0])
    except OSError as e:
        error = f"{found[0]} does not load ({e})"
        return error
    ggml.ggml_backend_reg_count.restype = ctypes.c_size_t
    ggml.ggml_backend_load.restype = ctypes.c_void_p
    ggml.ggml_backend_load.argtypes = [ctypes.c_char_p]
    ggml.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
    if ggml.ggml_backend_reg_count() > 0:  # a non-portable build registers its kernels itself
        return None
    # Quiet while loading: ggml announces each module on stderr ("load_backend: loaded CPU backend from ..."), and
    # llama-cpp-python's own log callback (which honours its verbosity) is installed only after this runs.
    callback = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
    quiet = callback(lambda level, text, user: None)
    ggml.ggml_log_set.argtypes = [callback, ctypes.c_void_p]
    ggml.ggml_log_set(quiet, None)
    try:
        return _load(ggml, where)
    finally:
        ggml.ggml_log_set(ctypes.cast(None, callback), None)  # ggml's default logger until llama-cpp-python's


def _load(ggml, where: Path) -> str | None:
    global error
    shipped = variants(where)
    forced = os.environ.get(ENV_FORCE)
    if forced:
        if forced not in shipped:
            error = (f"{ENV_FORCE}={forced} names no CPU variant of this llama.cpp build; choose from "
                     f"{', '.join(shipped) or 'none (a non-portable build)'}")
            return error
        if not ggml.ggml_backend_load(str(where / f"{PREFIX}{forced}.so").encode()):
            error = f"llama.cpp's CPU variant {forced} does not load on this CPU; unset {ENV_FORCE}"
            return error
    else:
        ggml.ggml_backend_load_all_from_path(str(where).encode())
    if ggml.ggml_backend_reg_count() == 0:
        error = (f"no llama.cpp CPU backend loads from {where} (variants: {', '.join(shipped) or 'none'}); "
                 "run scripts/setup.sh to rebuild llama-cpp-python")
    return error
