"""``+exp=reference``: fully cached greedy decoding; routing traces for later experiments."""

from __future__ import annotations

import time

import numpy as np

from odmoe.data.prompts import load_prompts
from odmoe.models import load_from_cfg
from odmoe.results import Run
from odmoe.trace import check_length, reference_decode, save_trace


def run(cfg, run: Run) -> dict:
    e = cfg.exp
    lm = load_from_cfg(cfg)
    run.bind_model(lm.name, lm.fingerprint)
    check_length(lm.model, e.prompt_len, e.output_len)
    prompts = load_prompts(cfg.data, lm.tokenizer, e.prompt_len, e.num_prompts)
    table = run.table("prompts", key=["prompt_id"])
    trace_dir = run.path("traces")
    for p in prompts:
        if table.done(prompt_id=p.id) and (trace_dir / f"{p.id}.parquet").exists():
            continue
        t0 = time.perf_counter()
        trace = reference_decode(lm.model, lm.adapter, p.id, p.token_ids, e.output_len)
        seconds = time.perf_counter() - t0
        save_trace(trace, trace_dir)
        experts = trace.decode_experts
        table.add(
            {
                "prompt_id": p.id,
                "prompt_len": len(p.token_ids),
                "output_len": len(trace.tokens),
                "seconds": round(seconds, 4),
                # share of decode iterations whose routing differs from the previous one, per layer
                "routing_change_rate": float(
                    np.mean(np.any(np.sort(experts[1:], -1) != np.sort(experts[:-1], -1), -1))
                ),
                "prompt": lm.tokenizer.decode(list(p.token_ids)),
                "output": lm.tokenizer.decode(trace.tokens.tolist()),
            }
        )
    df = table.frame()
    return {
        "model": lm.name,
        "prompts": len(df),
        "prompt_len": int(e.prompt_len),
        "output_len": int(e.output_len),
        "trace_dir": str(trace_dir),
        "mean_seconds_per_prompt": float(df["seconds"].mean()),
        "routing_change_rate": float(df["routing_change_rate"].mean()),
    }
