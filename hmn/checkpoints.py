"""Crash-safe checkpoints for the bundles: a MONAI ``CheckpointSaver`` whose files are written atomically and
durably, that never leaves fewer than one complete full-state checkpoint on disk, and whose best model
(``model.pt``) always belongs to an epoch that a full-state checkpoint has committed.

Why MONAI's own saver is not enough: its ignite ``DiskSaver`` writes in place (``atomic=False``, to keep
group read permission), and ignite's ``Checkpoint`` removes the previous file *before* it writes the new one.
A run stopped during the end-of-epoch write (``SIGKILL``, out-of-memory kill, preemption, power cut) was
left with a truncated ``checkpoint_epoch=N.pt`` and no earlier one.

What :class:`AtomicCheckpointSaver` guarantees, for every stop at any instant:

* each file it writes is complete or absent (:func:`hmn.durable.atomic_torch_save`: a temporary
  ``.<name>.partial``, fsync, rename, folder fsync), with the permissions of an ordinary file;
* the previous full-state checkpoint is removed only after the next one is complete on disk
  (:class:`AtomicDiskSaver` defers ignite's removals until its next save has finished);
* with ``best_model_saver`` (the bundles' wiring), a new best model is first written as a *staged* file
  ``.model.pt.epoch=N.staged`` and renamed to ``model.pt`` only once the full-state checkpoint of epoch N
  is complete. A run stopped in between resumes from epoch N-1 with the ``model.pt`` that goes with it,
  not with a model from an epoch it will train again (:func:`promote_staged`);
* a full disk stops the run with :class:`hmn.durable.InsufficientDiskSpaceError` naming the folder and the
  space needed, before anything is written when the size is known, and the last complete checkpoint stays.

:class:`hmn.workflows.ResumeFromLatest` is the other half: it resumes from the newest *readable*
checkpoint, sets unreadable ones aside, and settles staged best models against the epoch it resumes from.
"""

from __future__ import annotations

import glob
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ignite.distributed as idist
from ignite.handlers import DiskSaver
import torch
from monai.handlers import CheckpointLoader as _MonaiCheckpointLoader
from monai.handlers import CheckpointSaver

from hmn import durable
from hmn.durable import PARTIAL_SUFFIX, atomic_torch_save

__all__ = ["BEST_MODEL_COMPANIONS", "AtomicCheckpointSaver", "AtomicDiskSaver", "CheckpointLoader", "CheckpointReadError",
           "load_checkpoint", "promote_staged", "remove_partial_files",
           "staged_files", "staged_name"]

logger = logging.getLogger(__name__)

_STAGED_RE = re.compile(r"^\.(?P<name>.+)\.epoch=(?P<epoch>\d+)\.staged$")

# files staged beside a best model that are promoted with it, epoch for epoch: the validation split's operating
# thresholds (hmn.handlers.ValidationThresholds), so that thresholds.json always belongs to model.pt
BEST_MODEL_COMPANIONS = ("thresholds.json",)


