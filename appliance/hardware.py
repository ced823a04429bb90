"""What this machine has to train on: CPU, RAM, disk, and NVIDIA GPUs through NVML.

``detect()`` reads the live machine: the CPU model from /proc/cpuinfo, the logical
CPUs this process may use (``os.sched_getaffinity``), RAM through psutil, free disk
at the workspace, and every NVIDIA GPU through NVML (pynvml, from the
``nvidia-ml-py`` package): name, VRAM total and free, compute capability,
driver and CUDA versions, temperature, power, PCIe link, and NVLink or
peer-to-peer between each pair of GPUs. Whether bitsandbytes' CUDA kernels load
is checked only when real GPUs are present (it imports torch).

``detect(simulate="2x-rtx4090")`` answers for a machine you do not have: a fake
NVML with the same functions and return shapes as pynvml's stands in at the
library boundary, so simulated and real GPUs go through the same code
(``_from_nvml``); the host (CPU, cores, RAM) is the profile's, the free disk is
this machine's workspace. ``PROFILES`` names them.

``compute_dtype(hw)`` is the dtype this machine computes natively, decided from its own features (GPUs'
compute capability, the CPU's flags), never from the machine the project was tuned on: bfloat16 on a CPU
without AVX512-BF16 or AMX is emulated, and there it was 14x slower than float32 (issue 25).

``sample()`` is the cheap live reading for guardrails and sparklines.

This module imports only the standard library; psutil, pynvml, torch and
bitsandbytes load inside the functions that use them.
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace
from typing import Any

GiB = 2**30
MiB = 2**20

# pynvml's constants, restated: pynvml 13 defines NVML_P2P_CAPS_INDEX_READ as the tuple ``(0,)`` (a stray comma).
_TEMPERATURE_GPU = 0
_P2P_CAPS_INDEX_READ = 0
_P2P_CAPS_INDEX_NVLINK = 2
_P2P_STATUS_OK = 0
_P2P_STATUS_NOT_SUPPORTED = 5

# bitsandbytes 0.50 (Linux x86-64): CUDA kernels for LLM.int8(), QLoRA 4-bit and 8-bit optimizers need SM 6.0 or
# newer (7.5+ recommended: int8 tensor cores). Used for simulated profiles, where nothing can be loaded.
BNB_MIN_CC = (6, 0)
BF16_MIN_CC = (8, 0)
# The CPU flags (as /proc/cpuinfo spells them) that decide the compute dtype and which kernels run; `hw`, `doctor`
# and the benchmarks name those present.
CPU_FEATURES = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")
# bfloat16 in hardware on a CPU: AVX512-BF16 (Cooper Lake, Zen 4 and newer) or AMX-BF16 (Sapphire Rapids and newer).
# Elsewhere torch and bitsandbytes emulate it: measured on a 2-core AMD EPYC with AVX2, one Linear 512x576x1536 took
# 0.017 s in float32 and 0.112 s in bfloat16, a SmolLM2 forward and backward 23.5 s and 326 s.
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# oneDNN's instruction-set caps (ONEDNN_MAX_CPU_ISA) below the one with bfloat16 instructions: an operator who caps
# oneDNN there gets emulated bfloat16 matmuls whatever the CPU has (the test suite uses it to run as an AVX2 box).
_ONEDNN_BELOW_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")


@dataclass(frozen=True)
class GPU:
    index: int
    name: str
    memory_total: int        # bytes
    memory_free: int         # bytes
    compute_capability: tuple[int, int]
    bf16: bool               # compute capability >= 8.0
    pcie: str | None = None  # e.g. "Gen4 x16"
    temperature_c: int | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    utilization: int | None = None  # percent

    def to_dict(self) -> dict:
        d = asdict(self)
        d["compute_capability"] = f"{self.compute_capability[0]}.{self.compute_capability[1]}"
        return d

    @classmethod
    def from_dict(cls, d: dict) -> GPU:
        cc = d["compute_capability"]
        cc = tuple(int(x) for x in (cc.split(".") if isinstance(cc, str) else cc))
        return cls(**{**d, "compute_capability": cc})


@dataclass(frozen=True)
class Hardware:
    cpu: str
    cores: int                # logical CPUs usable by this process (os.sched_getaffinity)
    ram_total: int            # bytes
    ram_available: int        # bytes
    disk_free: int            # bytes at the workspace
    gpus: tuple[GPU, ...]
    driver: str | None
    cuda: str | None          # CUDA driver version, e.g. "12.4"
    links: dict               # {"0-1": "nvlink" | "p2p" | "none"} between GPU pairs
    bitsandbytes_cuda: bool | None  # None when unknown/not applicable (no GPU)
    simulated: str | None     # the profile name when simulated
    notes: tuple[str, ...] = field(default=())  # one sentence each: why there is no GPU, what was not checked
    cpu_flags: tuple[str, ...] = field(default=())  # those of CPU_FEATURES the CPU has
    cpu_capped: str | None = None  # ONEDNN_MAX_CPU_ISA when it caps oneDNN below bfloat16 (this process's setting)

    @property
    def device(self) -> str:
        """What plans are for: "cuda" with at least one NVIDIA GPU, else "cpu"."""
        return "cuda" if self.gpus else "cpu"

    @property
    def bf16(self) -> bool:
        """bf16 usable on every GPU (False without GPUs: plans for the CPU choose their own dtype)."""
        return bool(self.gpus) and all(g.bf16 for g in self.gpus)

    @property
    def cpu_bf16(self) -> bool:
        """The CPU computes bfloat16 in hardware (AVX512-BF16 or AMX-BF16), and oneDNN is not capped below it."""
        return any(f in self.cpu_flags for f in CPU_BF16_FLAGS) and self.cpu_capped is None

    @property
    def vram_total(self) -> int:
        return sum(g.memory_total for g in self.gpus)

    def to_dict(self) -> dict:
        return {
            "cpu": self.cpu, "cores": self.cores, "ram_total": self.ram_total, "ram_available": self.ram_available,
            "disk_free": self.disk_free, "gpus": [g.to_dict() for g in self.gpus], "driver": self.driver,
            "cuda": self.cuda, "links": dict(self.links), "bitsandbytes_cuda": self.bitsandbytes_cuda,
            "simulated": self.simulated, "notes": list(self.notes), "cpu_flags": list(self.cpu_flags),
            "cpu_capped": self.cpu_capped, "device": self.device, "bf16": self.bf16, "cpu_bf16": self.cpu_bf16,
            "vram_total": self.vram_total, "compute_dtype": compute_dtype(self)[0],
        }

    @classmethod
    def from_dict(cls, d: dict) -> Hardware:
        return cls(cpu=d["cpu"], cores=d["cores"], ram_total=d["ram_total"], ram_available=d["ram_available"],
                   disk_free=d["disk_free"], gpus=tuple(GPU.from_dict(g) for g in d["gpus"]), driver=d["driver"],
                   cuda=d["cuda"], links=dict(d["links"]), bitsandbytes_cuda=d["bitsandbytes_cuda"],
                   simulated=d["simulated"], notes=tuple(d.get("notes", ())),
                   cpu_flags=tuple(d.get("cpu_flags", ())), cpu_capped=d.get("cpu_capped"))


def compute_dtype(hw: Hardware) -> tuple[str, str]:
    """(the dtype this machine trains fastest in, why): bfloat16 on GPUs of compute capability 8.0 or newer, float16
    on older GPUs, bfloat16 on a CPU with AVX512-BF16 or AMX-BF16, float32 on every other CPU."""
    if hw.gpus:
        if hw.bf16:
            return "bfloat16", "every GPU has compute capability 8.0 or newer: bfloat16 on its tensor cores"
        return "float16", "a GPU below compute capability 8.0 has no bfloat16: float16 on its tensor cores"
    if hw.cpu_bf16:
        flags = flag_names([f for f in CPU_BF16_FLAGS if f in hw.cpu_flags], " and ")
        return "bfloat16", f"this CPU computes bfloat16 in hardware ({flags})"
    if hw.cpu_capped:
        return "float32", (f"ONEDNN_MAX_CPU_ISA={hw.cpu_capped} keeps oneDNN from this CPU's bfloat16 instructions: "
                           "bfloat16 would be emulated, float32 is the fast choice")
    return "float32", ("this CPU has no AVX512-BF16 or AMX-BF16: bfloat16 would be emulated, many times slower than "
                       "float32 (14x for a SmolLM2 step on an AVX2 EPYC)")


# -- profiles -------------------------------------------------------------------

@dataclass(frozen=True)
class _Card:
    name: str                 # as NVML reports it
    mib: int                  # memory total as NVML reports it (MiB)
    used_mib: int             # memory in use at idle (NVML's v1 figure counts the driver's reservation)
    cc: tuple[int, int]
    pcie: tuple[int, int]     # (generation, width)
    power_limit_w: int
    idle_w: int
    temp_c: int


@dataclass(frozen=True)
class _Profile:
    description: str
    cpu: str
    cores: int
    ram_gib: int
    card: _Card | None = None
    count: int = 0
    link: str = "none"        # between every pair: "nvlink", "p2p" or "none"
    driver: str = "550.127.05"
    cuda: int = 12040         # nvmlSystemGetCudaDriverVersion's encoding: 1000 * major + 10 * minor
    flags: tuple[str, ...] = ()  # the host CPU's CPU_FEATURES


_ZEN3 = ("avx2", "fma")                                     # and Zen 2, Haswell to Comet Lake: AVX2, no AVX-512
_CASCADE = ("avx2", "fma", "avx512f", "avx512_vnni")        # Skylake-SP / Cascade Lake Xeons: AVX-512, no BF16
_ZEN4 = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16")
_SAPPHIRE = _ZEN4 + ("amx_tile", "amx_bf16")


_RTX4090 = _Card("NVIDIA GeForce RTX 4090", 24564, 410, (8, 9), (4, 16), 450, 22, 36)
_RTX3090 = _Card("NVIDIA GeForce RTX 3090", 24576, 330, (8, 6), (4, 16), 350, 24, 38)
_L4 = _Card("NVIDIA L4", 23034, 300, (8, 9), (4, 16), 72, 16, 41)
_T4 = _Card("Tesla T4", 15360, 257, (7, 5), (3, 16), 70, 10, 39)
_A100_PCIE = _Card("NVIDIA A100 80GB PCIe", 81920, 640, (8, 0), (4, 16), 300, 44, 34)
_A100_SXM = _Card("NVIDIA A100-SXM4-80GB", 81920, 640, (8, 0), (4, 16), 400, 62, 31)
_H100_SXM = _Card("NVIDIA H100 80GB HBM3", 81559, 560, (9, 0), (5, 16), 700, 72, 30)

_PROFILES: dict[str, _Profile] = {
    "cpu-only": _Profile("no NVIDIA GPU; host: 16-core Ryzen 9 7950X (32 threads, AVX512-BF16), 64 GiB RAM",
                         "AMD Ryzen 9 7950X 16-Core Processor", 32, 64, flags=_ZEN4),
    "cpu-avx2": _Profile("no NVIDIA GPU; host: 2-core AMD EPYC (Zen 3: AVX2, no AVX-512, so no native bfloat16), "
                         "24 GiB RAM (a common server, edge box and CI class)", "AMD EPYC 7B13", 2, 24, flags=_ZEN3),
    "1x-t4": _Profile("1x Tesla T4 16 GB (cc 7.5, no bf16, 70 W, PCIe Gen3); host: 8 vCPUs, 32 GiB (like g4dn.2xlarge)",
                      "Intel(R) Xeon(R) Platinum 8259CL CPU @ 2.50GHz", 8, 32, _T4, 1, flags=_CASCADE),
    "1x-l4": _Profile("1x NVIDIA L4 24 GB (cc 8.9, 72 W, PCIe Gen4); host: 16 vCPUs, 64 GiB (like g2-standard-16)",
                      "Intel(R) Xeon(R) CPU @ 2.20GHz", 16, 64, _L4, 1, flags=_CASCADE),
    "1x-rtx3090": _Profile("1x GeForce RTX 3090 24 GB (cc 8.6, 350 W); host: Ryzen 9 5950X (32 threads), 64 GiB",
                           "AMD Ryzen 9 5950X 16-Core Processor", 32, 64, _RTX3090, 1, flags=_ZEN3),
    "2x-rtx3090-nvlink": _Profile("2x GeForce RTX 3090 24 GB with an NVLink bridge; host: Threadripper 3960X "
                                  "(48 threads), 128 GiB", "AMD Ryzen Threadripper 3960X 24-Core Processor", 48, 128,
                                  _RTX3090, 2, "nvlink", flags=_ZEN3),
    "1x-rtx4090": _Profile("1x GeForce RTX 4090 24 GB (cc 8.9, 450 W, PCIe Gen4 x16); host: Ryzen 9 7950X "
                           "(32 threads), 64 GiB", "AMD Ryzen 9 7950X 16-Core Processor", 32, 64, _RTX4090, 1,
                           flags=_ZEN4),
    "2x-rtx4090": _Profile("2x GeForce RTX 4090 24 GB, no NVLink and no peer-to-peer (GeForce 40 series); host: "
                           "Threadripper PRO 5955WX (32 threads), 128 GiB",
                           "AMD Ryzen Threadripper PRO 5955WX 16-Cores", 32, 128, _RTX4090, 2, "none", flags=_ZEN3),
    "1x-a100-80gb": _Profile("1x A100 80GB PCIe (cc 8.0, 300 W); host: EPYC 7313 (32 threads), 256 GiB",
                             "AMD EPYC 7313 16-Core Processor", 32, 256, _A100_PCIE, 1, driver="550.127.05",
                             flags=_ZEN3),
    "2x-a100-80gb-nvlink": _Profile("2x A100-SXM4-80GB (cc 8.0, 400 W) over NVLink; host: EPYC 7763 (64 threads "
                                    "for this job), 512 GiB", "AMD EPYC 7763 64-Core Processor", 64, 512, _A100_SXM, 2,
                                    "nvlink", flags=_ZEN3),
    "1x-h100-80gb": _Profile("1x H100 80GB HBM3 SXM (cc 9.0, 700 W, PCIe Gen5); host: Xeon Platinum 8480+ "
                             "(32 threads for this job), 256 GiB", "Intel(R) Xeon(R) Platinum 8480+", 32, 256,
                             _H100_SXM, 1, "none", "560.35.03", 12060, _SAPPHIRE),
}

PROFILES: dict[str, str] = {name: p.description for name, p in _PROFILES.items()}


# -- a fake NVML: the subset of pynvml used here, with pynvml's return shapes ------------------------

class FakeNVMLError(Exception):
    """Stands for pynvml.NVMLError: ``.value`` is the NVML return code, ``str()`` its message."""

    _messages = {1: "Uninitialized", 3: "Not Supported", 9: "Driver Not Loaded",
                 12: "NVML Shared Library Not Found"}

    def __init__(self, value: int):
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return self._messages.get(self.value, f"NVML error {self.value}")


class FakeNVML:
    """The pynvml functions ``_from_nvml`` and ``sample`` call, answering for a described machine.

    Handles are the GPU indices; names and versions are str (as pynvml 13 returns them); memory and utilization
    are objects with pynvml's attribute names; power is in milliwatts; the CUDA driver version is pynvml's int.
    ``init_error`` (an NVML return code) makes nvmlInit fail as it does on a machine without the driver."""

    NVMLError = FakeNVMLError
    NVML_TEMPERATURE_GPU = _TEMPERATURE_GPU
    NVML_P2P_CAPS_INDEX_READ = _P2P_CAPS_INDEX_READ
    NVML_P2P_CAPS_INDEX_NVLINK = _P2P_CAPS_INDEX_NVLINK
    NVML_P2P_STATUS_OK = _P2P_STATUS_OK
    NVML_P2P_STATUS_NOT_SUPPORTED = _P2P_STATUS_NOT_SUPPORTED

    def __init__(self, cards: list[_Card], link: str = "none", driver: str = "550.127.05", cuda: int = 12040,
                 init_error: int | None = None):
        self.cards, self.link, self.driver, self.cuda, self.init_error = list(cards), link, driver, cuda, init_error
        self.initialized = 0

    @classmethod
    def for_profile(cls, name: str) -> FakeNVML:
        p = _PROFILES[name]
        if p.card is None:
            return cls([], init_error=12)  # no driver installed: libnvidia-ml.so.1 is absent
        return cls([p.card] * p.count, p.link, p.driver, p.cuda)

    def _check(self) -> None:
        if not self.initialized:
            raise FakeNVMLError(1)

    def _card(self, handle: int) -> _Card:
        self._check()
        return self.cards[handle]

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise FakeNVMLError(self.init_error)
        self.initialized += 1

    def nvmlShutdown(self) -> None:
        self._check()
        self.initialized -= 1

    def nvmlSystemGetDriverVersion(self) -> str:
        self._check()
        return self.driver

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        self._check()
        return self.cuda

    def nvmlDeviceGetCount(self) -> int:
        self._check()
        return len(self.cards)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        self._check()
        if not 0 <= index < len(self.cards):
            raise FakeNVMLError(2)
        return index

    def nvmlDeviceGetName(self, handle) -> str:
        return self._card(handle).name

    def nvmlDeviceGetMemoryInfo(self, handle, version=None):
        c = self._card(handle)
        return SimpleNamespace(total=c.mib * MiB, free=(c.mib - c.used_mib) * MiB, used=c.used_mib * MiB)

    def nvmlDeviceGetCudaComputeCapability(self, handle) -> tuple[int, int]:
        return self._card(handle).cc

    def nvmlDeviceGetTemperature(self, handle, sensor) -> int:
        return self._card(handle).temp_c

    def nvmlDeviceGetPowerUsage(self, handle) -> int:
        return self._card(handle).idle_w * 1000

    def nvmlDeviceGetEnforcedPowerLimit(self, handle) -> int:
        return self._card(handle).power_limit_w * 1000

    def nvmlDeviceGetCurrPcieLinkGeneration(self, handle) -> int:
        return self._card(handle).pcie[0]

    def nvmlDeviceGetCurrPcieLinkWidth(self, handle) -> int:
        return self._card(handle).pcie[1]

    def nvmlDeviceGetUtilizationRates(self, handle):
        self._card(handle)
        return SimpleNamespace(gpu=0, memory=0)

    def nvmlDeviceGetP2PStatus(self, device1, device2, p2pIndex) -> int:
        self._card(device1), self._card(device2)
        if p2pIndex == _P2P_CAPS_INDEX_NVLINK:
            ok = self.link == "nvlink"
        else:  # read/write over PCIe (NVLink-connected pairs can also do it)
            ok = self.link in ("nvlink", "p2p")
        return _P2P_STATUS_OK if ok else _P2P_STATUS_NOT_SUPPORTED


# -- detection --------------------------------------------------------------------

def _optional(fn, *args):
    """One NVML reading that a GPU may not support (power on some boards, PCIe on others): None on any error."""
    try:
        return fn(*args)
    except Exception:
        return None


def _cuda_version(v: int | None) -> str | None:
    return None if not v else f"{v // 1000}.{v % 1000 // 10}"


def _from_nvml(nvml) -> tuple[tuple[GPU, ...], str | None, str | None, dict]:
    """GPUs, driver, CUDA driver version and pairwise links, read through ``nvml`` (pynvml or a FakeNVML).

    Raises whatever nvmlInit raises when there is no driver; the caller turns that into a note."""
    nvml.nvmlInit()
    try:
        driver = _optional(nvml.nvmlSystemGetDriverVersion)
        cuda = _cuda_version(_optional(nvml.nvmlSystemGetCudaDriverVersion))
        handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
        gpus = []
        for i, h in enumerate(handles):
            name = nvml.nvmlDeviceGetName(h)
            name = name.decode() if isinstance(name, bytes) else str(name)
            mem = nvml.nvmlDeviceGetMemoryInfo(h)
            cc = tuple(int(x) for x in nvml.nvmlDeviceGetCudaComputeCapability(h))
            gen = _optional(nvml.nvmlDeviceGetCurrPcieLinkGeneration, h)
            width = _optional(nvml.nvmlDeviceGetCurrPcieLinkWidth, h)
            power = _optional(nvml.nvmlDeviceGetPowerUsage, h)
            limit = _optional(nvml.nvmlDeviceGetEnforcedPowerLimit, h)
            util = _optional(nvml.nvmlDeviceGetUtilizationRates, h)
            gpus.append(GPU(
                index=i, name=name, memory_total=int(mem.total), memory_free=int(mem.free),
                compute_capability=cc, bf16=cc >= BF16_MIN_CC,
                pcie=f"Gen{gen} x{width}" if gen and width else None,
                temperature_c=_optional(nvml.nvmlDeviceGetTemperature, h, _TEMPERATURE_GPU),
                power_w=power / 1000 if power is not None else None,
                power_limit_w=limit / 1000 if limit is not None else None,
                utilization=int(util.gpu) if util is not None else None,
            ))
        links = {}
        for i in range(len(handles)):
            for j in range(i + 1, len(handles)):
                links[f"{i}-{j}"] = _link(nvml, handles[i], handles[j])
        return tuple(gpus), driver, cuda, links
    finally:
        _optional(nvml.nvmlShutdown)


def _link(nvml, a, b) -> str:
    if _optional(nvml.nvmlDeviceGetP2PStatus, a, b, _P2P_CAPS_INDEX_NVLINK) == _P2P_STATUS_OK:
        return "nvlink"
    if _optional(nvml.nvmlDeviceGetP2PStatus, a, b, _P2P_CAPS_INDEX_READ) == _P2P_STATUS_OK:
        return "p2p"
    return "none"


def _real_nvml():
    import pynvml

    return pynvml


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags(cpuinfo: str | None = None) -> tuple[str, ...]:
    """Those of CPU_FEATURES that the CPU has, from the first "flags" line of /proc/cpuinfo (or ``cpuinfo``)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return ()
    line = next((ln for ln in cpuinfo.splitlines() if ln.startswith("flags")), "")
    have = set(line.partition(":")[2].split())
    return tuple(f for f in CPU_FEATURES if f in have)


