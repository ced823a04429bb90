"""`appliance hw`, the hardware section of `appliance doctor`, and the simulated profiles (a fake NVML)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from appliance import hardware
from appliance.hardware import GPU, PROFILES, FakeNVML, Hardware

from conftest import cli_json, run_cli

GiB, MiB = 2**30, 2**20


# -- this machine (no NVIDIA GPU on development and CI machines) ---------------------------------

def test_real_detection_without_gpu(home):
    hw = hardware.detect()
    assert hw.simulated is None
    assert hw.cores >= 1 and hw.ram_total > 0 and 0 < hw.ram_available <= hw.ram_total and hw.disk_free > 0
    assert hw.cpu
    if hw.gpus:  # a lent GPU machine: the figures must still be sane
        assert all(g.memory_total > 0 and g.compute_capability >= (3, 0) for g in hw.gpus)
        return
    assert hw.gpus == () and hw.driver is None and hw.cuda is None and hw.links == {}
    assert hw.bitsandbytes_cuda is None and hw.device == "cpu"
    assert any(n.startswith("no NVIDIA GPU found (NVML: ") and n.endswith("plans are for the CPU") for n in hw.notes)


def test_hw_json_through_the_cli(home):
    d = cli_json("hw", home=home)
    assert isinstance(d["gpus"], list)
    assert d["cores"] >= 1 and d["ram_total"] > 0 and d["ram_available"] > 0 and d["disk_free"] > 0
    assert d["simulated"] is None
    for key in ("cpu", "driver", "cuda", "links", "bitsandbytes_cuda", "notes", "device", "bf16", "vram_total"):
        assert key in d
    if not d["gpus"]:
        assert d["device"] == "cpu" and d["links"] == {} and d["bitsandbytes_cuda"] is None


def test_hw_human_output(home):
    out = run_cli("hw", home=home).stdout
    assert "CPU" in out and "RAM" in out and "disk" in out
    out = run_cli("hw", "--simulate", "2x-rtx4090", home=home, env={"COLUMNS": "100"}).stdout
    assert "simulated: 2x-rtx4090" in out and "NVIDIA GeForce RTX 4090" in out and "0-1: none" in out


def test_sample_returns_sane_numbers():
    s = hardware.sample()
    assert s["ram_used"] > 0 and s["ram_available"] > 0 and isinstance(s["gpus"], list)
    fake = hardware.sample(FakeNVML.for_profile("2x-rtx4090"))
    assert [g["index"] for g in fake["gpus"]] == [0, 1]
    g = fake["gpus"][0]
    assert g["memory_total"] == 24564 * MiB and 0 < g["memory_used"] < g["memory_total"]
    assert g["utilization"] == 0 and g["temperature_c"] > 0 and g["power_w"] > 0
    assert set(g) == {"index", "memory_used", "memory_total", "utilization", "temperature_c", "power_w"}
    assert hardware.sample(FakeNVML.for_profile("cpu-only"))["gpus"] == []


def test_import_loads_neither_torch_nor_pynvml():
    probe = ("import sys, appliance.hardware\n"
             "print(','.join(m for m in ('torch', 'pynvml', 'bitsandbytes', 'psutil') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def test_manifest_summary_keeps_its_shape():
    from appliance.hardware import summary

    s = summary()  # what every stage passes to manifest.write
    assert set(s) == {"machine", "cpu", "cores", "ram_gib", "gpus", "cpu_flags"}
    assert s["cores"] >= 1 and s["ram_gib"] > 0 and isinstance(s["gpus"], list)


# -- simulated profiles -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(PROFILES))
def test_every_profile_loads_and_round_trips(home, name):
    hw = hardware.detect(simulate=name)
    assert hw.simulated == name and PROFILES[name]
    d = hw.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert Hardware.from_dict(json.loads(json.dumps(d))) == hw
    assert d["gpus"] == [g.to_dict() for g in hw.gpus] and isinstance(d["gpus"], list)
    assert hw.cores >= 2 and hw.ram_total >= 24 * GiB and hw.disk_free > 0 and hw.cpu_flags  # cpu-avx2: the CI class
    assert set(hw.links) == {f"{i}-{j}" for i in range(len(hw.gpus)) for j in range(i + 1, len(hw.gpus))}
    for g in hw.gpus:
        assert g.bf16 == (g.compute_capability >= (8, 0))
        assert 0 < g.memory_free < g.memory_total and g.pcie and g.power_limit_w and g.temperature_c
    if hw.gpus:
        assert hw.driver and hw.cuda and hw.bitsandbytes_cuda is True and hw.device == "cuda"
    else:
        assert hw.bitsandbytes_cuda is None and hw.device == "cpu" and hw.driver is None


def test_profile_figures():
    hw = hardware.detect("2x-rtx4090")
    assert len(hw.gpus) == 2 and hw.cores == 32 and hw.ram_total == 128 * GiB
    for g in hw.gpus:
        assert g.name == "NVIDIA GeForce RTX 4090" and g.memory_total == 24564 * MiB
        assert g.compute_capability == (8, 9) and g.bf16 and g.pcie == "Gen4 x16" and g.power_limit_w == 450
    assert hw.links == {"0-1": "none"} and hw.cuda == "12.4"

    assert hardware.detect("2x-rtx3090-nvlink").links == {"0-1": "nvlink"}
    assert hardware.detect("2x-a100-80gb-nvlink").links == {"0-1": "nvlink"}

    t4 = hardware.detect("1x-t4")
    assert t4.gpus[0].compute_capability == (7, 5) and not t4.gpus[0].bf16 and not t4.bf16
    assert t4.gpus[0].memory_total == 15360 * MiB and t4.bitsandbytes_cuda is True
    assert any("float16" in n for n in t4.notes)

    l4 = hardware.detect("1x-l4").gpus[0]
    assert (l4.compute_capability, l4.power_limit_w) == ((8, 9), 72)
    a100 = hardware.detect("1x-a100-80gb").gpus[0]
    assert (a100.name, a100.memory_total, a100.compute_capability, a100.power_limit_w) == (
        "NVIDIA A100 80GB PCIe", 80 * GiB, (8, 0), 300)
    h100 = hardware.detect("1x-h100-80gb")
    assert h100.gpus[0].compute_capability == (9, 0) and h100.gpus[0].pcie == "Gen5 x16" and h100.cuda == "12.6"

    cpu = hardware.detect("cpu-only")
    assert cpu.gpus == () and cpu.links == {}
    assert any("no NVIDIA GPU found (NVML: NVML Shared Library Not Found); plans are for the CPU" == n
               for n in cpu.notes)


def test_profiles_through_the_cli(home):
    d = cli_json("hw", "--simulate", "2x-rtx4090", home=home)
    assert d["simulated"] == "2x-rtx4090" and len(d["gpus"]) == 2 and d["links"] == {"0-1": "none"}
    assert d["gpus"][1] == {"index": 1, "name": "NVIDIA GeForce RTX 4090", "memory_total": 24564 * MiB,
                            "memory_free": (24564 - 410) * MiB, "compute_capability": "8.9", "bf16": True,
                            "pcie": "Gen4 x16", "temperature_c": 36, "power_w": 22.0, "power_limit_w": 450.0,
                            "utilization": 0}
    assert cli_json("hw", "--simulate", "cpu-only", home=home)["gpus"] == []
    listed = cli_json("hw", "--list-profiles", home=home)["profiles"]
    assert listed == PROFILES and {"cpu-only", "1x-rtx4090", "2x-rtx4090", "1x-l4", "1x-a100-80gb",
                                   "1x-h100-80gb"} <= set(listed)


def test_unknown_profile_is_one_sentence_and_exit_2(home):
    for args in (("hw", "--simulate", "3x-voodoo"), ("doctor", "--simulate", "3x-voodoo")):
        proc = run_cli(*args, home=home, check=False)
        assert proc.returncode == 2, proc.stderr
        err = proc.stderr.strip()
        assert err.startswith("error: unknown hardware profile '3x-voodoo'; choose one of: cpu-only,")
        assert len(err.splitlines()) == 1 and "Traceback" not in err and err.endswith("1x-h100-80gb.")
        assert proc.stdout == ""


def test_doctor_includes_the_hardware_section(home):
    proc = run_cli("doctor", "--simulate", "2x-rtx4090", "--json", home=home, check=False)
    d = json.loads(proc.stdout)
    hwsec = d["sections"]["hardware"]
    assert hwsec["simulated"]["value"] == "2x-rtx4090"
    assert hwsec["gpus"]["status"] == "ok" and hwsec["gpu0"]["value"].startswith("NVIDIA GeForce RTX 4090, 24.0 GiB")
    assert hwsec["links"]["value"] == ["0-1: none"] and hwsec["bf16"]["status"] == "ok"
    assert hwsec["bitsandbytes"]["value"] == "usable"
    assert not any(f.startswith("hardware:") for f in d["failures"])
    # the hardware section never decides the exit status: the rest of the doctor does
    assert proc.returncode == (0 if d["ok"] else 3)

    d = json.loads(run_cli("doctor", "--json", home=home, check=False).stdout)
    real = d["sections"]["hardware"]
    assert "simulated" not in real and {"cpu", "ram", "disk_free", "gpus"} <= set(real)

    t4 = json.loads(run_cli("doctor", "--simulate", "1x-t4", "--json", home=home, check=False).stdout)
    assert "hardware: bf16" in t4["warnings"]

    human = run_cli("doctor", "--simulate", "cpu-only", home=home, check=False, env={"COLUMNS": "200"}).stdout
    assert "hardware" in human and "plans are for the CPU" in human


# -- the fake NVML is pynvml's shape ----------------------------------------------------------------

def test_fake_nvml_matches_pynvml_names():
    import pynvml

    fake = FakeNVML.for_profile("1x-rtx4090")
    called = [n for n in dir(FakeNVML) if n.startswith("nvml")]
    assert len(called) >= 15
    for name in called:
        assert callable(getattr(pynvml, name)), name
    for const in ("NVML_TEMPERATURE_GPU", "NVML_P2P_CAPS_INDEX_NVLINK", "NVML_P2P_STATUS_OK"):
        assert getattr(FakeNVML, const) == getattr(pynvml, const)
    with pytest.raises(fake.NVMLError):  # like pynvml: nothing answers before nvmlInit
        fake.nvmlDeviceGetCount()


def test_from_nvml_handles_missing_readings_and_init_failure():
    class Partial(FakeNVML):  # a board without power or PCIe readings, as some report NOT_SUPPORTED
        def nvmlDeviceGetPowerUsage(self, handle):
            raise self.NVMLError(3)

        def nvmlDeviceGetCurrPcieLinkWidth(self, handle):
            raise self.NVMLError(3)

    base = FakeNVML.for_profile("1x-l4")
    gpus, driver, cuda, links = hardware._from_nvml(Partial(base.cards, driver="535.183.01", cuda=12020))
    assert gpus[0].power_w is None and gpus[0].pcie is None and gpus[0].power_limit_w == 72
    assert (driver, cuda, links) == ("535.183.01", "12.2", {})

    nvml = FakeNVML([], init_error=9)
    with pytest.raises(FakeNVML.NVMLError, match="Driver Not Loaded"):
        hardware._from_nvml(nvml)


def test_gpu_dict_round_trip():
    g = GPU(index=0, name="x", memory_total=1, memory_free=1, compute_capability=(7, 5), bf16=False)
    assert GPU.from_dict(json.loads(json.dumps(g.to_dict()))) == g
