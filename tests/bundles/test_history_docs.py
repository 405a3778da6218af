"""The bundle docs name exactly the columns ``history.csv`` has: the file is written here by MetricHistory on an
ignite validator driven by hand (no training), and its header is compared with the generated docs text."""

from __future__ import annotations

import csv
import re

import pytest
import torch
from ignite.engine import Engine, Events

from hmn.bundle import BUNDLES, is_volume_bundle, train_config
from hmn.bundle.docs import bundle_readme
from hmn.workflows import EpochLoss, MetricHistory

NAMES_2D = [n for n in BUNDLES if not is_volume_bundle(n)]


def _written_header(tmp_path, metric_names):
    """The header of the history.csv MetricHistory writes after one epoch of a hand-driven trainer and validator
    with the given validation metrics."""
    trainer = Engine(lambda engine, batch: [{"loss": torch.tensor(batch)}])  # SupervisedTrainer's output shape
    loss = EpochLoss()
    loss.attach(trainer)
    trainer.run([0.9, 0.5], max_epochs=1)

    validator = Engine(lambda engine, batch: None)

    @validator.on(Events.EPOCH_COMPLETED)
    def metrics(engine):  # what the validator's metrics leave in state.metrics when an epoch completes
        engine.state.metrics.update({name: 0.5 + i / 10 for i, name in enumerate(metric_names)})
        engine.state.metrics["per_class_table"] = [0.1, 0.2]  # not a scalar: not a column

    path = tmp_path / "history.csv"
    MetricHistory(str(path), loss=loss, plot=False).attach(validator)
    validator.run([0], max_epochs=1)
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert len(rows) == 2 and float(rows[1][2]) == pytest.approx(0.7)  # one row; the epoch's mean loss
    return rows[0]


def _documented(text):
    """The header line and the list of backticked column names the docs give for runs/history.csv."""
    m = re.search(r"`runs/history\.csv` \(one row per validation, header `([^`]*)`: (.*?)\),\s*TensorBoard", text,
                  re.S)
    assert m, "the docs do not give history.csv's header"
    named = re.findall(r"`([^`]+)`", re.sub(r"\([^()]*\)", "", m.group(2)))  # the names, without their notes
    return m.group(1).split(","), named


@pytest.mark.parametrize("name", NAMES_2D[:1] + NAMES_2D[-1:])
def test_docs_name_exactly_the_columns_history_csv_has(tmp_path, name):
    train = train_config(name)
    # the validator's metrics as the bundle's train config defines them (its key metric; no additional metrics)
    validate = train["validate"]
    assert validate["evaluator"]["key_val_metric"] == "@validate#key_metric"
    assert "additional_metrics" not in validate["evaluator"], "the validator has more metrics: add them here"
    header = _written_header(tmp_path, list(validate["key_metric"]))
    assert header[:2] == ["epoch", "elapsed_s"] and "val_auc" in header  # the file as the issue saw it

    documented_header, named = _documented(bundle_readme(name, BUNDLES[name], train))
    assert documented_header == header
    assert named == header
