"""Offloading and cached baselines on one shared engine (project issue 6; docs/baselines.md).

Each system is a small policy module on :class:`baselines.engine.OffloadEngine`, differing only in what
it caches, predicts, quantizes or skips:

==================== ============================================================================
``cached``           fully cached (every expert resident): the upper bound
``cpu_only``         llama.cpp-style: all experts computed from host memory on the CPU, no device
``mixtral_offloading`` re-implementation of Mixtral-Offloading (per-layer LRU, next-gate prefetch, HQQ)
``moe_infinity``     re-implementation of MoE-Infinity (offline EAM collection, prefetch, eviction)
``hobbit``           re-implementation of HOBBIT (stacked gates, mixed precision on a miss, multidim cache)
``adapmoe``          re-implementation of AdapMoE (sensitivity gating, adaptive prefetch, DP cache sizes)
==================== ============================================================================

Entry points for experiments (``+exp=e2e`` runs them beside OD-MoE, ``experiments/e2e.py``)::

    from baselines import SYSTEMS, system_config, build_engine, run_system, Workload
    rows = run_system("hobbit", system_config("hobbit"), lm, workloads, hardware, references, ppl_ids)

``run_system`` returns one flat row per workload (TTFT ms, decode and output tok/s, peak device MB,
agreement with the fp32 reference, held-out perplexity, hit rate, stalls, ...). On CPU all times are
on the engine's emulated clock (``timing_emulated``): process CPU time plus virtual link stalls
(``baselines/timing.py``), not the OD-MoE runtime's wall clock.
"""

from baselines.measure import (
    SYSTEMS,
    Workload,
    build_engine,
    reference_tokens,
    run_system,
    system_config,
)

__all__ = ["SYSTEMS", "Workload", "build_engine", "reference_tokens", "run_system", "system_config"]
