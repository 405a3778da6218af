"""Estimates in the log: how long the whole training run will take (not only the epoch), and the progress of
evaluation, inference and the demo sets' writing with counts and the time left."""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Mapping, Sequence

__all__ = ["ProgressLog", "ProgressReport", "RunTimeEstimate"]

logger = logging.getLogger(__name__)


def _duration(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class RunTimeEstimate:
    """Ignite handler for the trainer: logs how long the whole run will take, not only the epoch (the
    progress bar's estimate), in the log (a file a job writes), early and refined as the run goes.

    The first estimate comes after ``after_iterations`` training iterations of this process or ``after_seconds``
    seconds of training, whichever comes first (a 2-core machine training convnext_base at 224 px spends minutes
    per iteration: it learns the run's length after the first); it is logged again, refined, after ``refine_at``
    times as many iterations. These are training-only estimates (iterations left times the mean time per iteration
    so far; validation not included). After each epoch it logs the mean wall time of the epochs this process
    finished (training and validation together, over the last ``window``) times the epochs left, and the clock time
    it points to. A resumed run counts from where it resumed (the rest of an epoch a mid-epoch checkpoint continues is not
    taken as an epoch's time); a run stopped early (early stopping) ends sooner.

    Args:
        after_iterations: iterations before the first estimate (at most; see `after_seconds`).
        after_seconds: seconds of training after which the first estimate is logged at the end of the iteration
            running then, if `after_iterations` have not completed by then.
        refine_at: the training-only estimate is logged once more after ``refine_at * after_iterations``
            iterations (0: not).
        window: epochs averaged for the per-epoch estimate.
        clock: the time source (seconds), for tests.
    """

    def __init__(self, after_iterations: int = 3, after_seconds: float = 120.0, refine_at: int = 10, window: int = 3,
                 clock: Callable[[], float] = time.time) -> None:
        self.after_iterations, self.after_seconds = max(1, int(after_iterations)), float(after_seconds)
        self.refine_at, self.window, self.clock = int(refine_at), int(window), clock
        self._run_start: float | None = None
        self._start_iteration = 0
        self._epoch_start: float | None = None
        self._epoch_times: list[float] = []
        self._estimates = 0
        self._partial_epoch = False
        self.last_message: str | None = None

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)

    def _started(self, engine: Any) -> None:
        self._run_start = None  # set at the first epoch: a resume restores the iteration count at STARTED
        self._estimates = 0

    def _epoch_started(self, engine: Any) -> None:
        self._epoch_start = self.clock()
        self._partial_epoch = False
        if self._run_start is None:
            self._run_start, self._start_iteration = self._epoch_start, engine.state.iteration
            # a resume from a mid-epoch checkpoint trains part of this epoch: its time is not an epoch's
            self._partial_epoch = bool(engine.state.epoch_length and engine.state.iteration % engine.state.epoch_length)

    def _say(self, message: str) -> None:
        self.last_message = message
        logger.info(message)

    def _iteration(self, engine: Any) -> None:
        if self._run_start is None:
            return
        done = engine.state.iteration - self._start_iteration
        elapsed = self.clock() - self._run_start
        if self._estimates == 0:
            due = done >= self.after_iterations or elapsed >= self.after_seconds
        elif self._estimates == 1 and self.refine_at:
            due = done == self.after_iterations * self.refine_at
        else:
            due = False
        if not due or done <= 0:
            return
        self._estimates += 1
        per_iteration = elapsed / done
        left = engine.state.max_epochs * engine.state.epoch_length - engine.state.iteration
        finish = time.strftime("%H:%M", time.localtime(time.time() + per_iteration * left))
        first = "first estimate" if self._estimates == 1 else "estimate"
        self._say(f"{first} after {done} iteration(s): {per_iteration:.2f} s per training iteration; the remaining "
                  f"{left} iterations take about {_duration(per_iteration * left)} (around {finish}; validation not "
                  "included)")

    def _epoch_completed(self, engine: Any) -> None:
        # runs after the handlers attached before it (validation and checkpoint are attached earlier)
        if self._epoch_start is None or self._partial_epoch:
            return
        self._epoch_times.append(self.clock() - self._epoch_start)
        recent = self._epoch_times[-self.window :]
        per_epoch = sum(recent) / len(recent)
        left = engine.state.max_epochs - engine.state.epoch
        if left <= 0:
            return
        finish = time.strftime("%H:%M", time.localtime(time.time() + per_epoch * left))
        self._say(f"epoch {engine.state.epoch}/{engine.state.max_epochs}: {_duration(per_epoch)} per epoch with "
                  f"validation; {left} epoch(s) left, about {_duration(per_epoch * left)} (around {finish})")


