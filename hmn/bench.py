"""``python -m hmn bench``: training and inference speed and peak memory of HybridMedNet against its bare
backbone, per attention mode, on the CPU or a GPU.

    python -m hmn bench --backbones convnext_tiny convnext_base --batch 8 --size 224 --threads 2
    python -m hmn bench --backbones convnext_base --device cuda --precision bf16 --batch 128 --channels-last
    python -m hmn bench --backbones convnext_base --device cuda --precision bf16 --batch 32 \\
        --configs hmn:cross_scale_full reference:cross_scale_naive

Configurations (``--configs``, default all but the reference):

* ``bare``: the timm backbone with its own pooling and a linear head (14 outputs), the baseline every
  ratio is taken against (Vision Mamba, not a timm model: its last map, average-pooled, and a linear head);
* ``hmn:<mode>``: HybridMedNet with one attention mode (``none``, ``cbam``, ``self``, ``cross_scale``) at
  the bundles' settings (reduced context of 7x7 keys and values);
* ``hmn:bundle``: HybridMedNet with the attention the backbone's bundle uses (:data:`hmn.bundle.BUNDLES`);
* ``hmn:cross_scale_full``: cross-scale attention with every other scale at full resolution
  (``context_size=None``), through ``scaled_dot_product_attention``;
* ``reference:cross_scale_naive``: the same attention with the same weights computed the straightforward
  way, an explicit ``queries x keys`` softmax matrix per head (:class:`NaiveCrossScaleAttention`), the
  formulation the full-resolution option is measured against.

A measurement is one training step (forward, BCE with logits, backward, AdamW step) or one inference
forward pass (``torch.inference_mode``) on random single-channel images. Steps of all configurations are
interleaved round by round in one process after ``--warmup`` steps each, so a busy neighbour slows them
alike; each reported time is the median over ``--rounds``, with ``torch.cuda.synchronize`` around every
step on a GPU. Images per second = batch / median step time. ``--compile`` wraps each model in
``torch.compile`` (its compile time is reported separately, as ``compile_s``, and excluded from the steps).

Peak memory: on a GPU, ``torch.cuda.max_memory_allocated`` over one more step after the timed ones
(weights, optimizer state, activations: what the step needs at its peak); on the CPU, each configuration
runs in a fresh subprocess and the growth of the process's peak resident set over one step after a
warm-up step is reported (Linux ``/proc/self/clear_refs``): activations and gradients, not the weights.

Model FLOPs utilisation (unless ``--no-flops``): the floating-point operations of one forward pass counted
by PyTorch's ``torch.utils.flop_counter.FlopCounterMode`` on the eager model (matrix products and
convolutions, two per multiply-add), three times that for a training step (:data:`TRAIN_FLOPS_PER_FORWARD`,
the usual convention), divided by the median step time
(``model_tflops_per_s``), and that against the device's measured matrix-product rate at the run's
precision (``matmul_tflops``: the median of 5 square products of side 8192 on a GPU, 2048 on the CPU,
bfloat16 with ``--precision bf16``), ``mfu = model_tflops_per_s / matmul_tflops``. Element-wise work
(normalisation, activations, the optimizer) is not counted, as in the usual MFU definition.

Output: one JSON line per measurement on stdout (``--json FILE`` also appends them to FILE), then a table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["CONFIGS", "NaiveCrossScaleAttention", "bench_main", "build_config", "count_flops", "matmul_tflops", "measure"]

CONFIGS = ("bare", "hmn:none", "hmn:cbam", "hmn:self", "hmn:cross_scale", "hmn:bundle", "hmn:cross_scale_full",
           "reference:cross_scale_naive")
_DEFAULT_CONFIGS = CONFIGS[:-1]
# a training step's FLOPs as a multiple of the forward pass's: the backward computes the gradients of the inputs and
# of the weights, each about one forward (the usual MFU convention). Counted, not assumed, PyTorch's FlopCounterMode
# gives convnext_tiny's step 8.7x its forward: its formula for the backward of grouped (depthwise) convolutions
# ignores the groups
TRAIN_FLOPS_PER_FORWARD = 3
NUM_CLASSES = 14


def _torch():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    return torch


def _naive_class():
    torch = _torch()
    from hmn.networks.attention import CrossScaleAttention
    from hmn.networks._utils import from_tokens, to_tokens

    class _Naive(CrossScaleAttention):
        def forward(self, feats: Sequence[Any]) -> list:
            contexts = [norm(to_tokens(f)) for norm, f in zip(self.norms, feats)]
            out = []
            for i, (f, norm, attn) in enumerate(zip(feats, self.norms, self.attn)):
                tokens = to_tokens(f)
                others = torch.cat([c for j, c in enumerate(contexts) if j != i], dim=1)
                q_in = norm(tokens)
                n, t, c = q_in.shape
                h = attn.num_heads
                q = attn.q(q_in).view(n, t, h, c // h).transpose(1, 2)
                k, v = attn.kv(others).view(n, others.shape[1], 2, h, c // h).permute(2, 0, 3, 1, 4)
                weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(c // h), dim=-1)  # the explicit matrix
                if self.training and attn.dropout:
                    weights = torch.nn.functional.dropout(weights, attn.dropout)
                o = (weights @ v).transpose(1, 2).reshape(n, t, c)
                out.append(from_tokens(tokens + attn.proj(o), f.shape[2:]))
            return out

    return _Naive


class NaiveCrossScaleAttention:
    """The reference formulation of full-resolution cross-scale attention: each scale's queries attend to
    every other scale's tokens at full resolution through an explicit ``N x heads x queries x keys``
    softmax matrix. Same parameters and same result as
    :class:`hmn.networks.attention.CrossScaleAttention` with ``context_size=None``; only the cost differs.

    ``NaiveCrossScaleAttention.from_module(module)`` returns a copy of `module` (a ``CrossScaleAttention``)
    whose forward is the naive one, sharing its parameters.
    """

    @staticmethod
    def from_module(module: Any) -> Any:
        naive = _naive_class()
        new = naive.__new__(naive)
        new.__dict__.update(module.__dict__)
        new.context_size = None
        return new


def _BareHead(backbone: str, size: int) -> Any:
    """A backbone without a timm classifier (Vision Mamba): its last feature map, global average pooled,
    into a linear layer."""
    torch = _torch()
    from hmn.networks import build_backbone

    class Bare(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = build_backbone(backbone, in_channels=1, img_size=size)
            self.head = torch.nn.Linear(self.backbone.channels[-1], NUM_CLASSES)

        def forward(self, x: Any) -> Any:
            return self.head(self.backbone(x)[-1].mean(dim=(2, 3)))

    return Bare()


def build_config(name: str, backbone: str, size: int) -> Any:
    """The model of configuration `name` (one of :data:`CONFIGS`) over `backbone` at `size`.

    Raises:
        ValueError: an unknown configuration name (the accepted ones are listed).
    """
    if name not in CONFIGS:
        raise ValueError(f"unknown configuration {name!r}; accepted: {', '.join(CONFIGS)}")
    from hmn.networks import HybridMedNet, get_backbone_spec

    if name == "bare":
        spec = get_backbone_spec(backbone)
        if spec.timm_name:
            import timm

            kwargs = {"img_size": size} if spec.fixed_size else {}
            return timm.create_model(spec.timm_name, pretrained=False, in_chans=1, num_classes=NUM_CLASSES, **kwargs)
        return _BareHead(backbone, size)
    if name == "hmn:bundle":
        from hmn.bundle.table import BUNDLES

        return HybridMedNet(backbone, num_classes=NUM_CLASSES, attention=list(BUNDLES[backbone].attention), img_size=size)
    if name in ("hmn:cross_scale_full", "reference:cross_scale_naive"):
        net = HybridMedNet(backbone, num_classes=NUM_CLASSES, attention="cross_scale", context_size=None, img_size=size)
        if name.startswith("reference"):
            net.attention.stages[0] = NaiveCrossScaleAttention.from_module(net.attention.stages[0])
        return net
    return HybridMedNet(backbone, num_classes=NUM_CLASSES, attention=name.split(":", 1)[1], img_size=size)


def _step_fn(model: Any, mode: str, batch: int, size: int, device: Any, precision: str, channels_last: bool) -> Callable[[], None]:
    torch = _torch()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, size, size, generator=gen).to(device)
    y = (torch.rand(batch, NUM_CLASSES, generator=gen) > 0.8).float().to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    dtype = torch.bfloat16 if precision == "bf16" else None
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype is not None else None
    loss_fn = torch.nn.BCEWithLogitsLoss()
    if mode == "train":
        fused = {"fused": True} if device.type == "cuda" else {}
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **fused)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            if autocast is not None:
                with autocast():
                    out = model(x)
            else:
                out = model(x)
            loss_fn(out.float(), y).backward()
            opt.step()

        return step

    def infer() -> None:
        with torch.inference_mode():
            if autocast is not None:
                with autocast():
                    model(x)
            else:
                model(x)

    return infer


def _prepare(name: str, backbone: str, size: int, device: Any, channels_last: bool, compile_model: bool, mode: str):
    torch = _torch()
    model = build_config(name, backbone, size).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train(mode == "train")
    return torch.compile(model) if compile_model else model


def _sync(device: Any) -> None:
    if device.type == "cuda":
        _torch().cuda.synchronize(device)


def count_flops(step: Callable[[], None]) -> int:
    """Floating-point operations of one call of `step` (matrix products and convolutions, 2 per multiply-add),
    counted by ``torch.utils.flop_counter.FlopCounterMode``."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())


