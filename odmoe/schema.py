"""Dataclass schemas of every config group, and the one check of a composed config before any work.

Why: a wrong type (``exp.output_len=abc``), a misspelt key or an impossible combination used to surface
minutes later, deep in a model load or after 2 + W processes had started, as a traceback. The runner
(``experiments/run.py``) and the launcher (``odmoe/launch.py``) compose the configuration with Hydra and
call :func:`validate` before anything is loaded, spawned or written. Each group (``model``, ``data``,
``hardware``, ``timing``, ``exp`` per experiment, ``system`` per system) has a structured-config schema
below; OmegaConf merges the composed node into it, which checks every key and type, and the ``choices``
and ``minimum`` metadata of a field check its value. Every failure is an ``OdmoeError`` naming the key,
the value and what is expected.

The schemas only check: the experiment still receives the config Hydra composed, unchanged, so result
directories keep their config hash.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from odmoe.clock import DEQUANT, resolve_timing
from odmoe.errors import OdmoeError
from odmoe.hardware import profile_from_config
from odmoe.paths import repo_root


def _f(default: Any = MISSING, *, choices: tuple = (), minimum: float | None = None, factory=None) -> Any:
    """A schema field with optional allowed values (``choices``) and lower bound (``minimum``)."""
    meta = {"choices": tuple(choices), "minimum": minimum}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


PRECISIONS = ("fp32", "fp16", "int8", "nf4")  # odmoe.predict.shadow.PRECISIONS (not imported: torch-free)
WORKER_DTYPES = ("fp32", "fp16", "bf16")  # odmoe.runtime.worker.EXPERT_DTYPES
MODEL_DTYPES = ("float32", "fp32", "float16", "fp16", "bfloat16", "bf16")  # odmoe.models.load.DTYPES
LOWBIT = ("hqq2", "hqq3", "nf4", "none")  # baselines' QUANTIZE tables
KV_POSITIONS = ("since_last", "newest")
UNIONS = (Union, UnionType)


# ---- root groups ------------------------------------------------------------------------------
@dataclass
class DecodeSchema:
    no_repeat_ngram_size: int = _f(0, minimum=0)
    repetition_penalty: float = _f(1.0, minimum=0.0)


@dataclass
class ModelSchema:
    name: str = MISSING
    path: str | None = None
    dtype: str = _f("float32", choices=MODEL_DTYPES)
    decode: DecodeSchema | None = None


@dataclass
class DataSchema:
    source: str = _f(MISSING, choices=("embedded", "alpaca", "longwriter"))
    split: str | None = _f(None, choices=("eval", "calib"))
    path: str | None = None


@dataclass
class DeviceSchema:
    name: str = "unknown"
    memory: float | None = _f(None, minimum=0)
    mem_bandwidth: float | None = _f(None, minimum=0)
    flops: float | None = _f(None, minimum=0)
    count: int = _f(1, minimum=1)


@dataclass
class HardwareSchema:
    name: str = MISSING
    emulated: bool = MISSING
    source: str = MISSING
    main: DeviceSchema | None = None
    worker: DeviceSchema | None = None
    shadow: DeviceSchema | None = None
    host: DeviceSchema | None = None
    num_workers: int | None = _f(None, minimum=1)
    h2d_bandwidth: float | None = _f(None, minimum=0)
    h2d_latency: float | None = _f(None, minimum=0)
    net_bandwidth: float | None = _f(None, minimum=0)
    net_latency: float | None = _f(None, minimum=0)
    layer_overhead: float | None = _f(None, minimum=0)
    main_share: float | None = _f(None, minimum=0)
    host_memory: float | None = _f(None, minimum=0)
    compute_scale: float | None = _f(None, minimum=0)
    probe_seconds: float | None = _f(None, minimum=0)
    sources: dict[str, str] = field(default_factory=dict)


@dataclass
class TimingSchema:
    mode: str = _f("auto", choices=("auto", "wall", "measured", "modelled"))
    shape: str | None = None
    calibrate: bool | None = None  # None: on where the clock is measured
    dequant: str = _f("unfused", choices=DEQUANT)  # modelled: packed copies (odmoe/costs.py)


# ---- systems (conf/system) -------------------------------------------------------------------
@dataclass
class ShadowSchema:
    predictor: str = _f("sep", choices=("sep", "inverted", "random", "none", "oracle"))
    precision: str = _f("fp16", choices=PRECISIONS)
    alignment: str = "T1_KV1"
    kv_positions: str = _f("since_last", choices=KV_POSITIONS)
    prompt_kv: bool = False
    departure: str = _f("aligned", choices=("aligned", "speculative"))
    nice: int = _f(0, minimum=0)


@dataclass
class OdmoeSystem:
    name: str = "odmoe"
    workers: int = _f(8, minimum=1)
    group_size: int | None = _f(None, minimum=1)
    slots: int | None = _f(None, minimum=1)
    expert_dtype: str = _f("fp32", choices=WORKER_DTYPES)
    prefill_minibatches: int = _f(4, minimum=1)
    shadow: ShadowSchema = field(default_factory=ShadowSchema)
    timeout_s: float = _f(60, minimum=1)
    startup_timeout_s: float = _f(600, minimum=1)
    threads: int = _f(1, minimum=1)


@dataclass
class CachedSystem:
    name: str = "cached"
    threads: int = _f(1, minimum=1)
    devices: int = _f(8, minimum=1)


@dataclass
class CpuOnlySystem:
    name: str = "cpu_only"


@dataclass
class HobbitSystem:
    name: str = "hobbit"
    cache_fraction: float = _f(0.21, minimum=0)
    t1: float = 0.6
    t2: float = 0.9
    depth: int = _f(3, minimum=0)


@dataclass
class MoeInfinitySystem:
    name: str = "moe_infinity"
    cache_fraction: float = _f(0.2, minimum=0)
    prefetch_per_layer: int = _f(2, minimum=0)
    eamc_capacity: int = _f(1000, minimum=1)
    eamc_traces: int = _f(1000, minimum=0)


@dataclass
class MixtralOffloadingSystem:
    name: str = "mixtral_offloading"
    experts_per_layer: int = _f(4, minimum=1)
    quantize: str = _f("hqq2", choices=LOWBIT)
    attention: str = _f("hqq4", choices=("hqq4", "none"))
    prefetch: int = _f(2, minimum=0)
    writeback: bool = False


@dataclass
class AdapmoeSystem:
    name: str = "adapmoe"
    cache_fraction: float = _f(0.44, minimum=0)
    quantize: str = _f("hqq2", choices=LOWBIT)
    attention: str = _f("hqq4", choices=("hqq4", "none"))
    sensitivity_budget: float = _f(0.005, minimum=0)
    calib_sequences: int = _f(8, minimum=1)
    calib_len: int = _f(128, minimum=1)
    prefetch: bool = True
    prefetch_depth: int = _f(3, minimum=0)


SYSTEMS: dict[str, type] = {
    "odmoe": OdmoeSystem,
    "cached": CachedSystem,
    "cpu_only": CpuOnlySystem,
    "mixtral_offloading": MixtralOffloadingSystem,
    "moe_infinity": MoeInfinitySystem,
    "hobbit": HobbitSystem,
    "adapmoe": AdapmoeSystem,
}


# ---- experiments (conf/exp) ------------------------------------------------------------------
@dataclass
class PretrainExp:
    name: str = "pretrain"
    force: bool = False


@dataclass
class ReferenceExp:
    name: str = "reference"
    num_prompts: int = 8
    prompt_len: int = 16
    output_len: int = 64


@dataclass
class RecallExp:
    name: str = "recall"
    num_prompts: int = 6
    prompt_len: int = 16
    output_len: int = 512
    precisions: list[str] = _f(choices=PRECISIONS, factory=lambda: ["fp16", "int8", "nf4"])
    alignments: list[str] = field(default_factory=lambda: ["none", "token", "token_kv"])
    kv_positions: str = _f("since_last", choices=KV_POSITIONS)
    prompt_kv: bool = False
    int8_threshold: float = _f(6.0, minimum=0)
    workers: Any = "auto"  # "auto" or a number of forked processes
    replay: str = _f("auto", choices=("auto", "sequential"))
    batch_prompts: int = _f(32, minimum=1)
    figures: bool = True


@dataclass
class AlignmentPeriodsExp:
    name: str = "alignment_periods"
    precision: str = _f("int8", choices=PRECISIONS)
    token_periods: list[Any] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    kv_periods: list[Any] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    num_prompts: int = 4
    prompt_len: int = 16
    output_len: int = 96
    kv_positions: str = _f("since_last", choices=KV_POSITIONS)
    prompt_kv: bool = False
    int8_threshold: float = _f(6.0, minimum=0)
    workers: Any = "auto"
    replay: str = _f("auto", choices=("auto", "sequential"))
    batch_prompts: int = _f(32, minimum=1)


@dataclass
class LearnedSchema:
    hidden: int = _f(32, minimum=1)
    steps: int = _f(300, minimum=0)
    batch: int = _f(256, minimum=1)
    lr: float = _f(0.003, minimum=0)


@dataclass
class MoeBeyondSchema:  # arXiv 2508.17137 (odmoe/predict/recent.py)
    d_model: int = _f(32, minimum=1)
    heads: int = _f(4, minimum=1)
    layers: int = _f(2, minimum=1)
    ff: int = _f(64, minimum=1)
    context: int = _f(16, minimum=1)
    steps: int = _f(1000, minimum=0)
    batch: int = _f(32, minimum=1)
    lr: float = _f(0.003, minimum=0)


@dataclass
class CacheSchema:
    capacities: list[int] = field(default_factory=lambda: [2, 3, 4, 5, 6])
    distance: int = _f(1, minimum=1)
    pairs: dict[str, list[str]] = field(default_factory=dict)
    table_capacity: int = _f(4, minimum=1)


@dataclass
class PredictorsExp:
    name: str = "predictors"
    eval_prompts: int = 16
    calib_prompts: int = 32
    prompt_len: int = 32
    output_len: int = 64
    max_lookahead: int = _f(8, minimum=1)
    workers: int = _f(8, minimum=1)
    group_size: int | None = _f(None, minimum=1)
    predictors: list[str] = field(default_factory=list)
    sep_precisions: list[str] = _f(choices=PRECISIONS, factory=lambda: ["fp16", "int8", "nf4"])
    int8_threshold: float = _f(6.0, minimum=0)
    learned: LearnedSchema = field(default_factory=LearnedSchema)
    extra_predictors: list[Any] = field(default_factory=list)  # plugins: checked by odmoe/plugins.py
    preattn: LearnedSchema = field(default_factory=LearnedSchema)  # arXiv 2511.10676: the same knobs
    moe_beyond: MoeBeyondSchema = field(default_factory=MoeBeyondSchema)
    eam_capacity: int | None = _f(None, minimum=1)
    cache: CacheSchema = field(default_factory=CacheSchema)
    batch_prompts: int = _f(32, minimum=1)
    proc_workers: Any = "auto"


@dataclass
class E2eExp:
    name: str = "e2e"
    systems: list[str] = _f(choices=tuple(SYSTEMS), factory=lambda: list(SYSTEMS))
    workloads: list[list[int]] = field(default_factory=list)
    num_prompts: int = 2
    ppl_tokens: int = _f(128, minimum=1)
    hardware: str = "cpu-emulated"
    overrides: dict[str, Any] = field(default_factory=dict)
    threads: int = _f(1, minimum=1)
    figures: bool = True


@dataclass
class QualityExp:
    name: str = "quality"
    systems: list[str] = _f(choices=tuple(SYSTEMS), factory=lambda: list(SYSTEMS))
    tasks: list[str] = field(default_factory=list)
    include_path: list[str] = field(default_factory=list)
    limit: int | None = _f(None, minimum=1)
    num_fewshot: int | None = _f(None, minimum=0)
    overrides: dict[str, Any] = field(default_factory=dict)
    max_gen_toks: int = _f(256, minimum=1)
    max_logit_mb: float = _f(2000, minimum=1)
    bootstrap_iters: int = _f(100000, minimum=0)
    log_samples: bool = True
    confirm_run_unsafe_code: bool = False
    seed: int = 1234
    threads: int = _f(1, minimum=1)


@dataclass
class FormatsSchema:
    main: str = _f("fp32", choices=PRECISIONS + ("bf16",))
    worker: str = _f("fp32", choices=PRECISIONS + ("bf16",))
    shadow: str = _f("int8", choices=PRECISIONS + ("bf16",))
    kv: str = _f("fp32", choices=PRECISIONS + ("bf16",))
    act: str = _f("fp32", choices=PRECISIONS + ("bf16",))


@dataclass
class SimOdmoeSchema:
    num_workers: int | None = _f(None, minimum=1)
    group_size: int | None = _f(None, minimum=1)
    predictor: str = _f("shadow", choices=("shadow", "ahead", "none"))
    token_period: int = _f(1, minimum=0)
    kv_period: int = _f(1, minimum=0)
    kv_payload: str = _f("since_last", choices=KV_POSITIONS)
    max_lead: int = _f(1, minimum=0)
    buffers: int = _f(1, minimum=1)
    minibatches: int = _f(4, minimum=1)
    prefill_overlap: bool = False


@dataclass
class GanttSchema:
    iterations: int = _f(2, minimum=1)
    first_layer: int = _f(0, minimum=0)
    layers: int = _f(10, minimum=1)


@dataclass
class OffloadSchema:
    expert_fmt: str = _f("int8", choices=PRECISIONS + ("bf16",))
    cache_per_layer: int = _f(3, minimum=0)
    prefetch: int = _f(2, minimum=0)
    lookahead: int = _f(1, minimum=1)
    prefetch_recall: float = _f(0.86, minimum=0)
    stickiness: float = _f(0.0, minimum=0)


@dataclass
class WhatifSchema:
    workers: list[int] = field(default_factory=list)
    h2d_gbps: list[float] = field(default_factory=list)
    worker_formats: list[str] = _f(choices=PRECISIONS + ("bf16",), factory=list)
    recalls: list[float] = field(default_factory=list)


@dataclass
class SimExp:
    name: str = "sim"
    model: str = "mixtral-8x7b"
    prompt_len: int = _f(16, minimum=1)
    output_len: int = _f(256, minimum=1)
    recall: float = _f(0.9734, minimum=0)
    recall_trace: str | None = None
    routing_trace: str | None = None
    measured_times: str | None = None
    seeds: int = _f(3, minimum=1)
    formats: FormatsSchema = field(default_factory=FormatsSchema)
    odmoe: SimOdmoeSchema = field(default_factory=SimOdmoeSchema)
    gantt: GanttSchema = field(default_factory=GanttSchema)
    offload: OffloadSchema = field(default_factory=OffloadSchema)
    whatif: WhatifSchema = field(default_factory=WhatifSchema)


@dataclass
class SimMeasuredExp:
    name: str = "sim_measured"
    e2e_run: str | None = None
    predictions: str = _f("trace", choices=("trace", "shadow"))
    model: str = "model"
    layer_times: str | None = None
    recall_trace: str | None = None
    measured: str | None = None
    formats: FormatsSchema = field(default_factory=FormatsSchema)
    odmoe: SimOdmoeSchema = field(default_factory=SimOdmoeSchema)


@dataclass
class SimPaperExp:
    name: str = "sim_paper"
    model: str = "mixtral-8x7b"
    seeds: int = _f(3, minimum=1)
    kv_payload: str = _f("since_last", choices=KV_POSITIONS)
    formats: FormatsSchema = field(default_factory=FormatsSchema)
    recall_table: Any = None  # a path or a list of paths
    periods_recall: str | None = None
    fig9_periods: list[int] = field(default_factory=list)
    fig10_kv_periods: list[int] = field(default_factory=list)


EXPERIMENTS: dict[str, type] = {
    "pretrain": PretrainExp,
    "reference": ReferenceExp,
    "recall": RecallExp,
    "alignment_periods": AlignmentPeriodsExp,
    "predictors": PredictorsExp,
    "e2e": E2eExp,
    "quality": QualityExp,
    "sim": SimExp,
    "sim_measured": SimMeasuredExp,
    "sim_paper": SimPaperExp,
}


@dataclass
class RootSchema:
    run: str = "default"
    results_dir: str = "results"
    seed: int = 0
    device: str = _f("auto", choices=("auto", "cpu", "cuda"))
    threads: int | None = _f(None, minimum=1)
    model: ModelSchema = field(default_factory=ModelSchema)
    data: DataSchema = field(default_factory=DataSchema)
    hardware: HardwareSchema = field(default_factory=HardwareSchema)
    timing: TimingSchema = field(default_factory=TimingSchema)
    exp: Any = None  # checked against EXPERIMENTS[exp.name]
    system: Any = None  # checked against SYSTEMS[system.name]


# ---- checking ---------------------------------------------------------------------------------
def _expected(tp: Any) -> str:
    """Words for a field's type, as an error message needs them."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in UNIONS:
        inner = [a for a in args if a is not type(None)]
        return f"{_expected(inner[0])} or null" if len(inner) == 1 else "a value"
    if origin is list or tp is list:
        return f"a list of {_expected(args[0]).removeprefix('a ').removeprefix('an ')}s" if args else "a list"
    if origin is dict or tp is dict:
        return "a mapping {key: value}"
    if is_dataclass(tp):
        return f"a mapping with keys {', '.join(f.name for f in fields(tp))}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, "a value")


