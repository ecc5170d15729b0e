"""``+exp=sim_measured``: the simulator against a measured run's own speed (issue 7, "against measured runs").

    python -m experiments.run +exp=sim_measured exp.e2e_run=results/e2e/<run> [run=NAME] [exp.predictions=shadow]

Times in, end-to-end out: every OD-MoE request of a ``+exp=e2e`` run is re-simulated from that request's measured
per-layer costs and prediction trace, on the run's hardware profile and OD-MoE settings, and the simulated TTFT,
decode and output throughput are compared with the measured ones (``measured_vs_sim.csv``). Every single-device
system (the fully cached model on both executors, CPU-only and the four offloading baselines) is replayed from
its per-layer record (``records/``, ``odmoe/record.py``) by ``odmoe/sim/replay.py``: the executor's decisions
(which copies it issued where, which each layer waited for) and per-layer mean compute costs in, the link's
FIFO schedule, stalls and end-to-end speed out; compared with the means over prompts of ``table2.csv``
(engine) or ``requests.csv`` (runtime). A run without records (made before they existed) lists its engine
systems in ``systems_not_simulated``.

For OD-MoE, taken from the measured run, and nothing else from it:

* ``meta.json``: the model (its shape), the hardware profile the systems ran on (with the run's overrides), the
  OD-MoE settings (workers, group size, slots, alignment periods and payload, departure, prefill mini-batches,
  shadow precision);
* ``layers.csv``, per OD-MoE request and MoE layer, means over the request's decode iterations:
  ``M_l`` = ``t_main`` (main-node compute from the previous layer's outputs to this layer's router);
  the expert step = ``compute``; the hidden vector's hop = ``net_in`` minus its serialization (sent -> seen by
  the worker); the outputs' hop = the rest of the zero-stall worker step ``t_worker - stall`` (so the simulated
  zero-stall layer equals the measured one); every other message (predictions, alignment, prefill) takes the
  request's mean hidden-vector hop;
* ``layers.csv``, the copy of one expert as the runtime achieved it: the mean stall of the request's layers
  whose experts were all loaded after routing (the whole copy is then the stall); the profile's
  ``bytes / h2d_bandwidth`` if there are none;
* ``layers.csv``, per (iteration, MoE layer), the prediction trace: how many experts the group loaded from a
  prediction before the hidden vector arrived (``loaded_from_prediction``) and how many of those were right
  (``hits``); with ``exp.predictions=shadow`` instead the experts predicted right (``k - mispredicted`` where
  the prediction reached the main node in time, else ``k - reloads``) and a simulated shadow whose layer is
  ``S_l = M_l + k x compute`` (not timed by the runtime);
* ``layers.csv``, the CPU cost of one message: the median real transport of the hidden vectors
  (``net_in_transport``, sender -> the receiver's thread); on shared cores it is CPU time, so the prefill's
  back-to-back mini-batch messages queue behind it on the main node's two FIFOs (in decode it is part of the
  measured hops). Wall-clock runs only: a virtual-clock run does not record it, and the prefill's messages
  then cost their wire time alone (``odmoe_prefill_message_ms`` 0; docs/simulator.md);
* ``requests.csv``: the tail of each iteration (final norm, LM head, argmax, alignment message) =
  (``lower_bound_s`` - the layers' zero-stall times) / iterations, for the main's and the shadow's LM head.

Compared, never used as inputs: the measured TTFT, decode and output tok/s (``requests.csv``, and
``table2.csv`` for the engine's systems), and the measured stalls. Predicted: the schedule (when each copy starts and ends given the
buffers, the link and the prediction trace; the main node's FIFOs; alignment), hence the stalls and the decode
time; and prefill, which the runtime does not time per layer: the measured one-token costs plus the model's
cost of the prompt's other tokens (``MeasuredCosts(extrapolate=True)``).

A ``timing=modelled`` run (at the executed model's shape) is priced with the cost model itself, so none of the
measured costs above are taken: with ``exp.predictions=shadow`` only the per-(iteration, layer) prediction
outcomes come from the run, and agreement checks the simulator's schedule against the runtime's (docs/simulator.md,
"Two schedules of one modelled run"). The prefill replays the run's own routing (``requests.csv``'s
``prefill_counts``) where recorded.

The older interface takes three hand-made files instead of a run directory (``exp.layer_times``,
``exp.recall_trace``, ``exp.measured``; formats in docs/simulator.md).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from odmoe.costs import Formats, MeasuredCosts, ModelCosts
from odmoe.errors import OdmoeError
from odmoe.hardware import HardwareProfile, load_profile, profile_from_config
from odmoe.paths import repo_root
from odmoe.record import load_records
from odmoe.results import Run
from odmoe.sim import recall as rc
from odmoe.sim.config import costs_of, formats_of, hardware_of, odmoe_of, shape_of
from odmoe.sim.distributed import Layout, ODMoEConfig, simulate_request
from odmoe.sim.replay import mean_costs, replay
from odmoe.sim.shapes import ModelShape

NEEDED = ("layer_times", "recall_trace", "measured")
COLUMNS = ("prompt_len", "output_len", "ttft_s", "decode_tok_s", "output_tok_s")
METRICS = ("ttft_s", "decode_tok_s", "output_tok_s")
LAYER_COLUMNS = (
    "n",
    "layer",
    "t_main",
    "t_worker",
    "stall",
    "compute",
    "net_in",
    "predicted",
    "mispredicted",
    "reloads",
    "loaded_from_prediction",
    "hits",
)
REQUEST_COLUMNS = ("system", "workload", "prompt_len", "output_len", *METRICS, "decode_s", "lower_bound_s")
TABLE2_COLUMNS = ("system", "executor", "prompt_len", "output_len", "ttft_ms", "decode_tps", "output_tps")
DTYPES = {
    "float32": "fp32",
    "float16": "fp16",
    "bfloat16": "bf16",
    "fp32": "fp32",
    "fp16": "fp16",
    "bf16": "bf16",
}
SPEED_LIMIT_PCT = 15.0


def run(cfg, run: Run) -> dict:
    e = cfg.exp
    if e.get("e2e_run"):
        return from_run(Path(str(e.e2e_run)), run, str(e.get("predictions", "trace")))
    missing = [k for k in NEEDED if not e.get(k)]
    if missing:
        raise OdmoeError(
            "+exp=sim_measured needs a measured run: exp.e2e_run=results/e2e/<run> (a +exp=e2e run directory "
            "with requests.csv and layers.csv), or the three files "
            f"{', '.join('exp.' + k for k in NEEDED)} (missing: {', '.join(missing)}; formats: docs/simulator.md)"
        )
    return from_files(cfg, run)


# ---- a +exp=e2e run directory ----------------------------------------------------------------
@dataclass
class MeasuredRun:
    """What ``+exp=sim_measured`` reads from a run directory (see the module docstring)."""

    path: Path
    config: dict
    shape: ModelShape
    hardware: HardwareProfile
    odmoe: ODMoEConfig
    formats: Formats
    departure: str
    requests: pd.DataFrame  # requests.csv
    layers: pd.DataFrame  # layers.csv, OD-MoE rows
    table2: pd.DataFrame | None


def _read(path: Path, needed: tuple[str, ...], what: str) -> pd.DataFrame:
    if not path.exists():
        raise OdmoeError(f"{path} not found: {what}")
    df = pd.read_csv(path)
    absent = [c for c in needed if c not in df.columns]
    if absent:
        raise OdmoeError(f"{path}: missing column(s) {', '.join(absent)} ({what}); needs {', '.join(needed)}")
    return df


def _system(config: dict, name: str) -> dict:
    """A system's settings as ``+exp=e2e`` ran it: the run's ``system`` group if it names it, else
    ``conf/system/<name>.yaml``, merged with ``exp.overrides.<name>``."""
    sys_cfg = config.get("system") or {}
    base = sys_cfg if sys_cfg.get("name") == name else None
    if base is None:
        path = repo_root() / "conf" / "system" / f"{name}.yaml"
        base = OmegaConf.to_container(OmegaConf.load(path), resolve=True) if path.exists() else {"name": name}
    extra = ((config.get("exp") or {}).get("overrides") or {}).get(name) or {}
    return OmegaConf.to_container(OmegaConf.merge(base, extra), resolve=True)


def _hardware(meta: dict) -> HardwareProfile:
    """The profile every system ran on: the run's ``hardware`` group (with its overrides) if that is the profile
    recorded in meta.json, else the named profile (``+exp=e2e`` swaps a link-less ``host`` for ``exp.hardware``)."""
    config = meta["config"]
    used = (meta.get("hardware") or {}).get("profile") or (config.get("exp") or {}).get("hardware")
    hw_cfg = config.get("hardware") or {}
    if hw_cfg.get("name") == used or used is None:
        return profile_from_config(hw_cfg)
    return load_profile(str(used))


def odmoe_config(system: dict, shape: ModelShape, hw: HardwareProfile) -> tuple[ODMoEConfig, Formats, str]:
    """The simulator's deployment for the runtime's ``system`` settings (docs/runtime.md)."""
    from odmoe.predict.sep import Alignment

    shadow = system.get("shadow") or {}
    predictor = {"sep": "shadow", "inverted": "shadow", "random": "ahead", "none": "none"}.get(
        str(shadow.get("predictor", "sep"))
    )
    if predictor is None:
        raise OdmoeError(f"unknown OD-MoE predictor {shadow.get('predictor')!r} in the run's system settings")
    kv_positions = str(shadow.get("kv_positions", "since_last"))
    al = Alignment.parse(str(shadow.get("alignment", "T1_KV1")), kv_positions)
    departure = str(shadow.get("departure", "aligned"))
    aligned = departure == "aligned"
    base = ODMoEConfig(
        num_workers=int(system.get("workers") or hw.num_workers or 8),
        group_size=system.get("group_size"),
    )
    per_worker = Layout.of(shape, base).experts_per_worker
    slots = system.get("slots")
    cfg = ODMoEConfig(
        num_workers=base.num_workers,
        group_size=base.group_size,
        predictor=predictor,
        # speculative departure (an extension) never waits for alignment: modelled as no late departure
        token_period=al.token_period if aligned else None,
        kv_period=al.kv_period if aligned else None,
        kv_payload=kv_positions,
        max_lead=1,
        buffers=max(1, int(slots) // per_worker) if slots else 1,
        minibatches=int(system.get("prefill_minibatches", 4)),
        # the runtime loads prefill experts as soon as a slot frees, streams chunks after the router and
        # returns outputs per chunk (docs/runtime.md, Prefill)
        prefill_overlap=True,
    )
    precision = "fp32" if shadow.get("predictor") == "inverted" else str(shadow.get("precision", "int8"))
    fmt = Formats(
        main="fp32",
        worker=DTYPES.get(str(system.get("expert_dtype", "fp32")), "fp32"),
        shadow=precision,
        kv="fp32",
        act="fp32",
    )
    return cfg, fmt, departure


def load_run(path: Path) -> MeasuredRun:
    if not (path / "meta.json").exists():
        raise OdmoeError(f"{path} is not a run directory (no meta.json); pass exp.e2e_run=results/e2e/<run>")
    meta = json.loads((path / "meta.json").read_text())
    config = meta["config"]
    if (config.get("exp") or {}).get("name") != "e2e":
        raise OdmoeError(f"{path} is a +exp={(config.get('exp') or {}).get('name')} run; need a +exp=e2e run")
    shape = shape_of("model", config.get("model"))
    hw = _hardware(meta)
    model_fmt = DTYPES.get(str((config.get("model") or {}).get("dtype", "float32")), "fp32")
    ocfg, fmt, departure = odmoe_config(_system(config, "odmoe"), shape, hw)
    fmt = Formats(main=model_fmt, worker=fmt.worker, shadow=fmt.shadow, kv=model_fmt, act=model_fmt)
    requests = _read(path / "requests.csv", REQUEST_COLUMNS, "the runtime's per-request measurements")
    layers = None
    if (requests.system == "odmoe").any():
        layers = _read(path / "layers.csv", LAYER_COLUMNS, "OD-MoE's per-(iteration, layer) measurements")
        if "system" in layers:
            layers = layers[layers.system == "odmoe"]
    t2 = path / "table2.csv"
    table2 = _read(t2, TABLE2_COLUMNS, "the Table 2 rows of every system") if t2.exists() else None
    return MeasuredRun(path, config, shape, hw, ocfg, fmt, departure, requests, layers, table2)


def split_requests(layers: pd.DataFrame, requests: pd.DataFrame) -> list[tuple[pd.Series, pd.DataFrame]]:
    """Pair each OD-MoE row of requests.csv with its rows of layers.csv. Both files are appended in serving
    order; a request's layer rows are consecutive (``request``/``job`` constant, ``n`` not decreasing)."""
    reqs = requests[requests.system == "odmoe"].reset_index(drop=True)
    ident = [c for c in ("request", "job") if c in layers.columns]
    keys = layers[ident].astype(str).agg("|".join, axis=1) if ident else pd.Series("", index=layers.index)
    n = layers["n"].to_numpy()
    new = np.r_[True, (keys.to_numpy()[1:] != keys.to_numpy()[:-1]) | (n[1:] < n[:-1])]
    segments = [g for _, g in layers.groupby(np.cumsum(new), sort=True)]
    if len(segments) != len(reqs):
        raise OdmoeError(
            f"layers.csv holds {len(segments)} OD-MoE requests but requests.csv {len(reqs)}; "
            "were they written by the same run?"
        )
    out = []
    for (_, r), seg in zip(reqs.iterrows(), segments, strict=True):
        if "request" in seg and "prompt_id" in r and str(seg["request"].iloc[0]) != str(r["prompt_id"]):
            raise OdmoeError(
                f"layers.csv's request {seg['request'].iloc[0]} does not match requests.csv's {r['prompt_id']}"
            )
        if int(seg["n"].max()) != int(r["output_len"]) - 1:
            raise OdmoeError(
                f"request {r.get('prompt_id', '?')} ({r['workload']}): layers.csv has {int(seg['n'].max())} "
                f"decode iterations, requests.csv's output_len {int(r['output_len'])} needs {int(r['output_len']) - 1}"
            )
        out.append((r, seg))
    return out


