"""Resuming a stopped run: the full-state checkpoints of a models folder (``checkpoint_epoch=N.pt``), and the
handler that restores the newest readable one when the run starts, setting unreadable ones aside.
"""

from __future__ import annotations

import glob
import logging
import os
import re
from typing import Any, Mapping

import torch

from hmn.workflows.devices import as_bool, rank_world
from hmn.workflows.history import trim_history
from hmn.workflows.selection import BestModelRecord, EarlyStopRecord

__all__ = ["MID_EPOCH_PREFIX", "ResumeFromLatest", "checkpoints_by_epoch", "full_state_checkpoints", "latest_checkpoint",
           "mid_epoch_checkpoints", "set_aside"]

logger = logging.getLogger(__name__)

_EPOCH_RE = re.compile(r"checkpoint_epoch=(\d+)\.pt$")
# a checkpoint written in the middle of an epoch (a graceful stop, or every N iterations): <prefix><the trainer's
# iteration, counted from the start of the run>.pt
MID_EPOCH_PREFIX = "checkpoint_iteration="
_ITERATION_RE = re.compile(r"checkpoint_iteration=(\d+)\.pt$")


def checkpoints_by_epoch(ckpt_dir: str) -> list[tuple[int, str]]:
    """The full-state checkpoints in ``ckpt_dir`` (``checkpoint_epoch=N.pt``) as ``(N, path)``, newest first."""
    found = []
    for path in glob.glob(os.path.join(glob.escape(ckpt_dir), "checkpoint_epoch=*.pt")):
        m = _EPOCH_RE.search(os.path.basename(path))
        if m:
            found.append((int(m.group(1)), path))
    return sorted(found, reverse=True)


def mid_epoch_checkpoints(ckpt_dir: str) -> list[tuple[int, str]]:
    """The mid-epoch full-state checkpoints in ``ckpt_dir`` (``checkpoint_iteration=I.pt``, written by
    :class:`hmn.workflows.TrainingRun` at a graceful stop or every ``checkpoint_every`` iterations) as
    ``(I, path)``, newest first; ``I`` is the trainer's iteration counted from the start of the run."""
    found = []
    for path in glob.glob(os.path.join(glob.escape(ckpt_dir), MID_EPOCH_PREFIX + "*.pt")):
        m = _ITERATION_RE.search(os.path.basename(path))
        if m:
            found.append((int(m.group(1)), path))
    return sorted(found, reverse=True)


def full_state_checkpoints(ckpt_dir: str, epoch_length: int | None) -> list[tuple[int, str]]:
    """Every full-state checkpoint in ``ckpt_dir`` as ``(iteration, path)``, newest first: an epoch's
    (``checkpoint_epoch=N.pt``) at iteration ``N * epoch_length``, a mid-epoch one at its own iteration. Without
    `epoch_length` (unknown), the epoch checkpoints only."""
    if not epoch_length:
        return [(epoch, path) for epoch, path in checkpoints_by_epoch(ckpt_dir)]
    found = [(epoch * int(epoch_length), path) for epoch, path in checkpoints_by_epoch(ckpt_dir)]
    found += mid_epoch_checkpoints(ckpt_dir)
    return sorted(found, key=lambda item: (item[0], _EPOCH_RE.search(item[1]) is not None), reverse=True)


def latest_checkpoint(ckpt_dir: str) -> str | None:
    """The full-state checkpoint of the highest epoch in ``ckpt_dir`` (``checkpoint_epoch=N.pt``), or None.
    It is not opened: :class:`ResumeFromLatest` checks that it can be read."""
    found = checkpoints_by_epoch(ckpt_dir)
    return found[0][1] if found else None


def set_aside(path: str, suffix: str = ".unreadable") -> str:
    """Renames `path` to ``<path><suffix>`` (``<path><suffix>.1``, ... if taken) and returns the new name."""
    target, n = path + suffix, 0
    while os.path.lexists(target):
        n += 1
        target = f"{path}{suffix}.{n}"
    os.replace(path, target)
    return target


