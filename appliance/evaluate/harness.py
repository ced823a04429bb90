"""Standard benchmarks through EleutherAI's lm-evaluation-harness, offline, for those who want its numbers.

An optional extra (``pip install 'appliance[harness]'``; ``scripts/setup.sh`` installs it). It runs the
harness's Hugging Face backend on the base model's folder and on the run's merged model, with task files that
read local JSON only: the harness's ``json`` dataset loader and built-in metrics (``acc``, ``acc_norm``,
``exact_match``...; a metric it does not have built in falls back to ``evaluate.load``, which reaches the network
and is refused here). The project ships one such task, ``appliance_general`` (the forgetting check's BIG-Bench Hard
items as a multiple-choice task); ``--harness-tasks DIR`` adds a folder of your own task YAMLs, whose
``dataset_kwargs.data_files`` name local files. The results join ``eval.json``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..errors import InvalidInput, NotFound
from ..events import Emit, Event, ignore
from ..native_crash import step

DEFAULT_TASK = "appliance_general"
_TASK = """task: appliance_general
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{input}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{choices.index(target)}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def run(run_id: str, tasks: list[str] | None = None, task_dir: Path | None = None, limit: int | None = None,
        emit: Emit = ignore, stage: str = "eval") -> dict:
    """Each task's metrics for the base model and the merged (tuned) one: {"tasks", "base", "tuned", "limit"}."""
    from .. import runs
    from ..merge import merged_dir
    from ..models import model_dir
    from ..trust import manifest
    from .general import SET

    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise InvalidInput("lm-evaluation-harness is not installed; install the extra (`pip install "
                           "'appliance[harness]'`, or `scripts/setup.sh`) to run standard benchmarks.") from None
    recipe = runs.load_recipe(run_id)
    merged = merged_dir(run_id)
    if not (merged / manifest.NAME).is_file():
        raise NotFound(f"run {run_id} has no merged model; run `appliance merge {run_id}` first.")
    if task_dir is not None and not Path(task_dir).is_dir():
        raise NotFound(f"--harness-tasks {task_dir} is not a folder of task YAML files.")
    tasks = tasks or [DEFAULT_TASK]
    out: dict = {"tasks": tasks, "limit": limit, "backend": "lm-evaluation-harness, hf"}
    with tempfile.TemporaryDirectory(prefix="appliance-harness-") as tmp:
        (Path(tmp) / "appliance_general.yaml").write_text(_TASK.format(data=SET), encoding="utf-8")
        include = [tmp] + ([str(Path(task_dir).resolve())] if task_dir else [])
        manager = TaskManager(include_path=include)
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            raise InvalidInput(f"lm-evaluation-harness knows no task {', '.join(map(repr, unknown))}; give a task of "
                               "--harness-tasks DIR (local JSON only: there is no network to fetch a dataset from).")
        for name, path in (("base", model_dir(recipe.base_model)), ("tuned", merged)):
            emit(Event("stage", stage, f"lm-evaluation-harness: {', '.join(tasks)} on the {name} model"))
            with step(f"lm-evaluation-harness on the {name} model"):
                result = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={path},dtype=float32",
                                                 tasks=tasks, task_manager=manager, limit=limit, batch_size=4,
                                                 device="cpu", log_samples=False)
            out[name] = {task: {k.split(",")[0]: v
                                for k, v in metrics.items() if "," in k and isinstance(v, (int, float))}
                         for task, metrics in result["results"].items()}
    return out


def save(run_id: str, result: dict) -> None:
    """The harness's figures into eval.json (and the page), beside the appliance's own evaluation."""
    from .. import runs
    from ..workspace import read_json, write_json
    from . import html

    path = runs.run_dir(run_id) / "eval.json"
    report = read_json(path) if path.is_file() else {}
    report["harness"] = result
    write_json(path, report)
    if report.get("metrics"):
        html.write(run_id, report)
