"""EvaluationReportHandler on real SupervisedEvaluator runs: the written report against an independent computation;
prediction gathering across torchrun ranks (two gloo processes)."""

from __future__ import annotations

import csv
import json
import logging
import math
import os

import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset, MetaTensor
from monai.engines import SupervisedEvaluator

from hmn.handlers import EvaluationReportHandler, PredictionCSVWriter

CLASSES = ["Cardiomegaly", "Effusion", "Nodule"]
N = 12


def pair_auc(scores, positive) -> float:
    s, y = np.asarray(scores, float), np.asarray(positive, bool)
    return float(np.mean([1.0 if a > b else 0.5 if a == b else 0.0 for a in s[y] for b in s[~y]]))


def _network(outputs=3, sigmoid=False):
    torch.manual_seed(0)
    layers = [torch.nn.Flatten(), torch.nn.Linear(16, outputs)] + ([torch.nn.Sigmoid()] if sigmoid else [])
    return torch.nn.Sequential(*layers).eval()


def _items(with_error=False, with_mask=False):
    g = torch.Generator().manual_seed(1)
    items = []
    for i in range(N):
        label = torch.tensor([float((i + c) % 3 == 0) for c in range(3)])
        item = {
            "image": MetaTensor(torch.rand(1, 4, 4, generator=g), meta={"filename_or_obj": f"/data/p{i:02d}/img.png"}),
            "label": label,
        }
        if with_error:
            item["error"] = "/data/p03/img.png: truncated file" if i == 3 else ""
        if with_mask:
            item["label_mask"] = torch.tensor([0.0 if (i == 2 and c == 0) else 1.0 for c in range(3)])
        items.append(item)
    return items


BATCH = 5  # the evaluators' DataLoader batch size


def _outputs_in_loader_batches(network, items):
    """The network's outputs for `items`, computed here without the evaluator but in its batches of BATCH (5, 5, 2):
    a float32 output moves by an ulp or so with the shape of the batch it is computed in (the CPU's matrix-product
    kernels block a batch of 12 and one of 5 differently, per instruction set), so the same batches make these the
    evaluator's outputs exactly, on any CPU."""
    images = torch.stack([i["image"].as_tensor() for i in items])
    with torch.no_grad():
        return torch.cat([network(images[s : s + BATCH]) for s in range(0, len(images), BATCH)])


def _run(handler, items, decollate=True, network=None):
    network = network if network is not None else _network()
    loader = DataLoader(Dataset(items), batch_size=BATCH, num_workers=0)
    evaluator = SupervisedEvaluator(
        device="cpu", val_data_loader=loader, network=network, val_handlers=[handler], decollate=decollate
    )
    evaluator.run()
    return evaluator, network


