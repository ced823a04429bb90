import json

import pytest

from appliance import data
from appliance.errors import InvalidInput, NotFound
from appliance.evaluate.metrics import json_scores, token_f1


def _write(dir_, split, lines):
    (dir_ / f"{split}.jsonl").write_text("\n".join(lines) + "\n")


def test_load_split_reads_canonical_records(tmp_path):
    rec = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    _write(tmp_path, "train", [json.dumps(rec), ""])
    assert data.load_split(tmp_path, "train") == [rec]


@pytest.mark.parametrize("line, fragment", [
    ('{"messages": [', "train.jsonl:2: not valid JSON"),
    ('{"text": "x"}', "train.jsonl:2: field 'messages'"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "train.jsonl:2: messages[0].role is 'robot'"),
    ('{"messages": [{"role": "user", "content": "  "}]}', "train.jsonl:2: messages[0].content must be non-empty"),
    ('{"messages": [{"role": "user", "content": "q"}]}', "train.jsonl:2: the last turn must be the assistant"),
])
def test_bad_records_name_file_line_and_field(tmp_path, line, fragment):
    good = '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}'
    _write(tmp_path, "train", [good, line])
    with pytest.raises(InvalidInput) as e:
        data.load_split(tmp_path, "train")
    assert fragment in str(e.value)


def test_missing_split(tmp_path):
    with pytest.raises(NotFound, match="validation.jsonl"):
        data.load_split(tmp_path, "validation")


def test_structured_scores_are_strict():
    ref = '{"first_name": "Ada", "age": 41, "occupation": "baker"}'
    assert json_scores(ref, ref) == {"valid_json": 1.0, "exact_keys": 1.0, "field_accuracy": 1.0}
    s = json_scores('{"first_name": "Ada", "age": "41", "occupation": "Baker"}', ref)
    assert s["valid_json"] == 1.0 and s["exact_keys"] == 1.0
    assert s["field_accuracy"] == pytest.approx(1 / 3)  # "41" is not 41 and "Baker" is not "baker"
    assert json_scores("Sure! Here is the JSON: {}", ref)["valid_json"] == 0.0


def test_token_f1_counts_overlap():
    assert token_f1("a b c", "a b d") == pytest.approx(2 / 3)
    assert token_f1("", "") == 1.0


def test_a_dataset_without_a_test_split_has_its_validation_split_serve_as_test(tmp_path):
    from appliance.demo_data import generate

    old = generate(tmp_path / "old", train=8, validation=4, test=0)
    new = generate(tmp_path / "new", train=8, validation=4, test=4)
    assert not (old / "test.jsonl").exists() and data.test_split(old) == "validation"
    assert data.test_split(new) == "test" and data.stats(new)["test"]["records"] == 4
    assert len(data.load_split(new, "test")) == 4
