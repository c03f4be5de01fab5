"""Writing user-visible files: under a temporary name, then renamed, so a crash never leaves half a file."""

from __future__ import annotations

import os
from pathlib import Path


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Writes `data` (text is UTF-8) to `path` atomically; the temporary name is unique per process."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def atomic_savefig(fig, path: str | Path, dpi: int = 100) -> None:
    """Saves a matplotlib figure as PNG atomically (rendered in memory, then `atomic_write`) and closes it."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write(path, buf.getvalue())