@dataclass
class RequestInputs:
    """One OD-MoE request's simulator inputs derived from layers.csv and requests.csv."""

    table: pd.DataFrame  # MeasuredCosts columns per decoder layer; layer -1: the LM heads
    latency: float  # one-way network time of every message not timed per layer
    load_s: float  # one expert copy, as the runtime achieved it (or the profile's, see derive_inputs)
    load_measured: bool
    message_s: float  # CPU cost of one message, serialized per direction in prefill (0: not measured)
    hits: np.ndarray  # [iterations, moe layers] experts loaded from a right prediction
    timely: np.ndarray  # [iterations, moe layers] experts loaded from a prediction (right or wrong)
    right: np.ndarray  # [iterations, moe layers] experts predicted right, in time or not


def derive_inputs(
    seg: pd.DataFrame, request: pd.Series, shape: ModelShape, ocfg: ODMoEConfig, base: ModelCosts
) -> RequestInputs:
    """One request's inputs (see the module docstring). The copy time is the mean stall of the layers whose
    experts were all loaded after routing (no prediction reached any worker of the group: the whole copy is on the
    critical path, so the stall is the copy as the runtime achieved it, wake-ups included), per expert a worker
    copies; without such layers, the profile's ``bytes / h2d_bandwidth``."""
    k, moe = shape.top_k, list(shape.moe_layers)
    iterations = int(request["output_len"]) - 1
    layers = sorted(int(x) for x in seg["layer"].unique())
    if layers != moe:
        raise OdmoeError(f"layers.csv has MoE layers {layers}; the run's model {shape.name} has {moe}")
    rows = seg.sort_values(["n", "layer"])
    if len(rows) != iterations * len(moe):
        raise OdmoeError(
            f"layers.csv has {len(rows)} rows for {iterations} iterations x {len(moe)} MoE layers"
        )
    lay = Layout.of(shape, ocfg)
    per = lay.experts_per_worker
    wire = base.wire(base.act_bytes(1))
    hop = max(0.0, float(rows["net_in"].mean()) - wire)
    means = rows.assign(free=rows.t_worker - rows.stall).groupby("layer")[
        ["t_main", "free", "compute", "net_in"]
    ]
    means = means.mean()
    # the simulated zero-stall worker step is wire + hop_in + per x compute + (group - 1 + per) x wire + hop_out
    hop_in = (means["net_in"] - wire).clip(lower=0.0)
    hop_out = means["free"] - means["net_in"] - per * means["compute"] - (lay.group_size - 1 + per) * wire
    bound = float((rows.t_main + rows.t_worker - rows.stall).sum())
    lb = float(request["lower_bound_s"])
    tail = max(0.0, (lb - bound) / iterations) if math.isfinite(lb) else base.head(1)
    timely = rows["loaded_from_prediction"].to_numpy()
    # a message's real transport (sender -> the receiver's thread, beyond the emulated LAN): on shared cores
    # it is CPU time, so the prefill's back-to-back messages queue behind it (decode hops already include it)
    message_s = float(rows["net_in_transport"].median()) if "net_in_transport" in rows else 0.0
    after_routing = rows.stall[timely == 0]  # each worker copies its `per` experts one after another
    load_measured = len(after_routing) > 0
    load_s = float(after_routing.mean()) / per if load_measured else base.load()
    table = pd.DataFrame(
        {
            "layer": [*moe, -1],
            "main_s": [*means["t_main"].to_numpy(), tail],
            "expert_s": [*means["compute"].to_numpy(), math.nan],
            "shadow_s": [*(means["t_main"] + k * means["compute"]).to_numpy(), tail],
            "load_s": [load_s] * len(moe) + [math.nan],
            "hop_in_s": [*hop_in.to_numpy(), math.nan],
            "hop_out_s": [*hop_out.clip(lower=0.0).to_numpy(), math.nan],
        }
    )
    dense = [i for i in range(shape.num_layers) if i not in set(moe)]
    if dense:  # dense layers' time is in the next MoE layer's t_main
        table = pd.concat([table, pd.DataFrame({"layer": dense, "main_s": 0.0, "shadow_s": 0.0})])

    def grid(values) -> np.ndarray:
        return np.clip(np.asarray(values), 0, k).reshape(iterations, len(moe)).astype(np.int64)

    right = grid(
        np.where(rows.predicted.to_numpy() > 0, k - rows.mispredicted.to_numpy(), k - rows.reloads.to_numpy())
    )
    hits = grid(rows["hits"])
    timely_grid = np.maximum(grid(timely), hits)
    return RequestInputs(table, hop, load_s, load_measured, message_s, hits, timely_grid, right)


