"""``python -m odmoe.torchrun``: torchrun whose failures are odmoe's one line.

When a rank exits non-zero, torchrun's agent adds its own multi-line ``ChildFailedError`` report (a
traceback and a summary table) and exits 1, after the ranks have already printed the one line that names
the problem (rank 0 alone for bad input, the failing rank for a cluster failure). This front end is the
same launcher (torchrun's own argument parser and ``elastic_launch``, so every torchrun flag works) with
that report left out: it exits with the failed rank's own status (2 for bad input, 1 for a cluster
failure) and hides only the agent's "failed (exitcode ...)" and "closing signal" log records. Every other
torchrun message (a rendezvous that cannot be reached, a bad flag) comes through unchanged.
"""

from __future__ import annotations

import logging
import sys

from torch.distributed import run as torchrun
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

_AGENT_NOISE = ("failed (exitcode", "Sending process", "closing signal")


class _DropAgentFailureReports(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not any(noise in text for noise in _AGENT_NOISE)


def main(argv: list[str] | None = None) -> int:
    """Run torchrun with ``argv``; return the first failed rank's exit status (0 when all succeed)."""
    args = torchrun.parse_args(argv)
    drop = _DropAgentFailureReports()
    for name in ("torch", "torch.distributed", ""):  # the agent's records end at these loggers' handlers
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(drop)
    try:
        torchrun.run(args)
    except ChildFailedError as e:
        _, first = e.get_first_failure()
        return first.exitcode if first.exitcode > 0 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
