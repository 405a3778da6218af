"""Bundle support code: label masks, datalist resolution, checkpoint discovery, boolean overrides."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch

from hmn.losses import MultiLabelBCELoss
from hmn.workflows import (
    CPUAutocastInferer,
    amp_kwargs,
    as_bool,
    cpu_bf16_supported,
    label_tensor,
    latest_checkpoint,
    resolve_datalist,
    to_device,
)


def test_label_mask_becomes_ignored_entries():
    item = label_tensor({"image": "a.dcm", "label": [1, 0, 0], "label_mask": [1, 0, 1]})
    assert item["label"].tolist() == [1.0, -1.0, 0.0]
    logits = torch.tensor([[2.0, 5.0, -1.0]])
    masked = MultiLabelBCELoss()(logits, item["label"][None])
    kept = MultiLabelBCELoss()(logits[:, [0, 2]], torch.tensor([[1.0, 0.0]]))
    assert masked.item() == pytest.approx(kept.item())
    with pytest.raises(ValueError, match="a.dcm: label_mask shape"):
        label_tensor({"image": "a.dcm", "label": [1, 0], "label_mask": [1]})


def test_latest_checkpoint_picks_highest_epoch(tmp_path):
    assert latest_checkpoint(str(tmp_path)) is None
    for e in (2, 10, 9):
        (tmp_path / f"checkpoint_epoch={e}.pt").write_bytes(b"")
    (tmp_path / "model.pt").write_bytes(b"")
    assert latest_checkpoint(str(tmp_path)).endswith("checkpoint_epoch=10.pt")


def test_resolve_datalist(tmp_path):
    with pytest.raises(FileNotFoundError, match="no datalist.json in dataset_dir"):
        resolve_datalist(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nope.json"):
        resolve_datalist(str(tmp_path), str(tmp_path / "nope.json"))
    (tmp_path / "datalist.json").write_text("{}")
    assert resolve_datalist(str(tmp_path)) == str(tmp_path / "datalist.json")


def test_as_bool():
    assert as_bool("True") and as_bool("true") and as_bool(True) and as_bool("1")
    assert not as_bool("false") and not as_bool(False) and not as_bool("0")
    with pytest.raises(ValueError, match="resume='maybe'"):
        as_bool("maybe", "resume")


def test_cpu_bf16_supported_reads_the_cpu_flags():
    x86 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse avx2 avx512f {}\n"
    assert cpu_bf16_supported(x86.format("avx512_bf16 avx512_vnni"))
    assert cpu_bf16_supported(x86.format("amx_bf16 amx_tile"))
    assert not cpu_bf16_supported(x86.format("avx512_vnni avx512_fp16"))
    assert cpu_bf16_supported("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n")  # Arm
    assert not cpu_bf16_supported("Features\t: fp asimd\nmodel name\t: bf16 avx512_bf16\n")  # only flag lines count
    assert not cpu_bf16_supported("")


def _small_net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8), torch.nn.GELU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 3),
    )


@pytest.mark.numerics
def test_cpu_autocast_inferer_off_is_the_plain_forward():
    net, x = _small_net(), torch.randn(4, 1, 16, 16)
    expected = net(x)
    got = CPUAutocastInferer(enabled="false")(x, net)
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    with pytest.raises(ValueError, match="cpu_bf16='maybe'"):
        CPUAutocastInferer(enabled="maybe")


@pytest.mark.numerics
def test_cpu_autocast_inferer_runs_bfloat16_and_returns_float32_with_gradients():
    x = torch.randn(8, 1, 16, 16)
    ref_net, net = _small_net(), _small_net()
    ref = ref_net(x)
    ref.sum().backward()
    conv_dtypes = []
    net[0].register_forward_hook(lambda m, i, o: conv_dtypes.append(o.dtype))
    out = CPUAutocastInferer(enabled=True)(x, net)
    assert conv_dtypes == [torch.bfloat16]  # the convolution ran in bfloat16
    assert out.dtype == torch.float32  # the loss sees float32
    torch.testing.assert_close(out, ref, rtol=0.05, atol=0.05 * ref.abs().max().item())
    out.sum().backward()
    for (name, p), p_ref in zip(net.named_parameters(), ref_net.parameters()):
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        cos = torch.nn.functional.cosine_similarity(p.grad.flatten(), p_ref.grad.flatten(), dim=0)
        assert cos > 0.99, (name, cos.item())


def test_cpu_autocast_inferer_converts_nested_outputs():
    class TwoHeads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 2)

        def forward(self, x):
            y = self.lin(x)
            return {"fine": y, "pair": (y * 2, torch.arange(3))}

    out = CPUAutocastInferer(enabled=True)(torch.randn(2, 4), TwoHeads())
    assert out["fine"].dtype == torch.float32 and out["pair"][0].dtype == torch.float32
    assert out["pair"][1].dtype == torch.int64


def _run_segment(ckpt_dir, scores, max_epochs, resume, patience=10, atomic=True, input_changes=None):
    """Train a 1-weight "network" whose weight is set to the epoch number, validate with the given score
    per epoch, and save as the bundles do: best model by score, full state each epoch (n_saved=1), with
    the project's crash-safe savers (`atomic`) or MONAI's own."""
    from ignite.engine import Engine, Events
    from monai.handlers import CheckpointSaver, EarlyStopHandler

    from hmn.checkpoints import AtomicCheckpointSaver
    from hmn.workflows import BestModelRecord, EarlyStopRecord, ResumeFromLatest

    net = torch.nn.Linear(1, 1, bias=False)

    def step(engine, batch):
        with torch.no_grad():
            net.weight.fill_(float(engine.state.epoch))

    trainer = Engine(step)
    evaluator = Engine(lambda e, b: None)

    @evaluator.on(Events.EPOCH_STARTED)
    def _score(engine):  # a numpy scalar, as MONAI's ROCAUC gives it
        engine.state.metrics["auc"] = np.float64(scores[trainer.state.epoch - 1])

    @evaluator.on(Events.STARTED)
    def _epoch(engine):  # MONAI's evaluators run with the trainer's epoch
        engine.state.epoch, engine.state.max_epochs = trainer.state.epoch - 1, trainer.state.epoch

    if atomic:
        best = AtomicCheckpointSaver(str(ckpt_dir), {"model": net}, save_key_metric=True, key_metric_name="auc",
                                     key_metric_filename="model.pt", stage_key_metric=True)
    else:
        best = CheckpointSaver(str(ckpt_dir), {"model": net}, save_key_metric=True, key_metric_name="auc",
                               key_metric_filename="model.pt")
    best.attach(evaluator)
    early = EarlyStopHandler(patience=patience, score_function=lambda e: e.state.metrics["auc"])
    early.set_trainer(trainer)
    early.attach(evaluator)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: evaluator.run([0]))
    save_dict = {"model": net, "trainer": trainer, "best_model": BestModelRecord(best), "early_stop": EarlyStopRecord(early)}
    if atomic:
        saver = AtomicCheckpointSaver(str(ckpt_dir), save_dict, save_interval=1, n_saved=1, best_model_saver=best)
    else:
        saver = CheckpointSaver(str(ckpt_dir), save_dict, save_interval=1, n_saved=1)
    resume = ResumeFromLatest(str(ckpt_dir), save_dict, enabled=resume, saver=saver, input_changes=input_changes)
    resume.attach(trainer)
    saver.attach(trainer)
    trainer.run([0, 1], max_epochs=max_epochs)
    trainer.resumed_from = resume.loaded_from
    return trainer


def _weight(path):
    return torch.load(path, weights_only=True)["weight"].item()


def _names(folder):
    return sorted(p.name for p in folder.iterdir())  # hidden files included


@pytest.mark.parametrize("atomic", [True, False], ids=["atomic", "monai"])
def test_resumed_run_keeps_the_best_score_and_replaces_the_old_checkpoint(tmp_path, atomic):
    scores = [0.6, 0.9, 0.7, 0.8, 0.95]
    _run_segment(tmp_path, scores, max_epochs=2, resume=False, atomic=atomic)  # "killed" after epoch 2
    assert _names(tmp_path) == ["checkpoint_epoch=2.pt", "model.pt"]
    trainer = _run_segment(tmp_path, scores, max_epochs=4, resume=True, atomic=atomic)
    assert trainer.state.epoch == 4
    # epochs 3 and 4 (0.7, 0.8) are worse than epoch 2 (0.9): model.pt is still epoch 2's weights
    assert _weight(tmp_path / "model.pt") == 2.0
    assert _names(tmp_path) == ["checkpoint_epoch=4.pt", "model.pt"]
    _run_segment(tmp_path, scores, max_epochs=5, resume=True, atomic=atomic)  # epoch 5 beats it
    assert _weight(tmp_path / "model.pt") == 5.0
    assert _names(tmp_path) == ["checkpoint_epoch=5.pt", "model.pt"]


@pytest.mark.parametrize("atomic", [True, False], ids=["atomic", "monai"])
def test_resumed_run_counts_early_stopping_patience_from_before_the_stop(tmp_path, atomic):
    scores = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
    _run_segment(tmp_path, scores, max_epochs=2, resume=False, patience=2, atomic=atomic)  # one epoch without improvement
    trainer = _run_segment(tmp_path, scores, max_epochs=6, resume=True, patience=2, atomic=atomic)
    assert trainer.state.epoch == 3  # the second epoch without improvement stops it; a fresh count would reach 4


@pytest.mark.parametrize("atomic", [True, False], ids=["atomic", "monai"])
def test_a_resume_that_changes_the_input_restarts_the_best_model_choice(tmp_path, atomic, caplog):
    """model.pt must be a model of the preprocessing the run record describes: when a resume changes it (the
    CT window here), the best score and the early-stopping count from before were measured on other input, so
    the first validation of the resumed run replaces model.pt and the comparisons start again from there."""
    scores = [0.6, 0.9, 0.7, 0.8, 0.75]
    _run_segment(tmp_path, scores, max_epochs=2, resume=False, patience=2, atomic=atomic)
    assert _weight(tmp_path / "model.pt") == 2.0
    with caplog.at_level("WARNING"):
        trainer = _run_segment(tmp_path, scores, max_epochs=5, resume=True, patience=2, atomic=atomic,
                               input_changes={"window": [[40, 400], [50, 350]]})
    # 0.7 (epoch 3) is below the old best 0.9, but the old best was measured with another window; 0.8 beats 0.7
    assert _weight(tmp_path / "model.pt") == 4.0
    assert trainer.state.epoch == 5  # early stopping counts from epoch 3: one epoch without improvement by 5
    assert "window" in caplog.text and "best-model choice" in caplog.text
    # a resume that changes nothing in the input keeps the best score from before
    _run_segment(tmp_path, [0.6, 0.9, 0.7, 0.8, 0.75, 0.78], max_epochs=6, resume=True, atomic=atomic, input_changes={})
    assert _weight(tmp_path / "model.pt") == 4.0


class _Stopped(BaseException):
    """Stands for a kill: not an Exception, so nothing in the run catches it."""


def _stop_before_commit_of(monkeypatch, name):
    from hmn import durable

    original = durable._commit

    def commit(tmp, path):
        if os.path.basename(path) == name:
            raise _Stopped(path)
        original(tmp, path)

    monkeypatch.setattr(durable, "_commit", commit)


def test_stop_before_the_checkpoint_keeps_the_previous_one_and_the_best_model_of_its_epoch(tmp_path, monkeypatch):
    # epoch 2 is a new best (0.9); the run stops after its best model is staged, before its checkpoint is in place
    with monkeypatch.context() as m:
        _stop_before_commit_of(m, "checkpoint_epoch=2.pt")
        with pytest.raises(_Stopped):
            _run_segment(tmp_path, [0.6, 0.9], max_epochs=3, resume=False)
    # the previous checkpoint was not removed before the new one was complete, and model.pt is epoch 1's
    assert _names(tmp_path) == [".model.pt.epoch=2.staged", "checkpoint_epoch=1.pt", "model.pt"]
    assert _weight(tmp_path / "model.pt") == 1.0
    # epoch 2 trained again scores 0.5, below epoch 1: the model staged before the stop must not become model.pt
    trainer = _run_segment(tmp_path, [0.6, 0.5, 0.55], max_epochs=3, resume=True)
    assert trainer.resumed_from.endswith("checkpoint_epoch=1.pt") and trainer.state.epoch == 3
    assert _names(tmp_path) == ["checkpoint_epoch=3.pt", "model.pt"]
    assert _weight(tmp_path / "model.pt") == 1.0
    (record,) = torch.load(tmp_path / "checkpoint_epoch=3.pt", weights_only=True)["best_model"].values()
    assert [score for score, _ in record] == [0.6]


def test_stop_after_the_checkpoint_promotes_the_staged_best_model_on_resume(tmp_path, monkeypatch):
    from hmn.checkpoints import AtomicCheckpointSaver

    with monkeypatch.context() as m:  # checkpoint 2 in place, the staged best model not yet promoted
        m.setattr(AtomicCheckpointSaver, "promote", lambda self, epoch: (_ for _ in ()).throw(_Stopped()))
        with pytest.raises(_Stopped):
            _run_segment(tmp_path, [0.6, 0.9], max_epochs=3, resume=False)
    assert _names(tmp_path) == [".model.pt.epoch=1.staged", "checkpoint_epoch=1.pt"]
    (tmp_path / ".model.pt.epoch=1.staged").rename(tmp_path / ".model.pt.epoch=2.staged")
    trainer = _run_segment(tmp_path, [0.6, 0.9, 0.1], max_epochs=2, resume=True)
    assert trainer.resumed_from.endswith("checkpoint_epoch=1.pt")
    assert _names(tmp_path) == ["checkpoint_epoch=2.pt", "model.pt"] and _weight(tmp_path / "model.pt") == 2.0


def test_unreadable_checkpoint_is_set_aside_and_the_previous_one_resumed(tmp_path, caplog):
    _run_segment(tmp_path, [0.6, 0.9, 0.7], max_epochs=1, resume=False)
    good = (tmp_path / "checkpoint_epoch=1.pt").read_bytes()
    # what an in-place writer left when killed: the first half of epoch 2's checkpoint
    (tmp_path / "checkpoint_epoch=2.pt").write_bytes(good[: len(good) // 2])
    with caplog.at_level("WARNING"):
        trainer = _run_segment(tmp_path, [0.6, 0.9, 0.7], max_epochs=3, resume=True)
    assert trainer.resumed_from.endswith("checkpoint_epoch=1.pt") and trainer.state.epoch == 3
    assert "checkpoint_epoch=2.pt cannot be read" in caplog.text and "checkpoint_epoch=2.pt.unreadable" in caplog.text
    assert (tmp_path / "checkpoint_epoch=2.pt.unreadable").read_bytes() == good[: len(good) // 2]  # kept, not deleted
    assert _names(tmp_path) == ["checkpoint_epoch=2.pt.unreadable", "checkpoint_epoch=3.pt", "model.pt"]
    assert _weight(tmp_path / "model.pt") == 2.0


def test_no_readable_checkpoint_starts_from_scratch_saying_why(tmp_path, caplog):
    (tmp_path / "checkpoint_epoch=4.pt").write_bytes(b"PK\x03\x04 not a whole zip")
    (tmp_path / ".model.pt.epoch=4.staged").write_bytes(b"a best model of an epoch without a checkpoint")
    (tmp_path / ".checkpoint_epoch=5.pt.partial").write_bytes(b"a write that was stopped")
    with caplog.at_level("WARNING"):
        trainer = _run_segment(tmp_path, [0.6, 0.9], max_epochs=2, resume=True)
    assert trainer.resumed_from is None and trainer.state.epoch == 2
    assert "every checkpoint there was unreadable and set aside" in caplog.text and "starting from scratch" in caplog.text
    assert _names(tmp_path) == ["checkpoint_epoch=2.pt", "checkpoint_epoch=4.pt.unreadable", "model.pt"]
    assert _weight(tmp_path / "model.pt") == 2.0


def test_full_disk_stops_the_run_naming_the_folder_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    from collections import namedtuple

    from hmn import durable
    from hmn.durable import InsufficientDiskSpaceError

    usage = namedtuple("usage", "total used free")
    real = durable.shutil.disk_usage
    # the disk fills up once epoch 1 is saved
    monkeypatch.setattr(durable.shutil, "disk_usage", lambda p: usage(1, 1, 0) if (tmp_path / "checkpoint_epoch=1.pt").exists() else real(p))
    with pytest.raises(InsufficientDiskSpaceError, match=f"not enough disk space in {tmp_path}") as info:
        _run_segment(tmp_path, [0.6, 0.9], max_epochs=2, resume=False)
    assert info.value.needed > 2**20 and info.value.free == 0
    assert _names(tmp_path) == ["checkpoint_epoch=1.pt", "model.pt"]
    assert torch.load(tmp_path / "checkpoint_epoch=1.pt", weights_only=True)["trainer"]["iteration"] == 2  # epoch 1
    assert _weight(tmp_path / "model.pt") == 1.0


def test_best_model_record_needs_a_key_metric_saver(tmp_path):
    from monai.handlers import CheckpointSaver

    from hmn.workflows import BestModelRecord

    with pytest.raises(ValueError, match="save_key_metric=True"):
        BestModelRecord(CheckpointSaver(str(tmp_path), {"model": torch.nn.Linear(1, 1)}, save_interval=1))


def test_best_model_record_restores_the_evaluators_best_metric(tmp_path):
    """MONAI's evaluator logs "Got new best metric" by its own state.best_metric / best_metric_epoch, which a
    resume did not restore: the first validation after it was announced as the best even when below model.pt's
    score. The record carries both, and a restart (the input changed) forgets them with the saver's record."""
    from types import SimpleNamespace

    from monai.handlers import CheckpointSaver

    from hmn.workflows import BestModelRecord

    def record():
        saver = CheckpointSaver(str(tmp_path), {"model": torch.nn.Linear(1, 1)}, save_key_metric=True,
                                key_metric_name="auc", key_metric_filename="model.pt")
        evaluator = SimpleNamespace(state=SimpleNamespace(best_metric=-1, best_metric_epoch=-1))
        return BestModelRecord(saver, evaluator), evaluator

    before, ev = record()
    before._checkpoint.load_state_dict({"_saved": [(0.9, "model.pt")]})
    ev.state.best_metric, ev.state.best_metric_epoch = 0.9, 2
    state = before.state_dict()
    after, ev2 = record()
    after.load_state_dict(state)
    assert (ev2.state.best_metric, ev2.state.best_metric_epoch) == (0.9, 2)
    assert after.state_dict() == state
    after.restart()
    assert (ev2.state.best_metric, ev2.state.best_metric_epoch) == (-1, -1)
    assert after.state_dict()["_saved"] == []
    older, ev3 = record()  # a checkpoint written before the record carried the evaluator's state
    older.load_state_dict({"_saved": [(0.8, "model.pt")]})
    assert ev3.state.best_metric == 0.8 and ev3.state.best_metric_epoch != -1


