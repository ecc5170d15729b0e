"""Where odmoe keeps trained models and caches: ``$ODMOE_HOME`` (default ``~/.cache/odmoe``)."""

import os
from pathlib import Path


def odmoe_home() -> Path:
    return Path(os.environ.get("ODMOE_HOME", Path.home() / ".cache" / "odmoe")).expanduser()


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent
