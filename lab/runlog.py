"""While runs train, what libraries and background threads report goes to the run's ``run.log``, not the terminal.

On a disk that fills mid-run, orbax's saving threads and the logging handlers that write into the run directory
each print their traceback (hundreds of lines) before the lab's own one-line error. ``background_log(path)``
sends Python logging (absl, orbax, jax) and uncaught exceptions of background threads to ``path`` instead, and
stops a handler that cannot write (the disk is full) from printing a traceback of its own; the lab's one line on
the terminal says what happened and how to continue. ``LAB_DEBUG=1`` (``lab --debug``) leaves the terminal as
it is. After a failed run the routing stays as it is for the rest of the process, which is about to end: the
saving threads that outlive the run keep reporting to the log.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import traceback
from pathlib import Path

LOG_NAME = "run.log"
keep_terminal = False  # set by `lab --debug` (lab.cli)
_closed_loop_log: Path | None = None  # where log_closed_loop_reports sends them


def _terminal_kept() -> bool:
    """`lab --debug` (or ``LAB_DEBUG=1``): libraries and background threads report on the terminal as usual."""
    return keep_terminal or os.environ.get("LAB_DEBUG") == "1"


def _append(path: Path, text: str) -> None:
    try:
        with open(path, "a") as f:
            f.write(text)
    except OSError:  # the disk that failed the run: the terminal's one line still says so
        pass


@contextlib.contextmanager
def background_log(path: Path):
    """Route logging and background threads' exceptions to ``path`` while the block runs (see the module)."""
    if _terminal_kept():
        yield
        return
    root = logging.getLogger()
    handler = logging.FileHandler(path, delay=True)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(threadName)s: %(message)s"))
    saved = root.handlers[:], threading.excepthook, logging.raiseExceptions

    def thread_error(args):
        lines = traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback)
        name = args.thread.name if args.thread is not None else "?"
        _append(path, f"exception in thread {name}:\n" + "".join(lines))

    root.handlers = [handler]
    threading.excepthook = thread_error
    logging.raiseExceptions = False  # a handler that cannot write stays silent instead of printing a traceback
    try:
        yield
    except BaseException:
        # a failed run's background threads (orbax's savers) go on reporting while the process ends: to the log
        with contextlib.suppress(OSError):
            handler.flush()
        raise
    else:
        root.handlers, threading.excepthook, logging.raiseExceptions = saved
        with contextlib.suppress(OSError):  # the log's last lines may not fit on a full disk
            handler.close()


def log_closed_loop_reports(path: Path) -> None:
    """Before a checkpoint read: should it fail, send its leftover "Event loop is closed" reports to ``path``.

    When orbax's restore fails on damaged files it closes its event loop while tensorstore still has reads in
    flight; each of those completes a moment later, calls into the closed loop and prints a traceback of its own
    through ``sys.unraisablehook`` (up to dozens of them, before or after the lab's one-line warning). From the
    first read on, for the rest of the process, exactly these reports (a ``RuntimeError`` "Event loop is closed")
    go to the log of the run read last; every other report still goes to the hook that was there before. ``lab
    --debug`` (``LAB_DEBUG=1``) leaves the terminal as it is.
    """
    global _closed_loop_log
    if _terminal_kept():
        return
    _closed_loop_log = path  # the run read last
    if getattr(sys.unraisablehook, "lab_closed_loop", False):  # already in place
        return
    previous = sys.unraisablehook

    def hook(report):
        if isinstance(report.exc_value, RuntimeError) and str(report.exc_value) == "Event loop is closed":
            lines = traceback.format_exception(report.exc_type, report.exc_value, report.exc_traceback)
            _append(_closed_loop_log, "after a failed checkpoint read, from orbax's closed event loop:\n"
                    + "".join(lines))
        else:
            previous(report)

    hook.lab_closed_loop = True
    sys.unraisablehook = hook
