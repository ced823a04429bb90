"""The demo task: turn a free-text personnel record into a fixed JSON shape.

A 135M model cannot do this reliably out of the box (it invents keys, wraps the
object in prose, or drops fields) and learns it from a few hundred examples in
minutes on a CPU, so base vs tuned differ visibly and measurably. Everything
here is generated from a seed; no real person is described.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

# The house format: a fixed key set and order, the name split in two, the age a number, the occupation in
# lower case. The instruction does not spell it out; the model has to learn it from the examples.
KEYS = ("first_name", "last_name", "age", "city", "occupation")
INSTRUCTION = "Convert this record to JSON."

_FIRST = """Maria James Aiko Omar Lena Tomas Priya Kwame Sofia Lucas Ingrid Mateo Chloe Ravi Hana Felix
Amara Jonas Elif Diego Nora Arjun Yara Pavel Mei Samuel Zara Oskar Leila Bruno Ada Kenji Rosa Emil Nia
Victor Ines Hugo Freya Malik Clara Ivan Sana Theo Lucia Dmitri Esme Farid Greta""".split()
_LAST = """Lopez Smith Tanaka Haddad Fischer Novak Sharma Mensah Rossi Martin Larsen Garcia Dubois Patel
Kim Weber Okafor Berg Yilmaz Silva Moreau Nair Costa Ivanov Chen Cohen Ahmed Lind Rahman Ferreira Byrne
Sato Alvarez Kowalski Mwangi Dupont Santos Hoffmann Nguyen Eriksen""".split()
_CITY = """Valencia Osaka Lagos Hamburg Lyon Porto Pune Accra Turin Leeds Bergen Cusco Ghent Kyoto Izmir
Recife Nantes Kochi Gdansk Tartu Graz Brno Malmo Busan Haifa Oulu Cork Quebec Perth Tampere Bilbao
Kraków Seville Utrecht Aarhus Bologna Dakar Lille Nagoya Durban""".split()
_JOB = """nurse carpenter pharmacist pilot teacher electrician architect chef librarian welder
accountant dentist firefighter journalist plumber surveyor translator veterinarian baker mechanic
geologist paramedic optician tailor botanist""".split()

_TEMPLATES = (
    "{name}, {age}, works as a {occupation} in {city}.",
    "{name} is a {age}-year-old {occupation} living in {city}.",
    "Meet {name}: {occupation}, age {age}, based in {city}.",
    "From {city}, {name} ({age}) earns a living as a {occupation}.",
    "{occupation} {name}, aged {age}, resides in {city}.",
    "Record: {name} / {city} / {occupation} / {age} years old.",
    "In {city} lives {name}, who is {age} and works as a {occupation}.",
    "{name} has been a {occupation} for years; {age} now, still in {city}.",
    "Age {age}. Name {name}. Job: {occupation}. Home town: {city}.",
    "Our new {occupation}, {name}, is {age} and moved here from {city}.",
    "{name} ({occupation}, {city}) turned {age} this spring.",
    "Contact {name} in {city}; the {age}-year-old {occupation} is on call.",
)


def make_record(rng: random.Random) -> dict:
    return {
        "first_name": rng.choice(_FIRST),
        "last_name": rng.choice(_LAST),
        "age": rng.randint(19, 78),
        "city": rng.choice(_CITY),
        "occupation": rng.choice(_JOB),
    }


def answer(record: dict) -> str:
    return json.dumps({k: record[k] for k in KEYS}, ensure_ascii=False)


def example(rng: random.Random) -> dict:
    record = make_record(rng)
    text = rng.choice(_TEMPLATES).format(name=f"{record['first_name']} {record['last_name']}", **record)
    return {
        "messages": [
            {"role": "user", "content": f"{INSTRUCTION}\n{text}"},
            {"role": "assistant", "content": answer(record)},
        ]
    }


def splits(train: int = 400, validation: int = 48, seed: int = 1234, test: int = 48) -> dict[str, list[dict]]:
    """The demo's train, validation and test records (no prompt repeats across splits)."""
    return _unique(example, lambda ex: ex["messages"][0]["content"], train, validation, test, seed)


def generate(out_dir: Path, train: int = 400, validation: int = 48, seed: int = 1234, test: int = 48) -> Path:
    """Write the splits as plain ``train.jsonl``, ``validation.jsonl`` and ``test.jsonl`` (for tests and scratch
    use; ``test=0`` writes no test file)."""
    return _write(out_dir, splits(train, validation, seed, test))


def _unique(make, key, train: int, validation: int, test: int, seed: int) -> dict[str, list[dict]]:
    """``train + validation + test`` records from ``make(rng)``, none with the prompt (``key``) of an earlier
    one; the test records are drawn last, so the train and validation records are those of before there was a test
    split."""
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: list[dict] = []
    while len(rows) < train + validation + test:
        row = make(rng)
        if key(row) not in seen:
            seen.add(key(row))
            rows.append(row)
    parts = {"train": rows[:train], "validation": rows[train:train + validation], "test": rows[train + validation:]}
    return {name: part for name, part in parts.items() if part or name != "test"}


def _write(out_dir: Path, parts: dict[str, list[dict]]) -> Path:
    from .workspace import write_atomic

    out_dir.mkdir(parents=True, exist_ok=True)
    for name, part in parts.items():
        write_atomic(out_dir / f"{name}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part))
    return out_dir



# The preference set (for DPO after the demo's SFT run): faithfulness. Half the records give no age; the chosen
# answer says "age": null, the rejected one invents an age, which is what a model trained only on complete records
# does. The other half give the age; the chosen answer copies it, the rejected one gets it wrong. The SFT model
# prefers the invented age (it has never seen null), so its held-out preference accuracy starts near one half.
_NO_AGE = (
    "{name} works as a {occupation} in {city}.",
    "{name} is a {occupation} living in {city}.",
    "Meet {name}: {occupation}, based in {city}.",
    "From {city}, {name} earns a living as a {occupation}.",
    "Record: {name} / {city} / {occupation} / age not given.",
    "In {city} lives {name}, who works as a {occupation}.",
)


def preference_pair(rng: random.Random) -> dict:
    record = make_record(rng)
    name = f"{record['first_name']} {record['last_name']}"
    if rng.random() < 0.5:
        text = rng.choice(_NO_AGE).format(name=name, **record)
        chosen, rejected = {**record, "age": None}, record
    else:
        text = rng.choice(_TEMPLATES).format(name=name, **record)
        wrong = record["age"] + rng.choice((-1, 1)) * rng.randint(3, 15)
        chosen, rejected = record, {**record, "age": wrong}
    return {"prompt": [{"role": "user", "content": f"{INSTRUCTION}\n{text}"}],
            "chosen": answer(chosen), "rejected": answer(rejected)}


def preference_splits(train: int = 240, validation: int = 48, seed: int = 4321, test: int = 48) -> dict[str, list[dict]]:
    return _unique(preference_pair, lambda pair: pair["prompt"][0]["content"], train, validation, test, seed)


def generate_preferences(out_dir: Path, train: int = 240, validation: int = 48, seed: int = 4321,
                         test: int = 48) -> Path:
    """The preference splits as plain ``train.jsonl``, ``validation.jsonl`` and ``test.jsonl`` (prompt, chosen,
    rejected)."""
    return _write(out_dir, preference_splits(train, validation, seed, test))
