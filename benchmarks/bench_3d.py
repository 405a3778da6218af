"""3D backbones: speed and peak memory of a training step (forward + backward) on volumes.

    python benchmarks/bench_3d.py                     # CPU, 2 threads: every 3D backbone at 96^3 and 128^3
    python benchmarks/bench_3d.py --device cuda       # the same on a GPU
    python benchmarks/bench_3d.py --quick             # a smoke run at 32^3
    python benchmarks/bench_3d.py --depthwise         # the depthwise 7x7x7 convolution alone: PyTorch's against ours

Part 1, the backbones as the registry builds them (one input channel, random weights, train mode): for each
of ``convnext3d_tiny/small/base`` and ``swin3d_tiny/small/base`` and each cubic size, the time of one
forward + backward pass (the mean square of every output map as the loss) on a batch of ``--batch`` random volumes,
and voxels per second (batch x size^3 / time). Part 2, HybridMedNet over ``--attention-backbone`` with
cross-scale attention alone, its context pooled to at most 7 positions per axis (the default) and at full
resolution (``context_size=None``), side by side: the same step with a BCE loss on 14 outputs.

Times: the configurations of a part run interleaved in one process, round by round, after one warm-up step
each, so a busy neighbour slows them alike; each figure is the median of ``--rounds``. Peak memory: on a
GPU ``torch.cuda.max_memory_allocated`` over one more step; on the CPU each configuration runs once more in
a fresh subprocess, which reports its peak resident set during one step after a warm-up step above its resident
set before that step (Linux: ``/proc/self/clear_refs`` resets the peak, ``VmHWM`` minus ``VmRSS``): what the
step allocates beyond the weights, gradients and optimizer state kept from the warm-up. ``--rounds 0`` (CPU, for a
short run) times only that one step of each fresh process, one configuration after the other.

``--depthwise`` runs only part 3 instead: one forward + backward pass of the 3D ConvNeXt's depthwise 7x7x7
convolution alone, ``nn.Conv3d(C, C, 7, padding=3, groups=C)`` against :class:`hmn.networks.convnext3d.DepthwiseConv3d`
(the same convolution, its CPU backward made of forward convolutions), at the four stage shapes of
``convnext3d_tiny`` in the 3D demo bundle (batch 8, 64 x 64 x 32 volumes, stem stride 4 x 4 x 2: 96 channels at
16^3 down to 768 at 2^3), interleaved round by round; the two are checked to give the same gradients first.

Output: one JSON line per measurement (``--json FILE`` also appends them there), then a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
from _machine import cpu_name

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from hmn.networks import HybridMedNet  # noqa: E402
from hmn.networks.backbones import backbone_names, build_backbone  # noqa: E402

BACKBONES = [n for n in backbone_names() if n.startswith(("convnext3d_", "swin3d_"))]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(config: str, size: int, device: torch.device) -> tuple[torch.nn.Module, callable]:
    """The module of ``config`` (a backbone name, or ``hybrid:<backbone>:<context>``) and one training step."""
    if config.startswith("hybrid:"):
        _, backbone, context = config.split(":")
        net = HybridMedNet(backbone, num_classes=14, img_size=size, attention=["cross_scale"],
                           context_size=None if context == "full" else int(context)).to(device)

        def loss(x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.binary_cross_entropy_with_logits(net(x), torch.zeros(x.shape[0], 14, device=device))
    else:
        net = build_backbone(config, in_channels=1, img_size=size).to(device)

        def loss(x: torch.Tensor) -> torch.Tensor:
            # squared: the gradient of a plain mean is a stride-0 expanded tensor, on which the depthwise
            # convolutions' backward takes a slow path that a real loss never sends it down
            return sum(f.float().square().mean() for f in net(x))
    net.train()
    return net, loss


def step_fn(config: str, size: int, batch: int, device: torch.device):
    net, loss = build(config, size, device)
    x = torch.randn(batch, 1, size, size, size, device=device)

    def step() -> None:
        net.zero_grad(set_to_none=True)
        loss(x).backward()

    return step


DEPTHWISE_SHAPES = [(8, 96, 16), (8, 192, 8), (8, 384, 4), (8, 768, 2)]  # (batch, channels, side)


def depthwise_records(args, device: torch.device) -> list[dict]:
    """Part 3: nn.Conv3d's depthwise 7^3 convolution against DepthwiseConv3d, forward + backward, interleaved."""
    from hmn.networks.convnext3d import DepthwiseConv3d

    records = []
    for n, c, side in DEPTHWISE_SHAPES:
        ours = DepthwiseConv3d(c, 7).to(device)
        theirs = torch.nn.Conv3d(c, c, 7, padding=3, groups=c).to(device)
        theirs.load_state_dict(ours.state_dict())
        x = torch.randn(n, c, side, side, side, device=device, requires_grad=True)
        g = torch.randn(n, c, side, side, side, device=device)

        def step(conv: torch.nn.Module) -> list[torch.Tensor]:
            conv.zero_grad(set_to_none=True)
            x.grad = None
            (conv(x) * g).sum().backward()
            return [x.grad, conv.weight.grad, conv.bias.grad]

        for a, b in zip(step(ours), step(theirs)):  # also the warm-up
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 * float(b.abs().max()))
        times: dict[str, list[float]] = {"nn.Conv3d": [], "DepthwiseConv3d": []}
        for _ in range(args.rounds):
            for name, conv in (("nn.Conv3d", theirs), ("DepthwiseConv3d", ours)):
                _sync(device)
                t0 = time.perf_counter()
                step(conv)
                _sync(device)
                times[name].append(time.perf_counter() - t0)
        for name, ts in times.items():
            med = statistics.median(ts)
            records.append({"config": f"depthwise:{name}:{c}ch", "size": side, "batch": n, "step_s": med, "step_s_all": ts,
                            "voxels_per_s": n * side**3 / med, "peak_mib": None, "device": str(device),
                            "device_name": _device_name(device), "threads": args.threads})
    return records


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``; Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def cpu_peak_mib(config: str, size: int, batch: int, threads: int) -> tuple[float, float]:
    """Peak resident-set growth (MiB) over one step after a warm-up step, in a fresh process, and that step's
    time (s)."""
    code = (
        "import sys, torch; sys.argv = ['x']; torch.set_num_threads(%d);"
        "sys.path.insert(0, %r); import bench_3d as b;"
        "import time; s = b.step_fn(%r, %d, %d, torch.device('cpu')); s();"
        "base = b.status_kib('VmRSS'); open('/proc/self/clear_refs', 'w').write('5');"
        "t = time.perf_counter(); s(); print(time.perf_counter() - t, b.status_kib('VmHWM') - base)"
    ) % (threads, os.path.dirname(os.path.abspath(__file__)), config, size, batch)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"memory run of {config} at {size}^3 failed:\n{out.stderr[-2000:]}")
    step_s, kib = out.stdout.strip().splitlines()[-1].split()
    return int(kib) / 1024, float(step_s)