def onednn_cap(environ=os.environ) -> str | None:
    """ONEDNN_MAX_CPU_ISA when it caps oneDNN below its bfloat16 instructions, else None."""
    cap = environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    return cap if cap in _ONEDNN_BELOW_BF16 else None


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _disk_free() -> int:
    """Free bytes where the workspace is (or will be): looking does not create it."""
    import shutil
    from pathlib import Path

    from .workspace import default_home

    path = Path(os.environ.get("APPLIANCE_HOME") or default_home()).expanduser().resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def _bitsandbytes_cuda() -> tuple[bool, str | None]:
    """Whether bitsandbytes loads its CUDA library here (imports torch: only called with real GPUs present)."""
    try:
        import logging
        import warnings

        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torch

            if not torch.cuda.is_available():
                build = "a CPU build" if not torch.version.cuda else f"built for CUDA {torch.version.cuda}"
                return False, f"torch {torch.__version__} ({build}) cannot use the GPUs, so neither can bitsandbytes"
            from bitsandbytes.cextension import lib
        if getattr(lib, "compiled_with_cuda", False):
            return True, None
        return False, "bitsandbytes found no CUDA library matching this torch; QLoRA on the GPU is unavailable"
    except Exception as e:  # not installed, a broken install, a driver mismatch: all mean "not usable"
        return False, f"bitsandbytes' CUDA kernels did not load ({type(e).__name__}: {str(e)[:120]})"


