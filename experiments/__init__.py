"""Experiments: one module per experiment, each with ``run(cfg, run) -> dict`` (the summary)."""
