"""``python -m odmoe.eval``: lm-evaluation-harness's own command line, with the ``odmoe`` backend registered
and the shipped tasks (``odmoe/eval/tasks``) on the include path::

    python -m odmoe.eval run --model odmoe --model_args system=hobbit,model=tiny-mixtral --tasks kjv_next_verse
    python -m odmoe.eval ls tasks

lm-eval has no plugin mechanism for model backends, so its ``lm-eval`` script cannot see one defined
outside its package; this is that script after ``import odmoe.eval.backend``.
"""

from __future__ import annotations

import sys

from odmoe.eval.tasks import TASKS_DIR


def with_tasks(argv: list[str]) -> list[str]:
    """``argv`` with the shipped tasks added to ``--include_path`` (appended when absent)."""
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        return argv
    for i, arg in enumerate(argv):
        if arg == "--include_path" and i + 1 < len(argv):
            argv[i + 1] = f"{argv[i + 1]}:{TASKS_DIR}"
            return argv
        if arg.startswith("--include_path="):
            argv[i] = f"{arg}:{TASKS_DIR}"
            return argv
    return [*argv, "--include_path", str(TASKS_DIR)]


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    import odmoe.eval.backend  # noqa: F401 - registers the ``odmoe`` model

    sys.argv = [sys.argv[0], *with_tasks(sys.argv[1:])]
    cli_evaluate()


if __name__ == "__main__":
    main()
