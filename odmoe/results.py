"""Self-describing, resumable result directories: ``results/<exp>/<run>/``.

A run directory holds
  * ``meta.json``: resolved config, its hash, git commit, package versions, machine, hardware
    profile (and whether it was emulated), status (``running`` / ``complete`` / ``failed`` /
    ``interrupted``: stopped by SIGINT or SIGTERM, resumable by rerunning the same command);
  * one CSV per table, appended row by row as rows finish, so a rerun with the same run name
    skips what is done;
  * ``summary.json``: flat headline figures, written last and only on success, so a directory
    without it is never mistaken for a complete result.

Rerunning a run name with a different config is refused (results would mix two configs).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import platform
import socket
import subprocess
import time
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

from odmoe.errors import OdmoeError
from odmoe.paths import repo_root

PACKAGES = (
    "odmoe",
    "torch",
    "transformers",
    "bitsandbytes",
    "tokenizers",
    "safetensors",
    "datasets",
    "hydra-core",
    "numpy",
    "pandas",
)


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_commit() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=repo_root(), capture_output=True, text=True, timeout=10
        ).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD") or "unknown", "dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    }
    return info


def config_hash(config: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(path)


class ResultTable:
    """A CSV written one row at a time; ``key`` columns identify a row for resuming."""

    def __init__(self, path: Path, key: Iterable[str]):
        self.path = path
        self.key = tuple(key)
        self._done: set[tuple[str, ...]] = set()
        self._columns: list[str] | None = None
        if path.exists() and path.stat().st_size > 0:
            with path.open(newline="") as f:
                reader = csv.DictReader(f)
                self._columns = list(reader.fieldnames or [])
                for row in reader:
                    self._done.add(tuple(str(row[k]) for k in self.key))

    def _key_of(self, row: Mapping[str, Any]) -> tuple[str, ...]:
        return tuple(str(row[k]) for k in self.key)

    def done(self, **key: Any) -> bool:
        return self._key_of(key) in self._done

    def add(self, row: Mapping[str, Any]) -> None:
        if self._columns is None:
            self._columns = list(row)
            with self.path.open("w", newline="") as f:
                csv.DictWriter(f, fieldnames=self._columns).writeheader()
        if list(row) != self._columns:
            raise ValueError(f"{self.path.name}: row columns {list(row)} differ from {self._columns}")
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=self._columns).writerow(dict(row))
        self._done.add(self._key_of(row))

    def add_many(self, rows: Iterable[Mapping[str, Any]]) -> None:
        for row in rows:
            self.add(row)

    def frame(self) -> pd.DataFrame:
        if not self.path.exists():
            return pd.DataFrame(columns=list(self.key))
        return pd.read_csv(self.path)


class Run:
    """One experiment run: its directory, tables, and final summary."""

    def __init__(self, directory: str | Path, exp: str, config: Mapping[str, Any]):
        self.dir = Path(directory)
        self.exp = exp
        self.config = dict(config)
        self.hash = config_hash(self.config)
        self.dir.mkdir(parents=True, exist_ok=True)
        meta_path = self.dir / "meta.json"
        self._previous: dict[str, Any] = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        if self._previous and self._previous.get("config_hash") != self.hash:
            raise OdmoeError(
                f"{self.dir} holds a run made with a different config; "
                "choose a new run name (run=NAME) or delete that directory"
            )
        hardware = self.config.get("hardware") or {}
        self.meta: dict[str, Any] = {
            "exp": exp,
            "status": "running",
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "config": self.config,
            "config_hash": self.hash,
            "git": git_commit(),
            "packages": package_versions(),
            "machine": machine(),
            "hardware": {"profile": hardware.get("name", "none"), "emulated": hardware.get("emulated")},
        }
        (self.dir / "summary.json").unlink(missing_ok=True)
        _write_json(meta_path, self.meta)
        self._t0 = time.perf_counter()

    def bind_model(self, name: str, fingerprint: str) -> None:
        """Record which checkpoint the run measures; refuse to resume rows made with another one."""
        old = self._previous.get("model", {}).get("fingerprint")
        if old is not None and old != fingerprint:
            raise OdmoeError(
                f"{self.dir} holds rows made with a different {name} checkpoint (retrained or replaced); "
                "choose a new run name (run=NAME) or delete that directory"
            )
        self.meta["model"] = {"name": name, "fingerprint": fingerprint}
        _write_json(self.dir / "meta.json", self.meta)

    def table(self, name: str, key: Iterable[str]) -> ResultTable:
        return ResultTable(self.dir / f"{name}.csv", key)

    def path(self, name: str) -> Path:
        return self.dir / name

    def finish(self, summary: Mapping[str, Any]) -> dict[str, Any]:
        """Write ``summary.json`` (flat keys, scalar values) and mark the run complete."""
        flat: dict[str, Any] = {
            "exp": self.exp,
            "hardware_profile": self.meta["hardware"]["profile"],
            "hardware_emulated": self.meta["hardware"]["emulated"],
        }
        for k, v in summary.items():
            if isinstance(v, (Mapping, list, tuple)):
                raise TypeError(f"summary key {k!r} must be a scalar, got {type(v).__name__}")
            if hasattr(v, "item"):
                v = v.item()
            if isinstance(v, float) and not math.isfinite(v):
                v = None
            flat[k] = v
        flat["wall_s"] = round(time.perf_counter() - self._t0, 3)
        _write_json(self.dir / "summary.json", flat)
        self.meta.update(
            status="complete", finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), wall_s=flat["wall_s"]
        )
        _write_json(self.dir / "meta.json", self.meta)
        return flat

    def interrupt(self, signal_name: str) -> None:
        """Stopped by a signal: no summary, the rows written so far kept for the rerun that resumes."""
        (self.dir / "summary.json").unlink(missing_ok=True)
        self.meta.update(
            status="interrupted",
            signal=signal_name,
            finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            wall_s=round(time.perf_counter() - self._t0, 3),
        )
        _write_json(self.dir / "meta.json", self.meta)

    def fail(self, error: BaseException) -> None:
        (self.dir / "summary.json").unlink(missing_ok=True)
        self.meta.update(status="failed", error=f"{type(error).__name__}: {error}")
        _write_json(self.dir / "meta.json", self.meta)
