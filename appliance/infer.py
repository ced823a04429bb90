"""Answers from a GGUF through llama.cpp (llama-cpp-python): ask, chat, and the helpers export uses.

The prompt is always rendered with the chat template stored in the GGUF itself
and tokenized by llama.cpp, and generation ends at the model's end-of-generation
tokens, so what runs here is what runs on an edge box with plain llama.cpp.

MODEL may be a run id (its exported GGUF), a model id (its base GGUF, converted
on first use) or a path to a .gguf file.
"""

from __future__ import annotations

import codecs
import contextlib
import os
import time
from pathlib import Path
from typing import Callable, Iterator

from .errors import InvalidInput, NotFound

PREFERRED = ("q8_0", "f16", "q4_k_m", "q5_k_m", "bf16", "q4_0")


def resolve(model: str) -> Path:
    """A run id, a model id or a .gguf path -> the GGUF file to load."""
    from .workspace import folder

    path = Path(model).expanduser()
    if model.endswith(".gguf") or path.is_file():
        if not path.is_file():
            raise NotFound(f"{path} does not exist; give a .gguf file, a run id or a model id.")
        return path
    run = folder("runs") / model
    if (run / "run.json").is_file():
        for quant in PREFERRED:
            candidate = run / "gguf" / f"model-{quant}.gguf"
            if candidate.is_file():
                return candidate
        raise NotFound(f"run {model} has no GGUF yet; run `appliance export {model}` first.")
    if (folder("models") / model / "manifest.json").is_file():
        from .export import base_gguf

        return base_gguf(model)
    raise NotFound(f"{model!r} is neither a .gguf file, a run id nor a model id; "
                   "`appliance runs list` and `appliance models list` show what exists.")


def llama_cpp():
    """Import llama_cpp with llama.cpp's own logging limited to errors (it logs every tensor otherwise)."""
    import logging

    import llama_cpp as lib

    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    return lib


@contextlib.contextmanager
def load(path: Path, n_ctx: int = 2048, threads: int | None = None, logits_all: bool = False) -> Iterator:
    """Open a GGUF with llama.cpp; always closed explicitly (its destructor can raise at interpreter exit)."""
    llama_cpp = globals()["llama_cpp"]()

    if not path.is_file():
        raise NotFound(f"{path} does not exist.")
    try:
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads or os.cpu_count(),
                              logits_all=logits_all, verbose=False)
    except ValueError as e:
        raise InvalidInput(f"llama.cpp cannot load {path} ({e}); the file is not a valid GGUF model.") from None
    try:
        yield llm
    finally:
        llm.close()


def chat_template(llm) -> str:
    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        raise InvalidInput("the GGUF carries no chat template (tokenizer.chat_template); export it with the appliance.")
    return template


def render(llm, messages: list[dict], add_generation_prompt: bool) -> str:
    """Render with the GGUF's own template, as llama-cpp-python's chat completion does."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    def token_text(key: str) -> str:
        tid = llm.metadata.get(key)
        return llm.detokenize([int(tid)], special=True).decode("utf-8", "replace") if tid is not None else ""

    formatter = Jinja2ChatFormatter(template=chat_template(llm), eos_token=token_text("tokenizer.ggml.eos_token_id"),
                                    bos_token=token_text("tokenizer.ggml.bos_token_id"),
                                    add_generation_prompt=add_generation_prompt)
    return formatter(messages=messages).prompt


def tokenize(llm, text: str) -> list[int]:
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)


def is_eog(llm, token: int) -> bool:
    lib = llama_cpp()
    return bool(lib.llama_vocab_is_eog(lib.llama_model_get_vocab(llm.model), token))


def generate(llm, prompt: list[int], max_tokens: int = 256, temperature: float = 0.0, seed: int = 0,
             on_text: Callable[[str], None] | None = None) -> dict:
    """Sample until an end-of-generation token or max_tokens; stream decoded text to ``on_text``."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pieces: list[str] = []
    n = 0
    stopped = False
    llm.set_seed(seed)
    started = time.perf_counter()
    first = None
    for token in llm.generate(prompt, temp=temperature, top_k=40 if temperature > 0 else 1, top_p=0.95,
                              repeat_penalty=1.0, reset=True):
        if first is None:
            first = time.perf_counter()
        if is_eog(llm, token):
            stopped = True
            break
        n += 1
        piece = decoder.decode(llm.detokenize([token]))
        if piece:
            pieces.append(piece)
            if on_text:
                on_text(piece)
        if n >= max_tokens:
            break
    tail = decoder.decode(b"", final=True)
    if tail:
        pieces.append(tail)
        if on_text:
            on_text(tail)
    ended = time.perf_counter()
    gen_s = ended - (first or ended)
    return {
        "text": "".join(pieces),
        "prompt_tokens": len(prompt),
        "completion_tokens": n,
        "stopped": "eog" if stopped else "max_tokens",
        "seconds": round(ended - started, 4),
        # The first token arrives after the prompt is processed; the rate counts the tokens after it.
        "tokens_per_s": round((n - 1) / gen_s, 2) if n > 1 and gen_s > 0 else None,
    }


def ask(model: str, prompt: str, system: str | None = None, max_tokens: int = 256, temperature: float = 0.0,
        threads: int | None = None, on_text: Callable[[str], None] | None = None) -> dict:
    path = resolve(model)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    with load(path, threads=threads) as llm:
        result = generate(llm, tokenize(llm, render(llm, messages, True)), max_tokens, temperature, on_text=on_text)
    from . import audit

    audit.record("ask", {"model": str(path)}, {k: result[k] for k in ("prompt_tokens", "completion_tokens", "seconds")})
    return {"model": str(path), **result}


class Chat:
    """A multi-turn conversation with one GGUF; use as a context manager."""

    def __init__(self, model: str, system: str | None = None, max_tokens: int = 512, temperature: float = 0.7):
        self.model_path = resolve(model)
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.max_tokens, self.temperature = max_tokens, temperature
        self._cm = load(self.model_path, n_ctx=4096)
        self.llm = None

    def __enter__(self) -> "Chat":
        self.llm = self._cm.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._cm.__exit__(*exc)
        from . import audit

        turns = sum(1 for m in self.messages if m["role"] == "user")
        audit.record("chat", {"model": str(self.model_path)}, {"turns": turns})

    def say(self, text: str, on_text: Callable[[str], None] | None = None) -> dict:
        self.messages.append({"role": "user", "content": text})
        prompt = tokenize(self.llm, render(self.llm, self.messages, True))
        if len(prompt) + self.max_tokens > self.llm.n_ctx():
            raise InvalidInput(f"the conversation ({len(prompt)} tokens) no longer fits the {self.llm.n_ctx()}-token context; start a new chat.")
        result = generate(self.llm, prompt, self.max_tokens, self.temperature, seed=len(self.messages), on_text=on_text)
        self.messages.append({"role": "assistant", "content": result["text"]})
        return result
