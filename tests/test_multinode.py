"""OD-MoE over several "machines": torchrun in separate Linux network namespaces, real TCP between them.

Each machine is a network namespace with its own loopback and one address on a private bridge (which lives
in a namespace of its own, so nothing touches the host's network). In each, the test runs the
"several machines" recipe of docs/runtime.md *as written there* (read from the file), with that machine's
variables. Needs root (``ip netns``); skipped, saying why, elsewhere. Every namespace and every process
started in one is removed after each test, on failure too, and namespaces left by a test process that
died are removed before the next test.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from odmoe.paths import repo_root

SUBNET = "10.19.0"
PREFIX = "odmoe"  # namespaces: odmoe<pytest pid>n<i>, odmoe<pytest pid>sw
NAME = re.compile(rf"^{PREFIX}(\d+)(n\d+|sw)$")


def recipe() -> str:
    """The shell block of docs/runtime.md's "Several machines" recipe, verbatim."""
    text = (repo_root() / "docs/runtime.md").read_text()
    after = text.split("<!-- several-machines recipe", 1)[1]
    return after.split("```bash\n", 1)[1].split("```", 1)[0]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _netns_pids(ns: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(ns: str) -> None:
    """Kill every process in namespace ``ns`` (all of them started by this harness), then delete it."""
    for _ in range(20):
        pids = _netns_pids(ns)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _remove_stale() -> None:
    """Namespaces of a test process that no longer exists (killed before its teardown ran)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        m = NAME.match(line.split()[0]) if line.strip() else None
        if m and not _alive(int(m.group(1))):
            _remove(line.split()[0])


def _die_with_parent() -> None:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Cluster:
    """``n`` machines: namespaces ``<name>n<i>`` holding interface ``clu0`` with ``addresses[i]``/24, their
    peers on bridge ``br0`` in namespace ``<name>sw``."""

    def __init__(self, n: int, addresses: list[str], logs: Path):
        self.name = f"{PREFIX}{os.getpid()}"
        self.ns = [f"{self.name}n{i}" for i in range(n)]
        self.addresses = addresses
        self.logs = logs
        self.procs: dict[int, subprocess.Popen] = {}

    def up(self) -> None:
        sw = f"{self.name}sw"
        _ip("netns", "add", sw)
        _ip("-n", sw, "link", "add", "br0", "type", "bridge")
        _ip("-n", sw, "link", "set", "br0", "up")
        for i, ns in enumerate(self.ns):
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")  # a new namespace's loopback starts down
            _ip(
                "link",
                "add",
                "name",
                "clu0",
                "netns",
                ns,
                "type",
                "veth",
                "peer",
                "name",
                f"p{i}",
                "netns",
                sw,
            )
            _ip("-n", sw, "link", "set", f"p{i}", "master", "br0")
            _ip("-n", sw, "link", "set", f"p{i}", "up")
            _ip("-n", ns, "addr", "add", f"{self.addresses[i]}/24", "dev", "clu0")
            _ip("-n", ns, "link", "set", "clu0", "up")

    def start(self, i: int, env: dict[str, str]) -> subprocess.Popen:
        """Run the recipe on machine ``i`` with its variables ``env``; output to ``logs/node<i>.log``."""
        full = dict(os.environ)
        full["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), full.get("PATH", "")])
        full["PYTHONPATH"] = os.pathsep.join([str(repo_root()), full.get("PYTHONPATH", "")]).rstrip(
            os.pathsep
        )
        for key in [k for k in full if k.startswith(("ODMOE_", "GLOO_", "MASTER_")) and k != "ODMOE_HOME"]:
            full.pop(key)
        full.pop("IFACE", None)
        full.update(env)
        log = open(self.logs / f"node{i}.log", "w")  # noqa: SIM115 - the child holds it
        self.procs[i] = subprocess.Popen(
            ["ip", "netns", "exec", self.ns[i], "bash", "-c", recipe()],
            env=full,
            cwd=repo_root(),
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
        log.close()
        return self.procs[i]

    def log(self, i: int) -> str:
        return (self.logs / f"node{i}.log").read_text()

    def kill(self, i: int) -> None:
        """Every process of machine ``i`` at once (SIGKILL): the machine is lost."""
        for pid in _netns_pids(self.ns[i]):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def running(self, i: int) -> list[int]:
        return _netns_pids(self.ns[i])

    def down(self) -> None:
        for ns in self.ns:
            _remove(ns)
        for p in self.procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass
        _remove(f"{self.name}sw")


def _namespaces_unavailable() -> str | None:
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "creating network namespaces (ip netns) needs root; CI runs as root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists():
        return "torchrun is not installed next to this Python"
    probe = f"{PREFIX}{os.getpid()}probe"
    out = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    if out.returncode != 0:
        return f"cannot create a network namespace here ({out.stderr.strip()})"
    return None


@pytest.fixture
def cluster(tmp_path, micro_mixtral_dir):
    """``make(n, addresses)`` builds a cluster of ``n`` namespaces; all are removed after the test, also when
    it fails or is interrupted (Ctrl-C, SIGTERM); a killed test process's are removed by the next one."""
    reason = _namespaces_unavailable()
    if reason:
        pytest.skip(reason)
    _remove_stale()
    made: list[Cluster] = []

    def make(n: int, addresses: list[str]) -> Cluster:
        c = Cluster(n, addresses, tmp_path)
        made.append(c)  # before building it: a half-built cluster is torn down too
        c.up()
        return c

    def interrupted(signum, frame):  # SIGTERM (CI cancelling) tears down like Ctrl-C does
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupted)
    try:
        yield make
    finally:
        for c in made:
            c.down()
        signal.signal(signal.SIGTERM, previous)