def test_metric_history_drops_rows_of_epochs_trained_again_and_continues_the_elapsed_time(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import hmn.workflows.history
    from hmn.workflows import MetricHistory

    # a stopped clock for the history module: the elapsed time below is exact, however slow or loaded the machine is
    monkeypatch.setattr(hmn.workflows.history, "time", SimpleNamespace(time=lambda: 1000.0))
    path = tmp_path / "history.csv"
    # a stopped run: epochs 1-3 validated, but only epoch 1's checkpoint was complete; the last row was cut off
    path.write_text("epoch,elapsed_s,val_auc\n1,10.0,0.61\n2,20.0,0.72\n3,30.0,0.7\n4,40")
    history = MetricHistory(str(path))
    history._start -= 5.0  # the resumed process has trained for 5 s when epoch 2 is validated again
    history(SimpleNamespace(state=SimpleNamespace(epoch=2, metrics={"val_auc": 0.65, "note": "text"})))
    history(SimpleNamespace(state=SimpleNamespace(epoch=3, metrics={"val_auc": 0.7, "micro": 0.8})))
    rows = [line.split(",") for line in path.read_text().splitlines()]
    assert rows[0] == ["epoch", "elapsed_s", "val_auc", "micro"]
    assert rows[1] == ["1", "10.0", "0.61", ""]
    assert rows[2][0] == "2" and float(rows[2][1]) == 15.0 and rows[2][2:] == ["0.65", ""]  # 10 s before, 5 s now
    assert rows[3][0] == "3" and rows[3][2:] == ["0.7", "0.8"] and len(rows) == 4
    assert sorted(os.listdir(tmp_path)) == ["history.csv", "history.png"]  # no temporary file left


def test_metric_history_records_the_epoch_mean_training_loss_and_draws_the_curve(tmp_path):
    from types import SimpleNamespace

    from hmn.workflows import EpochLoss, MetricHistory

    loss = EpochLoss()
    history = MetricHistory(str(tmp_path / "history.csv"), loss=loss)
    for epoch, losses, auc in ((1, [0.9, 0.7, float("nan")], 0.6), (2, [0.5, 0.3], 0.7)):
        loss.reset()
        for value in losses:  # the trainer's output as MONAI's SupervisedTrainer leaves it
            loss.update(SimpleNamespace(state=SimpleNamespace(output=[{"loss": torch.tensor(value)}])))
        history(SimpleNamespace(state=SimpleNamespace(epoch=epoch, metrics={"val_auc": auc})))
    rows = [line.split(",") for line in (tmp_path / "history.csv").read_text().splitlines()]
    assert rows[0] == ["epoch", "elapsed_s", "train_loss", "val_auc"]
    assert float(rows[1][2]) == pytest.approx(0.8) and float(rows[2][2]) == pytest.approx(0.4)  # NaN left out
    assert (tmp_path / "history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_check_validation_split_names_left_out_classes_once_and_refuses_an_undefined_split(caplog):
    from hmn.workflows import check_validation_split

    names = ["Effusion", "Mass", "Hernia"]
    items = [{"image": f"i{i}.png", "label": [i % 2, (i + 1) % 2, 0]} for i in range(6)]
    items[0]["label_mask"] = [1, 0, 1]
    with caplog.at_level("WARNING"):
        assert check_validation_split(items, names) == ["Effusion", "Mass"]
    assert "1 of 3 classes are left out" in caplog.text and "Hernia (no positive labels)" in caplog.text
    # Mass's only negative known label is masked away in a 2-image split: nothing is left to compare
    two = [{"image": "a.png", "label": [1, 1, 0], "label_mask": [1, 1, 1]},
           {"image": "b.png", "label": [1, 0, 0], "label_mask": [1, 0, 1]}]
    with pytest.raises(ValueError, match=r"no class has both.*Mass: 1 positive / 1 known"):
        check_validation_split(two, names)
    with pytest.raises(ValueError, match="validation split is empty"):
        check_validation_split([], names)
    with pytest.raises(ValueError, match="2 labels for 3 classes"):
        check_validation_split([{"image": "x.png", "label": [0, 1]}], names)


def _cosine_lr(step, base, warmup, total, multiplier=0.01):
    """monai.optimizers.WarmupCosineSchedule written out: linear warm-up from base*multiplier, then half a cosine to 0."""
    import math

    if step < warmup:
        return base * (multiplier + (1 - multiplier) * step / max(1, warmup))
    progress = (step - warmup) / max(1, total - warmup)
    return base * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def _lr_segment(ckpt_dir, max_epochs, resume, epoch_length=4):
    from ignite.engine import Engine, Events
    from monai.optimizers import WarmupCosineSchedule

    from hmn.checkpoints import AtomicCheckpointSaver
    from hmn.workflows import ResumeFromLatest

    net = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sched = WarmupCosineSchedule(opt, warmup_steps=epoch_length, t_total=max_epochs * epoch_length, warmup_multiplier=0.01)
    lrs = []

    def step(engine, batch):
        lrs.append((engine.state.iteration, opt.param_groups[0]["lr"]))
        opt.step()
        sched.step()

    trainer = Engine(step)
    save_dict = {"model": net, "optimizer": opt, "lr_scheduler": sched, "trainer": trainer}
    saver = AtomicCheckpointSaver(str(ckpt_dir), save_dict, save_interval=1, n_saved=1)
    ResumeFromLatest(str(ckpt_dir), save_dict, enabled=resume, saver=saver).attach(trainer)
    saver.attach(trainer)
    trainer.run(list(range(epoch_length)), max_epochs=max_epochs)
    return lrs


def test_resume_with_a_larger_max_epochs_stretches_the_schedule_to_the_new_end(tmp_path, caplog):
    first = _lr_segment(tmp_path, max_epochs=2, resume=False)  # a 2-epoch run, 8 iterations
    with caplog.at_level("INFO"):
        second = _lr_segment(tmp_path, max_epochs=4, resume=True)  # resumed with --max_epochs 4
    assert "t_total 8 -> 16" in caplog.text and "max_epochs 2 -> 4" in caplog.text
    assert [i for i, _ in first] == list(range(1, 9)) and [i for i, _ in second] == list(range(9, 17))
    # iteration i runs with the schedule's value at step i - 1; after the resume, the 16-step horizon
    for i, lr in second:
        assert lr == pytest.approx(_cosine_lr(i - 1, 0.1, 4, 16), abs=1e-12)
    lrs = [lr for _, lr in second]
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] > 0  # one decay to the new end, no second cycle


def test_run_time_estimate_for_the_whole_run():
    from ignite.engine import Engine, Events

    from hmn.workflows import RunTimeEstimate

    now = [1000.0]
    durations = {1: 50.0, 2: 70.0, 3: 60.0, 4: 100.0, 5: 30.0}  # seconds per epoch, validation included

    def step(engine, batch):
        now[0] += 1.0  # one second per iteration
        if engine.state.iteration % engine.state.epoch_length == 0:
            now[0] += durations[engine.state.epoch] - engine.state.epoch_length  # the epoch's other work

    trainer = Engine(step)
    estimate = RunTimeEstimate(after_iterations=4, window=2, clock=lambda: now[0])
    estimate.attach(trainer)
    messages = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: messages.append(estimate.last_message))
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: messages.append(estimate.last_message))
    trainer.run(list(range(10)), max_epochs=5)
    first_at = next(i for i, m in enumerate(messages) if m)
    assert first_at == 3  # after the 4th iteration
    assert re.fullmatch(r"first estimate after 4 iteration\(s\): 1\.00 s per training iteration; the remaining 46 "
                        r"iterations take about 46 s \(around \d\d:\d\d; validation not included\)", messages[first_at])
    # after epoch 3: the last two epochs took 70 and 60 s, two epochs left: 130 s, about 2 min
    after_three = messages[messages.index(next(m for m in messages if m and m.startswith("epoch 3/5")))]
    assert "65 s per epoch with validation; 2 epoch(s) left, about 2 min" in after_three
    assert "epoch 4/5: 80 s per epoch with validation; 1 epoch(s) left, about 80 s" in estimate.last_message


