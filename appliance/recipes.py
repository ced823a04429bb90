"""Recipes: declarative, validated YAML describing one training run.

Every key is checked; an unknown key is rejected with a did-you-mean, and all
problems of a file are reported together, each with its line. A recipe names
its base model (a model id from ``appliance models list``) and its dataset (for
now a dataset id in the workspace or a folder holding ``train.jsonl`` and
``validation.jsonl``; the vault makes the ids encrypted).
"""

from __future__ import annotations

import difflib
import hashlib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import InvalidInput, NotFound

QUANTS = ("f16", "bf16", "q8_0", "q4_k_m", "q5_k_m", "q4_0")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Lora(_Strict):
    r: int = Field(16, ge=1, le=1024, description="rank; higher learns more and costs more memory")
    alpha: int = Field(32, ge=1, description="scaling: the update is multiplied by alpha / r")
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: str | list[str] = Field("all-linear", description="'all-linear' or module names")
    use_dora: bool = Field(False, description="DoRA: the update split into a direction (LoRA) and a trained "
                                              "magnitude per output; slower steps, closer to full fine-tuning")


class EarlyStopping(_Strict):
    patience: int = Field(3, ge=1, description="evaluations without improvement before the run stops")
    min_delta: float = Field(0.0, ge=0.0, description="how much lower the validation loss must be to count as better")


class Training(_Strict):
    max_steps: int | None = Field(None, ge=1, description="optimizer steps (default 100 unless num_epochs is set)")
    num_epochs: float | None = Field(None, gt=0, le=1000, description="passes over the training split, instead of "
                                     "max_steps")
    early_stopping: EarlyStopping | None = Field(None, description="stop when the validation loss has not improved "
                                                 "for `patience` evaluations; the best checkpoint is kept either way")
    strict_checks: bool = Field(False, description="the guides' hyperparameter checks are errors, not warnings")
    micro_batch_size: int | Literal["auto"] = Field(
        4, description="sequences (packed: bins of max_seq_length) per forward pass; auto: the plan picks the "
                       "largest that fits, with gradient accumulation making up batch_size")
    gradient_accumulation_steps: int | None = Field(
        None, ge=1, description="micro-batches per optimizer step; default batch_size / micro_batch_size, else 1")
    batch_size: int | None = Field(None, ge=1, description="effective batch (sequences per optimizer step) that "
                                   "micro_batch_size: auto keeps; default micro_batch_size x gradient_accumulation_steps")
    learning_rate: float = Field(2e-4, gt=0, lt=1)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    max_seq_length: int = Field(512, ge=16, le=131072)
    gradient_checkpointing: bool | Literal["auto"] = Field(
        False, description="recompute activations in the backward pass; auto: off when the plan finds it fits")
    packing: bool = Field(True, description="pack examples into bins of max_seq_length, padding-free, with "
                                            "attention kept inside each example")
    kernels: Literal["auto", "none"] = Field("auto", description="auto: Liger's fused RMSNorm, RoPE and SwiGLU "
                                             "kernels on CUDA when installed; none: transformers' own")
    activation_offloading: bool = Field(False, description="keep saved activations in host memory (slower; "
                                        "the planner counts them off the GPU)")
    strategy: Literal["auto", "ddp", "fsdp", "split"] = Field(
        "auto", description="how several processes or GPUs share the work; auto: the plan's choice (a replica per GPU "
        "when one fits, else FSDP, else the layers split over the GPUs)")
    fsdp_cpu_offload: bool = Field(False, description="FSDP keeps the sharded weights, gradients and optimizer states "
                                   "in host memory (slower; for models that do not fit the GPUs even sharded)")
    optimizer: Literal["adamw_torch", "paged_adamw_8bit", "adamw_8bit", "sgd"] = "adamw_torch"
    save_steps: int = Field(25, ge=1, description="checkpoint every N steps")
    keep_checkpoints: int | None = Field(None, description="keep the newest N checkpoints, and the best, deleting "
                                         "older ones as new ones are written; none: keep all")
    eval_steps: int = Field(25, ge=1, description="validation loss every N steps")
    logging_steps: int = Field(1, ge=1)
    threads: int | None = Field(None, ge=1, description="CPU threads; default: all cores")

    @field_validator("micro_batch_size")
    @classmethod
    def _positive(cls, value):
        if value != "auto" and value < 1:
            raise ValueError("must be 1 or more, or auto")
        return value

    @field_validator("keep_checkpoints")
    @classmethod
    def _keep(cls, value):
        # The newest is protected while it is written (the Trainer rotates before it counts as complete): one
        # complete checkpoint must remain for a resume, and across machines one that every node holds.
        if value is not None and value < 2:
            raise ValueError("must be 2 or more (a resume needs one complete checkpoint while the next is written), "
                             "or left out to keep all")
        return value

    @field_validator("batch_size")
    @classmethod
    def _batch(cls, value, info):
        micro, accum = info.data.get("micro_batch_size"), info.data.get("gradient_accumulation_steps")
        if value is None or not isinstance(micro, int):
            return value
        if isinstance(accum, int) and value != micro * accum:
            raise ValueError(f"{value} is not micro_batch_size x gradient_accumulation_steps ({micro} x {accum}); "
                             "drop gradient_accumulation_steps to derive it, or set micro_batch_size: auto")
        if value % micro:
            raise ValueError(f"{value} is not a multiple of micro_batch_size {micro}; choose a micro-batch that "
                             "divides it, or micro_batch_size: auto")
        return value

    @model_validator(mode="after")
    def _length(self):
        if self.max_steps is not None and self.num_epochs is not None:
            raise ValueError("max_steps and num_epochs are both set; keep one of them")
        if self.max_steps is None and self.num_epochs is None:
            self.max_steps = 100
        return self

    @model_validator(mode="after")
    def _accumulation(self):
        if self.gradient_accumulation_steps is None:
            derive = self.batch_size is not None and self.micro_batch_size != "auto"
            self.gradient_accumulation_steps = self.batch_size // self.micro_batch_size if derive else 1
        return self

    @property
    def effective_batch(self) -> int:
        if self.batch_size is not None:
            return self.batch_size
        return (4 if self.micro_batch_size == "auto" else self.micro_batch_size) * self.gradient_accumulation_steps

    @property
    def auto(self) -> list[str]:
        """The knobs this recipe leaves to the plan."""
        return [k for k in ("micro_batch_size", "gradient_checkpointing") if getattr(self, k) == "auto"]


