"""The run's learning curve: one ``history.csv`` row per validation (epoch, elapsed training time, training
loss, metrics), written atomically, trimmed to the restored epoch on a resume, and drawn into ``history.png``.
"""

from __future__ import annotations

import csv
import logging
import os
import time
from typing import Any, Mapping, Sequence

import numpy as np

from hmn.workflows.estimate import _duration

__all__ = ["HISTORY_COLUMNS", "EpochLoss", "MetricHistory", "plot_history", "trim_history"]

logger = logging.getLogger(__name__)

#: The columns :class:`MetricHistory` starts every ``history.csv`` row with, in this order: the trainer's epoch,
#: the training time in seconds (summed over resumes) and the epoch's mean training loss (only with an
#: :class:`EpochLoss`); the validator's scalar metrics follow, one column each, in the validator's order. The
#: bundle docs (:mod:`hmn.bundle.docs`) list the file's columns from this constant.
HISTORY_COLUMNS = ("epoch", "elapsed_s", "train_loss")


def _history_rows(path: str, last_epoch: int) -> tuple[list[dict[str, Any]], int]:
    """The whole rows of ``history.csv`` up to `last_epoch`, and how many rows were left out."""
    if not os.path.exists(path):
        return [], 0
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    kept = []
    for row in rows:
        try:
            row_epoch = int(row["epoch"])
        except (KeyError, TypeError, ValueError):
            continue  # a row cut off by a writer that was not atomic
        if row_epoch <= last_epoch and None not in row.values():
            kept.append(row)
    return kept, len(rows) - len(kept)


def _write_history(path: str, rows: list[dict[str, Any]], header: Sequence[str] = ()) -> None:
    """Rewrites ``history.csv`` atomically: the columns are every key of the rows in first-seen order
    (`header` when there is no row), a missing value is empty."""
    from hmn.durable import atomic_write

    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    fields = fields or list(header)

    def write(f: Any) -> None:
        w = csv.DictWriter(f, fieldnames=fields, restval="")
        w.writeheader()
        w.writerows(rows)

    atomic_write(path, write)


def trim_history(path: str, last_epoch: int) -> int:
    """Drops the rows of ``history.csv`` after `last_epoch` (and any cut-off row), rewriting the file
    atomically; removes a leftover temporary file of it. Returns the number of rows dropped."""
    from hmn.durable import partial_path

    if os.path.lexists(partial_path(path)):
        os.remove(partial_path(path))
    kept, dropped = _history_rows(path, last_epoch)
    if dropped:
        with open(path, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
        _write_history(path, kept, header)
        logger.info("%s: %d row(s) after epoch %d dropped (validated before the stop, without a complete "
                    "checkpoint; they are trained again)", path, dropped, last_epoch)
    return dropped


class MetricHistory:
    """Ignite handler for the evaluator: one CSV row per validation (epoch, elapsed training time, metrics).

    The file (``history.csv``) is the run's learning curve. Every row is written by rewriting the whole
    (small) file atomically (:func:`hmn.durable.atomic_write`), so a stop never leaves half a row. The epoch
    is the trainer's (MONAI's evaluators run with the trainer's epoch). On its first row in a process the
    handler reads the file it finds: rows of the epoch being validated and later ones are dropped (they
    belong to epochs a resumed run trains again, after a stop before their checkpoint was complete), and
    ``elapsed_s`` continues from the last row kept, so it is the training time summed over resumes (the
    time between a stop and the resume, and the lost part of the stopped epoch, are not counted).

    Args:
        filename: the CSV (``runs/history.csv`` in the bundles).
        loss: an :class:`EpochLoss` attached to the trainer: its mean over the epoch goes into a
            ``train_loss`` column (this process's iterations; under ``torchrun``, rank 0's share).
        plot: also draw the curves (training loss and every validation metric against the epoch) into a
            PNG beside the CSV (``history.png``), rewritten with every row, so a run always ends, or stops,
            with its learning curve to look at.
    """

    def __init__(self, filename: str, loss: EpochLoss | None = None, plot: bool = True) -> None:
        self.filename = filename
        self.loss = loss
        self.plot = bool(plot)
        self._start = time.time()
        self._rows: list[dict[str, Any]] | None = None
        self._offset = 0.0

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.COMPLETED, self)

    def _read_existing(self, epoch: int) -> list[dict[str, Any]]:
        kept, dropped = _history_rows(self.filename, epoch - 1)
        if dropped:
            logger.info("%s: %d row(s) of epoch %d or later dropped (trained again after the resume)",
                        self.filename, dropped, epoch)
        return kept

    def __call__(self, engine: Any) -> None:
        epoch = int(engine.state.epoch)
        if self._rows is None:
            self._rows = self._read_existing(epoch)
            if self._rows:
                try:
                    self._offset = float(self._rows[-1].get("elapsed_s") or 0.0)
                except ValueError:
                    self._offset = 0.0
        epoch_col, elapsed_col, loss_col = HISTORY_COLUMNS
        row: dict[str, Any] = {epoch_col: epoch, elapsed_col: round(self._offset + time.time() - self._start, 1)}
        if self.loss is not None and self.loss.mean() is not None:
            row[loss_col] = self.loss.mean()
        for k, v in engine.state.metrics.items():
            # per-finding entries ("val_auc/<finding>", hmn.workflows.tracking.PerFindingAUC) go to the trackers only
            if isinstance(v, (int, float)) and "/" not in k:
                row[k] = v
        self._rows.append(row)
        _write_history(self.filename, self._rows)
        if self.plot:
            try:
                plot_history(self.filename, os.path.splitext(self.filename)[0] + ".png")
            except Exception as e:  # a plot is never worth stopping a run for
                logger.warning("could not draw the learning curve of %s: %s", self.filename, e)


