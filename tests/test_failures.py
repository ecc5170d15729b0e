"""Bad input and signals, as a user meets them: real subprocesses, one line, the right exit, nothing half-written.

Bad input is refused before any work (``experiments/run.py``'s preflight, ``odmoe.schema``): exit 2, exactly
one stderr line ``odmoe: error: ...``, no traceback, no result directory. SIGINT/SIGTERM end a run with one
line, exit 128 + signal, ``meta.json`` status ``interrupted``, no child process left, and a rerun resumes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from test_runner import exp_command

from odmoe.errors import OdmoeError
from odmoe.paths import repo_root


def _env(home: Path, **extra: str) -> dict:
    return {**os.environ, "ODMOE_HOME": str(home), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def _one_error_line(res: subprocess.CompletedProcess, expect: str) -> None:
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2, res.stderr
    assert len(lines) == 1 and lines[0].startswith("odmoe: error:"), res.stderr
    assert expect in lines[0], lines[0]


def test_bad_input_is_refused_before_any_work(tmp_path, micro_mixtral_dir, odmoe_home, run_side_by_side):
    """Each class of bad input, end to end: exit 2, one line naming the key/value/fix, no traceback, and
    nothing written (refused before Hydra makes a run directory)."""
    results = tmp_path / "results"
    truncated = tmp_path / "truncated"
    shutil.copytree(micro_mixtral_dir, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    ref = ("+exp=reference", "model=micro-mixtral")
    cases = [
        ((*ref, "exp.output_len=abc"), "exp.output_len='abc' has the wrong type; expected an integer"),
        (("+exp=no_such_exp",), "no experiment 'no_such_exp'; choose one of: alignment_periods, e2e"),
        ((*ref, "hardware=no_such_hw"), "no hardware profile 'no_such_hw'; choose one of: cpu-emulated"),
        ((*ref, "device=cuda", "hardware=cpu-emulated"), "device=cuda runs on real GPUs"),
        (("+exp=reference", "model=local", f"model.path={truncated}"), "is truncated or corrupted"),
        (("+exp=e2e", "model=micro-mixtral", "system.workers=3"), "3 workers do not split into groups of 2"),
    ]
    runs = run_side_by_side([exp_command(*args, results=results) for args, _ in cases], env=_env(odmoe_home))
    for (_, expect), res in zip(cases, runs, strict=True):
        _one_error_line(res, expect)
        assert "Traceback" not in res.stderr
    assert not results.exists()


@pytest.mark.parametrize(
    "args, expect",
    [
        (["exp.outptu_len=5"], "unknown key exp.outptu_len"),
        (["+exp.outptu_len=5"], "unknown key exp.outptu_len; exp takes: name, num_prompts"),
        (["model.dtype=float8"], "model.dtype='float8' is not allowed; expected one of: float32"),
        (["model=local"], "model.path has no value"),
        (["timing=wall", "hardware=cpu-emulated"], "timing=wall runs on real hardware"),
        (["-m", "exp.output_len=4,x"], "exp.output_len='x' has the wrong type"),  # every sweep point
        (["exp.output_len=4,5"], "Ambiguous value for argument 'exp.output_len=4,5'"),
    ],
)
def test_preflight_names_key_value_and_fix(args, expect, micro_mixtral_dir):
    from experiments.run import preflight

    with pytest.raises(OdmoeError, match=re.escape(expect)):
        flags = [a for a in args if a.startswith("-")]  # Hydra's flags come before the overrides
        preflight([*flags, "+exp=reference", "model=micro-mixtral", *(a for a in args if a not in flags)])


@pytest.mark.parametrize(
    "args, expect",
    [
        (["system.shadow.precision=int9"], "system.shadow.precision='int9' is not allowed"),
        (["system.shadow.alignment=T0_KV1"], "system.shadow.alignment: token alignment period '0'"),
        (["+system.shadow.foo=1"], "unknown key system.shadow.foo; system.shadow takes: predictor"),
        (["+exp.overrides.hobbit={t1:abc}"], "exp.overrides.hobbit.t1='abc' has the wrong type"),
        (["exp.workloads=[[16,x]]"], "exp.workloads[0]=[16, 'x'] has the wrong type; expected a list of"),
        (["exp.systems=[cached,odmoee]"], "exp.systems='odmoee' is not allowed"),
    ],
)
def test_system_configs_are_checked_before_any_rank_starts(args, expect, micro_mixtral_dir):
    from experiments.run import preflight

    with pytest.raises(OdmoeError, match=re.escape(expect)):
        preflight(["+exp=e2e", "model=micro-mixtral", *args])


def test_every_shipped_config_passes_its_schema():
    """Each experiment, system and hardware profile in conf/ validates (a new key needs its schema field)."""
    from hydra import compose, initialize_config_dir

    from odmoe.schema import available, validate

    with initialize_config_dir(str(repo_root() / "conf"), version_base="1.3"):
        for exp in available("exp"):
            validate(compose("config", [f"+exp={exp}"]))
        for hardware in available("hardware"):
            validate(compose("config", ["+exp=reference", f"hardware={hardware}", "timing=modelled"]))
        for system in available("system"):
            validate(compose("config", ["+exp=quality", f"+system={system}"]))


def test_corrupted_safetensors_header_is_refused(tmp_path, micro_mixtral_dir):
    from odmoe.models.load import check_weights

    check_weights(micro_mixtral_dir)  # intact
    data = bytearray((micro_mixtral_dir / "model.safetensors").read_bytes())
    data[8:40] = b"\xff" * 32  # the JSON header
    (tmp_path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(OdmoeError, match="unreadable header"):
        check_weights(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 4)
    with pytest.raises(OdmoeError, match="shorter than a header"):
        check_weights(tmp_path)


def test_impossible_layout_under_torchrun_is_one_line_from_rank_0(tmp_path, micro_mixtral_dir, odmoe_home):
    """Only rank 0 speaks, and odmoe's torchrun front end drops the agent's ChildFailedError report and
    exits 2 (plain torchrun prints the same one line, then its report, and exits 1)."""
    cmd = [sys.executable, "-m", "odmoe.torchrun", "--nproc-per-node", "2", "-m", "odmoe.launch"]
    cmd += ["model=micro-mixtral", "system.workers=2", "--prompt-len", "8", "--output-len", "4"]
    res = subprocess.run(
        cmd, capture_output=True, text=True, env=_env(odmoe_home), cwd=repo_root(), timeout=300
    )
    ours = [line for line in (res.stdout + res.stderr).splitlines() if line.startswith("odmoe: error:")]
    assert len(ours) == 1 and "2 processes were started but the layout needs 4" in ours[0], res.stderr
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and "ChildFailedError" not in res.stderr, res.stderr
    assert "exitcode" not in res.stderr and "odmoe: error:" in res.stderr.splitlines()[-1], res.stderr


def _forked_children(pid: int) -> list[int]:
    """Children of ``pid`` that are forks of it (same command line: pool workers, not git or helpers)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and (stat.parent / "cmdline").read_bytes() == cmdline:
                out.append(int(stat.parent.name))
        except OSError:
            continue
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_for(what, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.time() + timeout
    while not what():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.time() < deadline, "timed out waiting"
        time.sleep(0.05)


class _Watched:
    """A subprocess whose stderr is collected by a thread, so a test can wait for a line and then signal."""

    def __init__(self, cmd: list[str], env: dict):
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env)
        self.err = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for chunk in iter(lambda: self.proc.stderr.read1(4096), b""):
            self.err += chunk.decode(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 600) -> None:
        _wait_for(lambda: re.search(pattern, self.err), timeout, self.proc)

    def stop(self, sig: int) -> int:
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=120)
        self._reader.join(10)
        return code


