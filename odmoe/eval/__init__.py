"""Answer quality through EleutherAI's lm-evaluation-harness, for every odmoe system (docs/quality.md).

* :mod:`odmoe.eval.backend`: the harness backend ``odmoe`` (``OdmoeLM``), registered on import;
* :mod:`odmoe.eval.executors`: the systems behind it (fully cached, OD-MoE's runtime, offload engine);
* :mod:`odmoe.eval.harness`: tasks loaded offline, with one clear error for a missing dataset;
* ``odmoe/eval/tasks``: tasks shipped with the package (``kjv_next_word``, ``kjv_next_verse`` for the embedded models);
* ``python -m odmoe.eval``: lm-eval's command line with all of the above.

The harness is an optional extra: ``pip install -e ".[eval]"``. Importing this package does not need it;
importing ``odmoe.eval.backend`` does.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:  # lazy: the harness is an optional dependency
    if name == "OdmoeLM":
        from odmoe.eval.backend import OdmoeLM

        return OdmoeLM
    raise AttributeError(name)
