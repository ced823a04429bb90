"""The compute dtype by what the hardware really has (issue 25): the CPU's flags (faked here where this machine lacks
them), oneDNN's cap, the GPUs' compute capability; the plan's choice for ``auto``, its adjustment of an emulated
bfloat16 (and strict_checks' refusal), and what `hw` and `doctor` say."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from appliance import hardware, plan
from appliance.hardware import Hardware
from conftest import ROOT, cli_json, run_cli

GiB = 2**30
SMOLLM2 = plan.shape_from_config(json.loads((ROOT / "recipes" / "configs" / "smollm2-135m-instruct.json").read_text()))

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu vme de pse tsc msr pae mce cx8 sse sse2 ht syscall nx {flags}
bogomips\t: 4890.81

processor\t: 1
flags\t\t: fpu vme de pse tsc
"""


def cpu(flags: tuple[str, ...], capped: str | None = None) -> Hardware:
    return Hardware(cpu="test CPU", cores=2, ram_total=24 * GiB, ram_available=20 * GiB, disk_free=100 * GiB, gpus=(),
                    driver=None, cuda=None, links={}, bitsandbytes_cuda=None, simulated="test", cpu_flags=flags,
                    cpu_capped=capped)


@pytest.mark.parametrize("line, want", [
    ("sse4_2 avx f16c", "float32"),                                 # Sandy/Ivy Bridge: no AVX2
    ("sse4_2 avx avx2 fma bmi2", "float32"),                        # Haswell to Zen 3: the EPYC
    ("avx2 fma avx512f avx512bw avx512_vnni", "float32"),            # Skylake-SP, Cascade Lake: AVX-512, no BF16
    ("avx2 fma avx512f avx512_vnni avx512_bf16", "bfloat16"),       # Cooper Lake, Zen 4
    ("avx2 fma avx512f avx512_bf16 amx_tile amx_bf16 amx_int8", "bfloat16"),  # Sapphire Rapids
    ("avx2 fma amx_bf16", "bfloat16"),                              # AMX-BF16 alone is enough
])
def test_the_dtype_for_each_cpu_flag_set(line, want):
    flags = hardware.cpu_flags(CPUINFO.format(flags=line))
    assert set(flags) <= set(hardware.CPU_FEATURES)
    assert ("avx512_bf16" in flags or "amx_bf16" in flags) == (want == "bfloat16")
    hw = cpu(flags)
    dtype, why = hardware.compute_dtype(hw)
    assert dtype == want and hw.cpu_bf16 == (want == "bfloat16")
    assert ("in hardware" in why) if want == "bfloat16" else ("emulated" in why)


def test_only_the_first_flags_line_counts_and_a_missing_one_is_no_flags():
    assert "avx2" in hardware.cpu_flags(CPUINFO.format(flags="avx2"))
    assert hardware.cpu_flags("processor\t: 0\nmodel name\t: x\n") == ()


def test_a_onednn_cap_below_bf16_makes_bfloat16_emulated():
    zen4 = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16")
    assert hardware.onednn_cap({"ONEDNN_MAX_CPU_ISA": "avx2"}) == "AVX2"
    assert hardware.onednn_cap({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}) is None
    assert hardware.onednn_cap({}) is None
    dtype, why = hardware.compute_dtype(cpu(zen4, capped="AVX2"))
    assert dtype == "float32" and "ONEDNN_MAX_CPU_ISA=AVX2" in why
    assert hardware.compute_dtype(cpu(zen4))[0] == "bfloat16"


def test_gpus_by_compute_capability():
    assert hardware.compute_dtype(hardware.detect("1x-rtx4090"))[0] == "bfloat16"
    assert hardware.compute_dtype(hardware.detect("1x-a100-80gb"))[0] == "bfloat16"
    dtype, why = hardware.compute_dtype(hardware.detect("1x-t4"))
    assert dtype == "float16" and "8.0" in why
    # the GPUs decide, not the host CPU (the T4's Xeon has no BF16, the H100's has AMX)
    assert hardware.compute_dtype(hardware.detect("1x-h100-80gb"))[0] == "bfloat16"


def test_the_simulated_cpus_carry_their_flags():
    assert hardware.detect("cpu-avx2").cpu_bf16 is False
    assert hardware.detect("cpu-only").cpu_bf16 is True
    assert "amx_bf16" in hardware.detect("1x-h100-80gb").cpu_flags


# -- the plan -----------------------------------------------------------------------------------------------------