def prefill_counts(request: pd.Series, shape: ModelShape) -> np.ndarray | None:
    """The prompt's rows per expert per MoE layer as the run routed them (``requests.csv``'s
    ``prefill_counts``); None for runs made before it was recorded (the simulator then assumes uniform
    routing, which loads and computes experts that real routing leaves without rows)."""
    value = request.get("prefill_counts")
    if not isinstance(value, str) or not value.strip():
        return None
    counts = np.array(value.split(), dtype=float)
    if counts.size != shape.num_moe_layers * shape.num_experts:
        raise OdmoeError(
            f"requests.csv's prefill_counts has {counts.size} values; {shape.name} needs "
            f"{shape.num_moe_layers} MoE layers x {shape.num_experts} experts"
        )
    return counts.reshape(shape.num_moe_layers, shape.num_experts)


class RunCosts(MeasuredCosts):
    """Measured costs of one request; shared experts are inside the measured ``t_main`` (HF computes them in the
    layer's MLP block on the main node), so they cost nothing on top; ``prefill_message`` is added to every
    prefill message on the main node's outbound and inbound FIFOs (``simulate_prefill``)."""

    def __init__(self, base, table: pd.DataFrame, latency: float, message_s: float = 0.0):
        super().__init__(base, table, latency=latency, extrapolate=True)
        self.prefill_message = message_s

    def shared(self, tokens: int = 1) -> float:
        return 0.0


