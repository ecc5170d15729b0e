"""SIGINT and SIGTERM end a run cleanly: one line, an ``interrupted`` status, no child left, resumable.

Why: a researcher stops runs with Ctrl-C or a batch system's SIGTERM. Python's default turns SIGINT into a
``KeyboardInterrupt`` traceback and SIGTERM into an instant death that skips every ``finally`` (so
``meta.json`` keeps saying ``running`` and forked workers outlive their parent). :func:`install` makes
both signals raise :class:`Interrupted` in the main thread, so ``with`` blocks and ``finally`` clauses
run (process pools are terminated, spawned ranks killed, temporary files removed) and the runner can
record the status. A process forked from the one that installed the handlers (a ``multiprocessing``
worker) does not inherit that behaviour: it dies of the signal as usual, silently.

Work that must not stop half-way (a training step) runs inside :func:`deferred`: a signal there is only
noted, and the loop asks :meth:`Deferred.pending` at a safe point (after a checkpoint) and then raises.
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


_owner_pid: int | None = None
_raised = False


def _raise(signum: int, frame) -> None:
    if os.getpid() != _owner_pid:  # a forked worker: die of the signal as if no handler were installed
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    if _raised:  # a second signal while the first one unwinds: let the cleanup finish
        return
    _interrupt(signum)


def _interrupt(signum: int) -> None:
    global _raised
    _raised = True
    raise Interrupted(signum)


def install() -> None:
    """Make SIGINT and SIGTERM raise :class:`Interrupted` in this (main) thread."""
    global _owner_pid, _raised
    _owner_pid, _raised = os.getpid(), False
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


@contextmanager
def deferred() -> Iterator[Deferred]:
    """Note SIGINT/SIGTERM instead of acting on them; the caller raises at a safe point (at the latest,
    leaving the block raises :class:`Interrupted`). Outside the main thread (where handlers cannot be set) signals are not deferred."""
    state = Deferred()
    if threading.current_thread() is not threading.main_thread():
        yield state
        return
    pid = os.getpid()

    def note(signum: int, frame) -> None:
        if os.getpid() != pid:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if state.signum is None:
            state.signum = signum

    previous = {s: signal.signal(s, note) for s in HANDLED}
    try:
        yield state
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    state.raise_if_pending()  # a signal noted after the caller's last safe point still ends the run