def test_run_time_estimate_comes_after_two_minutes_when_iterations_are_slow_and_is_refined():
    """Issue 28: at 121 s per iteration the first estimate waited 20 iterations (40 min); it now comes at the end
    of the iteration running when 2 minutes have passed, and once more, refined, later."""
    from ignite.engine import Engine, Events

    from hmn.workflows import RunTimeEstimate

    now = [0.0]
    per_iteration = iter([121.0] + [60.0] * 100)  # the first iteration is the slowest (warm-up)

    def step(engine, batch):
        now[0] += next(per_iteration)

    trainer = Engine(step)
    estimate = RunTimeEstimate(clock=lambda: now[0])  # the bundles' defaults
    estimate.attach(trainer)
    seen = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(estimate.last_message))
    trainer.run(list(range(40)), max_epochs=2)
    assert seen[0].startswith("first estimate after 1 iteration(s): 121.00 s per training iteration; the remaining 79 "
                              "iterations take about 2.7 h")  # 79 x 121 s
    estimates = [i for i, m in enumerate(seen) if m and m != seen[i - 1] and "iteration(s):" in m]
    assert estimates == [0, 29]  # refined after 3 x 10 iterations (the epoch's own estimate follows at its end)
    expected = (121.0 + 29 * 60.0) / 30  # the mean so far
    assert seen[29].startswith(f"estimate after 30 iteration(s): {expected:.2f} s per training iteration; the remaining 50 ")