def measure(configs: list[str], size: int, args, device: torch.device) -> list[dict]:
    if args.rounds == 0:  # CPU: time and memory of the one step in each fresh process only (not interleaved)
        records = []
        for c in configs:
            peak, step_s = cpu_peak_mib(c, size, args.batch, args.threads)
            records.append({"config": c, "size": size, "batch": args.batch, "step_s": step_s, "step_s_all": [step_s],
                            "voxels_per_s": args.batch * size**3 / step_s, "peak_mib": peak,
                            "peak_kind": "cpu peak RSS growth over one step", "timing": "one step in a fresh process",
                            "device": str(device), "device_name": _device_name(device), "threads": args.threads})
        return records
    steps = {}
    for c in configs:
        steps[c] = step_fn(c, size, args.batch, device)
        steps[c]()  # warm-up
        _sync(device)
    times: dict[str, list[float]] = {c: [] for c in configs}
    for _ in range(args.rounds):
        for c, step in steps.items():
            _sync(device)
            t0 = time.perf_counter()
            step()
            _sync(device)
            times[c].append(time.perf_counter() - t0)
    records = []
    for c in configs:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            steps[c]()
            _sync(device)
            peak = torch.cuda.max_memory_allocated(device) / 2**20
        elif args.memory:
            peak = cpu_peak_mib(c, size, args.batch, args.threads)[0]
        else:
            peak = None
        med = statistics.median(times[c])
        records.append({"config": c, "size": size, "batch": args.batch, "step_s": med, "step_s_all": times[c],
                        "voxels_per_s": args.batch * size**3 / med, "peak_mib": peak,
                        "peak_kind": "cuda max allocated" if device.type == "cuda" else "cpu peak RSS growth over one step",
                        "device": str(device), "device_name": _device_name(device), "threads": args.threads})
    del steps
    return records


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({os.cpu_count()} logical CPUs)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--sizes", type=int, nargs="+", default=[96, 128])
    p.add_argument("--backbones", nargs="+", default=BACKBONES)
    p.add_argument("--attention-backbone", default="convnext3d_tiny", help="'none' skips part 2")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3,
                   help="timed rounds; 0 (CPU): time the one step of each configuration's memory run instead")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-memory", dest="memory", action="store_false", help="CPU: skip the memory subprocesses")
    p.add_argument("--quick", action="store_true", help="32^3, one round, no memory runs")
    p.add_argument("--depthwise", action="store_true", help="only the depthwise convolution alone (part 3)")
    p.add_argument("--json", help="append the JSON lines to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.rounds, args.memory = [32], 1, False
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"# {_device_name(device)}, torch {torch.__version__}, {args.threads} threads, python {platform.python_version()}",
          file=sys.stderr)
    records = depthwise_records(args, device) if args.depthwise else []
    for size in [] if args.depthwise else args.sizes:
        records += measure(list(args.backbones), size, args, device)
        b = args.attention_backbone
        if b != "none":
            records += measure([f"hybrid:{b}:7", f"hybrid:{b}:full"], size, args, device)
    for r in records:
        line = json.dumps(r)
        print(line)
        if args.json:
            with open(args.json, "a") as f:
                f.write(line + "\n")
    print(f"\n{'config':<32} {'size':>5} {'step s':>8} {'Mvoxel/s':>9} {'peak MiB':>9}")
    for r in records:
        peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "-"
        print(f"{r['config']:<32} {r['size']:>5} {r['step_s']:>8.2f} {r['voxels_per_s'] / 1e6:>9.3f} {peak:>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
