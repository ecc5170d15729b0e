"""benchmarks/device_check.py: its CPU dry run passes every check, and each kind of check fails on wrong numbers."""

from __future__ import annotations

import pandas as pd
import pytest

from benchmarks import device_check as dc


def test_dry_run_passes_every_check(tmp_path, micro_mixtral_dir, one_thread, capsys):
    """The whole GPU check at its CPU size on the micro model: one table, every section, no failure."""
    rc = dc.main(["--device", "cpu", "--out", str(tmp_path)])
    frame = pd.read_csv(tmp_path / "checks.csv", dtype=str, keep_default_na=False)
    assert rc == 0, frame[frame.status == "FAIL"].to_string()
    assert set(frame.section) == {"setup", "shadow", "engine", "runtime", "memory", "clock", "budget"}
    printed = capsys.readouterr().out
    table = printed[printed.index("device check on cpu:") :]  # the experiments print before it
    assert table.splitlines()[0].endswith(" checks passed, 0 failed")
    assert "| section | item | measured | reference | rule | status |" in table
    engine = frame[frame.section == "engine"]
    for system in ("cached", "cpu_only", "mixtral_offloading", "moe_infinity", "hobbit", "adapmoe"):
        assert engine.item.str.startswith(system + " ").any(), system
    runtime = frame[frame.section == "runtime"]
    assert (
        runtime[runtime.item.str.contains("tokens = reference")].status == "pass"
    ).sum() == 2  # odmoe, cached
    assert (frame[frame.section == "memory"].status == "pass").sum() == 3  # main, shadow, worker
    shadow = frame[frame.section == "shadow"]
    assert (shadow.item.str.contains("recall token_kv") & (shadow.status == "pass")).sum() == 2  # int8, nf4
    assert (frame.status == "pass").sum() >= 25


def test_checks_fail_on_wrong_numbers(tmp_path):
    """A node far from the memory model, a wall clock faster than the roofline, a lossless system that
    disagrees with the reference and a stall longer than the request are failures, not footnotes."""
    pd.DataFrame(
        [
            {
                "model": "m",
                "workload": "8x12",
                "node": "main",
                "measured": 2_000_000,
                "model_bytes": 1_000_000,
            },
            {
                "model": "m",
                "workload": "8x12",
                "node": "worker",
                "measured": 1_000_000,
                "model_bytes": 1_000_000,
            },
        ]
    ).to_csv(tmp_path / "memory.csv", index=False)
    table = dc.Table()
    dc.check_memory(table, tmp_path, workspace=0)
    assert [r["status"] for r in table.rows] == ["FAIL", "pass"]

    row = {"system": "cached", "executor": "runtime", "prompt_len": 8, "output_len": 12, "clock": "wall"}
    dev = pd.DataFrame([{**row, "decode_tps": 1000.0}])
    modelled = pd.DataFrame([{**row, "clock": "modelled", "decode_tps": 100.0}])
    table = dc.Table()
    fits = dc.check_clock(table, dev, modelled, layers=4, overhead=1e-3)
    assert list(fits.values())[0] == pytest.approx(1e-3 + (1e-3 - 1e-2) / 4)
    assert table.rows[-1]["status"] == "FAIL"  # 9 ms per token faster than a 1 ms-per-layer model allows

    t2 = pd.DataFrame(
        [
            {"executor": "engine", "system": "moe_infinity", "prompt_len": 8, "output_len": 12, "lossy": False,
             "agreement": 0.5, "stall_s": 9.0, "ttft_ms": 100.0, "decode_tps": 11.0, "clock": "measured",
             "cuda_peak_mb": None, "peak_device_mb": 1.0},
        ]
    )  # fmt: skip
    table = dc.Table()
    dc.check_engine(table, t2, "cpu")
    assert [r["status"] for r in table.rows] == ["FAIL", "FAIL", "pass"]  # agreement, stall (> 1.1 s), clock


def test_unknown_device_is_one_clear_error(tmp_path, capsys):
    assert dc.main(["--device", "tpu", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("odmoe: error: unknown --device 'tpu'")
    assert not (tmp_path / "checks.csv").exists()
