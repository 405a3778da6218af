"""A training run's life, attached to the trainer itself: what happens when it starts and when it ends, whoever
calls ``trainer.run()``.

MONAI FL (``monai.fl.client.MonaiAlgo``), NVFlare, ``monai.bundle.create_workflow`` and a user's own Python call
the bundle's ``train#trainer.run()`` without running the bundle's ``training`` step list. So a bundle's run
behaviour lives in :class:`TrainingRun`, the first of the trainer's ``train#handlers``, and the step list only
starts the engine (as MONAI's own model-zoo bundles keep ``run`` to ``$@train#trainer.run()``).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Sequence

import torch

from hmn.workflows.devices import as_bool, rank_world

__all__ = ["FINAL_MODEL_NAME", "TrainingRun", "unwrapped_state_dict"]

_PHASE_TRAINING, _PHASE_EPOCH_END, _PHASE_COMPLETING = "training", "epoch end", "completing"

logger = logging.getLogger(__name__)

# the network's weights when training ends (MONAI FL's ``ModelType.FINAL_MODEL`` default path is models/<this>)
FINAL_MODEL_NAME = "model_final.pt"


def _unwrapped(network: torch.nn.Module) -> torch.nn.Module:
    """The plain network inside ``DistributedDataParallel`` / ``DataParallel`` / ``torch.compile`` wrappers."""
    while True:
        inner = getattr(network, "module", None) or getattr(network, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return network
        network = inner


def unwrapped_state_dict(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The network's ``state_dict`` without a ``DistributedDataParallel`` / ``DataParallel`` / ``torch.compile``
    wrapper's key prefix, so that it loads into the plain network."""
    return _unwrapped(network).state_dict()


def _done_in_epoch(state: Any) -> int:
    """The iterations of the current epoch done (ignite counts ``state.iteration`` from the run's start)."""
    length = state.epoch_length or 0
    return (state.iteration - 1) % length + 1 if length and state.iteration else 0


