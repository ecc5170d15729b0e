"""Small typed messages between ranks over ``torch.distributed`` point-to-point, and their mailbox.

Every message is one fixed-size int64 tensor: a 32-word header (kind, iteration ``n``, layer, up to
16 small ints, the payload's dtype and shape (up to 6 dims), the sender's virtual send time and the
message's virtual delivery time on the run's timeline and on the zero-stall bound's) followed by an inline
area for payloads up to :data:`INLINE_BYTES` (a decode hidden vector of the embedded model fits).
Larger payloads follow as a second message with another tag. One message per small exchange keeps
the per-hop cost low: on gloo a receive posted in advance and one send is the cheapest exchange.

Receiving: one thread per peer this rank hears from, each blocked in ``dist.recv(src=peer)``
(any-source receives are several times slower on gloo), files messages into a :class:`Mailbox`
keyed by (kind, n, layer[, first int]). A peer whose connection breaks is reported by name; so is a
wait that exceeds the run's timeout. A message is *physically* in the mailbox when its bytes came; it is
*used* at its virtual delivery time: :meth:`Comm.receive` advances the rank's clock to it. Decisions that
depend on which of two messages comes first are taken on virtual times once both physically exist
(conservative synchronization), never on which one the host happened to deliver first.

Priced bytes: a message costs its payload's bytes on the sender's NIC link, or, under ``timing=modelled``
at another model's shape, the bytes that model would send (hidden vectors, expert outputs, KV rows).

Messages travel as CPU tensors (on CUDA the runtime stages them through host memory, like the
paper's "serialize into a packet, deliver over the LAN, deserialize onto the GPU").
"""

from __future__ import annotations

import collections
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import torch
import torch.distributed as dist

from odmoe.clock import Clock
from odmoe.runtime.layout import Layout

HEADER = 32
MAX_INTS = 16
MAX_DIMS = 6
INLINE_BYTES = 2048
TAG_MSG, TAG_PAYLOAD = 7, 8


class Kind(IntEnum):
    START = 1  # main -> all: a new request (ints: job index, prompt length, output length; tensor: prompt)
    STOP = 2  # main -> all: no more requests
    PREDICT = 3  # shadow -> worker: predicted experts of (n, layer) (ints: experts in router order)
    HIDDEN = 4  # main -> worker: hidden state of (n, layer) (ints: true experts; tensor [T, H])
    OUTPUT = 5  # worker -> main: one expert's raw output (ints: expert, position, stats; tensor [T, H])
    PREFILL = 6  # main -> worker: prefill rows for (layer, expert) (ints: expert, chunk, last; tensor)
    PREFILL_OUT = 7  # worker -> main: output rows of one chunk (ints: expert, chunk; tensor)
    DONE = 8  # main -> shadow: iteration n finished (ints: next token or -1, first KV row, rows; tensor KV)
    JOB_END = 9  # worker/shadow -> main: per-request statistics (ints and a float64 tensor)
    SETTLED = 10  # shadow -> main, workers: iteration n's predictions are final at version ints[0]


CONTROL = {Kind.STOP, Kind.JOB_END, Kind.SETTLED}  # the emulator's own messages: never priced on a NIC
ROWS = {Kind.HIDDEN, Kind.OUTPUT, Kind.PREFILL, Kind.PREFILL_OUT}  # payload = hidden-size rows


KEYED_BY_FIRST_INT = {Kind.PREFILL, Kind.PREFILL_OUT}

_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8, torch.float64]
_CODE = {d: i for i, d in enumerate(_DTYPES)}


@dataclass
class Message:
    kind: Kind
    src: int
    n: int
    layer: int
    ints: list[int]
    tensor: torch.Tensor | None
    sent: float  # the sender's clock at send (on a virtual clock; never compared across ranks under wall)
    arrive: float  # virtual delivery time (0 under timing=wall)
    arrive_bound: float  # delivery on the zero-stall bound's timeline
    seen: float = 0.0  # time.perf_counter() of the receiving process when the bytes came (local only)

    @property
    def key(self) -> tuple:
        return key_of(
            self.kind, self.n, self.layer, self.ints[0] if self.kind in KEYED_BY_FIRST_INT else None
        )


def key_of(kind: Kind, n: int = 0, layer: int = 0, first: int | None = None) -> tuple:
    return (int(kind), int(n), int(layer)) if first is None else (int(kind), int(n), int(layer), int(first))


class PeerLost(RuntimeError):
    """A peer's connection broke: it died or closed its process group."""


class RunAborted(RuntimeError):
    """Another rank reported a failure; the message names the rank that failed first."""


class MessageError(RuntimeError):
    """A message that came intact could not be decoded: a bug in this code, not a network failure."""