def test_ctrl_c_during_training_checkpoints_and_the_rerun_resumes(tmp_path, micro_mixtral_dir):
    """SIGINT mid-training: one line, exit 130, a checkpoint and no temporary model directory; the rerun
    resumes from that step (not from zero), and a SIGTERM there checkpoints again."""
    home, results = tmp_path / "home", tmp_path / "results"
    cmd = exp_command("+exp=pretrain", "model=micro-mixtral", results=results)
    first = _Watched(cmd, _env(home))
    try:
        first.wait_for(r"train micro-mixtral: +\d+%\|[^|]*\| [1-9]\d*/150")  # a step has finished
        assert first.stop(signal.SIGINT) == 128 + signal.SIGINT, first.err
    finally:
        first.proc.kill()
    assert "Traceback" not in first.err and "KeyboardInterrupt" not in first.err
    assert (
        first.err.rstrip().splitlines()[-1]
        == "odmoe: interrupted by SIGINT; rerun the same command to resume"
    )
    models = home / "models"
    assert sorted(p.name for p in models.iterdir()) == [".micro-mixtral.checkpoint"]  # no tmp dir, no model
    state = models / ".micro-mixtral.checkpoint" / "state.json"
    stopped_at = json.loads(state.read_text())["step"]
    assert 1 <= stopped_at < 150 and len(json.loads(state.read_text())["log"]) == stopped_at
    meta = json.loads((results / "pretrain" / "default" / "meta.json").read_text())
    assert meta["status"] == "interrupted" and meta["signal"] == "SIGINT"

    again = _Watched(cmd, _env(home))
    try:
        again.wait_for(f"resuming the training of micro-mixtral at step {stopped_at} of 150")
        code = again.stop(signal.SIGTERM)
    finally:
        again.proc.kill()
    assert "Traceback" not in again.err
    # on an idle host the rest of the 150 steps can finish before the signal lands: then the model is written
    if code == 0:
        assert (models / "micro-mixtral" / "model.safetensors").exists() and not state.exists()
    else:
        assert code == 128 + signal.SIGTERM, again.err
        assert json.loads(state.read_text())["step"] >= stopped_at


