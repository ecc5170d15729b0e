"""OD-MoE on a cluster: one request (prefill, then decode) as an explicit schedule.

Every resource serves its work in a fixed program order, so the schedule is computed by walking that order once
(no event heap is needed, and the result is exact for the model below):

* **main node** — M_l for every layer in order, then the LM head; it also computes shared experts (after
  dispatching the layer, overlapping the workers) and dense layers (DeepSeek's first layer);
* **main NIC** — one FIFO per direction (hidden vectors and alignment out; expert outputs in), serialization
  ``bytes / net_bandwidth``; every message then takes ``net_latency``. Only the main node's port is contended
  (the other nodes each send or receive one small message at a time);
* **shadow** — S_l for every layer in order; it starts token n when (a) it finished token n-1, (b) the alignment
  message arrived if token or KV alignment is due at n (late departure), (c) the main started token
  n - ``max_lead`` (lead cap, PAPER.md §11 item 8). Its routing for layer l reaches the workers ``net_latency``
  after S_l ends;
* **workers** — groups of ``group_size`` workers (default top-k), MoE layer j served by group ``j mod NG``,
  ``NG = num_workers / group_size`` (Eq. 1's "G"); expert slot s of a layer goes to worker ``s mod group_size``.
  A worker serves its layers in order: its host->device link copies the layer's experts as soon as (a) a buffer
  is free (``buffers`` layers resident at once; 1 = the paper's "< 1 GB per worker") and (b) it knows which
  experts: the shadow's prediction or the main's true routing (sent with the hidden vector), whichever comes
  first. If the truth came first it loads the true experts; otherwise it loads the predicted ones and, when the
  hidden vector brings the truth, reloads the mispredicted ones (``k - hits`` experts, spread over the group's
  workers; a copy in flight is never cancelled). It computes when its experts are resident and the hidden
  vector arrived, then returns the outputs and frees the buffer.

Alignment (PAPER.md §4.3, §6): at decode iteration n > 1 token alignment is due when ``(n-1) % P_T == 0`` and KV
alignment when ``(n-1) % P_KV == 0`` (period 0 or None: never). The main sends the message after its LM head of
iteration n-1; the KV payload holds the positions since the last KV alignment (``kv_payload="since_last"``, §11
item 6 option B) or only the newest one (``"newest"``). Decode after a simulated prefill
(:func:`simulate_request`) starts from what the prefill left, as the runtime does: the shadow's own prefill
starts when the main's START (carrying the prompt) reaches it, so without token alignment it starts iteration 1
as soon as that prefill ends, possibly before the main's first token; with token alignment it waits for the
main's first token (DONE after prefill: the late departure at n = 1 too); and each worker's link and buffer are
free only after its last prefill copy and compute. Decode alone (:func:`simulate_decode` without ``after``)
starts with every resource free at ``start``.

Prefill (PAPER.md §5): all experts of a layer are spread over the workers (expert e on worker ``e mod W``, in
rounds when E > W), and each expert's tokens travel in ``minibatches`` chunks so transfer and compute overlap.
``prefill_overlap=False`` is the behaviour the paper's TTFT implies (PAPER.md §10.7: load, transfer out and
transfer back are mostly serial): a worker loads when the main dispatches the layer, the main streams a worker's
chunks once it reports the expert loaded, and the worker returns all outputs after its last chunk.
``prefill_overlap=True`` is the better design: loads issued as soon as a buffer frees (the expert set is taken
as known), chunks streamed right after M_l, outputs returned per chunk.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from odmoe.costs import TOKEN_ID_BYTES, Link
from odmoe.errors import OdmoeError
from odmoe.sim.shapes import ModelShape

PREDICTORS = ("shadow", "ahead", "none")


@dataclass(frozen=True)
class ODMoEConfig:
    """The OD-MoE deployment being simulated.

    ``predictor``: ``shadow`` (SEP, timed by the shadow's schedule), ``ahead`` (predictions always available in
    time, e.g. random prefetch or an oracle; hits still decide misses), ``none`` (load after routing, Fig. 8
    case 6).
    """

    num_workers: int = 8
    group_size: int | None = None
    predictor: str = "shadow"
    token_period: int | None = 1
    kv_period: int | None = 1
    kv_payload: str = "since_last"
    max_lead: int | None = 1
    buffers: int = 1
    minibatches: int = 4
    prefill_overlap: bool = False

    def __post_init__(self):
        if self.predictor not in PREDICTORS:
            raise OdmoeError(f"unknown predictor {self.predictor!r}; use one of {', '.join(PREDICTORS)}")
        if self.kv_payload not in ("since_last", "newest"):
            raise OdmoeError(f"kv_payload must be 'since_last' or 'newest', not {self.kv_payload!r}")
        if self.num_workers < 1 or self.buffers < 1 or self.minibatches < 1:
            raise OdmoeError("num_workers, buffers and minibatches must be >= 1")


@dataclass(frozen=True)
class Layout:
    """Groups and slots: who serves which MoE layer and how many experts each worker loads."""

    num_workers: int
    group_size: int
    num_groups: int
    share: tuple[int, ...]  # experts per layer loaded by the i-th worker of a group

    @classmethod
    def of(cls, shape: ModelShape, cfg: ODMoEConfig) -> Layout:
        gs = cfg.group_size or shape.top_k
        if cfg.num_workers % gs:
            raise OdmoeError(
                f"{cfg.num_workers} workers do not split into groups of {gs}; use a multiple of the group size "
                f"(top-k = {shape.top_k} by default)"
            )
        share = tuple(len(range(i, shape.top_k, gs)) for i in range(gs))
        return cls(cfg.num_workers, gs, cfg.num_workers // gs, share)

    @property
    def experts_per_worker(self) -> int:
        return max(self.share)

    def workers(self, slot: int) -> list[int]:
        g = slot % self.num_groups
        return [g * self.group_size + i for i in range(self.group_size) if self.share[i]]

    def misses(self, k: int, hits: int) -> list[int]:
        """Mispredicted experts per worker of a group: the last ``k - hits`` expert slots miss (set matching)."""
        out = [0] * self.group_size
        for s in range(hits, k):
            out[s % self.group_size] += 1
        return [out[i] for i in range(self.group_size) if self.share[i]]


def due(n: int, period: int | None) -> bool:
    """Alignment due before 0-based decode iteration n (1-based n+1): n > 0 and n % period == 0."""
    return bool(period) and n > 0 and n % period == 0


@dataclass
class Timeline:
    """Every span of the first ``record`` decode iterations, for a Gantt chart (prefill spans carry iteration -1)."""

    spans: list[tuple] = field(default_factory=list)  # (resource, kind, iteration, layer, start, end)
    record: int = 0

    def add(self, resource: str, kind: str, it: int, layer: int, start: float, end: float) -> None:
        if it < self.record and end > start:
            self.spans.append((resource, kind, it, layer, start, end))


@dataclass(frozen=True)
class PrefillEnd:
    """What a prefill leaves to decode: when each worker's host->device link and expert buffer free up, and when
    the shadow's own prefill ends (``-inf``: no shadow)."""

    link_free: list[float]
    buffer_free: list[float]
    shadow_free: float = -math.inf


@dataclass
class DecodeResult:
    token_times: np.ndarray  # emission time of the token produced by each decode iteration
    start: float
    # [iterations, moe_layers]: how long the layer's expert step waited for copies after its input arrived
    stall: np.ndarray
    late_loads: np.ndarray  # [iterations, moe_layers]: experts reloaded after a misprediction
    timeline: Timeline

    @property
    def time(self) -> float:
        return float(self.token_times[-1] - self.start) if len(self.token_times) else 0.0


def simulate_decode(
    shape: ModelShape,
    costs,
    cfg: ODMoEConfig,
    hits: np.ndarray,
    iterations: int | None = None,
    ctx0: int = 0,
    start: float = 0.0,
    record: int = 0,
    timely: np.ndarray | None = None,
    after: PrefillEnd | None = None,
) -> DecodeResult:
    """Decode ``iterations`` tokens (default: one per row of ``hits``) after ``ctx0`` cached positions; ``after``:
    the state the request's prefill left (the module docstring), else every resource free at ``start``.

    ``timely`` (optional, same shape as ``hits``, ``hits <= timely <= k``): a measured prediction trace. Per
    (iteration, MoE layer), the first ``timely`` expert slots are known from a prediction before the hidden vector
    arrives (as soon as a buffer is free, the shadow is not simulated), ``hits`` of them right; the others are
    loaded when the hidden vector brings the routing, after the wrong ones' copies.
    """
    lay = Layout.of(shape, cfg)
    k, moe = shape.top_k, shape.moe_layers
    slot = {layer: j for j, layer in enumerate(moe)}
    iterations = hits.shape[0] if iterations is None else iterations
    if hits.shape[0] < iterations or hits.shape[1] != len(moe):
        raise OdmoeError(f"hits has shape {hits.shape}; need at least ({iterations}, {len(moe)})")
    if timely is not None and (
        timely.shape[0] < iterations or timely.shape[1] != len(moe) or (timely < hits[: len(timely)]).any()
    ):
        raise OdmoeError(f"timely has shape {timely.shape} or counts below hits; need hits <= timely <= {k}")
    lat = costs.latency
    # per-layer one-way times of the hidden vector (in) and the outputs (back), where measured
    hop = getattr(costs, "hop", None)
    lat_in = [hop(i, "in") if hop else lat for i in range(shape.num_layers)]
    lat_out = [hop(i, "out") if hop else lat for i in range(shape.num_layers)]
    t_load = costs.load()
    hidden = costs.act_bytes(1)
    tl = Timeline(record=record)
    # per MoE slot: the group's workers, their expert shares and, per hit count, their misses (loop invariants)
    group = [lay.workers(j) for j in range(len(moe))]
    share = [[lay.share[w % lay.group_size] for w in ws] for ws in group]
    miss_of = [lay.misses(k, h) for h in range(k + 1)]
    t_exp = {(i, m): costs.expert(m, 1, layer=i) for i in moe for m in set(lay.share)}
    t_shared = costs.shared(1)
    send = costs.wire(hidden)
    back = {m: costs.wire(m * hidden) for m in set(lay.share)}

    slot_of = [slot.get(i) for i in range(shape.num_layers)]
    rows = hits.tolist()  # plain Python numbers in the hot loop (numpy scalars are slow there)
    main_free = start
    tx, rx = Link.fifo(start), Link.fifo(start)  # the main node's NIC, out and in
    # each worker's host->device copy engine and expert buffers, free at `start` or when the prefill left them
    links = [Link.fifo(t) for t in (after.link_free if after else [start] * lay.num_workers)]
    held: list[deque] = [
        deque([] if after is None else [after.buffer_free[w]], maxlen=cfg.buffers)
        for w in range(lay.num_workers)
    ]
    shadow_free, align_at, last_kv = start, start, 0
    if after is not None:
        shadow_free = after.shadow_free
        if cfg.predictor == "shadow" and cfg.token_period:  # DONE(0) brings the first token (late departure)
            done0 = tx.occupy(costs.wire(costs.alignment_bytes(0, token=True)), start) + lat
            shadow_free = max(shadow_free, done0)
    main_starts: list[float] = []
    token_times = np.zeros(iterations)
    stall = [[0.0] * len(moe) for _ in range(iterations)]
    late = [[0] * len(moe) for _ in range(iterations)]
    never = -math.inf if cfg.predictor == "ahead" else math.inf
    # timely trace: per (hits, timely), each group worker's (early, wrong among early, late) expert counts
    split = {}
    if timely is not None:
        never = -math.inf
        trows = timely.tolist()
        slots_of = [[s for s in range(k) if s % lay.group_size == i] for i in range(lay.group_size)]
        for h in range(k + 1):
            for t in range(h, k + 1):
                split[h, t] = [
                    (sum(s < t for s in ss), sum(h <= s < t for s in ss), sum(s >= t for s in ss))
                    for i, ss in enumerate(slots_of)
                    if lay.share[i]
                ]

    for n in range(iterations):
        ctx = ctx0 + n
        rec = n < record
        main_starts.append(main_free)
        # ---- shadow: when does its routing of each MoE layer reach the workers? ----
        pred = [never] * len(moe)
        if cfg.predictor == "shadow" and timely is None:
            s = shadow_free
            if due(n, cfg.token_period) or due(n, cfg.kv_period):
                s = max(s, align_at)
            if cfg.max_lead is not None and n - cfg.max_lead >= 0:
                s = max(s, main_starts[n - cfg.max_lead])
            for i in range(shape.num_layers):
                e = s + costs.shadow(i, ctx)
                rec and tl.add("shadow", "S", n, i, s, e)
                if slot_of[i] is not None:
                    pred[slot_of[i]] = e + lat
                s = e
            shadow_free = s + costs.shadow_head()
        # ---- main node and workers, layer by layer ----
        ready = main_free
        hit_row, stall_row, late_row = rows[n], stall[n], late[n]
        for i in range(shape.num_layers):
            m0 = main_free if main_free > ready else ready
            m1 = m0 + costs.main(i, 1, ctx)
            rec and tl.add("main", "M", n, i, m0, m1)
            main_free = ready = m1
            j = slot_of[i]
            if j is None:
                continue
            arrive = []
            for _ in group[j]:  # hidden vector (+ true routing) to each worker of the group
                arrive.append(tx.occupy(send, m1) + lat_in[i])
            main_free = m1 + t_shared
            if main_free > m1:
                rec and tl.add("main", "shared", n, i, m1, main_free)
            outs = []
            splits = split[hit_row[j], trows[n][j]] if timely is not None else None
            for x, (w, a, nexp, miss) in enumerate(
                zip(group[j], arrive, share[j], miss_of[hit_row[j]], strict=True)
            ):
                buf = held[w][0] if len(held[w]) == cfg.buffers else -math.inf
                link = links[w]
                if splits is not None:  # measured trace: `early` known before the hidden vector
                    early, wrong, later = splits[x]
                    l0 = max(buf, -math.inf if early else a, link.free_at)
                    done = l1 = link.occupy((early if a > l0 else nexp) * t_load, l0)
                    rec and tl.add(f"worker {w}", "load", n, i, l0, l1)
                    if a > l0 and wrong + later:
                        done = link.occupy((wrong + later) * t_load, a)
                        rec and tl.add(f"worker {w}", "reload", n, i, max(a, l1), done)
                        late_row[j] += wrong
                else:
                    l0 = max(buf, min(pred[j], a), link.free_at)
                    done = l1 = link.occupy(nexp * t_load, l0)
                    rec and tl.add(f"worker {w}", "load", n, i, l0, l1)
                    if a > l0 and miss:  # predicted experts loaded; the truth shows `miss` of them wrong
                        done = link.occupy(miss * t_load, a)
                        rec and tl.add(f"worker {w}", "reload", n, i, max(a, l1), done)
                        late_row[j] += miss
                c0 = done if done > a else a
                c1 = c0 + t_exp[i, nexp]
                rec and tl.add(f"worker {w}", "compute", n, i, c0, c1)
                held[w].append(c1)
                if c0 - a > stall_row[j]:
                    stall_row[j] = c0 - a
                outs.append((c1, nexp))
            for c1, nexp in sorted(outs):  # outputs back through the main's inbound FIFO
                back_at = rx.occupy(back[nexp], c1) + lat_out[i]
                if back_at > ready:
                    ready = back_at
        h0 = max(main_free, ready)
        main_free = h0 + costs.head(1)
        rec and tl.add("main", "head", n, -1, h0, main_free)
        token_times[n] = main_free
        # ---- alignment for the next iteration ----
        if cfg.predictor == "shadow" and (due(n + 1, cfg.token_period) or due(n + 1, cfg.kv_period)):
            positions = 0
            if due(n + 1, cfg.kv_period):
                positions = 1 if cfg.kv_payload == "newest" else n + 1 - last_kv
                last_kv = n + 1
            t0 = max(main_free, tx.free_at)
            align_at = tx.occupy(
                costs.wire(costs.alignment_bytes(positions, token=due(n + 1, cfg.token_period))), t0
            )
            align_at += lat
            rec and tl.add("net", "align", n, -1, t0, align_at)
    return DecodeResult(token_times, start, np.array(stall), np.array(late, dtype=np.int64), tl)


