"""The quality half of the paper's Table 2 (PAPER.md §9.8), and which lm-eval task measures each benchmark.

The paper gives no sample counts, shot settings or metric variants; the task and metric chosen for each
benchmark (``TASKS``) are lm-evaluation-harness's defaults for it. Percentages are as printed; MT-Bench-101
is a GPT-4-judged score out of 10.
"""

from __future__ import annotations

COLUMNS = ("Mixtral-Offloading", "MoE-Infinity", "HOBBIT", "AdapMoE", "Transformers / llama.cpp / OD-MoE")
FULL = COLUMNS[-1]
# the paper's quality column of each system; the full-precision systems share one value
SYSTEM_COLUMN = {
    "mixtral_offloading": "Mixtral-Offloading",
    "moe_infinity": "MoE-Infinity",
    "hobbit": "HOBBIT",
    "adapmoe": "AdapMoE",
    "cached": FULL,
    "cpu_only": FULL,
    "odmoe": FULL,
}
QUALITY = {  # benchmark: values in COLUMNS order
    "HellaSwag": (63.50, 64.50, 62.00, 44.50, 76.25),
    "MMLU": (49.82, 51.93, 55.26, 48.60, 70.34),
    "ARC-Challenge": (82.37, 77.97, 86.10, 75.68, 86.44),
    "GSM8K": (56.00, 60.00, 35.00, 22.00, 64.14),
    "WinoGrande": (52.40, 56.40, 41.20, 43.20, 65.67),
    "BigBench-Hard": (58.30, 52.20, 38.89, 43.33, 59.84),
    "BigCodeBench": (8.00, 15.00, 8.00, 0.00, 16.00),
    "HumanEval": (17.68, 1.83, 1.83, 1.54, 24.39),
    "MT-Bench-101": (7.40, 7.81, 6.67, 4.47, 7.83),
    "TruthfulQA": (86.50, 87.50, 73.50, 76.50, 89.00),
}
# lm-eval task -> (the paper's benchmark, the headline metric key "metric,filter" of lm-eval's results)
TASKS = {
    "hellaswag": ("HellaSwag", "acc_norm,none"),
    "mmlu": ("MMLU", "acc,none"),
    "arc_challenge": ("ARC-Challenge", "acc_norm,none"),
    "gsm8k": ("GSM8K", "exact_match,strict-match"),
    "winogrande": ("WinoGrande", "acc,none"),
    "bbh": ("BigBench-Hard", "exact_match,get-answer"),
    "humaneval": ("HumanEval", "pass@1,create_test"),
    "truthfulqa_mc2": ("TruthfulQA", "acc,none"),
    "truthfulqa_mc1": ("TruthfulQA", "acc,none"),
    "kjv_next_verse": (None, "acc,none"),
    "kjv_next_word": (None, "acc,none"),
}
# the paper's benchmarks lm-eval does not ship, and why
NOT_IN_LM_EVAL = {
    "BigCodeBench": "its own harness (bigcode-project/bigcodebench) executes the generated code in a sandbox",
    "MT-Bench-101": "multi-turn dialogues scored by a GPT-4 judge (mtbench101), not a harness metric",
}


def paper_value(task: str, system: str) -> float | None:
    """The paper's number for ``task`` (an lm-eval task name) and ``system``, or None."""
    benchmark = TASKS.get(task, (None, None))[0]
    column = SYSTEM_COLUMN.get(system)
    if benchmark is None or column is None:
        return None
    return QUALITY[benchmark][COLUMNS.index(column)]
