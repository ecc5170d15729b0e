"""Expert storage formats: what the host holds, what the link moves, and the dequantization paid at
compute time.

An :class:`ExpertFormat` packs one expert's ``(gate_up, down)`` into a tuple of tensors (the host copy;
the link copies exactly these bytes) and unpacks them into fp32 matrices just before the expert's
matmuls, inside the engine's timed expert computation — where the originals pay it (Mixtral-Offloading
dequantizes inside its Triton matmul kernels on the GPU, ``src/triton_kernels.py``).

* ``fp32``: the model's weights (no packing).
* ``nf4``: bitsandbytes' 4-bit NormalFloat, one fp32 absmax per block of 64 (the same scheme as
  ``odmoe.predict.quantize``; tests check the values against bitsandbytes), two codes per byte. Re-done
  in PyTorch because bitsandbytes' CPU ``quantize_4bit`` takes about 0.14 s per tensor here.
* ``hqq2`` / ``hqq3`` / ``hqq4``: HQQ through the ``hqq`` package (``hqq.core.quantize.Quantizer``: its
  half-quadratic optimizer and bit packing), with the original Mixtral-Offloading settings
  (``notebooks/demo.ipynb``, ``src/build_model.py``): experts 2-bit, group 16, along axis 0, with the
  scales and zeros themselves quantized to 8 bits in groups of 128 (``quant_scale=True,
  quant_zero=True``, the second-level statistics fp16); attention 4-bit, group 64, scale groups of 256.
  ``hqq3`` (the paper's 3-bit experts) uses group 64 (the repository ships no 3-bit config; 64 is
  HQQ's default group). Second-level groups that do not divide the number of statistics are shrunk to
  their greatest common divisor (micro models only; tiny-mixtral's divide).

The hqq package's own ``HQQLinear`` now ignores ``quant_scale``/``quant_zero`` (deprecated), so the
two-level scheme of the hqq commit the original pins is rebuilt here from ``Quantizer.quantize`` /
``Quantizer.dequantize``, as that commit's ``HQQLinear.quantize`` did.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from odmoe.errors import OdmoeError

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


def nf4_values(codes: torch.Tensor, absmax: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """fp32 values of NF4 ``codes`` [N] with their blocks' ``absmax``, reshaped to ``shape``."""
    pad = (-codes.numel()) % BLOCKSIZE
    code = NF4_CODE.to(codes.device)
    values = torch.nn.functional.pad(code[codes.long()], (0, pad)).view(-1, BLOCKSIZE) * absmax[:, None]
    return values.reshape(-1)[: math.prod(shape)].view(shape)