def test_a_new_run_refuses_a_folder_holding_an_earlier_run(tmp_path):
    _run_segment(tmp_path, [0.6, 0.9], max_epochs=2, resume=False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(FileExistsError, match=r"already holds a run \(checkpoint_epoch=2\.pt, model\.pt\).*--resume True"):
        _run_segment(tmp_path, [0.1, 0.2], max_epochs=2, resume=False)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing touched


def test_resume_trims_history_rows_of_epochs_without_a_checkpoint_at_once(tmp_path):
    from ignite.engine import Engine

    from hmn.durable import partial_path
    from hmn.workflows import ResumeFromLatest

    ckpt = tmp_path / "models"
    _run_segment(ckpt, [0.6, 0.9], max_epochs=1, resume=False)
    history = tmp_path / "history.csv"
    history.write_text("epoch,elapsed_s,val_auc\n1,10.0,0.6\n2,20.0,0.9\n")  # epoch 2 validated, then stopped
    open(partial_path(history), "w").write("epoch,elapsed_s,val_auc\n1,10.0,0.6\n2,20.0,0.9\n3,3")
    resume = ResumeFromLatest(str(ckpt), {"model": torch.nn.Linear(1, 1, bias=False)}, enabled=True, history=str(history))
    resume.attach(Engine(lambda e, b: None))
    assert resume.loaded_epoch == 1
    assert history.read_text().splitlines() == ["epoch,elapsed_s,val_auc", "1,10.0,0.6"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.csv", "models"]


def test_run_time_estimate_of_a_resumed_run_counts_its_own_iterations():
    from ignite.engine import Engine, Events

    from hmn.workflows import RunTimeEstimate

    now = [0.0]

    def step(engine, batch):
        now[0] += 2.0

    trainer = Engine(step)
    estimate = RunTimeEstimate(after_iterations=3, clock=lambda: now[0])
    estimate.attach(trainer)

    @trainer.on(Events.STARTED)
    def _restore(engine):  # attached after the estimate, as the bundles' resume is: epoch 2 of 4 done
        engine.state.iteration, engine.state.epoch = 10, 2

    seen = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(estimate.last_message))
    trainer.run(list(range(5)), max_epochs=4)
    assert seen[:2] == [None, None]  # three iterations of this process, not 13
    assert seen[2].startswith("first estimate after 3 iteration(s): 2.00 s per training iteration; the remaining 7 "
                              "iterations take about 14 s (around ")
    assert estimate.last_message.startswith("epoch 3/4: 10 s per epoch with validation; 1 epoch(s) left")


class TestCachePlan:
    """The bundles' default cache ("auto") sized against the memory available, before anything is cached."""

    GB = 10**9

    @pytest.fixture(autouse=True)
    def _fresh(self, monkeypatch):
        import hmn.workflows.data as t

        monkeypatch.setattr(t, "_CACHE_RESERVED", [])
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)

    def _plan(self, monkeypatch, avail_gb, n, shape=(1, 224, 224), cache="auto", disk_gb=1000.0, tmp="/tmp"):
        import shutil
        from collections import namedtuple

        import hmn.workflows.data as t

        monkeypatch.setattr(t, "available_memory", lambda: int(avail_gb * self.GB))
        usage = namedtuple("usage", "total used free")
        monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(0, 0, int(disk_gb * self.GB)))
        return t.cache_plan(n, shape, cache, tmp, "training data")

    def test_chestxray14_training_split_goes_to_disk_on_a_24_gb_machine(self, monkeypatch, caplog):
        # 78,468 images (ChestX-ray14's train_val less validation) x 1x224x224 float32 = 15.7 GB on disk, and in
        # memory 2x that (what a cached image was measured to take): beyond a 24 GB machine
        size = 78468 * 4 * 224 * 224
        assert size == pytest.approx(15.75 * self.GB, rel=0.01)
        with caplog.at_level("INFO"):
            assert self._plan(monkeypatch, 20, 78468) == "persistent"
        assert "float32 = 15.75 GB, about 31.5 GB resident in memory" in caplog.text
        assert self._plan(monkeypatch, 20, 78468, disk_gb=17.4) == "persistent"  # the disk needs the float32 size
        assert self._plan(monkeypatch, 20, 78468, disk_gb=10) == "none"  # neither memory nor disk has room

    def test_the_plan_counts_the_measured_resident_size_not_the_float32_size(self, monkeypatch):
        import hmn.workflows.data as t

        n = 10_000  # 2.0 GB of float32 images, 4.0 GB resident
        assert t.CACHE_RESIDENT_FACTOR == 2.0
        assert self._plan(monkeypatch, 7, n) == "persistent"  # 2.0 GB < 3.5 GB, but 4.0 GB > 3.5 GB
        assert self._plan(monkeypatch, 9, n) == "memory"  # 4.0 GB <= 4.5 GB

    def test_a_small_split_stays_in_memory_and_reserves_its_share(self, monkeypatch):
        import hmn.workflows.data as t

        n = 10_000  # 4.0 GB resident at 224x224
        assert self._plan(monkeypatch, 20, n) == "memory"
        assert t._CACHE_RESERVED == [int(n * 4 * 224 * 224 * 2.0)]
        # the next split sees the room the first one took (20 - 4.0 = 16 GB, half of it 8.0 GB): 21,000 images
        # (8.4 GB resident) do not fit there, though they would have in half of the 20 GB
        assert self._plan(monkeypatch, 20, 21_000) == "persistent"
        t._CACHE_RESERVED.clear()
        assert self._plan(monkeypatch, 20, 21_000) == "memory"

    def test_processes_of_a_torchrun_node_share_the_memory(self, monkeypatch):
        assert self._plan(monkeypatch, 20, 21_000) == "memory"
        import hmn.workflows.data as t

        t._CACHE_RESERVED.clear()
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # 5 GB each, half of it 2.5 GB
        assert self._plan(monkeypatch, 20, 21_000) == "persistent"

    def test_explicit_memory_is_refused_when_it_cannot_fit(self, monkeypatch):
        with pytest.raises(ValueError, match=r"needs about 31\.5 GB of memory \(78468 images x 1x224x224 float32 = "
                                             r"15\.75 GB, .*2x the images' size, as measured\) but about 20\.0 GB "
                                             r".*--cache persistent \(a disk cache of about 15\.7 GB.*--cache none"):
            self._plan(monkeypatch, 20, 78468, cache="memory")
        assert self._plan(monkeypatch, 40, 78468, cache="memory") == "memory"  # fits, though beyond auto's share

    def test_given_modes_pass_through(self, monkeypatch):
        assert self._plan(monkeypatch, 0.001, 10**6, cache="none") == "none"
        assert self._plan(monkeypatch, 0.001, 10**6, cache="persistent") == "persistent"
        with pytest.raises(ValueError, match="cache='ram'; accepted: auto, none, memory, persistent"):
            self._plan(monkeypatch, 1, 1, cache="ram")


