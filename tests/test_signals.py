"""odmoe.signals in one process: forks start with the default action; nested deferral raises once, at the end.

End to end (a real run stopped by a signal and resumed) is in test_failures.py."""

import multiprocessing as mp
import os
import signal

import pytest

from odmoe import signals


@pytest.fixture
def installed():
    previous = {s: signal.getsignal(s) for s in signals.HANDLED}
    signals.install()
    yield
    for s, handler in previous.items():
        signal.signal(s, handler)


def _child_handlers(queue) -> None:
    queue.put([signal.getsignal(s) == signal.SIG_DFL for s in signals.HANDLED])


def _fork_reports() -> list[bool]:
    ctx = mp.get_context("fork")
    queue = ctx.SimpleQueue()
    child = ctx.Process(target=_child_handlers, args=(queue,))
    child.start()
    child.join(30)
    return queue.get()


def test_forked_workers_die_of_the_signal_even_where_python_cannot_run(installed):
    """A pool worker must not inherit the handler that raises: it could only run between bytecodes, so a
    worker stuck in C would ignore SIGTERM and its parent would wait for it forever."""
    assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    assert _fork_reports() == [True, True]
    with signals.deferred():  # nor the handler that only notes the signal
        assert _fork_reports() == [True, True]


def test_a_signal_in_nested_deferred_blocks_is_raised_once_when_the_outermost_ends(installed):
    with pytest.raises(signals.Interrupted) as stopped:
        with signals.deferred() as outer:
            with signals.deferred() as inner:
                os.kill(os.getpid(), signal.SIGTERM)
                assert inner.pending()
            assert outer.pending()  # the inner block did not raise: the outer one's rows are not cut
            reached = True
    assert reached and stopped.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signals._raise  # the handler of the run is back