def test_interrupted_training_resumes_to_the_same_model(tmp_path, monkeypatch, one_thread):
    """Interrupted (SIGINT at a checkpoint) and resumed training gives bitwise the weights and losses of an
    uninterrupted one (a nano recipe, so the test takes seconds)."""
    from dataclasses import replace

    import torch
    from safetensors.torch import load_file

    from odmoe.models import tiny
    from odmoe.signals import Interrupted

    base = tiny.EMBEDDED["micro-mixtral"]
    nano = dict(base.config, num_hidden_layers=2, hidden_size=16, intermediate_size=32)
    spec = replace(base, config=nano, steps=12, batch_size=2, seq_len=32, train_chapters=20, eval_windows=2)
    monkeypatch.setitem(tiny.EMBEDDED, "nano", spec)
    monkeypatch.setattr(tiny, "CHECKPOINT_EVERY", 4)
    tiny.train_embedded("nano", tmp_path / "straight", progress=False)
    state = tmp_path / ".resumed.checkpoint" / "state.json"

    def interrupt_at_first_checkpoint() -> None:
        while not state.exists():
            time.sleep(0.001)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_at_first_checkpoint, daemon=True).start()
    with pytest.raises(Interrupted):
        tiny.train_embedded("nano", tmp_path / "resumed", progress=False)
    assert 4 <= json.loads(state.read_text())["step"] < 12
    assert sorted(p.name for p in tmp_path.iterdir()) == [".resumed.checkpoint", "straight"]
    tiny.train_embedded("nano", tmp_path / "resumed", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resumed", "straight"]
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logs = [pd.read_csv(tmp_path / d / "train_log.csv") for d in ("straight", "resumed")]
    assert list(logs[1].step) == list(range(12))
    pd.testing.assert_series_equal(logs[0].loss, logs[1].loss)


def test_stopped_rank_under_torchrun_is_killed_not_left_to_linger(tmp_path, micro_mixtral_dir, odmoe_home):
    """SIGSTOP a worker under torchrun: the rank that blames it kills it; every process is gone within
    system.timeout_s + 10 s (torchrun's agent alone would leave it stopped for its 30 s grace period)."""
    timeout, out = 3, tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "-m", "odmoe.launch"]
    cmd += ["model=micro-mixtral", "system.workers=2", f"system.timeout_s={timeout}"]
    # several requests: on an idle host one 480-token decode can end before the stopped rank is missed
    cmd += ["--prompt-len", "8", "--output-len", "480", "--num-prompts", "6", "--out", str(out)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(odmoe_home)
    )
    pids: dict[int, int] = {}
    try:
        _wait_for(lambda: (out / "status").exists() and len(list(out.glob("rank*.pid"))) == 4, 600, proc)
        pids = {int(p.name[4:-4]): int(p.read_text()) for p in out.glob("rank*.pid")}
        os.kill(pids[3], signal.SIGSTOP)
        t0 = time.time()
        output, _ = proc.communicate(timeout=timeout + 30)
    finally:  # a failed run leaves nothing behind either
        proc.kill()
        for pid in pids.values():
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    gone = [r for r, pid in pids.items() if not _alive(pid)]
    assert time.time() - t0 < timeout + 10, output
    assert sorted(gone) == [0, 1, 2, 3], output
    ours = "\n".join(line for line in output.splitlines() if "odmoe:" in line)
    assert "worker 1 (rank 3) stopped responding" in output, ours


# the host's own seconds for a piece of work (wall or CPU) differ from run to run; every other column must not
_HOST_SECONDS = ["seconds", "ms_per_token", "build_seconds", "fit_wall_s", "train_cpu_s"]


