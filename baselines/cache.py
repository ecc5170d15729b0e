"""Device-resident expert cache with pluggable eviction.

Entries are keyed ``(layer, expert, fmt)`` — the same expert may be resident in two formats (HOBBIT's
mixed-precision cache). Capacity is in bytes per *group*: one group for a global cache (MoE-Infinity,
HOBBIT), one per layer for per-layer caches (Mixtral-Offloading, AdapMoE); capacities in experts are
converted by the caller. An entry is resident from the moment its load is issued (its bytes are
reserved then; ``ready_at`` says when it may be used). Entries that the running layer still needs are
``protected`` and never evicted.

Eviction rules are small classes with one method, ``victim(candidates, ctx)``, so a policy is a
choice of rule; each is tested on a hand-built access sequence.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

Key = tuple[int, int, str]  # (layer, expert, format)


@dataclass
class Entry:
    key: Key
    nbytes: int
    weights: Any = None  # (gate_up, down) on the device (or the host tensors when emulated)
    handle: Any = None  # link handle: deadline (emulated) or CUDA event
    ready_at: float = 0.0
    inserted: int = 0  # access tick when loaded
    last_use: int = 0  # access tick of the last use
    uses: int = 0  # times used
    full_uses: int = 0  # times used at the system's high precision (HOBBIT)
    prefetched: bool = False
    transfer: int = -1  # the request's link transfer that brought it (-1: resident before the request)

    @property
    def layer(self) -> int:
        return self.key[0]

    @property
    def expert(self) -> int:
        return self.key[1]


@dataclass
class EvictionContext:
    """What a rule may look at: the layer running now, the number of layers, and the access tick."""

    layer: int
    num_layers: int
    tick: int
    extra: dict = field(default_factory=dict)


class Eviction:
    name = "base"

    def victim(self, candidates: list[Entry], ctx: EvictionContext) -> Entry:
        raise NotImplementedError


class LRU(Eviction):
    """Least recently used (Mixtral-Offloading, AdapMoE): smallest last-use tick."""

    name = "lru"

    def victim(self, candidates, ctx):
        return min(candidates, key=lambda e: (e.last_use, e.inserted))


class LFU(Eviction):
    """Least frequently used, ties by recency (the LFU-like reading of MoE-Infinity in OD-MoE)."""

    name = "lfu"

    def victim(self, candidates, ctx):
        return min(candidates, key=lambda e: (e.uses, e.last_use, e.inserted))


class ScoreEviction(Eviction):
    """Evict the lowest score given by ``score(entry, ctx)`` (ties: least recently used)."""

    name = "score"

    def __init__(self, score: Callable[[Entry, EvictionContext], float], name: str = "score"):
        self.score = score
        self.name = name

    def victim(self, candidates, ctx):
        return min(candidates, key=lambda e: (self.score(e, ctx), e.last_use, e.inserted))


def layer_distance(layer: int, current: int, num_layers: int) -> int:
    """Layers until ``layer`` runs again after ``current`` (0 = running now; wraps to the next token)."""
    return (layer - current) % num_layers


class MultiDim(Eviction):
    """HOBBIT's multidimensional replacement: keep = a*recency + b*frequency + c*high-precision uses
    - d*layer distance, each term normalized to [0, 1] over the candidates; evict the smallest keep.

    HOBBIT does not publish its weights; we use equal weights (a = b = c = d = 1)."""

    name = "multidim"

    def __init__(self, a: float = 1.0, b: float = 1.0, c: float = 1.0, d: float = 1.0):
        self.w = (a, b, c, d)

    def victim(self, candidates, ctx):
        def norm(values: list[float]) -> list[float]:
            lo, hi = min(values), max(values)
            return [0.0 if hi == lo else (v - lo) / (hi - lo) for v in values]

        rec = norm([e.last_use for e in candidates])
        freq = norm([e.uses for e in candidates])
        hp = norm([e.full_uses for e in candidates])
        dist = norm([layer_distance(e.layer, ctx.layer, ctx.num_layers) for e in candidates])
        a, b, c, d = self.w
        keep = [a * r + b * f + c * h - d * s for r, f, h, s in zip(rec, freq, hp, dist, strict=False)]
        i = min(
            range(len(candidates)), key=lambda j: (keep[j], candidates[j].last_use, candidates[j].inserted)
        )
        return candidates[i]


EVICTIONS: dict[str, Callable[[], Eviction]] = {"lru": LRU, "lfu": LFU, "multidim": MultiDim}


class ExpertCache:
    """Resident entries, byte capacity per group, and the eviction rule that frees room."""

    def __init__(
        self,
        capacity: dict[Hashable, int],
        eviction: Eviction,
        group_of: Callable[[Key], Hashable] = lambda key: None,
    ):
        self.capacity = dict(capacity)
        self.eviction = eviction
        self.group_of = group_of
        self.entries: dict[Key, Entry] = {}
        self.used: dict[Hashable, int] = {g: 0 for g in self.capacity}
        self.evicted: list[Key] = []  # every eviction, in order (for tests and reports)

    def __contains__(self, key: Key) -> bool:
        return key in self.entries

    def get(self, key: Key) -> Entry | None:
        return self.entries.get(key)

    @property
    def resident_bytes(self) -> int:
        return sum(self.used.values())

    def fits(self, key: Key, nbytes: int) -> bool:
        g = self.group_of(key)
        return g in self.capacity and nbytes <= self.capacity[g]

    def make_room(
        self, key: Key, nbytes: int, protected: Iterable[Key], ctx: EvictionContext
    ) -> list[Entry] | None:
        """Evict until ``nbytes`` fit in ``key``'s group; None (nothing evicted) when impossible."""
        g = self.group_of(key)
        if g not in self.capacity:
            return None
        protected = set(protected)
        candidates = [e for k, e in self.entries.items() if self.group_of(k) == g and k not in protected]
        free = self.capacity[g] - self.used[g]
        if free + sum(e.nbytes for e in candidates) < nbytes:
            return None
        out = []
        while free < nbytes:
            victim = self.eviction.victim(candidates, ctx)
            candidates.remove(victim)
            self.remove(victim.key)
            out.append(victim)
            free += victim.nbytes
        return out

    def insert(self, entry: Entry) -> None:
        g = self.group_of(entry.key)
        if self.used[g] + entry.nbytes > self.capacity[g]:
            raise RuntimeError(f"cache group {g} over capacity inserting {entry.key}")
        self.entries[entry.key] = entry
        self.used[g] += entry.nbytes

    def remove(self, key: Key) -> Entry:
        entry = self.entries.pop(key)
        self.used[self.group_of(key)] -= entry.nbytes
        self.evicted.append(key)
        return entry
