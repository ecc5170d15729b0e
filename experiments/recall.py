"""``+exp=recall``: SEP recall per shadow precision x alignment (Table 1 and Fig. 3 of the paper).

For every prompt the fp32 model decodes greedily once; each shadow (fp16, int8, nf4 by default)
is replayed against it with no alignment, token alignment, and token + KV alignment every
iteration. Writes ``recall_tokens.csv`` (Eq. 2 per n), ``recall_layers.csv``, ``recall_runs.csv``,
``recall_table.csv`` (Eq. 3 overall and first/last quarter, beside the paper's numbers),
``shadows.csv`` (weight bytes) and ``fig3.png``; see ``docs/sep.md``.
"""

from __future__ import annotations

from odmoe.data.prompts import load_prompts
from odmoe.models import load_from_cfg
from odmoe.predict.evaluate import PAPER_RECALL, evaluate, load_tables, recall_by_config
from odmoe.predict.shadow import check_precision
from odmoe.results import Run
from odmoe.trace import check_length
from plots.recall import fig3


def _checks(table, precisions: list[str], modes: list[str]) -> dict[str, bool]:
    """The orderings the paper implies, as booleans (absent when a needed config was not run)."""
    r = {(row.precision, row.alignment): row for row in table.itertuples()}
    out: dict[str, bool] = {}
    paper_order = [p for p in ("fp16", "int8", "nf4") if p in precisions]
    for mode in modes:
        if len(paper_order) > 1:
            values = [r[(p, mode)].recall for p in paper_order]
            out[f"check_order_{'_ge_'.join(paper_order)}_{mode}"] = all(
                a >= b for a, b in zip(values, values[1:], strict=False)
            )
    if "none" in modes:
        for p in precisions:
            for mode in modes:
                if mode != "none":
                    out[f"check_{p}_{mode}_ge_none"] = bool(r[(p, mode)].recall >= r[(p, "none")].recall)
            none = r[(p, "none")]
            out[f"check_{p}_none_decays"] = bool(none.recall_last_quarter < none.recall_first_quarter)
    if ("fp16", "token_kv") in r:
        out["check_fp16_token_kv_ge_0995"] = bool(r[("fp16", "token_kv")].recall >= 0.995)
    return out


def run(cfg, run: Run) -> dict:
    e = cfg.exp
    precisions = [check_precision(str(p)) for p in e.precisions]
    modes = [str(m) for m in e.alignments]
    lm = load_from_cfg(cfg)
    check_length(lm.model, e.prompt_len, e.output_len)
    prompts = load_prompts(cfg.data, lm.tokenizer, e.prompt_len, e.num_prompts)
    timing = evaluate(
        run,
        lm,
        prompts,
        int(e.output_len),
        precisions,
        modes,
        kv_positions=str(e.kv_positions),
        prompt_kv=bool(e.prompt_kv),
        int8_threshold=float(e.int8_threshold),
        workers=e.workers,
        replay=str(e.replay),
        batch_prompts=int(e.batch_prompts),
    )
    tables = load_tables(run)
    ids = {p.id for p in prompts}
    tokens = tables["recall_tokens"]
    tokens = tokens[
        tokens["prompt_id"].isin(ids) & tokens["precision"].isin(precisions) & tokens["alignment"].isin(modes)
    ]
    table = recall_by_config(tokens, int(e.output_len))
    table.to_csv(run.path("recall_table.csv"), index=False)
    per_layer = tables["recall_layers"]
    per_layer = per_layer[per_layer["prompt_id"].isin(ids)]
    layer_table = (
        per_layer.groupby(["precision", "alignment", "layer"])[["hits", "slots"]].sum().reset_index()
    )
    layer_table["recall"] = layer_table["hits"] / layer_table["slots"]
    layer_table.to_csv(run.path("recall_per_layer.csv"), index=False)
    if e.get("figures", True):
        fig3(run.dir)

    summary: dict = {
        "model": lm.name,
        "prompts": len(prompts),
        "prompt_len": int(e.prompt_len),
        "output_len": int(e.output_len),
        "moe_layers": lm.adapter.num_moe_layers,
        "top_k": lm.adapter.top_k,
        "kv_positions": str(e.kv_positions),
        "int8_threshold": float(e.int8_threshold),
        **timing,
    }
    refs = tables["references"]
    refs = refs[refs["prompt_id"].isin(ids)]
    summary["reference_ms_per_token"] = round(float(refs["ms_per_token"].mean()), 3)
    runs = tables["recall_runs"]
    runs = runs[runs["prompt_id"].isin(ids)]
    for row in table.itertuples():
        key = f"{row.precision}_{row.alignment}"
        summary[f"recall_{key}"] = round(float(row.recall), 6)
        summary[f"recall_{key}_first_quarter"] = round(float(row.recall_first_quarter), 6)
        summary[f"recall_{key}_last_quarter"] = round(float(row.recall_last_quarter), 6)
        mine = runs[(runs["precision"] == row.precision) & (runs["alignment"] == row.alignment)]
        summary[f"shadow_ms_per_token_{key}"] = round(float(mine["ms_per_token"].mean()), 3)
    for (precision, mode), (value, _) in PAPER_RECALL.items():
        summary[f"paper_recall_{precision}_{mode}"] = value
    shadows = tables["shadows"]
    for row in shadows.itertuples():
        summary["bytes_full_total"] = int(row.full_total)
        summary["bytes_full_routed_experts"] = int(row.full_routed_experts)
        summary[f"bytes_shadow_{row.precision}_total"] = int(row.shadow_total)
        summary[f"bytes_shadow_{row.precision}_routed_experts"] = int(row.shadow_routed_experts)
        summary[f"ratio_shadow_{row.precision}_total"] = float(row.ratio_total)
        summary[f"ratio_shadow_{row.precision}_routed_experts"] = float(row.ratio_routed_experts)
    summary.update(_checks(table, precisions, modes))
    _print_table(table)
    return summary


def _print_table(table) -> None:
    cols = ["precision", "alignment", "recall", "recall_first_quarter", "recall_last_quarter", "paper_recall"]
    print(table[cols].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
