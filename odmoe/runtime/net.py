"""Where a rank sits on the cluster network: its interface for gloo and its place in the layout.

Two things a multi-machine launch gets wrong by default, both found by running ranks in separate network
namespaces (``tests/test_multinode.py``):

* **gloo's interface.** Without ``GLOO_SOCKET_IFNAME`` gloo binds to the address the machine's *hostname*
  resolves to; on many machines (and in every namespace of one host) that is a loopback address such as
  127.0.1.1, which gloo then advertises to the other machines, and they connect to themselves.
  :func:`choose_gloo_interface` sets it, when unset, to the interface holding the local address the kernel
  uses to reach the runtime's store (:func:`store_address`): the cluster network by construction.
* **rank order.** ``torchrun --rdzv-backend c10d`` ignores ``--node-rank`` and numbers machines by sorting
  their host names (or ``--local-addr``) and agent pids, so "the first machine holds ranks 0 and 1" is not
  guaranteed. :func:`layout_rank` renumbers the processes by (``ODMOE_NODE_RANK``, local rank), so the
  main node and the shadow sit on the machine the user called node 0 whatever order torchrun chose.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import socket
import struct
import time

from odmoe.errors import OdmoeError

SIOCGIFADDR = 0x8915  # Linux ioctl: an interface's IPv4 address


def interfaces() -> list[str]:
    return [name for _, name in socket.if_nameindex()]


def interface_addresses() -> dict[str, str]:
    """IPv4 address of every interface that has one (Linux; empty elsewhere)."""
    out = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for name in interfaces():
            try:
                packed = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue
            out[name] = socket.inet_ntoa(packed[20:24])
    return out


def local_address_toward(host: str) -> str | None:
    """The local IPv4 address the kernel would use to reach ``host`` (nothing is sent: a UDP connect)."""
    try:
        addr = socket.getaddrinfo(host, None, socket.AF_INET)[0][4][0]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((addr, 9))
            return s.getsockname()[0]
    except OSError:
        return None


def choose_gloo_interface(master_addr: str, env: dict | None = None) -> str | None:
    """Set ``GLOO_SOCKET_IFNAME`` (in ``env``, default ``os.environ``) to the interface that reaches
    ``master_addr`` unless the user set it; refuse one that does not exist. Returns the interface used."""
    env = os.environ if env is None else env
    names = interfaces()
    given = env.get("GLOO_SOCKET_IFNAME")
    if given:
        missing = [n for n in given.split(",") if n not in names]
        if missing:
            raise OdmoeError(
                f"GLOO_SOCKET_IFNAME={given}: no interface {', '.join(missing)} on this machine "
                f"(it has {', '.join(names)}); set it to the interface holding this machine's cluster address "
                "(`ip -o -4 addr`), or unset it to use the one that reaches the rendezvous"
            )
        return given
    local = local_address_toward(master_addr)
    by_address = {a: n for n, a in interface_addresses().items()}
    chosen = by_address.get(local) if local else None
    if chosen is not None:
        env["GLOO_SOCKET_IFNAME"] = chosen
    return chosen


def store_address(env: dict | None = None) -> tuple[str, int]:
    """Where the runtime's store is: ``ODMOE_STORE`` (host:port; the recipe points it at the rendezvous
    store that machine 0's torchrun agent serves, which outlives the ranks and sits with the main node), else
    torchrun's ``MASTER_ADDR``/``MASTER_PORT`` (the store of whichever agent torchrun numbered 0)."""
    env = os.environ if env is None else env
    given = env.get("ODMOE_STORE")
    if given:
        host, _, port = given.rpartition(":")
        if not host or not port.isdigit():
            raise OdmoeError(f"ODMOE_STORE={given}: use host:port, e.g. ODMOE_STORE=$HOST0:29500")
        return host, int(port)
    return env["MASTER_ADDR"], int(env["MASTER_PORT"])


def check_machines_joined(env: dict | None = None) -> None:
    """``ODMOE_NNODES`` machines were asked for; fewer joined when torchrun's rendezvous window
    (``--nnodes 1:N``, ``last_call_timeout``) closed without the rest. Said before anything is loaded."""
    env = os.environ if env is None else env
    want, got = env.get("ODMOE_NNODES"), env.get("GROUP_WORLD_SIZE")
    if want and got and int(got) < int(want):
        raise OdmoeError(
            f"only {got} of the {want} machines (ODMOE_NNODES) joined the rendezvous before its window closed "
            "(last_call_timeout); start torchrun on every machine within that window, or lower NNODES"
        )


def check_master_addr(master_addr: str, machines: int) -> None:
    """On several machines the store must be at an address the others can reach, not a loopback one (torchrun
    publishes the host name of its first agent, or ``--local-addr``)."""
    if machines <= 1:
        return
    try:
        addr = ipaddress.ip_address(socket.getaddrinfo(master_addr, None, socket.AF_INET)[0][4][0])
    except (OSError, ValueError):
        return
    if addr.is_loopback:
        raise OdmoeError(
            f"torchrun published the rendezvous store at {master_addr} ({addr}), a loopback address, on a "
            f"launch over {machines} machines; set ODMOE_STORE=<machine 0's address>:<rendezvous port> on every "
            "machine (docs/runtime.md, Several machines), or pass --local-addr <its cluster address> to torchrun"
        )


def place_from_env(env: dict | None = None) -> tuple[int, int]:
    """(machine, local rank) of this process: ``ODMOE_NODE_RANK`` (else torchrun's ``GROUP_RANK``, its own
    numbering: right for a static rendezvous and on one machine) and ``LOCAL_RANK``."""
    env = os.environ if env is None else env
    return int(env.get("ODMOE_NODE_RANK", env.get("GROUP_RANK", "0"))), int(env.get("LOCAL_RANK", "0"))


def layout_rank(
    store, key: str, rank: int, place: tuple[int, int], world: int, timeout: float
) -> tuple[int, list[tuple[int, int]]]:
    """This process's rank in the OD-MoE layout and every process's (machine, local rank), in layout order.

    Processes are ordered by ``place`` (machine, local rank), not by the rank torchrun gave them (``rank``).
    Every process publishes its place under ``key`` in the store and waits (``timeout`` s) for the others'.
    """
    node, local = place
    store.set(f"{key}/{rank}", f"{node} {local}")
    keys = [f"{key}/{r}" for r in range(world)]
    deadline = time.monotonic() + timeout
    while not store.check(keys):
        if time.monotonic() > deadline:
            here = sum(store.check([k]) for k in keys)
            raise OdmoeError(
                f"only {here} of the {world} processes torchrun started reached the runtime within {timeout:g} s "
                "(system.startup_timeout_s); a machine failed to start its ranks or cannot reach the store"
            )
        time.sleep(0.05)
    places = [tuple(int(v) for v in store.get(k).decode().split()) for k in keys]
    order = sorted(range(world), key=lambda r: places[r])
    if len(set(places)) < world:
        dup = sorted({p for p in places if places.count(p) > 1})
        raise OdmoeError(
            f"two machines claim node rank {dup[0][0]} (ODMOE_NODE_RANK); give every machine its own index "
            "0..N-1, the one with the main node and the shadow 0"
        )
    return order.index(rank), [places[r] for r in order]