def detect(simulate: str | None = None, *, check_bitsandbytes: bool = True) -> Hardware:
    """The machine's hardware, or the named profile's (``PROFILES``) with this machine's free disk.

    ``check_bitsandbytes=False`` skips loading bitsandbytes (and torch) on a GPU machine: for cheap summaries."""
    if simulate is not None:
        if simulate not in _PROFILES:
            from .errors import InvalidInput

            raise InvalidInput(f"unknown hardware profile {simulate!r}; choose one of: {', '.join(_PROFILES)}.")
        p = _PROFILES[simulate]
        nvml: Any = FakeNVML.for_profile(simulate)
        cpu, cores, flags, capped = p.cpu, p.cores, p.flags, None
        ram_total = p.ram_gib * GiB
        ram_available = int(ram_total * 0.92)
    else:
        import psutil

        nvml = None
        vm = psutil.virtual_memory()
        cpu, cores, ram_total, ram_available = _cpu_model(), _cores(), int(vm.total), int(vm.available)
        flags, capped = cpu_flags(), onednn_cap()

    notes: list[str] = []
    try:
        gpus, driver, cuda, links = _from_nvml(nvml if nvml is not None else _real_nvml())
    except Exception as e:
        gpus, driver, cuda, links = (), None, None, {}
        reason = str(e) or type(e).__name__
    else:
        reason = "no devices"
    if not gpus:
        notes.append(f"no NVIDIA GPU found (NVML: {reason}); plans are for the CPU")

    bnb: bool | None = None
    if gpus and simulate is not None:
        bnb = all(g.compute_capability >= BNB_MIN_CC for g in gpus)
    elif gpus and check_bitsandbytes:
        bnb, why = _bitsandbytes_cuda()
        if why:
            notes.append(why)
    if gpus and not all(g.bf16 for g in gpus):
        notes.append("bf16 needs compute capability 8.0 or newer; use compute_dtype: float16 on these GPUs")
    if gpus and simulate is None and os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        notes.append(f"CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r}: NVML lists every GPU; "
                     "training sees only those")
    if simulate is not None:
        notes.insert(0, f"simulated {simulate}: {PROFILES[simulate]}; the free disk is this machine's")

    return Hardware(cpu=cpu, cores=cores, ram_total=ram_total, ram_available=ram_available, disk_free=_disk_free(),
                    gpus=gpus, driver=driver, cuda=cuda, links=links, bitsandbytes_cuda=bnb, simulated=simulate,
                    notes=tuple(notes), cpu_flags=flags, cpu_capped=capped)


