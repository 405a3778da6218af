"""Where and how a run computes: command-line booleans, the autocast type and channels-last weights of the GPU
fast path, bfloat16 autocast on a CPU that computes it natively, the DataLoader's workers and last batch, and
this process's rank under ``torchrun``.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping

import torch
from monai.inferers import Inferer

__all__ = ["AMP_DTYPES", "CPUAutocastInferer", "amp_kwargs", "as_bool", "cpu_bf16_supported", "default_num_workers",
           "drop_last_batch", "pretrained_given", "rank_world", "to_device", "worker_ignores_stop_signals"]


def as_bool(value: Any, name: str = "value") -> bool:
    """``True``/``False``, or the strings a command line gives (``true``, ``false``, ``1``, ``0``, ``yes``, ``no``)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no", "none", ""):
        return False
    raise ValueError(f"{name}={value!r} is not a boolean; accepted: true/false, 1/0, yes/no")


AMP_DTYPES = ("bfloat16", "float16")


def amp_kwargs(dtype: Any) -> dict[str, Any]:
    """The ``amp_kwargs`` of MONAI's ``SupervisedTrainer`` (``torch.autocast`` arguments) for the bundles'
    ``amp_dtype``: ``{"dtype": torch.bfloat16}`` or ``{"dtype": torch.float16}``.

    Raises:
        ValueError: `dtype` is not one of :data:`AMP_DTYPES` (a ``torch.dtype`` of those is accepted too).
    """
    name = str(dtype).removeprefix("torch.").strip().lower()
    if name not in AMP_DTYPES:
        raise ValueError(f"amp_dtype={dtype!r} is not accepted; use one of {AMP_DTYPES}")
    return {"dtype": getattr(torch, name)}


def drop_last_batch(num_items: int, batch_size: int, world_size: int | None = None) -> bool:
    """Whether the training DataLoader drops its last batch: only when that batch would hold a single item.

    BatchNorm in training mode cannot normalize one item (PyTorch raises "Expected more than 1 value per
    channel when training"), and the bundles' from-scratch recipe uses BatchNorm, so a training split of, say,
    9 at batch 4 stopped the run at the end of its first epoch. Dropping that item leaves it to another
    epoch's shuffle; every other split keeps its partial last batch.

    Args:
        num_items: the training dataset's length.
        batch_size: the DataLoader's batch size.
        world_size: processes sharing the dataset (a DistributedSampler gives each ``ceil(num_items /
            world_size)``); default: torch.distributed's world size when initialized, else 1.
    """
    if world_size is None:
        world_size = rank_world()[1]
    per_process = -(-int(num_items) // max(int(world_size), 1))
    return per_process > batch_size and per_process % batch_size == 1


def default_num_workers(cuda: bool | None = None, cpus: int | None = None, local_processes: int | None = None,
                        maximum: int = 8) -> int:
    """The bundles' default number of DataLoader worker processes.

    Without CUDA, 0: on the CPU the model, not loading, limits training (``benchmarks/bench_data.py``:
    the bundles' transforms load 100-600 images/s on 2 cores, a convnext_tiny training step runs at about
    7), and workers would only take cores from it. With CUDA, the CPUs this process may use
    (``os.sched_getaffinity``), shared among the node's torchrun processes (``LOCAL_WORLD_SIZE``), one left
    to the main process, between 1 and `maximum`.

    Args:
        cuda: whether CUDA is used (default: ``torch.cuda.is_available()``).
        cpus: the CPUs available (default: this process's affinity).
        local_processes: processes on this node (default: ``LOCAL_WORLD_SIZE``, else 1).
        maximum: the most workers per process.
    """
    if cuda is None:
        cuda = torch.cuda.is_available()
    if not cuda:
        return 0
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if local_processes is None:
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    share = max(1, int(cpus) // max(1, int(local_processes)))
    return max(1, min(int(maximum), share - 1))


def to_device(network: torch.nn.Module, device: Any, channels_last: Any = False) -> torch.nn.Module:
    """`network` moved to `device`; with `channels_last` its 4-D weights are stored channels-last (NHWC), so
    that convolutions (whose output follows the weight's layout) run in NHWC, the layout of the GPUs'
    tensor-core kernels. Values are unchanged; a state dict saved from it loads into a contiguous network."""
    if as_bool(channels_last, "channels_last"):
        return network.to(device=device, memory_format=torch.channels_last)
    return network.to(device)


def pretrained_given(value: Any) -> bool:
    """Whether a ``pretrained`` setting asks for weights: True, or a checkpoint path (False, None, "" and the
    command line's "false"/"0"/"no"/"none" do not)."""
    if isinstance(value, bool) or value is None:
        return bool(value)
    return str(value).strip().lower() not in ("", "false", "0", "no", "none")


# CPU flags (Linux /proc/cpuinfo) of native bfloat16 arithmetic: x86 AVX-512 BF16 and AMX-BF16, Arm BF16.
_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}


def cpu_bf16_supported(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes in bfloat16 natively, read from ``/proc/cpuinfo`` (or the text given).

    Looks for the ``avx512_bf16`` or ``amx_bf16`` flag (x86) or the ``bf16`` feature (Arm) on the
    ``flags``/``Features`` lines. Without native support PyTorch emulates bfloat16 and autocast to it is
    slower than float32, so the bundles' ``cpu_bf16`` default follows this answer. False where the file
    cannot be read (macOS, Windows).
    """
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features") and _BF16_FLAGS & set(value.split()):
            return True
    return False


def _as_float32(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, Mapping):
        return type(out)({k: _as_float32(v) for k, v in out.items()})
    if isinstance(out, (list, tuple)):
        return type(out)(_as_float32(v) for v in out)
    return out


class CPUAutocastInferer(Inferer):
    """The bundles' training inferer: the network's forward pass under bfloat16 autocast on a CPU.

    MONAI's ``amp`` switch is CUDA-only (it autocasts to ``"cuda"`` and uses a CUDA gradient scaler). This
    inferer does the CPU's part: when ``enabled`` and the input is on the CPU, the forward pass runs under
    ``torch.autocast("cpu", dtype=torch.bfloat16)`` (convolutions and matrix products in bfloat16, the rest
    as autocast decides) and the prediction comes back as float32, so the loss, its gradient and the
    optimizer step stay in float32 (bfloat16 has float32's range, so no loss scaling is needed). Inputs on
    another device, or ``enabled`` false, run the network as MONAI's ``SimpleInferer`` does. Validation,
    evaluation and inference keep ``SimpleInferer`` and float32.
    """

    def __init__(self, enabled: Any = False) -> None:
        self.enabled = as_bool(enabled, "cpu_bf16")

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not (self.enabled and inputs.device.type == "cpu"):
            return network(inputs, *args, **kwargs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = network(inputs, *args, **kwargs)
        return _as_float32(out)


def rank_world() -> tuple[int, int]:
    """``(rank, world size)`` of this process: torch.distributed's when its process group is initialized (under
    ``torchrun``), else ``(0, 1)``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def worker_ignores_stop_signals(worker_id: int) -> None:
    """A ``DataLoader`` ``worker_init_fn``: MONAI's (:func:`monai.data.utils.worker_init_fn`, which seeds the
    worker's random transforms), then SIGINT and SIGTERM ignored in the worker, so that a Ctrl-C sent to the whole
    process group (a terminal) or a SIGTERM sent to every process of a job (a cluster) reaches only the training
    process, which stops gracefully (:class:`hmn.workflows.TrainingRun`) and shuts its workers down itself."""
    import signal

    from monai.data.utils import worker_init_fn

    worker_init_fn(worker_id)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
