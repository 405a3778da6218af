"""One hospital's side of the NVFlare job: trains its own copy of a HybridMedNet bundle, unchanged, on its own data.

NVFlare's Client API (``nvflare.client``) runs this script on each site. Each round it receives the global
weights, trains them for ``--local_epochs`` epochs with the bundle's ``configs/train.json`` through MONAI FL's
``monai.fl.client.MonaiAlgo``, evaluates the global weights it received on the site's ``--eval_split`` (the
bundle's ``configs/evaluate.json``), and sends back to the server the trained weights (``ParamsType.FULL``), that
evaluation's metrics (the macro ROC AUC as ``global_auc``, the server's model selection metric; the others as
``global_<name>``) and its number of training iterations (the FedAvg weight).

The site's bundle copy (``--site_root``) holds what a local run would: ``models/run.json``, checkpoints,
``model.pt`` (the best local model), ``model_final.pt`` (the weights the last round ended with), and the
end-of-round report of the best local model on the site's test split (``runs/eval/``); the evaluations of the
received global weights are written to ``runs/global_eval/``.

The received weights must match the site's network exactly (same parameter names and shapes); otherwise the
script stops with ``ValueError`` naming the differences, instead of training a partly loaded network.

Arguments are whitespace-separated by NVFlare (no quoting), so paths must not contain spaces. See
``examples/nvflare/README.md`` and ``job.py``, which writes these arguments for each site.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
from typing import Any

import torch

import nvflare.client as flare
from nvflare.apis.fl_constant import FLMetaKey
from monai.fl.client import MonaiAlgo
from monai.fl.utils.constants import ExtraItems, FlStatistics, WeightType
from monai.fl.utils.exchange_object import ExchangeObject
from monai.networks.utils import get_state_dict


def parse_value(text: str) -> Any:
    """A command-line override's value: JSON (``64``, ``[32, 32, 16]``, ``true``, ``"none"``) or else the text."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True, help="the bundle folder to copy (it holds configs/train.json)")
    p.add_argument("--site_root", required=True,
                   help="this site's copy of the bundle (created from --bundle if it does not exist yet)")
    p.add_argument("--datalist", required=True, help="this site's datalist JSON (its own images)")
    p.add_argument("--local_epochs", type=int, default=1, help="local training epochs per round (default 1)")
    p.add_argument("--eval_split", default="validation", choices=["validation", "test", "none"],
                   help="the split the received global weights are evaluated on each round; 'none' skips it")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="a train.json override, as on `python -m monai.bundle run ... --KEY VALUE` (repeatable)")
    return p.parse_args(argv)


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for item in args.override:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--override {item!r}: expected KEY=VALUE, e.g. image_size=224")
        overrides[key] = parse_value(value)
    overrides["datalist"] = os.path.abspath(args.datalist)
    return overrides


def make_site_root(bundle: str, site_root: str) -> str:
    """The site's copy of `bundle` (its configs, docs and license; no models or runs), made once."""
    if not os.path.isfile(os.path.join(bundle, "configs", "train.json")):
        raise FileNotFoundError(f"--bundle {bundle}: no configs/train.json there; give a bundle folder")
    if not os.path.isdir(site_root):
        shutil.copytree(bundle, site_root, ignore=shutil.ignore_patterns("models", "runs", "__pycache__"))
    return os.path.abspath(site_root)


def check_same_network(received: dict[str, Any], local: dict[str, torch.Tensor], bundle: str) -> None:
    """Refuse global weights that do not match the site's network name for name and shape (MonaiAlgo itself
    loads whatever names match and reshapes, so a differently built server network would train partly loaded)."""
    missing = sorted(set(local) - set(received))
    unexpected = sorted(set(received) - set(local))
    shapes = [f"{k}: server {tuple(received[k].shape)}, site {tuple(local[k].shape)}"
              for k in local if k in received and tuple(received[k].shape) != tuple(local[k].shape)]
    if missing or unexpected or shapes:
        raise ValueError(
            f"the server's global model is not the network of {bundle}/configs/train.json with this site's "
            f"overrides: {len(missing)} parameters missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:3]}), {len(shapes)} of another shape (e.g. {shapes[:3]}). Give the server the "
            "network as {'path': ..., 'args': ...} from the bundle's network_def with the same overrides "
            "(examples/nvflare/job.py does).")


class Terminated(BaseException):
    """NVFlare ended this process (SIGTERM), as it does when the job ends while the script waits in
    ``flare.receive()``, or when the job is aborted."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated(signum)


def main(argv=None) -> None:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_terminated)
    site_root = make_site_root(args.bundle, args.site_root)
    # bundle_root among the overrides too: MonaiAlgo builds the workflow once before it sets its bundle_root, and
    # that first build would otherwise use the config's relative bundle_root (bundles/<name>) under the cwd
    overrides = {**overrides_from(args), "bundle_root": site_root}

    flare.init()
    site = flare.get_site_name()
    eval_kwargs = None
    if args.eval_split != "none":
        eval_kwargs = {**overrides, "eval_split": args.eval_split,
                       "eval_dir": os.path.join(site_root, "runs", "global_eval")}
    algo = MonaiAlgo(bundle_root=site_root, local_epochs=args.local_epochs, send_weight_diff=False,
                     train_kwargs=dict(overrides), eval_kwargs=eval_kwargs or {},
                     config_evaluate_filename="default" if eval_kwargs else None)
    algo.initialize(extra={ExtraItems.CLIENT_NAME: site})
    try:
        while flare.is_running():
            global_model = flare.receive()
            if global_model is None:
                break
            weights = {k: torch.as_tensor(v) for k, v in global_model.params.items()}
            check_same_network(weights, get_state_dict(algo.trainer.network), args.bundle)
            received = ExchangeObject(weights=weights, weight_type=WeightType.WEIGHTS)
            print(f"{site}: round {global_model.current_round}, training on {overrides['datalist']}")

            algo.train(received)
            update = algo.get_weights()  # the trained weights (send_weight_diff=False), on the CPU
            steps = update.statistics.get(FlStatistics.NUM_EXECUTED_ITERATIONS, 1)

            metrics = {}
            if eval_kwargs:
                # the global weights this round started from, on this site's --eval_split: the evaluator's key
                # metric (the macro ROC AUC) as "global_auc", the server's model selection metric, and the others
                # as "global_<name>"
                result = algo.evaluate(received).metrics
                key = algo.evaluator.state.key_metric_name
                metrics = {("global_auc" if k == key else f"global_{k}"): float(v) for k, v in result.items()
                           if isinstance(v, (int, float))}
            flare.send(flare.FLModel(params=update.weights, params_type=flare.ParamsType.FULL, metrics=metrics,
                                     meta={FLMetaKey.NUM_STEPS_CURRENT_ROUND: steps}))
    except Terminated:
        # finalize the bundle's run (its models folder lock released), then leave at once: the Client API's
        # communication threads would otherwise keep the process alive until NVFlare kills it (30 s later)
        algo.finalize()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(128 + signal.SIGTERM)
    algo.finalize()  # the server ended the job through the Client API (flare.is_running() is False)


if __name__ == "__main__":
    main()