# -- live figures -------------------------------------------------------------------

_nvml_state: dict[str, Any] = {}  # "lib": pynvml once initialised, "error": why it could not be


def sample(nvml: Any = None) -> dict:
    """Cheap live figures: RAM in use and available, and per GPU memory, utilization, temperature and power.

    NVML is initialised once per process and kept (a failure is remembered too), so this can run every second.
    ``nvml`` replaces pynvml (a FakeNVML in tests; it is initialised and shut down around the reading)."""
    import psutil

    vm = psutil.virtual_memory()
    out: dict[str, Any] = {"ram_used": int(vm.total - vm.available), "ram_available": int(vm.available), "gpus": []}
    if nvml is not None:
        try:
            nvml.nvmlInit()
        except Exception:
            return out
        try:
            out["gpus"] = _sample_gpus(nvml)
        finally:
            _optional(nvml.nvmlShutdown)
        return out
    lib = _live_nvml()
    if lib is not None:
        out["gpus"] = _sample_gpus(lib)
    return out


def _live_nvml():
    """pynvml, initialised once per process (a failure is remembered too), or None."""
    if "lib" not in _nvml_state and "error" not in _nvml_state:
        try:
            lib = _real_nvml()
            lib.nvmlInit()
            _nvml_state["lib"] = lib
        except Exception as e:
            _nvml_state["error"] = str(e)
    return _nvml_state.get("lib")