class Quantization(_Strict):
    method: Literal["nf4", "none"] = Field("nf4", description="nf4: QLoRA on a 4-bit base; none: LoRA on 16-bit")
    double_quant: bool = True
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: what the hardware computes natively (bfloat16 on GPUs of compute capability 8.0+ "
        "and on CPUs with AVX512-BF16 or AMX; float16 on older GPUs; float32 on other CPUs); the plan resolves it")


class Export(_Strict):
    quant: list[str] = Field(default_factory=lambda: ["f16", "q4_k_m"])
    parity_samples: int = Field(16, ge=1)

    @field_validator("quant")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        for q in value:
            if q not in QUANTS:
                raise ValueError(f"unknown quantization {q!r}; choose from {', '.join(QUANTS)}")
        return value


class Share(_Strict):
    id: str = Field(description="a dataset id in the workspace, or a folder")
    weight: float = Field(gt=0, description="its share of the training examples (the weights are normalised)")


class Dpo(_Strict):
    beta: float = Field(0.1, gt=0, le=10, description="how far the tuned model may move from the reference: "
                        "lower lets it move further")
    from_run: str | None = Field(None, description="the SFT run to start from (its best adapter, trained further; "
                                 "its copy is the reference), by id or by recipe name (the newest finished run of "
                                 "it); none: a new adapter on the base model, the base the reference")
    sft_weight: float = Field(0.0, ge=0, le=10, description="adds the chosen answers' own loss with this weight "
                              "(RPO): DPO alone may push the rejected answers down by making the chosen ones unlikely "
                              "too; 0: plain DPO")


