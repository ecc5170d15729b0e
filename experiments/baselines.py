"""``+exp=baselines``: Table 2 for the fully cached model and every offloading policy of ``baselines/``.

All systems x the paper's four workloads on one hardware profile, one invocation. Writes
``table2.csv`` (one row per system and workload, resumable), ``table2.md`` (measured beside the
paper's numbers) and bar-chart figures (``plots/baselines.py``). On CPU every time is on the emulated
device/link clock (compute measured, loads emulated by the profile's link) — said in the markdown.
"""

from __future__ import annotations

import logging

import torch

from baselines import SYSTEMS, Workload, reference_tokens, run_system, system_config
from baselines.report import markdown
from odmoe.data.corpus import split_chapters
from odmoe.data.prompts import load_prompts
from odmoe.errors import OdmoeError
from odmoe.hardware import load_profile, profile_from_config
from odmoe.models import load_from_cfg
from odmoe.results import Run
from odmoe.trace import check_length

log = logging.getLogger("odmoe")


def held_out_ids(tokenizer, n: int) -> list[int]:
    """``n`` tokens from the end of the longest evaluation chapter (never trained on)."""
    ids = max((tokenizer(t)["input_ids"] for t in split_chapters("eval")), key=len)
    if len(ids) < n:
        raise OdmoeError(
            f"the longest evaluation chapter has {len(ids)} tokens; ask for ppl_tokens <= {len(ids)}"
        )
    return list(ids[-n:])


def run(cfg, run: Run) -> dict:
    e = cfg.exp
    if e.get("threads"):
        torch.set_num_threads(int(e.threads))  # emulated timing counts CPU time: one thread keeps it exact
    lm = load_from_cfg(cfg)
    run.bind_model(lm.name, lm.fingerprint)
    hardware = profile_from_config(cfg.hardware)
    on_cuda = next(lm.model.parameters()).device.type == "cuda"
    if not on_cuda and hardware.h2d_bandwidth is None:
        log.info("hardware profile %s has no link; emulating %s", hardware.name, e.hardware)
        hardware = load_profile(e.hardware)
    unknown = set(e.systems) - set(SYSTEMS)
    if unknown:
        raise OdmoeError(
            f"unknown systems {sorted(unknown)} in exp.systems; choose from {', '.join(SYSTEMS)}"
        )
    workloads = []
    prompts_by_len = {}
    for p, o in e.workloads:
        check_length(lm.model, int(p), int(o))
        if p not in prompts_by_len:
            prompts_by_len[p] = tuple(
                (x.id, x.token_ids) for x in load_prompts(cfg.data, lm.tokenizer, int(p), int(e.num_prompts))
            )
        workloads.append(Workload(int(p), int(o), prompts_by_len[p]))
    references = reference_tokens(lm, workloads)
    ppl_ids = held_out_ids(lm.tokenizer, int(e.ppl_tokens))
    table = run.table("table2", key=["system", "prompt_len", "output_len"])
    overrides = e.get("overrides") or {}
    for name in e.systems:
        todo = [
            w
            for w in workloads
            if not table.done(system=name, prompt_len=w.prompt_len, output_len=w.output_len)
        ]
        if not todo:
            continue
        log.info("system %s: %d workloads", name, len(todo))
        for row in run_system(
            name, system_config(name, overrides.get(name)), lm, todo, hardware, references, ppl_ids
        ):
            row["hardware"] = hardware.name
            table.add(row)
    df = table.frame()
    note = (
        f"Model {lm.name}; hardware profile `{hardware.name}` "
        + (
            "(**emulated**: compute measured on the CPU, device memory ledgered, host->device loads timed by the "
            f"profile's {hardware.h2d_bandwidth / 1e6:.1f} MB/s link; not a GPU measurement)"
            if not on_cuda
            else "(real CUDA device)"
        )
        + f"; {int(e.num_prompts)} prompts per prompt length; paper numbers are Mixtral-8x7B on RTX 3090s — compare orderings and ratios, not absolute values."
    )
    run.path("table2.md").write_text(markdown(df, note))
    try:
        from plots.baselines import plot_table2

        plot_table2(run.path("table2.csv"), run.dir)
    except ImportError as err:  # matplotlib missing: tables are still complete
        log.warning("no figures: %s", err)
    mean = df.groupby("system").mean(numeric_only=True)
    summary = {"model": lm.name, "hardware_used": hardware.name, "timing_emulated": not on_cuda}
    for name in mean.index:
        summary[f"{name}_decode_tps"] = round(float(mean.loc[name, "decode_tps"]), 4)
        summary[f"{name}_ttft_ms"] = round(float(mean.loc[name, "ttft_ms"]), 2)
        summary[f"{name}_agreement"] = round(float(mean.loc[name, "agreement"]), 4)
    return summary
