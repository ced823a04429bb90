"""The edge bundle: one quantized GGUF with everything an edge box needs to run it and to check where it came from.

``appliance bundle RUN --out DIR`` writes (format in docs/provenance-format.md)::

    model-<quant>.gguf       the model
    chat_template.jinja      the GGUF's own chat template (the one training used, checked at export)
    generation.json          stop tokens, context length, the system prompt training used
    Modelfile                for Ollama: FROM, TEMPLATE (when the template family is known), SYSTEM, stop
    MODEL_CARD.md            base model, dataset ids and hashes (never content), recipe, evaluation, parity
    provenance/<sha256>.json every ancestor's signed manifest, named by its own sha256
    signing-key.pub          the appliance's public key
    serve.json               how `appliance serve DIR` serves it: the model file and its name (the run id);
                             with --adapter, the adapter file, its base model and the sha256 of the base GGUF
                             it must be served on (`serve BASE.gguf --adapter TENANT=DIR`)
    adapter-f16.gguf         with --adapter: the run's LoRA as a GGUF adapter (``export RUN --adapter``)
    manifest.json            the bundle's signed manifest (parents: the run's GGUF artifact, and its adapter GGUF)
    SHA256SUMS               every other file, in `sha256sum -c` format

``verify_bundle`` needs only this package: no vault, no workspace. It checks
SHA256SUMS (no file missing, changed or added), the signature of the bundle's
manifest and of every ancestor manifest, that each ancestor is the one its
child recorded, that the GGUF is byte for byte the one the export checked, and
that chat_template.jinja is the GGUF's own template (and that a bundled adapter is the one its export
checked).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from . import hardware
from .errors import CheckFailed, InvalidInput, NotFound
from .events import Emit, Event, ignore
from .trust import keys, manifest, signing

STAGE = "bundle"
SUMS = "SHA256SUMS"
PUBKEY = "signing-key.pub"


def pick_quant(run_id: str, max_bytes: int | None) -> tuple[str, str]:
    """``--quant auto``: the exported quantization closest to f16 (lowest KL divergence on the test split) whose
    file fits ``max_bytes``; returns it and why."""
    from . import runs
    from .evaluate.quants import best_fit
    from .workspace import read_json

    path = runs.run_dir(run_id) / "export.json"
    quality = (read_json(path) if path.is_file() else {}).get("quality", {}).get("by_quant")
    if not quality:
        raise InvalidInput(f"run {run_id} has no measured quality per quantization; run `appliance export {run_id}` "
                           "(it measures every file it writes), then bundle with --quant auto.")
    pick = best_fit(quality, max_bytes)
    if pick is None:
        smallest = min(quality, key=lambda q: quality[q]["bytes"])
        raise InvalidInput(f"no exported quantization of run {run_id} fits in {max_bytes / 2**20:.0f} MiB: the smallest, "
                           f"{smallest}, is {quality[smallest]['bytes'] / 2**20:.0f} MiB; export a smaller one "
                           f"(`appliance export {run_id} --quant q4_0`) or allow a larger --max-size.")
    q = quality[pick]
    limit = f"within {max_bytes / 2**20:.0f} MiB" if max_bytes else "with no size limit"
    return pick, (f"{pick}: the lowest KL divergence from f16 ({q['kl_divergence']:.4f}, perplexity "
                  f"{q['perplexity']:.3f}) {limit} ({q['bytes'] / 2**20:.0f} MiB)")


def create(run_id: str, out: Path, quant: str = "q4_k_m", emit: Emit = ignore, checkpoint: str = "best",
           max_size: int | None = None, adapter: bool = False) -> dict:
    """``quant="auto"`` picks by measured quality within ``max_size`` bytes (``pick_quant``); ``adapter`` adds the
    run's GGUF adapter (one base on the edge box then serves several tenants' adapters)."""
    from . import runs
    from .trust import audit, provenance
    from .workspace import read_json, staging

    out = Path(out).expanduser()
    if out.exists():
        raise InvalidInput(f"{out} already exists; name a new folder for the bundle.")
    reason = None
    if quant == "auto":
        quant, reason = pick_quant(run_id, max_size)
        emit(Event("stage", STAGE, f"--quant auto: {reason}"))
    elif max_size is not None:
        raise InvalidInput("--max-size chooses among quantizations; use it with --quant auto.")
    run = runs.run_dir(run_id)
    gguf_dir = run / "gguf"
    gguf = gguf_dir / f"model-{quant}.gguf"
    if not gguf.is_file():
        raise NotFound(f"run {run_id} has no {quant} GGUF; make it with `appliance export {run_id} --quant {quant}`.")
    source = runs.adapter(run_id, checkpoint)
    exported = read_json(run / "export.json") if (run / "export.json").is_file() else {}
    if exported.get("step", source["step"]) != source["step"]:
        raise InvalidInput(f"run {run_id}'s GGUF was exported from step {exported['step']}, not the requested "
                           f"{source['label']}; run `appliance export {run_id} --checkpoint {checkpoint}` first, or "
                           f"bundle with --checkpoint {exported['step']}.")
    keys.ensure_signer()
    emit(Event("stage", STAGE, f"checking {gguf_dir} and its lineage"))
    check = provenance.verify(gguf)
    if not check["ok"]:
        bad = next(i for i in check["lineage"] if i["status"] == "bad")
        raise CheckFailed(f"refusing to bundle: {bad['problem']}")
    recipe = runs.load_recipe(run_id)
    lineage = list(check["lineage"])
    parents = {"gguf": f"{run_id}/gguf"}
    serve = {"format": 1, "engine": "llama-server", "model": {"name": run_id, "file": gguf.name}}
    adapter_file = None
    if adapter:
        from .convert import base_gguf
        from .export import ADAPTER_DIR, ADAPTER_FILE

        adapter_file = run / ADAPTER_DIR / ADAPTER_FILE
        if not adapter_file.is_file():
            raise NotFound(f"run {run_id} has no adapter GGUF; run `appliance export {run_id} --adapter` first.")
        made = manifest.read(adapter_file.parent)["details"]
        if made.get("step") != source["step"]:
            raise InvalidInput(f"run {run_id}'s adapter GGUF is from step {made.get('step')}, not the bundled "
                               f"{source['label']}; run `appliance export {run_id} --adapter --checkpoint "
                               f"{checkpoint}` first.")
        adapter_check = provenance.verify(adapter_file)
        if not adapter_check["ok"]:
            bad = next(i for i in adapter_check["lineage"] if i["status"] == "bad")
            raise CheckFailed(f"refusing to bundle the adapter: {bad['problem']}")
        lineage += adapter_check["lineage"]
        parents["adapter_gguf"] = f"{run_id}/{ADAPTER_DIR}"
        emit(Event("stage", STAGE, f"hashing {recipe.base_model}'s f16 GGUF, the base the adapter is served on"))
        serve["adapter"] = {"name": run_id, "file": ADAPTER_FILE, "base_model": recipe.base_model,
                            "base_gguf_sha256": manifest.sha256_file(base_gguf(recipe.base_model))}
    gguf_manifest = manifest.read(gguf_dir)
    meta = gguf_metadata(gguf)
    template = meta.get("tokenizer.chat_template")
    if not template:
        raise CheckFailed(f"{gguf} carries no chat template; re-export the run with the appliance.")
    parity = gguf_manifest["details"].get("parity", {})
    stops = sorted({t for t in (parity.get("eot_token"), meta.get("eos_token")) if t})
    system = recipe.system_prompt or _default_system(template)
    generation = {"stop": stops, "context_length": meta.get("context_length"), "system_prompt": system,
                  "template_family": _family(template), "quant": quant}

    out.parent.mkdir(parents=True, exist_ok=True)
    with staging(out) as tmp:
        emit(Event("stage", STAGE, f"copying {gguf.name} ({gguf.stat().st_size / 2**20:.0f} MiB)"))
        shutil.copyfile(gguf, tmp / gguf.name)
        if adapter_file is not None:
            shutil.copyfile(adapter_file, tmp / adapter_file.name)
        (tmp / "serve.json").write_text(json.dumps(serve, indent=2) + "\n")
        (tmp / "chat_template.jinja").write_text(template, encoding="utf-8")
        (tmp / "generation.json").write_text(json.dumps(generation, indent=2) + "\n")
        (tmp / "Modelfile").write_text(_modelfile(gguf.name, template, system, stops))
        (tmp / "MODEL_CARD.md").write_text(_model_card(run_id, recipe, gguf_manifest, check, generation,
                                                       read_json(run / "eval.json") if (run / "eval.json").is_file() else None))
        prov = tmp / "provenance"
        prov.mkdir()
        for item in lineage:
            if item["status"] == "ok":
                src = Path(item["path"]) / manifest.NAME
                shutil.copyfile(src, prov / f"{manifest.sha256_file(src)}.json")
        signing.export_public(signing.workspace_public(), tmp / PUBKEY)
        m = manifest.write(tmp, "bundle", f"{run_id}/bundle-{quant}", parents=parents,
                           quant=quant, model_file=gguf.name, run=run_id, base_model=recipe.base_model,
                           hardware=hardware.summary())
        _write_sums(tmp, m["files"])
    audit.record("bundle", {"run": run_id}, {"out": str(out.resolve()), "quant": quant,
                                             "manifest_sha256": manifest.sha256_file(out / manifest.NAME)})
    result = {"path": str(out), "files": sorted(p.name for p in out.iterdir()), "key": m["signature"]["key"],
              "model": gguf.name, "bytes": (out / gguf.name).stat().st_size, "quant": quant,
              **({"adapter": serve["adapter"]} if adapter else {}),
              **({"chosen_because": reason} if reason else {})}
    emit(Event("finished", STAGE, f"bundle written to {out}", result))
    return result


def verify_bundle(folder: Path, public_raw: bytes | None = None, fingerprint: str | None = None) -> dict:
    """Check a bundle anywhere (no vault or workspace needed); raise CheckFailed naming the first problem.

    ``public_raw`` is the trusted key, or ``fingerprint`` its sha256 (64 hex digits, as `bundle` prints it),
    which the bundle's own key must match; without either the bundle's own key is used and ``trusted`` is False
    in the result (the signatures then prove integrity and consistency, not origin: compare the fingerprint).
    """
    folder = Path(folder).expanduser()
    if not (folder / SUMS).is_file() or not (folder / manifest.NAME).is_file():
        raise InvalidInput(f"{folder} is not an appliance bundle (no {SUMS} or {manifest.NAME}).")
    if public_raw is not None and fingerprint:
        raise InvalidInput("give a trusted public key or its fingerprint, not both.")
    _check_sums(folder)
    bundled = signing.load_public(folder / PUBKEY)
    if fingerprint:
        wanted = signing.as_fingerprint(fingerprint)
        if wanted is None:
            raise InvalidInput(f"the fingerprint {fingerprint.strip()[:70]!r} is not 64 hex digits; copy it as "
                               "`appliance bundle` printed it.")
        if signing.fingerprint(bundled) != wanted:
            raise CheckFailed(f"the bundle's key {signing.fingerprint(bundled)[:16]}... is not the trusted "
                              f"fingerprint {wanted[:16]}...; do not use this bundle.")
        public_raw = bundled
    trusted = public_raw is not None
    if trusted and public_raw != bundled:
        raise CheckFailed(f"{folder / PUBKEY} is not the trusted key: the bundle was signed by "
                          f"{signing.fingerprint(bundled)[:16]}..., not {signing.fingerprint(public_raw)[:16]}...")
    key = public_raw or bundled
    top = _verify_manifest(folder / manifest.NAME, key)
    lineage = [{"kind": top["kind"], "id": top["id"], "status": "ok"}]
    gguf_manifest = adapter_manifest = None
    queue = [top]
    while queue:
        node = queue.pop(0)
        for role, digest in sorted(node.get("parent_manifests", {}).items()):
            path = folder / "provenance" / f"{digest}.json"
            if not path.is_file():
                lineage.append({"kind": role, "id": node["parents"].get(role), "status": "absent"})
                continue
            if manifest.sha256_file(path) != digest:  # also covered by SHA256SUMS; checked here for clarity
                raise CheckFailed(f"{path} does not match the hash its child recorded.")
            parent = _verify_manifest(path, key)
            if parent.get("id") != node["parents"].get(role):
                raise CheckFailed(f"{path} is {parent.get('id')}, not the {role} {node['parents'].get(role)} its child names.")
            if any(item["id"] == parent["id"] and item["kind"] == parent["kind"] for item in lineage):
                continue
            lineage.append({"kind": parent["kind"], "id": parent["id"], "status": "ok"})
            if parent["kind"] == "gguf" and gguf_manifest is None:
                gguf_manifest = parent
            if parent["kind"] == "adapter-gguf":
                adapter_manifest = parent
            queue.append(parent)
    model_file = top["details"].get("model_file")
    if gguf_manifest is None or model_file not in gguf_manifest["files"]:
        raise CheckFailed(f"{folder} carries no signed export manifest listing {model_file}; its origin cannot be shown.")
    if manifest.sha256_file(folder / model_file) != gguf_manifest["files"][model_file]:
        raise CheckFailed(f"{folder / model_file} is not the file the appliance exported and checked.")
    template = gguf_metadata(folder / model_file).get("tokenizer.chat_template")
    if template != (folder / "chat_template.jinja").read_text(encoding="utf-8"):
        raise CheckFailed(f"{folder / 'chat_template.jinja'} differs from the template inside {model_file}.")
    served = json.loads((folder / "serve.json").read_text()) if (folder / "serve.json").is_file() else {}
    adapter = served.get("adapter")
    if adapter:
        name = adapter.get("file")
        if adapter_manifest is None or name not in adapter_manifest["files"]:
            raise CheckFailed(f"{folder} carries no signed adapter manifest listing {name}; its origin cannot be shown.")
        if manifest.sha256_file(folder / name) != adapter_manifest["files"][name]:
            raise CheckFailed(f"{folder / name} is not the adapter the appliance exported and checked.")
    dataset = next((m for m in lineage if m["kind"] == "dataset"), None)
    return {"ok": True, "adapter": adapter.get("file") if adapter else None, "bundle": str(folder), "key": signing.fingerprint(key), "trusted_key": trusted,
            "model": model_file, "lineage": lineage, "dataset": dataset["id"] if dataset else None}


def gguf_metadata(path: Path) -> dict:
    """The few GGUF metadata values a bundle needs, read with the gguf package (no model load)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # the reader raises assorted errors on a damaged file
        raise CheckFailed(f"{path} is not a readable GGUF file ({type(e).__name__}).") from None

    def value(key: str):
        field = reader.fields.get(key)
        if field is None or not field.data:
            return None
        part = field.parts[field.data[0]]
        return bytes(part).decode("utf-8") if field.types and field.types[0].name == "STRING" else part.tolist()[0]

    tokens = reader.fields.get("tokenizer.ggml.tokens")

    def token(key: str):
        idx = value(key)
        return bytes(tokens.parts[tokens.data[idx]]).decode("utf-8") if tokens is not None and idx is not None else None

    arch = value("general.architecture")
    return {"tokenizer.chat_template": value("tokenizer.chat_template"), "eos_token": token("tokenizer.ggml.eos_token_id"),
            "context_length": value(f"{arch}.context_length") if arch else None, "architecture": arch}