def machine_env(c: Cluster, i: int, nproc: int, args: str, **common) -> dict[str, str]:
    """The recipe's variables for machine ``i`` (docs/runtime.md's table)."""
    env = {
        "NODE_RANK": str(i),
        "NPROC": str(nproc),
        "NNODES": str(len(c.ns)),
        "HOST0": c.addresses[0],
        "PORT": "29500",
        "RUN_ID": "odmoe-test",
        "ODMOE_ARGS": args,
    }
    env.update({k: str(v) for k, v in common.items()})
    return env


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[int | None]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.1)
    return [p.poll() for p in procs]


# machine 0 holds main + shadow, machines 1 and 2 one worker each; addresses not in machine order (torchrun
# numbers machines by --local-addr when given, else host name then agent pid: machine 0 starting last is
# numbered last)
ADDRESSES = [f"{SUBNET}.30", f"{SUBNET}.20", f"{SUBNET}.10"]
NPROC = [2, 1, 1]


def _args(out: Path, output_len: int) -> str:
    return f"model=micro-mixtral system.workers=2 --prompt-len 8 --output-len {output_len} --num-prompts 1 --out {out}"


def test_three_machines_give_the_cached_models_output(cluster, tmp_path):
    """Main + shadow on machine 0, a worker on each of machines 1 and 2, machine 0 started last: the tokens
    are the cached model's, ranks 0 and 1 ran on machine 0, and the wall-clock figures are local durations."""
    import pandas as pd
    from transformers import AutoTokenizer

    from odmoe.data.prompts import embedded_prompts
    from odmoe.models import load_model
    from odmoe.trace import reference_decode

    c = cluster(3, ADDRESSES)
    outs = [tmp_path / f"out{i}" for i in range(3)]
    procs = []
    for i in (1, 2, 0):  # the rendezvous host joins last
        env = machine_env(c, i, NPROC[i], _args(outs[i], 6), IFACE="clu0", STARTUP_S=120, TIMEOUT_S=30)
        procs.append(c.start(i, env))
        if i == 2:
            time.sleep(2)
    codes = wait_all(procs, 150)
    assert codes == [0, 0, 0], "\n".join(c.log(i)[-1500:] for i in range(3))
    assert {p.name for p in outs[0].glob("rank*.pid")} == {"rank0.pid", "rank1.pid"}  # main + shadow here
    assert {p.name for p in outs[1].glob("rank*.pid")} == {"rank2.pid"}
    assert {p.name for p in outs[2].glob("rank*.pid")} == {"rank3.pid"}

    lm = load_model("micro-mixtral", device="cpu")
    tok = AutoTokenizer.from_pretrained(lm.path, local_files_only=True)
    (prompt,) = embedded_prompts(tok, 1, 8, "eval")
    expected = reference_decode(lm.model, lm.adapter, prompt.id, prompt.token_ids, 6).tokens.tolist()
    (result,) = [json.loads(line) for line in (outs[0] / "requests.jsonl").read_text().splitlines()]
    assert result["clock"] == "wall" and result["tokens"] == expected

    layers = pd.read_csv(outs[0] / "layers.csv")
    assert layers.net_in.isna().all() and layers.net_out.isna().all()  # one-way: would need one clock
    assert (layers.net_round_trip > 0).all() and (layers.net_round_trip <= layers.t_worker + 1e-6).all()
    assert layers["lead"].notna().all()


