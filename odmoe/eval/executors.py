"""The systems behind the lm-evaluation-harness backend, each on its own code path.

Every executor answers two questions the harness asks, for one system:

* ``score(pairs)``: for each (context, continuation) of token ids, the summed log-probability of the
  continuation and whether greedy decoding would produce it. The context is *prefilled* and the
  continuation *fed one token per decode step* (teacher forcing), as a served request whose output is
  the continuation runs: the offloading baselines' low-bit experts, precision choices and skipping act
  where they act in serving, and OD-MoE's runtime computes every expert on its workers;
* ``generate(prompts, max_new)``: ``max_new`` output tokens per prompt with the system's own decoding
  rule (``odmoe.decoding``); the backend cuts them at the harness's stop sequences.

Systems:

``cached``   the Hugging Face model with every expert resident (``odmoe/runtime/cached.py``'s system), in
             this process;
``odmoe``    OD-MoE on its multi-process runtime (``odmoe.launch.spawn_local``): one cluster launch
             serves a whole batch of requests; scoring requests carry the continuation as the job's
             ``forced`` tokens, which the main node feeds instead of its own choice while it saves the
             logits of every step;
others       the offload-engine baselines of ``baselines/`` (``build_engine``), through
             :meth:`baselines.engine.OffloadEngine.score` and ``generate``.

Choice (the harness is silent): every request starts the engine from a cold cache (``reset_cache``), so a
request's score depends on that request alone, not on the order in which the harness sends requests or on
``--limit``. HOBBIT's precision depends on what is resident, so a warm serving cache would give it more
high-precision hits than this measures.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm
from transformers import DynamicCache

from odmoe.decoding import next_token
from odmoe.errors import OdmoeError
from odmoe.hardware import HardwareProfile
from odmoe.models.load import LoadedModel
from odmoe.trace import check_length, forward_step

Pair = tuple[Sequence[int], Sequence[int]]


def judge(logits: torch.Tensor, continuation: Sequence[int]) -> tuple[float, bool]:
    """(sum of log p(continuation[i] | ...), every continuation token is the argmax) from logits [L, V]."""
    target = torch.as_tensor(list(continuation), device=logits.device)
    logp = torch.log_softmax(logits.float(), dim=-1)
    total = float(logp[torch.arange(len(target), device=logits.device), target].sum())
    return total, bool((logits.argmax(dim=-1) == target).all())


class Executor:
    """One system: ``score`` teacher-forced continuations, ``generate`` greedy outputs."""

    name: str = ""
    lossy: bool = False
    max_length: int = 2048

    def score(self, pairs: Sequence[Pair]) -> list[tuple[float, bool]]:
        raise NotImplementedError

    def generate(self, prompts: Sequence[Sequence[int]], max_new: int) -> list[list[int]]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def info(self) -> dict[str, Any]:
        return {"system": self.name, "lossy": self.lossy, "max_length": self.max_length}


def _max_length(model) -> int:
    return int(getattr(model.config, "max_position_embeddings", None) or 2048)


class CachedExecutor(Executor):
    """The unmodified model, every expert resident, KV-cached batch-1 steps in this process."""

    name = "cached"

    def __init__(self, lm: LoadedModel):
        lm.adapter.clear_experts_forward()
        self.lm, self.model = lm, lm.model
        self.device = next(self.model.parameters()).device
        self.max_length = _max_length(self.model)

    def _ids(self, tokens: Sequence[int]) -> torch.Tensor:
        return torch.as_tensor(list(tokens), device=self.device)[None]

    @torch.no_grad()
    def score(self, pairs: Sequence[Pair]) -> list[tuple[float, bool]]:
        out = []
        for ctx, cont in tqdm(pairs, desc="cached: scoring", leave=False):
            check_length(self.model, len(ctx), len(cont))
            cache = DynamicCache(config=self.model.config)
            rows = [forward_step(self.model, self._ids(ctx), cache)]
            for token in cont[:-1]:
                rows.append(forward_step(self.model, self._ids([token]), cache))
            out.append(judge(torch.stack(rows), cont))
        return out

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], max_new: int) -> list[list[int]]:
        out = []
        for prompt in tqdm(prompts, desc="cached: generating", leave=False):
            prompt = list(prompt)
            check_length(self.model, len(prompt), max_new)
            cache = DynamicCache(config=self.model.config)
            logits = forward_step(self.model, self._ids(prompt), cache)
            tokens = [next_token(self.model, prompt, logits)]
            while len(tokens) < max_new:
                logits = forward_step(self.model, self._ids(tokens[-1:]), cache)
                tokens.append(next_token(self.model, prompt + tokens, logits))
            out.append(tokens)
        return out


class EngineExecutor(Executor):
    """A baseline policy on the offload engine; a cold expert cache at every request."""

    def __init__(self, name: str, system_cfg: Mapping[str, Any], lm: LoadedModel, hardware: HardwareProfile):
        from baselines import build_engine

        self.name = name
        self.engine = build_engine(name, dict(system_cfg), lm, hardware)
        self.lossy = bool(self.engine.policy.lossy)
        self.max_length = _max_length(lm.model)

    def score(self, pairs: Sequence[Pair]) -> list[tuple[float, bool]]:
        out = []
        for ctx, cont in tqdm(pairs, desc=f"{self.name}: scoring", leave=False):
            self.engine.reset_cache()
            out.append(judge(self.engine.score(ctx, cont), cont))
        return out

    def generate(self, prompts: Sequence[Sequence[int]], max_new: int) -> list[list[int]]:
        out = []
        for prompt in tqdm(prompts, desc=f"{self.name}: generating", leave=False):
            self.engine.reset_cache()
            out.append(list(self.engine.generate(prompt, max_new).tokens))
        return out

    def info(self) -> dict[str, Any]:
        return super().info() | {"expert_format": self.engine.policy.fmt}

    def close(self) -> None:
        self.engine.uninstall()


class RuntimeExecutor(Executor):
    """OD-MoE on a local cluster (main + shadow + workers as processes); one launch per batch of jobs.

    Scoring saves the main node's logits of every step (``logits-<job>.npy``, V floats per token); a batch
    is split into launches of at most ``max_logit_bytes`` of logits, read and deleted after each launch.
    """

    name = "odmoe"

    def __init__(self, spec: Mapping[str, Any], work_dir: str | Path, max_logit_bytes: float = 2e9):
        from transformers import AutoConfig

        self.spec = dict(spec)
        self.work_dir = Path(work_dir)
        self.max_logit_bytes = float(max_logit_bytes)
        config = AutoConfig.from_pretrained(self.spec["model"]["path"], local_files_only=True)
        self.vocab = int(config.vocab_size)
        self.max_length = int(getattr(config, "max_position_embeddings", None) or 2048)
        self.lossy = str(self.spec["system"].get("expert_dtype", "fp32")) != "fp32"
        self.launches = 0

    def _launch(self, jobs: list[dict], collect: bool) -> list[dict]:
        from odmoe.launch import spawn_local

        for job in jobs:
            total = len(job["prompt"]) + int(job["output_len"])
            if total > self.max_length:
                raise OdmoeError(
                    f"request {job['id']}: {total} tokens exceed the model's context of {self.max_length}"
                )
        self.launches += 1
        return spawn_local(dict(self.spec, jobs=jobs, collect_logits=collect), self.work_dir)

    def _chunks(self, pairs: Sequence[Pair]) -> list[list[int]]:
        chunks, size = [[]], 0
        for i, (_, cont) in enumerate(pairs):
            nbytes = 4 * self.vocab * len(cont)
            if chunks[-1] and size + nbytes > self.max_logit_bytes:
                chunks.append([])
                size = 0
            chunks[-1].append(i)
            size += nbytes
        return [c for c in chunks if c]

    def score(self, pairs: Sequence[Pair]) -> list[tuple[float, bool]]:
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        for chunk in tqdm(self._chunks(pairs), desc="odmoe: cluster launches", leave=False):
            jobs = [
                {
                    "id": str(i),
                    "prompt": [int(t) for t in pairs[i][0]],
                    "output_len": len(pairs[i][1]),
                    "forced": [int(t) for t in pairs[i][1]],
                }
                for i in chunk
            ]
            results = self._launch(jobs, collect=True)
            if len(results) != len(jobs):
                raise OdmoeError(f"the OD-MoE cluster answered {len(results)} of {len(jobs)} requests")
            for j, i in enumerate(chunk):
                path = self.work_dir / f"logits-{j}.npy"
                logits = torch.from_numpy(np.load(path))
                path.unlink()
                if results[j]["tokens"] != jobs[j]["forced"]:
                    raise OdmoeError(f"the OD-MoE main node did not feed request {i}'s forced tokens")
                out[i] = judge(logits, pairs[i][1])
        return out

    def generate(self, prompts: Sequence[Sequence[int]], max_new: int) -> list[list[int]]:
        if not prompts:
            return []
        jobs = [
            {"id": str(i), "prompt": [int(t) for t in p], "output_len": int(max_new)}
            for i, p in enumerate(prompts)
        ]
        return [list(r["tokens"]) for r in self._launch(jobs, collect=False)]

    def info(self) -> dict[str, Any]:
        return super().info() | {"expert_format": str(self.spec["system"].get("expert_dtype", "fp32"))}

    def close(self) -> None:
        for stale in self.work_dir.glob("logits-*.npy"):
            stale.unlink()


ENGINE_HARDWARE = "cpu-emulated"


def make_executor(
    name: str,
    cfg,
    system_cfg: Mapping[str, Any],
    lm: LoadedModel | None,
    work_dir: str | Path,
    max_logit_bytes: float = 2e9,
) -> Executor:
    """The executor of system ``name`` for a Hydra config ``cfg`` (``model``, ``hardware``, ``device``).

    ``lm`` is the loaded model the in-process systems use (OD-MoE's ranks load their own). The offload
    engine needs a host->device link: on a CPU machine whose profile has none (``host``), it uses the
    ``cpu-emulated`` profile's virtual link (charged to a clock, never slept; answers do not depend on it).
    """
    from baselines import SYSTEMS as ENGINE_SYSTEMS

    if name == "odmoe":
        from odmoe.launch import spec_from_cfg

        return RuntimeExecutor(spec_from_cfg(cfg, dict(system_cfg), []), work_dir, max_logit_bytes)
    if lm is None:
        raise OdmoeError(f"system {name} runs in this process and needs the loaded model")
    if name == "cached":
        return CachedExecutor(lm)
    if name not in ENGINE_SYSTEMS:
        raise OdmoeError(f"unknown system {name!r}; choose from {', '.join(SYSTEMS)}")
    from odmoe.hardware import load_profile, profile_from_config

    hardware = profile_from_config(cfg.hardware)
    if next(lm.model.parameters()).device.type != "cuda" and hardware.h2d_bandwidth is None:
        hardware = load_profile(ENGINE_HARDWARE)
    return EngineExecutor(name, system_cfg, lm, hardware)


SYSTEMS = ("cached", "odmoe", "cpu_only", "mixtral_offloading", "moe_infinity", "hobbit", "adapmoe")


def remove_work_dir(path: str | Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
