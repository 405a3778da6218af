"""Vision Mamba benchmark: the selective scan implementations and Vim against ConvNeXt.

    python benchmarks/bench_vim.py                 # CPU, 2 threads, 2-3 minutes on 2 cores (+ the kernel build)
    python benchmarks/bench_vim.py --device cuda   # the same figures on a GPU (with mamba_ssm if it imports)
    python benchmarks/bench_vim.py --quick         # a smoke run

Part 1, the scan at Vim-tiny's width (inner width 384, state 16) at the token counts of 224x224 and
512x512 inputs (197 and 1025 tokens): time of the forward pass (no autograd) and of forward + backward
for the chunked PyTorch scan, the sequential reference, on a CPU the fused C++ kernel (``impl="cpu_kernel"``,
built on first use where a C++ compiler is found) and, on CUDA with mamba_ssm, its kernel; the
peak memory of forward + backward and the bytes autograd keeps for the backward pass.

Memory is measured, not estimated: on CPU with the PyTorch profiler's allocation records (every
allocation and free of the CPU allocator during the call, summed in time order; the peak of the running
sum above what was allocated before the call; the chunked scan's reusable scratch buffers are released
first, so they are counted), on CUDA with ``torch.cuda.max_memory_allocated``. The
bytes kept for backward are the sizes of the tensors autograd saves (``saved_tensors_hooks``), counted
once per storage.

Part 2, whole backbones as the registry builds them (1 input channel): images and tokens per second of
``vim_tiny`` against ``convnext_tiny`` at 224 and 512, inference (``no_grad``, eval) and a training step
(forward + backward). Tokens are 16x16 patches, ``(H/16) * (W/16)``, the same count for both models.

Times are the minimum per call after one warm-up, over at least ``--repeats`` calls and at least
``--min-seconds`` (1) of calls (the machine may be shared); the tables say how many calls each figure
had. On a CPU shared with other work, use ``--threads 1``: with 2 OpenMP threads on 2 busy cores every
parallel op waits for a descheduled thread, which slows the many mid-sized ops of the chunked scan far
more than the reference's small single-threaded ones.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from typing import Callable

import torch
from _machine import cpu_name

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from hmn.networks.backbones import build_backbone  # noqa: E402
from hmn.networks import selective_scan as ss  # noqa: E402
from hmn.networks.selective_scan import (  # noqa: E402
    cpu_kernel_available,
    mamba_ssm_available,
    release_workspace,
    selective_scan,
    selective_scan_chunked,
    selective_scan_ref,
)

INNER, STATE = 384, 16  # Vim-tiny: embed 192, expansion 2, state 16


def machine(device: torch.device) -> str:
    cpu = cpu_name()
    lines = [
        f"- CPU: {cpu}, {os.cpu_count()} logical cores visible, torch threads: {torch.get_num_threads()}",
        f"- torch {torch.__version__}, Python {platform.python_version()}, {platform.system()} {platform.release()}",
        f"- mamba_ssm with its CUDA extension importable: {mamba_ssm_available()}",
    ]
    if device.type == "cuda":
        lines.append(f"- GPU: {torch.cuda.get_device_name(device)}")
    elif cpu_kernel_available():  # builds it (about half a minute the first time) before any timing
        kernel = ss._load_cpu_kernel()[0]
        lines.append(
            f"- fused CPU kernel: float forward loop {kernel.vector_path()}, "
            f"threads its parallel loops use: {kernel.workers_used(64)}"
        )
    try:
        load = os.getloadavg()
        lines.append(f"- load average at start (1/5/15 min): {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}")
    except OSError:
        pass
    return "\n".join(lines)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int, min_seconds: float) -> tuple[float, int]:
    """Minimum seconds per call after one warm-up, over at least ``repeats`` calls and at least ``min_seconds``
    of calls (so a call of a few milliseconds is timed hundreds of times: on a shared machine the minimum of
    three such calls can still be a disturbed one). Returns the time and the number of calls timed."""
    fn()
    sync(device)
    times: list[float] = []
    while len(times) < repeats or (sum(times) < min_seconds and len(times) < 1000):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times), len(times)


def peak_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated during ``fn`` above what was allocated before it."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    records.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in records:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def saved_for_backward(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of the tensors autograd keeps between ``fn``'s forward pass and its backward pass."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def scan_inputs(batch: int, length: int, device: torch.device, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    tensors = [
        rnd(batch, INNER, length),  # u
        rnd(batch, INNER, length) - 2.0,  # delta before softplus (step sizes ~0.1, as Mamba initialises)
        -torch.arange(1, STATE + 1, dtype=torch.float32).repeat(INNER, 1),  # A (S4D-real)
        rnd(batch, STATE, length),  # B
        rnd(batch, STATE, length),  # C
        torch.ones(INNER),  # D
        rnd(batch, INNER, length),  # z
        rnd(INNER) * 0.1,  # delta_bias
    ]
    return [t.to(device) for t in tensors]


def bench_scans(device: torch.device, batch: int, lengths: list[int], repeats: int, ref_repeats: int,
                min_seconds: float) -> list[str]:  # fmt: skip
    impls: dict[str, Callable] = {"chunked": selective_scan_chunked, "ref (sequential)": selective_scan_ref}
    if device.type == "cpu":
        if cpu_kernel_available():
            impls = {"fused CPU kernel": lambda *a, **k: selective_scan(*a, impl="cpu_kernel", **k), **impls}
        else:
            print(f"fused CPU kernel: not measured, {ss._load_cpu_kernel()[1]}", flush=True)
    if device.type == "cuda" and mamba_ssm_available():
        impls["mamba_ssm kernel"] = lambda *a, **k: selective_scan(*a, impl="cuda", **k)
    rows = [
        f"Selective scan, inner width {INNER}, state {STATE}, batch {batch}, float32, {device.type}",
        "",
        "| tokens | implementation | calls timed: fwd / fwd+bwd | forward ms | forward+backward ms | fwd+bwd peak MB "
        "| kept for backward MB | speed-up vs ref: forward / fwd+bwd |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for length in lengths:
        base = scan_inputs(batch, length, device)
        results = {}
        for name, fn in impls.items():
            reps = ref_repeats if name.startswith("ref") else repeats
            leaves = [t.clone().requires_grad_() for t in base]

            def forward() -> torch.Tensor:
                return fn(*leaves[:5], D=leaves[5], z=leaves[6], delta_bias=leaves[7], delta_softplus=True)

            def fwd_only() -> None:
                with torch.no_grad():
                    forward()

            def fwd_bwd() -> None:
                forward().sum().backward()
                for t in leaves:
                    t.grad = None

            t_fwd, reps_fwd = timed(fwd_only, device, reps, min_seconds)
            t_step, reps_step = timed(fwd_bwd, device, reps, min_seconds)
            reps = f"{reps_fwd} / {reps_step}"
            release_workspace()  # the chunked scan's reused scratch buffers count as allocated in the call
            mem = peak_memory(fwd_bwd, device)
            kept = saved_for_backward(forward)
            results[name] = (reps, t_fwd, t_step, mem, kept)
            print(f"  {length} tokens {name}: fwd {t_fwd * 1e3:.1f} ms, fwd+bwd {t_step * 1e3:.1f} ms "
                  f"({reps} calls), peak {mem / 1e6:.1f} MB, kept {kept / 1e6:.2f} MB", flush=True)  # fmt: skip
        ref = results["ref (sequential)"]
        for name, (reps, t_fwd, t_step, mem, kept) in results.items():
            rows.append(
                f"| {length} | {name} | {reps} | {t_fwd * 1e3:.1f} | {t_step * 1e3:.1f} | {mem / 1e6:.1f} | "
                f"{kept / 1e6:.2f} | {ref[1] / t_fwd:.1f}x / {ref[2] / t_step:.1f}x |"
            )
    return rows


def bench_models(device: torch.device, batch: int, sizes: list[int], repeats: int, train: bool,
                 vim_impls: list[str], min_seconds: float) -> list[str]:  # fmt: skip
    rows = [
        f"Backbones (registry build, 1 input channel, batch {batch}, float32, {device.type})",
        "",
        "| model | input | tokens/image | mode | images/s | tokens/s | ms/batch |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    models = [("convnext_tiny", None)] + [("vim_tiny", impl) for impl in vim_impls]
    for size in sizes:
        tokens = (size // 16) ** 2
        x = torch.randn(batch, 1, size, size, device=device)
        for name, impl in models:
            net = build_backbone(name, in_channels=1, img_size=size).to(device)
            if impl is not None:
                net.trunk.set_scan_impl(impl)
            label = name if impl is None else f"{name} (scan: {impl})"
            net.eval()

            def infer() -> None:
                with torch.no_grad():
                    net(x)

            modes = [("inference", infer)]
            if train:

                def step() -> None:
                    net.train()
                    sum(f.float().mean() for f in net(x)).backward()
                    net.zero_grad(set_to_none=True)

                modes.append(("train step", step))
            for mode, fn in modes:
                t, n = timed(fn, device, repeats, min_seconds)
                print(f"  {label} {size}px {mode}: {t * 1e3:.0f} ms/batch ({n} calls)", flush=True)
                rows.append(
                    f"| {label} | {size}x{size} | {tokens} | {mode} | {batch / t:.2f} | {batch * tokens / t:.0f} | "
                    f"{t * 1e3:.0f} |"
                )
            del net
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--scan-batch", type=int, default=1)
    p.add_argument("--model-batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ref-repeats", type=int, default=2, help="repeats of the slow sequential reference")
    p.add_argument("--min-seconds", type=float, default=1.0, help="time every figure over at least this long")
    p.add_argument("--no-train", action="store_true", help="skip the backbone training-step timings")
    p.add_argument("--skip-models", action="store_true")
    p.add_argument("--quick", action="store_true", help="short smoke run (small sizes, one repeat)")
    p.add_argument("--lengths", type=int, nargs="+", default=[197, 1025], help="scan token counts")
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 512], help="backbone input sizes")
    p.add_argument("--markdown", help="also write the tables to this file")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for but no CUDA device is available")
    lengths, sizes = (args.lengths, args.sizes) if not args.quick else ([197], [64])
    repeats = 1 if args.quick else args.repeats
    ref_repeats = 1 if args.quick else args.ref_repeats
    min_seconds = 0.0 if args.quick else args.min_seconds

    header = ["## Machine", "", machine(device), ""]
    print("\n".join(header), flush=True)
    out = header + bench_scans(device, args.scan_batch, lengths, repeats, ref_repeats, min_seconds) + [""]
    if not args.skip_models:
        vim_impls = ["auto"] + (["cpu_kernel"] if cpu_kernel_available() else [])
        if device.type == "cuda":
            vim_impls = ["chunked"] + (["cuda"] if mamba_ssm_available() else [])
        out += bench_models(device, args.model_batch, sizes, repeats, not args.no_train, vim_impls, min_seconds) + [""]
    text = "\n".join(out)
    print()
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