def _speeds(P: int, out_len: int, ttft: float, decode: float) -> dict[str, float]:
    return {
        "ttft_s": ttft,
        "decode_tok_s": (out_len - 1) / decode if decode > 0 else math.nan,
        "output_tok_s": out_len / (ttft + decode),
    }


def _measured_means(
    m: MeasuredRun, executor: str, system: str, P: int, out_len: int
) -> dict[str, float] | None:
    """The measured means over prompts the replay is compared with (never an input)."""
    if executor == "runtime":
        g = m.requests[(m.requests.system == system) & (m.requests.workload == f"{P}x{out_len}")]
        return {k: float(g[k].mean()) for k in METRICS} if len(g) else None
    if m.table2 is None:
        return None
    t = m.table2
    g = t[(t.executor == "engine") & (t.system == system) & (t.prompt_len == P) & (t.output_len == out_len)]
    if not len(g):
        return None
    r = g.iloc[0]
    return {
        "ttft_s": r.ttft_ms / 1e3,
        "decode_tok_s": r.decode_tps,
        "output_tok_s": r.output_tps,
        "stall_s": r.stall_s,  # per request, prefill included
    }


def replay_run(m: MeasuredRun) -> tuple[list[dict], list[str]]:
    """Replay every record set of the run (``records/<executor>/<system>-<P>x<O>``, ``odmoe/sim/replay.py``);
    one row per (system, workload): simulated against measured means over prompts. Also the engine systems
    of table2.csv that left no records (an older run)."""
    rows, seen = [], set()
    for executor in ("engine", "runtime"):
        for layers_file in sorted((m.path / "records" / executor).glob("*.layers.parquet")):
            stem = layers_file.name.removesuffix(".layers.parquet")
            system, workload = stem.rsplit("-", 1)
            P, out_len = (int(x) for x in workload.split("x"))
            measured = _measured_means(m, executor, system, P, out_len)
            if measured is None:
                continue
            rec = load_records(layers_file.with_name(stem))
            prefill = mean_costs(rec["layers"], rec["steps"], "prefill")
            sims = []
            for request, lay in rec["layers"].groupby("request", sort=False):
                steps = rec["steps"][rec["steps"].request == request]
                transfers = rec["transfers"][rec["transfers"].request == request]
                costs = {"prefill": prefill, "decode": mean_costs(lay, steps, "decode")}
                r = replay(
                    lay,
                    steps,
                    transfers,
                    costs,
                    m.hardware.h2d_bandwidth,
                    m.hardware.h2d_latency or 0.0,
                )
                sims.append(
                    {**_speeds(P, out_len, r.ttft, r.decode_time), "stall_s": r.stall + r.prefill_stall}
                )
            name = f"{system}_{executor}" if system == "cached" else system
            if executor == "engine":
                seen.add(system)
            rows.append(
                {
                    "system": name,
                    "workload": workload,
                    "prompt_id": "mean",
                    **{f"{k}_measured": float(v) for k, v in measured.items()},
                    **{f"{k}_sim": float(np.mean([s[k] for s in sims])) for k in (*METRICS, "stall_s")},
                }
            )
    missing = []
    if m.table2 is not None:
        missing = [s for s in m.table2[m.table2.executor == "engine"].system.unique() if s not in seen]
    return rows, missing


