"""Measuring real training memory for the planner's estimator (used by bench/plan_accuracy.py and tests/test_plan.py).

A run here is the real thing: `appliance train` (QLoRA NF4 through TRL, in the
training child) on a random Llama with SmolLM2's tokenizer, or on SmolLM2-135M,
with a dataset whose every example is longer than ``max_seq_length`` (so each
micro-batch is exactly micro_batch x max_seq_length tokens, as the estimate
assumes). The measured figure is the child's peak RSS (``peak_rss_bytes`` in
the run's summary).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PASSPHRASE = "memory probe passphrase"
WORDS = ("invoice ledger account balance transfer audit quarterly report revenue margin customer contract "
         "delivery warranty support pricing region engineer incident review timeline mitigation").split()


def cli(home: Path, *args: str) -> dict:
    env = {**os.environ, "APPLIANCE_HOME": str(home), "APPLIANCE_PASSPHRASE_FILE": str(home.parent / "probe-pw")}
    proc = subprocess.run([sys.executable, "-m", "appliance.cli", *args, "--json"], capture_output=True, text=True,
                          env=env, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"appliance {' '.join(args)} failed: {proc.stderr.strip() or proc.stdout[-500:]}")
    return json.loads(proc.stdout)


def workspace(home: Path) -> Path:
    """A workspace with a vault (artifacts are signed with its key) and a dataset of long examples."""
    home.mkdir(parents=True, exist_ok=True)
    (home.parent / "probe-pw").write_text(PASSPHRASE)
    if not (home / "keyring.json").exists():
        cli(home, "vault", "init", "--kdf", "pbkdf2-sha256")
    data = home.parent / "long-examples"
    return data if data.is_dir() else long_examples(data, words=1500, train=48)


def long_examples(folder: Path, words: int, train: int) -> Path:
    """A dataset folder whose every answer is ``words`` words long (longer than any max_seq_length probed)."""
    return _write(folder, train, lambda i: {"messages": [{"role": "user", "content": f"write up case {i}"},
                                                         {"role": "assistant", "content": _text(i, words)}]})


def long_pairs(folder: Path, words: int, train: int) -> Path:
    """Preference pairs whose chosen and rejected answers are ``words`` words long (for DPO's rows)."""
    return _write(folder, train, lambda i: {"prompt": f"write up case {i}", "chosen": _text(i, words),
                                            "rejected": _text(i, words, 5, 11)})


def _text(i: int, words: int, a: int = 7, b: int = 13) -> str:
    return " ".join(WORDS[(i * a + j * b) % len(WORDS)] for j in range(words))


def _write(folder: Path, train: int, record) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", train), ("validation", 4)):
        with open(folder / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(record(i)) + "\n" for i in range(n))
    return folder


# The small random Llama the CPU rows and the GPU probe's sanity row measure (its config.json values).
TINY_LLAMA = {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 4, "num_attention_heads": 8,
              "num_key_value_heads": 8, "tie_word_embeddings": True}


def random_llama(out: Path, tokenizer_dir: Path, hidden: int, intermediate: int, layers: int, heads: int) -> Path:
    """A random Llama with SmolLM2's tokenizer, saved as safetensors."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (out / "config.json").is_file():
        return out
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=2048, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return out


def tokenizer_dir(out: Path) -> Path:
    from transformers import AutoTokenizer

    from appliance.models import default_gguf

    if not (out / "tokenizer.json").is_file():
        gguf = default_gguf()
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(out))
    return out


def probe_recipe(home: Path, model_id: str, dataset: Path, micro_batch: int, seq_len: int, grad_ckpt: bool,
                 compute_dtype: str = "float32", steps: int = 2, r: int = 16, packing: bool = True,
                 dropout: float = 0.0, optimizer: str = "adamw_torch", method: str = "sft") -> Path:
    """A recipe file for one measured configuration (fixed micro-batch, no accumulation): QLoRA SFT; ``method``
    "dpo" (QLoRA DPO on pairs, a new adapter) or "full" (full fine-tuning of the 16-bit model)."""
    import yaml

    recipe = {"name": "probe", "base_model": model_id, "dataset": str(dataset), "seed": 1,
              "quantization": {"method": "none" if method == "full" else "nf4", "double_quant": True,
                               "compute_dtype": compute_dtype},
              "lora": None if method == "full" else {"r": r, "alpha": 2 * r, "dropout": dropout},
              **({"method": "dpo"} if method == "dpo" else {}),
              "training": {"max_steps": steps, "micro_batch_size": micro_batch, "gradient_accumulation_steps": 1,
                           "max_seq_length": seq_len, "gradient_checkpointing": grad_ckpt, "packing": packing,
                           "optimizer": optimizer, "save_steps": 1000, "eval_steps": 1000, "learning_rate": 1e-4},
              "export": {"quant": ["f16"]}}
    path = home.parent / (f"probe-{model_id}-{micro_batch}-{seq_len}-{int(grad_ckpt)}-{compute_dtype}-{int(packing)}-"
                          f"{optimizer}-{method}.yaml")
    path.write_text(yaml.safe_dump(recipe))
    return path


def measure(home: Path, model_id: str, dataset: Path, micro_batch: int, seq_len: int, grad_ckpt: bool,
            compute_dtype: str = "float32", steps: int = 2, r: int = 16, packing: bool = True,
            method: str = "sft") -> dict:
    """Train ``steps`` steps for real and return the run's summary (with peak_rss_bytes) and the recipe used."""
    path = probe_recipe(home, model_id, dataset, micro_batch, seq_len, grad_ckpt, compute_dtype, steps, r, packing,
                        method=method)
    run = cli(home, "train", str(path))
    if run["state"] != "finished":
        raise RuntimeError(f"probe run {run['id']} ended {run['state']}: {run.get('error')}")
    return {"summary": run["summary"], "recipe": path}


def predicted(home: Path, recipe: Path) -> dict:
    """The planner's estimate for that recipe on this machine (CPU), through the real CLI."""
    return cli(home, "plan", str(recipe))
