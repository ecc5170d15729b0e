"""lm-eval tasks, offline: the shipped tasks plus lm-eval's own, with one clear error for missing data.

Datasets come from the local Hugging Face cache (``$HF_HOME``, default ``~/.cache/huggingface``) or
from task YAMLs in ``include_path`` directories that read local files (``dataset_path: json`` with
``dataset_kwargs: {data_files: ...}``); nothing is downloaded. The shipped tasks (``odmoe/eval/tasks``)
build their documents from installed packages.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from odmoe.errors import OdmoeError
from odmoe.eval.tasks import TASKS_DIR

SHIPPED = tuple(sorted(p.stem for p in TASKS_DIR.glob("*.yaml")))


@contextmanager
def offline() -> Iterator[None]:
    """Hugging Face Hub access off for ``datasets`` and ``huggingface_hub`` (restored afterwards)."""
    import datasets
    import huggingface_hub.constants as hub

    saved = (os.environ.get("HF_HUB_OFFLINE"), datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE)
    os.environ["HF_HUB_OFFLINE"] = "1"
    datasets.config.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if saved[0] is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved[0]
        datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE = saved[1], saved[2]


def task_manager(
    tasks: Sequence[str] = (), include_path: Sequence[str | Path] = (), defaults: bool | None = None
):
    """lm-eval's ``TaskManager`` over the shipped tasks and ``include_path``; lm-eval's own ~15k task
    configs are indexed (``defaults``) only when some requested task is not among those, as indexing them
    takes seconds."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise OdmoeError(
            f"lm-evaluation-harness is not installed ({e}); install the extra: pip install -e '.[eval]'"
        ) from None

    paths = [TASKS_DIR, *(Path(p).expanduser() for p in include_path)]
    for p in paths[1:]:
        if not p.is_dir():
            raise OdmoeError(f"task include path {p} is not a directory")
    local = {y.stem for p in paths for y in p.rglob("*.yaml")}
    if defaults is None:
        defaults = any(t not in local for t in tasks) or not tasks
    tm = TaskManager(include_path=[str(p) for p in paths], include_defaults=defaults)
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        raise OdmoeError(
            f"unknown lm-eval task(s) {unknown}; list them with `python -m odmoe.eval ls tasks`, or add a task "
            "YAML in a directory passed as include_path"
        )
    return tm


def load_task(tm, name: str):
    """Build task (or group) ``name`` offline, its documents loaded; a missing dataset is an OdmoeError."""
    with offline():
        try:
            return tm.load([name])
        except OdmoeError:
            raise
        except Exception as e:  # datasets and the hub raise many types for "not in the local cache"
            path = _dataset_path(tm, name)
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise OdmoeError(
                f"task {name}: its data{f' ({path})' if path else ''} is not available offline "
                f"({type(e).__name__}: {first[:200]}). Provide it: on a machine with network run "
                f"`python -c \"from lm_eval.tasks import TaskManager; TaskManager().load(['{name}'])\"` and copy "
                "its Hugging Face cache (~/.cache/huggingface) here (or point HF_HOME at the copy), or write a "
                "task YAML reading local files (dataset_path: json, dataset_kwargs: {data_files: ...}) into a "
                "directory passed as include_path"
            ) from None


def _dataset_path(tm, name: str) -> str | None:
    entry = tm.task_index.get(name)
    if entry is None or entry.yaml_path is None:
        return None
    try:
        from lm_eval.tasks._yaml_loader import load_yaml

        return load_yaml(entry.yaml_path, resolve_func=False).get("dataset_path")
    except Exception:  # noqa: BLE001 - only decorates the error message
        return None
