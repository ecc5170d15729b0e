"""Real multi-process OD-MoE clusters (1 main + 1 shadow + workers) on the micro models.

Each test starts a local cluster with ``odmoe.launch.spawn_local`` (gloo, CPU-emulated devices) and
checks its output against the fully cached model's greedy decode: same tokens, logits within 1e-4.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from transformers import DynamicCache

from odmoe.errors import OdmoeError
from odmoe.launch import ClusterFailed, spawn_local
from odmoe.models import load_model
from odmoe.paths import repo_root
from odmoe.trace import forward_step, reference_decode

OUT = 10  # output tokens per request
DECODE_OUT = 24  # long enough for plain greedy to repeat a 2-gram on the micro model


def spec_for(lm, jobs, timing: str = "measured", **system) -> dict:
    hardware = OmegaConf.to_container(OmegaConf.load(repo_root() / "conf/hardware/cpu-emulated.yaml"))
    base = OmegaConf.to_container(OmegaConf.load(repo_root() / "conf/system/odmoe.yaml"))
    shadow = {**base["shadow"], "precision": "fp32", **system.pop("shadow", {})}
    return {
        "model": {"name": lm.name, "path": str(lm.path), "dtype": "float32"},
        "hardware": hardware,
        "timing": {"mode": timing, "shape": None, "scale": 1.0},
        "system": {
            **base,
            "workers": 4,
            "timeout_s": 15,
            "startup_timeout_s": 300,
            **system,
            "shadow": shadow,
        },
        "device": "cpu",
        "seed": 0,
        "threads": 1,
        "collect_logits": True,
        "jobs": jobs,
    }


@torch.no_grad()
def cached_decode(lm, prompt, output_len):
    """Greedy fp32 decode of the fully cached model: (tokens, logits [O, V])."""
    lm.adapter.clear_experts_forward()
    cache = DynamicCache(config=lm.model.config)
    logits = forward_step(lm.model, torch.tensor([prompt]), cache)
    tokens, all_logits = [], []
    for _ in range(output_len):
        tokens.append(int(logits.argmax()))
        all_logits.append(logits.numpy())
        logits = forward_step(lm.model, torch.tensor([[tokens[-1]]]), cache)
    return tokens, np.stack(all_logits)


def prompts(n, length=12):
    return [[(7 * i + 3 * j + 5) % 500 + 4 for j in range(length)] for i in range(n)]


def check_exact(lm, results, out_dir, jobs):
    for i, (job, r) in enumerate(zip(jobs, results, strict=True)):
        tokens, logits = cached_decode(lm, job["prompt"], job["output_len"])
        assert r["tokens"] == tokens, f"request {job['id']}"
        got = np.load(Path(out_dir) / f"logits-{i}.npy")
        assert np.abs(got - logits).max() < 1e-4, f"request {job['id']}"


def test_exact_over_alignment_modes_and_minibatches(micro_mixtral, tmp_path):
    """1 main + 1 shadow (exact fp32 copy) + 4 workers: every alignment mode and prefill mini-batch
    count gives the cached model's tokens and logits; a perfect predictor never mispredicts."""
    p = prompts(2)
    modes = ["T1_KV1", "none", "token", "kv", "T2_KV3"]
    jobs = [{"id": m, "prompt": p[0], "output_len": OUT, "shadow": {"alignment": m}} for m in modes]
    jobs.append(
        {
            "id": "newest",
            "prompt": p[0],
            "output_len": OUT,
            "shadow": {"alignment": "T1_KV2", "kv_positions": "newest", "prompt_kv": True},
        }
    )
    jobs.append(
        {"id": "speculative", "prompt": p[0], "output_len": OUT, "shadow": {"departure": "speculative"}}
    )
    jobs += [{"id": f"mb{m}", "prompt": p[1], "output_len": OUT, "prefill_minibatches": m} for m in (1, 4)]
    results = spawn_local(spec_for(micro_mixtral, jobs), tmp_path)
    check_exact(micro_mixtral, results, tmp_path, jobs)
    by_id = {r["request"]: r for r in results}
    lm = len(micro_mixtral.adapter.moe_layers)
    for m in [*modes, "speculative"]:
        assert by_id[m]["mispredicted_experts"] == 0
    # with alignment every iteration the shadow departs late: some layers go unpredicted
    assert by_id["T1_KV1"]["unpredicted_layers"] >= 1
    assert by_id["mb1"]["tokens"] == by_id["mb4"]["tokens"]
    r = by_id["T1_KV1"]
    assert r["bytes_loaded"] > 0 and r["lower_bound_s"] <= r["decode_s"] + 1e-6
    assert max(r["peak_workers"]) <= 2 * micro_mixtral.adapter.expert_bytes() + 64 * 1024
    assert sum(r["lead"]["hist"].values()) == (OUT - 1) * lm


