"""Figure output shared by the benchmark scripts."""

from __future__ import annotations

import os
from pathlib import Path


def save_figure(fig, path: Path, ylabel: str, xlabel: str, legend_size: int = 8) -> None:
    """Label, grid and legend the figure's single axis, then write it atomically (a reader never sees half a PNG)."""
    ax = fig.axes[0]
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    tmp = path.with_name(f'.{path.name}.tmp.png')
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
