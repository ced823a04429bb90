"""A native crash never ends in silence: the step that died, named in one sentence with its signal.

llama.cpp (and torch) run native code in the appliance's own process; an illegal instruction or a segfault
there kills the process before Python can say anything (a build for another CPU died with SIGILL and an
empty stderr). So the commands that run llama.cpp in-process (ask, chat, export, eval, demo, the TUI) run
in a child that a small parent watches (``supervise``). Code about to enter native work names the step
(``with step("checking the top-1 agreement of model-q4_k_m.gguf with llama.cpp"):``); the label goes to a
page of memory shared with the parent, which reads it only once the child is dead, so naming a step costs
a memory copy and never blocks. When the child dies of a signal, the parent restores the terminal, prints
``error: appliance export died of SIGILL (illegal instruction) while <step>; <what to do>`` and exits with
128 + the signal's number; otherwise it exits with the child's own code.

Test-only fault injection: ``APPLIANCE_FAULT=native_crash:<text>`` raises SIGILL inside the first step
whose label contains <text>, a real signal through the real path.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Callable, Iterator

_PAGE = 4096
_shared = None  # the mmap shared with the supervising parent, in the supervised child only
_local = threading.local()
_last: list[str] = [""]  # the label written last, by whichever thread


def _write(label: str) -> None:
    _last[0] = label
    if _shared is not None:
        data = label.encode("utf-8", "replace")[: _PAGE - 4]
        _shared[4:4 + len(data)] = data
        _shared[0:4] = len(data).to_bytes(4, "little")


@contextlib.contextmanager
def step(label: str) -> Iterator[None]:
    """Name the native work inside this block (nested steps read outer: inner)."""
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(label)
    _write(": ".join(stack))
    _fault(label)
    try:
        yield
    finally:
        stack.pop()
        _write(": ".join(stack))


def _fault(label: str) -> None:
    fault = os.environ.get("APPLIANCE_FAULT", "")
    if fault.startswith("native_crash:") and fault.split(":", 1)[1] in label:
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file from a test
        signal.pthread_kill(threading.get_ident(), signal.SIGILL)


def supervise(command: str, run: Callable[[], int]) -> int:
    """Run ``run()`` in a watched child; return its exit code, or report its death by a signal."""
    global _shared
    import mmap

    shared = mmap.mmap(-1, _PAGE)  # MAP_SHARED | MAP_ANONYMOUS: the child's writes are the parent's reads
    tty = _terminal_state()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: the command itself; it dies with its parent
        _shared = shared
        _die_with_parent()
        raise SystemExit(run())
    forwarded = {s: signal.signal(s, lambda signum, _f: os.kill(pid, signum))
                 for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)}
    # Ctrl-C reaches the whole foreground group, the child included: the child decides what it means.
    forwarded[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _, status = os.waitpid(pid, 0)
    finally:
        for s, previous in forwarded.items():
            signal.signal(s, previous)
    if not os.WIFSIGNALED(status):
        return os.waitstatus_to_exitcode(status)
    sig = os.WTERMSIG(status)
    _restore_terminal(tty)
    size = int.from_bytes(shared[0:4], "little")
    where = shared[4:4 + size].decode("utf-8", "replace")
    print(f"error: {report(command, sig, where)}", file=sys.stderr, flush=True)
    return 128 + sig


def signal_text(sig: int) -> str:
    """``SIGILL (illegal instruction)``: a signal's name and what it means."""
    try:
        name = signal.Signals(sig).name
    except ValueError:
        name = f"signal {sig}"
    return f"{name} ({(signal.strsignal(sig) or 'unknown signal').lower()})"


def report(command: str, sig: int, where: str) -> str:
    """The one sentence for a command that died of signal ``sig`` during step ``where`` ("" if none named)."""
    what = f"appliance {command} died of {signal_text(sig)}"
    what += f" while {where}" if where else ""
    if sig == signal.SIGILL:
        advice = ("the native code used an instruction this CPU lacks: `appliance doctor` names the llama.cpp CPU "
                  "backend in use; run scripts/setup.sh to rebuild llama.cpp portably")
    elif sig == signal.SIGKILL:
        advice = "something killed it from outside, most often the kernel's out-of-memory killer (see `dmesg`)"
    elif sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        advice = "it was stopped from outside; run the command again"
    else:
        advice = ("a native library crashed: run `appliance doctor`, and report the step above with "
                  "the file it was working on")
    return f"{what}; {advice}."


def _die_with_parent() -> None:
    """PR_SET_PDEATHSIG: if the supervising parent is killed (kill -9), the command dies too, as it would
    without supervision."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(128 + signal.SIGKILL)


def _terminal_state():
    try:
        import termios

        return termios.tcgetattr(sys.stdin.fileno()) if sys.stdin.isatty() else None
    except (ImportError, OSError, ValueError):
        return None


def _restore_terminal(state) -> None:
    """A full-screen child (the TUI) that dies leaves the terminal raw, on the alternate screen, mouse on."""
    if state is None:
        return
    import termios

    with contextlib.suppress(OSError, ValueError):
        termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, state)
    if sys.stdout.isatty():  # what Textual's driver undoes when it stops (textual/drivers/linux_driver.py)
        sys.stdout.write("\x1b[?1000l\x1b[?1002l\x1b[?1003l\x1b[?1015l\x1b[?1006l\x1b[?1016l"  # mouse off
                         "\x1b[?2004l\x1b[?1004l\x1b[?2048l"  # bracketed paste, focus events, resize reports
                         "\x1b[?7h\x1b[<u\x1b[?25h\x1b[?1049l")  # line wrap on, keyboard protocol off, cursor
        sys.stdout.flush()
