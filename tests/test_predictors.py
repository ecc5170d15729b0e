"""Lookahead-recall harness, predictors and cache comparators (project issue 4).

One reference pass of the micro model feeds every test (module-scoped fixtures), so the file stays fast.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from odmoe.data.prompts import embedded_prompts
from odmoe.errors import OdmoeError
from odmoe.metrics import label_metrics, predicted_count
from odmoe.models import load_model
from odmoe.predict.cache import eam_matches, simulate
from odmoe.predict.harness import (
    Capture,
    PastView,
    capture_reference,
    hits_by_d,
    predictions,
    same_layer_rows,
    scramble_after,
    truth_ahead,
)
from odmoe.predict.predictors import build_predictors

D = 3
OUT = 10
ALL = ["random", "load_after_routing", "oracle", "gate_h", "gate_x", "gate_u", "eam", "fmoe", "learned"]
ALL += ["fate", "preattn", "moe_beyond"]


@pytest.fixture(scope="module")
def lm(micro_mixtral_dir):
    return load_model("micro-mixtral", device="cpu")


@pytest.fixture(scope="module")
def caps(lm):
    """(eval captures, calib captures) from the disjoint embedded splits."""
    ev = embedded_prompts(lm.tokenizer, 2, 12, "eval")
    ca = embedded_prompts(lm.tokenizer, 3, 12, "calib")
    make = lambda ps: [capture_reference(lm.model, lm.adapter, p.id, p.token_ids, OUT)[0] for p in ps]  # noqa: E731
    return make(ev), make(ca)


@pytest.fixture(scope="module")
def fitted(lm, caps):
    preds = build_predictors(
        lm.adapter,
        ALL,
        max_lookahead=D,
        learned={"steps": 30, "hidden": 16},
        preattn={"steps": 60, "hidden": 16},
        moe_beyond={"steps": 40, "d_model": 16, "ff": 32, "context": 8},
    )
    for p in preds:
        p.fit(caps[1])
    return {p.name: p for p in preds}


def _recall(pred, caps, d_max=D):
    h = s = 0
    per_d = {}
    for c in caps:
        for row in hits_by_d(pred, predictions(pred, c, d_max), c):
            h += row["hits"]
            s += row["slots"]
            a = per_d.setdefault(row["d"], [0, 0])
            a[0] += row["hits"]
            a[1] += row["slots"]
    return h / s, {d: a / b for d, (a, b) in per_d.items()}


def test_capture_taps_match_the_model(lm, caps):
    c = caps[0][0]
    lm_slots, k = c.num_slots, c.top_k
    assert c.decode["u"].shape == (OUT, lm_slots, lm.adapter.hidden_size)
    # the router's own top-k of the captured probabilities is the recorded routing
    top = np.sort(np.argsort(-c.decode["p"], -1)[..., :k], -1)
    assert (top == np.sort(c.trace.decode_experts, -1)).all()
    # u is the post-attention RMSNorm of h
    layer = lm.adapter.layers[lm.adapter.moe_layers[1]]
    with torch.no_grad():
        u = layer.post_attention_layernorm(torch.as_tensor(c.decode["h"][:, 1])).numpy()
    np.testing.assert_allclose(u, c.decode["u"][:, 1], rtol=1e-4, atol=1e-5)


def test_capture_roundtrip(tmp_path, caps):
    c = caps[0][0]
    c.extra["sep_x"] = c.trace.decode_experts.copy()
    back = Capture.load(c.save(tmp_path / "c.npz"))
    assert back.prompt_id == c.prompt_id
    np.testing.assert_array_equal(back.decode["h"], c.decode["h"])
    np.testing.assert_array_equal(back.extra["sep_x"], c.trace.decode_experts)
    del c.extra["sep_x"]


def test_oracle_is_one_and_load_after_routing_is_zero(fitted, caps):
    r, per_d = _recall(fitted["oracle"], caps[0])
    assert r == 1.0 and set(per_d) == set(range(1, D + 1))
    r, per_d = _recall(fitted["load_after_routing"], caps[0])
    assert r == 0.0 and all(v == 0 for v in per_d.values())


def test_random_recall_close_to_k_over_e(lm, caps):
    """Whatever the routing, a uniform draw's expected recall is k/E: over 64 seeds (one capture holds too
    few slots for one draw to be within a few hundredths; 64 bring the standard error near 0.006)."""
    from odmoe.predict.predictors import RandomPredictor

    (pred,) = build_predictors(lm.adapter, ["random"])
    assert isinstance(pred, RandomPredictor)
    c = caps[0][0]
    recalls = [
        _recall(RandomPredictor(seed), [c], d_max=lm.adapter.num_moe_layers - 1)[0] for seed in range(64)
    ]
    assert abs(np.mean(recalls) - lm.adapter.top_k / lm.adapter.num_experts) < 0.025
    assert np.std(recalls) > 0  # the seed draws anew
    # and its draws are valid top-k sets (k distinct experts)
    p = predictions(pred, c, 2)
    ok = p[..., 0] >= 0
    assert (p[ok][:, 0] != p[ok][:, 1]).all()


def test_gate_predictors_beat_random(fitted, caps):
    r_gate, per_d = _recall(fitted["gate_h"], caps[0])
    r_rand, _ = _recall(fitted["random"], caps[0])
    assert r_gate > r_rand + 0.15
    assert per_d[1] >= per_d[D] - 0.05  # looking further ahead does not help a gate


@pytest.mark.parametrize("name", [n for n in ALL if n != "oracle"])
def test_predictions_ignore_a_scrambled_future(fitted, caps, name):
    """Every predictor but the oracle gives the same predictions at (n, j) whatever comes after it."""
    pred = fitted[name]
    c = caps[0][1]
    base = predictions(pred, c, D)
    for n, j in [(1, 0), (4, 1), (OUT, 2), (OUT // 2, 0)]:
        scr = predictions(pred, scramble_after(c, n, j, seed=n + j), D)
        np.testing.assert_array_equal(scr[n - 1, j], base[n - 1, j], err_msg=f"{name} at (n={n}, j={j})")


def test_scramble_really_changes_the_future(fitted, caps):
    """The check above is meaningful: the oracle (which reads the future) does change."""
    c = caps[0][1]
    base = predictions(fitted["oracle"], c, D)
    scr = predictions(fitted["oracle"], scramble_after(c, 4, 0, seed=1), D)
    assert (scr[3, 0] != base[3, 0]).any()


def test_past_view_hides_the_future(caps):
    c = caps[0][0]
    v = PastView(c, 3, 1)
    assert v.routing().shape[0] == 2 and v.past_routing().shape[0] == 2 and len(v.tokens()) == 3
    assert v.state("h").shape[0] == 2 and v.past_state("p").shape[0] == 2
    with pytest.raises(OdmoeError):
        PastView(c, OUT + 1, 0)


def test_truth_ahead_targets(caps):
    c = caps[0][0]
    true, valid = truth_ahead(c, D)
    assert (true[:, 0, 1] == c.trace.decode_experts[:, 2]).all()
    assert not valid[c.num_slots - 1].any() and valid[0].all()


def test_learned_predictor_fits_calibration(fitted, caps):
    r_learned, _ = _recall(fitted["learned"], caps[1])  # on its own training prompts it must beat chance
    assert r_learned > 0.4
    assert fitted["learned"].max_lookahead == D


def test_fate_is_the_next_gate_on_the_gate_input(fitted, caps):
    """Fate feeds layer j's gate input u_j to the next gate unnormalized: at k experts, gate_u's arithmetic."""
    c = caps[0][0]
    np.testing.assert_array_equal(predictions(fitted["fate"], c, D), predictions(fitted["gate_u"], c, D))
    assert fitted["fate"].tap == "u" and not fitted["fate"].renorm


@pytest.mark.parametrize("name", ["preattn", "moe_beyond"])
def test_trained_families_fit_calibration_and_report_cost(fitted, caps, name):
    pred = fitted[name]
    r, per_d = _recall(pred, caps[1])  # on their own training prompts they must beat chance (k/E = 0.25)
    assert r > 0.4 and set(per_d) == set(range(1, D + 1))
    assert pred.cost["parameters"] > 0 and pred.cost["train_steps"] > 0 and pred.cost["train_cpu_s"] >= 0
    c = caps[0][0]
    same = same_layer_rows(pred, c)  # d = 0, the paper's own design point
    assert same["d"] == 0 and same["slots"] == OUT * c.num_slots * c.top_k
    assert same["hits"] / same["slots"] > 0.3 and same["predicted"] == same["slots"]
    assert same_layer_rows(fitted["gate_h"], c) is None


def test_other_papers_metrics_from_counts():
    # 2 rows, k = 2, E = 8: one exact, one with a single hit
    m = label_metrics(hits=3, predicted=4, exact=1, rows=2, k=2, num_experts=8)
    assert m["exact_match"] == 0.5
    assert m["label_accuracy"] == pytest.approx((3 + 11) / 16)  # tp 3, fp 1, fn 1, tn 11
    pred = np.array([[0, 1], [2, 3]])
    true = np.array([[0, 1], [2, 4]])
    flat_p = np.zeros((2, 8), int)
    flat_t = np.zeros((2, 8), int)
    np.put_along_axis(flat_p, pred, 1, 1)
    np.put_along_axis(flat_t, true, 1, 1)
    assert m["label_accuracy"] == pytest.approx((flat_p == flat_t).mean())
    f1 = [
        2 * ((flat_p == c) & (flat_t == c)).sum() / ((flat_p == c).sum() + (flat_t == c).sum())
        for c in (1, 0)
    ]
    assert m["label_f1"] == pytest.approx(np.mean(f1))
    assert predicted_count(np.array([[1, 1], [-1, 2], [0, 3]])).tolist() == [1, 1, 2]


def test_calibration_and_evaluation_prompts_are_disjoint(lm):
    from experiments.predictors import check_disjoint

    ev = embedded_prompts(lm.tokenizer, 6, 12, "eval")
    ca = embedded_prompts(lm.tokenizer, 6, 12, "calib")
    assert not {p.id for p in ev} & {p.id for p in ca}
    assert not {p.token_ids for p in ev} & {p.token_ids for p in ca}
    check_disjoint(ev, ca)
    with pytest.raises(OdmoeError, match="both calibration and evaluation"):
        check_disjoint(ev, ca + ev[:1])


def test_unknown_predictor_is_a_clear_error(lm):
    with pytest.raises(OdmoeError, match="unknown predictor"):
        build_predictors(lm.adapter, ["gate_q"])


# ---- caches -------------------------------------------------------------------------------------
def test_full_cache_after_warmup_and_prefetch_helps(fitted, caps):
    c = caps[0][0]
    e = c.decode["p"].shape[-1]
    eam = fitted["eam"]
    for policy in ("lru", "lfu", "activation"):
        h, a = simulate(c, policy, e, eam=eam)
        seen = {(j, x) for j in range(c.num_slots) for x in c.trace.prefill_experts[:, j].ravel()}
        misses = sum(
            1
            for n in range(OUT)
            for j in range(c.num_slots)
            for x in c.trace.decode_experts[n, j]
            if (j, x) not in seen
        )
        # capacity E: the only misses are first uses of experts the prefill never touched
        assert a - h <= misses + c.num_slots * e
        assert h / a > 0.5
    oracle = predictions(fitted["oracle"], c, 1)
    h0, a0 = simulate(c, "lru", 2)
    h1, a1 = simulate(c, "lru", 2, oracle, 1)
    assert h1 > h0
    # an oracle prefetch at d=1 makes every slot after the first a hit
    assert a1 - h1 <= OUT * c.top_k


def test_cacheless_prefetch_hit_rate_is_recall(fitted, caps):
    c = caps[0][0]
    pred = fitted["gate_h"]
    pr = predictions(pred, c, 1)
    h, a = simulate(c, "lru", 0, pr, 1)
    (row,) = hits_by_d(pred, pr, c)
    assert h == row["hits"]  # slot 0 is never prefetched, so accesses exceed the scored slots
    assert a == row["slots"] + OUT * c.top_k


def test_activation_cache_uses_matches(fitted, caps):
    c = caps[0][0]
    m = eam_matches(fitted["eam"], c)
    assert m.shape == (OUT, c.num_slots, c.num_slots, c.decode["p"].shape[-1])
    np.testing.assert_allclose(m.sum(-1), 1.0)
    assert simulate(c, "activation", 3, matches=m) == simulate(
        c, "activation", 3, eam=fitted["eam"], matches=m
    )
    with pytest.raises(OdmoeError):
        simulate(c, "activation", 3)
    with pytest.raises(OdmoeError):
        simulate(c, "fifo", 3)
