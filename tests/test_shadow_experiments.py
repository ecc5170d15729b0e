"""``+exp=recall`` and ``+exp=alignment_periods`` end to end on the micro model, and resuming."""

from __future__ import annotations

import importlib
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from odmoe.data.prompts import Prompt
from odmoe.errors import OdmoeError
from odmoe.predict.evaluate import evaluate, load_tables
from odmoe.results import Run

CONF = Path(__file__).resolve().parent.parent / "conf"


def run_in_process(exp: str, tmp_path, *overrides: str) -> tuple[dict, Path]:
    """Compose the Hydra config as the runner does and call the experiment in this process."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"+exp={exp}", "model=micro-mixtral", "device=cpu", *overrides])
    run = Run(tmp_path / exp, exp, OmegaConf.to_container(cfg, resolve=True))
    module = importlib.import_module(f"experiments.{exp}")
    return module.run(cfg, run), run.dir


def test_recall_experiment_writes_tables_figure_and_summary(tmp_path, micro_mixtral_dir):
    summary, run_dir = run_in_process(
        "recall",
        tmp_path,
        "exp.num_prompts=2",
        "exp.prompt_len=8",
        "exp.output_len=8",
        "exp.precisions=[fp32,int8]",
        "exp.alignments=[none,token_kv,T2_KV4]",
        "exp.workers=2",  # the forked-worker path
    )
    assert summary["recall_fp32_token_kv"] == 1.0 and summary["recall_fp32_none"] == 1.0
    assert summary["paper_recall_int8_token_kv"] == 0.9734
    assert 0.25 < summary["ratio_shadow_int8_routed_experts"] < 0.30
    assert summary["bytes_full_total"] > summary["bytes_shadow_int8_total"] > 0
    assert {"recall_int8_T2_KV4_first_quarter", "check_int8_token_kv_ge_none"} <= set(summary)
    tokens = pd.read_csv(run_dir / "recall_tokens.csv")
    assert len(tokens) == 2 * 3 * 2 * 8  # precisions x modes x prompts x n
    assert (tokens["slots"] == 2 * 4).all()  # k x MoE layers
    table = pd.read_csv(run_dir / "recall_table.csv")
    assert set(table["alignment"]) == {"none", "token_kv", "T2_KV4"}
    assert (run_dir / "fig3.png").stat().st_size > 10_000
    assert len(list((run_dir / "traces").glob("*.parquet"))) == 2


def test_alignment_periods_experiment_and_bad_period(tmp_path, micro_mixtral_dir):
    args = ("exp.num_prompts=1", "exp.prompt_len=8", "exp.output_len=6", "exp.workers=1")
    summary, run_dir = run_in_process(
        "alignment_periods", tmp_path, *args, "exp.token_periods=[1,off]", "exp.kv_periods=[2,off]"
    )
    assert {"recall_T1_KV2", "recall_T1_KVoff", "recall_Toff_KV2", "recall_Toff_KVoff"} <= set(summary)
    assert len(pd.read_csv(run_dir / "periods.csv")) == 4
    assert (run_dir / "fig6.png").stat().st_size > 10_000
    with pytest.raises(OdmoeError, match="KV alignment period -1 is invalid"):
        run_in_process("alignment_periods", tmp_path / "bad", *args, "exp.kv_periods=[-1]")


def test_evaluate_resumes_per_precision_alignment_prompt(tmp_path, micro_mixtral):
    torch.set_num_threads(1)
    run = Run(tmp_path / "run", "recall", {"test": 1})
    prompts = [Prompt("a", (5, 6, 7, 8)), Prompt("b", (9, 10, 11, 12))]
    evaluate(run, micro_mixtral, prompts[:1], 5, ["fp16"], ["none"], workers=1)
    first = load_tables(run)["recall_runs"]
    assert len(first) == 1
    evaluate(run, micro_mixtral, prompts, 5, ["fp16"], ["none", "token"], workers=1)
    runs = load_tables(run)["recall_runs"]
    assert len(runs) == 4  # only the three new (precision, alignment, prompt) units were added
    pd.testing.assert_frame_equal(runs.iloc[:1], first)  # the finished unit was not redone
    assert len(pd.read_csv(run.path("recall_tokens.csv"))) == 4 * 5
    with pytest.raises(OdmoeError, match="unknown alignment mode"):
        evaluate(run, micro_mixtral, prompts, 5, ["fp16"], ["sometimes"], workers=1)