def process_gpu_memory(nvml_index: int, pid: int) -> int | None:
    """The memory process ``pid`` holds on GPU ``nvml_index`` as NVML counts it (its CUDA context included), or
    None where NVML cannot say (no driver; a container that hides other PIDs)."""
    lib = _live_nvml()
    if lib is None:
        return None
    try:
        handle = lib.nvmlDeviceGetHandleByIndex(nvml_index)
        return next((int(p.usedGpuMemory) for p in lib.nvmlDeviceGetComputeRunningProcesses(handle)
                     if p.pid == pid and p.usedGpuMemory), None)
    except Exception:  # noqa: BLE001 - NVML errors and drivers without per-process accounting alike
        return None


def _sample_gpus(nvml) -> list[dict]:
    gpus = []
    for i in range(_optional(nvml.nvmlDeviceGetCount) or 0):
        h = nvml.nvmlDeviceGetHandleByIndex(i)
        mem = _optional(nvml.nvmlDeviceGetMemoryInfo, h)
        util = _optional(nvml.nvmlDeviceGetUtilizationRates, h)
        power = _optional(nvml.nvmlDeviceGetPowerUsage, h)
        gpus.append({
            "index": i,
            "memory_used": int(mem.used) if mem is not None else None,
            "memory_total": int(mem.total) if mem is not None else None,
            "utilization": int(util.gpu) if util is not None else None,
            "temperature_c": _optional(nvml.nvmlDeviceGetTemperature, h, _TEMPERATURE_GPU),
            "power_w": power / 1000 if power is not None else None,
        })
    return gpus


