"""Shared fixtures: a private ODMOE_HOME and the micro embedded models (trained once per session).

Set ODMOE_TEST_HOME to a directory to keep the trained micro models between pytest runs.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from odmoe.models import LoadedModel, load_model
from odmoe.models.tiny import ensure_embedded

torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` run where a CUDA device is visible and are skipped, saying why, elsewhere."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible); run on a GPU machine (docs/runtime.md)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def odmoe_home(tmp_path_factory) -> Path:
    home = Path(os.environ.get("ODMOE_TEST_HOME") or tmp_path_factory.mktemp("odmoe_home"))
    os.environ["ODMOE_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def micro_mixtral_dir(odmoe_home) -> Path:
    return ensure_embedded("micro-mixtral")


@pytest.fixture(scope="session")
def micro_qwen2moe_dir(odmoe_home) -> Path:
    return ensure_embedded("micro-qwen2moe")


@pytest.fixture
def micro_mixtral(micro_mixtral_dir) -> LoadedModel:
    """A fresh copy of the trained micro Mixtral (tests may install hooks or modify it)."""
    return load_model("micro-mixtral", device="cpu")


@pytest.fixture
def micro_qwen2moe(micro_qwen2moe_dir) -> LoadedModel:
    return load_model("micro-qwen2moe", device="cpu")


@pytest.fixture
def one_thread():
    """Micro models are all per-op overhead: one thread avoids contention on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