def expected_prefill_counts(shape: ModelShape, prompt_len: int) -> np.ndarray:
    """Tokens per expert per MoE layer under uniform routing: ``P k / E`` for every expert (all loaded)."""
    return np.full((shape.num_moe_layers, shape.num_experts), prompt_len * shape.top_k / shape.num_experts)


def counts_from_routing(shape: ModelShape, experts: np.ndarray) -> np.ndarray:
    """Tokens per expert per MoE layer from a prefill routing array ``[P, Lm, k]`` (a trace's prefill)."""
    counts = np.zeros((shape.num_moe_layers, shape.num_experts))
    for j in range(shape.num_moe_layers):
        counts[j] = np.bincount(experts[:, j].ravel(), minlength=shape.num_experts)[: shape.num_experts]
    return counts


def simulate_prefill(
    shape: ModelShape,
    costs,
    cfg: ODMoEConfig,
    prompt_len: int,
    counts: np.ndarray | None = None,
    record: bool = False,
) -> tuple[float, Timeline, PrefillEnd]:
    """Time to first token of a ``prompt_len``-token prompt (request arrives at t = 0), the timeline, and what the
    prefill leaves to decode. ``costs.prefill_message`` (optional, default 0): a CPU cost per message, serialized
    on the main node's outbound and inbound FIFOs."""
    counts = expected_prefill_counts(shape, prompt_len) if counts is None else counts
    slot = {layer: j for j, layer in enumerate(shape.moe_layers)}
    nw, lat, t_load = cfg.num_workers, costs.latency, costs.load()
    # CPU cost of one message (measured runs on shared cores), serialized on the main node's FIFOs
    per_msg = getattr(costs, "prefill_message", 0.0)
    tl = Timeline()

    def add(resource: str, kind: str, layer: int, start: float, end: float) -> None:
        if record and end > start:
            tl.spans.append((resource, kind, -1, layer, start, end))

    main_free = ready = 0.0
    tx, rx = Link.fifo(0.0), Link.fifo(0.0)
    links = [Link.fifo(0.0) for _ in range(nw)]
    buf_free = [0.0] * nw
    shadow_free = -math.inf
    if cfg.predictor == "shadow":  # START with the prompt's token ids, then the shadow's own prefill
        s0 = tx.occupy(costs.wire(TOKEN_ID_BYTES * prompt_len) + per_msg, 0.0) + lat
        shadow_free = s0 + sum(costs.shadow(i, 0, prompt_len) for i in range(shape.num_layers))
        shadow_free += costs.shadow_head()
        add("shadow", "S", -1, s0, shadow_free)
    for i in range(shape.num_layers):
        m0 = max(main_free, ready)
        m1 = m0 + costs.main(i, prompt_len, 0)
        add("main", "M", i, m0, m1)
        main_free = ready = m1
        if i not in slot:
            continue
        main_free = m1 + costs.shared(prompt_len)
        # with overlap the loads start before the router has run, so every expert is loaded (one without
        # rows answers its empty chunk at once); otherwise only the experts the router chose
        active = [e for e in range(shape.num_experts) if counts[slot[i], e] > 0 or cfg.prefill_overlap]
        for r in range(0, len(active), nw):  # rounds of at most one expert per worker
            batch = [(e % nw, counts[slot[i], e]) for e in active[r : r + nw]]
            loaded = {}
            for w, _ in batch:
                issue = buf_free[w] if cfg.prefill_overlap else max(buf_free[w], m1 + lat)
                l0 = max(issue, links[w].free_at)
                loaded[w] = links[w].occupy(t_load, l0)
                add(f"worker {w}", "load", i, l0, loaded[w])
            chunks = {w: max(1, min(cfg.minibatches, math.ceil(n))) for w, n in batch}
            arrive = {w: [] for w, _ in batch}
            for c in range(max(chunks.values())):
                for w, n in batch:
                    if c < chunks[w]:
                        send = m1 if cfg.prefill_overlap else loaded[w] + lat
                        arrive[w].append(
                            tx.occupy(costs.wire(costs.act_bytes(n / chunks[w])) + per_msg, send) + lat
                        )
            outs = []
            for w, n in batch:
                t = loaded[w] if n > 0 else -math.inf
                for a in arrive[w]:
                    c0 = max(t, a)
                    t = c0 + (costs.expert(1, n / chunks[w], layer=i) if n > 0 else 0.0)
                    add(f"worker {w}", "compute", i, c0, t)
                    if cfg.prefill_overlap:
                        outs.append((t, n / chunks[w]))
                if not cfg.prefill_overlap:
                    outs.append((t, n))
                buf_free[w] = t
            for t, n in sorted(outs):
                ready = max(ready, rx.occupy(costs.wire(costs.act_bytes(n)) + per_msg, t) + lat)
    h0 = max(main_free, ready)
    ttft = h0 + costs.head(1)
    add("main", "head", -1, h0, ttft)
    return ttft, tl, PrefillEnd([link.free_at for link in links], buf_free, shadow_free)


