"""Expert-activation predictors. SEP (the paper's): a quantized shadow model run in lockstep."""

from odmoe.predict.sep import Alignment, Emulation, ReferenceRecord, emulate, record_reference
from odmoe.predict.shadow import PRECISIONS, Shadow, build_shadow, check_precision, weight_bytes

__all__ = [
    "PRECISIONS",
    "Alignment",
    "Emulation",
    "ReferenceRecord",
    "Shadow",
    "build_shadow",
    "check_precision",
    "emulate",
    "record_reference",
    "weight_bytes",
]
