"""Progress bars off (``-q``): ours, lm-eval's, transformers', datasets' and the hub's.

Each library has its own documented switch. Environment variables are the only ones that reach a library
before it is imported (and in the processes a launcher starts): :func:`quiet_environment` sets them first thing.
tqdm's ``TQDM_DISABLE`` only changes tqdm's *default*, so lm-eval's model bars, which pass ``disable=``
explicitly, are turned off through the ``disable_tqdm`` argument of its model API instead
(:func:`bars_disabled`, read by :mod:`benchmark.evaluate`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

QUIET_VARS = {
    "TQDM_DISABLE": "1",  # every tqdm bar that does not pass `disable` itself (lm-eval's "building contexts")
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",  # datasets' map / load bars
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # downloads, and transformers' bars that use the hub's tqdm
}


def quiet_environment() -> None:
    """Set the libraries' progress-bar switches in the environment (call before they are imported)."""
    os.environ.update(QUIET_VARS)


@contextlib.contextmanager
def quiet_children() -> Iterator[None]:
    """:data:`QUIET_VARS` in the environment only while it is open: for processes started inside it (a job inherits
    its launcher's environment and reads them on import), leaving this process's own bars as they were."""
    saved = {k: os.environ.get(k) for k in QUIET_VARS}
    os.environ.update(QUIET_VARS)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def silence_libraries() -> None:
    """The same switches for libraries already imported: datasets' and transformers' own functions."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def bars_disabled() -> bool:
    """Whether progress bars are off for this process (``TQDM_DISABLE`` set to a true value, as ``-q`` does)."""
    return os.environ.get("TQDM_DISABLE", "").strip().lower() in ("1", "true", "yes", "on")