@dataclass
class RequestResult:
    """One request: TTFT, decode and output throughput (PAPER.md §11 item 22), and where time went."""

    prompt_len: int
    output_len: int
    ttft: float
    decode: DecodeResult

    @property
    def decode_time(self) -> float:
        return self.decode.time

    @property
    def decode_tok_s(self) -> float:
        """(O - 1) / decode time: the first token comes from prefill."""
        return (self.output_len - 1) / self.decode_time if self.decode_time > 0 else math.inf

    @property
    def output_tok_s(self) -> float:
        return self.output_len / (self.ttft + self.decode_time)


def simulate_request(
    shape: ModelShape,
    costs,
    cfg: ODMoEConfig,
    prompt_len: int,
    output_len: int,
    hits: np.ndarray,
    counts: np.ndarray | None = None,
    record: int = 0,
    timely: np.ndarray | None = None,
) -> RequestResult:
    """Prefill, then ``output_len - 1`` decode iterations starting when the first token is out (``timely``: see
    :func:`simulate_decode`)."""
    ttft, ptl, end = simulate_prefill(shape, costs, cfg, prompt_len, counts, record=bool(record))
    dec = simulate_decode(
        shape,
        costs,
        cfg,
        hits,
        output_len - 1,
        ctx0=prompt_len,
        start=ttft,
        record=record,
        timely=timely,
        after=end,
    )
    dec.timeline.spans = ptl.spans + dec.timeline.spans
    return RequestResult(prompt_len, output_len, ttft, dec)
