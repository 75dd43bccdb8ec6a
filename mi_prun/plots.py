"""PNG plots (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .select import runs_of  # noqa: E402


def run_heatmap(run_mi: np.ndarray, removed: Sequence[int], path: Path, title: str = "") -> Path:
    """Heatmap of I(h_{start-1}; h_end) over (start, end) with the chosen runs outlined."""
    fig, ax = plt.subplots(figsize=(7, 6))
    image = ax.imshow(np.ma.masked_invalid(run_mi), origin="lower", cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="run MI (nats)")
    for start, end in runs_of(removed):
        ax.add_patch(plt.Rectangle((end - 0.5, start - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    ax.set_xlabel("last removed block (end)")
    ax.set_ylabel("first removed block (start)")
    ax.set_title(title or "run MI", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