class CheckpointReadError(RuntimeError):
    """A checkpoint (``model.pt``) that cannot be read or loaded; the message names the file. Attribute ``path``."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = os.fspath(path)
        super().__init__(f"{self.path}: {reason}")


def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:400]}"


def load_checkpoint(path: str | os.PathLike, map_location: Any = None) -> Any:
    """``torch.load(path, weights_only=True)`` (tensors and plain containers only: a pickle that would run code is
    refused), with every failure raised as :class:`CheckpointReadError` naming the file.

    Raises:
        CheckpointReadError: the file is missing, unreadable (permissions, a folder), damaged or truncated (not a
            complete ``torch.save`` archive), or holds objects other than tensors and containers of them.
        MemoryError, torch.OutOfMemoryError: passed on (the machine's trouble, not the file's).
    """
    path = os.fspath(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (MemoryError, torch.OutOfMemoryError):
        raise
    except FileNotFoundError:
        raise CheckpointReadError(path, "no such file: train the model first, or point --bundle_root (or --ckpt_dir) "
                                        "at the folder holding models/model.pt") from None
    except Exception as e:  # noqa: BLE001 - torch.load raises many types for a damaged or hostile file
        raise CheckpointReadError(path, f"cannot be read as a PyTorch checkpoint ({_reason(e)}); it may be damaged, "
                                        "truncated, or not a checkpoint saved by this project") from e


class CheckpointLoader(_MonaiCheckpointLoader):
    """MONAI's ``CheckpointLoader`` (same arguments: ``load_path``, ``load_dict``, ``map_location``, ``strict``)
    whose errors name the checkpoint: a file that cannot be read (:func:`load_checkpoint`) or whose weights do not
    fit the objects of ``load_dict`` (another architecture or number of classes) raises
    :class:`CheckpointReadError` naming ``load_path``. Shapes are always checked (``strict_shape=False`` is
    refused); an engine's ``max_epochs`` is kept as the engine had it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not self.strict_shape:
            raise ValueError("hmn.checkpoints.CheckpointLoader loads weights whole: strict_shape=False is not accepted")

    def __call__(self, engine: Any) -> None:
        from ignite.handlers import Checkpoint

        checkpoint = load_checkpoint(self.load_path, self.map_location)
        if not isinstance(checkpoint, Mapping):
            raise CheckpointReadError(self.load_path, f"holds a {type(checkpoint).__name__}, not a state dict")
        first = next(iter(self.load_dict))
        if len(self.load_dict) == 1 and first not in checkpoint:  # the file is the object's state dict itself
            checkpoint = {first: checkpoint}
        prior_max_epochs = engine.state.max_epochs
        try:
            Checkpoint.load_objects(to_load=self.load_dict, checkpoint=checkpoint, strict=self.strict)
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise CheckpointReadError(self.load_path, f"does not fit this network ({_reason(e)}): it was trained "
                                                      "with other settings (backbone, classes, options)") from e
        engine.state.max_epochs = prior_max_epochs
        self.logger.info(f"Restored all variables from {self.load_path}")


def staged_name(name: str, epoch: int) -> str:
    """The staged file name of `name` for `epoch` (``.<name>.epoch=<epoch>.staged``)."""
    return f".{name}.epoch={int(epoch)}.staged"



def staged_files(dirname: str | os.PathLike, name: str) -> list[tuple[int, str]]:
    """The staged copies of `name` in `dirname` as ``(epoch, path)``, oldest epoch first."""
    found = []
    for path in glob.glob(os.path.join(glob.escape(os.fspath(dirname)), f".{glob.escape(name)}.epoch=*.staged")):
        m = _STAGED_RE.match(os.path.basename(path))
        if m and m.group("name") == name:
            found.append((int(m.group("epoch")), path))
    return sorted(found)


def promote_staged(dirname: str | os.PathLike, name: str, epoch: int) -> str | None:
    """Makes the newest staged copy of `name` from an epoch up to `epoch` the real `name` (an atomic rename),
    and removes every other staged copy: older ones are superseded, newer ones belong to epochs after the
    committed one (a run stopped before their checkpoint was written; they will be trained again).

    Returns the promoted staged file's path, or None when there was none to promote.
    """
    staged = staged_files(dirname, name)
    eligible = [s for s in staged if s[0] <= epoch]
    promoted = max(eligible)[1] if eligible else None
    if promoted is not None:
        durable._commit(promoted, os.path.join(os.fspath(dirname), name))
    for e, path in staged:
        if path == promoted:
            continue
        if e > epoch:
            logger.warning("discarding %s: a best model of epoch %d, after the last complete checkpoint (epoch %d)",
                           path, e, epoch)
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
    return promoted


