"""``+exp=alignment_periods``: SEP recall over the token-period x KV-period grid (paper Fig. 6).

One shadow precision (INT8 by default, as in the paper) is replayed with token alignment every
P_T iterations and KV alignment every P_KV iterations for every pair of the two period lists
(``off`` included). Writes the same per-token/per-run tables as ``+exp=recall``, ``periods.csv``
(Eq. 3 recall per cell) and ``fig6.png``; see ``docs/sep.md``.
"""

from __future__ import annotations

from odmoe.data.prompts import load_prompts
from odmoe.models import load_from_cfg
from odmoe.predict.evaluate import evaluate, load_tables
from odmoe.predict.sep import check_period
from odmoe.predict.shadow import check_precision
from odmoe.results import Run
from odmoe.trace import check_length
from plots.recall import fig6

PAPER_T1_KV1 = {"fp16": 0.9994, "int8": 0.9734, "nf4": 0.9567}


def _label(period: int | None) -> str:
    return "off" if period is None else str(period)


def run(cfg, run: Run) -> dict:
    e = cfg.exp
    precision = check_precision(str(e.precision))
    token_periods = [_label(check_period(p, "token")) for p in e.token_periods]
    kv_periods = [_label(check_period(p, "KV")) for p in e.kv_periods]
    modes = [f"T{t}_KV{k}" for t in token_periods for k in kv_periods]
    lm = load_from_cfg(cfg)
    check_length(lm.model, e.prompt_len, e.output_len)
    prompts = load_prompts(cfg.data, lm.tokenizer, e.prompt_len, e.num_prompts)
    timing = evaluate(
        run,
        lm,
        prompts,
        int(e.output_len),
        [precision],
        modes,
        kv_positions=str(e.kv_positions),
        prompt_kv=bool(e.prompt_kv),
        int8_threshold=float(e.int8_threshold),
        workers=e.workers,
        replay=str(e.replay),
        batch_prompts=int(e.batch_prompts),
    )
    runs = load_tables(run)["recall_runs"]
    runs = runs[runs["prompt_id"].isin({p.id for p in prompts}) & runs["alignment"].isin(modes)]
    runs = runs[runs["precision"] == precision].astype({"token_period": str, "kv_period": str})
    cells = runs.groupby(["alignment", "token_period", "kv_period"], sort=False)[["hits", "slots"]].sum()
    cells["recall"] = cells["hits"] / cells["slots"]
    cells = cells.reset_index()
    cells.to_csv(run.path("periods.csv"), index=False)
    fig6(run.dir)
    print(
        cells.pivot(index="token_period", columns="kv_period", values="recall")
        .loc[token_periods, kv_periods]
        .to_string(float_format=lambda v: f"{v:.4f}")
    )
    summary: dict = {
        "model": lm.name,
        "precision": precision,
        "prompts": len(prompts),
        "prompt_len": int(e.prompt_len),
        "output_len": int(e.output_len),
        "kv_positions": str(e.kv_positions),
        **timing,
    }
    for row in cells.itertuples():
        summary[f"recall_{row.alignment}"] = round(float(row.recall), 6)
    best = cells.loc[cells["recall"].idxmax()]
    summary["best_mode"] = str(best["alignment"])
    summary["best_recall"] = round(float(best["recall"]), 6)
    if precision in PAPER_T1_KV1:
        summary["paper_recall_T1_KV1"] = PAPER_T1_KV1[precision]
    return summary