def _field_type(schema: type, dotted: str) -> tuple[Any, Any]:
    """(type, dataclass field) of ``dotted`` inside ``schema``, following nested dataclasses."""
    tp: Any = schema
    fld = None
    for part in dotted.split("."):
        name, *indexes = re.findall(r"[^\[\]]+", part)  # "workloads[0]": a list element
        while get_origin(tp) in UNIONS:
            tp = next(a for a in get_args(tp) if a is not type(None))
        if get_origin(tp) in (list, dict):
            tp = get_args(tp)[-1]
            continue
        if not is_dataclass(tp):
            return Any, None
        hints = get_type_hints(tp)
        if name not in hints:
            return Any, None
        fld = next(f for f in fields(tp) if f.name == name)
        tp = hints[name]
        for _ in indexes:
            tp = get_args(tp)[-1] if get_args(tp) else Any
    return tp, fld


def _join(prefix: str, key: str) -> str:
    return ".".join(p for p in (prefix, key) if p)


def _merge_error(e: OmegaConfBaseException, schema: type, node: DictConfig, prefix: str) -> OdmoeError:
    key = str(getattr(e, "full_key", "") or getattr(e, "key", "") or "")
    full = _join(prefix, key)
    if isinstance(e, ConfigKeyError) or "not in" in str(e).split("\n")[0]:
        parent, _, leaf = key.rpartition(".")
        tp, _ = _field_type(schema, parent) if parent else (schema, None)
        allowed = ", ".join(f.name for f in fields(tp)) if is_dataclass(tp) else "none"
        where = _join(prefix, parent) or "the root config"
        return OdmoeError(f"unknown key {full}; {where} takes: {allowed} (check the spelling)")
    value = OmegaConf.select(node, key, default=None) if key else None
    tp, _ = _field_type(schema, key)
    return OdmoeError(f"{full}={_show(value)} has the wrong type; expected {_expected(tp)}")


