"""`negcase backtest --plot FILE.png`: the equity curve of every row on the held-out part
(matplotlib, an optional extra: `pip install 'negcase[plot]'`)."""

from __future__ import annotations

import importlib.util
from datetime import datetime
from pathlib import Path

import numpy as np

from negcase.sim.verdict import Outcomes


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def check_plotting() -> None:
    """PlotUnavailable unless matplotlib can be imported: checked before a run, not after."""
    if importlib.util.find_spec("matplotlib") is None:
        raise PlotUnavailable("--plot needs matplotlib: pip install 'negcase[plot]'")


def plot_equity(path: Path, outcomes: list[Outcomes], dates: list[str], title: str) -> None:
    """Draw the cumulative pnl (percent of the margin, summed over trades) of each row at
    each held-out decision, and save it as an image at `path`."""
    check_plotting()
    import matplotlib

    matplotlib.use("Agg")  # no display needed: the figure only goes to a file
    from matplotlib import pyplot

    days = [datetime.fromisoformat(date) for date in dates]
    figure, axes = pyplot.subplots(figsize=(10, 5.5), layout="constrained")
    for row in outcomes:
        if not row.sides:
            continue
        label = row.name + ("" if row.version is None else f" v{row.version}")
        axes.plot(days, np.nancumsum(row.pnl_pct), label=label, linewidth=1.2)
    axes.axhline(0, color="grey", linewidth=0.6)
    axes.set_title(title)
    axes.set_ylabel("cumulative pnl, % of margin")
    axes.legend(loc="best")
    axes.grid(alpha=0.3)
    figure.savefig(path, dpi=120)
    pyplot.close(figure)
