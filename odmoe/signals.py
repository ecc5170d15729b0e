"""SIGINT and SIGTERM end a run cleanly: one line, an ``interrupted`` status, no child left, resumable.

Why: a researcher stops runs with Ctrl-C or a batch system's SIGTERM. Python's default turns SIGINT into a
``KeyboardInterrupt`` traceback and SIGTERM into an instant death that skips every ``finally`` (so
``meta.json`` keeps saying ``running`` and forked workers outlive their parent). :func:`install` makes
both signals raise :class:`Interrupted` in the main thread, so ``with`` blocks and ``finally`` clauses
run (process pools are terminated, spawned ranks killed, temporary files removed) and the runner can
record the status. A process forked from the one that installed the handlers (a ``multiprocessing``
worker) starts with the default action restored (``os.register_at_fork``), so it dies of the signal at
once, silently, even inside a long C call where a Python handler would never run (and its parent,
terminating the pool, would wait for it forever).

Work that must not stop half-way (a training step; the rows of one unit of results, which a resumed
run must find all or none of) runs inside :func:`deferred`: a signal there is only noted, and the caller
raises at a safe point (at the latest, leaving the outermost block raises).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

HANDLED = (signal.SIGINT, signal.SIGTERM)
RESUME_HINT = "rerun the same command to resume"


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal; a ``KeyboardInterrupt`` so libraries unwind as for Ctrl-C."""

    def __init__(self, signum: int):
        self.signum = int(signum)
        super().__init__(self.name)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + the signal number."""
        return 128 + self.signum

    def line(self) -> str:
        return f"odmoe: interrupted by {self.name}; {RESUME_HINT}"


_raised = False
_deferring: Deferred | None = None  # the outermost ``deferred`` block in progress, if any


def _raise(signum: int, frame) -> None:
    if _raised:  # a second signal while the first one unwinds: let the cleanup finish
        return
    _interrupt(signum)


def _interrupt(signum: int) -> None:
    global _raised
    _raised = True
    raise Interrupted(signum)


def install() -> None:
    """Make SIGINT and SIGTERM raise :class:`Interrupted` in this (main) thread, and not in its forks."""
    global _raised
    _raised = False
    for signum in HANDLED:
        signal.signal(signum, _raise)


class Deferred:
    """The signal noted inside :func:`deferred`, if any."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def pending(self) -> bool:
        return self.signum is not None

    def raise_if_pending(self) -> None:
        if self.signum is not None:
            _interrupt(self.signum)

    def note(self, signum: int, frame) -> None:
        if self.signum is None:
            self.signum = signum


@contextmanager
def deferred() -> Iterator[Deferred]:
    """Note SIGINT/SIGTERM instead of acting on them; the caller raises at a safe point (at the latest,
    leaving the block raises :class:`Interrupted`). A block inside another one shares the outer block's
    state and leaves the raising to it. Outside the main thread (where handlers cannot be set) signals
    are not deferred."""
    global _deferring
    if _deferring is not None or threading.current_thread() is not threading.main_thread():
        yield _deferring or Deferred()
        return
    state = _deferring = Deferred()
    previous = {s: signal.signal(s, state.note) for s in HANDLED}
    try:
        yield state
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _deferring = None
    state.raise_if_pending()  # a signal noted after the caller's last safe point still ends the run


def _default_in_child() -> None:
    """A fork starts with the default action wherever this module's handlers were installed."""
    global _deferring
    _deferring = None
    for signum in HANDLED:
        handler = signal.getsignal(signum)
        if handler is _raise or getattr(handler, "__func__", None) is Deferred.note:
            signal.signal(signum, signal.SIG_DFL)


os.register_at_fork(after_in_child=_default_in_child)
