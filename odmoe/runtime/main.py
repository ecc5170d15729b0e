"""The main node: non-expert weights, the real routers, greedy decoding, and the measurements.

The main node runs the unmodified Hugging Face model with its routed experts removed (their tensors
are replaced by empty ones, so its device holds only non-expert weights). The adapter's expert hook
(``MoEAdapter.set_experts_forward``) is where each MoE layer's work leaves the node: after the real
router has chosen the top-k experts of layer l, the hook

1. takes the shadow's prediction for (n, l) if it has arrived, and settles which expert each of the
   k positions computes (set matching, :func:`odmoe.runtime.layout.resolve`);
2. sends the hidden state and that assignment to the workers of l's group;
3. waits for the k raw expert outputs and combines them with the router's gate weights, in the
   eager loop's order (ascending expert index), so the result equals the cached model's.

Timing per (iteration n, MoE layer l), on the main node's clock (``odmoe/clock.py``; virtual on an
emulated profile):
  ``t_main``  = gate(l) - outputs(l-1): attention, norms, router (M_l; the first layer includes the
               embedding; dense layers in between count with the next MoE layer);
  ``t_worker`` = outputs(l) - gate(l): network out, expert compute, network back, and any stall;
  ``stall``   = the largest wait of the group's workers for their expert after the hidden state
               arrived (reported by the workers).
  ``net_round_trip`` = the slowest position's two network hops (hidden state out, output back).
The zero-stall bound of a request's decode is the clock's own bound timeline (the same compute and
messages, copies free): a true critical path, not ``decode - stalls``. Under ``timing=wall`` it is not
tracked (NaN).

Clocks of different machines are never compared. On a virtual clock every rank's time is on one emulated
timeline (messages carry it), so one-way hops (``net_in``, ``net_out``) and the shadow's lead come from
virtual send and delivery times. Under ``timing=wall`` each quantity is a local duration: ``t_main``,
``t_worker`` on this node's ``perf_counter``; ``stall`` and ``compute`` on the worker's; the round trip is this
node's send -> output received minus how long the worker held the hidden state (its own ``perf_counter``);
one-way hops are NaN (they would need synchronized clocks); the lead is judged at each gate from the newest
prediction that had physically reached this node.

On a virtual clock the prediction the gate uses is the newest one *delivered* by the gate's time; the main
node blocks until the shadow's message physically exists to decide that (``messages.prediction``).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from transformers import DynamicCache

from odmoe.decoding import next_token
from odmoe.errors import OdmoeError
from odmoe.metrics import request_speed
from odmoe.models.load import load_model
from odmoe.runtime import memory, prefill
from odmoe.runtime.kv import cache_bytes, pack_rows
from odmoe.runtime.layout import SHADOW, Layout, resolve
from odmoe.runtime.messages import Kind, key_of, predictions, settled_version
from odmoe.runtime.node import JOB_STRIDE, Node, tick
from odmoe.runtime.shadow import request_alignment, speculative
from odmoe.trace import check_length, forward_step


@dataclass
class Request:
    job: int
    n: int = 0
    phase: str = "prefill"
    prev: float = 0.0
    context: int = 0
    rows: list[dict] = field(default_factory=list)
    prefill_counts: list[list[int]] = field(
        default_factory=list
    )  # per MoE layer: the prompt's rows per expert


class MainNode:
    def __init__(self, node: Node):
        self.node = node
        self.layout: Layout = node.layout
        spec = node.spec
        m = spec["model"]
        lm = load_model(
            m["name"], m.get("path"), m.get("dtype", "float32"), str(node.torch_device), m.get("decode")
        )
        self.model, self.adapter = lm.model, lm.adapter
        for layer in self.adapter.moe_layers:  # the main node never holds routed experts
            experts = self.adapter.experts(layer)
            experts.gate_up_proj = nn.Parameter(torch.empty(0, device=node.torch_device), requires_grad=False)
            experts.down_proj = nn.Parameter(torch.empty(0, device=node.torch_device), requires_grad=False)
            self.adapter.set_experts_forward(layer, self._hook(layer))
        self.weight_bytes = self.adapter.parameter_bytes()["non_experts"]
        node.device.ledger.set("weights/non_expert", self.weight_bytes)
        self.shape = memory.shape_from_config(self.model.config)
        self.elem = next(self.model.parameters()).element_size()
        self.alignment = request_alignment(node, {})
        self.minibatches = 4
        self.req: Request | None = None
        self.pricer = node.pricer(self.adapter.num_layers, "main")
        shadow = node.system.get("shadow", {})
        self.predicts = shadow.get("predictor", "sep") != "none"
        self.speculative = False
        self.tokens_done = 0  # tokens generated in this cluster, all requests (the ``progress`` file)
        self.progress_at = 0.0  # perf_counter of the last ``progress`` write

    # ---- the hook ----------------------------------------------------------------------------
    def _hook(self, layer: int):
        def forward(module, hidden, top_k_index, top_k_weights):
            req = self.req
            if self.pricer is not None:
                self.node.clock.charge(self.pricer.upto(layer))
            ledger = self.node.device.ledger
            ledger.set(
                "activations",
                memory.main_activation_bytes(self.shape, hidden.shape[0], req.context, self.elem),
            )
            if req.phase == "prefill":
                counts = torch.bincount(top_k_index.reshape(-1), minlength=self.layout.num_experts)
                req.prefill_counts.append(counts.tolist())
                return prefill.exchange(
                    self.node.comm,
                    self.layout,
                    tick(req.job, 0),
                    layer,
                    hidden,
                    top_k_index,
                    top_k_weights,
                    self.minibatches,
                )
            return self._decode_layer(req, layer, hidden, top_k_index, top_k_weights)

        return forward

    def _prediction(self, n: int, layer: int, t_gate: float) -> list[int] | None:
        """The experts the shadow predicted for (n, layer), if delivered by the gate's time."""
        if not self.predicts:
            return None
        mb, clock = self.node.comm.mailbox, self.node.clock
        msgs = predictions(mb, n, layer, settled_version(mb, n, self.speculative) if clock.virtual else None)
        usable = [m for m in msgs if m.arrive <= t_gate] if clock.virtual else msgs
        mb.retire(Kind.PREDICT, n, layer)  # a version still on its way would come too late: dropped
        if layer == self.layout.moe_layers[-1]:
            mb.retire(Kind.SETTLED, n)
        return usable[-1].ints[1 : 1 + self.layout.top_k] if usable else None

    def _seen_lead(self, req: Request, layer: int, seen: tuple[int, int]) -> int:
        """Wall clock: how many MoE layers ahead the shadow was at this gate, judged by the newest prediction
        that had physically reached this node (``seen``: (tick, layer)); -1 - index when none of this request
        had. Decided here, on this node, so no time taken on the shadow's machine is compared with ours."""
        lm = len(self.layout.moe_layers)
        index = (req.n - 1) * lm + self.layout.slot_of(layer)
        tick_seen, layer_seen = seen
        if tick_seen < 0 or tick_seen // JOB_STRIDE != req.job:
            return -1 - index
        return (tick_seen % JOB_STRIDE - 1) * lm + self.layout.slot_of(layer_seen) - index

    def _decode_layer(self, req: Request, layer: int, hidden, top_k_index, top_k_weights) -> torch.Tensor:
        comm, mb, clock = self.node.comm, self.node.comm.mailbox, self.node.clock
        n = tick(req.job, req.n)
        t_gate = clock.now()
        seen = comm.newest_prediction  # wall: the shadow's progress as this node sees it (a local fact)
        true = top_k_index[0].tolist()
        predicted = self._prediction(n, layer, t_gate)
        assign = resolve(predicted, true)
        x = hidden.detach()
        sent_at = {}  # wall: this process's perf_counter when each worker's hidden state left
        for w in self.layout.group_workers(layer):
            sent_at[Layout.worker_rank(w)] = time.perf_counter()
            comm.send(Layout.worker_rank(w), Kind.HIDDEN, n, layer, assign, x)
        if self.pricer is not None:
            clock.charge(self.pricer.shared())
        outs = []
        for _ in true:
            try:
                outs.append(mb.get(key_of(Kind.OUTPUT, n, layer), "", ""))
            except TimeoutError:  # name the workers whose outputs are missing
                done = {m.ints[1] for m in outs}
                late = sorted(
                    {self.layout.position_worker(layer, p) for p in range(len(true)) if p not in done}
                )
                names = ", ".join(Layout.name(Layout.worker_rank(w)) for w in late)
                raise TimeoutError(
                    f"timed out after {mb.timeout:g} s waiting for the expert outputs of iteration {req.n} "
                    f"layer {layer} from {names}"
                ) from None
        comm.arrived(outs)
        t_out = clock.now()
        out = torch.zeros_like(hidden)
        by_expert = {m.ints[0]: m for m in outs}
        for e in sorted(by_expert):
            pos = true.index(e)
            y = by_expert[e].tensor.to(hidden.device, hidden.dtype)
            out.index_add_(
                0,
                torch.zeros(1, dtype=torch.long, device=hidden.device),
                (y * top_k_weights[0:1, pos, None]).to(out.dtype),
            )
        # position, hit, predicted, reload, stall_ns, compute_ns, net_in_ns, load_lead_ns, held_ns
        stats = np.array([m.ints[1:10] for m in outs])
        if clock.virtual:  # one-way times: the sender's virtual send and delivery times
            net_in, back = stats[:, 6].max() / 1e9, max(m.arrive - m.sent for m in outs)
            round_trip = max(m.ints[7] / 1e9 + m.arrive - m.sent for m in outs)
        else:  # wall: only local durations (module docstring); one-way times would need synchronized clocks
            net_in = back = np.nan
            round_trip = max(m.seen - sent_at[m.src] - m.ints[9] / 1e9 for m in outs)
        row = {
            "n": req.n,
            "layer": layer,
            "t_gate": t_gate,
            "t_main": t_gate - req.prev,
            "t_worker": t_out - t_gate,
            "stall": stats[:, 4].max() / 1e9,
            "compute": stats[:, 5].max() / 1e9,
            "net_in": net_in,
            "net_out": back,
            "net_round_trip": round_trip,
            "load_lead": stats[:, 7].min() / 1e9,
            "predicted": int(predicted is not None),
            "mispredicted": 0
            if predicted is None
            else sum(p != a for p, a in zip(predicted, assign, strict=True)),
            "loaded_from_prediction": int(stats[:, 2].sum()),
            "reloads": int(stats[:, 3].sum()),
            "hits": int(stats[:, 1].sum()),
        }
        if not clock.virtual and self.predicts:
            row["lead"] = self._seen_lead(req, layer, seen)
        req.rows.append(row)
        req.prev = t_out
        return out

    # ---- requests ----------------------------------------------------------------------------
    def run(self) -> None:
        out_dir = self.node.out_dir
        jobs = self.node.spec["jobs"]
        for i, job in enumerate(jobs):
            result, layers, logits = self.serve(i, job)
            if out_dir is not None:
                _append_jsonl(out_dir / "requests.jsonl", result)
                pd.DataFrame(layers).to_csv(
                    out_dir / "layers.csv",
                    mode="a",
                    header=not (out_dir / "layers.csv").exists(),
                    index=False,
                )
                if logits is not None:
                    np.save(out_dir / f"logits-{i}.npy", logits)
        for r in range(1, self.layout.world_size):
            self.node.comm.send(r, Kind.START, 0, 0, [-1, 0, 0])

    @torch.no_grad()
    def serve(self, i: int, job: dict) -> tuple[dict, list[dict], np.ndarray | None]:
        comm, mb, ledger = self.node.comm, self.node.comm.mailbox, self.node.device.ledger
        prompt = [int(t) for t in job["prompt"]]
        P, out_len = len(prompt), int(job["output_len"])
        check_length(self.model, P, out_len)
        dev = self.node.torch_device
        collect = bool(self.node.spec.get("collect_logits", False))
        req = Request(i, context=P)
        self.req = req
        self._progress(i, force=True)
        self.alignment = request_alignment(self.node, job)
        self.minibatches = int(job.get("prefill_minibatches", self.node.system.get("prefill_minibatches", 4)))
        if self.minibatches < 1:
            raise OdmoeError(f"prefill_minibatches must be >= 1, got {self.minibatches}")
        self.speculative = speculative(self.node, job)
        self.node.device.reset_peak()
        dropped = mb.dropped
        clock, pricer = self.node.clock, self.pricer
        t0 = clock.now()
        for r in range(1, self.layout.world_size):
            comm.send(r, Kind.START, 0, 0, [i, P, out_len], torch.tensor(prompt) if r == SHADOW else None)
        cache = DynamicCache(config=self.model.config)
        if pricer is not None:
            pricer.begin(P, 0)
        logits = forward_step(self.model, torch.tensor([prompt], device=dev), cache)
        if pricer is not None:
            clock.charge(pricer.finish())
        forced = job.get("forced")  # teacher forcing (scoring): feed these tokens instead of the chosen ones
        token = int(forced[0]) if forced else next_token(self.model, prompt, logits)
        t_first, b_first = clock.now(), clock.bound()
        with clock.paused():
            all_logits = [logits.float().cpu().numpy()] if collect else None
            if self.node.out_dir is not None:
                (self.node.out_dir / "status").write_text(f"decoding request {i}\n")
        ledger.set("kv", cache_bytes(cache))
        ledger.set("activations", 0)
        prefill_peak = self.node.device.peak_bytes()
        self.node.device.reset_peak()
        mb.reset_peak()  # the mailbox's decode peak: prefill outputs come in bulk
        tokens = [token]
        self.tokens_done += 1
        self.last_aligned = 0
        self._send_done(req, cache, 0, token, P)
        iterations = []
        for n in range(1, out_len):
            req.n, req.phase, req.context = n, "decode", P + n
            req.prev = t_it = clock.now()
            if pricer is not None:
                pricer.begin(1, P + n - 1)
            logits = forward_step(self.model, torch.tensor([[token]], device=dev), cache)
            if pricer is not None:
                clock.charge(pricer.finish())
            token = int(forced[n]) if forced else next_token(self.model, prompt + tokens, logits)
            tokens.append(token)
            if collect:
                with clock.paused():
                    all_logits.append(logits.float().cpu().numpy())
            ledger.set("kv", cache_bytes(cache))
            ledger.set("activations", 0)
            self._send_done(req, cache, n, token, P)
            t_end = clock.now()
            iterations.append((n, t_it, req.prev, t_end))
            self.tokens_done += 1
            self._progress(i)
        self._progress(i, force=True)
        t_last, b_last = clock.now(), clock.bound()
        bound = b_last - b_first if clock.virtual else float("nan")
        decode_peak = self.node.device.peak_bytes()
        ends = {}
        for r in range(1, self.layout.world_size):
            ends[r] = mb.get(key_of(Kind.JOB_END, tick(i, 0), r), "end-of-request statistics", Layout.name(r))
        mailbox = {"peak": mb.peak, "left": mb.size, "dropped": mb.dropped - dropped}
        layers = req.rows
        result = self._summarize(
            job,
            i,
            P,
            (t0, t_first, t_last, bound),
            tokens,
            iterations,
            layers,
            ends,
            prefill_peak,
            decode_peak,
            mailbox,
        )
        for row in layers:
            row["job"] = i
            row["request"] = job.get("id", str(i))
        return result, layers, (np.stack(all_logits) if collect else None)

    def _progress(self, i: int, force: bool = False) -> None:
        """``progress`` in the out dir: one JSON line (tokens generated so far over all requests, the request
        being served, messages in this node's mailbox, bytes on its device ledger), for an observer outside
        the cluster (``benchmarks/soak.py``). Rewritten atomically at most every 0.2 s of wall time, and at
        each request's start and end, outside the node's time (the clock paused)."""
        out_dir = self.node.out_dir
        if out_dir is None or not (force or time.perf_counter() - self.progress_at >= 0.2):
            return
        with self.node.clock.paused():
            line = {
                "tokens": self.tokens_done,
                "request": i,
                "mailbox": self.node.comm.mailbox.size,
                "device_bytes": self.node.device.ledger.total,
            }
            tmp = out_dir / "progress.tmp"
            tmp.write_text(json.dumps(line) + "\n")
            os.replace(tmp, out_dir / "progress")
            self.progress_at = time.perf_counter()

    def _send_done(self, req: Request, cache: DynamicCache, n: int, token: int, P: int) -> None:
        """Tell the shadow iteration n is over: the next token (if token alignment is due at n + 1) and
        the KV rows it must overwrite (if KV alignment is due, or the prompt's after prefill)."""
        al, m = self.alignment, n + 1
        ints = [token if al.token_at(m) else -1, 0, 0]
        start = count = 0
        if n == 0 and al.prompt_kv:
            start, count = 0, P
        elif al.kv_at(m):
            first = self.last_aligned + 1 if al.kv_positions == "since_last" else n
            start, count = P + first - 1, n - first + 1
            self.last_aligned = n
        kv = None
        if count:
            kv = pack_rows(cache, start, count)
            ints[1:3] = [start, count]
        self.node.comm.send(SHADOW, Kind.DONE, tick(req.job, n), 0, ints, kv)

    def _summarize(
        self,
        job,
        i,
        P,
        times,
        tokens,
        iterations,
        layers,
        ends,
        prefill_peak,
        decode_peak,
        mailbox,
    ) -> dict:
        t0, t_first, t_last, bound = times
        df = pd.DataFrame(layers)
        lm = len(self.layout.moe_layers)
        tails = sum(t_end - t_prev for _, _, t_prev, t_end in iterations)
        shadow_end = ends.get(SHADOW)
        lead = _lead(df, shadow_end.tensor if shadow_end is not None else None, lm)
        for row, ld in zip(layers, df.get("lead", [None] * len(df)), strict=False):
            row["lead"] = None if ld is None else int(ld)
        workers = [ends[Layout.worker_rank(w)] for w in range(self.layout.num_workers)]
        peak_workers = [int(m.ints[3]) for m in workers]
        peak_shadow = int(shadow_end.ints[1]) if shadow_end is not None else 0
        out = {
            "request": job.get("id", str(i)),
            "job": i,
            **request_speed(P, tokens, t0, t_first, t_last),
            "lower_bound_s": bound,
            "clock": self.node.clock.mode,
            "backend": _backend(),
            "device": str(self.node.torch_device),
            "stall_s": float(df["stall"].sum()) if len(df) else 0.0,
            "stalled_layers": int((df["stall"] > 0.0005).sum()) if len(df) else 0,
            "mispredicted_experts": int(df["mispredicted"].sum()) if len(df) else 0,
            "unpredicted_layers": int((1 - df["predicted"]).sum()) if len(df) else 0,
            "reloads": int(df["reloads"].sum()) if len(df) else 0,
            "expert_slots_hit": int(df["hits"].sum()) if len(df) else 0,
            "expert_slots": int(len(df) * self.layout.top_k),
            "t_main_mean_s": float(df["t_main"].mean()) if len(df) else 0.0,
            "t_worker_nostall_mean_s": float((df["t_worker"] - df["stall"]).mean()) if len(df) else 0.0,
            "tail_mean_s": tails / max(1, len(iterations)),
            "bytes_loaded": int(sum(m.ints[2] for m in workers)),
            "loads": int(sum(m.ints[1] for m in workers)),
            "peak_main": int(decode_peak),
            "peak_shadow": peak_shadow,
            "peak_workers": peak_workers,
            "peak_total": int(decode_peak + peak_shadow + sum(peak_workers)),
            "prefill_peak_main": int(prefill_peak),
            "prefill_peak_shadow": int(shadow_end.ints[2]) if shadow_end is not None else 0,
            "prefill_peak_workers": [int(m.ints[4]) for m in workers],
            "worker_host_bytes": [int(m.ints[9]) for m in workers],
            "main_weights": int(self.weight_bytes),
            "shadow_weights": int(shadow_end.ints[3]) if shadow_end is not None else 0,
            "shadow_restarts": int(shadow_end.ints[6]) if shadow_end is not None else 0,
            "lead": lead,
            "prefill_counts": self.req.prefill_counts,
            # messages held at once in the decode (peak), left after the request, dropped as too late
            "mailbox_main": mailbox,
            "mailbox_peak_workers": [int(m.ints[10]) for m in workers],
            "mailbox_dropped_workers": [int(m.ints[11]) for m in workers],
        }
        return out