class Mailbox:
    """Messages by key, in the order they physically came.

    A key whose messages can no longer be used is *retired* (:meth:`retire`): for the kinds the runtime
    retires (predictions, settled versions) every rank uses (n, layer) in increasing order, so retiring
    (kind, n, layer) also drops every message of that kind at or before (n, layer) that comes later, e.g. a
    prediction delivered after the main node's gate passed without it. So the mailbox holds only what can
    still be used and stays bounded however long a decode runs (``size``, ``peak``, ``dropped``).
    """

    def __init__(self, timeout: float):
        self.timeout = timeout
        self.cond = threading.Condition()
        self.boxes: dict[tuple, collections.deque[Message]] = collections.defaultdict(collections.deque)
        self.error: BaseException | None = None
        self.retired: dict[int, tuple[int, int]] = {}  # kind -> the latest (n, layer) retired
        self.size = 0  # messages held now
        self.peak = 0  # most held at once since ``reset_peak``
        self.dropped = 0  # messages that came after their key was retired

    def put(self, msg: Message) -> None:
        with self.cond:
            mark = self.retired.get(int(msg.kind))
            if mark is not None and (msg.n, msg.layer) <= mark:
                self.dropped += 1
                return
            self.boxes[msg.key].append(msg)
            self.size += 1
            self.peak = max(self.peak, self.size)
            self.cond.notify_all()

    def retire(self, kind: Kind, n: int, layer: int = 0) -> None:
        """Drop the messages of ``kind`` at (n, layer) and refuse any of them, or of an earlier (n, layer),
        that come later."""
        with self.cond:
            mark = (int(n), int(layer))
            self.retired[int(kind)] = max(mark, self.retired.get(int(kind), mark))
            box = self.boxes.pop(key_of(kind, n, layer), None)
            self.size -= len(box) if box else 0

    def reset_peak(self) -> None:
        with self.cond:
            self.peak = self.size

    def fail(self, error: BaseException) -> None:
        with self.cond:
            if self.error is None:
                self.error = error
            self.cond.notify_all()

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def peek(self, key: tuple) -> Message | None:
        """The first message under ``key`` if it is here, without taking it."""
        with self.cond:
            box = self.boxes.get(key)
            return box[0] if box else None

    def take(self, key: tuple) -> Message | None:
        with self.cond:
            box = self.boxes.get(key)
            if not box:
                return None
            msg = box.popleft()
            self.size -= 1
            if not box:
                del self.boxes[key]
            return msg

    def discard(self, key: tuple) -> None:
        with self.cond:
            box = self.boxes.pop(key, None)
            self.size -= len(box) if box else 0

    def all(self, key: tuple) -> list[Message]:
        """Every message under ``key`` that is here, oldest first, without taking them."""
        with self.cond:
            return list(self.boxes.get(key, ()))

    def wait_for(self, key: tuple, what: str, peer: str, until=None) -> Message:
        """Block until a message under ``key`` is here (without taking it), or until ``until(messages)`` is
        true; after ``timeout`` s name what and whom we waited for."""
        deadline = time.monotonic() + self.timeout
        with self.cond:
            while True:
                self.check()
                box = self.boxes.get(key)
                if box and (until is None or until(box)):
                    return box[0]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"timed out after {self.timeout:g} s waiting for {what} from {peer}")
                self.cond.wait(min(left, 0.5))

    def get(self, key: tuple, what: str, peer: str) -> Message:
        """Block until a message under ``key`` is here and take it."""
        msg = self.wait_for(key, what, peer)
        self.take(key)
        return msg

    def wait_change(self, seconds: float) -> None:
        """Sleep until something is put (at most ``seconds``)."""
        with self.cond:
            self.check()
            self.cond.wait(seconds)
            self.check()

    def notify(self) -> None:
        with self.cond:
            self.cond.notify_all()


def predictions(mb: Mailbox, n: int, layer: int, settled: int | None) -> list[Message]:
    """The shadow's predictions of (n, layer), oldest version first (a speculative shadow that reruns an
    iteration re-sends them with the next version in ``ints[0]``).

    ``settled=None`` (``timing=wall``): whatever is physically here now. On a virtual clock the caller knows
    the final version (0 with aligned departure; the SETTLED message's with speculative departure) and this
    blocks until it is physically here, so every version the shadow will ever send is in hand and the caller
    can pick by virtual delivery time (conservative synchronization).
    """
    key = key_of(Kind.PREDICT, n, layer)
    if settled is not None:
        mb.wait_for(
            key, f"the prediction of layer {layer}", "the shadow", lambda box: box[-1].ints[0] == settled
        )
    return mb.all(key)


def settled_version(mb: Mailbox, n: int, speculative: bool) -> int:
    """The final prediction version of iteration ``n``: 0 unless the shadow departs speculatively, in which
    case its SETTLED message (sent when it applied the alignment of ``n``) says."""
    if not speculative:
        return 0
    return mb.wait_for(key_of(Kind.SETTLED, n), "the settled predictions of an iteration", "the shadow").ints[
        0
    ]