def test_wrong_predictor_changes_time_not_output(micro_mixtral, tmp_path):
    p = prompts(1)
    jobs = [{"id": "a", "prompt": p[0], "output_len": OUT}]
    spec = spec_for(micro_mixtral, jobs, shadow={"predictor": "inverted", "alignment": "T1_KV1"})
    # a link so slow (a micro expert in ~25 ms) that the right expert, copied once the hidden state names it,
    # is always late, whatever the profile's own link is
    spec["hardware"]["h2d_bandwidth"] = 1e6
    results = spawn_local(spec, tmp_path)
    check_exact(micro_mixtral, results, tmp_path, jobs)
    r = results[0]
    lm, k = len(micro_mixtral.adapter.moe_layers), micro_mixtral.adapter.top_k
    predicted = (OUT - 1) * lm - r["unpredicted_layers"]
    assert predicted > 0 and r["mispredicted_experts"] == predicted * k  # every prediction misses
    assert r["stalled_layers"] >= predicted and r["stall_s"] > 0


def test_runtime_nodes_follow_the_rule(micro_mixtral, tmp_path):
    """Main and shadow nodes both apply the rule: output equals the reference with the rule, and an
    exact shadow without alignment never mispredicts (it would, were its own tokens plain greedy)."""
    lm = load_model("micro-mixtral", device="cpu", decode={"no_repeat_ngram_size": 2})
    prompt = prompts(1)[0]
    expected = reference_decode(lm.model, lm.adapter, "p", prompt, DECODE_OUT).tokens.tolist()
    assert expected != cached_decode(micro_mixtral, prompt, DECODE_OUT)[0]  # the rule matters here
    jobs = [{"id": "none", "prompt": prompt, "output_len": DECODE_OUT, "shadow": {"alignment": "none"}}]
    spec = spec_for(micro_mixtral, jobs)
    spec["model"]["decode"] = {"no_repeat_ngram_size": 2}
    (result,) = spawn_local(spec, tmp_path)
    assert result["tokens"] == expected
    assert result["mispredicted_experts"] == 0


def test_top4_shared_expert_model_quantized_shadow(micro_qwen2moe, tmp_path):
    """Qwen2-MoE (top-4, a gated shared expert on the main node) on groups of 2 workers, so each
    worker takes two of a layer's four experts in two device slots; an NF4 SEP shadow, aligned and
    speculative departures. Output stays exact whatever the shadow predicts. Modelled timing: on this CPU
    bitsandbytes' NF4 kernels are slower than the fp32 main node, so measured, the shadow is never ahead."""
    p = prompts(3)
    jobs = [{"id": f"a{i}", "prompt": q, "output_len": OUT} for i, q in enumerate(p)]
    jobs += [
        {"id": f"s{i}", "prompt": q, "output_len": OUT, "shadow": {"departure": "speculative"}}
        for i, q in enumerate(p)
    ]
    spec = spec_for(micro_qwen2moe, jobs, "modelled", workers=4, group_size=2, shadow={"precision": "nf4"})
    results = spawn_local(spec, tmp_path)
    check_exact(micro_qwen2moe, results, tmp_path, jobs)
    assert all(r["expert_slots_hit"] > 0 for r in results)


