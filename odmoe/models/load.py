"""Load an MoE causal LM offline: an embedded model, a local directory, or the local HF cache.

Weights load from safetensors only (``use_safetensors=True``); a checkpoint without them is
refused rather than unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from odmoe.decoding import set_decode_rule
from odmoe.errors import OdmoeError
from odmoe.models.adapter import SUPPORTED_MODEL_TYPES, MoEAdapter
from odmoe.models.tiny import EMBEDDED, ensure_embedded

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16}
DTYPES |= {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass
class LoadedModel:
    name: str
    path: Path
    model: PreTrainedModel
    tokenizer: object
    adapter: MoEAdapter

    @property
    def fingerprint(self) -> str:
        return checkpoint_fingerprint(self.path)


def checkpoint_fingerprint(directory: Path, sample: int = 1 << 20) -> str:
    """A cheap identity of a checkpoint: config.json plus each weight file's size, head and tail.

    Enough to notice a retrained or replaced model without hashing 90 GB of Mixtral weights.
    """
    h = hashlib.sha256((directory / "config.json").read_bytes())
    for f in sorted(directory.glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with f.open("rb") as fh:
            h.update(fh.read(sample))
            fh.seek(max(0, size - sample))
            h.update(fh.read(sample))
    return h.hexdigest()[:16]


_ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
_ITEMSIZE |= {"U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


def check_weights(directory: Path) -> None:
    """Every ``*.safetensors`` file in ``directory`` is whole: a readable header whose tensors exactly fill
    the file. Catches truncated copies and corrupted headers in milliseconds, before a model is built
    (safetensors stores no checksum, so flipped bits inside tensor data cannot be seen)."""
    for f in sorted(directory.glob("*.safetensors")):
        problem = _safetensors_problem(f)
        if problem:
            raise OdmoeError(
                f"weights file {f} is truncated or corrupted ({problem}); copy or download it again "
                f"(an embedded model: delete {directory} and rerun to retrain it)"
            )


def _safetensors_problem(path: Path) -> str | None:
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return f"{size} bytes, shorter than a header"
        n = int.from_bytes(head, "little")
        if n > size - 8:
            return f"header of {n} bytes in a {size}-byte file"
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "unreadable header"
    if not isinstance(header, dict):
        return "unreadable header"
    end = 0
    for name, t in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = (int(x) for x in t["data_offsets"])
            count = math.prod(int(d) for d in t["shape"])
        except (TypeError, KeyError, ValueError):
            return f"bad entry for tensor {name}"
        itemsize = _ITEMSIZE.get(t.get("dtype"))
        if stop < begin or (itemsize is not None and stop - begin != count * itemsize):
            return f"tensor {name} has {stop - begin} bytes for shape {t['shape']}"
        end = max(end, stop)
    if 8 + n + end != size:
        return f"{size} bytes on disk, the header describes {8 + n + end}"
    return None


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise OdmoeError("device=cuda asked for but no CUDA device is visible; use device=cpu")
    return torch.device(device)


def resolve_path(path: str) -> Path:
    """A local directory, or a Hub repo id already in the local HF cache (never downloaded)."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    if local.is_absolute() or path.startswith((".", "~")) or path.count("/") != 1:
        raise OdmoeError(f"model path {path} does not exist; pass model.path=<directory with config.json>")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path, local_files_only=True))
    except Exception:
        raise OdmoeError(
            f"model {path} is not in the local Hugging Face cache; download it on a machine with network "
            f"(`hf download {path}`) and copy the cache, or pass model.path=<local directory>"
        ) from None


def load_model(
    name: str,
    path: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    decode: Mapping | None = None,
) -> LoadedModel:
    """Load model ``path`` (or embedded model ``name`` when ``path`` is None) with its adapter.

    ``decode`` holds the decoding constraints (``odmoe.decoding``); None means plain greedy."""
    if path is None:
        if name not in EMBEDDED:
            raise OdmoeError(
                f"model {name!r} is not embedded; pass model.path=<local directory or cached repo id>"
            )
        directory = ensure_embedded(name)
    else:
        directory = resolve_path(path)
    if not (directory / "config.json").exists():
        raise OdmoeError(
            f"{directory} has no config.json; point model.path at a Hugging Face model directory"
        )
    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise OdmoeError(
            f"{directory} holds a {config.model_type!r} model, which is not a supported MoE; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if not any(directory.glob("*.safetensors")):
        raise OdmoeError(
            f"{directory} has no *.safetensors weights; odmoe never unpickles: convert to safetensors"
        )
    if dtype not in DTYPES:
        raise OdmoeError(f"unknown model.dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    check_weights(directory)
    model = AutoModelForCausalLM.from_pretrained(
        directory, dtype=DTYPES[dtype], use_safetensors=True, local_files_only=True
    ).to(pick_device(device))
    model.eval()
    set_decode_rule(model, decode)
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    return LoadedModel(name, directory, model, tokenizer, MoEAdapter(model))


def load_from_cfg(cfg) -> LoadedModel:
    """Load the model a Hydra config names (``cfg.model``, ``cfg.device``)."""
    m = cfg.model
    return load_model(
        m.name, m.get("path"), m.get("dtype", "float32"), cfg.get("device", "auto"), m.get("decode")
    )
