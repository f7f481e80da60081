"""Logging for megatron_step programs: rank-0 output, and megatron-core's import noise turned
into one clear line.

megatron-core warns at import, once per module, that Transformer Engine and apex are missing
(expected on CPU machines) and about deprecated torch collectives it calls itself. Entry points
call `setup_logging()`, which hides those and says once which backend is in use.
"""

from __future__ import annotations

import logging
import sys
import warnings

from megatron_step.parallel import is_rank0

logger = logging.getLogger("megatron_step")

_NOISE = (  # the TE/apex import warnings are filtered in megatron_step/__init__.py
    r".*full scope is deprecated.*",
    r".*torch\.distributed\.\w+ is deprecated.*",
    r".*`torch\.distributed\.\w+` is deprecated.*",
    r".*`load_state_dict` is deprecated.*",
    r".*\.grad attribute of a Tensor that is not a leaf Tensor.*",
)


def quiet_megatron_warnings() -> None:
    """Hide megatron-core's expected warnings (missing TE/apex on CPU, its own deprecations)."""
    import torch

    cpu_only = () if torch.cuda.is_available() else (r".*CUDA_DEVICE_MAX_CONNECTIONS.*",)
    for pattern in _NOISE + cpu_only:
        warnings.filterwarnings("ignore", message=pattern)
    logging.getLogger("megatron.core.dist_checkpointing").setLevel(logging.ERROR)
    logging.getLogger("megatron.core.optimizer").setLevel(logging.WARNING)


def setup_logging(level: int = logging.INFO) -> None:
    """Configure rank-0 logging to stderr and report the compute backend once."""
    quiet_megatron_warnings()
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S"))
        # decided per record: the rank is only known once torch.distributed is up
        handler.addFilter(lambda record: is_rank0() or record.levelno >= logging.WARNING)
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level)


def describe_backend() -> str:
    """One line naming the layer implementation in use and why."""
    from megatron_step import te

    if te.HAVE_TE:
        return "Transformer Engine layer spec (fused RMSNorm+linear, FP8 available)"
    return (f"Megatron local layer spec with torch RMSNorm; Transformer Engine unavailable: "
            f"{te.TE_UNAVAILABLE_REASON}")
