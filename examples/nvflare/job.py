"""Federated averaging of a HybridMedNet bundle across hospitals with NVFlare: the job, run in NVFlare's simulator
or exported for a provisioned deployment.

Each site runs ``client.py`` (NVFlare's Client API around MONAI FL's ``MonaiAlgo``) in its own process
(``--python``, the site's interpreter with hmn and nvflare installed) on its own copy of the bundle and its own
datalist; the server averages the sites' weights (``FedAvgRecipe``, weighted by each site's training
iterations) for ``--rounds`` rounds and keeps the global model (``FL_global_model.pt``, a dict whose ``"model"`` is
the ``state_dict``).

The server's initial network is given to NVFlare as ``{"path": <the bundle's network_def _target_>, "args": <every
constructor argument of network_def, resolved with the sites' overrides>}``, which NVFlare's persistor rebuilds
exactly; a network *object* would be rebuilt from what NVFlare can read back from it, which for HybridMedNet drops
constructor arguments (and MonaiAlgo then trains a partly loaded network). The arguments are resolved once per
site datalist (the classes come from it) and must agree.

    python examples/nvflare/job.py --bundle bundles/convnext_tiny --datalists site1.json site2.json \\
        --rounds 2 --workdir /tmp/nvf --image_size 64 --batch_size 4

writes the sites' bundle copies to ``<workdir>/sites/site-<k>`` and the simulator's workspace to
``<workdir>/simulator/<job name>`` (server: ``server/simulate_job/app_server/FL_global_model.pt``).
NVFlare's own ``--export --export-dir DIR`` writes the job folder instead (``recipe.execute``), for
``nvflare job submit -j DIR/<job name>`` on a provisioned deployment (the paths in it are then read on each
site's machine).

Requires ``pip install -e '.[federated]'`` (nvflare). Paths must not contain whitespace (NVFlare splits a site's
script arguments on it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

# imported before the arguments are parsed: NVFlare takes its --export / --export-dir out of sys.argv on import
from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe
from nvflare.recipe import SimEnv
from nvflare.recipe.utils import set_per_site_config

HERE = Path(__file__).resolve().parent


def parse_value(text: str) -> Any:
    """A command-line override's value: JSON (``64``, ``[32, 32, 16]``, ``true``, ``"none"``) or else the text."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def network_config(bundle: str | os.PathLike, overrides: dict[str, Any]) -> dict[str, Any]:
    """``{"path": class path, "args": constructor arguments}`` of ``network_def`` in `bundle`'s
    ``configs/train.json`` with `overrides` (which must include ``datalist``), as a fresh bundle copy builds it
    (no run record is read). Raises ValueError where an argument is not JSON (NVFlare writes the job as JSON)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(os.path.join(bundle, "configs", "train.json"))
    with tempfile.TemporaryDirectory() as fresh_root:  # no models/run.json: the settings a new site copy uses
        parser.update({**overrides, "bundle_root": fresh_root})
        component = parser.get_parsed_content("network_def", instantiate=False)
        config = {"path": component.resolve_module_name(), "args": component.resolve_args()}
    try:
        return json.loads(json.dumps(config))
    except TypeError as e:
        raise ValueError(f"{bundle}/configs/train.json network_def: an argument is not JSON ({e}); "
                         "give it as an override with a JSON value") from e


def site_args(bundle: str, site_root: str, datalist: str, args: argparse.Namespace,
              overrides: dict[str, Any]) -> str:
    """``client.py``'s arguments for one site (NVFlare splits them on whitespace)."""
    parts = ["--bundle", bundle, "--site_root", site_root, "--datalist", datalist,
             "--local_epochs", str(args.local_epochs), "--eval_split", args.eval_split]
    for key, value in overrides.items():
        parts += ["--override", f"{key}={json.dumps(value, separators=(',', ':'))}"]
    bad = [p for p in parts if re.search(r"\s", p)]
    if bad:
        raise ValueError(f"NVFlare splits a site's arguments on whitespace; these contain some: {bad}")
    return " ".join(parts)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True, help="the bundle folder, e.g. bundles/convnext_tiny")
    p.add_argument("--datalists", nargs="+", required=True,
                   help="one datalist JSON per site, in the order of --sites (each hospital its own images)")
    p.add_argument("--classes_from", metavar="DATALIST",
                   help="a datalist (its class_names alone will do) that sets the server's network classes; default: "
                        "each of --datalists, which must then be readable here and agree")
    p.add_argument("--sites", nargs="+", help="site names (default site-1 ... site-N; for a provisioned "
                   "deployment, the names it was provisioned with)")
    p.add_argument("--rounds", type=int, default=2, help="federated rounds (default 2)")
    p.add_argument("--local_epochs", type=int, default=1, help="local training epochs per round (default 1)")
    p.add_argument("--workdir", default="/tmp/nvflare/hmn",
                   help="the sites' bundle copies (sites/) and the simulator's workspace (simulator/)")
    p.add_argument("--image_size", type=int, nargs="+", help="train.json image_size (one value, or X Y Z)")
    p.add_argument("--batch_size", type=int)
    p.add_argument("--num_workers", type=int)
    p.add_argument("--cache", help="train.json cache (auto, none, memory, disk, ...)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="any other train.json override for every site, VALUE as JSON (repeatable)")
    p.add_argument("--eval_split", default="validation", choices=["validation", "test", "none"],
                   help="each round, every site evaluates the global weights it received on this split "
                        "(the server keeps the best as best_FL_global_model.pt); 'none' skips it")
    p.add_argument("--python", default="python3",
                   help="the interpreter each site runs client.py with, found on the site's PATH or an absolute path "
                        "(it needs hmn and nvflare; default python3)")
    p.add_argument("--threads", type=int, help="simulator: sites trained at once (default: all)")
    p.epilog = "NVFlare's --export [--export-dir DIR] write the job folder (default ./fl_job) instead of simulating it."
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    bundle = os.path.abspath(args.bundle)
    bundle_name = os.path.basename(bundle.rstrip(os.sep))
    sites = args.sites or [f"site-{k + 1}" for k in range(len(args.datalists))]
    if len(sites) != len(args.datalists):
        raise SystemExit(f"--sites names {len(sites)} sites but --datalists gives {len(args.datalists)}")
    if len(sites) < 2:
        raise SystemExit("federated averaging needs at least 2 sites (--datalists site1.json site2.json)")
    overrides: dict[str, Any] = {}
    if args.image_size:
        overrides["image_size"] = args.image_size[0] if len(args.image_size) == 1 else list(args.image_size)
    for key in ("batch_size", "num_workers", "cache"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    for item in args.override:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--override {item!r}: expected KEY=VALUE, e.g. learning_rate=0.0005")
        overrides[key] = parse_value(value)

    if re.search(r"\s", args.python):
        raise SystemExit(f"--python {args.python!r}: NVFlare splits the site's command on whitespace")
    workdir = os.path.abspath(args.workdir)
    datalists = [os.path.abspath(d) for d in args.datalists]
    site_roots = [os.path.join(workdir, "sites", site) for site in sites]
    # the server's network: the bundle's network_def as each site builds it (classes from each datalist)
    class_sources = [os.path.abspath(args.classes_from)] if args.classes_from else datalists
    networks = [network_config(bundle, {**overrides, "datalist": d}) for d in class_sources]
    for site, datalist, network in zip(sites[1:], class_sources[1:], networks[1:]):
        if network != networks[0]:
            diff = {k: (networks[0]["args"].get(k), network["args"].get(k))
                    for k in set(network["args"]) | set(networks[0]["args"])
                    if networks[0]["args"].get(k) != network["args"].get(k)}
            raise SystemExit(f"{datalist} ({site}) gives another network than {class_sources[0]} ({sites[0]}): "
                             f"{diff} (the sites of one federation need the same classes and settings)")
    held = [r for r in site_roots if os.path.exists(os.path.join(r, "models", "run.json"))]
    if held:
        raise SystemExit(f"{held}: these site folders already hold a run; choose another --workdir")

    recipe = FedAvgRecipe(
        name=f"hmn-fedavg-{bundle_name}",
        model=networks[0],
        min_clients=len(sites),
        num_rounds=args.rounds,
        train_script=str(HERE / "client.py"),  # shipped in the job's custom/ folder, run from there
        launch_external_process=True,
        command=f"{args.python} -u",
        key_metric="global_auc",
        key_metric_mode="max",
    )
    set_per_site_config(recipe, {
        site: {"train_args": site_args(bundle, root, datalist, args, overrides)}
        for site, root, datalist in zip(sites, site_roots, datalists)})
    print(f"server network: {json.dumps(networks[0])}")

    env = SimEnv(clients=sites, num_threads=args.threads or len(sites),
                 workspace_root=os.path.join(workdir, "simulator"))
    run = recipe.execute(env)  # with --export: writes the job folder and exits
    result = run.get_result()
    print(f"simulator workspace: {result}")
    print(f"global model: {os.path.join(result, 'server', 'simulate_job', 'app_server', 'FL_global_model.pt')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
