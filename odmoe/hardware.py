"""Hardware profiles (``conf/hardware/*.yaml``) as one small dataclass shared by the simulator and runtime.

A profile names the machine (``name``), says whether it is emulated (``emulated``) and where it comes
from (``source``). Everything else is optional, so ``host`` (this machine, nothing emulated) is a
valid profile; code that needs a number asks for it with :meth:`HardwareProfile.need`, which raises an
``OdmoeError`` naming the profile and the missing key.

Units are SI: bytes, bytes/s, seconds, FLOP/s. Every number in a profile file carries its source in the
``sources`` mapping (datasheet, measured, assumed or calibrated, and on what). A profile may extend another
with ``defaults: [base, _self_]``, as Hydra does; :func:`load_profile` applies that outside Hydra too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from odmoe.errors import OdmoeError
from odmoe.paths import repo_root

HARDWARE_DIR = repo_root() / "conf" / "hardware"


@dataclass(frozen=True)
class Device:
    """One accelerator (or the CPU standing in for one)."""

    name: str = "unknown"
    memory: float | None = None  # bytes
    mem_bandwidth: float | None = None  # bytes/s, device memory
    flops: float | None = None  # FLOP/s at the precision the node computes in
    count: int = 1  # devices of this kind in the node (the shadow uses two RTX 3090s)


@dataclass(frozen=True)
class HardwareProfile:
    """A machine or cluster: devices per role, host->device link, network, software overheads.

    ``host`` is the CPU that holds offloaded experts (CPU-only computes on it); ``compute_scale`` converts
    host CPU seconds into target seconds under ``timing=measured`` (1: the host stands for the device).
    ``layer_overhead`` is the fixed per-layer time of eager batch-1 inference that no roofline explains
    (kernel launches, Python dispatch); ``main_share`` is the part of it spent by the node that runs
    attention and the router (the rest goes with the expert computation).
    """

    name: str
    emulated: bool
    source: str
    main: Device = field(default_factory=Device)
    worker: Device = field(default_factory=Device)
    shadow: Device = field(default_factory=Device)
    host: Device = field(default_factory=Device)  # the host CPU and its DRAM (CPU-only inference)
    num_workers: int | None = None
    h2d_bandwidth: float | None = None  # bytes/s, pinned host DRAM -> device, one link
    h2d_latency: float | None = None  # s per copy
    net_bandwidth: float | None = None  # bytes/s goodput of one NIC direction
    net_latency: float | None = None  # s per message, one way, incl. (de)serialization
    layer_overhead: float | None = None  # s per decoder layer
    main_share: float | None = None  # fraction of layer_overhead on the attention side
    host_memory: float | None = None  # bytes of DRAM per worker
    compute_scale: float | None = None  # timing=measured: target seconds per host CPU second (default 1)
    probe_seconds: float | None = None  # timing.calibrate: odmoe.clock.probe_seconds on the reference host
    sources: dict[str, str] = field(default_factory=dict)

    def need(self, *names: str) -> None:
        """Raise a clear error when a field the caller needs is missing from this profile."""
        missing = [n for n in names if _get(self, n) is None]
        if missing:
            raise OdmoeError(
                f"hardware profile {self.name!r} lacks {', '.join(missing)}; pick a profile that has them "
                f"(hardware=rtx3090-testbed, rtx3080-workers, rtx3090-pcie3, cpu-emulated) or set "
                f"hardware.{missing[0]}=VALUE"
            )

    def with_(self, **changes: Any) -> HardwareProfile:
        """A copy with some fields changed; ``worker__mem_bandwidth=...`` changes a device field."""
        top = {k: v for k, v in changes.items() if "__" not in k}
        for key, value in changes.items():
            if "__" in key:
                role, attr = key.split("__", 1)
                top[role] = replace(top.get(role, getattr(self, role)), **{attr: value})
        return replace(self, **top)


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
    return obj


def _device(raw: Mapping[str, Any] | None) -> Device:
    raw = dict(raw or {})
    unknown = set(raw) - {f.name for f in fields(Device)}
    if unknown:
        raise OdmoeError(
            f"unknown device keys {sorted(unknown)} in a hardware profile; allowed: name, memory, mem_bandwidth, flops, count"
        )
    return Device(
        **{
            k: (float(v) if k in ("memory", "mem_bandwidth", "flops") and v is not None else v)
            for k, v in raw.items()
        }
    )


def profile_from_config(cfg: DictConfig | Mapping[str, Any]) -> HardwareProfile:
    """Build a profile from the ``hardware`` config node (or a plain mapping)."""
    raw = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    raw.pop("defaults", None)
    for key in ("name", "emulated", "source"):
        if key not in raw:
            raise OdmoeError(
                f"hardware profile lacks {key!r}; every conf/hardware/*.yaml needs name, emulated, source"
            )
    known = {f.name for f in fields(HardwareProfile)}
    unknown = set(raw) - known
    if unknown:
        raise OdmoeError(
            f"hardware profile {raw['name']!r} has unknown keys {sorted(unknown)}; allowed: {sorted(known)}"
        )
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key in ("main", "worker", "shadow", "host"):
            out[key] = _device(value)
        elif key in ("name", "source"):
            out[key] = str(value)
        elif key == "emulated":
            out[key] = bool(value)
        elif key in ("num_workers",):
            out[key] = None if value is None else int(value)
        elif key == "sources":
            out[key] = {str(k): str(v) for k, v in (value or {}).items()}
        else:
            out[key] = None if value is None else float(value)
    if "worker" not in raw and "main" in out:
        out["worker"] = out["main"]
    if "shadow" not in raw and "main" in out:
        out["shadow"] = out["main"]
    return HardwareProfile(**out)


def _load_raw(name: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    path = Path(name) if name.endswith(".yaml") else HARDWARE_DIR / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in HARDWARE_DIR.glob("*.yaml"))
        raise OdmoeError(f"no hardware profile {name!r}; choose one of {', '.join(known)}")
    if path.stem in seen:
        raise OdmoeError(f"hardware profile {path.stem} extends itself through {' -> '.join(seen)}")
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    merged: dict[str, Any] = {}
    bases = [d for d in raw.pop("defaults", []) or [] if d != "_self_"]
    for base in bases:
        merged = _merge(merged, _load_raw(str(base), (*seen, path.stem)))
    return _merge(merged, raw)


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_profile(name: str) -> HardwareProfile:
    """Load ``conf/hardware/<name>.yaml`` (or a yaml path), applying ``defaults`` inheritance."""
    return profile_from_config(_load_raw(name))


def profile_names() -> list[str]:
    return sorted(p.stem for p in HARDWARE_DIR.glob("*.yaml"))
