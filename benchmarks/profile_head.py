"""Where HybridMedNet's time goes: the backbone against the rest (pyramid, attention, fusion, head).

    python benchmarks/profile_head.py [--threads 2] [--batch 8] [--size 224]

For ``convnext_base`` with the ``self`` + ``cross_scale`` attention and ``convnext_tiny`` with CBAM (the
bundles' attention), built as the ConvNeXt bundles build them from scratch: ``torch.profiler``'s table of
one training step (forward, BCE, backward, AdamW step) by self CPU time, then the median of three forward
passes (no gradients) timed per submodule with forward hooks. Random one-channel images.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CASES = (("convnext_base", ["self", "cross_scale"]), ("convnext_tiny", ["cbam"]))
PARTS = ("backbone", "neck", "attention", "fusion", "head")


def main() -> None:
    from torch.profiler import ProfilerActivity, profile

    from hmn.networks import HybridMedNet

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rows", type=int, default=18)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for backbone, attention in CASES:
        torch.manual_seed(0)
        net = HybridMedNet(backbone, num_classes=14, img_size=args.size, attention=attention,
                           backbone_options={"norm": "batch", "ls_init_value": 1.0, "stem": "conv"}).train()
        opt = torch.optim.AdamW(net.parameters())
        x, y = torch.randn(args.batch, 1, args.size, args.size), torch.randint(0, 2, (args.batch, 14)).float()

        def step() -> None:
            opt.zero_grad()
            torch.nn.functional.binary_cross_entropy_with_logits(net(x), y).backward()
            opt.step()

        step()  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        print(f"=== {backbone}, attention {attention}: one training step, batch {args.batch}, {args.size}x{args.size}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))

        times: dict[str, list[float]] = {}
        hooks = []
        for name in PARTS:
            module = getattr(net, name)
            hooks.append(module.register_forward_pre_hook(lambda m, i, name=name: times.setdefault(name, []).append(-time.perf_counter())))
            hooks.append(module.register_forward_hook(lambda m, i, o, name=name: times[name].__setitem__(-1, times[name][-1] + time.perf_counter())))
        for _ in range(3):
            with torch.no_grad():
                net(x)
        for h in hooks:
            h.remove()
        med = {k: statistics.median(v) for k, v in times.items()}
        rest = sum(v for k, v in med.items() if k != "backbone")
        print("forward, median of 3 (s): " + ", ".join(f"{k} {v:.3f}" for k, v in med.items())
              + f"; all but the backbone {rest:.3f} ({100 * rest / sum(med.values()):.1f}%)\n")


if __name__ == "__main__":
    main()
