"""What the command line prints and how it ends, whatever the input: control characters never reach the
terminal, a closed pipe (`| head`) ends the program quietly, a Ctrl-C during the final save waits for it.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import threading

# C0 and C1 control characters, DEL, and the bidirectional overrides that can reorder what a terminal shows.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_JSON_UNSAFE = re.compile("[\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def clean(text) -> str:
    """`text` fit to echo on a terminal: control characters removed, unencodable characters escaped."""
    text = _CONTROL.sub("", str(text))
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def clean_line(text) -> str:
    """One line: whitespace (newlines, tabs) collapsed to single spaces, then clean()."""
    return clean(" ".join(str(text).split()))


def json_safe(text: str) -> str:
    """JSON text from json.dumps(ensure_ascii=False) with DEL, C1 controls, bidi overrides and lone
    surrogates written as \\uXXXX escapes: still the same JSON, but harmless on a terminal and encodable."""
    return _JSON_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def bad_argument(argv) -> str | None:
    """A reason when an argument cannot be a path or a value at all (an embedded NUL byte), else None."""
    for arg in argv:
        if "\x00" in str(arg):
            return f"the argument {clean(repr(arg))} holds a NUL character, which no file name or value can contain"
    return None


def quiet_broken_pipe() -> None:
    """After a BrokenPipeError: point stdout at /dev/null so that Python's final flush is silent too."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def write_err(line: str) -> None:
    """Print one line on stderr; a closed stderr is ignored (there is no one left to tell)."""
    try:
        print(line, file=sys.stderr, flush=True)
    except (BrokenPipeError, OSError, ValueError):
        pass


@contextlib.contextmanager
def interrupts_deferred(message: str = "saving what was finished; please wait", restore: bool = True):
    """While inside, Ctrl-C does not stop the program: it prints `message` once and is otherwise ignored
    (used around the final save, which must not be cut short by an impatient second or third Ctrl-C).
    With restore=False Ctrl-C stays ignored afterwards: the program is about to end with nothing left to stop."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    told = []

    def handler(signum, frame):
        if not told:
            told.append(True)
            with contextlib.suppress(OSError, ValueError):
                os.write(sys.stderr.fileno(), f"\n{message}\n".encode())

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        # restore=False: ignore Ctrl-C at the C level, which also covers the interpreter's own shutdown
        signal.signal(signal.SIGINT, previous if restore else signal.SIG_IGN)
