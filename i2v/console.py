"""What a person sees on the console: by default the run directory, one progress bar per epoch (rank 0), one line per
epoch and the final table; `--verbose` shows everything else (library INFO logs, deprecation warnings, Ray's).

Ray Train workers are other processes: `train_fn_per_worker` calls `configure` there too, so the same filters apply.
"""

from __future__ import annotations

import logging
import warnings

# Loggers whose INFO lines are for debugging the stack, not for reading a run.
NOISY_LOGGERS = ("DeepSpeed", "deepspeed", "torch.distributed", "torch.utils.cpp_extension", "torch.nn.parallel")


def configure(verbose: bool) -> None:
    """Logging and warnings of this process: i2v's INFO lines always, the rest only when `verbose`."""
    root = logging.getLogger()
    if not root.handlers:  # the CLI; Ray workers already have Ray Train's console handler
        logging.basicConfig(format="%(message)s")
    logging.getLogger("i2v").setLevel(logging.INFO)
    # In a Ray Train worker `print` is patched into root-logger INFO records (DeepSpeed's "op built successfully"), and
    # Ray logs "Reporting training result ..." of every rank on a logger named by file path, outside `ray.train` (so
    # RunConfig's LoggingConfig misses it): both are INFO lines that only the root level can hold back.
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    if verbose:
        return
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    # Deprecations inside torch / DeepSpeed / Ray are theirs to fix, not the user's to read on every run.
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
