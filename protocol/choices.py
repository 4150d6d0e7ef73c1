"""Names that several packages must spell alike, each defined once."""
from __future__ import annotations

# Answer letters of a multiple-choice record, in display order; records, loaders and rewards use these.
LETTERS = "ABCDEFGHIJ"

# learner.precision -> the dtype's name (torch attribute and vLLM `dtype` alike).
PRECISION_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
PRECISIONS = tuple(PRECISION_DTYPES)

# cluster.device: the profile; it changes device, dtype and backend names, never the control flow.
DEVICES = ("cpu", "gpu")