class Recipe(_Strict):
    name: str
    method: Literal["sft", "dpo"] = Field("sft", description="sft: supervised on conversations; dpo: direct "
                                          "preference optimisation on prompt, chosen, rejected pairs")
    dpo: Dpo | None = Field(None, description="DPO's settings (method: dpo)")
    base_model: str = Field(description="a model id from `appliance models list`")
    dataset: str | list[Share] = Field(
        description="a dataset id in the workspace, or a folder holding train.jsonl and validation.jsonl; or a mix, "
                    "[{id: domain, weight: 0.9}, {id: general, weight: 0.1}], whose first entry is the domain data "
                    "(its training split is used once, whole; its validation split is the held-out one)")
    seed: int = 42
    system_prompt: str | None = None
    quantization: Quantization = Field(default_factory=Quantization)
    lora: Lora | None = Field(default_factory=Lora, description="the adapter; null: full fine-tuning (every weight "
                              "trains; needs quantization.method: none)")
    training: Training = Field(default_factory=Training)
    export: Export = Field(default_factory=Export)

    # Where the recipe was read from, so relative paths resolve against it.
    source: str | None = Field(None, exclude=True)

    @field_validator("dataset")
    @classmethod
    def _mix(cls, value):
        if isinstance(value, list):
            if not value:
                raise ValueError("an empty list; name a dataset, or a mix of at least one")
            ids = [s.id for s in value]
            if len(set(ids)) < len(ids):
                raise ValueError(f"{next(i for i in ids if ids.count(i) > 1)!r} is listed twice; list each once")
        return value

    @model_validator(mode="after")
    def _method(self):
        if self.method == "dpo" and self.dpo is None:
            self.dpo = Dpo()
        if self.method != "dpo" and self.dpo is not None:
            raise ValueError("a dpo section needs method: dpo; set it, or remove the section")
        if self.lora is None and self.quantization.method != "none":
            raise ValueError("full fine-tuning (lora: null) trains every weight, and 4-bit weights cannot be "
                             "trained; set quantization.method: none, or give a lora section for QLoRA")
        if self.lora is None and self.method == "dpo":
            raise ValueError("DPO here trains an adapter against its frozen copy; give a lora section (full-weight "
                             "DPO would need a second copy of the model as its reference)")
        if self.method == "dpo" and not isinstance(self.dataset, str):
            raise ValueError("a DPO run trains on one preference dataset, not a mix; name one dataset")
        return self

    def mix(self) -> list[tuple[Path, float]]:
        """(folder, normalised weight) of each dataset; one dataset is a mix of one, with weight 1."""
        shares = [Share(id=self.dataset, weight=1.0)] if isinstance(self.dataset, str) else self.dataset
        total = sum(s.weight for s in shares)
        return [(self._folder(s.id), s.weight / total) for s in shares]

    def dataset_path(self) -> Path:
        """The (first, domain) dataset's folder: its validation split is the run's held-out split."""
        return self._folder(self.dataset if isinstance(self.dataset, str) else self.dataset[0].id)

    def _folder(self, name: str) -> Path:
        """A workspace dataset id first, else a path (relative to the recipe's file)."""
        from .workspace import folder

        by_id = folder("datasets") / name
        if "/" not in name and by_id.is_dir():
            return by_id
        p = Path(name).expanduser()
        if not p.is_absolute() and self.source:
            p = Path(self.source).parent / p
        if not p.is_dir():
            where = f"{self.source}: " if self.source else ""
            raise NotFound(f"{where}dataset {name!r} is neither a dataset in {folder('datasets')} nor a folder; "
                           "fix the recipe's 'dataset' key.")
        return p

    def digest(self) -> str:
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()


def load(path: str | Path, **overrides: Any) -> Recipe:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise NotFound(f"recipe {path} does not exist; pass the path of a YAML recipe (see recipes/).")
    text = path.read_text(encoding="utf-8")
    try:
        node = yaml.compose(text)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise InvalidInput(f"{where}: the recipe is not valid YAML ({getattr(e, 'problem', e)}); fix the syntax.") from None
    if not isinstance(raw, dict):
        raise InvalidInput(f"{path}: a recipe must be a mapping of keys to values.")
    for dotted, value in overrides.items():
        _set_dotted(raw, dotted, value)
        other = {"training.max_steps": "training.num_epochs", "training.num_epochs": "training.max_steps"}.get(dotted)
        if other and value is not None:  # an override of the length replaces the recipe's other way of saying it
            _set_dotted(raw, other, None)
    return from_dict(raw, source=path, lines=_key_lines(node))


def from_dict(raw: dict, source: Path | None = None, lines: dict[tuple, int] | None = None) -> Recipe:
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as e:
        problems = [_describe(err, source, lines or {}) for err in _merge_unions(e.errors())]
        raise InvalidInput("; ".join(problems) + ".") from None
    recipe.source = str(source) if source else None
    return recipe


