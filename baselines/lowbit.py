"""Low-bit expert copies: bitsandbytes' NF4 format, reproduced in plain PyTorch.

HQQ (Mixtral-Offloading's and AdapMoE's quantizer) is not installed, so low-bit experts use NF4 —
bitsandbytes' 4-bit NormalFloat with one fp32 absmax per block of 64 weights, the same scheme as
``odmoe.predict.quantize`` (tests check the codes against bitsandbytes). Why re-done in PyTorch:
bitsandbytes' CPU ``quantize_4bit`` takes about 0.14 s per tensor here (over a minute per system for
tiny-mixtral) and its fp16 CPU matmul is 8x slower than fp32. We keep the dequantized values
(exactly the NF4 grid times each block's absmax) in fp32 and compute with fp32 matmuls; the cache and
the link are charged the *stored* NF4 size (``MoEAdapter.expert_bytes("nf4")``).
"""

from __future__ import annotations

import torch

# bitsandbytes' NF4 code book (bitsandbytes.functional.get_4bit_type("nf4")).
NF4_CODE = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ]
)
BLOCKSIZE = 64


def nf4_codes(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(4-bit code indices [N], fp32 absmax per 64-block) of ``w`` flattened in row-major order."""
    flat = w.detach().reshape(-1).float()
    pad = (-flat.numel()) % BLOCKSIZE
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, BLOCKSIZE)
    absmax = blocks.abs().amax(dim=1).clamp_min(1e-12)
    normed = blocks / absmax[:, None]
    mids = (NF4_CODE[1:] + NF4_CODE[:-1]) / 2
    codes = torch.bucketize(normed, mids)
    return codes.reshape(-1)[: flat.numel()], absmax


def nf4_roundtrip(w: torch.Tensor) -> torch.Tensor:
    """``w`` quantized to NF4 and dequantized back (same shape and dtype)."""
    codes, absmax = nf4_codes(w)
    pad = (-codes.numel()) % BLOCKSIZE
    values = torch.nn.functional.pad(NF4_CODE[codes], (0, pad)).view(-1, BLOCKSIZE) * absmax[:, None]
    return values.reshape(-1)[: w.numel()].view_as(w).to(w.dtype)
