"""Build a system's engine and measure it on workloads: the rows of Table 2."""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from baselines.engine import OffloadEngine, Policy
from odmoe.clock import Timing
from odmoe.errors import OdmoeError
from odmoe.hardware import HardwareProfile
from odmoe.models.load import LoadedModel
from odmoe.paths import repo_root
from odmoe.plugins import instantiate, is_plugin
from odmoe.record import save_records
from odmoe.trace import reference_decode

SYSTEMS = ("cached", "cpu_only", "mixtral_offloading", "moe_infinity", "hobbit", "adapmoe")


@dataclass(frozen=True)
class Workload:
    """(prompt_len, output_len) and the prompts [(id, token ids)] it runs."""

    prompt_len: int
    output_len: int
    prompts: tuple[tuple[str, tuple[int, ...]], ...]


def system_config(name: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``conf/system/<name>.yaml`` (empty when absent) with ``overrides`` applied."""
    if name not in SYSTEMS:
        raise OdmoeError(f"unknown baseline system {name!r}; choose from {', '.join(SYSTEMS)}")
    path = repo_root() / "conf" / "system" / f"{name}.yaml"
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True) if path.exists() else {}
    cfg = dict(cfg or {})
    cfg.update(dict(overrides or {}))
    return cfg


def build_engine(
    name: str,
    cfg: Mapping[str, Any],
    lm: LoadedModel,
    hardware: HardwareProfile,
    timing: Timing | None = None,
) -> OffloadEngine:
    """The engine of system ``name`` installed on ``lm`` (call ``engine.uninstall()`` when done), timed on
    ``timing`` (default: measured on CPU, wall on CUDA)."""
    plugin = is_plugin(cfg)
    if not plugin and name not in SYSTEMS:
        raise OdmoeError(f"unknown baseline system {name!r}; choose from {', '.join(SYSTEMS)}")
    lm.adapter.clear_experts_forward()
    if plugin:
        policy = plugin_policy(name, cfg)
    else:
        policy = importlib.import_module(f"baselines.{name}").build(dict(cfg), lm, hardware)
    if not policy.on_device and next(lm.model.parameters()).device.type != "cpu":
        lm = host_copy(lm)  # CPU-only on a GPU machine: the model really runs on the host
    return OffloadEngine(lm, policy, hardware, timing)


def plugin_policy(name: str, cfg: Mapping[str, Any]) -> Policy:
    """A user's policy from ``cfg["policy"]`` = ``{_target_: mypkg.MyPolicy, <arguments>}`` (docs/extending.md):
    a ``baselines.engine.Policy`` subclass from any importable module, named ``name`` in every table."""
    policy = instantiate(cfg["policy"], Policy, [], f"system {name!r}: system.policy")
    if policy.name == Policy.name:
        policy.name = name
    return policy


def host_copy(lm: LoadedModel) -> LoadedModel:
    """The same checkpoint loaded again into host memory, with the same decoding rule (never a device copy
    moved back: the GPU need not hold the model twice)."""
    from odmoe.models.load import load_model

    dtype = str(next(lm.model.parameters()).dtype).removeprefix("torch.")
    config = lm.model.generation_config
    decode = {
        "no_repeat_ngram_size": getattr(config, "no_repeat_ngram_size", 0) or 0,
        "repetition_penalty": getattr(config, "repetition_penalty", 1.0) or 1.0,
    }
    return load_model(lm.name, str(lm.path), dtype, "cpu", decode)


def reference_tokens(
    lm: LoadedModel, workloads: Sequence[Workload]
) -> dict[tuple[tuple[int, ...], int], list[int]]:
    """fp32 reference output per (prompt token ids, output_len); one decode of the longest length per prompt
    (greedy batch-1 outputs of a shorter length are its prefix)."""
    lm.adapter.clear_experts_forward()
    longest: dict[tuple[int, ...], int] = {}
    for w in workloads:
        for _, ids in w.prompts:
            longest[tuple(ids)] = max(longest.get(tuple(ids), 0), w.output_len)
    full = {
        ids: reference_decode(lm.model, lm.adapter, "ref", ids, n).tokens.tolist()
        for ids, n in longest.items()
    }
    return {
        (tuple(ids), w.output_len): full[tuple(ids)][: w.output_len]
        for w in workloads
        for _, ids in w.prompts
    }


def run_system(
    name: str,
    cfg: Mapping[str, Any],
    lm: LoadedModel,
    workloads: Sequence[Workload],
    hardware: HardwareProfile,
    references: Mapping[tuple[tuple[int, ...], int], Sequence[int]],
    ppl_ids: Sequence[int] | None = None,
    record_dir: Path | None = None,
    timing: Timing | None = None,
) -> list[dict[str, Any]]:
    """Measure system ``name`` on every workload (cold cache at each workload's start); one row each.
    With ``record_dir``, what the engine did in each request is saved there (``baselines.record``) as
    ``<name>-<prompt_len>x<output_len>.*.parquet``."""
    engine = build_engine(name, cfg, lm, hardware, timing)
    try:
        ppl = engine.perplexity(list(ppl_ids)) if ppl_ids is not None else float("nan")
        rows = []
        for w in workloads:
            engine.reset_cache()
            record = record_dir is not None
            results = [engine.generate(ids, w.output_len, record=record) for _, ids in w.prompts]
            if record:
                save_records(
                    [(pid, r.record) for (pid, _), r in zip(w.prompts, results, strict=True)],
                    record_dir / f"{name}-{w.prompt_len}x{w.output_len}",
                )
            agree = [
                np.mean(np.asarray(r.tokens) == np.asarray(references[(tuple(ids), w.output_len)]))
                for r, (_, ids) in zip(results, w.prompts, strict=False)
            ]
            lookups = sum(r.stats.lookups for r in results)
            rows.append(
                {
                    "system": name,
                    "prompt_len": w.prompt_len,
                    "output_len": w.output_len,
                    "prompts": len(results),
                    "ttft_ms": 1e3 * float(np.mean([r.ttft for r in results])),
                    "decode_tps": float(np.mean([r.decode_tps for r in results])),
                    "output_tps": float(np.mean([r.output_tps for r in results])),
                    "peak_device_mb": max(r.peak_device_bytes for r in results) / 1e6,
                    "cuda_peak_mb": (
                        max(r.cuda_peak_bytes for r in results) / 1e6
                        if results[0].cuda_peak_bytes is not None
                        else None
                    ),
                    "agreement": float(np.mean(agree)),
                    "perplexity": ppl,
                    "hit_rate": sum(r.stats.hits for r in results) / lookups if lookups else float("nan"),
                    "stall_s": float(np.mean([r.stall for r in results])),
                    "prefill_stall_s": float(np.mean([r.prefill_stall for r in results])),
                    "link_mb": sum(r.link_bytes for r in results) / 1e6 / len(results),
                    "loads": sum(r.stats.loads for r in results),
                    "prefetches": sum(r.stats.prefetches for r in results),
                    "prefetch_used": sum(r.stats.prefetch_used for r in results),
                    "skipped_share": sum(r.stats.skipped for r in results)
                    / max(1, sum(r.stats.slots for r in results)),
                    "low_share": sum(r.stats.low for r in results)
                    / max(1, sum(r.stats.slots for r in results)),
                    "lossy": engine.policy.lossy,
                    "expert_format": engine.policy.fmt,
                    "timing_emulated": engine.emulated,
                    "clock": engine.timing.mode,
                    **engine.policy.report(),
                }
            )
        return rows
    finally:
        engine.uninstall()