class EpochLoss:
    """Ignite handler for the trainer: the mean training loss of the current epoch (reset when an epoch
    starts), read by :class:`MetricHistory`. The loss is taken from the trainer's output with
    ``monai.handlers.from_engine(["loss"], first=True)``, as MONAI's StatsHandler takes it."""

    def __init__(self) -> None:
        self._sum, self._count = 0.0, 0
        self._restored = False

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.update)

    def reset(self, engine: Any = None) -> None:
        if self._restored:  # the epoch a mid-epoch checkpoint continues keeps the loss of its iterations done
            self._restored = False
            return
        self._sum, self._count = 0.0, 0

    def state_dict(self) -> dict[str, float]:
        """The epoch's loss so far (a mid-epoch checkpoint holds it, so the epoch's mean covers all its iterations)."""
        return {"sum": self._sum, "count": self._count}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores :meth:`state_dict`; the next epoch start (the continued epoch's) keeps it."""
        self._sum, self._count = float(state["sum"]), int(state["count"])
        self._restored = True

    def update(self, engine: Any) -> None:
        from monai.handlers import from_engine

        value = from_engine(["loss"], first=True)(engine.state.output)
        if isinstance(value, (tuple, list)):  # a batched dict gives a tuple, a list of items the value itself
            value = value[0]
        value = float(value.item() if hasattr(value, "item") else value)
        if np.isfinite(value):
            self._sum += value
            self._count += 1

    def mean(self) -> float | None:
        """The mean loss over the epoch's iterations so far (None before the first)."""
        return self._sum / self._count if self._count else None


def plot_history(csv_path: str, png_path: str) -> str:
    """Draws a ``history.csv``: the training loss (left axis) and each validation metric (right axis)
    against the epoch, into a PNG written atomically. Returns `png_path`."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from hmn.durable import atomic_write

    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))

    def series(key: str) -> tuple[list[int], list[float]]:
        pts = [(int(r["epoch"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
        return [p[0] for p in pts], [p[1] for p in pts]

    metrics = [k for k in (rows[0].keys() if rows else []) if k not in ("epoch", "elapsed_s", "train_loss")]
    fig = Figure(figsize=(6.5, 4.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    x, y = series("train_loss") if rows and "train_loss" in rows[0] else ([], [])
    if x:
        ax.plot(x, y, marker="o", markersize=3, color="tab:red", label="training loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss", color="tab:red")
    ax.grid(alpha=0.3)
    right = ax.twinx()
    for i, key in enumerate(metrics):
        mx, my = series(key)
        if mx:
            right.plot(mx, my, marker="s", markersize=3, color=f"C{i}" if i else "tab:blue", label=key)
    right.set_ylabel("validation metric")
    handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + right.get_legend_handles_labels()[1]
    if handles:
        ax.legend(handles, labels, loc="center right", fontsize=8)
    last = rows[-1] if rows else {}
    ax.set_title(f"learning curve ({len(rows)} epochs, {_duration(float(last.get('elapsed_s') or 0))} of training)",
                 fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write(png_path, lambda f: f.write(buf.getvalue()), binary=True)