def from_run(path: Path, run: Run, predictions: str = "trace") -> dict:
    if predictions not in ("trace", "shadow"):
        raise OdmoeError(f"exp.predictions must be trace or shadow, not {predictions!r}")
    m = load_run(path)
    shape, hw = m.shape, m.hardware
    base = ModelCosts(shape, hw, m.formats)
    # a modelled run priced its compute with this very cost model: the simulator then shares the cost model
    # with the runtime and nothing else (its own schedule), so agreement checks one schedule against the other
    modelled = (m.config.get("timing") or {}).get("mode") == "modelled"
    if modelled and (m.config.get("timing") or {}).get("shape") not in (None, shape.name):
        raise OdmoeError(
            f"{path} was modelled at another shape than its model's; the simulator replays it only at the "
            "executed model's shape (run +exp=e2e timing=modelled without timing.shape)"
        )
    per_request, inputs = [], []
    for r, seg in split_requests(m.layers, m.requests) if m.layers is not None else []:
        x = derive_inputs(seg, r, shape, m.odmoe, base)
        costs = base if modelled else RunCosts(base, x.table, x.latency, x.message_s)
        P, out_len = int(r.prompt_len), int(r.output_len)
        counts = prefill_counts(r, shape)
        if predictions == "trace":
            sim = simulate_request(shape, costs, m.odmoe, P, out_len, x.hits, counts, timely=x.timely)
        else:
            sim = simulate_request(shape, costs, m.odmoe, P, out_len, x.right, counts)
        inputs.append(
            x.table.assign(request=str(r.get("prompt_id", "")), workload=r.workload, latency_s=x.latency)
        )
        per_request.append(
            {
                "system": "odmoe",
                "workload": r.workload,
                "prompt_id": r.get("prompt_id", ""),
                "recall": rc.recall_of(x.right, shape.top_k),
                "timely_share": float(x.timely.mean() / shape.top_k),
                "load_s": x.load_s,
                "load_measured": x.load_measured,
                "prefill_message_s": x.message_s,
                "stall_s_measured": float(seg.stall.sum()),
                "stall_s_sim": float(sim.decode.stall.sum()),
                **{f"{k}_measured": float(r[k]) for k in METRICS},
                **{f"{k}_sim": v for k, v in _speeds(P, out_len, sim.ttft, sim.decode_time).items()},
            }
        )
    replayed, not_simulated = replay_run(m)
    per_request += replayed
    if not per_request:
        raise OdmoeError(f"{path}: no OD-MoE, cached or simulated baseline rows to compare")
    detail = pd.DataFrame(per_request)
    detail.to_csv(run.path("requests_sim.csv"), index=False)
    if inputs:
        pd.concat(inputs).to_csv(run.path("inputs.csv"), index=False)
    rows = []
    for (system, workload), g in detail.groupby(["system", "workload"], sort=False):
        for metric in METRICS:
            meas, sim = float(g[f"{metric}_measured"].mean()), float(g[f"{metric}_sim"].mean())
            rows.append(
                {
                    "system": system,
                    "workload": workload,
                    "metric": metric,
                    "measured": meas,
                    "sim": sim,
                    "err_pct": 100 * (sim - meas) / meas,
                }
            )
    table = pd.DataFrame(rows)
    table.to_csv(run.path("measured_vs_sim.csv"), index=False)
    out = {
        "e2e_run": str(path),
        "model": shape.name,
        "hardware_profile": hw.name,
        "hardware_emulated": hw.emulated,
        "odmoe_departure": m.departure,
        "requests": len(detail),
    }
    od = detail[detail.system == "odmoe"]
    if len(od):
        out["odmoe_predictions"] = predictions
        out["odmoe_recall"] = float(od.recall.mean())
        out["odmoe_timely_share"] = float(od.timely_share.mean())
        out["odmoe_load_ms"] = float(1e3 * od.load_s.mean())
        out["odmoe_load_ms_profile"] = float(1e3 * base.load())
        out["odmoe_prefill_message_ms"] = float(1e3 * od.prefill_message_s.mean())
        out["odmoe_stall_s_measured"] = float(od.stall_s_measured.sum())
        out["odmoe_stall_s_sim"] = float(od.stall_s_sim.sum())
    if "stall_s_measured" in detail:  # single-device systems: mean stall per request, summed over workloads
        for system, g in detail[detail.system != "odmoe"].groupby("system", sort=False):
            if g.stall_s_measured.notna().any():
                out[f"{system}_stall_s_measured"] = float(g.stall_s_measured.sum())
                out[f"{system}_stall_s_sim"] = float(g.stall_s_sim.sum())
    for (system, metric), g in table.groupby(["system", "metric"], sort=False):
        out[f"{system}_{metric}_max_abs_err_pct"] = float(g.err_pct.abs().max())
    for system, g in table.groupby("system", sort=False):
        out[f"{system}_max_abs_err_pct"] = float(g.err_pct.abs().max())
    out["max_abs_err_pct"] = float(table.err_pct.abs().max())
    out["within_15pct"] = bool(out["max_abs_err_pct"] <= SPEED_LIMIT_PCT)
    out["systems"] = ",".join(table.system.unique())
    out["systems_not_simulated"] = ",".join(dict.fromkeys(not_simulated))
    return out