# -- descriptions: for `appliance doctor` and the manifests -----------------------

def describe_gpu(g: GPU) -> str:
    parts = [g.name, f"{g.memory_total / GiB:.1f} GiB ({g.memory_free / GiB:.1f} free)",
             f"cc {g.compute_capability[0]}.{g.compute_capability[1]}"]
    if g.pcie:
        parts.append(f"PCIe {g.pcie}")
    if g.temperature_c is not None:
        parts.append(f"{g.temperature_c} °C")
    if g.power_w is not None:
        parts.append(f"{g.power_w:.0f}" + (f"/{g.power_limit_w:.0f} W" if g.power_limit_w else " W"))
    return ", ".join(parts)


def summary() -> dict:
    """What a manifest records about the machine that made an artifact (never simulated; no torch)."""
    hw = detect(check_bitsandbytes=False)
    return {"machine": platform.machine(), "cpu": hw.cpu, "cores": hw.cores, "ram_gib": round(hw.ram_total / GiB, 1),
            "gpus": [g.name for g in hw.gpus], "cpu_flags": list(hw.cpu_flags)}


def flag_names(flags, sep: str = ", ") -> str:
    """CPU flags as people write them (avx512_bf16 -> AVX512-BF16); "no AVX2" when there are none of CPU_FEATURES."""
    return sep.join(f.upper().replace("_", "-") for f in flags) or "no AVX2"


def describe_cpu(hw: Hardware) -> str:
    """The CPU, its logical CPUs and the features that decide speed, in one line (hw, doctor, benchmarks)."""
    return f"{hw.cpu}, {hw.cores} logical CPUs ({flag_names(hw.cpu_flags)})"
