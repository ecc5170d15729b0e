"""The offload engine shared by every baseline: one device, an expert cache, asynchronous loads, a
prefetch queue, pluggable eviction and stall accounting.

The HF model runs unchanged; each MoE layer's routed-expert computation is replaced, through
``MoEAdapter.set_experts_forward``, by :meth:`OffloadEngine._layer`, which

1. asks the policy for the *plan*: which (expert, format) serves which (token, top-k slot) — the
   plain plan is "every routed expert at the system's format"; AdapMoE drops second experts, HOBBIT
   substitutes low-precision copies or skips on a miss;
2. issues demand loads for planned experts that are not resident (evicting by the policy's rule; a
   load that finds no evictable room waits until the layer has finished with some of its experts);
3. lets the policy queue prefetches for later layers (after the demand loads, so the single FIFO link
   serves the running layer first; a prefetch that finds no room is dropped);
4. computes each expert as soon as its copy is ready (waiting = stall) and sums the outputs in the
   eager loop's order (ascending expert, tokens ordered by top-k slot then position), so a lossless
   plan reproduces the reference bit for bit whatever the cache size or prefetching.

Time is the engine's :class:`odmoe.clock.Clock` (``timing``): ``measured`` (this thread's CPU time times
the profile's ``compute_scale``) or ``modelled`` (the cost model's attention, expert and head steps at
``timing.shape``; packed copies as ``timing.dequant`` says, ``odmoe/costs.py``) on an emulated profile,
``wall`` on a GPU. Loads go over :mod:`baselines.timing`'s link (the profile's link in virtual time, or real
side-stream copies on CUDA); waiting for one is a stall (on CUDA the time the compute stream waited, from
CUDA events). On a GPU the model's own routed-expert tensors move to host memory while an engine is
installed (its host store serves them), so the device holds what the policy keeps resident.
Device memory is the ledger (``odmoe.device.Ledger``, capacity enforced): non-expert weights + resident
expert bytes (in-flight loads included) + the KV cache; on CUDA ``torch.cuda.max_memory_allocated`` is
reported beside it.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from transformers import DynamicCache

from baselines.cache import Entry, EvictionContext, ExpertCache, Key
from baselines.lowbit import ExpertFormat, make_format, packed_attention_bytes, packed_bytes
from baselines.timing import make_link
from odmoe.clock import Clock, Timing
from odmoe.costs import Formats, Pricer, run_costs
from odmoe.decoding import next_token
from odmoe.device import Ledger
from odmoe.errors import OdmoeError
from odmoe.hardware import HardwareProfile
from odmoe.models.adapter import swiglu_expert
from odmoe.models.load import LoadedModel
from odmoe.record import ExecutorRecord
from odmoe.runtime.kv import cache_bytes
from odmoe.trace import check_length, forward_step

FORMATS = ("fp32", "nf4", "hqq2", "hqq3")  # baselines.lowbit

# plan: (expert, fmt) -> (token_idx, top_k_pos) LongTensors, in the eager loop's order
Plan = dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]


def full_plan(top_k_index: torch.Tensor, fmt: str, keep: torch.Tensor | None = None) -> Plan:
    """Every routed (token, slot) at ``fmt``; ``keep`` [T, k] bool masks out skipped slots."""
    plan: Plan = {}
    for e in torch.unique(top_k_index).tolist():
        mask = (top_k_index == e).T  # [k, T] as the eager loop's expert_mask[e]
        if keep is not None:
            mask = mask & keep.T
        top_k_pos, token_idx = torch.where(mask)
        if len(token_idx):
            plan[(e, fmt)] = (token_idx, top_k_pos)
    return plan


@dataclass
class Stats:
    """Counters of one request (or one perplexity pass)."""

    lookups: int = 0
    hits: int = 0  # resident or already in flight when the layer asked
    late_hits: int = 0  # of those, still in flight (a prefetch that had not finished)
    loads: int = 0
    prefetches: int = 0
    prefetch_dropped: int = 0
    prefetch_used: int = 0
    writebacks: int = 0
    skipped: int = 0  # (token, slot) pairs the plan skipped
    low: int = 0  # (token, slot) pairs served by a low-precision copy
    slots: int = 0  # routed (token, slot) pairs

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else math.nan


@dataclass
class GenResult:
    tokens: list[int]
    ttft: float  # s on the engine's clock
    decode_time: float  # s on the engine's clock
    stall: float
    prefill_stall: float
    stats: Stats
    peak_device_bytes: int
    cuda_peak_bytes: int | None = None
    link_bytes: int = 0
    record: ExecutorRecord | None = None

    @property
    def decode_tps(self) -> float:
        n = len(self.tokens) - 1
        return n / self.decode_time if n > 0 and self.decode_time > 0 else math.nan

    @property
    def output_tps(self) -> float:
        return len(self.tokens) / (self.ttft + self.decode_time)


class Policy:
    """What a system caches, predicts, quantizes or skips. The base class loads on demand, losslessly."""

    name = "on_demand"
    fmt = "fp32"  # the format experts are stored and loaded in
    low_fmt: str | None = None  # a second, low-precision format (HOBBIT)
    writeback = False  # copy evicted experts back over the link (Mixtral-Offloading's public code)
    offload = True  # False: every expert resident before the run (fully cached)
    on_device = True  # False: no device at all (CPU-only): compute is the host's
    devices = 1  # devices whose memory the system pools (the paper's Transformers uses 8 GPUs)

    @property
    def lossy(self) -> bool:
        return False

    def capacity(self, engine: OffloadEngine) -> tuple[dict[Hashable, int], object]:
        """(byte capacity per group, key -> group). Default: everything fits."""
        return {None: 10**15}, lambda key: None

    def make_eviction(self):
        from baselines.cache import LRU

        return LRU()

    def begin_request(self, engine: OffloadEngine, prompt: Sequence[int]) -> None:
        pass

    def end_request(self, engine: OffloadEngine) -> None:
        pass

    def plan(
        self, engine: OffloadEngine, layer: int, hidden: torch.Tensor, idx: torch.Tensor, w: torch.Tensor
    ):
        return full_plan(idx, self.fmt), w

    def prefetch(
        self, engine: OffloadEngine, layer: int, hidden: torch.Tensor, idx: torch.Tensor, w: torch.Tensor
    ) -> None:
        pass

    def eviction_extra(self, engine: OffloadEngine) -> dict:
        return {}

    def install(self, engine: OffloadEngine) -> None:
        """Changes to the model beyond the expert hook (Mixtral-Offloading's 4-bit attention)."""

    def uninstall(self, engine: OffloadEngine) -> None:
        """Undo :meth:`install` (the model is shared with the other systems)."""

    def report(self) -> dict:
        """Result-row fields describing the system's offline calibration (``calib_size``, ``calibration``)."""
        return {}


class OffloadEngine:
    """A single-device MoE decoder serving routed experts from a cache (see module docstring)."""

    def __init__(
        self, lm: LoadedModel, policy: Policy, hardware: HardwareProfile, timing: Timing | None = None
    ):
        self.lm = lm
        self.model = lm.model
        self.adapter = lm.adapter
        self.policy = policy
        self.device = next(self.model.parameters()).device
        self.timing = timing or Timing("wall" if self.device.type == "cuda" else "measured")
        if not policy.on_device:  # CPU-only: the host computes, at its own speed
            self.timing = replace(self.timing, scale=1.0)
            if self.timing.mode == "modelled":
                hardware.need("host.mem_bandwidth", "host.flops")
                hardware = hardware.with_(main=hardware.host)
        self.hardware = hardware
        self.emulated = self.timing.virtual
        self.layers = list(self.adapter.moe_layers)
        self.num_layers = self.adapter.num_layers
        self.act = self.adapter.experts(self.layers[0]).act_fn
        self.clock = self._new_clock()
        offloads = policy.offload and policy.on_device
        if not policy.on_device and self.device.type != "cpu":
            raise OdmoeError(
                f"{policy.name} computes on the host CPU, but the model is on {self.device}; "
                "build it with baselines.build_engine, which gives it a host copy of the model"
            )
        if offloads and self.device.type != "cuda" and not self.emulated:
            raise OdmoeError(
                f"{policy.name} offloads experts, which on a CPU needs an emulated profile and a virtual clock "
                "(timing=measured or modelled, e.g. hardware=cpu-emulated); timing=wall needs a GPU"
            )
        self.link = make_link(hardware, self.device, self.clock) if offloads else None
        self.formats: dict[str, ExpertFormat] = {}
        self.host = self._host_store({policy.fmt, policy.low_fmt} - {None})
        # stored bytes of one expert per format in use: what the cache holds and the link moves
        self.fmt_bytes = {f: packed_bytes(self.host[(self.layers[0], 0, f)]) for f in self.formats}
        self._resident_copies: dict[Key, tuple[torch.Tensor, ...]] = {}
        self._stashed: dict = {}
        costs = run_costs(self.timing, hardware, self.model.config, Formats(main="fp32"))
        self.pricer = None if costs is None else Pricer(costs, self.num_layers, "main", self.timing.dequant)
        # modelled at another shape: bytes scale with the priced shape's expert size
        self.byte_scale = 1.0 if costs is None else costs.shape.expert_params / self.adapter.expert_params
        self.stats = Stats()
        self.ledger = self._new_ledger()
        self.tick = 0
        self.layer_now = self.layers[0]
        self.history: list[Key] = []  # demand accesses in order (tests)
        self.record: ExecutorRecord | None = None  # set per request by generate(record=True)
        self._mark = 0.0  # compute clock at the end of the last MoE layer (or the step's start)
        self._protected: set[Key] = set()  # keys the running layer still needs
        policy.engine = self
        self.reset_cache()
        self._install()
        policy.install(self)
        if self.pricer is not None:  # HQQ attention (Mixtral-Offloading, AdapMoE): packed, like their experts
            self.pricer.attention_bytes = packed_attention_bytes(self.model)
        if self.device.type == "cuda" and policy.on_device:  # last: nothing above can fail after it
            self._stashed = self._stash_experts()  # the model's own experts leave the GPU while we serve them

    # ---- setup -----------------------------------------------------------------------------
    def _new_clock(self) -> Clock:
        return self.timing.clock()

    def _new_ledger(self) -> Ledger:
        memory = self.hardware.main.memory if self.policy.on_device else None
        capacity = memory * self.policy.devices if memory else None
        ledger = Ledger(capacity, owner=f"{self.policy.name} device")
        if self.policy.on_device:
            ledger.set("weights/non_expert", self.adapter.parameter_bytes()["non_experts"])
        return ledger

    def compute_time(self) -> float:
        """Time on the clock spent computing (stalls excluded): the per-layer record's times."""
        return self.clock.now() - self.clock.stall

    def _host_store(self, formats: Iterable[str]) -> dict[Key, tuple[torch.Tensor, ...]]:
        """Host copies of every expert in each format the policy uses, packed once (``baselines.lowbit``):
        the link moves these tensors; the expert computation unpacks them (dequantization is compute)."""
        store = {}
        pin = self.device.type == "cuda"
        for fmt in sorted(formats):
            if fmt not in FORMATS:
                raise OdmoeError(f"unknown expert format {fmt!r}; use one of {', '.join(FORMATS)}")
            self.formats[fmt] = make_format(fmt)
            for layer in self.layers:
                for e in range(self.adapter.num_experts):
                    w = self.adapter.expert_weights(layer, e)
                    packed = self.formats[fmt].pack(w.gate_up.detach().cpu(), w.down.detach().cpu())
                    if pin:
                        packed = tuple(t.pin_memory() for t in packed)
                    store[(layer, e, fmt)] = packed
        return store

    def _stash_experts(self) -> dict[int, tuple[torch.Tensor, torch.Tensor, bool]]:
        """Move the model's fused routed-expert tensors to host memory (restored by :meth:`uninstall`), so the
        GPU holds only what the policy keeps resident and ``max_memory_allocated`` measures the system, not a
        second, unused copy of every expert. Every expert computation goes through the engine's hook."""
        stashed = {}
        for layer in self.layers:
            experts = self.adapter.experts(layer)
            grad = experts.gate_up_proj.requires_grad
            stashed[layer] = (experts.gate_up_proj.detach().cpu(), experts.down_proj.detach().cpu(), grad)
            for name in ("gate_up_proj", "down_proj"):
                empty = torch.nn.Parameter(torch.empty(0, device=self.device), requires_grad=False)
                setattr(experts, name, empty)
        torch.cuda.empty_cache()
        return stashed

    def _restore_experts(self) -> None:
        for layer, (gate_up, down, grad) in self._stashed.items():
            experts = self.adapter.experts(layer)
            experts.gate_up_proj = torch.nn.Parameter(gate_up.to(self.device), requires_grad=grad)
            experts.down_proj = torch.nn.Parameter(down.to(self.device), requires_grad=grad)
        self._stashed = {}

    def _resident(self, key: Key) -> tuple[torch.Tensor, ...]:
        """A fully resident expert's weights: the host tensors on a virtual clock, device copies on a GPU."""
        if self.device.type != "cuda":
            return self.host[key]
        if key not in self._resident_copies:
            self._resident_copies[key] = tuple(t.to(self.device) for t in self.host[key])
        return self._resident_copies[key]

    def reset_cache(self) -> None:
        """Cold start: an empty cache (or, fully cached, every expert resident)."""
        capacity, group_of = self.policy.capacity(self)
        for g, cap in capacity.items():
            if cap < self.fmt_bytes[self.policy.fmt]:
                raise OdmoeError(
                    f"{self.policy.name}: cache group {g} holds {cap} bytes, less than one "
                    f"{self.policy.fmt} expert ({self.fmt_bytes[self.policy.fmt]} bytes); raise the budget"
                )
        self.cache = ExpertCache(capacity, self.policy.make_eviction(), group_of)
        if self.link is not None:
            self.link.reset()
        if not self.policy.offload:
            for layer in self.layers:
                for e in range(self.adapter.num_experts):
                    key = (layer, e, self.policy.fmt)
                    self.cache.insert(
                        Entry(key, self.fmt_bytes[self.policy.fmt], weights=self._resident(key))
                    )

    def _install(self) -> None:
        for layer in self.layers:
            self.adapter.set_experts_forward(layer, self._hook(layer))

    def uninstall(self) -> None:
        self.adapter.clear_experts_forward()
        self.policy.uninstall(self)
        if self.device.type == "cuda":  # free the device copies before the model's experts come back
            self.cache = ExpertCache({None: 0}, self.policy.make_eviction())
            self._resident_copies.clear()
            self._restore_experts()

    def _hook(self, layer: int):
        def forward(module, hidden, top_k_index, top_k_weights):
            return self._layer(layer, hidden, top_k_index, top_k_weights)

        return forward

    # ---- loads -----------------------------------------------------------------------------
    def ctx(self) -> EvictionContext:
        return EvictionContext(self.layer_now, self.num_layers, self.tick, self.policy.eviction_extra(self))

    def is_resident(self, key: Key) -> bool:
        return key in self.cache

    def load(self, key: Key, protected: Iterable[Key] = (), prefetch: bool = False) -> Entry | None:
        """Issue the copy of ``key`` (no-op when resident); None when no room can be made now."""
        entry = self.cache.get(key)
        if entry is not None:
            return entry
        nbytes = self.fmt_bytes[key[2]]
        if not self.cache.fits(key, nbytes):
            return None
        evicted = self.cache.make_room(key, nbytes, protected, self.ctx())
        if evicted is None:
            return None
        for victim in evicted:
            if self.policy.writeback:  # device->host copy on the same link, before the new load
                self.link.transfer(victim.nbytes * self.byte_scale, self.clock.now())
                self._note_transfer(victim.nbytes, "writeback")
                self.stats.writebacks += 1
        weights, handle = self.link.copy(self.host[key], nbytes * self.byte_scale, self.clock)
        entry = Entry(
            key, nbytes, weights, handle, inserted=self.tick, last_use=self.tick, prefetched=prefetch
        )
        entry.transfer = self._note_transfer(nbytes, "prefetch" if prefetch else "demand")
        if self.emulated:
            entry.ready_at = handle
        self.cache.insert(entry)
        self.ledger.set("experts", self.cache.resident_bytes)
        if prefetch:
            self.stats.prefetches += 1
        else:
            self.stats.loads += 1
        return entry

    def _note_transfer(self, nbytes: int, kind: str) -> int:
        if self.record is None:
            return -1
        return self.record.transfer(nbytes, kind)

    def _transfers(self) -> int:
        """Link transfers recorded so far in this request (0 when not recording)."""
        return len(self.record.transfers) if self.record is not None else 0

    def prefetch(self, keys: Iterable[Key], protected: Iterable[Key] = ()) -> None:
        """The prefetch queue: copy ``keys`` in order, behind whatever the link is already doing."""
        protected = set(protected) | self._protected
        for key in keys:
            if key in self.cache:
                continue
            if self.load(key, protected, prefetch=True) is None:
                self.stats.prefetch_dropped += 1

    # ---- one MoE layer ---------------------------------------------------------------------
    @torch.no_grad()
    def _layer(self, layer: int, hidden: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        self.layer_now = layer
        if self.pricer is not None:
            self.clock.charge(self.pricer.upto(layer))
        t_enter = self.compute_time()
        first_transfer = self._transfers()
        plan, w = self.policy.plan(self, layer, hidden, idx, w)
        t_planned = self.compute_time()
        keys = sorted(plan)
        self.stats.slots += idx.numel()
        self.stats.skipped += idx.numel() - sum(len(t) for t, _ in plan.values())
        self.stats.low += sum(len(t) for (e, f), (t, _) in plan.items() if f != self.policy.fmt)
        pending: list[Entry] = []
        deferred: list[Key] = []
        self._protected = {(layer, e, f) for e, f in keys}
        for e, f in keys:
            key = (layer, e, f)
            self.tick += 1
            self.history.append(key)
            self.stats.lookups += 1
            entry = self.cache.get(key)
            if entry is not None:
                self.stats.hits += 1
                if self.emulated and entry.ready_at > self.clock.now():
                    self.stats.late_hits += 1
            else:
                entry = self.load(key, self._protected)
            if entry is None:
                deferred.append(key)
            else:
                pending.append(entry)
        demand_end = self._transfers()
        t_demanded = self.compute_time()
        self.policy.prefetch(self, layer, hidden, idx, w)
        t_issued = self.compute_time()
        prefetch_end = self._transfers()
        waits: list[int] = []  # per computed expert, in compute order: its transfer (-1: resident)
        deferred_after: list[int] = []  # per deferred transfer: experts computed before it was issued
        results: dict[tuple[int, str], torch.Tensor] = {}
        while pending or deferred:
            while deferred:
                issued = self._transfers()
                entry = self.load(deferred[0], self._protected)
                if entry is None:
                    break
                pending.append(entry)
                deferred.pop(0)
                deferred_after += [len(results)] * (self._transfers() - issued)  # copy and write-back
            if not pending:
                raise RuntimeError(f"layer {layer}: cannot make room for {deferred[0]}")
            entry = min(pending, key=lambda en: en.ready_at)
            pending.remove(entry)
            if self.link is not None:
                self.link.wait(entry.handle, self.clock)
            waits.append(entry.transfer)
            _, e, fmt = entry.key
            token_idx, pos = plan[(e, fmt)]
            gate_up, down = self.formats[fmt].unpack(entry.weights)  # dequantization, timed as compute
            y = swiglu_expert(hidden[token_idx], gate_up, down, self.act)
            if self.pricer is not None:
                nbytes = entry.nbytes * self.byte_scale
                packed = fmt != "fp32"  # unpacked above, then an fp32 matmul (timing.dequant prices it)
                self.clock.charge(self.pricer.expert(len(token_idx), not results, nbytes, "device", packed))
            results[(e, fmt)] = y * w[token_idx, pos, None]
            self.tick += 1
            entry.last_use = self.tick
            entry.uses += 1
            entry.full_uses += fmt == self.policy.fmt
            if entry.prefetched:
                self.stats.prefetch_used += 1
                entry.prefetched = False
            self._protected.discard(entry.key)
        out = torch.zeros_like(hidden)
        for key in keys:
            out.index_add_(0, plan[key][0], results[key].to(out.dtype))
        if self.record is not None:
            now = self.compute_time()
            self.record.layer(
                layer=layer,
                t_main=t_enter - self._mark,
                t_plan=t_planned - t_enter,
                t_demand=t_demanded - t_planned,
                t_prefetch=t_issued - t_demanded,
                t_experts=now - t_issued,
                computed=len(keys),
                demand=list(range(first_transfer, demand_end)),
                prefetch=list(range(demand_end, prefetch_end)),
                deferred=list(range(prefetch_end, self._transfers())),
                deferred_after=deferred_after,
                waits=waits,
            )
            self._mark = now
        return out

    # ---- requests --------------------------------------------------------------------------
    def _step(self, ids: torch.Tensor, cache: DynamicCache, seq_len: int) -> torch.Tensor:
        self._mark = self.compute_time()
        if self.pricer is not None:
            self.pricer.begin(ids.shape[1], seq_len - ids.shape[1])
        logits = forward_step(self.model, ids, cache)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            if hasattr(self.link, "settle"):
                self.link.settle(self.clock)  # the step's stalls, from its CUDA events
        if self.pricer is not None:
            self.clock.charge(self.pricer.finish())
        if self.policy.on_device:
            self.ledger.set("kv", cache_bytes(cache))
        return logits

    def _end_step(self) -> None:
        """Close the step's record after its token is chosen (the tail: LM head, token choice)."""
        if self.record is not None:
            self.record.end_step(self.compute_time() - self._mark, 0.0)

    def _begin(self, prompt: Sequence[int]) -> None:
        self.stats = Stats()
        self.ledger = self._new_ledger()
        if self.policy.on_device:
            self.ledger.set("experts", self.cache.resident_bytes)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        if self.link is not None:
            self.link.bytes_moved = 0
        self.policy.begin_request(self, prompt)
        self.clock = self._new_clock()  # a new request starts at t = 0: earlier copies have all finished
        if self.link is not None:
            self.link.reset()
        for entry in self.cache.entries.values():
            entry.ready_at = 0.0
            entry.transfer = -1
            if self.emulated:  # the emulated handle is the completion time on the previous request's clock
                entry.handle = 0.0

    @torch.no_grad()
    def generate(self, prompt: Sequence[int], output_len: int, record: bool = False) -> GenResult:
        """Batch-1 decoding of ``output_len`` tokens, timed on the engine's clock; with ``record`` the
        result carries what the engine did (``baselines.record``)."""
        check_length(self.model, len(prompt), output_len)
        self._begin(prompt)
        self.record = ExecutorRecord() if record else None
        kv = DynamicCache(config=self.model.config)
        ids = torch.as_tensor(list(prompt), device=self.device)[None]
        logits = self._step(ids, kv, len(prompt))
        prompt = list(prompt)
        tokens = [next_token(self.model, prompt, logits)]
        self._end_step()
        ttft = self.clock.now()
        prefill_stall = self.clock.stall
        for i in range(output_len - 1):
            logits = self._step(torch.tensor([[tokens[-1]]], device=self.device), kv, len(prompt) + i + 1)
            tokens.append(next_token(self.model, prompt + tokens, logits))
            self._end_step()
        total = self.clock.now()
        self.policy.end_request(self)
        rec, self.record = self.record, None
        cuda_peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        return GenResult(
            tokens,
            ttft,
            total - ttft,
            self.clock.stall,
            prefill_stall,
            self.stats,
            self.ledger.peak,
            cuda_peak,
            self.link.bytes_moved if self.link is not None else 0,
            rec,
        )

    @torch.no_grad()
    def score(self, prompt: Sequence[int], forced: Sequence[int]) -> torch.Tensor:
        """Teacher-forced logits [len(forced), V]: ``prompt`` prefilled, then ``forced`` fed one token per
        step (the decode path, where the lossy tricks act), as a request whose output is ``forced`` runs;
        row i scores ``forced[i]``. Answer-quality benchmarks score choices this way (``odmoe.eval``)."""
        check_length(self.model, len(prompt), len(forced))
        self._begin(prompt)
        kv = DynamicCache(config=self.model.config)
        rows = [self._step(torch.as_tensor(list(prompt), device=self.device)[None], kv, len(prompt))]
        for i, token in enumerate(forced[:-1]):
            rows.append(self._step(torch.tensor([[int(token)]], device=self.device), kv, len(prompt) + i + 1))
        self.policy.end_request(self)
        return torch.stack(rows)

    @torch.no_grad()
    def perplexity(self, token_ids: Sequence[int]) -> float:
        """Teacher-forced perplexity, one token per step (the decode path, where the lossy tricks act)."""
        self._begin(token_ids[:1])
        kv = DynamicCache(config=self.model.config)
        nll = []
        for i in range(len(token_ids) - 1):
            logits = self._step(torch.tensor([[token_ids[i]]], device=self.device), kv, i + 1)
            logp = torch.log_softmax(logits.float(), dim=-1)
            nll.append(-float(logp[token_ids[i + 1]]))
        self.policy.end_request(self)
        return float(np.exp(np.mean(nll)))