def _show(value: Any) -> str:
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=False)
    return repr(value) if isinstance(value, str) else str(value)


def _check_values(schema: type, node: Any, prefix: str) -> None:
    """``choices`` and ``minimum`` of every field, nested dataclasses and lists included."""
    hints = get_type_hints(schema)
    for f in fields(schema):
        if node is None or f.name not in node:
            continue
        value = node[f.name]
        key = _join(prefix, f.name)
        choices, minimum = f.metadata.get("choices", ()), f.metadata.get("minimum")
        items = list(value) if isinstance(value, (list, ListConfig)) else [value]
        for item in items:
            if item is None or isinstance(item, (DictConfig, dict)):
                continue
            if choices and item not in choices:
                raise OdmoeError(f"{key}={_show(item)} is not allowed; expected one of: {', '.join(choices)}")
            if minimum is not None and not isinstance(item, bool) and isinstance(item, (int, float)):
                if item < minimum:
                    raise OdmoeError(f"{key}={item} is out of range; expected a value >= {minimum:g}")
        tp = hints[f.name]
        while get_origin(tp) in UNIONS:
            tp = next(a for a in get_args(tp) if a is not type(None))
        if is_dataclass(tp) and isinstance(value, (DictConfig, dict)):
            _check_values(tp, value, key)


