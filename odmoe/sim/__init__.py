"""Discrete-event simulator of OD-MoE and the single-device baselines at any scale (docs/simulator.md).

shapes (model sizes from a HF config) + costs (durations from a hardware profile, or measured) + recall (hit counts)
-> distributed (OD-MoE schedule) / offload (cached model, offloading engine) -> analysis (Eq. 1, bounds, memory);
replay re-times a measured single-device run from its per-layer record (odmoe.record); calibrate and paper hold
the two calibrated quantities and the paper's numbers.
"""
