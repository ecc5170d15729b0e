"""Result directories: resumable tables, flat summaries, refusal to mix configs or checkpoints."""

from __future__ import annotations

import json

import pytest

from odmoe.errors import OdmoeError
from odmoe.results import Run


def test_tables_resume_and_summary_is_written_last(tmp_path):
    cfg = {"exp": {"name": "x"}, "hardware": {"name": "cpu-emulated", "emulated": True}}
    run = Run(tmp_path, "x", cfg)
    assert not (tmp_path / "summary.json").exists()
    t = run.table("rows", key=["a", "b"])
    t.add({"a": 1, "b": "p", "v": 0.5})
    assert t.done(a=1, b="p") and not t.done(a=2, b="p")
    with pytest.raises(ValueError):
        t.add({"a": 2, "b": "p"})  # columns must match
    flat = run.finish({"recall": 0.9})
    assert flat["hardware_emulated"] is True and flat["hardware_profile"] == "cpu-emulated"
    assert json.loads((tmp_path / "meta.json").read_text())["status"] == "complete"
    with pytest.raises(TypeError):
        Run(tmp_path, "x", cfg).finish({"nested": {"a": 1}})

    again = Run(tmp_path, "x", cfg)
    assert not (tmp_path / "summary.json").exists()  # a resumed run is not complete until it finishes
    assert again.table("rows", key=["a", "b"]).done(a=1, b="p")
    assert len(again.table("rows", key=["a", "b"]).frame()) == 1


def test_refuses_other_config_or_checkpoint(tmp_path):
    run = Run(tmp_path, "x", {"n": 1})
    run.bind_model("m", "aaaa")
    with pytest.raises(OdmoeError, match="different config"):
        Run(tmp_path, "x", {"n": 2})
    with pytest.raises(OdmoeError, match="different m checkpoint"):
        Run(tmp_path, "x", {"n": 1}).bind_model("m", "bbbb")
    Run(tmp_path, "x", {"n": 1}).bind_model("m", "aaaa")


def test_failed_run_has_no_summary(tmp_path):
    run = Run(tmp_path, "x", {})
    run.finish({})
    run2 = Run(tmp_path, "x", {})
    run2.fail(OdmoeError("boom"))
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["status"] == "failed" and "boom" in meta["error"]
    assert not (tmp_path / "summary.json").exists()