def check_node(node: Any, schema: type, prefix: str) -> None:
    """Check one config node against its schema: keys, types, choices, minimums."""
    if not isinstance(node, DictConfig):
        node = OmegaConf.create(node if node is not None else {})
    try:
        OmegaConf.merge(OmegaConf.structured(schema), node)
    except OmegaConfBaseException as e:
        raise _merge_error(e, schema, node, prefix) from None
    _check_values(schema, node, prefix)


def check_system(system: Any, prefix: str = "system") -> None:
    """A system config (``conf/system/<name>.yaml`` plus overrides), including its alignment mode."""
    name = system.get("name") if system is not None else None
    if system is not None and "policy" in system:  # a user's policy: odmoe/plugins.py checks it
        return
    if name not in SYSTEMS:
        raise OdmoeError(f"unknown system {name!r}; choose one of: {', '.join(SYSTEMS)}")
    check_node(system, SYSTEMS[name], prefix)
    if name == "odmoe":
        from odmoe.predict.sep import Alignment

        shadow = system.get("shadow") or {}
        try:
            Alignment.parse(
                str(shadow.get("alignment", "T1_KV1")), str(shadow.get("kv_positions", "since_last"))
            )
        except OdmoeError as e:
            raise OdmoeError(f"{prefix}.shadow.alignment: {e}") from None


def validate(cfg: DictConfig) -> None:
    """Check a composed root config before any work: missing values, every group's schema, the systems an
    experiment names and the device against the hardware profile. Raises ``OdmoeError``."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise OdmoeError(f"{missing[0]} has no value; pass {missing[0]}=VALUE on the command line")
    exp = cfg.get("exp")
    top = OmegaConf.masked_copy(cfg, [k for k in cfg if k not in ("exp", "system")])
    check_node(top, RootSchema, "")
    if exp is not None:
        name = exp.get("name")
        if name not in EXPERIMENTS:
            raise OdmoeError(f"unknown experiment {name!r}; choose one of: {', '.join(EXPERIMENTS)}")
        check_node(exp, EXPERIMENTS[name], "exp")
    if cfg.get("system") is not None:
        check_system(cfg.system)
    if exp is not None and "overrides" in exp:
        for name, extra in (exp.overrides or {}).items():
            if name not in SYSTEMS:
                raise OdmoeError(
                    f"exp.overrides names unknown system {name!r}; choose from: {', '.join(SYSTEMS)}"
                )
            base = (
                OmegaConf.load(system_file(name)) if cfg.get("system", {}).get("name") != name else cfg.system
            )
            check_system(OmegaConf.merge(base, extra), f"exp.overrides.{name}")
    check_device(str(cfg.device), str(cfg.hardware.name), bool(cfg.hardware.emulated))
    resolve_timing(cfg.timing, profile_from_config(cfg.hardware), str(cfg.device))


def check_device(device: str, profile: str, emulated: bool) -> None:
    """``device=cuda`` only with a real hardware profile (an emulated one runs every node on the CPU)."""
    if device == "cuda" and emulated:
        raise OdmoeError(
            f"device=cuda runs on real GPUs, but hardware profile {profile} is emulated on the CPU "
            "(its ranks would run there beside a CUDA baseline); use device=cpu with it, or a real profile "
            "(hardware=host, rtx3090-testbed, ...) with device=cuda"
        )


def system_file(name: str) -> Path:
    """``conf/system/<name>.yaml``."""
    return repo_root() / "conf" / "system" / f"{name}.yaml"


GROUP_WORDS = {"exp": "experiment", "hardware": "hardware profile", "model": "model", "system": "system"}


def available(group: str) -> list[str]:
    """The options of config group ``group`` (``conf/<group>/*.yaml``)."""
    return sorted(p.stem for p in (repo_root() / "conf" / group).glob("*.yaml"))


def compose_error(e: Exception) -> OdmoeError:
    """One line for a Hydra composition error (unknown group option, unknown key, ambiguous sweep)."""
    from hydra.errors import MissingConfigException

    if isinstance(e, MissingConfigException) and e.missing_cfg_file and "/" in e.missing_cfg_file:
        group, name = e.missing_cfg_file.rsplit("/", 1)
        group = group.rsplit("/", 1)[-1]
        word = GROUP_WORDS.get(group, f"{group} config")
        return OdmoeError(f"no {word} {name!r}; choose one of: {', '.join(available(group))} ({group}=NAME)")
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    cause = e.__cause__
    if cause is not None and "not in struct" in str(cause):
        key = getattr(cause, "full_key", None) or lines[0]
        return OdmoeError(f"unknown key {key}; check the spelling (--cfg job prints every key of the config)")
    text = "; ".join(
        line for line in lines if not line.startswith(("full_key", "object_type", "reference_type"))
    )
    return OdmoeError(text or type(e).__name__)
