"""lm-evaluation-harness task configs shipped with odmoe (pass this directory as ``include_path``)."""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