# ---- three hand-made files ------------------------------------------------------------------
def from_files(cfg, run: Run) -> dict:
    e = cfg.exp
    hw = hardware_of(cfg)
    shape = shape_of(e.model, cfg.model)
    ocfg = odmoe_of(e.odmoe, hw)
    costs = costs_of(shape, hw, formats_of(e.formats), e.layer_times)
    hits_all = rc.load_hits(e.recall_trace, shape.top_k)
    path = Path(e.measured)
    if not path.exists():
        raise OdmoeError(f"no measured requests at {path}; pass the runtime's requests CSV as exp.measured")
    measured = _read(path, COLUMNS, "measured requests")
    rows = []
    for idx, row in measured.iterrows():
        P, N = int(row["prompt_len"]), int(row["output_len"])
        sim = simulate_request(shape, costs, ocfg, P, N, rc.fit(hits_all, N - 1, shape.num_moe_layers))
        for metric, value in _speeds(P, N, sim.ttft, sim.decode_time).items():
            m = float(row[metric])
            rows.append(
                {
                    "system": "odmoe",
                    "workload": f"{P}x{N}",
                    "request": idx,
                    "metric": metric,
                    "measured": m,
                    "sim": value,
                    "err_pct": 100 * (value - m) / m,
                }
            )
    df = pd.DataFrame(rows)
    df.to_csv(run.path("measured_vs_sim.csv"), index=False)
    out = {"model": shape.name, "requests": len(measured), "recall": rc.recall_of(hits_all, shape.top_k)}
    for metric, part in df.groupby("metric"):
        out[f"{metric}_max_abs_err_pct"] = float(part["err_pct"].abs().max())
        out[f"{metric}_mean_err_pct"] = float(part["err_pct"].mean())
    out["max_abs_err_pct"] = float(df.err_pct.abs().max())
    out["within_15pct"] = bool(out["max_abs_err_pct"] <= SPEED_LIMIT_PCT)
    return out
