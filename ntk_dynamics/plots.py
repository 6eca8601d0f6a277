"""Matplotlib figures for run folders (headless backend; files written atomically)."""
from __future__ import annotations

import io
import os
from typing import Mapping, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ntk_dynamics.runs import atomic_write_bytes  # noqa: E402

# A panel: title, x label, y label, {series label: (x values, y values, matplotlib style)}.
Panel = tuple[str, str, str, Mapping[str, tuple[Sequence[float], Sequence[float], str]]]


def save_panels(path: str | os.PathLike, panels: Sequence[Panel], *, logx: bool = False,
                logy: bool = False, suptitle: Optional[str] = None) -> None:
  """Draws one axes per panel side by side and saves a PNG."""
  fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
  for ax, (title, xlabel, ylabel, series) in zip(axes[0], panels):
    for label, (x, y, style) in series.items():
      ax.plot(x, y, style, label=label)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if logx:
      ax.set_xscale("log")
    if logy:
      ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  save_figure(path, fig, suptitle=suptitle)


def save_figure(path: str | os.PathLike, fig, *, suptitle: Optional[str] = None,
                fontsize: Optional[float] = None) -> None:
  """Lays out `fig`, writes it as a 110 dpi PNG to `path` atomically, and closes it."""
  if suptitle:
    fig.suptitle(suptitle, fontsize=fontsize)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110)
  plt.close(fig)
  atomic_write_bytes(path, buf.getvalue())