@pytest.mark.parametrize(
    "sig, rank, expect",
    [
        # whichever rank notices first reports it (a lost connection, or a wait that timed out on a
        # stopped rank): the message must name the failed rank's role and rank. Each role, both signals.
        (signal.SIGKILL, 0, "main (rank 0)"),
        (signal.SIGKILL, 1, "shadow (rank 1)"),
        (signal.SIGKILL, 2, "worker 0 (rank 2)"),
        (signal.SIGSTOP, 0, "main (rank 0)"),
        (signal.SIGSTOP, 1, "shadow (rank 1)"),
        (signal.SIGSTOP, 3, "worker 1 (rank 3)"),
    ],
    ids=["killed-main", "killed-shadow", "killed-worker", "stopped-main", "stopped-shadow", "stopped-worker"],
)
def test_dead_or_hung_rank_ends_the_run_cleanly(micro_mixtral, tmp_path, sig, rank, expect):
    """kill -9 or SIGSTOP of each role: every rank exits within the timeout (plus the few seconds a rank
    whose wait timed out gives heartbeats to go stale, and the spawner's grace) with one message naming
    the rank; no process is left."""
    timeout = 4
    jobs = [{"id": "long", "prompt": prompts(1)[0], "output_len": 400}]
    spec = spec_for(micro_mixtral, jobs, timeout_s=timeout, workers=2)  # 4 ranks: a role each, and one more
    outcome = {}

    def target():
        try:
            spawn_local(spec, tmp_path)
        except Exception as e:  # noqa: BLE001
            outcome["error"] = e

    thread = threading.Thread(target=target)
    thread.start()
    deadline = time.time() + 240
    while not (tmp_path / "status").exists():  # the main node writes it when a request starts decoding
        assert time.time() < deadline and thread.is_alive(), "the cluster did not start decoding"
        time.sleep(0.2)
    time.sleep(0.5)
    pids = [int(p.read_text()) for p in tmp_path.glob("rank*.pid")]
    assert len(pids) == 4
    os.kill(int((tmp_path / f"rank{rank}.pid").read_text()), sig)
    t0 = time.time()
    thread.join(60)
    assert not thread.is_alive()
    assert time.time() - t0 < 2 * timeout + 4  # detection within the timeout, then the spawner's grace
    error = outcome["error"]
    assert isinstance(error, ClusterFailed) and expect in str(error), str(error)
    for pid in pids:  # no orphans
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    logs = " ".join(p.read_text() for p in tmp_path.glob("rank*.log"))
    assert logs.count("stopping because") >= len(pids) - 2  # every other surviving rank said why it stopped


def test_impossible_layout_errors_before_starting(micro_mixtral, tmp_path):
    jobs = [{"id": "a", "prompt": prompts(1)[0], "output_len": 4}]
    with pytest.raises(OdmoeError, match="groups of 2"):
        spawn_local(spec_for(micro_mixtral, jobs, workers=5), tmp_path)
    assert not list(tmp_path.glob("rank*.log"))


_UNGUARDED = """
import json, sys
from odmoe.launch import ClusterFailed, spawn_local
try:
    spawn_local(json.loads(open(sys.argv[1]).read()), sys.argv[2])
except ClusterFailed as e:
    print(e)
    sys.exit(3)
"""


def test_script_without_main_guard_is_told_why_its_ranks_never_started(micro_mixtral, tmp_path):
    """Ranks are forked from a forkserver, which re-imports the caller's script in each rank: a script
    without ``if __name__ == "__main__":`` gets ClusterFailed naming the guard, not a missing log file."""
    spec = tmp_path / "spec.json"
    spec.write_text(
        json.dumps(spec_for(micro_mixtral, [{"id": "a", "prompt": prompts(1)[0], "output_len": 2}]))
    )
    (tmp_path / "unguarded.py").write_text(_UNGUARDED)
    res = subprocess.run(
        [sys.executable, str(tmp_path / "unguarded.py"), str(spec), str(tmp_path / "out")],
        capture_output=True, text=True, cwd=repo_root(), timeout=300,
    )  # fmt: skip
    assert res.returncode == 3, res.stderr[-2000:]
    assert "ended before it started" in res.stdout and "if __name__ == '__main__':" in res.stdout, res.stdout


def test_ranks_are_forked_unless_they_may_touch_cuda():
    """``device=auto`` on a machine without CUDA runs on CPU, so its ranks fork like ``cpu`` ones."""
    from odmoe.launch import _rank_context

    assert _rank_context("cpu").get_start_method() == "forkserver"
    assert _rank_context("cuda").get_start_method() == "spawn"
    assert _rank_context("auto").get_start_method() == (
        "spawn" if torch.cuda.is_available() else "forkserver"
    )