def nf4_roundtrip(w: torch.Tensor) -> torch.Tensor:
    """``w`` quantized to NF4 and dequantized back (same shape and dtype)."""
    codes, absmax = nf4_codes(w)
    return nf4_values(codes, absmax, w.shape).to(w.dtype)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes [N] (N even) -> uint8 [N/2], two codes per byte."""
    c = codes.to(torch.uint8).view(-1, 2)
    return c[:, 0] << 4 | c[:, 1]


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed >> 4, packed & 15], dim=1).view(-1)


@dataclass(frozen=True)
class HQQConfig:
    """One HQQ setting: weight bits and group size (axis 0), 8-bit scale/zero groups."""

    nbits: int
    group_size: int
    scale_group: int = 128
    zero_group: int = 128


# Mixtral-Offloading's settings (notebooks/demo.ipynb): ffn_config, its 3-bit variant, attn_config.
HQQ_CONFIGS = {
    "hqq2": HQQConfig(2, 16),
    "hqq3": HQQConfig(3, 64),
    "hqq4": HQQConfig(4, 64, scale_group=256),
}


def _quantize(w: torch.Tensor, nbits: int, group: int, optimize: bool) -> tuple[torch.Tensor, dict]:
    from hqq.core.quantize import Quantizer

    w_q, meta = Quantizer.quantize(
        w.detach().float().cpu(),
        nbits=nbits,
        group_size=group,
        axis=0,
        optimize=optimize,
        compute_dtype=torch.float32,
        device="cpu",
    )
    meta["compute_dtype"] = torch.float32
    return w_q, meta


def _static(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if k not in ("scale", "zero")}


class HQQMatrix:
    """One weight matrix in HQQ's two-level format: packed codes, 8-bit scales and zeros, and their
    fp16 second-level statistics. ``tensors`` is what is stored and moved; ``static`` the shapes."""

    def __init__(self, w: torch.Tensor, cfg: HQQConfig):
        if w.numel() % cfg.group_size:
            raise OdmoeError(
                f"HQQ group size {cfg.group_size} does not divide a {tuple(w.shape)} matrix; "
                "use a model whose expert sizes are multiples of it"
            )
        w_q, meta = _quantize(w, cfg.nbits, cfg.group_size, optimize=True)
        n_stats = meta["scale"].numel()
        s_q, s_meta = _quantize(meta["scale"], 8, math.gcd(n_stats, cfg.scale_group), optimize=False)
        z_q, z_meta = _quantize(meta["zero"], 8, math.gcd(n_stats, cfg.zero_group), optimize=False)
        self.tensors = (
            w_q,
            s_q,
            s_meta["scale"].half(),
            s_meta["zero"].half(),
            z_q,
            z_meta["scale"].half(),
            z_meta["zero"].half(),
        )
        self.static = (_static(meta), _static(s_meta), _static(z_meta))

    @staticmethod
    def dequantize(tensors, static) -> torch.Tensor:
        from hqq.core.quantize import Quantizer

        w_q, s_q, s_s, s_z, z_q, z_s, z_z = tensors
        meta, s_meta, z_meta = static
        scale = Quantizer.dequantize(s_q, {**s_meta, "scale": s_s.float(), "zero": s_z.float()})
        zero = Quantizer.dequantize(z_q, {**z_meta, "scale": z_s.float(), "zero": z_z.float()})
        return Quantizer.dequantize(w_q, {**meta, "scale": scale, "zero": zero})


class ExpertFormat:
    """How one expert is stored on the host and turned back into fp32 matrices (see module doc)."""

    name = "fp32"
    bits: float = 32.0  # nominal bits per weight (before statistics)

    def pack(self, gate_up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return gate_up.detach(), down.detach()

    def unpack(self, tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        return tensors[0], tensors[1]


class NF4Format(ExpertFormat):
    name = "nf4"
    bits = 4.0

    def __init__(self) -> None:
        self.shapes: tuple[torch.Size, torch.Size] | None = None

    def pack(self, gate_up, down):
        self.shapes = (gate_up.shape, down.shape)
        out = []
        for w in (gate_up, down):
            if w.numel() % BLOCKSIZE:
                raise OdmoeError(f"nf4: a {tuple(w.shape)} matrix is not a whole number of 64-blocks")
            codes, absmax = nf4_codes(w)
            out += [pack_nibbles(codes), absmax]
        return tuple(out)

    def unpack(self, tensors):
        gu_c, gu_a, dn_c, dn_a = tensors
        return (
            nf4_values(unpack_nibbles(gu_c), gu_a, self.shapes[0]),
            nf4_values(unpack_nibbles(dn_c), dn_a, self.shapes[1]),
        )


class HQQFormat(ExpertFormat):
    def __init__(self, name: str):
        self.name = name
        self.cfg = HQQ_CONFIGS[name]
        self.bits = float(self.cfg.nbits)
        self.static = None

    def pack(self, gate_up, down):
        gu, dn = HQQMatrix(gate_up, self.cfg), HQQMatrix(down, self.cfg)
        self.static = (gu.static, dn.static)  # identical for every expert of a model
        return gu.tensors + dn.tensors

    def unpack(self, tensors):
        return (
            HQQMatrix.dequantize(tensors[:7], self.static[0]),
            HQQMatrix.dequantize(tensors[7:], self.static[1]),
        )


def make_format(name: str) -> ExpertFormat:
    if name == "fp32":
        return ExpertFormat()
    if name == "nf4":
        return NF4Format()
    if name in HQQ_CONFIGS:
        return HQQFormat(name)
    raise OdmoeError(f"unknown expert format {name!r}; use one of fp32, nf4, {', '.join(HQQ_CONFIGS)}")


def packed_bytes(tensors: tuple[torch.Tensor, ...]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class HQQLinear(torch.nn.Module):
    """A linear layer stored in HQQ's format and dequantized at each call (Mixtral-Offloading's 4-bit
    attention, ``replace_attn_layers`` in ``src/build_model.py``). The packed tensors are frozen
    parameters, so ``MoEAdapter.parameter_bytes`` counts their stored size."""

    def __init__(self, linear: torch.nn.Linear, cfg: HQQConfig):
        super().__init__()
        m = HQQMatrix(linear.weight, cfg)
        device = linear.weight.device
        self.packed = torch.nn.ParameterList(
            torch.nn.Parameter(t.to(device), requires_grad=False) for t in m.tensors
        )
        self.static = m.static
        self.bias = linear.bias
        self.original = [linear]  # a list, so the fp32 layer is not a submodule (nor counted)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = HQQMatrix.dequantize(tuple(self.packed), self.static)
        return torch.nn.functional.linear(x, w.to(x.dtype), self.bias)


def packed_attention_bytes(model: torch.nn.Module) -> float | None:
    """Stored bytes per attention weight after :func:`quantize_attention` (None: attention is not packed)."""
    layers = [m for m in model.modules() if isinstance(m, HQQLinear)]
    if not layers:
        return None
    stored = sum(packed_bytes(tuple(m.packed)) for m in layers)
    return stored / sum(m.original[0].weight.numel() for m in layers)


def quantize_attention(model: torch.nn.Module, fmt: str = "hqq4") -> list[tuple[torch.nn.Module, str]]:
    """Swap every decoder layer's attention projections (each ``nn.Linear`` of its attention module:
    q/k/v/o, or multi-head latent attention's q_a/q_b/kv_a/kv_b/o) for :class:`HQQLinear`; returns what
    to restore."""
    cfg = HQQ_CONFIGS[fmt]
    swapped = []
    for layer in model.model.layers:
        attn = layer.self_attn
        for name, lin in list(attn.named_children()):
            if isinstance(lin, torch.nn.Linear):
                setattr(attn, name, HQQLinear(lin, cfg))
                swapped.append((attn, name))
    return swapped


def restore_attention(swapped: list[tuple[torch.nn.Module, str]]) -> None:
    for attn, name in swapped:
        setattr(attn, name, getattr(attn, name).original[0])
