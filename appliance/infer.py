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
from .native_crash import step

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
        from .convert import base_gguf

        return base_gguf(model)
    raise NotFound(f"{model!r} is neither a .gguf file, a run id nor a model id; "
                   "`appliance runs list` and `appliance models list` show what exists.")


@contextlib.contextmanager
def load(path: Path, n_ctx: int = 2048, threads: int | None = None, logits_all: bool = False,
         lora: Path | None = None) -> Iterator:
    """Open a GGUF with llama.cpp (with a GGUF LoRA adapter applied, if given); always closed explicitly (its
    destructor can raise at interpreter exit)."""
    from .llama_runtime import lib

    llama_cpp = lib()

    if not path.is_file():
        raise NotFound(f"{path} does not exist.")
    try:
        with step(f"loading {path.name} with llama.cpp"):
            llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads or os.cpu_count(),
                                  logits_all=logits_all, verbose=False, lora_path=str(lora) if lora else None)
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
    from .llama_runtime import lib as _lib

    lib = _lib()
    return bool(lib.llama_vocab_is_eog(lib.llama_model_get_vocab(llm.model), token))


# The sampling defaults: what `appliance ask` and `appliance chat` have always used (llama.cpp's own for min_p).
TOP_P, TOP_K, MIN_P, REPEAT_PENALTY = 0.95, 40, 0.05, 1.0
MAX_SEED = 2**32 - 2  # llama.cpp's seeds are 32-bit; 0xFFFFFFFF means "random"


def check_sampling(*, max_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
                   top_k: int | None = None, min_p: float | None = None, repeat_penalty: float | None = None,
                   seed: int | None = None) -> None:
    """Refuse a sampling setting out of range with one sentence naming it (None: not given, not checked)."""
    import math

    def bad(name: str, value, rule: str) -> InvalidInput:
        return InvalidInput(f"{name} must be {rule}; got {value!r}.")

    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    def integer(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if max_tokens is not None and not (integer(max_tokens) and max_tokens >= 1):
        raise bad("max tokens", max_tokens, "a whole number of at least 1")
    if temperature is not None and not (number(temperature) and temperature >= 0):
        raise bad("temperature", temperature, "a number of at least 0 (0 is greedy)")
    if top_p is not None and not (number(top_p) and 0 < top_p <= 1):
        raise bad("top-p", top_p, "a number above 0 and at most 1")
    if top_k is not None and not (integer(top_k) and top_k >= 0):
        raise bad("top-k", top_k, "a whole number of at least 0 (0 keeps every token)")
    if min_p is not None and not (number(min_p) and 0 <= min_p <= 1):
        raise bad("min-p", min_p, "a number from 0 to 1")
    if repeat_penalty is not None and not (number(repeat_penalty) and repeat_penalty > 0):
        raise bad("repeat penalty", repeat_penalty, "a number above 0 (1 is no penalty)")
    if seed is not None and not (integer(seed) and 0 <= seed <= MAX_SEED):
        raise bad("seed", seed, f"a whole number from 0 to {MAX_SEED}")


def generate(llm, prompt: list[int], max_tokens: int = 256, temperature: float = 0.0, seed: int = 0,
             on_text: Callable[[str], None] | None = None, *, top_p: float = TOP_P, top_k: int = TOP_K,
             min_p: float = MIN_P, repeat_penalty: float = REPEAT_PENALTY,
             should_stop: Callable[[], bool] | None = None) -> dict:
    """Sample until an end-of-generation token or max_tokens; stream decoded text to ``on_text``.

    Temperature 0 is greedy (top-p, top-k and min-p then change nothing); above 0, top-k, top-p and min-p filter
    the candidates in that order and ``seed`` makes the draw repeatable. ``should_stop`` is asked after each
    token (from this thread; another thread may flip what it reads): true ends the answer with ``"stopped":
    "user"``."""
    check_sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                   repeat_penalty=repeat_penalty, seed=seed)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pieces: list[str] = []
    n = 0
    stopped = "max_tokens"
    llm.set_seed(seed)
    started = time.perf_counter()
    first = None

    def emit(piece: str) -> None:
        if piece:
            pieces.append(piece)
            if on_text:
                on_text(piece)

    tokens = llm.generate(prompt, temp=temperature, top_k=top_k if temperature > 0 else 1, top_p=top_p,
                          min_p=min_p, repeat_penalty=repeat_penalty, reset=True)
    for token in _stepped(tokens, f"generating with llama.cpp from {Path(llm.model_path).name}"):
        if first is None:
            first = time.perf_counter()
        if is_eog(llm, token):
            stopped = "eog"
            break
        n += 1
        emit(decoder.decode(llm.detokenize([token])))
        if n >= max_tokens:
            break
        if should_stop is not None and should_stop():
            stopped = "user"
            break
    emit(decoder.decode(b"", final=True))
    ended = time.perf_counter()
    gen_s = ended - (first or ended)
    return {
        "text": "".join(pieces),
        "prompt_tokens": len(prompt),
        "completion_tokens": n,
        "stopped": stopped,
        "seconds": round(ended - started, 4),
        # The first token arrives after the prompt is processed; the rate counts the tokens after it.
        "tokens_per_s": round((n - 1) / gen_s, 2) if n > 1 and gen_s > 0 else None,
    }


