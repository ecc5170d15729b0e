"""Hydra entry point: ``python -m experiments.run +exp=NAME [overrides]``.

Before Hydra starts the job, :func:`preflight` composes the same configuration (every point of a
``-m`` sweep) and checks it (``odmoe.schema.validate``, the model's weights, the OD-MoE layout), so bad
input fails in a second with nothing written. Then it looks up ``experiments/<exp.name>.py`` and calls
its ``run(cfg, run)``, which writes tables into ``run.dir`` and returns the flat summary.

How a run ends:
  * bad input (``OdmoeError``): one line ``odmoe: error: ...`` on stderr, exit code 2; a run directory
    that was already started is marked ``failed`` and has no ``summary.json``;
  * SIGINT (Ctrl-C) or SIGTERM (``odmoe.signals``): one line ``odmoe: interrupted by SIG...; rerun the
    same command to resume``, exit code 128 + the signal number, status ``interrupted`` in ``meta.json``,
    child processes ended and temporary files removed on the way out;
  * success: ``summary.json`` and status ``complete``.
"""

from __future__ import annotations

import importlib
import itertools
import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from odmoe import signals
from odmoe.errors import OdmoeError
from odmoe.results import Run
from odmoe.schema import available, compose_error, system_file, validate

log = logging.getLogger("odmoe")
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def available_experiments() -> list[str]:
    return available("exp")


def _last_line(text: str) -> None:
    """Print the run's last line on a line of its own: progress bars still open are closed first."""
    try:
        from tqdm import tqdm

        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()
    except Exception:  # noqa: BLE001 - cosmetic only
        pass
    print(text, file=sys.stderr, flush=True)


def _fail(message: str) -> None:
    _last_line(f"odmoe: error: {message}")
    sys.exit(2)


# ---- checks before any work -------------------------------------------------------------------
def _points(overrides: list[str], multirun: bool) -> list[list[str]]:
    """The override lists Hydra will run: one, or every point of a ``-m`` sweep."""
    if not multirun:
        return [overrides]
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    axes = [
        [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()]
        if o.is_sweep_override()
        else [o.input_line]
        for o in parsed
    ]
    return [list(p) for p in itertools.product(*axes)]


def check_model(cfg: DictConfig) -> None:
    """The model the config names exists and its weights are intact; OD-MoE's layout fits it."""
    from odmoe.models.load import check_weights, resolve_path
    from odmoe.models.tiny import EMBEDDED, embedded_dir, is_trained

    m, exp = cfg.model, cfg.exp
    if exp.name == "pretrain":
        return  # it refuses non-embedded models itself, and (re)writes the weights
    if m.get("path"):
        directory = resolve_path(str(m.path))
    elif m.name in EMBEDDED:
        if not is_trained(m.name):
            return  # trained first, by the experiment
        directory = embedded_dir(m.name)
    else:
        raise OdmoeError(
            f"model {m.name!r} is not embedded; pass model.path=<local directory or cached repo id>"
        )
    check_weights(directory)
    systems = list(exp.get("systems") or [])
    if "odmoe" in systems:
        from odmoe.launch import layout_for

        system = cfg.system if cfg.get("system") is not None and cfg.system.name == "odmoe" else None
        if system is None:
            system = OmegaConf.load(system_file("odmoe"))
        system = OmegaConf.merge(system, (exp.get("overrides") or {}).get("odmoe") or {})
        layout_for(
            {"model": {"path": str(directory)}, "system": OmegaConf.to_container(system, resolve=True)}
        )


def preflight(argv: list[str]) -> None:
    """Compose and check the configuration of every job the command line asks for; ``OdmoeError`` if bad."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.utils import get_args_parser

    args = get_args_parser().parse_args(argv)
    if (
        args.help
        or args.hydra_help
        or args.info
        or args.shell_completion
        or args.config_path
        or args.config_dir
    ):
        return  # Hydra's own modes; nothing runs
    overrides = [o for o in args.overrides if not o.lstrip("+~").startswith("hydra")]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        for point in _points(overrides, bool(args.multirun)):
            try:
                cfg = compose(args.config_name or "config", point)
            except Exception as e:  # noqa: BLE001 - Hydra's composition errors, turned into one line
                raise compose_error(e) from None
            if "exp" not in cfg:
                raise OdmoeError(
                    f"no experiment chosen; pass +exp=NAME with NAME one of: {', '.join(available('exp'))}"
                )
            validate(cfg)
            check_model(cfg)


# ---- the job ----------------------------------------------------------------------------------
@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> dict | None:
    if "exp" not in cfg:
        _fail(f"no experiment chosen; pass +exp=NAME with NAME one of: {', '.join(available_experiments())}")
    if cfg.threads:
        import torch

        torch.set_num_threads(int(cfg.threads))
    name = cfg.exp.name
    run = None
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
        run = Run(HydraConfig.get().runtime.output_dir, name, resolved)
        module = importlib.import_module(f"experiments.{name}")
        log.info("%s -> %s", name, run.dir)
        summary = module.run(cfg, run)
    except OdmoeError as e:
        if run is not None:
            run.fail(e)
        _fail(str(e))
    except signals.Interrupted as e:
        if run is not None:
            run.interrupt(e.name)
        _last_line(e.line())
        sys.exit(e.exit_code)
    except BaseException as e:
        if run is not None:
            run.fail(e)
        raise
    flat = run.finish(summary)
    log.info("summary: %s", run.dir / "summary.json")
    for k, v in flat.items():
        print(f"  {k}: {v}")
    return flat


def cli(argv: list[str] | None = None) -> None:
    """Check, then run: the ``python -m experiments.run`` command."""
    signals.install()
    try:
        try:
            preflight(sys.argv[1:] if argv is None else argv)
        except OdmoeError as e:
            _fail(str(e))
        main()
    except signals.Interrupted as e:  # before a run directory exists
        _last_line(e.line())
        sys.exit(e.exit_code)


if __name__ == "__main__":
    cli()
