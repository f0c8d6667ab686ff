"""Third-party notices a pesc user cannot act on, silenced at their source and nowhere else.

Each is matched by its own message, so every other warning still reaches the user.
"""

import logging
import warnings
from contextlib import contextmanager

# bitsandbytes logs this at import on every CPU without the `kernels` package (whose kernels come from
# the Hub at run time); the slower built-in CPU path it falls back to is the one pesc's CPU runs use.
_BNB_CPU_KERNELS_LOGGER = "bitsandbytes.backends.cpu.ops"
_BNB_CPU_KERNELS_NOTICE = "kernels-community"


class _DropMessage(logging.Filter):
    def __init__(self, fragment: str):
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


def silence_bitsandbytes_cpu_kernel_notice() -> None:
    """Drop bitsandbytes' 'Failed to load CPU gemm_4bit_forward from kernels-community' line (idempotent)."""
    logger = logging.getLogger(_BNB_CPU_KERNELS_LOGGER)
    if not any(isinstance(f, _DropMessage) for f in logger.filters):
        logger.addFilter(_DropMessage(_BNB_CPU_KERNELS_NOTICE))


@contextmanager
def peft_deprecation_warnings_silenced():
    """peft reads transformers' deprecated `is_gradient_checkpointing` alias when it wraps a model: its
    FutureWarning, not ours, and the user's code never calls it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield
