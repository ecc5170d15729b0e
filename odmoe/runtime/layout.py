"""Who does what in an OD-MoE cluster: roles by rank, worker groups, layers and experts to workers.

Ranks: 0 is the main node, 1 the shadow node, 2 .. 2 + W - 1 the W workers (worker ``w`` is rank
``w + 2``). Workers form ``W / g`` groups of ``g`` consecutive workers (``g`` defaults to top-k, the
paper's group size). MoE layers go to groups round-robin (PAPER.md §3.2): the i-th MoE layer is
served by group ``i mod NG``.

Decode: the k experts a layer uses are *positions* 0..k-1 (router order of the prediction). Position
``j`` is handled by worker ``j mod g`` of the layer's group, so with g = k each worker holds one
expert per served layer (the paper) and with g < k a worker handles ``ceil(k / g)`` positions (it needs
that many device slots). Which expert a position finally computes is settled by set matching against
the true routing (:func:`resolve`, PAPER.md §3.5).

Prefill (PAPER.md §5): every expert of a layer goes to one worker, ``expert e -> worker e mod W``:
worker i takes expert i when W >= E (workers E..W-1 idle in prefill), and with W < E worker i takes
experts i, i + W, ... one after the other.

Shared experts (Qwen2-MoE, DeepSeek) and dense layers stay on the main node with attention: they are
non-expert weights there and never travel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from odmoe.errors import OdmoeError

MAIN, SHADOW, FIRST_WORKER = 0, 1, 2


@dataclass(frozen=True)
class Layout:
    num_workers: int
    group_size: int
    top_k: int
    num_experts: int
    moe_layers: tuple[int, ...]  # decoder-layer indices of the MoE layers
    slots: int  # device expert slots per worker

    # ---- construction --------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        num_workers: int,
        top_k: int,
        num_experts: int,
        moe_layers: Sequence[int],
        group_size: int | None = None,
        slots: int | None = None,
    ) -> Layout:
        """A checked layout; every impossible shape raises an ``OdmoeError`` saying how to fix it."""
        g = int(top_k if group_size is None else group_size)
        w = int(num_workers)
        if top_k < 1 or num_experts < top_k:
            raise OdmoeError(f"top-k {top_k} with {num_experts} experts is not a routed MoE")
        if w < 1:
            raise OdmoeError(f"OD-MoE needs at least one worker, got system.workers={w}")
        if g < 1:
            raise OdmoeError(f"group size must be >= 1, got system.group_size={g}")
        if g > top_k:
            raise OdmoeError(
                f"group size {g} > top-k {top_k} would leave {g - top_k} worker(s) of every group idle; "
                f"use system.group_size <= {top_k} (default: top-k)"
            )
        if w % g:
            raise OdmoeError(
                f"{w} workers do not split into groups of {g}; use a multiple of {g} workers "
                f"(system.workers) or another system.group_size"
            )
        if not moe_layers:
            raise OdmoeError("the model has no MoE layers")
        need = math.ceil(top_k / g)
        s = need if slots is None else int(slots)
        if s < need:
            raise OdmoeError(
                f"group size {g} with top-k {top_k} puts {need} experts of a layer on one worker, which needs "
                f"{need} device slots; set system.slots >= {need} or system.group_size = {top_k}"
            )
        return cls(w, g, top_k, num_experts, tuple(int(x) for x in moe_layers), s)

    # ---- ranks -----------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.num_workers + FIRST_WORKER

    @staticmethod
    def role(rank: int) -> str:
        return "main" if rank == MAIN else "shadow" if rank == SHADOW else "worker"

    @staticmethod
    def name(rank: int) -> str:
        """``main (rank 0)``, ``shadow (rank 1)``, ``worker 3 (rank 5)``: how messages name a rank."""
        if rank == MAIN:
            return "main (rank 0)"
        if rank == SHADOW:
            return "shadow (rank 1)"
        return f"worker {rank - FIRST_WORKER} (rank {rank})"

    @staticmethod
    def worker_rank(worker: int) -> int:
        return worker + FIRST_WORKER

    # ---- decode ----------------------------------------------------------------------------
    @property
    def num_groups(self) -> int:
        return self.num_workers // self.group_size

    def slot_of(self, layer: int) -> int:
        """Index of decoder layer ``layer`` among the MoE layers."""
        return self.moe_layers.index(layer)

    def group(self, layer: int) -> int:
        return self.slot_of(layer) % self.num_groups

    def group_workers(self, layer: int) -> list[int]:
        """Workers (0-based) of the group serving MoE layer ``layer`` that hold at least one position."""
        first = self.group(layer) * self.group_size
        return [first + i for i in range(min(self.group_size, self.top_k))]

    def position_worker(self, layer: int, position: int) -> int:
        return self.group(layer) * self.group_size + position % self.group_size

    def positions(self, worker: int, layer: int) -> list[int]:
        """Positions (0..k-1) of MoE layer ``layer`` that ``worker`` handles (empty if another group serves it)."""
        if worker // self.group_size != self.group(layer):
            return []
        i = worker % self.group_size
        return list(range(i, self.top_k, self.group_size))

    def served_layers(self, worker: int) -> list[int]:
        return [layer for layer in self.moe_layers if self.positions(worker, layer)]

    # ---- prefill ---------------------------------------------------------------------------
    def prefill_worker(self, expert: int) -> int:
        return expert % self.num_workers

    def prefill_experts(self, worker: int) -> list[int]:
        return [e for e in range(self.num_experts) if self.prefill_worker(e) == worker]

    # ---- what a worker must keep in host memory -------------------------------------------
    def host_experts(self, worker: int) -> list[tuple[int, int]]:
        """(layer, expert) pairs a worker may be asked for: every expert of its served layers (a
        misprediction can ask for any) plus its prefill experts of every layer."""
        need = {(layer, e) for layer in self.served_layers(worker) for e in range(self.num_experts)}
        need |= {(layer, e) for layer in self.moe_layers for e in self.prefill_experts(worker)}
        return sorted(need)

    def describe(self) -> str:
        lines = [
            f"{self.world_size} ranks: main, shadow, {self.num_workers} workers in {self.num_groups} "
            f"group(s) of {self.group_size}; top-{self.top_k} of {self.num_experts} experts; "
            f"{self.slots} device slot(s) per worker"
        ]
        for g in range(self.num_groups):
            layers = [layer for layer in self.moe_layers if self.group(layer) == g]
            workers = list(range(g * self.group_size, (g + 1) * self.group_size))
            lines.append(f"  group {g}: workers {workers} serve layers {layers}")
        return "\n".join(lines)


def resolve(predicted: Sequence[int] | None, true: Sequence[int]) -> list[int]:
    """The expert each position computes, by set matching (PAPER.md §3.5).

    A position whose predicted expert is in the true set keeps it (no reload); positions holding a
    wrong expert take the missing true experts in router order. Without a prediction position j takes
    the j-th true expert. Every worker of a group computes the same answer from the same inputs.
    """
    true = [int(e) for e in true]
    if predicted is None:
        return true
    predicted = [int(e) for e in predicted]
    keep = [e if e in true else None for e in predicted]
    missing = iter([e for e in true if e not in keep])
    return [e if e is not None else next(missing) for e in keep]


def eq1_budget(t_m: float, t_w: float, num_groups: int) -> float:
    """Eq. 1 with G read as the number of groups (PAPER.md §3.4): the longest load that never stalls."""
    return num_groups * t_m + (num_groups - 1) * t_w