def _tables(run_dir: Path) -> dict[str, pd.DataFrame]:
    return {
        str(p.relative_to(run_dir)): pd.read_csv(p).drop(columns=_HOST_SECONDS, errors="ignore")
        for p in sorted(run_dir.rglob("*.csv"))
    }


def _cluster_ranks(pid: int, run_dir: Path) -> list[int] | None:
    """The OD-MoE cluster's rank pids once all four are up, else None."""
    cluster = run_dir / "cluster-odmoe"
    pids = list(cluster.glob("rank*.pid"))
    return [int(p.read_text()) for p in pids] if (cluster / "status").exists() and len(pids) == 4 else None


def _forked_workers(pid: int, run_dir: Path) -> list[int] | None:
    workers = _forked_children(pid)
    return workers if len(workers) >= 2 else None


def _first_capture(pid: int, run_dir: Path) -> list[int] | None:
    return _forked_children(pid) if any((run_dir / "captures").glob("*")) else None


# what to run, and when (with which child processes) to interrupt it
_RESUMABLE = {
    # while the OD-MoE cluster decodes (the cached rows are done); modelled time, so the rerun's timings
    # are the uninterrupted run's to the last digit
    "e2e": (
        ("+exp=e2e", "model=micro-mixtral", "timing=modelled", "system.workers=2", "exp.num_prompts=2")
        + ("exp.systems=[cached,odmoe]", "exp.workloads=[[8,6]]", "exp.ppl_tokens=16"),
        _cluster_ranks,
    ),
    # while forked workers replay shadows
    "recall": (
        ("+exp=recall", "model=micro-mixtral", "exp.num_prompts=2", "exp.prompt_len=8", "exp.output_len=16")
        + ("exp.workers=2", "exp.precisions=[fp16]", "exp.alignments=[none,token_kv]"),
        _forked_workers,
    ),
    # once the first reference capture is saved
    "predictors": (
        ("+exp=predictors", "model=micro-mixtral", "exp.eval_prompts=1", "exp.calib_prompts=2")
        + ("exp.prompt_len=8", "exp.output_len=4", "exp.max_lookahead=3", "exp.sep_precisions=[fp16]")
        + ("exp.learned.steps=5", "exp.preattn.steps=5", "exp.moe_beyond.steps=5", "exp.proc_workers=1"),
        _first_capture,
    ),
}


@pytest.mark.parametrize(
    "exp,sig", [("e2e", signal.SIGTERM), ("recall", signal.SIGTERM), ("predictors", signal.SIGINT)]
)
def test_interrupted_experiment_resumes_to_the_uninterrupted_tables(
    exp, sig, tmp_path, micro_mixtral_dir, odmoe_home
):
    """A signal mid-run: one line, exit 128 + signal, ``interrupted`` in meta.json, no summary, every child
    (cluster ranks, forked workers) gone; the rerun of the same command writes the uninterrupted run's
    tables. The uninterrupted run goes alongside, on the other core."""
    args, started = _RESUMABLE[exp]
    straight = subprocess.Popen(
        exp_command(*args, results=tmp_path / "straight"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True, env=_env(odmoe_home),
    )  # fmt: skip
    results = tmp_path / "resumed"
    run_dir = results / exp / "default"
    run = _Watched(exp_command(*args, results=results), _env(odmoe_home))
    children: list[int] = []

    def interruptible() -> bool:
        found = started(run.proc.pid, run_dir)
        children[:] = found or []
        return found is not None

    try:
        _wait_for(interruptible, 600, run.proc)
        assert run.stop(sig) == 128 + sig, run.err
    finally:
        run.proc.kill()
    assert "Traceback" not in run.err
    ours = [line for line in run.err.splitlines() if line.startswith("odmoe:")]
    assert ours == [f"odmoe: interrupted by {sig.name}; rerun the same command to resume"], run.err
    time.sleep(0.5)
    assert not [pid for pid in children if _alive(pid)]
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["status"] == "interrupted" and meta["signal"] == sig.name
    assert not (run_dir / "summary.json").exists()
    again = subprocess.run(
        exp_command(*args, results=results), capture_output=True, text=True, env=_env(odmoe_home)
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((run_dir / "meta.json").read_text())["status"] == "complete"
    assert straight.wait(timeout=600) == 0, straight.stderr.read()[-2000:]
    expected, got = _tables(tmp_path / "straight" / exp / "default"), _tables(run_dir)
    assert expected.keys() == got.keys()
    for name, table in expected.items():
        pd.testing.assert_frame_equal(got[name], table, obj=name)