def _verify_manifest(path: Path, key: bytes) -> dict:
    try:
        m = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise CheckFailed(f"{path} is not valid JSON.") from None
    manifest.check_signature(m, key, path)
    return m


def _write_sums(folder: Path, hashes: dict[str, str]) -> None:
    """SHA256SUMS from the hashes the bundle's manifest just computed (the GGUF is not read again) and the
    manifest's own."""
    hashes = {**hashes, manifest.NAME: manifest.sha256_file(folder / manifest.NAME)}
    (folder / SUMS).write_text("".join(f"{hashes[name]}  {name}\n" for name in sorted(hashes)))


def _check_sums(folder: Path) -> None:
    listed: dict[str, str] = {}
    for lineno, line in enumerate((folder / SUMS).read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64 or not name or name.startswith("/") or ".." in name.split("/"):
            raise CheckFailed(f"{folder / SUMS}:{lineno}: not a `sha256  file` line; the checksum list was edited.")
        listed[name] = digest
    present = set(manifest.files_in(folder, skip=SUMS))
    for name in sorted(set(listed) - present):
        raise CheckFailed(f"{folder / name} is listed in {SUMS} but missing.")
    for name in sorted(present - set(listed)):
        raise CheckFailed(f"{folder / name} is not listed in {SUMS}; a file was added to the bundle.")
    for name, digest in sorted(listed.items()):
        if manifest.sha256_file(folder / name) != digest:
            raise CheckFailed(f"{folder / name} does not match its sha256 in {SUMS}; the file was changed or damaged.")


def _family(template: str) -> str:
    if "<|im_start|>" in template:
        return "chatml"
    if "<|start_header_id|>" in template:
        return "llama3"
    return "other"


def _default_system(template: str) -> str | None:
    """The system prompt the template adds when a conversation has none (SmolLM2's does), so Ollama matches."""
    import jinja2

    try:
        text = jinja2.Environment().from_string(template).render(
            messages=[{"role": "user", "content": "\x00"}], add_generation_prompt=True, bos_token="", eos_token="")
    except jinja2.TemplateError:
        return None
    if _family(template) == "chatml" and text.startswith("<|im_start|>system\n"):
        return text[len("<|im_start|>system\n"):].split("<|im_end|>", 1)[0]
    return None


_GO_TEMPLATES = {
    "chatml": ('{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
               '<|im_start|>assistant\n'),
    "llama3": ('<|begin_of_text|>{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n'
               '{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n'),
}


def _modelfile(model_file: str, template: str, system: str | None, stops: list[str]) -> str:
    lines = ["# Ollama: `ollama create NAME -f Modelfile` in this folder. The chat template the model was",
             "# trained with is chat_template.jinja (also inside the GGUF).", f"FROM ./{model_file}"]
    family = _family(template)
    if family in _GO_TEMPLATES:
        lines.append(f'TEMPLATE """{_GO_TEMPLATES[family]}"""')
    else:
        lines.append("# TEMPLATE: not translated (unknown family); Ollama reads the GGUF's own template.")
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines.append("PARAMETER temperature 0")
    return "\n".join(lines) + "\n"


def _model_card(run_id, recipe, gguf_manifest, check, generation, evaluation) -> str:
    def items(kind):  # every one: a mix has several datasets, a DPO run two runs
        return [i for i in check["lineage"] if i["kind"] == kind and i["status"] == "ok"]

    out = [f"# {recipe.name}: fine-tuned {recipe.base_model}", "",
           f"Made by the offline fine-tuning appliance from run `{run_id}`.", "", "## Lineage", ""]
    for kind in ("model", "dataset", "run", "adapter", "checkpoint", "full-model", "merged-model", "gguf"):
        for found in items(kind):
            m = manifest.read(Path(found["path"]))
            digest = manifest.sha256_file(Path(found["path"]) / manifest.NAME)
            extra = ""
            if kind == "dataset":
                d = m["details"]
                extra = (f"; records {d.get('records')}; source file sha256 {d.get('source_sha256', '-')}"
                         f" (ciphertext file hashes in its manifest)")
            if kind == "model":
                extra = f"; source sha256 {m['details'].get('source', {}).get('sha256', '-')}"
            out.append(f"- {kind} `{found['id']}`: manifest sha256 `{digest}`{extra}")
    out += ["", "No dataset content is included in this bundle.", "", "## Recipe", "", "```json",
            json.dumps(recipe.model_dump(mode="json"), indent=2, sort_keys=True), "```", "",
            "## Export checks", ""]
    parity = gguf_manifest["details"].get("parity", {})
    out.append(f"- chat template: identical tokens on {parity.get('template_conversations')} held-out conversations "
               f"through llama.cpp; end-of-turn token `{parity.get('eot_token')}` stops generation")
    for q, rate in sorted(gguf_manifest["details"].get("top1_agreement", {}).items()):
        out.append(f"- {q}: top-1 token agreement with the merged model {rate:.1%}")
    out += ["", f"## Evaluation ({(evaluation or {}).get('split', 'held-out')} split, base vs tuned, 95% intervals)", ""]
    if evaluation:
        out.append("```json")
        out.append(json.dumps({k: evaluation[k] for k in ("base", "tuned", "intervals", "differences", "forgetting",
                                                          "judge", "reviews") if k in evaluation},
                              indent=2, sort_keys=True, default=str))
        out.append("```")
    else:
        out.append(f"Not evaluated: `appliance eval {run_id}` before bundling records it here.")
    out += ["", "## Running it", "", f"- llama.cpp: `llama-cli -m model-{generation['quant']}.gguf -cnv` "
            "(the GGUF carries its chat template)",
            "- Ollama: `ollama create NAME -f Modelfile`",
            f"- stop tokens: {', '.join(generation['stop'])}", ""]
    return "\n".join(out)