def _pack(kind, n, layer, ints, tensor, times) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One message buffer (header + inline payload), and the payload to send after it if it is too big.

    Built through numpy views: this runs on the critical path twice per layer.
    """
    if len(ints) > MAX_INTS:
        raise ValueError(f"at most {MAX_INTS} ints per message, got {len(ints)}")
    arr = np.zeros(HEADER + INLINE_BYTES // 8, dtype=np.int64)
    arr[:4] = (int(kind), int(n), int(layer), len(ints))
    arr[4] = -1
    arr[[12, 13, 15]] = np.asarray(times, dtype=np.float64).view(np.int64)  # sent, arrive, arrive_bound
    arr[16 : 16 + len(ints)] = ints
    payload = None
    if tensor is not None:
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        if t.dim() > MAX_DIMS:
            raise ValueError(f"payload tensors have at most {MAX_DIMS} dimensions")
        nbytes = t.numel() * t.element_size()
        arr[4:6] = (_CODE[t.dtype], t.dim())
        arr[6 : 6 + t.dim()] = t.shape
        arr[14] = nbytes
        if nbytes and nbytes <= INLINE_BYTES:
            arr[HEADER:].view(np.uint8)[:nbytes] = t.reshape(-1).view(torch.uint8).numpy()
        elif nbytes:
            payload = t.reshape(-1).view(torch.uint8)
    return torch.from_numpy(arr), payload


def _unpack(buf: torch.Tensor, src: int, recv_payload: Callable[[int], torch.Tensor]) -> Message:
    h = buf[:HEADER].tolist()
    kind, n, layer, nints, code, ndim = h[0], h[1], h[2], h[3], h[4], h[5]
    ints = h[16 : 16 + nints]
    tensor = None
    if code >= 0:
        dtype = _DTYPES[code]
        shape = h[6 : 6 + ndim]
        nbytes = h[14]
        raw = (
            buf[HEADER:].view(torch.uint8)[:nbytes].clone()
            if nbytes <= INLINE_BYTES
            else recv_payload(nbytes)
        )
        tensor = raw.view(dtype).reshape(shape)
    sent, arrive, bound = buf[[12, 13, 15]].numpy().view(np.float64).tolist()
    return Message(Kind(kind), src, n, layer, ints, tensor, sent, arrive, bound)


def _payload_bytes(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()


class Comm:
    """This rank's messaging: sends (stamped with the rank's clock, priced on its NICs when emulated) and
    a mailbox fed by per-peer threads. ``nics`` are the (timeline, bound) NIC links of an emulated device;
    ``costs`` (``timing=modelled``) prices payloads at the cost model's shape."""

    def __init__(
        self, rank: int, peers: Iterable[int], clock: Clock, nics, costs, timeout: float, ports=None
    ):
        self.rank = rank
        self.clock = clock
        self.nics = nics
        self.ports = ports  # (timeline, bound) inbound port links, or None: see `arrived`
        self.costs = costs
        self.mailbox = Mailbox(timeout)
        self.stopping = False
        self.newest_prediction = (-1, -1)  # the latest (n, layer) whose prediction physically came here
        self.bytes_sent = 0
        self.messages_sent = 0
        self._send_lock = threading.Lock()
        self._pending: collections.deque = collections.deque()
        self.max_pending = 256
        self._threads = []
        for peer in sorted(set(peers) - {rank}):
            t = threading.Thread(target=self._receive, args=(peer,), name=f"rx-{peer}", daemon=True)
            t.start()
            self._threads.append(t)

    def send(
        self,
        dst: int,
        kind: Kind,
        n: int = 0,
        layer: int = 0,
        ints: Sequence[int] = (),
        tensor: torch.Tensor | None = None,
    ) -> None:
        nbytes = _payload_bytes(tensor)
        with self._send_lock:
            buf, payload = _pack(kind, n, layer, ints, tensor, self._stamp(kind, tensor, ints, nbytes))
            try:
                # isend: gloo's send waits for the receiver's side of the rendezvous; the caller should not
                # (it is on the critical path). Works complete in order per peer; they are reaped later.
                self._pending.append((dst, dist.isend(buf, dst, tag=TAG_MSG), buf))
                if payload is not None:
                    self._pending.append((dst, dist.isend(payload, dst, tag=TAG_PAYLOAD), payload))
                while len(self._pending) > self.max_pending:
                    self._reap()
            except RuntimeError as e:
                raise PeerLost(f"{Layout.name(dst)} is unreachable ({_short(e)})") from None
            self.bytes_sent += nbytes
            self.messages_sent += 1

    def _stamp(self, kind: Kind, tensor, ints, nbytes: int) -> tuple[float, float, float]:
        """(send time, delivery, delivery on the bound's timeline) of a message sent now."""
        t = self.clock.now()
        if self.nics is None:
            return t, 0.0, 0.0
        tb = self.clock.bound()
        if kind in CONTROL:
            return t, t, tb
        priced = self._priced(kind, tensor, ints, nbytes)
        nic, nic_bound = self.nics
        return t, nic.transfer(priced, t), nic_bound.transfer(priced, tb)

    def _priced(self, kind: Kind, tensor, ints, nbytes: int) -> float:
        """The bytes a message is priced at: its payload, or under ``timing=modelled`` the shape's."""
        if self.costs is not None and tensor is not None:
            if kind in ROWS:
                return self.costs.act_bytes(tensor.shape[0])
            if kind == Kind.DONE:
                return self.costs.alignment_bytes(int(ints[2]), token=False)
        return nbytes

    def receive(self, key: tuple, what: str, peer: str) -> Message:
        """Take the message under ``key`` (blocking) and use it: the clock moves to its delivery."""
        msg = self.mailbox.get(key, what, peer)
        self.clock.receive(msg.arrive, msg.arrive_bound)
        return msg

    def arrived(self, msgs: list[Message]) -> None:
        """Use messages taken together (one layer's expert outputs from several workers). With ``ports`` they
        first pass this rank's inbound switch port one after another, in delivery order: what the senders' own
        NICs cannot see is that they all converge on one port (the simulator's inbound FIFO of the main
        node); a tie goes to the lower sender rank, not to whichever message the host delivered first.
        Their ``arrive`` times are updated; the clock moves to the last."""
        if self.ports is not None:
            port, port_bound = self.ports
            for m in sorted(msgs, key=lambda m: (m.arrive, m.src)):
                nbytes = self._priced(m.kind, m.tensor, m.ints, _payload_bytes(m.tensor))
                m.arrive = port.receive(nbytes, m.arrive)
            for m in sorted(msgs, key=lambda m: (m.arrive_bound, m.src)):
                nbytes = self._priced(m.kind, m.tensor, m.ints, _payload_bytes(m.tensor))
                m.arrive_bound = port_bound.receive(nbytes, m.arrive_bound)
        for m in msgs:
            self.clock.receive(m.arrive, m.arrive_bound)

    def _reap(self) -> None:
        dst, work, _ = self._pending.popleft()
        if not work.wait():
            raise PeerLost(f"a message to {Layout.name(dst)} was not delivered")

    def flush(self) -> None:
        """Wait until every message sent so far has been delivered."""
        with self._send_lock:
            try:
                while self._pending:
                    self._reap()
            except RuntimeError as e:
                raise PeerLost(f"a peer became unreachable ({_short(e)})") from None

    def _receive(self, peer: int) -> None:
        def recv(t: torch.Tensor, tag: int) -> torch.Tensor:
            try:
                dist.recv(t, peer, tag=tag)
            except Exception as e:  # the connection broke: the peer died, or everyone is shutting down
                raise _Broken(e) from e
            return t

        def payload(nbytes: int) -> torch.Tensor:
            return recv(torch.empty(nbytes, dtype=torch.uint8), TAG_PAYLOAD)

        try:
            while True:
                buf = recv(torch.empty(HEADER + INLINE_BYTES // 8, dtype=torch.int64), TAG_MSG)
                try:
                    msg = _unpack(buf, peer, payload)
                except _Broken:
                    raise
                except Exception as e:  # noqa: BLE001 - the bytes came; decoding them failed
                    self.mailbox.fail(
                        MessageError(
                            f"could not decode a message from {Layout.name(peer)} "
                            f"({type(e).__name__}: {e}); a bug in odmoe's messages, not a lost connection"
                        )
                    )
                    return
                msg.seen = time.perf_counter()
                if msg.kind == Kind.STOP:
                    self.stopping = True
                elif msg.kind == Kind.PREDICT:
                    self.newest_prediction = max(self.newest_prediction, (msg.n, msg.layer))
                self.mailbox.put(msg)
        except _Broken as e:
            if not self.stopping:
                self.mailbox.fail(
                    PeerLost(f"lost the connection to {Layout.name(peer)} ({_short(e.__cause__)})")
                )


class _Broken(Exception):
    """A receive failed in the transport (as opposed to decoding what was received)."""


def _short(e: BaseException) -> str:
    """The gist of a transport error ("Connection reset by peer"), not gloo's whole paragraph."""
    text = str(e).strip()
    m = re.search(r"(Connection [a-z ]+|Socket [a-z ]+|Timed out [a-z ]+)", text)
    if m:
        return m.group(1).strip()
    lines = text.splitlines()
    return lines[0][:160] if lines else type(e).__name__
