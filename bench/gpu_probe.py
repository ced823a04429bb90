"""GPU probe: `appliance plan` + `appliance train` against real peaks and a plain loop, on a named real shape.

One command on any CUDA machine (no network needed; bench/gpu-kit.sh carries the packages a bare machine lacks):

    python3 bench/gpu_probe.py --shape llama-3.1-8b-instruct --tokenizer TOKENIZER_DIR \\
        [--measured bench/gpu_measured.json] [--deadline 420] [--configs 4x2048:on,1x2048:on,2x1024:off]

It builds random weights in the shape of ``recipes/configs/<shape>.json`` (or ``tiny``) directly on the GPU, saves
and imports them with `appliance models import`, then for each configuration (micro-batch x sequence length,
checkpointing on/off) runs `appliance plan` and `appliance train` (6 steps, every example longer than the sequence,
so each micro-batch is exactly micro-batch x sequence tokens), and once the plain transformers+PEFT loop of
bench/train_throughput.py on the same data. Each finished row is appended to ``--measured`` at once (a probe cut
short keeps what it measured), with its conditions: GPU, versions, shape, knobs, peak allocated and reserved bytes,
the process's memory outside the allocator (NVML per process minus reserved), tokens/s and what the plan said.
bench/plan_accuracy.py then compares the planner with every row.

On a machine without CUDA it runs the tiny shape end to end as a rehearsal and writes nothing to ``--measured``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))
import _memory  # noqa: E402  the project's own helpers: cli, workspace, long examples

T0 = time.time()
LORA_R, LORA_DROPOUT = 16, 0.05  # the H200 rows' adapter: r=16, alpha 32, dropout 0.05, all linear layers


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


def shape_config(shape: str, vocab: int) -> dict:
    if shape == "tiny":
        return {**_memory.TINY_LLAMA, "vocab_size": vocab}
    path = ROOT / "recipes" / "configs" / f"{shape}.json"
    if not path.is_file():
        known = sorted(p.stem for p in (ROOT / "recipes" / "configs").glob("*.json"))
        raise SystemExit(f"no shape {shape!r}: use tiny or one of {', '.join(known)} (recipes/configs).")
    cfg = json.loads(path.read_text())
    return {k: v for k, v in cfg.items() if k not in ("architectures", "torch_dtype", "dtype", "model_type")}


def build_model(out: Path, tok_dir: Path, shape: str) -> tuple[Path, dict]:
    """Random bf16 weights in ``shape``, made on the GPU (seconds for 8B), saved as safetensors."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    cfg = shape_config(shape, len(tok))
    cfg.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, max_position_embeddings=8192)
    if cfg.get("vocab_size", 0) < len(tok):
        cfg["vocab_size"] = len(tok)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(dev):
        torch.set_default_dtype(torch.bfloat16)
        model = LlamaForCausalLM(LlamaConfig(**cfg))
        torch.set_default_dtype(torch.float32)
    model.save_pretrained(str(out), max_shard_size="5GB")
    tok.save_pretrained(str(out))
    n = sum(p.numel() for p in model.parameters())
    del model
    if dev == "cuda":
        torch.cuda.empty_cache()
    log(f"random {shape} ({n / 1e9:.2f}B parameters) built on {dev} and saved")
    return out, cfg


def recipe(home: Path, model_id: str, dataset: Path, mb: int, seq: int, ckpt: bool, cuda: bool) -> Path:
    return _memory.probe_recipe(home, model_id, dataset, mb, seq, ckpt, "bfloat16", steps=6, r=LORA_R,
                                dropout=LORA_DROPOUT, optimizer="paged_adamw_8bit" if cuda else "adamw_torch")


def knobs(mb: int, seq: int, ckpt: bool, cuda: bool, lm_head: str = "auto") -> dict:
    return {"quant": "nf4", "double_quant": True, "compute_dtype": "bfloat16", "lora_r": LORA_R,
            "lora_targets": "all-linear", "micro_batch": mb, "grad_accum": 1, "seq_len": seq, "grad_ckpt": ckpt,
            "optimizer": "paged_adamw_8bit" if cuda else "adamw_torch", "packing": True, "lm_head": lm_head}


def appliance_row(home: Path, model_id: str, dataset: Path, mb: int, seq: int, ckpt: bool, cuda: bool) -> dict:
    path = recipe(home, model_id, dataset, mb, seq, ckpt, cuda)
    plan = _memory.cli(home, "plan", str(path))
    run = _memory.cli(home, "train", str(path))
    s = run.get("summary") or {}
    events = home / "runs" / run["id"] / "events.jsonl"
    rates = [e["data"]["tokens_per_s"] for e in map(json.loads, events.read_text().splitlines())
             if e.get("type") == "progress" and e["data"].get("step", 0) > 2 and "tokens_per_s" in e["data"]]
    return {"runner": "appliance", "state": run.get("state"), "error": run.get("error"),
            "planned_then_gib": plan["devices"][0]["estimate"] / 2**30, "verdict": plan["verdict"],
            "tokens_per_s": statistics.mean(rates) if rates else None,
            "peak_allocated_gib": s.get("peak_cuda_allocated_bytes", 0) / 2**30,
            "peak_reserved_gib": s.get("peak_cuda_reserved_bytes", 0) / 2**30,
            "cuda_context_gib": s["cuda_context_bytes"] / 2**30 if "cuda_context_bytes" in s else None,
            "peak_rss_gib": s.get("peak_rss_bytes", 0) / 2**30}


