"""The hyperparameter rules of thumb of the fine-tuning guides, checked against a recipe before it trains.

Each check is one sentence with the reason and the fix; ``appliance plan`` and ``appliance train`` print them as
warnings (and the Plan screen shows them), and ``training.strict_checks: true`` makes them errors. They need the
training split's size, which comes from the dataset's manifest or file sizes (``data.stats``): no passphrase.
"""

from __future__ import annotations

SMALL_SET = 500      # fewer training examples than this overfit easily
LARGE_RANK = 64      # a rank above this wants at least RANK_SET examples
RANK_SET = 5000
LORA_LR = (1e-5, 1e-3)
FULL_LR = (5e-6, 1e-4)
DPO_LR = (5e-7, 1e-4)  # LoRA DPO; full-weight DPO sits at the low end


def recipe_checks(recipe, train_examples: int | None) -> list[dict]:
    """[{key, message}] for each rule the recipe breaks; ``train_examples`` None when the data is not here."""
    out: list[dict] = []
    t, lora = recipe.training, recipe.lora

    def warn(key: str, message: str) -> None:
        out.append({"key": key, "message": message})

    if lora is not None and lora.alpha != 2 * lora.r:
        scale = lora.alpha / lora.r
        warn("lora.alpha", f"lora.alpha is {lora.alpha} with r {lora.r}: the guides set alpha = 2r, and the update "
             f"is scaled by alpha / r = {scale:g} instead of 2, which acts like a learning rate {scale / 2:g} times "
             f"the one set; set lora.alpha: {2 * lora.r}, or keep it on purpose with the learning rate adjusted")
    if t.warmup_steps == 0:
        steps = t.max_steps or 100
        warn("training.warmup_steps", "training.warmup_steps is 0: the first steps meet the freshly initialised "
             "weights with the full learning rate, which can spike the loss; set it to 3-10% of the steps "
             f"(e.g. {max(1, round(steps * 0.05))})")
    low, high, what = (DPO_LR + ("DPO",) if recipe.method == "dpo" else
                       LORA_LR + ("a LoRA",) if lora is not None else FULL_LR + ("full fine-tuning",))
    if not low <= t.learning_rate <= high:
        warn("training.learning_rate", f"training.learning_rate {t.learning_rate:g} is outside {low:g} .. {high:g}, "
             f"the range the guides give for {what} run ({'too high: the loss diverges or the model forgets' if t.learning_rate > high else 'too low: it barely learns'}); "
             f"set it within the range{' (about 2e-4 for LoRA)' if what == 'a LoRA' else ''}")
    if train_examples is not None and train_examples < SMALL_SET:
        warn("dataset", f"the training split has {train_examples} examples (fewer than {SMALL_SET}): a small set "
             "overfits easily; raise lora.dropout to 0.1-0.15, train fewer epochs, and set training.early_stopping")
    if lora is not None and lora.r > LARGE_RANK and train_examples is not None and train_examples < RANK_SET:
        warn("lora.r", f"lora.r is {lora.r} with {train_examples} training examples: a rank above {LARGE_RANK} "
             f"wants {RANK_SET} or more examples to fill it, else it memorises; use r 16-64")
    return out
