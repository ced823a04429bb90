"""Every user mistake ends in one sentence on stderr and a non-zero exit, never a traceback."""

import pytest

from conftest import run_cli


def _one_sentence(p):
    assert p.returncode != 0
    assert "Traceback" not in p.stderr and "Traceback" not in p.stdout
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    return lines[0]


def test_missing_recipe(home, tmp_path):
    line = _one_sentence(run_cli("train", str(tmp_path / "none.yaml"), home=home, check=False))
    assert "none.yaml does not exist" in line


def test_recipe_with_unknown_key(home, tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text("name: x\nbase_model: m\ndataset: d\ntraining:\n  max_stpes: 4\n")
    line = _one_sentence(run_cli("train", str(r), home=home, check=False))
    assert f"{r}:5" in line and "did you mean 'max_steps'" in line


def test_recipe_naming_a_missing_model(home, tmp_path, demo_dataset):
    r = tmp_path / "r.yaml"
    r.write_text(f"name: x\nbase_model: nosuch\ndataset: {demo_dataset}\n")
    line = _one_sentence(run_cli("train", str(r), home=home, check=False))
    assert "no model with id 'nosuch'" in line and "models import" in line


@pytest.mark.parametrize("args", [["runs", "show", "nope"], ["runs", "resume", "nope"], ["merge", "nope"],
                                  ["export", "nope"], ["eval", "nope"]])
def test_unknown_run_id(home, args):
    line = _one_sentence(run_cli(*args, home=home, check=False))
    assert "no run with id 'nope'" in line


def test_ask_with_unknown_model(home, tmp_path):
    line = _one_sentence(run_cli("ask", "nothing-here", "--prompt", "hi", home=home, check=False))
    assert "neither a .gguf file" in line
    line = _one_sentence(run_cli("ask", str(tmp_path / "x.gguf"), "--prompt", "hi", home=home, check=False))
    assert "does not exist" in line


def test_ask_with_corrupt_gguf(home, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    line = _one_sentence(run_cli("ask", str(bad), "--prompt", "hi", home=home, check=False))
    assert str(bad) in line


def test_bad_override(home, tmp_path):
    line = _one_sentence(run_cli("train", "recipes/demo-cpu.yaml", "--set", "oops", home=home, check=False))
    assert "KEY=VALUE" in line
