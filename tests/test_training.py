"""Bundle support code: label masks, datalist resolution, checkpoint discovery, boolean overrides."""

from __future__ import annotations

import pytest
import torch

from hmn.losses import MultiLabelBCELoss
from hmn.training import as_bool, label_tensor, latest_checkpoint, resolve_datalist


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
