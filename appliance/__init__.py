"""The offline fine-tuning appliance.

Importing this package is cheap: it loads no torch, transformers, peft,
bitsandbytes or llama_cpp (those load inside the stages that use them), and it
sets the Hugging Face offline and telemetry switches before any of those
libraries can be imported by anyone, so nothing reaches for a hub. It also
installs the egress guard (``appliance.trust.egress``): from then on this process
refuses every connection that is not loopback and records the attempt.
"""

import os as _os

__version__ = "0.1.0"

# Offline by construction: these must be in the environment before
# huggingface_hub / transformers / datasets are first imported.
# (Named so that `appliance doctor` checks the same list that is set here.)
OFFLINE_SWITCHES = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
    "HF_HUB_DISABLE_UPDATE_CHECK": "1",
    "DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
for _key, _value in OFFLINE_SWITCHES.items():
    _os.environ[_key] = _value

# Whatever caches those libraries keep stay inside the workspace, never in ~/.cache.
_home = _os.environ.get("APPLIANCE_HOME") or _os.path.join(
    _os.environ.get("XDG_DATA_HOME") or _os.path.join(_os.path.expanduser("~"), ".local", "share"), "appliance"
)
_os.environ["HF_HOME"] = _os.path.join(_home, "cache", "hf")
_os.environ["HF_DATASETS_CACHE"] = _os.path.join(_home, "cache", "hf", "datasets")
del _home, _key, _value

# The egress guard: from here on this process refuses every connection that is not loopback and records the
# attempt in the audit log (appliance/trust/egress.py; standard library only, so this import stays light).
from .trust import egress as _egress  # noqa: E402

_egress.install()
del _egress
