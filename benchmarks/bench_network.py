"""Training-step time and peak memory of HybridMedNet against its bare backbone, on the CPU.

    python benchmarks/bench_network.py [--backbone convnext_tiny] [--batch 8] [--size 224] [--threads 2]

Each configuration is one training step (forward, BCE loss, backward, AdamW step) on random
single-channel images. Times: the configurations are interleaved round by round in one process, so
that a busy neighbour slows them all alike, and the median per configuration is reported with its
ratio to the bare backbone (a timm model with a linear head). Peak memory: each configuration runs in
a fresh subprocess; after one warm-up step the kernel's peak-RSS counter is reset (Linux
``/proc/self/clear_refs``) and the growth of the peak resident set over one more training step is
reported: the activations and gradients of a step, not the weights or optimizer state.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from _machine import cpu_name  # noqa: E402

CONFIGS = {
    "bare backbone + linear": None,
    "hmn attention=none": "none",
    "hmn attention=cbam": "cbam",
    "hmn attention=self": "self",
    "hmn attention=cross_scale": "cross_scale",
    "hmn attention=self+cross_scale": ["self", "cross_scale"],
    "hmn cross_scale, full context": "cross_scale:full",
}


def build(name: str, backbone: str, size: int) -> torch.nn.Module:
    mode = CONFIGS[name]
    if mode is None:
        import timm

        from hmn.networks import get_backbone_spec

        return timm.create_model(get_backbone_spec(backbone).timm_name, pretrained=False, in_chans=1, num_classes=14)
    from hmn.networks import HybridMedNet

    if mode == "cross_scale:full":
        return HybridMedNet(backbone, attention="cross_scale", context_size=None, img_size=size)
    return HybridMedNet(backbone, attention=mode, img_size=size)


def make_step(model: torch.nn.Module, batch: int, size: int):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, size, size, generator=gen)
    y = (torch.rand(batch, 14, generator=gen) > 0.8).float()

    def step() -> float:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    return step


def memory_child(name: str, backbone: str, batch: int, size: int, threads: int) -> None:
    torch.set_num_threads(threads)
    model = build(name, backbone, size).train()
    step = make_step(model, batch, size)
    step()  # optimizer state and autograd buffers exist from here on
    base = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
        f.write("5")
    step()
    peak = _status_kib("VmHWM")
    print(json.dumps({"peak_delta_mib": (peak - base) / 1024}))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="convnext_tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS), help="subset of: " + ", ".join(CONFIGS))
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--_memory_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._memory_child:
        memory_child(args._memory_child, args.backbone, args.batch, args.size, args.threads)
        return

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    steps = {}
    for name in args.configs:
        model = build(name, args.backbone, args.size).train()
        steps[name] = make_step(model, args.batch, args.size)
        steps[name]()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            times[name].append(step())

    mem = {}
    if not args.no_memory:
        for name in args.configs:
            out = subprocess.run(
                [sys.executable, __file__, "--backbone", args.backbone, "--batch", str(args.batch), "--size",
                 str(args.size), "--threads", str(args.threads), "--_memory_child", name],
                capture_output=True, text=True, check=True,
            )
            mem[name] = json.loads(out.stdout.strip().splitlines()[-1])["peak_delta_mib"]

    cpu = cpu_name()
    print(f"machine: {cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, {args.threads} threads")
    print(f"backbone {args.backbone}, batch {args.batch}, {args.size}x{args.size}, 1 channel, "
          f"median of {args.rounds} interleaved training steps\n")
    first = next(iter(times))
    ref = statistics.median(times[first])
    print(f"| configuration | step time (s) | ratio to {first} | peak memory growth (MiB) |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        m = f"{mem[name]:.0f}" if name in mem else "-"
        print(f"| {name} | {med:.2f} | {med / ref:.2f}x | {m} |")


if __name__ == "__main__":
    main()
