"""hmn.runs: the run record written, read back, and compared with the settings a workflow is about to use."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hmn.runs import RunRecordMismatchError, check_classes, check_run_record, read_run_record, trained, write_run_record

SETTINGS = {"class_names": ("Effusion", "Mass"), "image_size": np.int64(128), "backbone": "convnext_tiny",
            "backbone_options": {"norm": "batch"}, "voi": "apply", "max_epochs": 2, "learning_rate": 2e-4}


def test_record_is_written_read_and_updated_on_resume(tmp_path):
    path = write_run_record(tmp_path, SETTINGS)
    record = json.load(open(path))
    assert record["settings"]["class_names"] == ["Effusion", "Mass"] and record["settings"]["image_size"] == 128
    assert record["starts"][0]["resume"] is False and record["starts"][0]["changed"] == {}
    write_run_record(tmp_path, {**SETTINGS, "max_epochs": 4}, resume="True")
    again = read_run_record(tmp_path)
    assert again["created"] == record["created"] and again["settings"]["max_epochs"] == 4
    assert again["starts"][1] == {**again["starts"][1], "resume": True, "changed": {"max_epochs": [2, 4]}}
    write_run_record(tmp_path, SETTINGS)  # a new run replaces the record
    assert len(read_run_record(tmp_path)["starts"]) == 1


def test_trained_reads_the_record_only_when_asked(tmp_path):
    assert trained(tmp_path, "image_size", 224) == 224  # no record yet
    write_run_record(tmp_path, SETTINGS)
    assert trained(tmp_path, "image_size", 224) == 128
    assert trained(tmp_path, "image_size", 224, use="false") == 224
    assert trained(tmp_path, "dropout", 0.2) == 0.2  # not recorded


def test_contradicting_settings_are_refused_or_honoured_with_a_warning(tmp_path, caplog):
    write_run_record(tmp_path, SETTINGS)
    with caplog.at_level("INFO"):
        changed = check_run_record(tmp_path, {**SETTINGS, "image_size": 224, "max_epochs": 3})
    assert changed == {"image_size": [128, 224], "max_epochs": [2, 3]}
    assert "image_size=224 is used, but the model was trained with image_size=128" in caplog.text
    with pytest.raises(RunRecordMismatchError, match=r"trained with class_names=\['Effusion', 'Mass'\], not "
                                                     r"\['Mass', 'Effusion'\]; backbone='convnext_tiny', not 'resnet50'"):
        check_run_record(tmp_path, {**SETTINGS, "backbone": "resnet50", "class_names": ["Mass", "Effusion"]})
    assert check_run_record(tmp_path, {**SETTINGS, "backbone": "resnet50"}, use=False) == {}
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a readable run record"):
        check_run_record(tmp_path, SETTINGS)


def test_evaluation_refuses_a_datalist_with_other_classes():
    check_classes(["A", "B"], ["A", "B"])
    with pytest.raises(RunRecordMismatchError, match=r"predicts \['A', 'B'\] but data.json has class_names \['B', 'A'\]"):
        check_classes(["A", "B"], ["B", "A"], "data.json")


def test_packed_configs_describe_the_recorded_model():
    from hmn.bundle import inference_config, packed_inference_config, packed_metadata
    from hmn.bundle.metadata import metadata

    record = {"settings": {"class_names": ["Pleural effusion", "Enlarged heart"], "image_size": 48, "in_channels": 1,
                           "backbone_options": {}, "attention": ["self"], "hierarchical": False}}
    config = packed_inference_config(inference_config("convnext_tiny"), record, "ab" * 32)
    assert config["bundle_root"] == "." and config["model_sha256"] == "ab" * 32
    assert config["use_run_record"] is False
    assert config["image_size"] == "$hmn.runs.trained(@ckpt_dir, 'image_size', 48, @use_run_record)"
    assert config["class_names"].endswith("['Pleural effusion', 'Enlarged heart'], @use_run_record)")
    assert config["network_def"]["attention"] == "$hmn.runs.trained(@ckpt_dir, 'attention', ['self'], @use_run_record)"
    meta = packed_metadata(metadata("convnext_tiny"), record)["network_data_format"]
    assert meta["inputs"]["image"]["spatial_shape"] == [48, 48]
    assert meta["outputs"]["pred"] == {**meta["outputs"]["pred"], "num_channels": 2,
                                       "channel_def": {"0": "Pleural effusion", "1": "Enlarged heart"}}


def test_packed_configs_build_the_recorded_model_without_the_record(tmp_path):
    """monai.bundle.load builds network_def from a packed config wherever it is unpacked: with both workflow
    types, the recorded settings are the defaults, even class names MONAI would read as references."""
    from monai.bundle import ConfigParser

    from hmn.bundle import inference_config, packed_config, packed_inference_config, train_config

    classes = ["Effusion (L@R)", "Heart #2"]
    record = {"settings": {"class_names": classes, "image_size": 48, "backbone": "resnet50", "backbone_options": {},
                           "attention": ["self"], "hierarchical": False, "datalist": "/elsewhere/data.json"}}
    for config in (packed_config(train_config("convnext_tiny"), record, ""),
                   packed_inference_config(inference_config("convnext_tiny"), record, "")):
        parser = ConfigParser(config)
        parser["bundle_root"] = str(tmp_path)  # no run.json there
        assert parser.get_parsed_content("class_names") == classes
        assert parser.get_parsed_content("network_def#backbone") == "resnet50"
        assert parser.get_parsed_content("image_size") == 48
        assert parser.get_parsed_content("backbone_options") == {}
    assert "/elsewhere/data.json" not in json.dumps(packed_config(train_config("convnext_tiny"), record, ""))


def test_a_packed_bundle_refuses_other_weights(tmp_path):
    import hashlib

    from hmn.runs import check_model_file

    (tmp_path / "model.pt").write_bytes(b"the packed weights")
    sha = hashlib.sha256(b"the packed weights").hexdigest()
    check_model_file(tmp_path, sha)
    check_model_file(tmp_path, "")  # an unpacked bundle: nothing to check
    (tmp_path / "model.pt").write_bytes(b"other weights")
    with pytest.raises(RunRecordMismatchError, match=r"model\.pt is not the model this bundle was packed with"):
        check_model_file(tmp_path, sha)
    with pytest.raises(FileNotFoundError, match="pass --bundle_root"):
        check_model_file(tmp_path / "nowhere", sha)


def test_inference_builds_a_hierarchical_head_from_the_record(tmp_path):
    from monai.bundle import ConfigParser

    from hmn.bundle import inference_config

    classes = ["Atelectasis", "Effusion", "Edema"]
    (tmp_path / "models").mkdir()
    write_run_record(tmp_path / "models", {"class_names": classes, "image_size": 64, "hierarchical": True})
    parser = ConfigParser(inference_config("convnext_tiny"))
    parser["bundle_root"] = str(tmp_path)
    assert parser.get_parsed_content("hierarchical") is True
    assert parser.get_parsed_content("num_coarse_classes") > 0
    assert parser.get_parsed_content("class_names") == classes
