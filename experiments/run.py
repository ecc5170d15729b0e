"""Hydra entry point: ``python -m experiments.run +exp=NAME [overrides]``.

Looks up ``experiments/<exp.name>.py`` and calls its ``run(cfg, run)``, which writes tables into
``run.dir`` and returns the flat summary. Bad input (``OdmoeError``) becomes one line on stderr
and exit code 2; the run directory is then marked failed and has no ``summary.json``.
"""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from odmoe.errors import OdmoeError
from odmoe.results import Run

log = logging.getLogger("odmoe")
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def available_experiments() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "exp").glob("*.yaml"))


def _fail(message: str) -> None:
    print(f"odmoe: error: {message}", file=sys.stderr)
    sys.exit(2)


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> dict | None:
    if "exp" not in cfg:
        _fail(f"no experiment chosen; pass +exp=NAME with NAME one of: {', '.join(available_experiments())}")
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    name = cfg.exp.name
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
        run = Run(HydraConfig.get().runtime.output_dir, name, resolved)
    except OdmoeError as e:
        _fail(str(e))
    module = importlib.import_module(f"experiments.{name}")
    log.info("%s -> %s", name, run.dir)
    try:
        summary = module.run(cfg, run)
    except OdmoeError as e:
        run.fail(e)
        _fail(str(e))
    except BaseException as e:
        run.fail(e)
        raise
    flat = run.finish(summary)
    log.info("summary: %s", run.dir / "summary.json")
    for k, v in flat.items():
        print(f"  {k}: {v}")
    return flat


if __name__ == "__main__":
    main()