class ProgressReport:
    """Progress of a long job in the log (a file a batch job writes, not only a terminal's progress bar): counts, the
    share done, the time so far and an estimate of the time left.

    A line is logged when the share done first reaches each of `fractions`, and whenever `interval_s` seconds have
    passed since the last line; :meth:`finish` logs the total and the rate. For example::

        inference: 225/900 images (25%), 9 s so far, about 27 s left (around 15:02)

    Args:
        what: the job's name at the start of each line.
        total: the number of items the job does (> 0), or None if unknown (then no share or estimate).
        unit: the items' name (``"images"``, ``"volumes"``).
        interval_s: seconds between lines at the latest.
        fractions: shares (0 to 1) at which a line is logged.
        clock: the time source (seconds), for tests.
    """

    def __init__(self, what: str, total: int | None, unit: str = "images", interval_s: float = 30.0,
                 fractions: Sequence[float] = (0.1, 0.25, 0.5, 0.75), clock: Callable[[], float] = time.time) -> None:
        self.what, self.total, self.unit = what, (int(total) if total else None), unit
        self.interval_s, self.fractions, self.clock = float(interval_s), sorted(float(f) for f in fractions), clock
        self.start = self.clock()
        self._last_line = self.start
        self._next_fraction = 0
        self.done = 0
        self.last_message: str | None = None

    def _say(self, message: str) -> None:
        self.last_message = message
        logger.info(message)

    def update(self, done: int) -> None:
        """`done` items are finished (a count from the start, not an increment)."""
        self.done = int(done)
        now = self.clock()
        due = now - self._last_line >= self.interval_s
        if self.total:
            share = self.done / self.total
            while self._next_fraction < len(self.fractions) and share >= self.fractions[self._next_fraction]:
                self._next_fraction += 1
                due = True
            if self.done >= self.total:
                return  # finish() says the rest
        if not due or self.done <= 0:
            return
        self._last_line = now
        elapsed = now - self.start
        if not self.total:
            self._say(f"{self.what}: {self.done} {self.unit}, {_duration(elapsed)} so far")
            return
        left = elapsed / self.done * (self.total - self.done)
        finish = time.strftime("%H:%M", time.localtime(time.time() + left))
        self._say(f"{self.what}: {self.done}/{self.total} {self.unit} ({100 * self.done / self.total:.0f}%), "
                  f"{_duration(elapsed)} so far, about {_duration(left)} left (around {finish})")

    def finish(self) -> None:
        """Logs the items done, the time taken and the rate."""
        elapsed = self.clock() - self.start
        rate = f" ({self.done / elapsed:.1f} {self.unit}/s)" if elapsed > 0 and self.done else ""
        self._say(f"{self.what}: {self.done} {self.unit} in {_duration(elapsed)}{rate}")


class ProgressLog:
    """Ignite handler for an evaluator (the bundles' evaluation, inference, and the test evaluation that ends a
    training run): a :class:`ProgressReport` of its items (the data loader's, this rank's share under ``torchrun``),
    from ``STARTED`` to ``COMPLETED``.

    Args:
        what, unit, interval_s, fractions: as :class:`ProgressReport`.
    """

    def __init__(self, what: str = "evaluation", unit: str = "images", interval_s: float = 30.0,
                 fractions: Sequence[float] = (0.1, 0.25, 0.5, 0.75)) -> None:
        self.what, self.unit, self.interval_s, self.fractions = what, unit, interval_s, tuple(fractions)
        self.report: ProgressReport | None = None

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.COMPLETED, self._completed)

    @staticmethod
    def _items(engine: Any) -> int | None:
        loader = getattr(engine, "data_loader", None)
        for source in (getattr(loader, "sampler", None), getattr(loader, "dataset", None)):
            try:
                return len(source)
            except TypeError:
                continue
        return None

    def _started(self, engine: Any) -> None:
        from hmn.workflows.devices import rank_world

        rank, world = rank_world()
        what = self.what if world == 1 else f"{self.what} (rank {rank} of {world})"
        self.report = ProgressReport(what, self._items(engine), self.unit, self.interval_s, self.fractions)

    @staticmethod
    def _batch_items(engine: Any) -> int:
        """The items of the iteration's batch: MONAI's evaluators hand handlers the decollated batch (a list of
        items); a collated dict counts its first tensor's rows; else the loader's batch size."""
        batch = engine.state.batch
        if isinstance(batch, (list, tuple)):
            return len(batch)
        if isinstance(batch, Mapping):
            for value in batch.values():
                shape = getattr(value, "shape", None)
                if shape is not None and len(shape) > 0:
                    return int(shape[0])
        return int(getattr(getattr(engine, "data_loader", None), "batch_size", None) or 1)

    def _iteration(self, engine: Any) -> None:
        if self.report is None:
            return
        done = self.report.done + self._batch_items(engine)
        self.report.update(min(done, self.report.total) if self.report.total else done)

    def _completed(self, engine: Any) -> None:
        if self.report is not None:
            self.report.finish()
