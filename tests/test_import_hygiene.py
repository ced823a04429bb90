"""`import appliance` (and the CLI's start) must stay light: heavy libraries load only in the stages that use them."""

import subprocess
import sys

HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "llama_cpp", "trl", "datasets", "textual")


def _loaded_after(code: str) -> list[str]:
    probe = f"{code}\nimport sys\nprint(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    return [m for m in out.split(",") if m]


def test_import_appliance_loads_no_heavy_library():
    assert _loaded_after("import appliance") == []


def test_cli_parser_and_light_modules_load_no_heavy_library():
    code = ("import appliance.cli, appliance.events, appliance.workspace, appliance.runs, appliance.recipes, "
            "appliance.data, appliance.models, appliance.export, appliance.infer, appliance.merge, appliance.evaluate\n"
            "appliance.cli.build_parser()")
    assert _loaded_after(code) == []


def test_import_sets_offline_switches_before_anything_else():
    code = "import appliance, os; print(os.environ['HF_HUB_OFFLINE'], os.environ['TRANSFORMERS_OFFLINE'], os.environ['HF_HUB_DISABLE_TELEMETRY'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin", "HF_HUB_OFFLINE": "0"}).stdout.split()
    assert out == ["1", "1", "1"]
