"""The OD-MoE distributed runtime: main, shadow and worker nodes over torch.distributed (docs/runtime.md)."""
