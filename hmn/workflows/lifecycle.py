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

logger = logging.getLogger(__name__)

# the network's weights when training ends (MONAI FL's ``ModelType.FINAL_MODEL`` default path is models/<this>)
FINAL_MODEL_NAME = "model_final.pt"


def unwrapped_state_dict(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The network's ``state_dict`` without a ``DistributedDataParallel`` / ``DataParallel`` / ``torch.compile``
    wrapper's key prefix, so that it loads into the plain network."""
    while True:
        inner = getattr(network, "module", None) or getattr(network, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return network.state_dict()
        network = inner


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
    """

    def __init__(
        self, ckpt_dir: str, run_settings: Mapping[str, Any] | None = None, use_run_record: Any = True,
        datalist: str | None = None, class_names: Sequence[str] | None = None,
        validation_data: Sequence[Mapping[str, Any]] | None = None, run_lock: Any = None, early_stop: Any = None,
        resume: Any = None, checkpoint: Any = None, test_evaluator: Any = None, evaluate_after_training: Any = True,
        final_model: str | None = FINAL_MODEL_NAME,
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

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        if not engine.has_event_handler(self.start, Events.STARTED):
            engine.add_event_handler(Events.STARTED, self.start)
        if not engine.has_event_handler(self.complete, Events.COMPLETED):
            engine.add_event_handler(Events.COMPLETED, self.complete)

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
            self.resume.start(engine)
        if self.run_settings:
            runs.write_run_record(self.ckpt_dir, self.run_settings, self.resume.enabled if self.resume is not None else False)
        if self.checkpoint is not None and writer:
            self.checkpoint.save_dict.setdefault("trainer", engine)
            self.checkpoint.attach(engine)
        self.started = True

    def complete(self, engine: Any) -> None:
        """The end of the run (see the class docstring)."""
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
        self.evaluated = evaluate_after_training(self.test_evaluator, self.ckpt_dir, True)
        if self.evaluated and isinstance(network, torch.nn.Module):
            # the test evaluator loaded model.pt into this network: give it its final weights back, so that a driver
            # that goes on with the trainer (the next federated round, get_weights) has the weights it trained
            if final is None:
                from hmn.checkpoints import load_checkpoint

                final = load_checkpoint(self.final_model_path, map_location="cpu")
            target = network
            while isinstance(getattr(target, "module", None) or getattr(target, "_orig_mod", None), torch.nn.Module):
                target = getattr(target, "module", None) or getattr(target, "_orig_mod")
            target.load_state_dict(final, strict=True)