def matmul_tflops(device: Any, precision: str = "fp32", n: int | None = None, repeats: int = 5) -> float:
    """The device's measured matrix-product rate in TFLOP/s: the median over `repeats` of one ``n x n`` by
    ``n x n`` product (``2 n^3`` operations) in bfloat16 (`precision` ``"bf16"``) or float32, after one untimed
    product; `n` defaults to 8192 on a GPU and 2048 on the CPU."""
    torch = _torch()
    device = torch.device(device)
    n = int(n or (8192 if device.type == "cuda" else 2048))
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device, dtype)
    b = torch.randn(n, n, generator=gen).to(device, dtype)
    a @ b
    times = []
    for _ in range(int(repeats)):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e12


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Runs the interleaved timing (and, on a GPU, the memory) measurements; returns one dict per
    (backbone, configuration, mode)."""
    torch = _torch()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    records: list[dict[str, Any]] = []
    peak_rate = matmul_tflops(device, args.precision) if args.flops else None
    for backbone in args.backbones:
        steps: dict[tuple[str, str], Callable[[], None]] = {}
        models: dict[tuple[str, str], Any] = {}
        compile_s: dict[tuple[str, str], float | None] = {}
        flops: dict[tuple[str, str], int] = {}
        for name in args.configs:
            for mode in args.modes:
                key = (name, mode)
                models[key] = _prepare(name, backbone, args.size, device, args.channels_last, args.compile, mode)
                steps[key] = _step_fn(models[key], mode, args.batch, args.size, device, args.precision, args.channels_last)
                _sync(device)
                t0 = time.perf_counter()
                steps[key]()  # the first call compiles under --compile
                _sync(device)
                compile_s[key] = time.perf_counter() - t0 if args.compile else None
                for _ in range(max(args.warmup - 1, 0)):
                    steps[key]()
                _sync(device)
                if args.flops:  # on the eager model: the compiled graph hides its operations from the counter
                    eager = getattr(models[key], "_orig_mod", models[key])
                    forward = count_flops(_step_fn(eager, "infer", args.batch, args.size, device, args.precision,
                                                   args.channels_last))
                    flops[key] = forward * (TRAIN_FLOPS_PER_FORWARD if mode == "train" else 1)
        times: dict[tuple[str, str], list[float]] = {k: [] for k in steps}
        for _ in range(args.rounds):
            for key, step in steps.items():
                _sync(device)
                t0 = time.perf_counter()
                step()
                _sync(device)
                times[key].append(time.perf_counter() - t0)
        peak: dict[tuple[str, str], float | None] = {}
        for key, step in steps.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                step()
                _sync(device)
                peak[key] = torch.cuda.max_memory_allocated(device) / 2**20
            elif args.memory:
                peak[key] = _cpu_memory(args, backbone, *key)
            else:
                peak[key] = None
        for key, ts in times.items():
            med = statistics.median(ts)
            records.append({
                "backbone": backbone, "config": key[0], "mode": key[1], "batch": args.batch, "size": args.size,
                "device": str(device), "device_name": _device_name(device), "precision": args.precision,
                "channels_last": bool(args.channels_last), "compile": bool(args.compile), "threads": args.threads,
                "rounds": args.rounds, "step_s": med, "images_per_s": args.batch / med,
                "step_s_all": ts, "step_spread": max(ts) / min(ts), "compile_s": compile_s[key],
                "peak_mib": peak[key], "peak_kind": "cuda max allocated" if device.type == "cuda" else (
                    "cpu peak RSS growth over one step" if peak[key] is not None else None),
                "flops_per_step": flops.get(key), "matmul_tflops": peak_rate,
                "model_tflops_per_s": flops[key] / med / 1e12 if key in flops else None,
                "mfu": flops[key] / med / 1e12 / peak_rate if key in flops and peak_rate else None,
            })
        bare = {r["mode"]: r for r in records if r["backbone"] == backbone and r["config"] == "bare"}
        for r in records:
            if r["backbone"] == backbone and r["mode"] in bare:
                b = bare[r["mode"]]
                r["time_ratio_to_bare"] = r["step_s"] / b["step_s"]
                r["memory_ratio_to_bare"] = (r["peak_mib"] / b["peak_mib"]
                                             if r["peak_mib"] is not None and b["peak_mib"] else None)
        del models, steps
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return records


def _device_name(device: Any) -> str:
    if device.type == "cuda":
        return _torch().cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _cpu_memory(args: argparse.Namespace, backbone: str, name: str, mode: str) -> float:
    cmd = [sys.executable, "-m", "hmn", "bench", "--_memory_child", f"{backbone}|{name}|{mode}",
           "--batch", str(args.batch), "--size", str(args.size), "--threads", str(args.threads),
           "--precision", args.precision] + (["--channels-last"] if args.channels_last else [])
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"memory measurement of {backbone} {name} {mode} failed:\n{out.stderr[-2000:]}")
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_delta_mib"])


def _memory_child(args: argparse.Namespace) -> None:
    torch = _torch()
    backbone, name, mode = args._memory_child.split("|")
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    model = _prepare(name, backbone, args.size, device, args.channels_last, False, mode)
    step = _step_fn(model, mode, args.batch, args.size, device, args.precision, args.channels_last)
    step()  # optimizer state and autograd buffers exist from here on
    base = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # resets the peak (VmHWM) to the current RSS
        f.write("5")
    step()
    print(json.dumps({"peak_delta_mib": (_status_kib("VmHWM") - base) / 1024}))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


SPREAD_LIMIT = 1.5


def noisy_rows(records: Sequence[dict[str, Any]], limit: float = SPREAD_LIMIT) -> list[str]:
    """The measurements whose slowest timed step took more than `limit` times their fastest (``step_spread``):
    a busy machine (or too few rounds) makes their medians, and every ratio taken from them, unreliable."""
    return [f"{r['backbone']} {r['config']} {r['mode']} ({r['step_spread']:.1f}x)" for r in records
            if r.get("step_spread") is not None and r["step_spread"] > limit]


def _table(records: Sequence[dict[str, Any]]) -> str:
    lines = ["| backbone | configuration | mode | images/s | step (s) | time vs bare | peak MiB | memory vs bare | TFLOP/s | MFU |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        ratio = r.get("time_ratio_to_bare")
        mem = r.get("memory_ratio_to_bare")
        lines.append(
            f"| {r['backbone']} | {r['config']} | {r['mode']} | {r['images_per_s']:.1f} | {r['step_s']:.3f} | "
            + (f"{ratio:.2f}x" if ratio is not None else "-") + " | "
            + (f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "-") + " | "
            + (f"{mem:.2f}x" if mem is not None else "-") + " | "
            + (f"{r['model_tflops_per_s']:.3g}" if r.get("model_tflops_per_s") is not None else "-") + " | "
            + (f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-") + " |")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hmn bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", nargs="+", default=["convnext_tiny"], help="backbone names (default convnext_tiny)")
    p.add_argument("--configs", nargs="+", default=list(_DEFAULT_CONFIGS), choices=CONFIGS, metavar="CONFIG",
                   help="configurations (default: all but the naive reference): " + ", ".join(CONFIGS))
    p.add_argument("--modes", nargs="+", default=["train", "infer"], choices=("train", "infer"))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224, help="image side in pixels")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="bf16: autocast to bfloat16")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format for input and model")
    p.add_argument("--compile", action="store_true", help="torch.compile each model (compile time reported apart)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--rounds", type=int, default=5, help="timed steps per configuration, interleaved")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration first")
    p.add_argument("--no-memory", dest="memory", action="store_false",
                   help="skip the CPU memory measurement (a subprocess per configuration)")
    p.add_argument("--no-flops", dest="flops", action="store_false",
                   help="skip the FLOP count and the matrix-product rate (model FLOPs utilisation)")
    p.add_argument("--json", help="also append the JSON lines to this file")
    p.add_argument("--_memory_child", help=argparse.SUPPRESS)
    return p


def bench_main(argv: Sequence[str] | None = None) -> int:
    """The ``python -m hmn bench`` command; returns the exit code."""
    args = _parser().parse_args(list(argv) if argv is not None else None)
    if args._memory_child:
        _memory_child(args)
        return 0
    torch = _torch()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"error: --device {args.device} but no CUDA device is available", file=sys.stderr)
        return 2
    if min(args.batch, args.size, args.rounds) < 1:
        print("error: --batch, --size and --rounds must be positive", file=sys.stderr)
        return 2
    from hmn.networks import backbone_names

    # images only: the 3D backbones are measured on volumes by benchmarks/bench_3d.py
    unknown = [b for b in args.backbones if b not in backbone_names(spatial_dims=2)]
    if unknown:
        print(f"error: unknown backbone(s) {unknown}; accepted: {', '.join(backbone_names(spatial_dims=2))} "
              "(3D backbones: benchmarks/bench_3d.py)", file=sys.stderr)
        return 2
    records = measure(args)
    for r in records:
        line = json.dumps(r)
        print(line, flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(line + "\n")
    first = records[0]
    print(f"\n{first['device_name']} ({first['device']}), torch {torch.__version__}, {args.threads} threads, "
          f"{args.precision}, batch {args.batch}, {args.size}x{args.size}, 1 channel, "
          f"median of {args.rounds} interleaved steps" + (", channels_last" if args.channels_last else "")
          + (", torch.compile" if args.compile else "")
          + (f"; matrix products {first['matmul_tflops']:.3g} TFLOP/s" if first.get("matmul_tflops") else ""))
    print(_table(records))
    noisy = noisy_rows(records)
    if noisy:
        print(f"\nwarning: the timed steps of {len(noisy)} measurement(s) varied by more than {SPREAD_LIMIT}x "
              f"(slowest / fastest): {', '.join(noisy)}. Another process was probably using the machine; these "
              "times and the ratios taken from them are unreliable: rerun on a quiet machine, with more --rounds.",
              file=sys.stderr)
    return 0
