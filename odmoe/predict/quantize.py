"""Real bitsandbytes quantization of a model's weights, routed experts included.

The usual bitsandbytes path (transformers' ``load_in_8bit`` / ``load_in_4bit``) replaces
``nn.Linear`` modules only. Transformers 5 stores the routed experts of a layer as two fused 3-D
tensors, which that path leaves in full precision although they are over 90% of an MoE's bytes.
Here each routed expert is quantized on its own, with bitsandbytes' defaults:

* ``int8``: LLM.int8() — row-wise absmax int8 weights (one fp32 scale per output row), activations
  quantized row-wise on the fly, int8 matmul, and (threshold > 0) the mixed-precision decomposition
  that keeps outlier activation columns in fp16 (``bitsandbytes.matmul``; transformers' default
  threshold 6.0).
* ``nf4``: 4-bit NormalFloat, one fp32 absmax per block of 64 weights, no double quantization
  (transformers' defaults), run by ``bitsandbytes.matmul_4bit`` with fp16 compute.

Non-expert ``nn.Linear`` modules of the decoder layers (attention projections, shared experts,
dense MLPs) become ``bnb.nn.Linear8bitLt`` / ``bnb.nn.Linear4bit``. Embeddings, norms, routers and
the LM head stay in fp16 (the compute dtype): that is what transformers' bitsandbytes integration
keeps unquantized by default (routers are not ``nn.Linear`` in transformers 5, ``lm_head`` is skipped).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

import torch
from torch import nn

from odmoe.errors import OdmoeError
from odmoe.models import rowexact
from odmoe.models.rowexact import split_rows

QUANTIZED = ("int8", "nf4")
NF4_BLOCKSIZE = 64
DEFAULT_INT8_THRESHOLD = 6.0


def require_bitsandbytes(precision: str, device: torch.device | str) -> None:
    """Fail with a clear message unless bitsandbytes can quantize and multiply ``precision`` on ``device``."""
    device = torch.device(device)
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bf

        w = torch.linspace(-1, 1, 64 * 64, device=device).reshape(64, 64).half()
        x = torch.ones(1, 64, device=device, dtype=torch.float16)
        with torch.no_grad():
            if precision == "int8":
                state = _int8_state(*bf.int8_vectorwise_quant(w)[:2], DEFAULT_INT8_THRESHOLD)
                y = bnb.matmul(x, state.CB, state=state)
            else:
                q, qs = bf.quantize_4bit(
                    w, blocksize=NF4_BLOCKSIZE, quant_type="nf4", compress_statistics=False
                )
                y = bnb.matmul_4bit(x, q.t(), quant_state=qs)
        if not torch.isfinite(y).all():
            raise RuntimeError("non-finite result")
    except Exception as e:  # bitsandbytes raises many types when a backend is missing
        raise OdmoeError(
            f"shadow precision {precision} needs bitsandbytes {precision} kernels on {device}, which fail here "
            f"({type(e).__name__}: {e}); install a bitsandbytes build with a {device.type} backend "
            "(pip install 'bitsandbytes>=0.45'), run on another device, or use shadow precision fp16"
        ) from None


def _int8_state(cb: torch.Tensor, scb: torch.Tensor, threshold: float):
    """A bitsandbytes LLM.int8() matmul state for an already quantized weight (inference only)."""
    from bitsandbytes.autograd._functions import MatmulLtState

    state = MatmulLtState()
    state.CB, state.SCB = cb, scb
    state.threshold = threshold
    state.has_fp16_weights = False
    state.is_training = False
    return state


class QuantizedExperts(nn.Module):
    """The routed experts of one MoE layer, each expert quantized on its own.

    Keeps rows apart itself in a row-exact forward (``rowexact``): LLM.int8() calls with an outlier
    and nf4 products run one row at a time.

    Holds the quantized data and scales as buffers (``*_data``: int8 [E, out, in] or packed nf4
    [E, out*in/2, 1] uint8; ``*_scale``: fp32 row scales or block absmax) and computes the experts chosen by the router through the
    adapter hook signature ``(module, hidden [T, H], top_k_index [T, k], top_k_weights [T, k])``.
    """

    def __init__(
        self,
        gate_up: torch.Tensor,
        down: torch.Tensor,
        act: Callable[[torch.Tensor], torch.Tensor],
        precision: str,
        int8_threshold: float = DEFAULT_INT8_THRESHOLD,
    ):
        super().__init__()
        if precision not in QUANTIZED:
            raise OdmoeError(
                f"unknown quantized expert format {precision!r}; use one of {', '.join(QUANTIZED)}"
            )
        import bitsandbytes.functional as bf

        self.precision = precision
        self.act = act
        self.num_experts = gate_up.shape[0]
        self.int8_threshold = float(int8_threshold)
        self.shapes = {"gate_up": tuple(gate_up.shape[1:]), "down": tuple(down.shape[1:])}
        self._dequantized: dict[tuple[str, int], torch.Tensor] = {}  # CPU nf4 only: see ``_linear``
        for name, w in (("gate_up", gate_up), ("down", down)):
            data, stats = [], []
            for e in range(self.num_experts):
                w16 = w[e].detach().to(torch.float16).contiguous()
                if precision == "int8":
                    cb, scb, _ = bf.int8_vectorwise_quant(w16)
                else:
                    cb, qs = bf.quantize_4bit(
                        w16, blocksize=NF4_BLOCKSIZE, quant_type="nf4", compress_statistics=False
                    )
                    scb = qs.absmax
                    if not hasattr(self, "nf4_code"):
                        self.register_buffer("nf4_code", qs.code, persistent=False)
                data.append(cb)
                stats.append(scb)
            self.register_buffer(f"{name}_data", torch.stack(data))
            self.register_buffer(f"{name}_scale", torch.stack(stats))

    def _apply(self, fn, recurse=True):
        self._dequantized.clear()  # moved or cast: dequantize again from the new buffers
        return super()._apply(fn, recurse)

    def _linear(self, x: torch.Tensor, name: str, expert: int) -> torch.Tensor:
        """``x`` [T, in] (fp16) times one expert's quantized weight, through bitsandbytes' own ops.

        The ops are the ones ``bnb.matmul`` / ``bnb.matmul_4bit`` run for inference, called without
        their autograd wrapper and state objects, whose Python costs more than the arithmetic at the
        shadow's sizes (``tests/test_shadow.py`` checks the results bit for bit against them).
        On CPU, bitsandbytes' 4-bit matmul is ``dequantize_4bit`` then ``F.linear`` at every call; the
        dequantized weight is kept (``_nf4_weight``), the same numbers without the repeated work.
        """
        data = getattr(self, f"{name}_data")[expert]
        scale = getattr(self, f"{name}_scale")[expert]
        ops = torch.ops.bitsandbytes
        if self.precision == "int8":
            if _outliers_shared(x, self.int8_threshold):
                return split_rows(self._linear, x, name, expert)
            ca, sca, outlier_cols = ops.int8_vectorwise_quant.default(x, self.int8_threshold)
            if self.int8_threshold > 0.0:
                return ops.int8_mixed_scaled_mm.default(x, ca, data, sca, scale, outlier_cols, None)[0]
            return ops.int8_scaled_mm.default(ca, data, sca, scale, bias=None, dtype=x.dtype)
        if rowexact.must_split(x):
            return split_rows(self._linear, x, name, expert)
        if x.device.type == "cpu":
            return nn.functional.linear(x, self._nf4_weight(name, expert))
        import bitsandbytes as bnb
        from bitsandbytes.functional import QuantState

        # Quantization states are rebuilt from the buffers on every call (a few attribute sets), so
        # they never point at stale storage after the module is moved.
        state = QuantState(
            absmax=scale,
            shape=torch.Size(self.shapes[name]),
            code=self.nf4_code,
            blocksize=NF4_BLOCKSIZE,
            quant_type="nf4",
            dtype=torch.float16,
        )
        return bnb.matmul_4bit(x, data.t(), quant_state=state)

    def _nf4_weight(self, name: str, expert: int) -> torch.Tensor:
        """One expert's nf4 weight dequantized by bitsandbytes (fp16 [out, in]), on first use."""
        key = (name, expert)
        weight = self._dequantized.get(key)
        if weight is None:
            weight = torch.ops.bitsandbytes.dequantize_4bit.default(
                getattr(self, f"{name}_data")[expert],
                getattr(self, f"{name}_scale")[expert],
                NF4_BLOCKSIZE,
                "nf4",
                list(self.shapes[name]),
                torch.float16,
            )
            self._dequantized[key] = weight
        return weight

    def expert(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        """One SwiGLU expert on tokens ``x`` [T, H] (fp16), with quantized kernels."""
        gate, up = self._linear(x, "gate_up", expert).chunk(2, dim=-1)
        return self._linear(self.act(gate) * up, "down", expert)

    def forward(
        self, module: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        x16 = hidden.to(torch.float16)
        if hidden.shape[0] == 1:  # decode: k experts on one token, fewer small ops
            out = torch.zeros_like(hidden)
            # summed in expert order, as the many-token loop below sums each token's experts
            for j, e in sorted(enumerate(top_k_index[0].tolist()), key=lambda je: je[1]):
                if 0 <= e < self.num_experts:
                    out += (self.expert(x16, e) * top_k_weights[:, j, None]).to(out.dtype)
            return out
        out = torch.zeros_like(hidden)
        for e in torch.unique(top_k_index).tolist():
            if not 0 <= e < self.num_experts:  # padding index of masked routing (as the eager loop)
                continue
            token_idx, pos = torch.where(top_k_index == e)
            y = self.expert(x16[token_idx], e) * top_k_weights[token_idx, pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


def _outliers_shared(x: torch.Tensor, threshold: float) -> bool:
    """Whether an LLM.int8() call on ``x`` would treat other rows' outlier columns as a row's own
    (it picks them over all rows), in a forward that must keep rows apart (``rowexact``)."""
    return threshold > 0.0 and rowexact.must_split(x) and bool((x.abs() >= threshold).any())


@functools.cache
def _int8_linear_class() -> type:
    """``bnb.nn.Linear8bitLt`` for inputs of any rank: its LLM.int8() matmul takes [T, in] and [B, T, in]
    only (on CPU), while multi-head latent attention feeds ``kv_b_proj`` [B, 1, S, kv_lora_rank]. Leading
    dimensions are flattened around the call, which is what the matmul does with a 3-D input anyway."""
    import bitsandbytes as bnb

    class Linear8bitLtAnyRank(bnb.nn.Linear8bitLt):
        keeps_rows_apart = True

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if _outliers_shared(x, self.state.threshold):
                return split_rows(self.forward, x)
            if x.dim() <= 3:
                return super().forward(x)
            return super().forward(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)

    return Linear8bitLtAnyRank


@functools.cache
def _nf4_linear_class() -> type:
    """``bnb.nn.Linear4bit`` with two changes that keep its numbers.

    * In a forward that must keep rows apart (``rowexact``) it runs one row per call: bitsandbytes
      takes another path for one row (a GEMV, the bias added after it).
    * On CPU, where bitsandbytes' 4-bit matmul is ``dequantize_4bit`` then ``F.linear`` at every
      call (its ``gemv_4bit`` for one row of a multiple of the block size, ``MatMul4Bit``
      otherwise), the dequantized weight is kept and the same two paths are taken without the
      repeated work (``tests/test_shadow.py`` compares them bit for bit).
    """
    import bitsandbytes as bnb

    class Linear4bitRows(bnb.nn.Linear4bit):
        keeps_rows_apart = True

        _kept_weight: torch.Tensor | None = None

        def _apply(self, fn, recurse=True):
            self._kept_weight = None  # moved or cast: dequantize again
            return super()._apply(fn, recurse)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if rowexact.must_split(x):
                return split_rows(self.forward, x)
            if x.device.type != "cpu" or self.compute_dtype is None:
                return super().forward(x)
            weight = self._kept_weight
            if weight is None:
                weight = self._kept_weight = bnb.functional.dequantize_4bit(
                    self.weight.data, self.weight.quant_state
                )
            a = x.to(self.compute_dtype)
            bias = None if self.bias is None else self.bias.to(self.compute_dtype)
            if a.numel() == a.shape[-1] and a.shape[-1] % self.weight.quant_state.blocksize == 0:
                out = nn.functional.linear(a, weight.to(a.dtype))  # bitsandbytes' gemv_4bit branch
                if bias is not None:
                    out += bias
            else:
                out = nn.functional.linear(a, weight.to(a.dtype), bias)
            return out.to(x.dtype)

    return Linear4bitRows


def quantize_linear(
    linear: nn.Linear, precision: str, int8_threshold: float = DEFAULT_INT8_THRESHOLD
) -> nn.Module:
    """``linear`` as a bitsandbytes ``Linear8bitLt`` (LLM.int8()) or ``Linear4bit`` (nf4, fp16 compute)."""
    import bitsandbytes as bnb

    device = linear.weight.device
    w16 = linear.weight.detach().to(torch.float16)
    bias = linear.bias is not None
    if precision == "int8":
        q = _int8_linear_class()(
            linear.in_features,
            linear.out_features,
            bias=bias,
            has_fp16_weights=False,
            threshold=int8_threshold,
        )
        q.weight = bnb.nn.Int8Params(w16.cpu(), requires_grad=False, has_fp16_weights=False)
    elif precision == "nf4":
        q = _nf4_linear_class()(
            linear.in_features,
            linear.out_features,
            bias=bias,
            compute_dtype=torch.float16,
            compress_statistics=False,
            quant_type="nf4",
        )
        # On CPUs with AVX512-BF16 bitsandbytes repacks the weight on first use with bf16 absmax, which
        # changes the arithmetic by host and fails for in_features < 64 (reshape to [out, 0]): keep its
        # generic fp32-absmax path everywhere, the one the block-64 NF4 format describes.
        q.support_avx512bf16_for_cpu = False
        q.weight = bnb.nn.Params4bit(
            w16.cpu(),
            requires_grad=False,
            blocksize=NF4_BLOCKSIZE,
            compress_statistics=False,
            quant_type="nf4",
        )
    else:
        raise OdmoeError(f"unknown quantized linear format {precision!r}; use one of {', '.join(QUANTIZED)}")
    if bias:
        q.bias = nn.Parameter(linear.bias.detach().to(torch.float16).cpu(), requires_grad=False)
    return q.to(device).eval()  # bitsandbytes quantizes on .to(device)


def quantized_linear_bytes(module: nn.Module) -> int | None:
    """Bytes of a bitsandbytes linear's weight data, scales and bias; None for other modules."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:  # no module is a bitsandbytes linear before it is imported (which costs seconds)
        return None
    if isinstance(module, bnb.nn.Linear8bitLt):
        w = module.weight
        scb = getattr(w, "SCB", None)
        if scb is None:
            scb = module.state.SCB
        total = w.numel() * w.element_size() + (scb.numel() * scb.element_size() if scb is not None else 0)
    elif isinstance(module, bnb.nn.Linear4bit):
        w = module.weight
        qs = w.quant_state
        total = w.numel() * w.element_size() + qs.absmax.numel() * qs.absmax.element_size()
        if qs.nested:
            total += qs.state2.absmax.numel() * qs.state2.absmax.element_size()
    else:
        return None
    if module.bias is not None:
        total += module.bias.numel() * module.bias.element_size()
    return int(total)