class ResumeFromLatest:
    """Ignite handler: when ``enabled``, restores the newest readable full-state checkpoint in ``ckpt_dir``
    when the run starts.

    The checkpoint holds the network, optimizer, LR scheduler and trainer state (epoch and iteration)
    written each epoch by the bundle's checkpoint saver, so a stopped run restarted with ``--resume true``
    continues with the epoch after the last one whose checkpoint is complete. Checkpoints are tried newest
    first, each read once (``torch.load(weights_only=True)``); one that cannot be read (truncated by a
    writer that was not atomic, damaged on disk or in a copy) is set aside as ``<name>.unreadable`` (renamed,
    never deleted) with a warning naming it and why, and the next older one is tried. With no readable
    checkpoint the run starts from scratch and the log says why. Weights load strictly: a missing,
    unexpected or mis-shaped entry is an error naming it.

    With ``saver`` (the bundle's per-epoch :class:`hmn.checkpoints.AtomicCheckpointSaver` or a MONAI
    ``CheckpointSaver``), the restored file is handed to it as the checkpoint it last wrote, so the next
    epoch's checkpoint replaces it; older complete checkpoints found beside it are removed after that next
    checkpoint is complete, never before. When that saver promotes a staged best model
    (``best_model_saver``), the staged best model of the restored epoch becomes ``model.pt`` and staged
    models of later epochs (which will be trained again) are discarded, so ``model.pt`` and the restored
    best score (:class:`BestModelRecord`) describe the same model. Incomplete ``.*.partial`` files in
    ``ckpt_dir`` are removed. The bundles' ``load_dict`` also restores the early-stopping count
    (:class:`EarlyStopRecord`). With ``history`` (the run's ``history.csv``), rows of epochs after the
    restored one (validated before the stop, but without a complete checkpoint) are dropped at once, so
    ``history.csv``, ``model.pt`` and the restored best score agree from the start of the resumed run.

    With ``input_changes`` (``{setting: [recorded, used]}``, :func:`hmn.runs.input_changes`: this resume
    preprocesses the images otherwise than the run so far, e.g. another image size or CT window), the restored
    best score and early-stopping count are dropped with a warning: they were measured on other input, and
    ``model.pt`` must be a model of the preprocessing the run record now describes, so the resumed run's first
    validation replaces ``model.pt`` and the comparisons start again from there.

    A mid-epoch checkpoint (``checkpoint_iteration=I.pt``, :class:`hmn.workflows.TrainingRun` writes it at a graceful
    stop or every ``checkpoint_every`` iterations) takes its place among the epoch checkpoints by its iteration. Its
    epoch continues where it stopped: the trainer's data loader must have a :class:`hmn.workflows.ResumableSampler`
    (told to skip the batches done, so the rest of the epoch comes in the same order) and the same epoch length.
    ``optional_load_dict`` objects are restored when the checkpoint holds them (the epoch's loss so far).

    Without ``enabled`` (a new run), a ``ckpt_dir`` that already holds a full-state checkpoint or the best
    model is refused (``FileExistsError``) unless ``refuse_used_folder`` is False: the new run's files
    would mix with the earlier run's, a later resume would pick the earlier run's newest checkpoint, and
    its best model would be overwritten.

    Raises (when the run starts):
        KeyError / RuntimeError: the readable checkpoint does not fit ``load_dict`` (other network or
            objects); the message names the file.
        ValueError: the checkpoint's epoch is beyond the trainer's ``max_epochs``; a mid-epoch checkpoint of a run
            with another epoch length, or for a trainer whose sampler cannot start an epoch part-way.
    """

    def __init__(
        self, ckpt_dir: str, load_dict: Mapping[str, Any], enabled: bool = False, map_location: Any = None, saver: Any = None,
        history: str | None = None, refuse_used_folder: bool = True, input_changes: Mapping[str, Any] | None = None,
        optional_load_dict: Mapping[str, Any] | None = None,
    ) -> None:
        self.ckpt_dir, self.load_dict, self.map_location = ckpt_dir, dict(load_dict), map_location
        self.input_changes = dict(input_changes or {})
        self.enabled = as_bool(enabled, "resume")
        self.saver = saver
        self.history = history
        self.refuse_used_folder = as_bool(refuse_used_folder, "refuse_used_folder")
        self.loaded_from: str | None = None
        self.loaded_epoch: int | None = None
        self.set_aside: list[str] = []
        self.unreadable: list[str] = []
        self._checkpoint: Any = None
        self.epoch_length: int | None = None
        # restored when the checkpoint holds them (a mid-epoch checkpoint's epoch loss so far), else left as they are
        self.optional_load_dict = dict(optional_load_dict or {})

    def _newest_readable(self, writer: bool, epoch_length: int | None) -> tuple[int, str, Any] | None:
        for iteration, path in full_state_checkpoints(self.ckpt_dir, epoch_length):
            try:
                checkpoint = torch.load(path, map_location=self.map_location, weights_only=True)
                if not isinstance(checkpoint, Mapping):
                    raise TypeError(f"it holds a {type(checkpoint).__name__}, not a dict of states")
            except (MemoryError, PermissionError, torch.OutOfMemoryError):
                raise  # the machine's trouble, not the file's: never set a good checkpoint aside for it
            except Exception as e:  # noqa: BLE001 - torch.load raises many types for a damaged file
                reason = " ".join(str(e).split())[:300]
                self.unreadable.append(os.path.basename(path))
                if writer:
                    moved = set_aside(path)
                    self.set_aside.append(moved)
                    logger.warning("checkpoint %s cannot be read (%s: %s); set aside as %s", path,
                                   type(e).__name__, reason, os.path.basename(moved))
                else:
                    logger.warning("checkpoint %s cannot be read (%s: %s); skipped", path, type(e).__name__, reason)
                continue
            return iteration, path, checkpoint
        return None

    def _refuse_a_used_folder(self) -> None:
        best_saver = getattr(self.saver, "best_model_saver", None)
        best_name = getattr(best_saver, "key_metric_filename", None) or "model.pt"
        found = [os.path.basename(p) for _, p in checkpoints_by_epoch(self.ckpt_dir) + mid_epoch_checkpoints(self.ckpt_dir)]
        if os.path.isfile(os.path.join(self.ckpt_dir, best_name)):
            found.append(best_name)
        if found:
            raise FileExistsError(
                f"{self.ckpt_dir} already holds a run ({', '.join(found[:4])}): a new run would mix with it and "
                "overwrite its best model. Continue it with --resume True, or start a new run elsewhere "
                "(--bundle_root DIR, or --ckpt_dir and --output_dir), or move those files away"
            )

    def attach(self, engine: Any) -> None:
        """Finds the checkpoint now (or refuses a used folder) and restores it when `engine` starts; when the
        engine's epoch length is not known yet (a plain ignite ``Engine`` before ``run``) and the folder holds
        mid-epoch checkpoints, both when it starts (the epoch length places them among the epoch checkpoints)."""
        from ignite.engine import Events

        if getattr(engine.state, "epoch_length", None) is None and self.enabled and mid_epoch_checkpoints(self.ckpt_dir):
            engine.add_event_handler(Events.STARTED, self.start)
        elif self._prepare(getattr(engine.state, "epoch_length", None)):
            engine.add_event_handler(Events.STARTED, self._restore)

    def start(self, engine: Any) -> None:
        """Finds the checkpoint (or refuses a used folder) and restores it into the objects now: for a caller
        already in `engine`'s ``STARTED`` event (:class:`hmn.workflows.TrainingRun`)."""
        if self._prepare(engine.state.epoch_length):
            self._restore(engine)

    def _prepare(self, epoch_length: int | None) -> bool:
        """The file work before a restore; whether a checkpoint is to be restored."""
        if not self.enabled:
            if self.refuse_used_folder:
                self._refuse_a_used_folder()
            return False
        from hmn.checkpoints import remove_partial_files

        writer = rank_world()[0] == 0  # only one process renames or removes files
        if writer and os.path.isdir(self.ckpt_dir):
            remove_partial_files(self.ckpt_dir)
        found = self._newest_readable(writer, epoch_length)
        best_saver = getattr(self.saver, "best_model_saver", None)
        if found is None:
            if self.unreadable:
                what = "set aside" if writer else "skipped"
                why = f"every checkpoint there was unreadable and {what} ({', '.join(self.unreadable)})"
            else:
                why = "there is no checkpoint_epoch=*.pt or checkpoint_iteration=*.pt"
            logger.warning("resume requested but %s in %s: starting from scratch", why, self.ckpt_dir)
            if writer:
                if best_saver is not None:
                    best_saver.promote(0)  # staged best models without a committed epoch are discarded
                if self.history:
                    trim_history(self.history, 0)
            return False
        iteration, path, self._checkpoint = found
        # the epochs the checkpoint completed (a mid-epoch one: those before the epoch it stopped in)
        epoch = iteration // epoch_length if epoch_length else iteration
        self.epoch_length = epoch_length
        logger.info("resuming from %s (%d complete epoch(s))", path, epoch)
        if writer and self.history:
            trim_history(self.history, epoch)
        self.loaded_from, self.loaded_epoch = path, epoch
        if best_saver is not None and writer:
            promoted = best_saver.promote(epoch)
            if promoted:
                logger.info("the best model staged at epoch <= %d is now %s", epoch, best_saver.key_metric_filename)
        if self.saver is not None:
            interval = getattr(self.saver, "_interval_checkpoint", None)
            if interval is None:
                raise ValueError("ResumeFromLatest(saver=...) expects a CheckpointSaver with save_interval > 0")
            state = interval.state_dict()  # {"_saved": []} in ignite 0.5 ("saved" in earlier versions)
            state[next(iter(state))] = [(epoch, os.path.basename(path))]
            interval.load_state_dict(state)
            older = [os.path.basename(p) for i, p in full_state_checkpoints(self.ckpt_dir, epoch_length)
                     if i < iteration or (i == iteration and p != path)]
            if older and hasattr(interval.save_handler, "defer_removal"):
                interval.save_handler.defer_removal(older)
        return True

    def _restore(self, engine: Any) -> None:
        from ignite.handlers import Checkpoint

        checkpoint, self._checkpoint = self._checkpoint, None
        prior_max_epochs = engine.state.max_epochs
        schedulers = {k: o for k, o in self.load_dict.items() if isinstance(o, torch.optim.lr_scheduler.LRScheduler)}
        horizons = {k: _schedule_settings(o) for k, o in schedulers.items()}
        try:
            Checkpoint.load_objects(to_load=self.load_dict, checkpoint=checkpoint, strict=True)
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise type(e)(f"cannot restore {self.loaded_from} into this run: {e}") from e
        for key, obj in self.optional_load_dict.items():
            if key in checkpoint:
                obj.load_state_dict(checkpoint[key])
        self._continue_epoch(engine)
        if prior_max_epochs is not None and engine.state.epoch > prior_max_epochs:
            raise ValueError(
                f"{self.loaded_from} is at epoch {engine.state.epoch}, beyond max_epochs={prior_max_epochs}; "
                "pass a larger --max_epochs to train on"
            )
        saved_max_epochs = engine.state.max_epochs
        engine.state.max_epochs = prior_max_epochs
        if saved_max_epochs != prior_max_epochs:
            logger.info("max_epochs %s -> %s: this run trains to epoch %s", saved_max_epochs, prior_max_epochs, prior_max_epochs)
        # The scheduler's state holds its settings (e.g. t_total, the horizon) beside its progress; keep this
        # run's settings, so a larger max_epochs stretches the schedule to the new end instead of starting a
        # second cycle after the old one.
        for key, sched in schedulers.items():
            loaded = _schedule_settings(sched)
            changed = {n: (loaded[n], v) for n, v in horizons[key].items() if n in loaded and loaded[n] != v}
            for name, (_, value) in changed.items():
                setattr(sched, name, value)
            if changed and isinstance(sched, torch.optim.lr_scheduler.LambdaLR):
                # the restored optimizer holds the old schedule's rate for this step: recompute it (LambdaLR's
                # rate is a closed form of the step; a chained scheduler would take it from the next step on)
                lrs = [base * lmbda(sched.last_epoch) for base, lmbda in zip(sched.base_lrs, sched.lr_lambdas)]
                for group, lr in zip(sched.optimizer.param_groups, lrs):
                    group["lr"] = lr
                sched._last_lr = lrs
            if changed:
                logger.info("%s settings follow this run: %s", key,
                            ", ".join(f"{n} {old} -> {new}" for n, (old, new) in changed.items()))
        logger.info("restored network, optimizer, scheduler and trainer state from %s (%s complete epoch(s), iteration %s)",
                    self.loaded_from, engine.state.epoch, engine.state.iteration)
        if self.input_changes:
            records = [o for o in self.load_dict.values() if isinstance(o, (BestModelRecord, EarlyStopRecord))]
            for record in records:
                record.restart()
            if records:
                changes = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in self.input_changes.items())
                logger.warning("this resume changes the network's input (%s): the best score and early-stopping count "
                               "so far were measured on the old input, so the best-model choice starts again: the "
                               "next validation's model replaces the best model", changes)


    def _continue_epoch(self, engine: Any) -> None:
        """After the trainer's state is restored: its epoch length is this run's, and a mid-epoch checkpoint's
        epoch goes on where it stopped (the training sampler skips the batches done)."""
        length = self.epoch_length
        saved_length = engine.state.epoch_length
        iteration = int(engine.state.iteration)
        if not length or saved_length == length:
            position = iteration % saved_length if saved_length else 0
        elif iteration % saved_length == 0:
            # an epoch checkpoint written with another epoch length (another batch size or datalist): the epochs
            # done are what it restores; this run counts its iterations
            engine.state.epoch_length = length
            engine.state.iteration = engine.state.epoch * length
            logger.warning("%s was written with %d iterations per epoch, this run has %d: it continues after epoch %d",
                           self.loaded_from, saved_length, length, engine.state.epoch)
            return
        else:
            raise ValueError(
                f"{self.loaded_from} stopped in the middle of epoch {engine.state.epoch + 1} of a run with {saved_length} "
                f"iterations per epoch, and this run has {length} (another batch size or datalist): it cannot continue "
                "that epoch. Resume with the settings of the stopped run, or move the file away to resume from the last "
                "complete epoch"
            )
        if not position:
            return
        loader = getattr(engine, "data_loader", None)
        sampler = getattr(loader, "sampler", None)
        batch_size = getattr(loader, "batch_size", None)
        if not hasattr(sampler, "skip") or not batch_size:
            raise ValueError(
                f"{self.loaded_from} stopped in the middle of epoch {engine.state.epoch + 1}, but this trainer's data "
                "loader cannot start an epoch part-way (its sampler is not hmn.workflows.ResumableSampler with a "
                "batch_size): move the file away to resume from the last complete epoch"
            )
        sampler.skip(position * batch_size)
        logger.info("epoch %d continues after its iteration %d of %d: the %d batches done are skipped, in the epoch's order",
                    engine.state.epoch + 1, position, saved_length, position)


# progress entries of a torch LR scheduler's state; the other plain numbers are its settings
_SCHEDULE_PROGRESS = {"last_epoch", "base_lrs", "lr_lambdas"}


def _schedule_settings(scheduler: Any) -> dict[str, Any]:
    return {k: v for k, v in scheduler.state_dict().items()
            if not k.startswith("_") and k not in _SCHEDULE_PROGRESS and isinstance(v, (int, float)) and not isinstance(v, bool)}