def remove_partial_files(dirname: str | os.PathLike) -> list[str]:
    """Removes the temporary ``.<name>.partial`` files that writers stopped mid-write left in `dirname`;
    returns their paths. Only for a folder no other process is writing to."""
    removed = []
    # sorted: the returned list and the log line do not follow the file system's listing order
    for path in sorted(glob.glob(os.path.join(glob.escape(os.fspath(dirname)), f".*{PARTIAL_SUFFIX}"))):
        try:
            os.remove(path)
        except FileNotFoundError:
            continue
        removed.append(path)
    if removed:
        logger.info("removed %d incomplete file(s) left by a stopped writer: %s", len(removed),
                    ", ".join(os.path.basename(p) for p in removed))
    return removed


class AtomicDiskSaver(DiskSaver):
    """An ignite save handler that writes each checkpoint atomically and durably and keeps the previous one
    until the new one is complete.

    ignite's ``Checkpoint`` calls ``remove(old)`` before it saves the new file; this handler only notes the
    old name and deletes it after its next save has been committed (or when :meth:`remove_pending` is
    called). A fixed ``filename`` (MONAI's ``key_metric_filename``, e.g. ``model.pt``) is replaced by the
    rename itself, so its removal is never needed.

    Args:
        dirname: the folder (created if missing).
        filename: a fixed file name used instead of the one ignite makes, or None.
        staged: write to ``.<filename>.epoch=<stage_epoch>.staged`` instead of `filename`; the file becomes
            `filename` through :func:`promote_staged` (needs `filename`; set ``stage_epoch`` before saving).
        save_on_rank: the distributed rank that writes (others do nothing), as ignite's ``DiskSaver``.

    Raises (on save):
        hmn.durable.InsufficientDiskSpaceError: the disk cannot hold the checkpoint; nothing is changed.
    """

    def __init__(self, dirname: str | os.PathLike, filename: str | None = None, staged: bool = False,
                 save_on_rank: int = 0) -> None:
        super().__init__(dirname=dirname, atomic=True, create_dir=True, require_empty=False, save_on_rank=save_on_rank)
        if staged and not filename:
            raise ValueError("AtomicDiskSaver(staged=True) needs a fixed filename (e.g. 'model.pt')")
        self.filename, self.staged = filename, bool(staged)
        self.stage_epoch: int | None = None
        self._pending_removal: list[str] = []

    def target(self, filename: str) -> Path:
        """The path a save under ignite's `filename` writes to."""
        name = self.filename or filename
        if self.staged:
            if self.stage_epoch is None:
                raise RuntimeError("AtomicDiskSaver(staged=True): set stage_epoch before saving")
            return self.dirname / staged_name(name, self.stage_epoch)
        return self.dirname / name

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        if idist.get_rank() != self.save_on_rank:
            return
        path = self.target(filename)
        atomic_torch_save(checkpoint, path)
        self.remove_pending(keep=path.name)

    def remove(self, filename: str) -> None:
        if self.filename is not None:
            return  # a fixed name is replaced atomically by the next save
        self._pending_removal.append(filename)

    def defer_removal(self, filenames: list[str]) -> None:
        """Queues files of this folder for removal after the next complete save (e.g. older checkpoints found
        on resume)."""
        self._pending_removal.extend(filenames)

    def remove_pending(self, keep: str | None = None) -> None:
        """Deletes the files whose removal was deferred (all but `keep`)."""
        if idist.get_rank() != self.save_on_rank:
            return
        pending, self._pending_removal = self._pending_removal, []
        for name in pending:
            if name == keep:
                continue
            try:
                (self.dirname / name).unlink()
            except FileNotFoundError:
                pass


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` (same arguments, same file names and events) with crash-safe writes; see the
    module docstring for what it guarantees.

    Args:
        best_model_saver: for the per-epoch full-state saver (``save_interval`` at epoch level): the
            ``AtomicCheckpointSaver(save_key_metric=True, key_metric_filename=..., stage_key_metric=True)``
            of the same run, whose staged best model this saver promotes once each of its checkpoints is
            complete. None: no promotion.
        stage_key_metric: with ``save_key_metric`` and a ``key_metric_filename``, write a new best model as a
            staged file that ``best_model_saver`` of the full-state saver promotes (see
            :func:`promote_staged`). Without a full-state saver that promotes it, the best model would never
            appear under its name: leave it False then.
        Everything else: as ``monai.handlers.CheckpointSaver``.

    Raises:
        ValueError: `stage_key_metric` without ``save_key_metric`` and ``key_metric_filename``, or
            `best_model_saver` on a saver without epoch-level ``save_interval``.
    """

    def __init__(self, save_dir: str, save_dict: dict, *args: Any, best_model_saver: AtomicCheckpointSaver | None = None,
                 stage_key_metric: bool = False, **kwargs: Any) -> None:
        super().__init__(save_dir, save_dict, *args, **kwargs)
        final_name = kwargs.get("final_filename")
        key_name = kwargs.get("key_metric_filename")
        if stage_key_metric and (self._key_metric_checkpoint is None or not key_name):
            raise ValueError("stage_key_metric=True needs save_key_metric=True and a key_metric_filename")
        if best_model_saver is not None and (self._interval_checkpoint is None or not self.epoch_level):
            raise ValueError("best_model_saver needs an epoch-level full-state saver (save_interval > 0, epoch_level=True)")
        if best_model_saver is not None and not getattr(best_model_saver, "stage_key_metric", False):
            raise ValueError("best_model_saver must be an AtomicCheckpointSaver with stage_key_metric=True")
        self.stage_key_metric = bool(stage_key_metric)
        self.best_model_saver = best_model_saver
        for attr, filename, staged in (("_final_checkpoint", final_name, False),
                                       ("_key_metric_checkpoint", key_name, self.stage_key_metric),
                                       ("_interval_checkpoint", None, False)):
            checkpoint = getattr(self, attr)
            if checkpoint is not None:
                checkpoint.save_handler = AtomicDiskSaver(save_dir, filename=filename, staged=staged)

    @property
    def key_metric_filename(self) -> str | None:
        ckpt = self._key_metric_checkpoint
        return None if ckpt is None else ckpt.save_handler.filename

    def metrics_completed(self, engine: Any) -> None:
        if self._key_metric_checkpoint is not None:
            self._key_metric_checkpoint.save_handler.stage_epoch = int(engine.state.epoch)
        super().metrics_completed(engine)

    def promote(self, epoch: int) -> str | None:
        """Makes the newest staged best model up to `epoch` this saver's ``key_metric_filename`` (see
        :func:`promote_staged`), and likewise its :data:`BEST_MODEL_COMPANIONS`; call it once the full-state
        checkpoint of `epoch` is complete."""
        if not self.stage_key_metric or idist.get_rank() != 0:
            return None
        handler = self._key_metric_checkpoint.save_handler
        promoted = promote_staged(handler.dirname, handler.filename, epoch)
        model_epoch = None if promoted is None else int(_STAGED_RE.match(os.path.basename(promoted)).group("epoch"))
        for name in BEST_MODEL_COMPANIONS:
            staged = dict(staged_files(handler.dirname, name))
            if model_epoch is not None and model_epoch not in staged:
                # a new best model without its companion: the old companion belongs to another model
                stale = os.path.join(handler.dirname, name)
                if os.path.exists(stale):
                    os.remove(stale)
                    logger.warning("removed %s: it belonged to an earlier best model than the one of epoch %d",
                                   stale, model_epoch)
            promote_staged(handler.dirname, name, epoch if model_epoch is None else model_epoch)
        return promoted

    def interval_completed(self, engine: Any) -> None:
        super().interval_completed(engine)  # the full-state checkpoint is complete on disk when this returns
        if self.best_model_saver is not None:
            self.best_model_saver.promote(int(engine.state.epoch))
