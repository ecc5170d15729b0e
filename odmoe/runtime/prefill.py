"""Prefill on the cluster (PAPER.md §5): no prediction, every expert of a layer on its prefill worker,
the prompt's rows streamed in mini-batches so that LAN transfer and expert compute overlap.

Workers load their prefill experts on their own, in layer order, as soon as a slot frees (the
paper leaves open whether loads of layer l+1 overlap layer l: here they start when the worker has
finished its layer-l experts, PAPER.md §11 item 18). The main node, once layer l's router has run,
splits each expert's rows into ``minibatches`` chunks (``numpy.array_split`` order; empty chunks are
not sent, an expert without rows gets one empty "last" chunk so its worker moves on) and sends chunk
0 of every expert before chunk 1 of any, so every worker starts computing after its first chunk
(Fig. 7b). It combines the outputs in ascending expert order with the model's own gate weights,
exactly as the eager loop does, so mini-batch counts do not change the result beyond fp32 rounding
of the row blocks.
"""

from __future__ import annotations

import numpy as np
import torch

from odmoe.runtime.layout import Layout
from odmoe.runtime.messages import Comm, Kind, key_of


def chunks(rows: int, minibatches: int) -> list[np.ndarray]:
    """Row-index chunks of one expert's batch; one empty chunk when the expert has no rows."""
    parts = [c for c in np.array_split(np.arange(rows), max(1, minibatches)) if len(c)]
    return parts or [np.arange(0)]


def exchange(
    comm: Comm,
    layout: Layout,
    tick_n: int,
    layer: int,
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    minibatches: int,
) -> torch.Tensor:
    """Send layer ``layer``'s prompt rows to the prefill workers, gather and combine their outputs."""
    E = layout.num_experts
    routed = {}
    # rows are cut from a host copy of the hidden state (messages are host tensors): index it on the host
    index = top_k_index.detach().cpu()
    for e in range(E):
        token_idx, pos = torch.where(index == e)
        routed[e] = (token_idx, pos, chunks(len(token_idx), minibatches))
    x = hidden.detach().cpu()
    rounds = max(len(c) for _, _, c in routed.values())
    for c in range(rounds):
        for e in range(E):
            token_idx, _, parts = routed[e]
            if c < len(parts):
                rows = x[token_idx[torch.from_numpy(parts[c])]]
                last = int(c == len(parts) - 1)
                comm.send(
                    layout.worker_rank(layout.prefill_worker(e)),
                    Kind.PREFILL,
                    tick_n,
                    layer,
                    [e, c, last],
                    rows,
                )
    outs = {}
    for e in range(E):
        worker = Layout.name(layout.worker_rank(layout.prefill_worker(e)))
        key, what = key_of(Kind.PREFILL_OUT, tick_n, layer, e), f"prefill output of layer {layer} expert {e}"
        outs[e] = [comm.mailbox.get(key, what, worker) for _ in routed[e][2]]
    comm.arrived([m for msgs in outs.values() for m in msgs])
    out = torch.zeros_like(hidden)
    for e in range(E):
        token_idx, pos, _ = routed[e]
        if len(token_idx) == 0:
            continue
        y = torch.cat([m.tensor for m in outs[e]]).to(hidden.device, hidden.dtype)
        token_idx, pos = token_idx.to(hidden.device), pos.to(hidden.device)
        out.index_add_(0, token_idx, (y * top_k_weights[token_idx, pos, None]).to(out.dtype))
    return out