def _lead(df: pd.DataFrame, log: torch.Tensor | None, lm: int) -> dict:
    """How many MoE layers ahead of the main node the shadow was when the main node's router ran.

    Sequence index of (n, slot) = (n - 1) * Lm + slot. At each main gate time, the shadow's progress is
    the largest index it had emitted by then; lead = progress - index (negative: behind).
    """
    if "lead" in df:  # timing=wall: decided at each gate from what had reached the main node
        lead = df["lead"].to_numpy().astype(int)
    else:  # a virtual clock: one timeline across ranks, so the shadow's emission times compare with gates
        if log is None or len(log) == 0 or not len(df):
            return {}
        log = log.numpy()
        order = np.argsort(log[:, 2])
        seq = (log[order, 0] - 1) * lm + log[order, 1]
        times = log[order, 2]
        progress = np.maximum.accumulate(seq)
        layer_slot = {layer: s for s, layer in enumerate(sorted(df["layer"].unique()))}
        idx = (df["n"].to_numpy() - 1) * lm + df["layer"].map(layer_slot).to_numpy()
        pos = np.searchsorted(times, df["t_gate"].to_numpy(), side="right") - 1
        prog = np.where(pos >= 0, progress[np.clip(pos, 0, None)], -1)
        lead = (prog - idx).astype(int)
        df["lead"] = lead
    if not len(lead):
        return {}
    values, counts = np.unique(np.clip(lead, -lm, 2 * lm), return_counts=True)
    return {
        "mean": float(lead.mean()),
        "p10": float(np.percentile(lead, 10)),
        "p50": float(np.percentile(lead, 50)),
        "p90": float(np.percentile(lead, 90)),
        "ahead_share": float((lead >= 0).mean()),
        "hist": {int(v): int(c) for v, c in zip(values, counts, strict=True)},
    }


def _backend() -> str:
    """The process group's backends (``gloo``, or ``cpu:gloo,cuda:nccl`` on CUDA)."""
    import torch.distributed as dist

    return dist.get_backend_config() if dist.is_initialized() else "none"


def _append_jsonl(path: Path, obj: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(obj) + "\n")