def test_e2e_plan_runs_cached_once_per_clock_and_refuses_bad_lists():
    from experiments.e2e import plan

    assert plan(["cached", "odmoe"], "odmoe") == [("cached", "runtime"), ("odmoe", "runtime")]
    assert plan(["hobbit", "cached"], "hobbit") == [("cached", "engine"), ("hobbit", "engine")]
    assert plan(["cached", "odmoe", "adapmoe"], "odmoe") == [
        ("cached", "engine"),
        ("cached", "runtime"),
        ("odmoe", "runtime"),
        ("adapmoe", "engine"),
    ]
    with pytest.raises(OdmoeError, match="unknown systems"):
        plan(["cached", "vllm"], "cached")
    with pytest.raises(OdmoeError, match="system under test"):
        plan(["cached", "hobbit"], "odmoe")


def test_e2e_experiment_runs_every_system(micro_mixtral_dir, tmp_path):
    """``+exp=e2e`` on the default ``host`` profile: every system on the emulated fallback profile, one
    Table 2 (same columns, clocks said), OD-MoE exact, its memory model met, figures drawn."""
    import pandas as pd

    cmd = [
        sys.executable, "-m", "experiments.run", "+exp=e2e", "system=odmoe", "model=micro-mixtral",
        "system.workers=4", "exp.workloads=[[8,6]]", "exp.num_prompts=1", "exp.ppl_tokens=16",
        "++exp.overrides={moe_infinity: {eamc_traces: 16}, adapmoe: {calib_sequences: 2}}",
        f"results_dir={tmp_path}", "run=t",
    ]  # fmt: skip
    out = subprocess.run(cmd, cwd=repo_root(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    run = tmp_path / "e2e" / "t"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["hardware_profile"] == "cpu-emulated" and summary["hardware_emulated"] is True
    assert summary["hardware_requested"] == "host"
    assert summary["exact_share"] == 1.0 and summary["odmoe_agreement"] == 1.0
    assert summary["mem_max_abs_error"] < 0.05
    assert summary["stall_overhead_over_bound"] >= 0
    assert summary["mem_mixtral-8x7b_total_model_bytes"] < summary["mem_mixtral-8x7b_cached_model_bytes"] / 2
    t2 = pd.read_csv(run / "table2.csv")
    labels = {f"{s}/{e}": c for s, e, c in zip(t2.system, t2.executor, t2.clock, strict=True)}
    engine_systems = ("cpu_only", "mixtral_offloading", "moe_infinity", "hobbit", "adapmoe")
    assert labels == {  # one clock for every executor
        "cached/engine": "measured",
        "cached/runtime": "measured",
        "odmoe/runtime": "measured",
        **{f"{s}/engine": "measured" for s in engine_systems},
    }
    assert (t2.hardware == "cpu-emulated").all() and t2.timing_emulated.all()
    tps = t2.set_index(["system", "executor"]).decode_tps  # the headline is the table's own ratio
    own = tps[("odmoe", "runtime")] / tps[("cached", "runtime")]
    assert summary["decode_fraction_of_baseline"] == pytest.approx(own)
    calib = t2.set_index("system").calib_size
    assert calib["moe_infinity"] == 16 and calib["adapmoe"] == 2 * 128  # the offline calibration, recorded
    exact = t2[t2.system.isin(["cached", "cpu_only", "moe_infinity", "odmoe"])]
    assert (exact.agreement == 1.0).all() and t2.ttft_ms.gt(0).all() and t2.decode_tps.gt(0).all()
    md = (run / "table2.md").read_text()
    assert "OD-MoE" in md and "Transformers (runtime)" in md and "`measured`" in md and "**emulated**" in md
    assert "deviations from the original" in md and "not fused Triton kernels" in md
    for name in ("ttft_ms", "decode_tps", "output_tps", "peak_device_mb", "agreement"):
        assert (run / f"table2_{name}.png").exists()
    assert (run / "stalls.png").exists() and (run / "memory.png").exists()
    # every single-device executor left its per-layer record, so the simulator replays every system
    sim = [sys.executable, "-m", "experiments.run", "+exp=sim_measured", f"exp.e2e_run={run}", f"results_dir={tmp_path}", "run=s"]  # fmt: skip
    out = subprocess.run(sim, cwd=repo_root(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    s = json.loads((tmp_path / "sim_measured" / "s" / "summary.json").read_text())
    assert s["systems_not_simulated"] == ""
    engine = {"cpu_only", "mixtral_offloading", "moe_infinity", "hobbit", "adapmoe"}
    assert set(s["systems"].split(",")) == {"odmoe", "cached_engine", "cached_runtime"} | engine
    assert all(np.isfinite(s[f"{name}_max_abs_err_pct"]) for name in engine)


@pytest.mark.parametrize("alignment", ["T1_KV1", "none"])
def test_the_simulator_schedules_a_modelled_run_to_within_2_percent(tmp_path, alignment):
    """Two schedules agree: the simulator (its own scheduler) fed with a modelled run's per-(iteration, layer)
    prediction outcomes reproduces the runtime's TTFT, decode speed and total stall. They share the cost model
    and nothing else, so a difference is a bug in one of them (issue 12). Without alignment the shadow departs
    from its own prefill, before the main's first token (the simulator once started it at the first token)."""
    e2e = [
        sys.executable, "-m", "experiments.run", "+exp=e2e", "model=micro-mixtral", "timing=modelled",
        "hardware=cpu-emulated", "exp.systems=[odmoe]", "system.workers=4", "exp.workloads=[[24,12]]",
        "exp.num_prompts=1", f"system.shadow.alignment={alignment}", f"results_dir={tmp_path}", "run=t",
    ]  # fmt: skip
    out = subprocess.run(e2e, cwd=repo_root(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    sim = [sys.executable, "-m", "experiments.run", "+exp=sim_measured", f"exp.e2e_run={tmp_path / 'e2e' / 't'}", "exp.predictions=shadow", f"results_dir={tmp_path}", "run=s"]  # fmt: skip
    out = subprocess.run(sim, cwd=repo_root(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    s = json.loads((tmp_path / "sim_measured" / "s" / "summary.json").read_text())
    assert s["odmoe_max_abs_err_pct"] < 2.0, s
    assert s["odmoe_stall_s_sim"] == pytest.approx(s["odmoe_stall_s_measured"], rel=0.02, abs=1e-4)


def _modelled_oracle(lm, jobs, load_s: float | None, **system) -> dict:
    """A modelled-timing spec with an oracle predictor and one expert copy taking ``load_s`` seconds."""
    from odmoe.sim.shapes import shape_from_config

    spec = spec_for(lm, jobs, "modelled", shadow={"predictor": "oracle", "alignment": "none"}, **system)
    nbytes = shape_from_config(lm.model.config).expert_bytes("fp32")
    spec["hardware"].update(h2d_latency=0.0, h2d_bandwidth=nbytes / load_s if load_s else 1e15)
    return spec


def _layers(out_dir):
    import pandas as pd

    return pd.read_csv(Path(out_dir) / "layers.csv")


def test_modelled_timing_is_deterministic_and_eq1_window_decides_stalls(micro_mixtral, tmp_path):
    """Modelled time does not depend on the host: two runs give identical times to the last digit. With
    perfect, early predictions a copy inside the window between a worker's previous expert and the next
    hidden state (Eq. 1's window, measured as the copy's head start with free copies) never stalls; a copy
    10% longer than the longest window stalls on every served layer. One group of workers (G = 1), so
    every layer's window is the same (with G > 1 one group's stall widens the others' windows)."""
    jobs = [{"id": "a", "prompt": prompts(1)[0], "output_len": OUT}]
    system = {"workers": 2}
    free = spawn_local(_modelled_oracle(micro_mixtral, jobs, None, **system), tmp_path / "free")[0]
    window = _layers(tmp_path / "free").load_lead
    assert free["stall_s"] == 0 and window.min() > 0
    inside = [_modelled_oracle(micro_mixtral, jobs, 0.9 * window.min(), **system) for _ in range(2)]
    runs = [spawn_local(spec, tmp_path / f"inside{i}")[0] for i, spec in enumerate(inside)]
    for key in ("ttft_s", "decode_s", "lower_bound_s", "stall_s", "tokens"):
        assert runs[0][key] == runs[1][key], key
    assert _layers(tmp_path / "inside0").equals(_layers(tmp_path / "inside1"))
    assert runs[0]["stall_s"] == 0 and runs[0]["lower_bound_s"] == pytest.approx(runs[0]["decode_s"])
    over_spec = _modelled_oracle(micro_mixtral, jobs, 1.1 * window.max(), **system)
    over = spawn_local(over_spec, tmp_path / "over")[0]
    stalls = _layers(tmp_path / "over").stall
    assert (stalls > 0).all() and over["decode_s"] > over["lower_bound_s"]
    assert over["tokens"] == free["tokens"] == runs[0]["tokens"]
