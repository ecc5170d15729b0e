"""From Hydra config nodes to simulator objects, so experiments stay a few lines each."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from odmoe.costs import Formats, ModelCosts, load_measured
from odmoe.errors import OdmoeError
from odmoe.hardware import HardwareProfile, profile_from_config
from odmoe.sim import recall as rc
from odmoe.sim.distributed import ODMoEConfig
from odmoe.sim.shapes import SIM_MODELS_DIR, ModelShape, load_shape, shape_from_config


def _plain(node: Any) -> dict[str, Any]:
    if node is None:
        return {}
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)


def shape_of(model: str, model_cfg: DictConfig | Mapping | None = None) -> ModelShape:
    """``model`` is a shipped shape, a config.json or checkpoint path, or ``"model"``: the run's ``model`` group
    (an embedded model, or ``model.path``), priced from its config without loading weights."""
    if model != "model":
        return load_shape(model)
    m = _plain(model_cfg)
    if m.get("path"):
        return load_shape(str(m["path"]))
    name = str(m.get("name"))
    if (SIM_MODELS_DIR / f"{name}.json").exists():
        return load_shape(name)
    from transformers import AutoConfig

    from odmoe.models.tiny import EMBEDDED

    if name not in EMBEDDED:
        raise OdmoeError(f"model {name!r} has no shape; pass exp.model=<shipped shape or config.json path>")
    spec = EMBEDDED[name]
    return shape_from_config(
        AutoConfig.for_model(spec.model_type, vocab_size=spec.vocab_size, **spec.config), name
    )


def formats_of(node) -> Formats:
    return Formats(**_plain(node))


def odmoe_of(node, hw: HardwareProfile) -> ODMoEConfig:
    raw = _plain(node)
    if raw.get("num_workers") is None:
        hw.need("num_workers")
        raw["num_workers"] = hw.num_workers
    return ODMoEConfig(**raw)


def hardware_of(cfg: DictConfig) -> HardwareProfile:
    return profile_from_config(cfg.hardware)


def costs_of(shape: ModelShape, hw: HardwareProfile, formats: Formats, measured: str | None = None):
    costs = ModelCosts(shape, hw, formats)
    return load_measured(measured, costs) if measured else costs


def hits_of(
    shape: ModelShape, cfg: ODMoEConfig, iterations: int, recall: float | None, trace: str | None, seed: int
) -> np.ndarray:
    """Hit counts for the predictor: a recall trace if given, else perfect-after-routing (``none``), else the recall
    value (``shadow``/``ahead``)."""
    lm, k = shape.num_moe_layers, shape.top_k
    if trace:
        return rc.fit(rc.load_hits(trace, k), iterations, lm)
    if cfg.predictor == "none":
        return rc.perfect(iterations, lm, k)
    if recall is None:
        raise OdmoeError("no recall: set exp.recall=VALUE or exp.recall_trace=PATH")
    return rc.from_recall(float(recall), iterations, lm, k, seed)
