"""The soak benchmark (benchmarks/soak.py): its request plan, its verdict on synthetic samples, a missing model,
and one short real run on the micro model whose every rank is sampled from outside."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from benchmarks.soak import MIB, main, plan_requests, summarize
from odmoe.errors import OdmoeError


def test_plan_splits_into_at_least_three_requests_that_fit_the_context():
    assert plan_requests(2000, 24, 1024) == [667, 667, 666]  # tiny-mixtral: 1,000 tokens fit after the prompt
    assert plan_requests(2000, 12, 512) == [500, 500, 500, 500]
    assert plan_requests(2000, 24, 512) == [400] * 5
    assert plan_requests(30, 8, None) == [10, 10, 10]
    with pytest.raises(OdmoeError, match="no room"):
        plan_requests(2000, 1024, 1024)


def _samples(leak_per_token: int, lens=(10, 10, 10)) -> pd.DataFrame:
    """Rank 0 flat apart from a one-time 50 MiB step after the first request and within-request growth that
    every request repeats; rank 1 additionally keeps ``leak_per_token`` bytes per token for good."""
    rows, done, t = [], 0, 0.0
    for r, n in enumerate(lens):
        for pos in range(n + 1):
            tokens = done + pos
            base = 500 * MIB + (50 * MIB if r > 0 else 0) + pos * 100_000
            for rank in (0, 1):
                rss = base + (tokens * leak_per_token if rank == 1 else 0)
                rows.append(
                    dict(t_s=t, rank=rank, role=f"r{rank}", rss_bytes=rss, tokens_done=tokens, request=r)
                )
            t += 0.5
        done += n
    return pd.DataFrame(rows)


def test_verdict_flat_after_warmup_and_catches_a_leak():
    lens = [10, 10, 10]
    flat = summarize(_samples(0), lens, at_tokens=5, threshold_bytes=2 * MIB)
    assert flat["verdict"] == "flat" and flat["rss_flat"]
    r0 = flat["ranks"]["0"]
    assert r0["growth_after_warmup"] == 0 and r0["flat"]
    assert r0["tokens_at_start"] == 5 and r0["tokens_at_end"] == 30
    assert r0["rss_end_minus_start"] == 50 * MIB + 500_000  # the one-time step shows in 100 -> end, not after
    assert r0["peak_rss_by_request"] == [500 * MIB + 1_000_000, 550 * MIB + 1_000_000, 550 * MIB + 1_000_000]

    leaky = summarize(_samples(300_000), lens, at_tokens=5, threshold_bytes=2 * MIB)  # 3 MB a request
    assert leaky["verdict"] == "grows"
    assert leaky["ranks"]["0"]["flat"] and not leaky["ranks"]["1"]["flat"]
    assert leaky["ranks"]["1"]["growth_after_warmup"] == 10 * 300_000


def test_one_request_has_no_growth_after_warmup():
    one = summarize(_samples(0, (10,)), [10], at_tokens=5)
    assert one["ranks"]["0"]["growth_after_warmup"] is None and one["verdict"] == "grows"


def test_mailbox_must_not_grow_from_request_to_request():
    def request(left, peak, workers):
        return {"mailbox_main": {"left": left, "peak": peak, "dropped": 0}, "mailbox_peak_workers": workers,
                "mailbox_dropped_workers": [0] * len(workers)}  # fmt: skip

    samples, lens = _samples(0), [10, 10, 10]
    ok = [request(0, 15, [5, 4]), request(0, 15, [4, 5]), request(0, 16, [5, 6])]  # jitter of a message
    assert summarize(samples, lens, requests=ok)["mailbox_bounded"]
    left = [request(0, 15, [5, 4]), request(9, 15, [4, 5]), request(20, 15, [5, 5])]
    assert summarize(samples, lens, requests=left)["verdict"] == "grows"
    worker = [request(0, 15, [5, 4]), request(0, 15, [4, 5]), request(0, 15, [5, 40])]
    assert not summarize(samples, lens, requests=worker)["mailbox_bounded"]


def test_missing_model_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ODMOE_HOME", str(tmp_path / "empty"))
    with pytest.raises(SystemExit) as exit_:
        main(["--out", str(tmp_path / "soak"), "--quiet"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("odmoe: error: embedded model tiny-mixtral is not trained")
    assert not (tmp_path / "soak" / "summary.json").exists()


def test_short_real_run_samples_every_rank(micro_mixtral_dir, tmp_path):
    out = tmp_path / "soak"
    summary = main(
        ["--tokens", "60", "--prompt-len", "8", "--period", "0.05", "--at-tokens", "5", "--out", str(out),
         "--quiet", "model=micro-mixtral", "system.workers=2"]
    )  # fmt: skip
    samples = pd.read_csv(out / "samples.csv")
    assert list(samples.columns[:5]) == ["t_s", "rank", "role", "pid", "rss_bytes"]
    assert sorted(samples["rank"].unique()) == [0, 1, 2, 3]  # main, shadow, 2 workers
    assert set(samples["role"]) == {"main", "shadow", "worker 0", "worker 1"}
    assert (samples["rss_bytes"] > 50 * MIB).all()  # a process with torch loaded, read from /proc
    assert samples.sort_values("t_s", kind="stable")["tokens_done"].is_monotonic_increasing
    assert samples["tokens_done"].max() >= 50 and samples["request"].max() == 2
    assert summary["requests"] == [20, 20, 20] and summary["tokens"] == 60
    assert set(summary["ranks"]) == {"0", "1", "2", "3"}
    for r in summary["ranks"].values():
        assert r["rss_at_end"] > 0 and r["tokens_at_start"] >= 5
    assert summary["mailbox"]["main_left_by_request"] == [0, 0, 0]
    assert json.loads((out / "summary.json").read_text())["verdict"] in ("flat", "grows")
    meta = json.loads((out / "meta.json").read_text())
    assert (
        meta["requests"] == [20, 20, 20]
        and meta["git"]["commit"]
        and meta["spec"]["timing"]["mode"] == "modelled"
    )