class TrainingRun:
    """Ignite handler owning a training run's start and end (attach it to the trainer before any other handler).

    When the trainer starts (``Events.STARTED``), the first time only (MONAI FL runs the same trainer again for
    each round):

    1. takes `run_lock` (:class:`hmn.run_lock.RunLock` on the models folder): a second run on the folder stops here;
    2. compares the settings with the folder's run record (:func:`hmn.runs.check_run_record`), and on a resume
       (`use_run_record`) the datalist's classes with the model's (:func:`hmn.runs.check_classes`);
    3. checks the validation split (:func:`hmn.workflows.check_validation_split`): a run whose model selection
       cannot work stops before it trains;
    4. connects `early_stop` (MONAI ``EarlyStopHandler``) to the trainer;
    5. restores the newest readable checkpoint (`resume`, :meth:`ResumeFromLatest.start`; the trainer's state is
       added to its objects as ``"trainer"``), or refuses a folder that already holds a run;
    6. writes the run record ``run.json`` (:func:`hmn.runs.write_run_record`) on rank 0;
    7. attaches the per-epoch full-state `checkpoint` saver (``"trainer"`` added to its ``save_dict``) on rank 0,
       after every other handler, so that each epoch's checkpoint is written after that epoch's validation and
       the best model staged by it is promoted to ``model.pt`` once the checkpoint is complete.

    When the trainer completes (``Events.COMPLETED``: the last epoch, early stopping, or the end of a federated
    round), on rank 0: the network's weights are written to ``<ckpt_dir>/model_final.pt`` (a ``state_dict``,
    crash-safe), and with `evaluate_after_training` the best model is evaluated on the test split by
    `test_evaluator` (:func:`hmn.workflows.evaluate_after_training`, not under ``torchrun``), after which the
    network gets its final weights back (the test evaluator loads ``model.pt`` into the same network).

    A graceful stop (`graceful_stop`, on by default): while the trainer runs (in the main thread), the first SIGINT
    (Ctrl-C) or SIGTERM (a cluster's preemption) is acknowledged at once in the log, and the run stops at the end of
    the current iteration (with gradient accumulation, the iteration that ends the optimizer step): on rank 0 the
    full state is written to ``<ckpt_dir>/checkpoint_iteration=<I>.pt`` (crash-safe, as every checkpoint; it holds
    the trainer's iteration, so ``--resume True`` continues that epoch with its remaining batches in the same order,
    :class:`hmn.workflows.ResumableSampler`), one line says where it stopped, what is saved and the command that
    continues it, the trainer terminates (no end-of-training report), and the bundle's step list then exits with
    status 128 + the signal (:meth:`exit_if_stopped`). A signal during an epoch's validation stops after the epoch's
    own checkpoint instead. A second signal exits at once (:class:`hmn.workflows.stop.StopSignals`); the checkpoints
    already complete stay so. Under ``torchrun`` the ranks agree on the iteration to stop at (one all-reduce per
    iteration). With `checkpoint_every` N > 0 the same mid-epoch checkpoint is also written every N iterations (for
    clusters that kill without warning); each replaces the previous one, and an epoch's checkpoint replaces them all.

    Args:
        ckpt_dir: the models folder (``model.pt``, ``run.json``, checkpoints).
        run_settings: the settings the run record holds (:func:`hmn.runs.run_settings`).
        use_run_record: check the settings (and, on a resume, the classes) against the recorded ones.
        datalist: the datalist JSON (its ``class_names`` are checked on a resume).
        class_names: the model's classes, in output order.
        validation_data: the validation split's items (``{"image": ..., "label": [...]}``).
        run_lock, early_stop, resume, checkpoint, test_evaluator: the objects above (each optional).
        evaluate_after_training: bool-like (``"yes"``/``"no"`` accepted).
        final_model: the file name of the final weights in `ckpt_dir`; None or "" writes none.
        epoch_loss: the run's :class:`hmn.workflows.EpochLoss`: its epoch so far is kept in mid-epoch checkpoints.
        graceful_stop: bool-like; catch SIGINT and SIGTERM as above.
        checkpoint_every: write a mid-epoch checkpoint every this many iterations (0: only at a stop).
    """

    def __init__(
        self, ckpt_dir: str, run_settings: Mapping[str, Any] | None = None, use_run_record: Any = True,
        datalist: str | None = None, class_names: Sequence[str] | None = None,
        validation_data: Sequence[Mapping[str, Any]] | None = None, run_lock: Any = None, early_stop: Any = None,
        resume: Any = None, checkpoint: Any = None, test_evaluator: Any = None, evaluate_after_training: Any = True,
        final_model: str | None = FINAL_MODEL_NAME, epoch_loss: Any = None, graceful_stop: Any = True,
        checkpoint_every: Any = 0,
    ) -> None:
        self.ckpt_dir = os.fspath(ckpt_dir)
        self.run_settings = dict(run_settings or {})
        self.use_run_record = as_bool(use_run_record, "use_run_record")
        self.datalist, self.class_names = datalist, None if class_names is None else list(class_names)
        self.validation_data = validation_data
        self.run_lock, self.early_stop, self.resume, self.checkpoint = run_lock, early_stop, resume, checkpoint
        self.test_evaluator = test_evaluator
        self.evaluate_after_training = as_bool(evaluate_after_training, "evaluate_after_training")
        self.final_model = final_model or None
        self.started = False
        self.final_model_path: str | None = None
        self.evaluated = False
        self.epoch_loss = epoch_loss
        self.graceful_stop = as_bool(graceful_stop, "graceful_stop")
        self.checkpoint_every = int(checkpoint_every or 0)
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be 0 (only at a stop) or a number of iterations, got {checkpoint_every!r}")
        from hmn.workflows.stop import StopSignals

        self.signals = StopSignals(self._first_signal, self._second_signal)
        self.stopped: Any = None  # the TrainingStopped to raise after a graceful stop
        self._engine: Any = None
        self._phase = _PHASE_TRAINING
        self._last_mid_epoch: int | None = None

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        if not engine.has_event_handler(self.start, Events.STARTED):
            engine.add_event_handler(Events.STARTED, self.start)
        if not engine.has_event_handler(self.complete, Events.COMPLETED):
            engine.add_event_handler(Events.COMPLETED, self.complete)
        if not engine.has_event_handler(self._epoch_started, Events.EPOCH_STARTED):
            engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
            engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_ending)
            engine.add_event_handler(Events.TERMINATE, self._terminated)
        if self.graceful_stop and not getattr(engine.run, "_hmn_catches_stop_signals", False):
            # the signals are caught for exactly the span of trainer.run(), whoever calls it (and however it ends)
            run = engine.run

            def run_catching_stop_signals(*args: Any, **kwargs: Any) -> Any:
                self._engine, self.stopped, self._phase = engine, None, _PHASE_TRAINING
                self.signals.install()
                try:
                    return run(*args, **kwargs)
                finally:
                    self.signals.uninstall()

            run_catching_stop_signals._hmn_catches_stop_signals = True  # type: ignore[attr-defined]
            engine.run = run_catching_stop_signals

    def start(self, engine: Any) -> None:
        """The start of the run (see the class docstring); later starts of the same trainer do nothing."""
        if self.started:
            return
        from hmn import runs
        from hmn.workflows.data import check_validation_split
        from hmn.workflows.data import class_names as datalist_classes

        if self.run_lock is not None:
            self.run_lock.acquire()
        if self.run_settings:
            runs.check_run_record(self.ckpt_dir, self.run_settings, self.use_run_record)
        if self.use_run_record and self.datalist and self.class_names is not None:
            runs.check_classes(self.class_names, datalist_classes(self.datalist), self.datalist)
        if self.validation_data is not None and self.class_names is not None:
            check_validation_split(self.validation_data, self.class_names)
        if self.early_stop is not None:
            self.early_stop.set_trainer(engine)
        writer = rank_world()[0] == 0
        if self.resume is not None:
            self.resume.load_dict.setdefault("trainer", engine)
            if self.epoch_loss is not None and hasattr(self.resume, "optional_load_dict"):
                self.resume.optional_load_dict.setdefault("epoch_loss", self.epoch_loss)
            self.resume.start(engine)
        if self.run_settings:
            runs.write_run_record(self.ckpt_dir, self.run_settings, self.resume.enabled if self.resume is not None else False)
        if self.checkpoint is not None and writer:
            self.checkpoint.save_dict.setdefault("trainer", engine)
            self.checkpoint.attach(engine)
        # after every other handler: the iteration's scheduler step is done before a mid-epoch checkpoint is written,
        # and the epoch's own checkpoint before the mid-epoch ones are removed
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)
        self.started = True

    def complete(self, engine: Any) -> None:
        """The end of the run (see the class docstring)."""
        self._phase = _PHASE_COMPLETING
        try:
            self._complete(engine)
        finally:
            requested = self.signals.requested if self.signals.installed else None
            self.signals.uninstall()
        if requested and self.stopped is None:
            self._stopped_while_completing(engine, requested)

    def _complete(self, engine: Any) -> None:
        if rank_world()[0] != 0:
            return
        network = getattr(engine, "network", None)
        if self.final_model and isinstance(network, torch.nn.Module):
            from hmn.durable import atomic_torch_save

            os.makedirs(self.ckpt_dir, exist_ok=True)
            self.final_model_path = os.path.join(self.ckpt_dir, self.final_model)
            atomic_torch_save(unwrapped_state_dict(network), self.final_model_path)
            logger.info("epoch %s: the network's final weights are in %s", engine.state.epoch, self.final_model_path)
        if self.test_evaluator is None or not self.evaluate_after_training:
            return
        from hmn.workflows.report import evaluate_after_training

        final = None
        if isinstance(network, torch.nn.Module) and self.final_model_path is None:
            final = {k: v.detach().to("cpu", copy=True) for k, v in unwrapped_state_dict(network).items()}
        if self.signals.requested:
            return  # a stop asked for before the test evaluation: it is not started
        ran = evaluate_after_training(self.test_evaluator, self.ckpt_dir, True)
        # stopped part-way (a graceful stop): no report was written
        self.evaluated = ran and not (self.signals.requested and self.test_evaluator.should_terminate == "skip_completed")
        if ran and isinstance(network, torch.nn.Module):
            # the test evaluator loaded model.pt into this network: give it its final weights back, so that a driver
            # that goes on with the trainer (the next federated round, get_weights) has the weights it trained
            if final is None:
                from hmn.checkpoints import load_checkpoint

                final = load_checkpoint(self.final_model_path, map_location="cpu")
            _unwrapped(network).load_state_dict(final, strict=True)

    # ---- graceful stop -------------------------------------------------------------------------------------------

    def exit_if_stopped(self) -> None:
        """Raises :class:`hmn.workflows.stop.TrainingStopped` (exit status 128 + signal) when the last
        ``trainer.run()`` ended in a graceful stop; the last step of the bundles' ``training`` step list."""
        if self.stopped is not None:
            raise self.stopped

    def _epoch_started(self, engine: Any) -> None:
        self._phase = _PHASE_TRAINING
        if self._last_mid_epoch is None or self._last_mid_epoch > engine.state.iteration:
            self._last_mid_epoch = engine.state.iteration  # checkpoint_every counts from here (a resume's position)

    def _epoch_ending(self, engine: Any) -> None:
        self._phase = _PHASE_EPOCH_END  # before the validation and the epoch's checkpoint

    def _terminated(self, engine: Any) -> None:
        self.signals.uninstall()

    def _resumable(self, engine: Any) -> bool:
        loader = getattr(engine, "data_loader", None)
        return hasattr(getattr(loader, "sampler", None), "skip") and bool(getattr(loader, "batch_size", None))

    def _position(self, engine: Any) -> str:
        state = engine.state
        return f"epoch {state.epoch}/{state.max_epochs}, iteration {_done_in_epoch(state)}/{state.epoch_length or 0}"

    def _last_complete_checkpoint(self) -> str | None:
        from hmn.workflows.resume import full_state_checkpoints

        engine = self._engine
        found = full_state_checkpoints(self.ckpt_dir, getattr(getattr(engine, "state", None), "epoch_length", None))
        return found[0][1] if found else None

    def _first_signal(self, signum: int) -> None:
        import signal as _signal

        name = _signal.Signals(signum).name
        engine = self._engine
        if engine is None:
            return
        if self._phase == _PHASE_COMPLETING:
            # training is complete and saved: the test evaluation stops without its report (a report of part of the
            # split would be a wrong number); ignite checks the flag after each of its events
            evaluator = self.test_evaluator
            if evaluator is not None:
                evaluator.should_terminate = "skip_completed"
            logger.warning("%s received: training is complete; the end-of-training test evaluation stops without its "
                           "report; %s again exits at once", name, "Ctrl-C" if signum == _signal.SIGINT else name)
            return
        if self._phase == _PHASE_EPOCH_END:
            where = f"after epoch {engine.state.epoch}'s validation and checkpoint"
        else:
            acc = int(getattr(engine, "accumulation_steps", 1) or 1)
            where = f"at the end of the current iteration ({self._position(engine)})"
            if acc > 1:
                where = f"at the end of the current optimizer step (every {acc} iterations; {self._position(engine)})"
        logger.warning("%s received: the run stops %s and saves its state; %s again exits at once without saving",
                       name, where, "Ctrl-C" if signum == _signal.SIGINT else name)

    def _second_signal(self, signum: int) -> None:
        import signal as _signal

        last = self._last_complete_checkpoint()
        logger.warning("second %s: exiting now. %s", _signal.Signals(signum).name,
                       f"The last complete checkpoint is {last}; resume with --resume True" if last
                       else "No checkpoint was completed yet")

    def _stop_requested(self, engine: Any) -> int | None:
        """The signal to stop for, agreed by every rank under torch.distributed (one all-reduce, max)."""
        requested = self.signals.requested if self.signals.installed else None
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            network = getattr(engine, "network", None)
            device = next(network.parameters()).device if isinstance(network, torch.nn.Module) else torch.device("cpu")
            flag = torch.tensor([requested or 0], dtype=torch.int64, device=device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            requested = int(flag.item()) or None
        return requested

    def _iteration_completed(self, engine: Any) -> None:
        if not (self.graceful_stop or self.checkpoint_every):
            return
        requested = self._stop_requested(engine) if self.graceful_stop else None
        done = _done_in_epoch(engine.state)
        if done == engine.state.epoch_length:
            return  # the epoch's end: its validation and checkpoint come first (_epoch_completed)
        acc = int(getattr(engine, "accumulation_steps", 1) or 1)
        if done % acc:
            return  # within an optimizer step: the accumulated gradients are not in any checkpoint
        if requested:
            self._stop(engine, requested, self._save_mid_epoch(engine))
        elif self.checkpoint_every and engine.state.iteration - (self._last_mid_epoch or 0) >= self.checkpoint_every:
            self._save_mid_epoch(engine)

    def _epoch_completed(self, engine: Any) -> None:
        from hmn.workflows.resume import mid_epoch_checkpoints

        self._last_mid_epoch = engine.state.iteration
        if rank_world()[0] == 0 and self.checkpoint is not None:
            epoch_file = os.path.join(self.ckpt_dir, f"checkpoint_epoch={engine.state.epoch}.pt")
            if os.path.isfile(epoch_file):  # complete: the mid-epoch checkpoints before it are superseded
                for iteration, path in mid_epoch_checkpoints(self.ckpt_dir):
                    if iteration <= engine.state.iteration:
                        _remove(path)
        requested = self._stop_requested(engine) if self.graceful_stop else None
        if requested and not engine.should_terminate:  # (early stopping ends the run its own way)
            self._stop(engine, requested, None)

    def _save_mid_epoch(self, engine: Any) -> str | None:
        """Writes ``checkpoint_iteration=<I>.pt`` (rank 0; the bundle's checkpoint objects, and the epoch's loss so
        far) and removes the older mid-epoch ones; its path, or None where none can be written."""
        from hmn.durable import atomic_torch_save
        from hmn.workflows.resume import MID_EPOCH_PREFIX, mid_epoch_checkpoints

        self._last_mid_epoch = engine.state.iteration
        if self.checkpoint is None or not self._resumable(engine):
            if self.checkpoint is not None:
                logger.warning("this trainer's data loader cannot continue an epoch part-way (its sampler is not "
                               "hmn.workflows.ResumableSampler, as in bundles made before it): no mid-epoch checkpoint")
            return None
        if rank_world()[0] != 0:
            return None
        state = {}
        for key, obj in self.checkpoint.save_dict.items():
            state[key] = unwrapped_state_dict(obj) if isinstance(obj, torch.nn.Module) else obj.state_dict()
        if self.epoch_loss is not None:
            state["epoch_loss"] = self.epoch_loss.state_dict()
        path = os.path.join(self.ckpt_dir, f"{MID_EPOCH_PREFIX}{engine.state.iteration}.pt")
        atomic_torch_save(state, path)
        for iteration, older in mid_epoch_checkpoints(self.ckpt_dir):
            if iteration < engine.state.iteration:
                _remove(older)
        logger.info("%s: mid-epoch checkpoint %s", self._position(engine), path)
        return path

    def _stop(self, engine: Any, signum: int, mid_epoch: str | None) -> None:
        import signal as _signal

        from hmn.workflows.stop import TrainingStopped, continue_command

        name = _signal.Signals(signum).name
        kept = mid_epoch or self._last_complete_checkpoint()
        command = continue_command()
        last_epoch = engine.state.epoch >= (engine.state.max_epochs or 0) and not mid_epoch
        if mid_epoch:
            what = f"the run's state in the middle of epoch {engine.state.epoch} is saved in {mid_epoch}"
        elif kept and last_epoch:
            final = self.final_model or "the final weights"
            what = (f"every epoch is trained and saved in {kept}; the end-of-training steps ({final} and the test "
                    "report) are left, and the command below does them")
        elif kept:
            what = f"the last complete checkpoint is {kept}"
        else:
            what = "no checkpoint was completed yet (a resume starts from scratch)"
        if command:
            how = f"continue with: {command}"
        elif "LOCAL_RANK" in os.environ:
            how = "continue with the same torchrun command and --resume True"
        else:  # a driver of its own (Python, MONAI FL)
            how = "continue with resume=True (--resume True on the command line)"
        if rank_world()[0] == 0:
            logger.warning("stopped by %s at %s: %s; %s", name, self._position(engine), what, how)
        self.stopped = TrainingStopped(signum, kept, command)
        self.signals.uninstall()
        quiet = engine.logger.level  # ignite's "Engine will stop after current iteration": the iteration is done
        engine.logger.setLevel(logging.WARNING)
        try:
            engine.terminate(skip_completed=True)
        finally:
            engine.logger.setLevel(quiet)

    def _stopped_while_completing(self, engine: Any, signum: int) -> None:
        import signal as _signal

        from hmn.workflows.stop import TrainingStopped

        name = _signal.Signals(signum).name
        if rank_world()[0] == 0:
            final = f", {self.final_model_path}" if self.final_model_path else ""
            report = ("the test report is written" if self.evaluated else
                      "the test report is not written: evaluate model.pt with the bundle's evaluate.json")
            logger.warning("stopped by %s after training: every epoch is complete (%s%s); %s", name,
                           self._last_complete_checkpoint(), final, report)
        self.stopped = TrainingStopped(signum, self._last_complete_checkpoint(), None)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
