"""The runtime's internal failures name their real cause; the mailbox holds only what can still be used;
every executor enforces its device's capacity."""

from __future__ import annotations

import multiprocessing as mp
import os
import socket

import pytest
import torch
import torch.distributed as dist
from test_runtime import prompts

from baselines import build_engine
from odmoe.clock import Clock, Timing
from odmoe.device import HostDevice
from odmoe.errors import OdmoeError
from odmoe.hardware import Device, load_profile
from odmoe.runtime.cached import run_cached
from odmoe.runtime.messages import Comm, Kind, Mailbox, Message, MessageError, key_of


def test_a_failing_copy_raises_its_own_error_not_a_timeout():
    """A copy that raises on the copy thread fails its load (and those queued behind it) with that error."""
    dev = HostDevice(load_profile("host"), "worker", torch.device("cpu"))
    dev.alloc_slots(1, 16, torch.float32)
    bad = dev.load(0, torch.ones(32))  # twice the slot: copy_ raises on the copy thread
    behind = dev.load(0, torch.ones(16))
    for load in (bad, behind):
        with pytest.raises(RuntimeError, match="size"):
            load.wait(5.0)
    good_dev = HostDevice(load_profile("host"), "worker", torch.device("cpu"))
    good_dev.alloc_slots(1, 16, torch.float32)
    assert good_dev.load(0, torch.ones(16)).wait(5.0) and good_dev.slots[0].sum() == 16


def _prediction(n: int, layer: int) -> Message:
    return Message(Kind.PREDICT, 1, n, layer, [0, 3, 5], None, 0.0, 0.0, 0.0)


def test_retired_predictions_are_dropped_when_they_come_late():
    mb = Mailbox(timeout=1.0)
    mb.put(_prediction(1, 0))
    mb.put(_prediction(1, 1))
    assert mb.size == 2
    mb.retire(Kind.PREDICT, 1, 0)
    assert mb.size == 1 and mb.peek(key_of(Kind.PREDICT, 1, 0)) is None
    mb.put(_prediction(1, 0))  # a second version of a retired key, too late to be used
    assert mb.size == 1 and mb.dropped == 1
    mb.retire(Kind.PREDICT, 1, 1)
    for layer in (0, 1):  # a whole iteration's predictions after the main node passed them
        mb.put(_prediction(1, layer))
    mb.put(_prediction(2, 0))  # the next iteration's is still usable
    assert mb.size == 1 and mb.dropped == 3 and mb.peek(key_of(Kind.PREDICT, 2, 0)) is not None
    assert mb.peak == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, result) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        if rank == 1:  # a message whose header names no kind: arrives intact, cannot be decoded
            buf = torch.zeros(32 + 2048 // 8, dtype=torch.int64)
            buf[0], buf[4] = 99, -1
            dist.send(buf, 0, tag=7)
            dist.barrier()
            return
        comm = Comm(0, [1], Clock("wall"), None, None, timeout=10.0)
        try:
            comm.mailbox.wait_for(key_of(Kind.START), "START", "rank 1")
        except BaseException as e:  # noqa: BLE001
            result.put(f"{type(e).__name__}: {e}")
        comm.stopping = True
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_a_message_that_cannot_be_decoded_is_reported_as_a_bug():
    """Real gloo between two processes: a garbled header is a MessageError naming the sender, not a
    lost connection."""
    ctx, port = mp.get_context("fork"), _free_port()
    result = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, result)) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    text = result.get(timeout=5)
    assert (
        text.startswith(MessageError.__name__) and "could not decode a message from shadow (rank 1)" in text
    )
    assert "ValueError" in text and "lost the connection" not in text


def test_every_executor_enforces_device_capacity(micro_mixtral):
    """The fully cached model and the offload engine refuse to exceed their (emulated) device memory, as
    OD-MoE's nodes do."""
    hw = load_profile("cpu-emulated")
    small = hw.with_(main=Device(name="small", memory=1.0e5))
    job = [{"id": "a", "prompt": prompts(1)[0], "output_len": 4}]
    with pytest.raises(OdmoeError, match=r"bytes needed on a device of [\d,]+ bytes"):
        run_cached(micro_mixtral, job, Timing("measured"), small, devices=1)
    assert run_cached(micro_mixtral, job, Timing("measured"), hw, devices=1)[0]["peak_total"] <= 16.0e6
    for name, cfg in [("cached", {}), ("mixtral_offloading", dict(quantize="none", attention="none"))]:
        with pytest.raises(OdmoeError, match=r"bytes needed on a device of [\d,]+ bytes"):
            engine = build_engine(name, cfg, micro_mixtral, small)
            try:
                engine.generate(job[0]["prompt"], 4)
            finally:
                engine.uninstall()
