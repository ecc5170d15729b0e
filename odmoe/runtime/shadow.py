"""The shadow node: runs a predictor ahead of the main node and tells workers what to load.

Predictors (``system.shadow.predictor``):

* ``sep``: the SEP shadow of ``odmoe.predict.shadow.build_shadow`` at ``system.shadow.precision``
  (fp32 is an exact copy, recall 1; fp16 / int8 / nf4 are the paper's). Its own router decisions,
  captured in the expert hook the moment each layer's routing is known, are the predictions.
* ``inverted``: a deliberately wrong predictor: an exact copy whose *bottom*-k experts are sent, so
  every prediction misses (E >= 2k). Output must not change, only the time.
* ``random``: k experts drawn uniformly without replacement per layer (Fig. 8 case 5).
* ``none``: no predictions; workers load after the main node's routing (Fig. 8 case 6).
* ``oracle``: an exact copy whose compute takes no time and that never waits for alignment (only for the
  lead cap): every prediction right and as early as the protocol allows. The upper bound of prediction,
  for tests and what-ifs (the simulator's ``ahead``); not a system.

Each prediction (n, layer, experts) goes to the workers of that layer's group and to the main
node (which settles slot assignment by set matching, so a whole group agrees on it).

Alignment (PAPER.md §4.3-4.4, periods from ``odmoe.predict.sep.Alignment``): before iteration n
the shadow waits for the main node's DONE(n-1) whenever token or KV alignment is due at n, applies
the true token and/or overwrites its KV rows with the main node's; that wait is the *late
departure*. On iterations without alignment it continues from its own argmax and own KV, but never
runs more than one token ahead: it waits for DONE(n-2) (PAPER.md §11 item 8).

``system.shadow.departure: speculative`` (an extension, not the paper) removes the late departure: the
shadow starts iteration n on its own argmax as soon as the lead cap allows, and applies DONE(n-1)
between layers the moment it arrives (KV rows overwritten in place). If the main node's token differs
from the one it departed with, it drops the rows it appended and reruns iteration n on the true token,
re-sending its predictions with the next version number (counted as ``shadow_restarts``); output is never
affected, only timing. On a virtual clock it then tells the main node and the workers which version of the
iteration is final (SETTLED), so they can pick, by delivery time, the version in force when they decide; and
"the moment DONE(n-1) arrives" is decided on its virtual delivery time (the shadow blocks until the message
physically exists, then applies it at the first layer boundary at or after its delivery).

Timing: the shadow's clock advances by its own compute (measured, or the cost model's quantized layers under
``timing=modelled``) and by the alignment messages it waits for; each prediction leaves at the shadow's time.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import torch
from transformers import DynamicCache

from odmoe.decoding import next_token
from odmoe.errors import OdmoeError
from odmoe.models.load import load_model
from odmoe.predict.sep import Alignment
from odmoe.runtime import memory
from odmoe.runtime.kv import cache_bytes, unpack_rows
from odmoe.runtime.layout import MAIN, Layout
from odmoe.runtime.messages import Kind, key_of
from odmoe.runtime.node import Node, tick
from odmoe.trace import forward_step

PREDICTORS = ("sep", "inverted", "random", "none", "oracle")


def request_alignment(node: Node, job: dict) -> Alignment:
    """The alignment of one request: ``system.shadow``, overridden by the request's own ``shadow`` dict
    (so one cluster can serve requests under several alignment modes, as the tests do)."""
    cfg = {**node.system.get("shadow", {}), **job.get("shadow", {})}
    return Alignment.parse(
        str(cfg.get("alignment", "T1_KV1")),
        cfg.get("kv_positions", "since_last"),
        bool(cfg.get("prompt_kv", False)),
    )


def speculative(node: Node, job: dict) -> bool:
    """Whether the shadow departs speculatively on this request (only a model-running predictor can)."""
    cfg = {**node.system.get("shadow", {}), **job.get("shadow", {})}
    departure = cfg.get("departure", "aligned")
    if departure not in ("aligned", "speculative"):
        raise OdmoeError(f"unknown shadow departure {departure!r}; use aligned (the paper) or speculative")
    return departure == "speculative" and cfg.get("predictor", "sep") in ("sep", "inverted")


class ShadowNode:
    def __init__(self, node: Node):
        self.node = node
        self.layout: Layout = node.layout
        cfg = node.system.get("shadow", {})
        self.kind = cfg.get("predictor", "sep")
        if self.kind not in PREDICTORS:
            raise OdmoeError(
                f"unknown system.shadow.predictor {self.kind!r}; use one of {', '.join(PREDICTORS)}"
            )
        self.rng = np.random.default_rng(int(node.spec.get("seed", 0)))
        nice = int(cfg.get("nice", 0))
        if (
            nice > 0
        ):  # emulation on shared cores only: let the critical path (main, workers) preempt the shadow
            os.nice(nice)
        self.model = None
        self.emitting = False
        self.log: list[tuple[int, int, float]] = []
        self.n = 0
        if self.kind in ("sep", "inverted", "oracle"):
            self._build(cfg)

    def _build(self, cfg: dict) -> None:
        from odmoe.predict.shadow import build_shadow

        m = self.node.spec["model"]
        lm = load_model(
            m["name"], m.get("path"), m.get("dtype", "float32"), str(self.node.torch_device), m.get("decode")
        )
        precision = "fp32" if self.kind in ("inverted", "oracle") else str(cfg.get("precision", "int8"))
        shadow = build_shadow(lm.model, lm.adapter, precision)
        self.model, self.adapter = shadow.model, shadow.adapter
        self.elem = 4 if precision == "fp32" else 2
        self.shape = memory.shape_from_config(self.model.config)
        self.node.device.ledger.set("weights/shadow", shadow.weight_bytes()["total"])
        self.precision = precision
        self.pricer = None if self.kind == "oracle" else self.node.pricer(self.adapter.num_layers, "shadow")
        # the shadow's own (quantized) experts, without build_shadow's routing capture: this node reads the
        # routing in its own hook, and a capture no one pops kept one tensor per token and MoE layer for the
        # life of the process (~10 KiB a token on tiny-mixtral; found by benchmarks/soak.py)
        shadow.capturing = False
        for layer in self.adapter.moe_layers:
            self.adapter.set_experts_forward(layer, self._hook(layer, shadow.experts_compute(layer)))

    def _hook(self, layer: int, compute):
        def forward(module, hidden, top_k_index, top_k_weights):
            if self.pricer is not None:
                self.node.clock.charge(self.pricer.upto(layer))
            if self.emitting:
                if self.speculative:
                    self._poll()
                if self.kind == "inverted":
                    logits = self.adapter.router(layer)(hidden)[0]
                    experts = torch.topk(logits[0].float(), self.layout.top_k, largest=False).indices.tolist()
                else:
                    experts = top_k_index[0].tolist()
                self._emit(layer, experts)
            rows = hidden.shape[0]
            ledger = self.node.device.ledger
            ledger.set(
                "activations",
                memory.main_activation_bytes(self.shape, rows, self._context, self.elem)
                + memory.worker_activation_bytes(rows, self.shape.hidden, self.shape.expert_ff, self.elem),
            )
            return compute(module, hidden, top_k_index, top_k_weights)

        return forward

    def _emit(self, layer: int, experts: list[int]) -> None:
        n = tick(self.job, self.n)
        comm = self.node.comm
        ints = [self.version.get(self.n, 0), *experts]
        for w in self.layout.group_workers(layer):
            comm.send(Layout.worker_rank(w), Kind.PREDICT, n, layer, ints)
        comm.send(MAIN, Kind.PREDICT, n, layer, ints)
        self.log.append((self.n, self.layout.slot_of(layer), self.node.clock.now()))

    def _settle(self, it: int, version: int) -> None:
        """Tell the main node and the workers that ``version`` is iteration ``it``'s final prediction."""
        self.version[it] = version
        if self.speculative and self.node.clock.virtual:
            for r in range(self.layout.world_size):
                if r != self.node.rank:
                    self.node.comm.send(r, Kind.SETTLED, tick(self.job, it), 0, [version])

    # ---- requests -------------------------------------------------------------------------
    def run(self) -> None:
        while True:
            start = self.node.comm.receive(key_of(Kind.START), "the next request (START)", Layout.name(MAIN))
            job, prompt_len, output_len = start.ints[:3]
            if job < 0:
                return
            self.serve(job, start.tensor.tolist(), output_len)

    def serve(self, job: int, prompt: list[int], output_len: int) -> None:
        self.job, self.log, self.n, self.restarts = job, [], 0, 0
        self.version: dict[int, int] = {}  # iteration -> prediction version (restarts so far)
        job_cfg = self.node.spec["jobs"][job]
        self.alignment = request_alignment(self.node, job_cfg)
        self.speculative = speculative(self.node, job_cfg) and self.model is not None
        ledger = self.node.device.ledger
        self.node.device.reset_peak()
        self._consumed = -1  # highest DONE(m) taken
        prefill_peak = self.node.device.peak_bytes()
        if self.kind != "none":
            free = self.node.clock.paused() if self.kind == "oracle" else contextlib.nullcontext()
            with free:  # the oracle's compute takes no time
                prefill_peak = self._decode(job, prompt, output_len)
        log = torch.tensor(self.log, dtype=torch.float64).reshape(-1, 3)
        cats = ledger.peak_by_category()
        ints = [
            job,
            self.node.device.peak_bytes(),
            prefill_peak,
            cats.get("weights", 0),
            cats.get("kv", 0),
            cats.get("activations", 0),
            self.restarts,
        ]
        self.node.comm.send(MAIN, Kind.JOB_END, tick(job, 0), self.node.rank, ints, log)

    @torch.no_grad()
    def _decode(self, job: int, prompt: list[int], output_len: int) -> int:
        """The shadow's own prefill, then decode iterations 1 .. output_len - 1; returns the prefill peak."""
        ledger = self.node.device.ledger
        self.P = P = len(prompt)
        self.prompt = prompt
        self.cache = None
        self.used: dict[int, int] = {}  # iteration -> the token the shadow fed
        self.override: dict[int, int] = {}  # iteration -> the main node's token, when it came first
        own = -1
        if self.model is not None:
            self.cache = DynamicCache(config=self.model.config)
            self._context = P
            self._begin(P, 0)
            logits = forward_step(
                self.model, torch.tensor([prompt], device=self.node.torch_device), self.cache
            )
            self._finish()
            own = next_token(self.model, prompt, logits)
            ledger.set("kv", cache_bytes(self.cache))
            ledger.set("activations", 0)
        prefill_peak = self.node.device.peak_bytes()
        self.node.device.reset_peak()
        for n in range(1, output_len):
            self.n = n
            if self.kind == "random":
                self._consume(n - 2)  # lead cap only: random predictions need no alignment
                for layer in self.layout.moe_layers:
                    experts = self.rng.choice(self.layout.num_experts, self.layout.top_k, replace=False)
                    self._emit(layer, [int(e) for e in experts])
                continue
            al = self.alignment
            due = al.token_at(n) or al.kv_at(n) or (n == 1 and al.prompt_kv)
            self._consume(n - 1 if due and not self.speculative and self.kind != "oracle" else n - 2)
            own = self._iteration(n, self.override.pop(n, own))
        if self.speculative:  # the last iteration's alignment settles it (and may redo it)
            self._consume(output_len - 2)
        return prefill_peak

    def _iteration(self, n: int, token: int) -> int:
        """Run decode iteration n on ``token``, emitting predictions; rerun it if a speculative start
        turns out to have used the wrong token. Returns the shadow's own next token."""
        ledger = self.node.device.ledger
        while True:
            self.used[n] = token
            self.n, self._context = n, self.P + n
            self.emitting = True
            try:
                self._begin(1, self.P + n - 1)
                logits = forward_step(
                    self.model, torch.tensor([[token]], device=self.node.torch_device), self.cache
                )
                self._finish()
                break
            except _Restart as r:  # the main node's token differs from the one we departed with
                _truncate(self.cache, self.P + n - 1)
                token = r.token
                self.restarts += 1
            finally:
                self.emitting = False
        ledger.set("kv", cache_bytes(self.cache))
        ledger.set("activations", 0)
        return next_token(self.model, self.prompt + [self.used[m] for m in range(1, n + 1)], logits)

    def _begin(self, tokens: int, ctx: int) -> None:
        if self.pricer is not None:
            self.pricer.begin(tokens, ctx)

    def _finish(self) -> None:
        if self.pricer is not None:
            self.node.clock.charge(self.pricer.finish())

    def _consume(self, upto: int) -> None:
        """Take and apply DONE(m) for every m <= ``upto`` not yet taken (blocking)."""
        for m in range(self._consumed + 1, upto + 1):
            msg = self.node.comm.receive(
                key_of(Kind.DONE, tick(self.job, m)), f"the end of iteration {m} (DONE)", Layout.name(MAIN)
            )
            self._apply(m, msg, during=None)

    def _apply(self, m: int, msg, during: int | None) -> None:
        """Apply DONE(m), the alignment for iteration m + 1: overwrite KV rows, fix the token.

        ``during`` is the iteration being computed when DONE(m) is applied from inside the forward pass
        (speculative departure); a wrong token there restarts that iteration.
        """
        self._consumed = m
        if msg.tensor is not None and self.cache is not None:
            unpack_rows(self.cache, msg.tensor, msg.ints[1], msg.ints[2])
        token, it = msg.ints[0], m + 1
        version = self.version.get(it, 0)
        if token < 0 or self.model is None:
            self._settle(it, version)
            return
        if it not in self.used:
            self.override[it] = token  # aligned before departure: the paper's protocol
            self._settle(it, version)
        elif self.used[it] != token:
            self._settle(it, version + 1)
            if during == it:
                raise _Restart(token)
            # iteration m + 1 already ran on a wrong token (speculative): redo it before going on
            _truncate(self.cache, self.P + it - 1)
            saved = self.n
            self._iteration(it, token)
            self.n = saved
            self.restarts += 1
        else:
            self._settle(it, version)

    def _poll(self) -> None:
        """Speculative departure: apply the pending alignment as soon as it is delivered, between layers
        (on a virtual clock: once it physically exists and its delivery time has come)."""
        m = self.n - 1
        if self._consumed == m - 1:
            mb, clock = self.node.comm.mailbox, self.node.clock
            key = key_of(Kind.DONE, tick(self.job, m))
            if clock.virtual:
                msg = mb.wait_for(key, f"the end of iteration {m} (DONE)", Layout.name(MAIN))
                if msg.arrive > clock.now():
                    return
            msg = mb.take(key)
            if msg is not None:
                clock.receive(msg.arrive, msg.arrive_bound)
                self._apply(m, msg, during=self.n)


class _Restart(Exception):
    def __init__(self, token: int):
        super().__init__(token)
        self.token = token


def _truncate(cache: DynamicCache, length: int) -> None:
    """Drop cache positions >= ``length`` in every layer (layers an interrupted pass did not reach have none)."""
    for layer in cache.layers:
        extra = layer.get_seq_length() - length
        if extra > 0:
            layer.crop(-extra)
