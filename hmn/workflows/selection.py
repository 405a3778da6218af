"""Model-selection state carried in the full-state checkpoints: the best-model saver's best score
(:class:`BestModelRecord`) and the early-stopping count (:class:`EarlyStopRecord`), so that a resumed run
selects and stops as the uninterrupted run would have.
"""

from __future__ import annotations

from typing import Any, Mapping

__all__ = ["BestModelRecord", "EarlyStopRecord"]


def _plain_number(value: Any) -> Any:
    """Python ``float``/``int`` for numpy and 0-d tensor scores (MONAI's metrics return numpy scalars), which
    ``torch.load(weights_only=True)``, as MONAI's ``CheckpointLoader`` uses it, refuses to read back."""
    if hasattr(value, "item") and not isinstance(value, str):  # before float: numpy.float64 is a float subclass
        return value.item()
    return value


class BestModelRecord:
    """A checkpoint entry holding the best-model ``CheckpointSaver``'s record: the best key-metric score so
    far and the file it was written to.

    The bundles add it to every full-state checkpoint; on ``--resume`` the loader restores it, so the
    resumed run compares its validations with the best one before the stop and does not overwrite
    ``model.pt`` with a worse model. ``saver`` must be a MONAI ``CheckpointSaver`` with ``save_key_metric``.

    With ``evaluator`` (the MONAI evaluator the saver is attached to), its ``state.best_metric`` and
    ``best_metric_epoch`` are kept too (as ``"evaluator_best"``), so that its "Got new best metric" log after a
    resume is about the same best as ``model.pt``. A checkpoint without them (written before they were kept)
    restores the saver's best score with epoch 0, the epoch being unknown.
    """

    def __init__(self, saver: Any, evaluator: Any = None) -> None:
        self._checkpoint = getattr(saver, "_key_metric_checkpoint", None)
        if self._checkpoint is None:
            raise ValueError(f"BestModelRecord needs a CheckpointSaver with save_key_metric=True, got {saver!r}")
        self.evaluator = evaluator

    def state_dict(self) -> dict:
        state: dict[str, Any] = {k: [(_plain_number(p), f) for p, f in v] for k, v in self._checkpoint.state_dict().items()}
        if self.evaluator is not None:
            s = self.evaluator.state
            state["evaluator_best"] = [_plain_number(s.best_metric), int(s.best_metric_epoch)]
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        state = dict(state)
        best = state.pop("evaluator_best", None)
        self._checkpoint.load_state_dict(state)
        if self.evaluator is not None:
            saved = [p for entries in state.values() for p, _ in entries]
            if best is None and saved:
                best = [max(saved), 0]
            if best is not None:
                self.evaluator.state.best_metric, self.evaluator.state.best_metric_epoch = best[0], int(best[1])

    def restart(self) -> None:
        """Forgets the best score: the next validation's model is saved as the best whatever it scores."""
        self._checkpoint.load_state_dict({k: [] for k in self._checkpoint.state_dict()})
        if self.evaluator is not None:
            self.evaluator.state.best_metric, self.evaluator.state.best_metric_epoch = -1, -1


class EarlyStopRecord:
    """A checkpoint entry holding a MONAI ``EarlyStopHandler``'s count of validations without improvement
    and its best score, so that early stopping on a resumed run counts on from before the stop.

    The handler's trainer must be set (``set_trainer``) before the checkpoint is saved or loaded, as the
    bundles' ``run`` does first.
    """

    def __init__(self, handler: Any) -> None:
        if not hasattr(handler, "set_trainer"):
            raise ValueError(f"EarlyStopRecord needs a MONAI EarlyStopHandler, got {handler!r}")
        self.handler = handler

    def _early_stopping(self) -> Any:
        if self.handler._handler is None:
            raise RuntimeError("EarlyStopRecord: call the EarlyStopHandler's set_trainer() before saving or loading")
        return self.handler._handler

    def state_dict(self) -> dict:
        return {k: _plain_number(v) for k, v in self._early_stopping().state_dict().items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._early_stopping().load_state_dict(state)

    def restart(self) -> None:
        """Forgets the best score and the count of validations without improvement."""
        handler = self._early_stopping()
        handler.counter, handler.best_score = 0, None
