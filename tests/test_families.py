"""Every supported family through every path: SEP recall at each shadow precision, the predictor harness,
the offload-engine baselines and the distributed runtime under every alignment mode.

One test per family chains the paths on a random-init micro model of it (``family_dir`` in conftest). Where
a path is lossless its output must equal the fully cached model's: the engine's lossless policies token for
token, the runtime token for token with logits within 1e-4, an exact (fp32) shadow's routing with the
full model's.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_runtime import check_exact, spec_for

from baselines import build_engine
from odmoe.hardware import load_profile
from odmoe.launch import layout_for, spawn_local
from odmoe.metrics import hits
from odmoe.models import load_model
from odmoe.predict.harness import capture_references, hits_by_d, predictions
from odmoe.predict.predictors import build_predictors
from odmoe.predict.sep import Alignment, emulate, record_references, replay
from odmoe.predict.shadow import build_shadow

OUT = 8
PROMPT = 8
# The runtime's shadow precision and clock per family (conftest's FAMILY_CONFIGS): every family runs a cluster,
# and between them every shadow precision and clock. The latent-attention families (their caches hold K and V
# of different widths, the runtime's one family-specific path) run int8 on the wall clock (decisions on
# physical arrival) and nf4 on virtual time.
RUNTIME = {
    "deepseek_v2": ("int8", "wall"),
    "deepseek_v3": ("nf4", "measured"),
    "qwen3_moe": ("fp16", "measured"),
    "olmoe": ("fp16", "wall"),
}
ALIGNMENTS = ["T1_KV1", "token", "kv", "none", "T2_KV3"]


def _prompts(n: int) -> list[list[int]]:
    return [[(11 * i + 5 * j + 7) % 500 + 4 for j in range(PROMPT)] for i in range(n)]


def _recall(emulations, records) -> float:
    c = np.stack(
        [hits(em.experts, r.trace.decode_experts) for em, r in zip(emulations, records, strict=True)]
    )
    return float(c.sum() / (c.size * records[0].trace.decode_experts.shape[-1]))


@pytest.mark.parametrize(
    "family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3"]
)
def test_family_through_every_path(family, family_dir, tmp_path, one_thread):
    lm = load_model("local", path=str(family_dir(family)))
    a = lm.adapter
    prompts = _prompts(2)

    # ---- SEP recall: an exact shadow reproduces the routing; every precision replays every mode ----------
    records = record_references(lm.model, a, [(f"p{i}", p) for i, p in enumerate(prompts)], OUT)
    exact = build_shadow(lm.model, a, "fp32")
    em = emulate(exact, records[0], Alignment.parse("T2_KV2"))  # sequential: KV rows overwritten in the cache
    np.testing.assert_array_equal(em.experts, records[0].trace.decode_experts)
    ems, path = replay(exact, records, Alignment.parse("T1_KV1"))
    assert path == "parallel" and _recall(ems, records) == 1.0
    for precision in ("fp16", "int8", "nf4"):
        shadow = build_shadow(lm.model, a, precision)
        sizes = shadow.weight_bytes()
        assert 0 < sizes["routed_experts"] < a.parameter_bytes()["experts"]
        for mode in ("T1_KV1", "T2_KV2"):  # one parallel pass per prompt; one batched decode
            ems, _ = replay(shadow, records, Alignment.parse(mode))
            assert ems[0].experts.shape == records[0].trace.decode_experts.shape
            assert ems[0].own_tokens.shape == (OUT,)
            # fp16 ~ the full model; quantized shadows halfway between chance (k / E) and perfect at least
            floor = 0.95 if precision == "fp16" else (1 + a.top_k / a.num_experts) / 2
            assert _recall(ems, records) >= floor, (precision, mode)
    a.clear_experts_forward()

    # ---- the predictor harness: calibrate on one prompt, evaluate on the other -----------------------
    (calib, _), (evaluate, _) = capture_references(lm.model, a, [("c", prompts[0]), ("e", prompts[1])], OUT)
    names = ["random", "load_after_routing", "oracle", "gate_h", "gate_x", "gate_u", "eam", "fmoe", "learned"]
    d_max = a.num_moe_layers - 1
    for predictor in build_predictors(a, names, max_lookahead=d_max, learned={"steps": 5}):
        predictor.fit([calib])
        rows = hits_by_d(predictor, predictions(predictor, evaluate, d_max), evaluate)
        recall = sum(r["hits"] for r in rows) / sum(r["slots"] for r in rows)
        if predictor.name == "oracle":
            assert recall == 1.0
        elif predictor.name == "load_after_routing":
            assert recall == 0.0
        else:
            assert 0.0 <= recall <= 1.0

    # ---- the offload engine's systems: lossless ones exact, lossy ones run ----------------------------
    hw = load_profile("cpu-emulated")
    reference = [int(t) for t in records[0].trace.tokens]
    lossless = {
        "cached": {},
        "cpu_only": {},
        "mixtral_offloading": dict(quantize="none", attention="none", experts_per_layer=2, prefetch=1),
        "moe_infinity": dict(cache_fraction=0.3, prefetch_per_layer=1, eamc_traces=2),
        "hobbit": dict(cache_fraction=0.3, t1=2.0, t2=2.0, depth=2),
        "adapmoe": dict(
            quantize="none", attention="none", sensitivity_budget=0, cache_fraction=0.3, calib_sequences=1
        ),
    }
    lossy = {
        "mixtral_offloading": {},
        "hobbit": {},
        "adapmoe": dict(calib_sequences=1, calib_len=32),
    }
    for name, cfg in [*lossless.items(), *(("lossy " + n, c) for n, c in lossy.items())]:
        engine = build_engine(name.removeprefix("lossy "), cfg, lm, hw)
        try:
            result = engine.generate(prompts[0], OUT)
        finally:
            engine.uninstall()
        assert len(result.tokens) == OUT and result.peak_device_bytes >= 0
        if not name.startswith("lossy"):
            assert result.tokens == reference, name

    # ---- the distributed runtime: every alignment mode, output identical to the cached model ---------
    if family not in RUNTIME:
        return
    jobs = [
        {"id": m, "prompt": prompts[0], "output_len": OUT, "shadow": {"alignment": m}} for m in ALIGNMENTS
    ]
    jobs.append(
        {
            "id": "newest",
            "prompt": prompts[1],
            "output_len": OUT,
            "shadow": {"alignment": "T1_KV2", "kv_positions": "newest", "prompt_kv": True},
        }
    )
    jobs.append(
        {"id": "speculative", "prompt": prompts[1], "output_len": OUT, "shadow": {"departure": "speculative"}}
    )
    precision, timing = RUNTIME[family]
    spec = spec_for(lm, jobs, timing, workers=2, shadow={"precision": precision})
    results = spawn_local(spec, tmp_path)
    check_exact(lm, results, tmp_path, jobs)
    # The mailboxes hold only what can still be used: on the wall clock the int8 shadow's late
    # predictions are dropped when they come, so over 7 requests nothing accumulates. A node holds at
    # most two iterations' predictions (the shadow runs one token ahead), a layer's outputs and the
    # end-of-request messages, however long the decode.
    bound = 2 * a.num_moe_layers + a.top_k + layout_for(spec).world_size
    for r in results:
        assert r["bytes_loaded"] > 0 and r["mailbox_main"]["left"] == 0, r["request"]
        assert max(r["mailbox_main"]["peak"], *r["mailbox_peak_workers"]) <= bound, r["request"]