def test_machine_that_never_joins_ends_the_launch(cluster, tmp_path):
    """Machines 0 and 1 of 3 start; the rendezvous closes STARTUP_S after the first joined and both end
    with one line naming the machines that joined."""
    startup = 6
    c = cluster(3, ADDRESSES)
    t0 = time.monotonic()
    procs = [
        c.start(i, machine_env(c, i, NPROC[i], _args(tmp_path / f"out{i}", 4), STARTUP_S=startup))
        for i in (0, 1)
    ]
    codes = wait_all(procs, startup + 150)
    took = time.monotonic() - t0
    assert all(code not in (None, 0) for code in codes), codes
    assert took < startup + 120, (
        took
    )  # a hang guard: the window, then Python and torch start (slow when loaded)
    for i in (0, 1):
        lines = [line for line in c.log(i).splitlines() if line.startswith("odmoe:")]
        assert len(lines) == 1, c.log(i)[-2000:]
        assert lines[0].startswith("odmoe: error: only 2 of the 3 machines"), lines[0]


def test_killed_machine_ends_every_machine(cluster, tmp_path):
    """Kill every process of machine 2 (a worker) while decoding: machines 0 and 1 end within
    system.timeout_s + 10 s, the main node naming the lost worker; nothing is left running. Gloo's
    interface is left to the runtime here (IFACE unset)."""
    timeout = 5
    c = cluster(3, ADDRESSES)
    outs = [tmp_path / f"out{i}" for i in range(3)]
    procs = [
        c.start(i, machine_env(c, i, NPROC[i], _args(outs[i], 400), STARTUP_S=120, TIMEOUT_S=timeout))
        for i in range(3)
    ]
    deadline = time.monotonic() + 150
    while not (outs[0] / "status").exists():  # the main node writes it when the request starts decoding
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "\n".join(
            c.log(i)[-1500:] for i in range(3)
        )
        time.sleep(0.2)
    c.kill(2)
    t0 = time.monotonic()
    codes = wait_all(procs[:2], timeout + 30)
    took = time.monotonic() - t0
    assert all(code not in (None, 0) for code in codes), codes
    assert took < timeout + 10, took
    assert not c.running(0) and not c.running(1)
    main_log = c.log(0)
    assert "worker 1 (rank 3)" in main_log, main_log[-2000:]
    assert "stopping because" in c.log(1), c.log(1)[-2000:]


# ---- the pieces, without namespaces (no root needed) ------------------------------------------------
def _store():
    import torch.distributed as dist

    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)


def test_ranks_follow_machines_not_torchruns_order():
    """torchrun (c10d) numbered machine 2 first: the layout puts machine 0's two processes at ranks 0 and 1
    anyway; two machines claiming one index are refused."""
    import threading

    from odmoe.errors import OdmoeError
    from odmoe.runtime.net import layout_rank

    store = _store()
    launched = {0: (2, 0), 1: (1, 0), 2: (0, 0), 3: (0, 1)}  # torchrun's rank -> (machine, local rank)
    got = {}

    def join(r):
        got[r] = layout_rank(store, "a", r, launched[r], 4, 10)

    threads = [threading.Thread(target=join, args=(r,)) for r in launched]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {r: got[r][0] for r in launched} == {2: 0, 3: 1, 1: 2, 0: 3}
    assert got[0][1] == [(0, 0), (0, 1), (1, 0), (2, 0)]
    store.set("b/1", "0 0")  # another process says it is machine 0's local rank 0 too
    with pytest.raises(OdmoeError, match="two machines claim node rank 0"):
        layout_rank(store, "b", 0, (0, 0), 2, 10)


