from pathlib import Path

import pytest

from appliance import recipes
from appliance.errors import InvalidInput, NotFound

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_loads(path):
    recipe = recipes.load(path)
    assert recipe.name
    assert recipe.training.max_steps >= 1


def test_unknown_key_gets_did_you_mean_with_file_and_line(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: x\nbase_model: m\ndataset: d\nlora:\n  r: 8\n  lora_alpah: 16\n")
    with pytest.raises(InvalidInput) as e:
        recipes.load(p)
    msg = str(e.value)
    assert f"{p}:6" in msg and "lora.lora_alpah" in msg
    assert "did you mean 'alpha'" in msg


def test_all_problems_reported_together(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: x\ndataset: d\ntraining:\n  max_step: 3\n  learning_rate: 5\n")
    msg = str(pytest.raises(InvalidInput, recipes.load, p).value)
    assert "required key 'base_model' is missing" in msg
    assert "did you mean 'max_steps'" in msg and f"{p}:4" in msg
    assert "training.learning_rate" in msg and f"{p}:5" in msg


def test_bad_yaml_names_the_line(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: x\nlora: [1, 2\n")
    msg = str(pytest.raises(InvalidInput, recipes.load, p).value)
    assert str(p) in msg and "not valid YAML" in msg


def test_unknown_quantization_rejected(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: x\nbase_model: m\ndataset: d\nexport:\n  quant: [f16, q3_xx]\n")
    assert "unknown quantization 'q3_xx'" in str(pytest.raises(InvalidInput, recipes.load, p).value)


def test_auto_knobs_and_the_effective_batch(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: x\nbase_model: m\ndataset: d\ntraining:\n  micro_batch_size: auto\n  batch_size: 16\n"
                 "  gradient_checkpointing: auto\n")
    t = recipes.load(p).training
    assert t.auto == ["micro_batch_size", "gradient_checkpointing"] and t.effective_batch == 16 and t.packing is True
    p.write_text("name: x\nbase_model: m\ndataset: d\ntraining:\n  micro_batch_size: 4\n  batch_size: 6\n")
    msg = str(pytest.raises(InvalidInput, recipes.load, p).value)
    assert f"{p}:6" in msg and "training.batch_size" in msg and "micro_batch_size: auto" in msg
    p.write_text("name: x\nbase_model: m\ndataset: d\ntraining:\n  micro_batch_size: 0\n"
                 "  gradient_checkpointing: sometimes\n  kernels: liger\n")
    msg = str(pytest.raises(InvalidInput, recipes.load, p).value)
    assert f"{p}:5" in msg and "1 or more, or auto" in msg
    assert "training.gradient_checkpointing: 'sometimes' is not true, false or auto" in msg
    assert "training.kernels" in msg and f"{p}:7" in msg


def test_missing_recipe_file(tmp_path):
    with pytest.raises(NotFound):
        recipes.load(tmp_path / "nope.yaml")


def test_overrides_apply_dotted_keys(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: x\nbase_model: m\ndataset: d\n")
    r = recipes.load(p, **{"training.max_steps": 3, "lora.r": 4})
    assert (r.training.max_steps, r.lora.r) == (3, 4)


def test_digest_changes_with_content(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: x\nbase_model: m\ndataset: d\n")
    assert recipes.load(p).digest() != recipes.load(p, **{"seed": 1}).digest()