def _stepped(tokens: Iterator[int], label: str) -> Iterator[int]:
    """The generator's native work (prompt decode, each token) named as a step, without holding the step
    across the caller's own work between tokens."""
    while True:
        with step(label):
            token = next(tokens, None)
        if token is None:
            return
        yield token


def ask(model: str, prompt: str, system: str | None = None, max_tokens: int = 256, temperature: float = 0.0,
        threads: int | None = None, on_text: Callable[[str], None] | None = None, *, top_p: float = TOP_P,
        top_k: int = TOP_K, min_p: float = MIN_P, repeat_penalty: float = REPEAT_PENALTY, seed: int = 0,
        should_stop: Callable[[], bool] | None = None) -> dict:
    sampling = {"top_p": top_p, "top_k": top_k, "min_p": min_p, "repeat_penalty": repeat_penalty}
    check_sampling(max_tokens=max_tokens, temperature=temperature, seed=seed, **sampling)  # before loading
    path = resolve(model)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    with load(path, threads=threads) as llm:
        result = generate(llm, tokenize(llm, render(llm, messages, True)), max_tokens, temperature, seed=seed,
                          on_text=on_text, should_stop=should_stop, **sampling)
    from .trust import audit

    audit.record("ask", {"model": str(path)}, {k: result[k] for k in ("prompt_tokens", "completion_tokens", "seconds")})
    return {"model": str(path), **result}


class Chat:
    """A multi-turn conversation with one GGUF; use as a context manager.

    The sampling settings are attributes, read at each turn: change them between turns. ``seed`` None draws
    each turn with its position in the conversation as the seed (repeatable, and different from turn to turn).
    ``reset()`` starts a new conversation (the system prompt stays). Leaving the context closes the model and
    records a ``chat`` audit entry with the turns it answered."""

    def __init__(self, model: str, system: str | None = None, max_tokens: int = 512, temperature: float = 0.7, *,
                 top_p: float = TOP_P, top_k: int = TOP_K, min_p: float = MIN_P,
                 repeat_penalty: float = REPEAT_PENALTY, seed: int | None = None, threads: int | None = None,
                 n_ctx: int = 4096):
        check_sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                       repeat_penalty=repeat_penalty, seed=seed)
        self.model_path = resolve(model)
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.max_tokens, self.temperature = max_tokens, temperature
        self.top_p, self.top_k, self.min_p, self.repeat_penalty, self.seed = top_p, top_k, min_p, repeat_penalty, seed
        self.turns = 0  # answered by this model since it was opened (across reset())
        self._cm = load(self.model_path, n_ctx=n_ctx, threads=threads)
        self.llm = None

    def __enter__(self) -> "Chat":
        self.llm = self._cm.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._cm.__exit__(*exc)
        self.llm = None
        from .trust import audit

        audit.record("chat", {"model": str(self.model_path)}, {"turns": self.turns})

    @property
    def system(self) -> str | None:
        return self.messages[0]["content"] if self.messages and self.messages[0]["role"] == "system" else None

    @system.setter
    def system(self, text: str | None) -> None:
        """The system prompt from the next turn on (the turns before keep the answers they got)."""
        if self.system is not None:
            self.messages.pop(0)
        if text:
            self.messages.insert(0, {"role": "system", "content": text})

    def reset(self) -> None:
        """A new conversation with the same model, system prompt and settings."""
        self.messages = self.messages[:1] if self.system is not None else []

    def say(self, text: str, on_text: Callable[[str], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> dict:
        """Answer one user turn. A stopped answer stays in the conversation as far as it went."""
        messages = [*self.messages, {"role": "user", "content": text}]
        prompt = tokenize(self.llm, render(self.llm, messages, True))
        if len(prompt) + self.max_tokens > self.llm.n_ctx():
            raise InvalidInput(f"the conversation ({len(prompt)} tokens) and max tokens ({self.max_tokens}) no longer "
                               f"fit the {self.llm.n_ctx()}-token context; start a new chat.")
        seed = len(messages) if self.seed is None else self.seed
        result = generate(self.llm, prompt, self.max_tokens, self.temperature, seed=seed, on_text=on_text,
                          top_p=self.top_p, top_k=self.top_k, min_p=self.min_p, repeat_penalty=self.repeat_penalty,
                          should_stop=should_stop)
        self.messages = [*messages, {"role": "assistant", "content": result["text"]}]
        self.turns += 1
        return result