def test_heartbeat_age_is_measured_on_the_observers_clock():
    """Heartbeats are counters whose age this rank measures itself: a counter that stops moving is stale
    however the writer's clock is set; one that moves is not."""
    from odmoe.runtime.layout import Layout
    from odmoe.runtime.node import Node

    store = _store()
    layout = Layout.build(2, 2, 8, [0, 1])
    node = Node({}, 0, layout, None, None, None, None, store, None, 1.0, "t", None, None)
    node.STALE_S = 0.3
    for r in (1, 2, 3):
        store.set(node.key(f"hb/{r}"), "1")
    node._listen()
    assert node.stale_rank() is None
    time.sleep(0.4)
    for r in (1, 3):
        store.set(node.key(f"hb/{r}"), "2")
    node._listen()
    stale = node.stale_rank()
    assert stale is not None and stale[0] == 2 and stale[1] > 0.3


def test_interface_and_store_checks_say_what_to_set():
    """Gloo goes on the interface that reaches the store (loopback for a local store); a named interface
    that does not exist, a loopback store across machines and a missing machine are each one clear error."""
    from odmoe.errors import OdmoeError
    from odmoe.runtime import net

    env = {}
    assert net.choose_gloo_interface("127.0.0.1", env) == "lo" and env["GLOO_SOCKET_IFNAME"] == "lo"
    with pytest.raises(OdmoeError, match="GLOO_SOCKET_IFNAME=nosuch0: no interface nosuch0"):
        net.choose_gloo_interface("127.0.0.1", {"GLOO_SOCKET_IFNAME": "nosuch0"})
    net.check_master_addr("localhost", 1)  # one machine: loopback is right
    with pytest.raises(OdmoeError, match="loopback address.*ODMOE_STORE"):
        net.check_master_addr("localhost", 2)
    assert net.store_address({"ODMOE_STORE": "10.0.0.1:29500", "MASTER_ADDR": "x"}) == ("10.0.0.1", 29500)
    with pytest.raises(OdmoeError, match="only 2 of the 3 machines"):
        net.check_machines_joined({"ODMOE_NNODES": "3", "GROUP_WORLD_SIZE": "2"})
    net.check_machines_joined({"ODMOE_NNODES": "3", "GROUP_WORLD_SIZE": "3"})


def test_missing_machine_line_is_out_before_any_local_rank_exits(tmp_path):
    """A machine that never joined. Each machine's first local rank says so at once, even with the store
    gone (machine 0's agent may have ended first); no rank exits until every machine has said it, or a
    rank's exit lets torchrun terminate a rank that has not spoken yet. One line per machine, exit 2."""
    store = _store()
    env = {
        **os.environ,
        "ODMOE_NNODES": "3",
        "GROUP_WORLD_SIZE": "2",
        "GROUP_RANK": "0",
        "TORCHELASTIC_RUN_ID": "never-joined",
        "ODMOE_STORE": f"127.0.0.1:{store.port}",
    }

    def start(local_rank: int, local_world: int = 2, **extra: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "odmoe.launch", "model=micro-mixtral"],
            env={**env, "LOCAL_RANK": str(local_rank), "LOCAL_WORLD_SIZE": str(local_world), **extra},
            stderr=subprocess.PIPE,
            text=True,
            cwd=repo_root(),
        )

    def first_line(proc: subprocess.Popen) -> str:
        ready, _, _ = select.select([proc.stderr], [], [], 30)
        return proc.stderr.readline() if ready else ""

    with socket.socket() as s:  # a port nothing listens on: the store has gone
        s.bind(("127.0.0.1", 0))
        gone = f"127.0.0.1:{s.getsockname()[1]}"
    alone = start(0, 1, ODMOE_STORE=gone, GROUP_RANK="1")  # machine 1, one process
    line = first_line(alone)
    assert line.startswith("odmoe: error: only 2 of the 3 machines") and alone.poll() is None, line

    second = start(1)  # machine 0's local rank 1: nothing to say, and it must not exit
    time.sleep(8)  # time to import torch and reach the store
    assert second.poll() is None, second.communicate()[1]
    first = start(0)
    line = first_line(first)
    assert line.startswith("odmoe: error: only 2 of the 3 machines"), line
    time.sleep(2)
    assert first.poll() is None and second.poll() is None  # machine 1 has not said it in this store
    store.set("odmoe/never-joined/bad_input/1", "said")
    outs = [p.communicate(timeout=60)[1] for p in (first, second, alone)]
    assert [p.returncode for p in (first, second, alone)] == [2, 2, 2], outs
    assert not any(line.startswith("odmoe:") for out in outs for line in out.splitlines()), outs  # once each
