"""The worker node: experts in host memory, one (or a few) device slots, load -> compute -> discard.

A worker keeps in host memory every expert it may be asked for (:meth:`Layout.host_experts`: all
experts of the layers its group serves, since a misprediction can ask for any, plus its prefill
experts). Its device holds ``system.slots`` expert-sized buffers (default 1, the paper's "< 1 GB per
worker": one fp32 Mixtral expert is 0.70 GB; 2 double-buffers, so the next served layer can load
while the current one waits for its hidden state) plus the activations of the rows it computes.

Per request it walks a fixed list of jobs, in the order the main node will need them:
prefill (layer, expert) pairs of its prefill share, then for every decode iteration n the positions
it holds in each layer its group serves. A job's expert is known
  * for prefill, in advance (worker i takes expert i);
  * for decode, from the shadow's PREDICT message, or, if the main node's HIDDEN message comes first
    (late departure, no shadow), from the main node's assignment;
and the load starts as soon as a slot is free. The HIDDEN message carries the main node's final
assignment (set matching, :func:`odmoe.runtime.layout.resolve`); a slot holding another expert is
reloaded on the critical path: that wait is the *stall*, measured here and sent back with the output.

On a virtual clock (``timing=measured|modelled``) "which came first" is decided on virtual delivery times:
the worker waits until both the hidden state and the prediction of a job physically exist, then issues
the load at ``max(slot free, first delivery)``, loading the truth if the hidden state was delivered by then
and the prediction in force otherwise. Its copy engine serves jobs in job order (a later job's prefetch
queues behind an earlier job's reload), as the simulator's schedule does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from odmoe.device import Load
from odmoe.models.adapter import swiglu_expert
from odmoe.models.load import load_model
from odmoe.runtime import memory
from odmoe.runtime.layout import MAIN, Layout
from odmoe.runtime.messages import Kind, key_of, predictions, settled_version
from odmoe.runtime.node import JOB_STRIDE, Node, tick
from odmoe.runtime.shadow import speculative

EXPERT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Job:
    prefill: bool
    layer: int
    n: int = 0  # decode iteration (message tick)
    position: int = 0  # decode position, or the prefill expert
    slot: int | None = None
    expert: int | None = None  # expert in (or loading into) the slot
    load: Load | None = None
    from_prediction: bool = False
    reloads: int = 0
    issued: float = 0.0  # virtual clock: when the job's (first) load was issued


class WorkerNode:
    def __init__(self, node: Node):
        self.node = node
        self.layout: Layout = node.layout
        self.w = node.rank - 2
        spec = node.spec
        fmt = spec["system"].get("expert_dtype", "fp32")
        if fmt not in EXPERT_DTYPES:
            from odmoe.errors import OdmoeError

            raise OdmoeError(f"unknown system.expert_dtype {fmt!r}; use fp32 (exact), fp16 or bf16")
        self.dtype = EXPERT_DTYPES[fmt]
        m = spec["model"]
        lm = load_model(m["name"], m.get("path"), m.get("dtype", "float32"), "cpu")
        adapter = lm.adapter
        first = adapter.experts(adapter.moe_layers[0])
        self.act = first.act_fn
        self.h, self.f = adapter.hidden_size, adapter.expert_intermediate_size
        self.gate_up_numel = 2 * self.f * self.h
        self.store: dict[tuple[int, int], torch.Tensor] = {}
        for layer, e in self.layout.host_experts(self.w):
            ew = adapter.expert_weights(layer, e)
            flat = torch.cat([ew.gate_up.reshape(-1), ew.down.reshape(-1)]).to(self.dtype)
            self.store[(layer, e)] = node.device.host_store(flat)
        del lm, adapter, first
        self.host_bytes = sum(t.numel() * t.element_size() for t in self.store.values())
        node.device.alloc_slots(self.layout.slots, self.gate_up_numel + self.h * self.f, self.dtype)
        node.device.on_done = lambda _load: node.comm.mailbox.notify()
        self.free_slots = list(range(self.layout.slots))
        self.pricer = node.pricer(self.layout.moe_layers[-1] + 1, "main")
        self.predicts = node.system.get("shadow", {}).get("predictor", "sep") != "none"

    # ---- one request ---------------------------------------------------------------------
    def jobs(self, job: int, output_len: int) -> list[Job]:
        out = [
            Job(True, layer, tick(job, 0), e)
            for layer in self.layout.moe_layers
            for e in self.layout.prefill_experts(self.w)
        ]
        for n in range(1, output_len):
            for layer in self.layout.served_layers(self.w):
                for p in self.layout.positions(self.w, layer):
                    out.append(Job(False, layer, tick(job, n), p))
        return out

    def run(self) -> None:
        while True:
            start = self.node.comm.receive(key_of(Kind.START), "the next request (START)", Layout.name(MAIN))
            job, _prompt_len, output_len = start.ints[:3]
            if job < 0:
                return
            self.speculative = speculative(self.node, self.node.spec["jobs"][job])
            self.serve(job, output_len)

    def serve(self, job: int, output_len: int) -> None:
        dev, mb = self.node.device, self.node.comm.mailbox
        dev.reset_peak()
        loads0, bytes0, dropped0 = dev.loads, dev.bytes_loaded, mb.dropped
        jobs = self.jobs(job, output_len)
        serve = self._serve_virtual if self.node.clock.virtual else self._serve_wall
        stalls, reloads, prefill_peak = serve(jobs)
        if prefill_peak is None:
            prefill_peak = dev.peak_bytes()
        cats = dev.ledger.peak_by_category()
        ints = [
            job,
            dev.loads - loads0,
            dev.bytes_loaded - bytes0,
            dev.peak_bytes(),
            prefill_peak,
            cats.get("slots", 0),
            cats.get("activations", 0),
            reloads,
            stalls,
            self.host_bytes,
            mb.peak,
            mb.dropped - dropped0,
        ]
        self.node.comm.send(MAIN, Kind.JOB_END, tick(job, 0), self.node.rank, ints)

    # ---- virtual clock: decisions on delivery times -------------------------------------------
    def _serve_virtual(self, jobs: list[Job]) -> tuple[int, int, int | None]:
        dev, clock = self.node.device, self.node.clock
        slot_free = [clock.now()] * self.layout.slots  # START is here: prefill loads may begin
        stalls = reloads = 0
        prefill_peak = None
        for i, job in enumerate(jobs):
            job.slot = i % self.layout.slots
            if job.prefill:
                job.expert = job.position
                job.load = dev.load(job.slot, self.store[(job.layer, job.expert)], at=slot_free[job.slot])
                self._serve_prefill(job)
            else:
                if prefill_peak is None:
                    prefill_peak = dev.peak_bytes()
                    dev.reset_peak()
                    self.node.comm.mailbox.reset_peak()
                stall, reload = self._decode_virtual(job, slot_free[job.slot])
                stalls += stall > 0
                reloads += reload
            slot_free[job.slot] = clock.now()
        return stalls, reloads, prefill_peak

    def _decode_virtual(self, job: Job, free_at: float) -> tuple[float, int]:
        mb, dev = self.node.comm.mailbox, self.node.device
        what = f"the hidden state of iteration {job.n % JOB_STRIDE} layer {job.layer}"
        hidden = mb.wait_for(key_of(Kind.HIDDEN, job.n, job.layer), what, Layout.name(MAIN))
        truth = hidden.ints[job.position]
        preds = []
        if self.predicts:
            preds = predictions(mb, job.n, job.layer, settled_version(mb, job.n, self.speculative))
        known = min([hidden.arrive, *(m.arrive for m in preds)])
        issue = max(free_at, known)
        in_force = [m for m in preds if m.arrive <= issue]
        if hidden.arrive <= issue or not in_force:
            job.expert, job.from_prediction = truth, False
        else:
            job.expert, job.from_prediction = in_force[-1].ints[1 + job.position], True
        job.load = dev.load(job.slot, self.store[(job.layer, job.expert)], at=issue)
        job.issued = issue
        reload = 0
        if job.expert != truth:  # misprediction: the truth is loaded once the hidden state brings it
            job.load = dev.load(job.slot, self.store[(job.layer, truth)], at=hidden.arrive)
            job.expert, reload = truth, 1
        self._finish_decode_job(job)
        return self._compute_decode(job, hidden, reload)

    def _finish_decode_job(self, job: Job) -> None:
        """Forget a decode job's messages once this worker's last position of (n, layer) is decided."""
        if job.position != self.layout.positions(self.w, job.layer)[-1]:
            return
        mb = self.node.comm.mailbox
        mb.retire(Kind.PREDICT, job.n, job.layer)  # a prediction still on its way is dropped when it comes
        if job.layer == self.layout.served_layers(self.w)[-1]:
            mb.retire(Kind.SETTLED, job.n)

    def _compute_decode(self, job: Job, hidden, reload: int) -> tuple[float, int]:
        """Use the hidden state, wait for the expert, compute, send the output back."""
        clock = self.node.clock
        if job.position == self.layout.positions(self.w, job.layer)[-1]:
            self.node.comm.mailbox.discard(key_of(Kind.HIDDEN, job.n, job.layer))
        clock.receive(hidden.arrive, hidden.arrive_bound)
        if clock.virtual:
            stall = clock.wait_copy(job.load.done)
        else:
            arrived = time.perf_counter()
            self._await(job)
            stall = max(0.0, time.perf_counter() - arrived)
        t0 = clock.now()
        y = self._compute(job.slot, hidden.tensor.to(self.node.torch_device))
        compute = clock.now() - t0
        hit = int(job.from_prediction and not reload)
        net_in = hidden.arrive - hidden.sent if clock.virtual else 0.0
        lead = hidden.arrive - job.issued if clock.virtual else 0.0  # the copy's head start (Eq. 1's slack)
        ints = [job.expert, job.position, hit, int(job.from_prediction), reload]
        ints += [_ns(stall), _ns(compute), _ns(net_in), _ns(lead)]
        # wall: how long the hidden state was here before its output left, on this process's own clock; the
        # main node subtracts it from its own round trip, so network time needs no clock shared across machines
        ints.append(0 if clock.virtual else _ns(time.perf_counter() - hidden.seen))
        self.node.comm.send(MAIN, Kind.OUTPUT, job.n, job.layer, ints, y)
        return stall, reload

    # ---- wall clock: decisions on what has physically arrived ---------------------------------
    def _serve_wall(self, jobs: list[Job]) -> tuple[int, int, int | None]:
        dev, mb = self.node.device, self.node.comm.mailbox
        stalls = reloads = 0
        prefill_peak = None
        for i, head in enumerate(jobs):
            if not head.prefill and prefill_peak is None:
                prefill_peak = dev.peak_bytes()
                dev.reset_peak()
                mb.reset_peak()
            deadline = time.monotonic() + self.node.timeout
            while True:
                self._issue(jobs, i)
                if head.prefill and head.load is not None:
                    break
                if not head.prefill and mb.peek(key_of(Kind.HIDDEN, head.n, head.layer)) is not None:
                    break
                if time.monotonic() > deadline:
                    what = f"the hidden state of iteration {head.n % JOB_STRIDE} layer {head.layer}"
                    raise TimeoutError(
                        f"timed out after {self.node.timeout:g} s waiting for {what} from {Layout.name(MAIN)}"
                    )
                mb.wait_change(0.05)
            if head.prefill:
                self._serve_prefill(head)
            else:
                stall, reload = self._serve_decode(head)
                stalls += stall > 0
                reloads += reload
            self.free_slots.append(head.slot)
            self.free_slots.sort()
        return stalls, reloads, prefill_peak

    # ---- loads ---------------------------------------------------------------------------
    def _target(self, job: Job) -> tuple[int | None, bool]:
        """The expert a job should load now and whether it comes from a prediction."""
        if job.prefill:
            return job.position, False
        mb = self.node.comm.mailbox
        hidden = mb.peek(key_of(Kind.HIDDEN, job.n, job.layer))
        if hidden is not None:
            return hidden.ints[job.position], False
        preds = predictions(mb, job.n, job.layer, None)
        if preds:
            return preds[-1].ints[1 + job.position], True
        return None, False

    def _issue(self, jobs: list[Job], head: int) -> None:
        """Start loads for the next jobs (in order, one slot each) whose expert is known."""
        for job in jobs[head : head + self.layout.slots]:
            if job.load is not None:
                continue
            if not self.free_slots:
                return
            expert, predicted = self._target(job)
            if expert is None:
                continue
            job.slot = self.free_slots.pop(0)
            self._start(job, expert)
            job.from_prediction = predicted

    def _start(self, job: Job, expert: int) -> None:
        job.expert = expert
        job.load = self.node.device.load(job.slot, self.store[(job.layer, expert)])

    # ---- compute -------------------------------------------------------------------------
    def _compute(self, slot: int, x: torch.Tensor) -> torch.Tensor:
        buf = self.node.device.slots[slot]
        gate_up = buf[: self.gate_up_numel].view(2 * self.f, self.h)
        down = buf[self.gate_up_numel :].view(self.h, self.f)
        rows = x.shape[0]
        self.node.device.ledger.set(
            "activations", memory.worker_activation_bytes(rows, self.h, self.f, buf.element_size())
        )
        y = swiglu_expert(x.to(buf.dtype), gate_up, down, self.act).to(x.dtype)
        if self.pricer is not None:
            self.node.clock.charge(self.pricer.expert(rows))
        self.node.device.ledger.set("activations", 0)
        return y

    def _await(self, job: Job) -> None:
        if not job.load.wait(self.node.timeout):
            raise TimeoutError(f"an expert load did not finish within {self.node.timeout:g} s")

    def _serve_prefill(self, job: Job) -> None:
        comm, clock = self.node.comm, self.node.clock
        if not clock.virtual:
            self._await(job)
        key = key_of(Kind.PREFILL, job.n, job.layer, job.position)
        while True:
            msg = comm.receive(
                key, f"prefill rows of layer {job.layer} expert {job.position}", Layout.name(MAIN)
            )
            expert, chunk, last = msg.ints[:3]
            x = msg.tensor.to(self.node.torch_device)
            if clock.virtual and x.shape[0]:  # an expert without rows answers at once; its copy runs on
                clock.wait_copy(job.load.done)
            y = self._compute(job.slot, x) if x.shape[0] else x
            comm.send(MAIN, Kind.PREFILL_OUT, job.n, job.layer, [expert, chunk], y)
            if last:
                return

    def _serve_decode(self, job: Job) -> tuple[float, int]:
        """Wall clock: the hidden state is here (the wait loop saw it); reload on a misprediction."""
        hidden = self.node.comm.mailbox.peek(key_of(Kind.HIDDEN, job.n, job.layer))
        truth = hidden.ints[job.position]
        reload = 0
        if job.load is None:  # no prediction came in time: load after routing
            job.slot = self.free_slots.pop(0)
            self._start(job, truth)
        elif job.expert != truth:  # misprediction: reload on the critical path
            self._await(job)
            self._start(job, truth)
            reload = 1
        self._finish_decode_job(job)
        return self._compute_decode(job, hidden, reload)


def _ns(seconds: float) -> int:
    return int(round(seconds * 1e9))