def test_auto_is_a_choice_and_bfloat16_on_an_emulating_cpu_an_adjustment():
    knobs = plan.Knobs(micro_batch=8, seq_len=160, packing=True, compute_dtype="auto")
    avx2, zen4 = hardware.detect("cpu-avx2"), hardware.detect("cpu-only")

    p = plan.make_plan(SMOLLM2, knobs, avx2)
    assert p["knobs"]["compute_dtype"] == "float32" and p["requested"]["compute_dtype"] == "auto"
    assert p["verdict"] == "fits" and p["adjustments"] == []
    assert any(c["change"] == "compute dtype float32" and "emulated" in c["why"] for c in p["choices"])
    assert plan.recipe_changes(p)["quantization.compute_dtype"] == "float32"
    assert plan.make_plan(SMOLLM2, knobs, zen4)["knobs"]["compute_dtype"] == "bfloat16"

    named = replace(knobs, compute_dtype="bfloat16")
    p = plan.make_plan(SMOLLM2, named, avx2)
    assert p["verdict"] == "fits_after_adjustment" and p["knobs"]["compute_dtype"] == "float32"
    step = p["adjustments"][0]
    assert step["change"] == "compute dtype bfloat16 -> float32"
    more = sum(plan.estimate(SMOLLM2, replace(named, compute_dtype="float32"), "cpu").values()) - \
        sum(plan.estimate(SMOLLM2, named, "cpu").values())
    assert more > 0 and f"{more / GiB:.2f} GiB more memory" in step["why"]
    assert plan.recipe_changes(p) == {"quantization.compute_dtype": "float32"}
    # negative control: where bfloat16 is native the recipe's choice stands
    p = plan.make_plan(SMOLLM2, named, zen4)
    assert p["verdict"] == "fits" and p["knobs"]["compute_dtype"] == "bfloat16" and p["adjustments"] == []
    # on an older GPU bfloat16 becomes float16
    t4 = plan.make_plan(SMOLLM2, named, hardware.detect("1x-t4"))
    assert t4["knobs"]["compute_dtype"] == "float16" and "bfloat16 -> float16" in t4["adjustments"][0]["change"]


def test_strict_checks_refuse_an_emulated_bfloat16(home, tmp_path):
    recipe = tmp_path / "strict.yaml"
    text = (ROOT / "recipes" / "demo-cpu.yaml").read_text().replace("compute_dtype: auto", "compute_dtype: bfloat16")
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "smollm2-135m-instruct.json").write_text(
        (ROOT / "recipes" / "configs" / "smollm2-135m-instruct.json").read_text())
    recipe.write_text(text)
    adjusted = cli_json("plan", str(recipe), "--simulate", "cpu-avx2", home=home)
    assert adjusted["recipe_changes"]["quantization.compute_dtype"] == "float32"
    assert adjusted["adjustments"][0]["change"] == "compute dtype bfloat16 -> float32"
    recipe.write_text(text.replace("  logging_steps: 1", "  logging_steps: 1\n  strict_checks: true"))
    refused = run_cli("plan", str(recipe), "--simulate", "cpu-avx2", home=home, check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "compute_dtype is bfloat16 but this CPU has no AVX512-BF16 or AMX-BF16" in refused.stderr
    assert "set compute_dtype: auto" in refused.stderr
    # negative control: on a CPU with native bfloat16 the strict recipe plans
    assert cli_json("plan", str(recipe), "--simulate", "cpu-only", home=home)["knobs"]["compute_dtype"] == "bfloat16"


def test_hw_and_doctor_say_whether_the_cpu_computes_bfloat16(home):
    real = cli_json("hw", home=home)
    assert {"cpu_flags", "cpu_bf16", "compute_dtype"} <= set(real)
    has = any(f in real["cpu_flags"] for f in hardware.CPU_BF16_FLAGS)
    assert real["cpu_bf16"] == (has and not real["cpu_capped"])  # (the test command may run capped, as an AVX2 box)
    capped = cli_json("hw", home=home, env={"ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert capped["cpu_bf16"] is False and capped["cpu_capped"] == "AVX2" and capped["compute_dtype"] == "float32"
    avx2 = cli_json("hw", "--simulate", "cpu-avx2", home=home)
    assert avx2["cpu_bf16"] is False and avx2["compute_dtype"] == "float32" and avx2["cpu_flags"] == ["avx2", "fma"]
    text = run_cli("hw", "--simulate", "cpu-avx2", home=home, env={"COLUMNS": "200"}).stdout
    assert "AVX2, FMA" in text and "emulated: float32 is the fast choice" in text
    flat = json.dumps(json.loads(run_cli("doctor", "--simulate", "cpu-avx2", "--json", home=home, check=False).stdout))
    assert "bfloat16 on the CPU" in flat and "emulated (slow)" in flat
    zen4 = json.dumps(json.loads(run_cli("doctor", "--simulate", "cpu-only", "--json", home=home, check=False).stdout))
    assert "bfloat16 on the CPU" in zen4 and "AVX512-BF16" in zen4 and "emulated (slow)" not in zen4


def test_the_hardware_screen_says_it_too():
    from tui.screens.hardware import facts_text

    avx2 = facts_text(hardware.detect("cpu-avx2"))
    assert "AVX2, FMA" in avx2 and "emulated on the CPU (float32 is faster)" in avx2 and "float32 (compute_dtype" in avx2
    zen4 = facts_text(hardware.detect("cpu-only"))
    assert "native on the CPU" in zen4 and "bfloat16 (compute_dtype" in zen4
    gpus = facts_text(hardware.detect("1x-t4"))  # the GPUs decide: no CPU bfloat16 row
    assert "on the CPU" not in gpus and "float16 (compute_dtype" in gpus