def _read(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


@pytest.mark.numerics
@pytest.mark.parametrize("decollate", [True, False])
def test_report_from_a_supervised_evaluator(tmp_path, decollate, caplog):
    items = _items()
    handler = EvaluationReportHandler(tmp_path / "report", CLASSES, n_bootstrap=100, seed=0, min_positives=1)
    caplog.set_level(logging.INFO, logger="hmn.handlers")
    evaluator, net = _run(handler, items, decollate=decollate)

    # independent of the handler: the same network on the same images, and the report's float64 sigmoid
    probs = torch.sigmoid(_outputs_in_loader_batches(net, items).double()).numpy()
    labels = torch.stack([i["label"] for i in items]).numpy()

    header, rows = _read(tmp_path / "report" / "predictions.csv")
    assert header[:3] == ["image", "Cardiomegaly_prob", "Cardiomegaly_label"] and len(header) == 7
    assert [r[0] for r in rows] == [f"/data/p{i:02d}/img.png" for i in range(N)]
    got = np.array([[float(r[1 + 2 * c]) for c in range(3)] for r in rows])
    np.testing.assert_allclose(got, probs, rtol=1e-6)
    assert [[int(r[2 + 2 * c]) for c in range(3)] for r in rows] == labels.astype(int).tolist()

    header, rows = _read(tmp_path / "report" / "metrics.csv")
    table = {r[0]: dict(zip(header, r)) for r in rows}
    assert list(table) == CLASSES + ["macro", "micro"]
    expected = [pair_auc(probs[:, c], labels[:, c] == 1) for c in range(3)]
    for c, name in enumerate(CLASSES):
        assert float(table[name]["auc"]) == pytest.approx(expected[c])
        assert int(table[name]["n"]) == N and int(table[name]["positives"]) == labels[:, c].sum()
        assert float(table[name]["auc_ci_low"]) <= float(table[name]["auc"]) <= float(table[name]["auc_ci_high"])
    assert float(table["micro"]["auc"]) == pytest.approx(pair_auc(probs.ravel(), labels.ravel() == 1))

    with open(tmp_path / "report" / "metrics.json") as f:
        saved = json.load(f)
    assert saved["settings"]["n_bootstrap"] == 100 and saved["n_images"] == N
    assert (tmp_path / "report" / "roc.png").stat().st_size > 10_000
    assert evaluator.state.metrics["macro_auc"] == pytest.approx(np.mean(expected))
    assert handler.report["macro"]["auc"] == pytest.approx(np.mean(expected))
    assert "macro AUC" in caplog.text


def test_probabilities_num_classes_mask_and_skipped_items(tmp_path):
    items = _items(with_error=True, with_mask=True)
    net = _network(outputs=5, sigmoid=True)  # 3 fine probabilities, then 2 "coarse" ones
    handler = EvaluationReportHandler(tmp_path, CLASSES, apply_sigmoid=False, num_classes=3, n_bootstrap=0)
    _run(handler, items, network=net)
    probs = _outputs_in_loader_batches(net, items)[:, :3].double().numpy()
    _, rows = _read(tmp_path / "predictions.csv")
    kept = [i for i in range(N) if i != 3]
    assert [r[0] for r in rows] == [f"/data/p{i:02d}/img.png" for i in kept]
    np.testing.assert_allclose([[float(r[1 + 2 * c]) for c in range(3)] for r in rows], probs[kept], rtol=1e-6)
    assert rows[2][2] == ""  # item 2's Cardiomegaly label is masked: unknown
    report = handler.report
    assert report["per_class"][0]["n"] == N - 2 and report["per_class"][1]["n"] == N - 1
    assert report["skipped_images"] == [{"image": "/data/p03/img.png", "error": "/data/p03/img.png: truncated file"}]


def test_clear_errors(tmp_path):
    items = [{k: v for k, v in i.items() if k != "label"} for i in _items()]
    with pytest.raises(ValueError, match="needs labels"):
        _run(EvaluationReportHandler(tmp_path, CLASSES, n_bootstrap=0), items)
    with pytest.raises(ValueError, match="has 5 values but there are 3 class_names; set num_classes=3"):
        _run(EvaluationReportHandler(tmp_path, CLASSES, n_bootstrap=0), _items(), network=_network(outputs=5))
    with pytest.raises(ValueError, match="num_classes=4 but 3 class_names"):
        EvaluationReportHandler(tmp_path, CLASSES, num_classes=4)


def _distributed_worker(rank, world, init_file, out_dir, result_queue):
    import types

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        items = _items()[rank::world]  # each rank sees its own share, as under a DistributedSampler
        handler = EvaluationReportHandler(out_dir, CLASSES, n_bootstrap=0)
        engine = types.SimpleNamespace(state=types.SimpleNamespace(metrics={}))
        for start in range(0, len(items), 2):
            chunk = items[start : start + 2]
            engine.state.batch = chunk
            engine.state.output = [{"pred": i["image"].reshape(-1)[:3] * 4 - 2, "label": i["label"]} for i in chunk]
            handler.collect(engine)
        writer = PredictionCSVWriter(os.path.join(out_dir, "pred.csv"), CLASSES)
        writer.write(engine)  # one CSV per rank
        result_queue.put((rank, handler.finalize(engine) is not None, os.path.basename(writer.path)))
    finally:
        torch.distributed.destroy_process_group()


def _metric_worker(rank, world, init_file, result_queue):
    from hmn.handlers import MacroROCAUC

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        items = _items()[:11][rank::world]  # 11 images: shares of 6 and 5, as DistributedSampler(even_divisible=False)
        metric = MacroROCAUC()
        for item in items:
            metric.update((item["image"].reshape(1, -1)[:, :3].as_tensor(), item["label"].reshape(1, -1)))
        result_queue.put((rank, metric.compute()))
    finally:
        torch.distributed.destroy_process_group()


def test_macro_roc_auc_gathers_uneven_shares_of_processes(tmp_path):
    import multiprocessing

    from hmn.evaluation import macro_auc

    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_metric_worker, args=(r, 2, tmp_path / "init", queue)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    items = _items()[:11]
    want, _ = macro_auc(torch.stack([i["image"].reshape(-1)[:3] for i in items]).numpy(),
                        torch.stack([i["label"] for i in items]).numpy())
    assert sorted(queue.get(timeout=5) for _ in range(2)) == [(0, pytest.approx(want, abs=1e-12)), (1, pytest.approx(want, abs=1e-12))]


def test_ranks_are_gathered_and_rank_0_writes(tmp_path):
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_distributed_worker, args=(r, 2, tmp_path / "init", tmp_path / "out", queue))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert sorted(queue.get(timeout=5) for _ in range(2)) == [(0, True, "pred.rank0.csv"), (1, False, "pred.rank1.csv")]
    _, rows = _read(tmp_path / "out" / "predictions.csv")
    assert sorted(r[0] for r in rows) == [f"/data/p{i:02d}/img.png" for i in range(N)]
    logits = torch.stack([i["image"].reshape(-1)[:3] * 4 - 2 for i in _items()]).double()
    by_image = {r[0]: [float(r[1]), float(r[3]), float(r[5])] for r in rows}
    got = np.array([by_image[f"/data/p{i:02d}/img.png"] for i in range(N)])
    np.testing.assert_allclose(got, torch.sigmoid(logits).numpy(), rtol=1e-12)