def test_amp_kwargs_accepts_the_two_autocast_types():
    assert amp_kwargs("bfloat16") == {"dtype": torch.bfloat16}
    assert amp_kwargs(" Float16 ") == {"dtype": torch.float16}
    assert amp_kwargs(torch.bfloat16) == {"dtype": torch.bfloat16}
    with pytest.raises(ValueError, match=r"amp_dtype='float32' is not accepted; use one of \('bfloat16', 'float16'\)"):
        amp_kwargs("float32")


@pytest.mark.numerics
def test_channels_last_network_computes_the_same_and_saves_a_loadable_state():
    def build():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                   torch.nn.Conv2d(8, 4, 3, stride=2), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())

    plain, nhwc = to_device(build(), "cpu"), to_device(build(), "cpu", channels_last="true")
    # the 8 -> 4 convolution: a 1-channel weight is both layouts at once
    assert plain[3].weight.is_contiguous() and not plain[3].weight.is_contiguous(memory_format=torch.channels_last)
    assert nhwc[3].weight.is_contiguous(memory_format=torch.channels_last) and not nhwc[3].weight.is_contiguous()
    x = torch.randn(3, 1, 17, 19)
    torch.testing.assert_close(nhwc(x), plain(x), rtol=1e-5, atol=1e-6)
    fresh = build()
    fresh.load_state_dict(nhwc.state_dict())
    torch.testing.assert_close(fresh.eval()(x), plain.eval()(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="channels_last='maybe' is not a boolean"):
        to_device(build(), "cpu", channels_last="maybe")


def test_default_num_workers_none_on_the_cpu_shared_among_processes_with_cuda(monkeypatch):
    from hmn.workflows import default_num_workers

    assert default_num_workers(cuda=False, cpus=64) == 0
    assert default_num_workers(cuda=True, cpus=16, local_processes=1) == 8  # capped
    assert default_num_workers(cuda=True, cpus=16, local_processes=4) == 3  # 4 CPUs each, one for the main process
    assert default_num_workers(cuda=True, cpus=2, local_processes=1) == 1
    assert default_num_workers(cuda=True, cpus=4, local_processes=8) == 1  # never 0 with CUDA
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert default_num_workers(cuda=True, cpus=10) == 4


def test_resumable_sampler_orders_each_epoch_by_seed_and_epoch_and_skips_into_it():
    """Issue 28: a run stopped mid-epoch continues with the rest of that epoch's order. Each epoch's order is torch's
    DistributedSampler's documented one (randperm from a generator seeded seed + epoch), computed here directly."""
    from hmn.workflows import ResumableSampler

    data = list(range(23))
    sampler = ResumableSampler(data, shuffle=True, seed=7)
    for epoch in (1, 2):
        sampler.set_epoch(epoch)
        expected = torch.randperm(23, generator=torch.Generator().manual_seed(7 + epoch)).tolist()
        assert list(sampler) == expected and len(sampler) == 23
        sampler.skip(3 * 4)  # three batches of four done
        assert list(sampler) == expected[12:]
        assert list(sampler) == expected  # the skip applies to the next pass only
    assert list(sampler) != list(range(23))
    with pytest.raises(ValueError, match="cannot skip 24 items of an epoch of 23"):
        sampler.skip(24)
    # batches from a DataLoader over it: the rest of the epoch's batches, the same batches
    loader = torch.utils.data.DataLoader(data, batch_size=4, sampler=sampler)
    sampler.set_epoch(3)
    whole = [b.tolist() for b in loader]
    sampler.skip(2 * 4)
    assert [b.tolist() for b in loader] == whole[2:] and len(loader) == 6


def test_mid_epoch_checkpoints_take_their_place_among_the_epoch_checkpoints(tmp_path):
    from hmn.workflows import full_state_checkpoints, mid_epoch_checkpoints

    for name in ("checkpoint_epoch=2.pt", "checkpoint_iteration=25.pt", "checkpoint_iteration=9.pt",
                 "checkpoint_epoch=1.pt", "checkpoint_iteration=x.pt", "model.pt"):
        (tmp_path / name).write_bytes(b"")
    assert [os.path.basename(p) for _, p in mid_epoch_checkpoints(str(tmp_path))] == [
        "checkpoint_iteration=25.pt", "checkpoint_iteration=9.pt"]
    # 10 iterations per epoch: epoch 2 ends at iteration 20, so iteration 25 (epoch 3, half done) is the newest
    assert [(i, os.path.basename(p)) for i, p in full_state_checkpoints(str(tmp_path), 10)] == [
        (25, "checkpoint_iteration=25.pt"), (20, "checkpoint_epoch=2.pt"), (10, "checkpoint_epoch=1.pt"),
        (9, "checkpoint_iteration=9.pt")]
    # 20 iterations per epoch: epoch 2 ends at 40, after iteration 25
    assert [os.path.basename(p) for _, p in full_state_checkpoints(str(tmp_path), 20)][:2] == [
        "checkpoint_epoch=2.pt", "checkpoint_iteration=25.pt"]


def test_a_mid_epoch_checkpoint_of_another_epoch_length_is_refused_naming_it(tmp_path):
    from ignite.engine import Engine

    from hmn.durable import atomic_torch_save
    from hmn.workflows import ResumeFromLatest

    net = torch.nn.Linear(1, 1, bias=False)
    path = tmp_path / "checkpoint_iteration=13.pt"
    atomic_torch_save({"model": net.state_dict(), "trainer": {"iteration": 13, "epoch_length": 10, "max_epochs": 3}}, path)
    trainer = Engine(lambda e, b: None)
    resume = ResumeFromLatest(str(tmp_path), {"model": net, "trainer": trainer}, enabled=True)
    resume.attach(trainer)
    with pytest.raises(ValueError, match=r"checkpoint_iteration=13\.pt stopped in the middle of epoch 2 of a run with 10 "
                                         r"iterations per epoch, and this run has 7"):
        trainer.run(list(range(7)), max_epochs=3)