_MEMBERS = {"bool": "true, false", "int": "a whole number", "float": "a number", "str": "text"}


def _member(part) -> str | None:
    """What a union member pydantic names in an error's location stands for, in the recipe's words."""
    if not isinstance(part, str):
        return None
    if part in _MEMBERS:
        return _MEMBERS[part]
    if part.startswith("literal["):
        return part[len("literal["):-1].replace("'", "")
    if part.startswith("list["):
        return "a list"
    return None


def _merge_unions(errors: list[dict]) -> list[dict]:
    """A value that fits no member of a union (``true | false | auto``) gets one message, not one per member; an
    error inside a member (an item of a dataset mix) is reported at its own key, without the member's."""
    deep = {}
    for err in errors:
        loc = err["loc"]
        at = next((i for i, part in enumerate(loc) if _member(part) and i < len(loc) - 1), None)
        if at is not None:
            deep[tuple(loc[:at])] = True
    out: list[dict] = []
    merged: dict[tuple, dict] = {}
    for err in errors:
        loc = tuple(err["loc"]) or ("",)
        at = next((i for i, part in enumerate(loc) if _member(part) and i < len(loc) - 1), None)
        if at is not None:  # inside a member: drop the member's name from the key
            out.append({**err, "loc": loc[:at] + loc[at + 1:]})
            continue
        *key, member = loc
        what = _member(member)
        if what is None:
            out.append(err)
            continue
        if tuple(key) in deep:
            continue  # the value is of the member with the deeper error; "not text" would only confuse
        if tuple(key) in merged:
            merged[tuple(key)]["choices"].append(what)
            continue
        merged[tuple(key)] = {"loc": tuple(key), "type": "union", "input": err.get("input"), "choices": [what]}
        out.append(merged[tuple(key)])
    for err in merged.values():
        *first, last = err["choices"]
        err["msg"] = f"{err['input']!r} is not {', '.join(first) + ' or ' if first else ''}{last}"
    return out


def _describe(err: dict, source: Path | None, lines: dict[tuple, int]) -> str:
    loc = tuple(str(x) for x in err["loc"])
    field = ".".join(loc)
    line = lines.get(loc) or lines.get(loc[:-1])
    where = f"{source}:{line}" if source and line else (str(source) if source else "recipe")
    if err["type"] == "extra_forbidden":
        known = _fields_at(loc[:-1])
        guess = _did_you_mean(loc[-1], known, loc[-2] if len(loc) > 1 else "")
        hint = f"; did you mean {guess!r}?" if guess else f"; known keys here: {', '.join(known)}"
        return f"{where}: unknown key {field!r}{hint}"
    if err["type"] == "missing":
        return f"{where}: required key {field!r} is missing"
    return f"{where}: {field + ': ' if field else ''}{err['msg'].removeprefix('Value error, ')}"


def _did_you_mean(word: str, known: list[str], section: str) -> str | None:
    """The closest known key; 'lora_alpah' under 'lora' matches 'alpha' through its prefixed form too."""
    def closeness(key: str) -> float:
        forms = (key, f"{section}_{key}") if section else (key,)
        return max(difflib.SequenceMatcher(None, word, form).ratio() for form in forms)

    best = max(known, key=closeness, default=None)
    return best if best is not None and closeness(best) >= 0.6 else None


def _fields_at(loc: tuple) -> list[str]:
    import typing

    def model_in(annotation):
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return annotation
        return next((m for a in typing.get_args(annotation) if (m := model_in(a))), None)

    model: type[BaseModel] = Recipe
    for part in loc:
        if str(part).isdigit():
            continue  # an item of a list: the same model
        model = model_in(model.model_fields[part].annotation)
    return [name for name in model.model_fields if name != "source"]


def _key_lines(node: Any, prefix: tuple = ()) -> dict[tuple, int]:
    import yaml

    out: dict[tuple, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            path = prefix + (str(key.value),)
            out[path] = key.start_mark.line + 1
            out.update(_key_lines(value, path))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[prefix + (str(i),)] = item.start_mark.line + 1
            out.update(_key_lines(item, prefix + (str(i),)))
    return out


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    target = raw
    for part in parents:
        target = target.setdefault(part, {})
    target[last] = value