def test_macro_roc_auc_key_metric_leaves_out_a_class_without_positives_and_masked_labels():
    """The bundles' validation key metric on a SupervisedEvaluator: class 2 has no positive in this split
    (MONAI's macro ROCAUC gives NaN for the whole epoch), and class 0 has masked (-1) labels."""
    from monai.handlers import ROCAUC, from_engine

    from hmn.handlers import MacroROCAUC

    items = _items()
    for i, item in enumerate(items):
        item["label"] = item["label"].clone()
        item["label"][2] = 0.0
        if i % 4 == 1:
            item["label"][0] = -1.0
    loader = DataLoader(Dataset(items), batch_size=BATCH, num_workers=0)
    network = _network()
    evaluator = SupervisedEvaluator(
        device="cpu", val_data_loader=loader, network=network,
        key_val_metric={"val_auc": MacroROCAUC()},
        additional_metrics={"monai_auc": ROCAUC(average="macro", output_transform=from_engine(["pred", "label"]))},
    )
    evaluator.run()
    scores = _outputs_in_loader_batches(network, items).numpy()  # the evaluator's scores: the same batches
    labels = np.stack([it["label"].numpy() for it in items])
    known = labels[:, 0] >= 0
    want = np.mean([pair_auc(scores[known, 0], labels[known, 0] == 1), pair_auc(scores[:, 1], labels[:, 1] == 1)])
    assert evaluator.state.metrics["val_auc"] == pytest.approx(want, abs=1e-12)
    assert math.isnan(evaluator.state.metrics["monai_auc"])  # the fault this metric replaces


class _State:
    def __init__(self, epoch, best_epoch, best=0.8):
        self.epoch, self.best_metric_epoch, self.best_metric = epoch, best_epoch, best
        self.output = self.batch = None


class _Engine:
    def __init__(self, epoch, best_epoch):
        self.state = _State(epoch, best_epoch)


def test_validation_thresholds_are_recorded_with_the_best_model_and_promoted_with_it(tmp_path):
    """The validation split's Youden and operating-point thresholds are written (staged) only for a new best
    validation, leave out unreadable items, and become thresholds.json together with model.pt; a best model
    promoted without thresholds removes the old file instead of pairing it with another model."""
    from hmn.checkpoints import AtomicCheckpointSaver
    from hmn.evaluation import load_thresholds, select_thresholds
    from hmn.handlers import ValidationThresholds

    rng = np.random.default_rng(0)
    probs = rng.random((40, 2))
    labels = (rng.random((40, 2)) < probs).astype(float)
    labels[3, 1] = -1  # unknown
    handler = ValidationThresholds(tmp_path, ["A", "B"])
    for best_epoch, epoch in ((1, 2), (3, 3)):  # epoch 2 is no new best; epoch 3 is
        engine = _Engine(epoch, best_epoch)
        handler.reset()
        for start in range(0, 40, 8):
            engine.state.output = [{"pred": torch.tensor(probs[i]), "label": torch.tensor(labels[i])}
                                   for i in range(start, start + 8)]
            engine.state.batch = [{"error": ""} for _ in range(8)]
            handler.collect(engine)
        engine.state.output = [{"pred": torch.tensor([0.99, 0.01]), "label": torch.tensor([-1.0, -1.0])}]
        engine.state.batch = [{"error": "bad.png: truncated"}]
        handler.collect(engine)
        written = handler.record(engine)
        assert (written is None) == (epoch == 2)
    staged = tmp_path / ".thresholds.json.epoch=3.staged"
    record = json.loads(staged.read_text())
    assert record["epoch"] == 3 and record["n_images"] == 40 and record["n_left_out"] == 1
    want = select_thresholds(probs, np.where(labels < 0, np.nan, labels))
    np.testing.assert_array_equal(load_thresholds(staged, ["A", "B"]), want)

    saver = AtomicCheckpointSaver(str(tmp_path), {"model": torch.nn.Linear(1, 1)}, save_key_metric=True,
                                  key_metric_filename="model.pt", stage_key_metric=True)
    (tmp_path / ".model.pt.epoch=3.staged").write_bytes(b"weights of epoch 3")
    saver.promote(3)
    assert (tmp_path / "model.pt").read_bytes() == b"weights of epoch 3"
    assert json.loads((tmp_path / "thresholds.json").read_text())["epoch"] == 3 and not staged.exists()
    (tmp_path / ".model.pt.epoch=5.staged").write_bytes(b"weights of epoch 5")  # no thresholds staged with it
    saver.promote(5)
    assert (tmp_path / "model.pt").read_bytes() == b"weights of epoch 5" and not (tmp_path / "thresholds.json").exists()
