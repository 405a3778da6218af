"""The NVFlare example (examples/nvflare/job.py): two hospitals, two rounds of FedAvg in NVFlare's simulator, each
site training its own copy of the bundle on its own images, the server keeping the network the bundle defines."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("nvflare", reason="NVFlare is an optional extra: pip install -e '.[federated]'")

ROOT = Path(__file__).resolve().parents[2]
SIZE = 64  # as conftest.py's (not importable from here)
PER_SITE = (8, 6, 4)  # training, validation, test images per site: 2 iterations a round at batch 4 at every site


def _site_datalists(datalist: str, folder: Path) -> list[Path]:
    """Two disjoint shares of the demo datalist, one per site (each hospital its own images)."""
    from hmn.data import load_datalist

    data = load_datalist(datalist)  # image paths made absolute (they are relative to the datalist's folder)
    paths = []
    for site in range(2):
        share = {"class_names": data["class_names"]}
        for split, n in zip(("training", "validation", "test"), PER_SITE):
            share[split] = data[split][site * n:(site + 1) * n]
            assert len(share[split]) == n
        paths.append(folder / f"site{site + 1}.json")
        paths[-1].write_text(json.dumps(share))
    return paths


def _bundle_network(datalist: Path, overrides: dict, fresh_root: Path) -> torch.nn.Module:
    """The network the bundle's train.json defines with these overrides, built by MONAI's own parser."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(ROOT / "bundles" / "convnext_tiny" / "configs" / "train.json"))
    parser.update({**overrides, "datalist": str(datalist), "bundle_root": str(fresh_root)})
    return parser.get_parsed_content("network_def")


@pytest.mark.slow  # about 75 s on 2 cores (two site processes and the server); run it with -m slow
def test_two_sites_two_rounds_of_fedavg_in_the_nvflare_simulator(demo_datalist, tmp_path):
    from hmn.networks import HybridMedNet

    datalists = _site_datalists(demo_datalist, tmp_path)
    workdir = tmp_path / "nvf"
    cmd = [sys.executable, str(ROOT / "examples" / "nvflare" / "job.py"),
           "--bundle", str(ROOT / "bundles" / "convnext_tiny"),
           "--datalists", *map(str, datalists), "--rounds", "2", "--local_epochs", "1", "--workdir", str(workdir),
           "--image_size", str(SIZE), "--batch_size", "4", "--num_workers", "0", "--cache", "none",
           "--python", sys.executable]
    env = {k: v for k, v in os.environ.items() if k != "NVFLARE_SIMULATOR_WORKSPACE_ROOT"}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    # run from an empty folder: nothing of the job may depend on (or be written under) the working directory
    (tmp_path / "cwd").mkdir()
    out = subprocess.run(cmd, cwd=tmp_path / "cwd", env=env, capture_output=True, text=True, timeout=900)
    job = workdir / "simulator" / "hmn-fedavg-convnext_tiny"
    server_log = job / "server" / "log.txt"
    assert out.returncode == 0, (f"{' '.join(cmd)}\n--- stdout\n{out.stdout[-4000:]}\n--- stderr\n{out.stderr[-4000:]}"
                                 f"\n--- server log\n{server_log.read_text()[-4000:] if server_log.exists() else ''}")
    assert not list((tmp_path / "cwd").iterdir())

    # the server ran two rounds, each with both sites' results and their evaluations of the global model
    rounds = [json.loads(line) for line in
              (job / "server" / "simulate_job" / "metrics" / "round_metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1]
    for r in rounds:
        assert sorted(s["name"] for s in r["sites"]) == ["site-1", "site-2"]
        assert all(s["weight"] == 2.0 for s in r["sites"])  # FedAvg weight: 8 images / batch 4 iterations
        assert all("global_auc" in {m["name"] for m in s["metrics"]} for s in r["sites"])
    assert "Finished FedAvg" in server_log.read_text()

    finals = []
    for site, datalist in zip(("site-1", "site-2"), datalists):
        root = workdir / "sites" / site
        record = json.loads((root / "models" / "run.json").read_text())["settings"]
        assert record["image_size"] == SIZE and record["datalist"] == str(datalist)
        assert (root / "models" / "model.pt").is_file()
        # one local epoch per round, continuing the same trainer
        with open(root / "runs" / "history.csv", newline="") as f:
            assert [int(row["epoch"]) for row in csv.DictReader(f)] == [1, 2]
        assert not (root / "models" / ".hmn.lock").exists()
        finals.append(torch.load(root / "models" / "model_final.pt", map_location="cpu", weights_only=True))

    # the server's global model is the bundle's network, name for name and shape for shape
    saved = torch.load(job / "server" / "simulate_job" / "app_server" / "FL_global_model.pt", map_location="cpu",
                       weights_only=True)["model"]
    overrides = {"image_size": SIZE, "batch_size": 4, "num_workers": 0, "cache": "none"}
    (tmp_path / "fresh").mkdir()
    network = _bundle_network(datalists[0], overrides, tmp_path / "fresh")
    assert isinstance(network, HybridMedNet)
    expected = network.state_dict()
    assert {k: tuple(v.shape) for k, v in saved.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    network.load_state_dict(saved, strict=True)

    # FedAvg: with equal weights the global model is the mean of what the sites sent in the last round, which is
    # each site's final weights (model_final.pt); the sites trained on different images, so these differ
    float_keys = [k for k, v in expected.items() if v.is_floating_point()]
    assert max((finals[0][k] - finals[1][k]).abs().max().item() for k in float_keys) > 0
    for k in float_keys:
        torch.testing.assert_close(saved[k].float(), (finals[0][k] + finals[1][k]) / 2, rtol=0, atol=1e-6, msg=k)


def test_a_site_refuses_global_weights_of_another_network():
    """What NVFlare sent when given the network as an object (issue 25): a HybridMedNet rebuilt without the bundle's
    backbone options, whose parameter names differ. MonaiAlgo alone loads the names that match and trains on."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("hmn_nvflare_client", ROOT / "examples" / "nvflare" / "client.py")
    client = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(client)
    local = {"head.weight": torch.zeros(5, 8), "neck.bn.running_mean": torch.zeros(8)}
    client.check_same_network(dict(local), local, "bundles/convnext_tiny")  # the same network: accepted
    for received, named in [({"head.weight": torch.zeros(5, 8), "neck.norm.weight": torch.zeros(8)},
                             ["neck.bn.running_mean", "neck.norm.weight"]),
                            ({"head.weight": torch.zeros(3, 8), "neck.bn.running_mean": torch.zeros(8)},
                             ["head.weight: server (3, 8), site (5, 8)"])]:
        with pytest.raises(ValueError, match="bundles/convnext_tiny/configs/train.json") as error:
            client.check_same_network(received, local, "bundles/convnext_tiny")
        assert all(name in str(error.value) for name in named), error.value
