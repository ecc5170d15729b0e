"""User plugins, instantiated the Hydra way: ``{_target_: mypkg.MyClass, arg: value, ...}`` (docs/extending.md).

A plugin is a class in any importable module (on ``PYTHONPATH`` or installed) that subclasses one of
odmoe's interfaces: an expert predictor (``odmoe.predict.harness.Predictor``) for ``+exp=predictors``
or an offload-engine policy (``baselines.engine.Policy``) for ``+exp=e2e``. Every way a plugin can be
wrong before it runs (no ``_target_``, a module that does not import, a name the module lacks, a class
that is not the interface or leaves a required method out, constructor arguments it refuses) becomes
one ``OdmoeError`` naming the plugin and the problem; what it returns while running is checked where
it is used (``harness.predictions``).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

from odmoe.errors import OdmoeError


def _plain(spec: Any) -> Any:
    return OmegaConf.to_container(spec, resolve=True) if isinstance(spec, DictConfig) else spec


def load_class(target: str, where: str) -> type:
    """The class ``target`` (``package.module.Class``) names; a clear error when it cannot be had."""
    module_name, _, attr = target.rpartition(".")
    if not module_name or not attr:
        raise OdmoeError(f"{where}: _target_ {target!r} is not a dotted path; give package.module.ClassName")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any import failure is the plugin's, reported as one line
        raise OdmoeError(
            f"{where}: cannot import module {module_name!r} of _target_ {target!r} ({type(e).__name__}: {e}); "
            "put its directory on PYTHONPATH (or install it) and check the spelling"
        ) from None
    cls = getattr(module, attr, None)
    if cls is None:
        raise OdmoeError(
            f"{where}: module {module_name!r} has no {attr!r} (_target_ {target!r}); fix the name"
        )
    if not isinstance(cls, type):
        raise OdmoeError(f"{where}: _target_ {target!r} is a {type(cls).__name__}, not a class; name a class")
    return cls


def instantiate(spec: Any, base: type, required: Sequence[str], where: str) -> Any:
    """``spec``'s class, checked against ``base`` and its ``required`` methods, built with its arguments.

    Arguments go through ``hydra.utils.instantiate``, so nested ``_target_`` values are built too.
    """
    spec = _plain(spec)
    if not isinstance(spec, Mapping) or not spec.get("_target_"):
        raise OdmoeError(f"{where}: {spec!r} has no _target_; give {{_target_: mypkg.MyClass, <arguments>}}")
    target = str(spec["_target_"])
    cls = load_class(target, where)
    iface = f"{base.__module__}.{base.__name__}"
    if not issubclass(cls, base):
        raise OdmoeError(
            f"{where}: {target} is not a {iface}; subclass it and implement {', '.join(required)} "
            "(docs/extending.md)"
        )
    missing = [m for m in required if getattr(cls, m, None) is getattr(base, m, None)]
    if missing:
        raise OdmoeError(
            f"{where}: {target} does not implement {', '.join(missing)} of {iface} (docs/extending.md)"
        )
    from hydra.utils import instantiate as hydra_instantiate

    try:
        return hydra_instantiate(dict(spec), _convert_="all")
    except Exception as e:  # noqa: BLE001 - the constructor's complaint, reported as one line
        cause = e.__cause__ or e
        detail = str(cause).strip().splitlines()[-1] if str(cause).strip() else ""
        raise OdmoeError(
            f"{where}: building {target} failed ({type(cause).__name__}: {detail}); check its arguments"
        ) from None


def is_plugin(cfg: Any) -> bool:
    """A system config whose ``policy`` names a class (``system=custom system.policy._target_=...``)."""
    cfg = _plain(cfg)
    return isinstance(cfg, Mapping) and isinstance(cfg.get("policy"), Mapping) and "_target_" in cfg["policy"]
