"""The run-time estimate the trainer logs: how long the whole run will take, not only the epoch."""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

__all__ = ["RunTimeEstimate"]

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
    progress bar's estimate).

    After ``after_iterations`` training iterations of this process it logs the training-only estimate
    (iterations left times the mean time per iteration so far; validation not included). After each epoch
    it logs the mean wall time of the epochs this process finished (training and validation together,
    over the last ``window``) times the epochs left, and the clock time it points to. A resumed run counts
    from the epoch it resumed at; a run stopped early (early stopping) ends sooner.

    Args:
        after_iterations: when to give the first, training-only estimate.
        window: epochs averaged for the per-epoch estimate.
        clock: the time source (seconds), for tests.
    """

    def __init__(self, after_iterations: int = 20, window: int = 3, clock: Callable[[], float] = time.time) -> None:
        self.after_iterations, self.window, self.clock = int(after_iterations), int(window), clock
        self._run_start: float | None = None
        self._start_iteration = 0
        self._epoch_start: float | None = None
        self._epoch_times: list[float] = []
        self.last_message: str | None = None

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)

    def _started(self, engine: Any) -> None:
        self._run_start = None  # set at the first epoch: a resume restores the iteration count at STARTED

    def _epoch_started(self, engine: Any) -> None:
        self._epoch_start = self.clock()
        if self._run_start is None:
            self._run_start, self._start_iteration = self._epoch_start, engine.state.iteration

    def _say(self, message: str) -> None:
        self.last_message = message
        logger.info(message)

    def _iteration(self, engine: Any) -> None:
        done = engine.state.iteration - self._start_iteration
        if done != self.after_iterations or self._run_start is None:
            return
        per_iteration = (self.clock() - self._run_start) / done
        left = engine.state.max_epochs * engine.state.epoch_length - engine.state.iteration
        self._say(f"{per_iteration:.2f} s per training iteration: the remaining {left} iterations take about "
                  f"{_duration(per_iteration * left)} (validation not included)")

    def _epoch_completed(self, engine: Any) -> None:
        # runs after the handlers attached before it (validation and checkpoint are attached earlier)
        if self._epoch_start is None:
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