def plain_row(home: Path, model_id: str, dataset: Path, mb: int, seq: int, ckpt: bool, cuda: bool) -> dict:
    """bench/train_throughput.py's plain loop, in its own process, on the same recipe."""
    path = recipe(home, model_id, dataset, mb, seq, ckpt, cuda)
    done = subprocess.run([sys.executable, str(HERE / "train_throughput.py"), "--plain", str(path), "--steps", "6"],
                          capture_output=True, text=True, env={**os.environ, "APPLIANCE_HOME": str(home)},
                          timeout=1800)
    if done.returncode != 0:
        return {"runner": "plain", "state": "failed", "error": done.stderr[-1500:]}
    r = json.loads(done.stdout.strip().splitlines()[-1])
    return {"runner": "plain", "state": "finished", "tokens_per_s": r["tokens_per_s"],
            "peak_reserved_gib": r["peak_bytes"] / 2**30}


def conditions(shape: str) -> dict:
    import torch

    out = {"shape": shape, "when": time.strftime("%Y-%m-%d"), "python": sys.version.split()[0],
           "torch": torch.__version__}
    for name in ("transformers", "peft", "trl", "bitsandbytes", "liger_kernel", "flash_attn"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - not installed: recorded as absent
            out[name] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out["gpu"] = f"{p.name} ({p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor})"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-3.1-8b-instruct", help="tiny, or a recipes/configs/<name>.json")
    ap.add_argument("--tokenizer", required=True, help="a tokenizer folder (bench/gpu-kit.sh saves SmolLM2's)")
    ap.add_argument("--measured", default=str(HERE / "gpu_measured.json"), help="the file rows are appended to")
    ap.add_argument("--configs", default="4x2048:on,1x2048:on,2x1024:off",
                    help="micro-batch x sequence length : checkpointing, comma-separated")
    ap.add_argument("--deadline", type=float, default=420, help="seconds; a configuration is skipped past it")
    ap.add_argument("--work", default="/tmp/appliance-gpu-probe")
    args = ap.parse_args()
    import torch

    cuda = torch.cuda.is_available()
    shape = args.shape if cuda else "tiny"
    if not cuda:
        log("no CUDA: a rehearsal on the tiny shape; nothing is appended to the measured file")
    work = Path(args.work)
    home = work / "home"
    _memory.workspace(home)
    data = _memory.long_examples(work / "long", words=3000, train=64)
    src, cfg = build_model(work / f"{shape}-src", Path(args.tokenizer), shape)
    _memory.cli(home, "models", "import", str(src), "--name", shape)
    import shutil

    shutil.rmtree(src)  # the workspace holds its own copy
    cond = conditions(shape)
    measured = Path(args.measured)
    configs = [(int(c.split("x")[0]), int(c.split("x")[1].split(":")[0]), c.endswith(":on"))
               for c in args.configs.split(",")]
    for i, (mb, seq, ckpt) in enumerate(configs):
        if time.time() - T0 > args.deadline:
            log(f"deadline: skipping {mb}x{seq}")
            break
        for runner in ("appliance", "plain") if i == 0 else ("appliance",):
            make = appliance_row if runner == "appliance" else plain_row
            try:
                row = make(home, shape, data, mb, seq, ckpt, cuda)
            except Exception as e:  # noqa: BLE001 - a failed row is recorded and the probe goes on
                row = {"runner": runner, "state": "failed", "error": str(e)[-1500:]}
            row = {"label": f"{runner}, {shape}, micro-batch {mb}, seq {seq}, checkpointing {'on' if ckpt else 'off'}",
                   "model": shape, "config": {k: v for k, v in cfg.items() if not k.endswith("token_id")},
                   "knobs": knobs(mb, seq, ckpt, cuda, "full" if runner == "plain" else "auto"),
                   "context_measured": row.get("cuda_context_gib") is not None, "conditions": cond, **row}
            log(json.dumps({k: row.get(k) for k in ("label", "state", "planned_then_gib", "peak_reserved_gib",
                                                    "cuda_context_gib", "tokens_per_s", "error")}, default=str))
            if cuda and row.get("state") == "finished":
                doc = json.loads(measured.read_text()) if measured.is_file() else {"conditions": {}, "rows": []}
                if row["cuda_context_gib"] is None:
                    row["cuda_context_gib"] = 1.5  # NVML gave no per-process figure: the H200 estimate
                doc["rows"].append(row)
                tmp = measured.with_suffix(".tmp")
                tmp.write_text(json.dumps(doc, indent=1))
                tmp.replace(measured)
    log("done")


if __name__ == "__main__":
    main()
