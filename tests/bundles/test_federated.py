"""The bundles under MONAI FL (monai.fl.client.MonaiAlgo, which NVFlare drives): two sites, two rounds, as a
hospital federation runs them. MonaiAlgo builds the bundle's train.json itself and calls ``trainer.run()``
without the bundle's ``training`` step list, so everything a run does must be attached to the trainer."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from hmn.bundle import is_volume_bundle as is_3d

ROOT = Path(__file__).resolve().parents[2]
SIZE, SIZE_3D, SPACING_3D = 64, [32, 32, 16], [3.0, 3.0, 6.0]  # as conftest.py's (not importable from here)


def _site_datalists(datalist: str, folder: Path, n_sites: int, per_site: tuple[int, int | None, int]) -> list[str]:
    """Disjoint shares of the demo datalist, one per site (each hospital has its own images)."""
    from hmn.data import load_datalist

    data = load_datalist(datalist)  # image paths made absolute (they are relative to the datalist's folder)
    n_train, n_val, n_test = per_site
    paths = []
    for site in range(n_sites):
        share = {"class_names": data["class_names"],
                 "training": data["training"][site * n_train:(site + 1) * n_train],
                 # None: every site validates on the whole validation split (the 40-volume demo's is too small to
                 # share out with positives of some finding at each site)
                 "validation": data["validation"] if n_val is None else data["validation"][site * n_val:(site + 1) * n_val],
                 "test": data["test"][site * n_test:(site + 1) * n_test]}
        path = folder / f"site{site}.json"
        path.write_text(json.dumps(share))
        paths.append(str(path))
    return paths


@pytest.mark.parametrize("name", ["convnext_tiny", pytest.param("convnext3d_tiny", marks=pytest.mark.slow)])
def test_two_sites_two_rounds_of_fedavg_with_monai_algo(name, request, tmp_path):
    from monai.fl.client import MonaiAlgo
    from monai.fl.utils.constants import ExtraItems, ModelType, WeightType
    from monai.fl.utils.exchange_object import ExchangeObject

    datalist = request.getfixturevalue("demo3d_datalist" if is_3d(name) else "demo_datalist")
    if is_3d(name):
        overrides = {"image_size": list(SIZE_3D), "spacing": list(SPACING_3D), "batch_size": 2}
        per_site = (6, None, 2)
    else:
        overrides = {"image_size": SIZE, "batch_size": 4}
        per_site = (8, 6, 4)
    overrides.update(num_workers=0, cache="none")
    sites = []
    for site, site_datalist in enumerate(_site_datalists(datalist, tmp_path, 2, per_site)):
        root = tmp_path / f"site{site}"
        shutil.copytree(ROOT / "bundles" / name, root)
        kwargs = {**overrides, "datalist": site_datalist}
        algo = MonaiAlgo(bundle_root=str(root), local_epochs=1, train_kwargs=dict(kwargs), eval_kwargs=dict(kwargs))
        algo.initialize(extra={ExtraItems.CLIENT_NAME: f"site{site}"})
        sites.append((root, algo))

    # MonaiAlgo builds each workflow once before it sets bundle_root, with the repository's bundle folder as the
    # root: no lock may be taken there (it would hold that folder against a real training for the process's life)
    assert not (ROOT / "bundles" / name / "models" / ".hmn.lock").exists()
    global_weights = {k: v.detach().clone() for k, v in sites[0][1].trainer.network.state_dict().items()}
    float_keys = [k for k, v in global_weights.items() if v.is_floating_point()]
    for round_ in (1, 2):
        diffs = []
        for root, algo in sites:
            algo.train(ExchangeObject(weights=global_weights, weight_type=WeightType.WEIGHTS))
            assert algo.trainer.state.epoch == round_  # one local epoch per round, continuing the same trainer
            update = algo.get_weights()
            assert update.weight_type == WeightType.WEIGHT_DIFF
            # the difference is the local weights after training minus the global weights sent (the round trip)
            local = algo.trainer.network.state_dict()
            for k in float_keys:
                torch.testing.assert_close(update.weights[k], local[k].cpu() - global_weights[k], rtol=0, atol=1e-6)
            assert any(update.weights[k].abs().max() > 0 for k in float_keys)  # it trained
            diffs.append(update.weights)
        # FedAvg over the two sites, by hand (the server's job)
        global_weights = {k: (v + sum(d[k] for d in diffs) / len(diffs)) if k in float_keys else v
                          for k, v in global_weights.items()}
        for root, algo in sites:
            metrics = algo.evaluate(ExchangeObject(weights=global_weights, weight_type=WeightType.WEIGHTS)).metrics
            assert metrics and all(math.isfinite(v) for v in metrics.values()), metrics

    for site, (root, algo) in enumerate(sites):
        models = root / "models"
        # the run record, so that a later evaluation or inference preprocesses as the model was trained
        record = json.loads((models / "run.json").read_text())["settings"]
        assert record["image_size"] == overrides["image_size"]
        assert record["datalist"] == str(tmp_path / f"site{site}.json")
        # BEST_MODEL (models/model.pt, promoted from its staged file) and FINAL_MODEL (models/model_final.pt)
        best = algo.get_weights(extra={ExtraItems.MODEL_TYPE: ModelType.BEST_MODEL})
        final = algo.get_weights(extra={ExtraItems.MODEL_TYPE: ModelType.FINAL_MODEL})
        assert best.weight_type == final.weight_type == WeightType.WEIGHTS
        assert best.weights.keys() == final.weights.keys() == global_weights.keys()
        # the final model is the network as the second round's local training left it (the test report after each
        # round loaded model.pt into the same network and gave the final weights back)
        current = algo.trainer.network.state_dict()
        assert all(torch.equal(final.weights[k], current[k].cpu()) for k in final.weights)
        assert not list(models.glob(".*.staged"))
        assert (root / "runs" / "eval" / "metrics.json").is_file()  # the end-of-training report on the site's test split
        algo.finalize()
        assert not (models / ".hmn.lock").exists()  # finalize released the site's models folder
