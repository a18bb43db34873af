"""The known noise of the training stack, filtered where seqzoo's runs start (``run`` and ``seqzoo-eval``).

Every run printed, once for ``fit`` and once for ``test``: torchdata 0.11 calling a deprecated torch API,
Lightning 2.6 using torch 2.13's deprecated ``LeafSpec``, Lightning's ``litlogger`` tip and its
"GPU available / TPU available" lines, and (on a resume, where seqzoo reuses the folder on purpose)
"Checkpoint directory … exists". None of them is something a user can act on. Only these exact messages
are filtered, and only while a run is in progress; ``pyproject.toml`` filters the same ones for pytest.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

# (message regex, category): warnings.filterwarnings matches the regex at the start of the message.
NOISE_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    ("'set_vital' is deprecated", UserWarning),  # torchdata.stateful_dataloader, every loader
    (r".*LeafSpec.*deprecated", Warning),  # lightning.pytorch.utilities._pytree on torch 2.13
    (r".*litlogger", Warning),
    (r"Checkpoint directory .* exists and is not empty", Warning),  # a resume writes into its own folder
)
# Lightning's rank_zero_info lines (logger "lightning.pytorch.utilities.rank_zero") that carry no information
# about this run: which accelerators exist but are unused, and an advertisement.
NOISE_LOG_PREFIXES: tuple[str, ...] = ("GPU available:", "TPU available:", "HPU available:", "💡 Tip:")
_LIGHTNING_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class _DropNoise(logging.Filter):
    """Drops log records whose message starts with one of :data:`NOISE_LOG_PREFIXES`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(NOISE_LOG_PREFIXES)


@contextmanager
def quiet_training() -> Iterator[None]:
    """Within the block, the warnings of :data:`NOISE_WARNINGS` and the log lines of :data:`NOISE_LOG_PREFIXES`
    are dropped; everything else (and every other warning) still shows."""
    drop = _DropNoise()
    loggers = [logging.getLogger(name) for name in _LIGHTNING_LOGGERS]
    for logger in loggers:
        logger.addFilter(drop)
    try:
        with warnings.catch_warnings():
            for message, category in NOISE_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=category)
            yield
    finally:
        for logger in loggers:
            logger.removeFilter(drop)
