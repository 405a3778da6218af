"""The selective scan of Mamba (Gu & Dao, 2023, "Mamba: Linear-Time Sequence Modeling with Selective State
Spaces", arXiv:2312.00752), in plain PyTorch, with the ``mamba_ssm`` CUDA kernel where it exists.

For every batch element ``b`` and channel ``d`` the scan runs the discretized state space model

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t          (state h_t of size N, h_{-1} = 0)
    y_t = <C_t, h_t> + D * u_t,     out_t = y_t * silu(z_t)          (when z is given)

with a per-token step size ``delta`` (optionally ``softplus(delta + delta_bias)``), a fixed diagonal
``A < 0`` and input-dependent ``B`` and ``C`` (Mamba's zero-order hold for ``A``, Euler for ``B``).

Five implementations with one signature, that of ``mamba_ssm``'s ``selective_scan_fn`` so the CUDA path
is a direct call:

* :func:`selective_scan_ref`: the sequential recurrence, one token at a time; the reference for tests.
* :func:`selective_scan_chunked`: the fast pure-PyTorch scan. The recurrence is linear, so it is computed
  blockwise: the sequence is cut into ``~sqrt(L)`` chunks, all chunks run their local recurrence at the
  same time (``sqrt(L)`` vectorized steps), the chunk-end states are carried across chunks by the same
  scan applied recursively, and a second pass over the chunk steps adds each chunk's carried-in state,
  decayed step by step. Only products of decays ``exp(delta * A) <= 1`` appear: nothing is divided by a
  decay or exponentiated from a positive number, so it is as stable as the sequential recurrence for any
  step size, and the work per element is constant (log-space segment sums would need a chunk x chunk
  decay matrix per channel and state). A custom autograd function keeps only its inputs and recomputes
  the states in the backward pass (itself a reverse linear scan), so memory stays linear in the sequence
  length, with no ``L x L`` or chunk x chunk tensor anywhere.
* :func:`selective_scan_cpu_kernel` (``impl="cpu_kernel"``): the whole scan (step size, recurrence, skip,
  gate) fused in C++ (``csrc/selective_scan_cpu.cpp``): the forward pass runs blocks of channels
  vectorized over the channels (AVX-512 intrinsics for float where the compiler targets them), the
  backward pass one row at a time; compiled for this CPU on first use by ``torch.utils.cpp_extension``
  (needs a C++ compiler; about half a minute, then cached), with OpenMP where torch uses it, so it runs on
  torch's threads. Input-dependent ``B``/``C`` of one group only (Vim's case). Opt-in: ``"auto"`` never
  compiles anything.
* :func:`selective_scan_export` (``impl="export"``): the blocked scan as plain out-of-place tensor
  operations (no autograd function, no in-place update of a view, no buffer kept between calls), which
  TorchScript compiles and the tracer and the ONNX exporter follow; what Vim runs when it is scripted,
  traced or exported, whatever its ``scan_impl``.
* ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn`` (``impl="cuda"``).

:func:`selective_scan` dispatches: ``impl="auto"`` uses the CUDA kernel when ``mamba_ssm`` imports with its
compiled extension and the tensors are on a CUDA device, otherwise the chunked scan, and logs once which
path it took. Asking for ``impl="cuda"`` or ``impl="cpu_kernel"`` where it is unavailable raises
:class:`SelectiveScanUnavailableError` saying why.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import threading
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "SelectiveScanUnavailableError",
    "SCAN_IMPLS",
    "cpu_kernel_available",
    "mamba_ssm_available",
    "release_workspace",
    "selective_scan",
    "selective_scan_chunked",
    "selective_scan_cpu_kernel",
    "selective_scan_export",
    "selective_scan_export_state",
    "selective_scan_ref",
]

logger = logging.getLogger(__name__)

SCAN_IMPLS = ("auto", "ref", "chunked", "cuda", "cpu_kernel", "export")

_LOG2E = 1.4426950408889634

# Sequences up to this length are scanned step by step (the blocked scheme has nothing to gain).
_SEQUENTIAL_MAX = 8


class SelectiveScanUnavailableError(RuntimeError):
    """Raised when a scan implementation was asked for but cannot run here (no ``mamba_ssm``, no GPU)."""


# ----------------------------------------------------------------------------------------------------------
# Argument checking and the common layout.
# ----------------------------------------------------------------------------------------------------------


def _check_args(u, delta, A, B, C, D, z, delta_bias) -> int:
    """Validates shapes and returns the number of groups of ``B``/``C`` (1 when not grouped)."""
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, channels, length), got shape {tuple(u.shape)}")
    batch, dim, length = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"delta must have the shape of u {tuple(u.shape)}, got {tuple(delta.shape)}")
    if A.is_complex() or B.is_complex() or C.is_complex():
        raise ValueError("complex A, B or C are not supported by the PyTorch scans; use real tensors (Mamba)")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must be (channels={dim}, state), got shape {tuple(A.shape)}")
    state = A.shape[1]
    groups = 1
    for name, m in (("B", B), ("C", C)):
        if m.dim() == 2:
            if tuple(m.shape) != (dim, state):
                raise ValueError(f"a fixed {name} must be (channels={dim}, state={state}), got {tuple(m.shape)}")
        elif m.dim() == 3:
            if tuple(m.shape) != (batch, state, length):
                raise ValueError(
                    f"an input-dependent {name} must be (batch={batch}, state={state}, length={length}), "
                    f"got {tuple(m.shape)}"
                )
        elif m.dim() == 4:
            if m.shape[0] != batch or m.shape[2] != state or m.shape[3] != length:
                raise ValueError(
                    f"a grouped {name} must be (batch={batch}, groups, state={state}, length={length}), "
                    f"got {tuple(m.shape)}"
                )
            g = m.shape[1]
            if g < 1 or dim % g:
                raise ValueError(f"the {g} groups of {name} must divide the {dim} channels")
            if groups not in (1, g):
                raise ValueError(f"B and C have different numbers of groups ({groups} and {g})")
            groups = g
        else:
            raise ValueError(
                f"{name} must be (channels, state), (batch, state, length) or (batch, groups, state, length), "
                f"got shape {tuple(m.shape)}"
            )
    if D is not None and tuple(D.shape) != (dim,):
        raise ValueError(f"D must be (channels={dim},), got shape {tuple(D.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z must have the shape of u {tuple(u.shape)}, got {tuple(z.shape)}")
    if delta_bias is not None and tuple(delta_bias.shape) != (dim,):
        raise ValueError(f"delta_bias must be (channels={dim},), got shape {tuple(delta_bias.shape)}")
    return groups


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Like the CUDA kernel, half-precision inputs are scanned in float32; float64 stays float64.
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Softplus(torch.autograd.Function):
    """``log(1 + exp(x))`` as ``relu(x) + log1p(exp(-|x|))``, gradient ``sigmoid(x)``.

    The same function as ``F.softplus`` to float rounding, written with vectorized ``exp``/``log``
    kernels: on the CPU, ATen's ``softplus`` and ``log1p`` are several times slower than ``exp``, ``log``
    and ``sigmoid`` together. ``log1p(e)`` is computed as ``log(u) * e / (u - 1)`` with ``u = 1 + e``
    (exact to a few ulp; plain ``log(1 + e)`` loses all precision for small ``e``), and as ``e`` where
    ``1 + e`` rounds to 1.
    """

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        e = torch.exp(-x.abs())
        u = e + 1.0
        d = u - 1.0
        l1p = torch.where(d == 0, e, torch.log(u).mul_(e).div_(d))
        return l1p.add_(x.clamp(min=0))

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * torch.sigmoid(x)


def softplus(x: torch.Tensor) -> torch.Tensor:
    """``F.softplus(x)`` (beta 1), faster on CPUs; see :class:`_Softplus`."""
    return _Softplus.apply(x)


def _prepare_delta(delta, delta_bias, delta_softplus, dtype):
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        delta = softplus(delta)
    return delta


def _grouped_bc(m: torch.Tensor, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """``B`` or ``C`` as a tensor broadcastable to ``(batch, groups, channels/groups, length, state)``."""
    m = m.to(dtype)
    if m.dim() == 2:  # fixed (channels, state)
        return m.reshape(1, groups, m.shape[0] // groups, 1, m.shape[1])
    if m.dim() == 3:  # (batch, state, length)
        return m.transpose(1, 2).unsqueeze(1).unsqueeze(1)
    return m.transpose(2, 3).unsqueeze(2)  # (batch, groups, state, length)


def _finish(y, u, D, z, out_dtype):
    """Adds the skip ``D * u`` and the gate ``silu(z)`` to the scan output ``y`` (batch, channels, length)."""
    if D is not None:
        y = y + u.to(y.dtype) * D.to(y.dtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(out_dtype)


# ----------------------------------------------------------------------------------------------------------
# The sequential reference.
# ----------------------------------------------------------------------------------------------------------


def _outside_autocast(fn: Callable) -> Callable:
    """Runs a project scan with autocast off for its input's device. The scans compute in float32 (float64
    for float64 inputs) by design; under an active autocast their batched matrix products would otherwise
    be cast to half precision behind their back, and a long recurrence in bfloat16 loses the state."""

    @functools.wraps(fn)
    def wrapper(u: torch.Tensor, *args, **kwargs):
        if torch.is_autocast_enabled(u.device.type):
            with torch.autocast(u.device.type, enabled=False):
                return fn(u, *args, **kwargs)
        return fn(u, *args, **kwargs)

    return wrapper


@_outside_autocast
def selective_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The selective scan, one token after the other, exactly as the recurrence is written.

    Slow (a Python loop over the sequence) and meant as the reference the fast scans are tested against.

    Args:
        u: input, ``(batch, channels, length)``.
        delta: step size before bias/softplus, ``(batch, channels, length)``.
        A: state matrix diagonal, ``(channels, state)``; negative for a stable model.
        B: input matrix, ``(batch, state, length)``, grouped ``(batch, groups, state, length)`` or fixed
            ``(channels, state)``.
        C: output matrix, shaped like ``B``.
        D: skip connection, ``(channels,)``.
        z: gate, ``(batch, channels, length)``; the output is multiplied by ``silu(z)``.
        delta_bias: added to ``delta``, ``(channels,)``.
        delta_softplus: apply ``softplus`` to ``delta + delta_bias``.
        return_last_state: also return the final state ``(batch, channels, state)``.

    Returns:
        ``out`` of shape ``(batch, channels, length)`` in the dtype of ``u`` (and the last state, in the
        compute dtype: float32, or float64 for float64 inputs).
    """
    groups = _check_args(u, delta, A, B, C, D, z, delta_bias)
    dtype = _compute_dtype(u.dtype)
    batch, dim, length = u.shape
    delta = _prepare_delta(delta, delta_bias, delta_softplus, dtype)
    uu = u.to(dtype).reshape(batch, groups, dim // groups, length)
    dl = delta.reshape(batch, groups, dim // groups, length)
    Ag = A.to(dtype).reshape(groups, dim // groups, A.shape[1])
    Bg = _grouped_bc(B, groups, dtype)
    Cg = _grouped_bc(C, groups, dtype)
    h = u.new_zeros((batch, groups, dim // groups, A.shape[1]), dtype=dtype)
    ys = []
    for t in range(length):
        decay = torch.exp(dl[..., t, None] * Ag)
        Bt = Bg[..., min(t, Bg.shape[-2] - 1), :]
        Ct = Cg[..., min(t, Cg.shape[-2] - 1), :]
        h = decay * h + (dl[..., t] * uu[..., t])[..., None] * Bt
        ys.append((h * Ct).sum(-1))
    y = torch.stack(ys, dim=-1).reshape(batch, dim, length)
    out = _finish(y, u, D, z, u.dtype)
    if return_last_state:
        return out, h.reshape(batch, dim, -1)
    return out


# ----------------------------------------------------------------------------------------------------------
# The blocked linear scan and the chunked selective scan. Tensors are time-major, (L, batch, groups, dg, N),
# so that one time step of every chunk is a few large contiguous blocks.
# ----------------------------------------------------------------------------------------------------------


def _scan_(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None, reverse: bool = False) -> torch.Tensor:
    """Overwrites ``b`` with the states of ``h_t = a_t * h_{t-1} + b_t`` along dim 0 and returns it.

    ``a`` and ``b`` are contiguous, of one shape ``(L, ...)``; ``a`` is left unchanged; the state before
    the first step is ``h0`` (zero when ``None``). With ``reverse`` the recurrence runs from ``t = L-1``
    down to 0 (``h_t = a_t * h_{t+1} + b_t``). The sequence is cut into ``n`` chunks of ``~sqrt(L)``
    steps; all chunks run their local recurrence together, their end states are carried across chunks
    by a recursive call on the ``n`` chunk summaries (decay product, local end state), and a second pass
    adds the carried-in state, decayed step by step, to each chunk. Only products of the ``a_t`` appear,
    never a quotient, so this is as stable as the plain loop.
    """
    length = b.shape[0]
    order = range(length - 1, -1, -1) if reverse else range(length)
    if length <= _SEQUENTIAL_MAX:
        prev = h0
        for t in order:
            if prev is not None:
                b[t].addcmul_(a[t], prev)
            prev = b[t]
        return b
    chunk = math.isqrt(length - 1) + 1
    n = length // chunk
    rest = length - n * chunk
    main = slice(rest, length) if reverse else slice(0, n * chunk)
    am = a[main].view(n, chunk, *a.shape[1:])
    bm = b[main].view(n, chunk, *b.shape[1:])
    steps = list(range(chunk - 1, -1, -1)) if reverse else list(range(chunk))
    # 1. the local recurrence of every chunk, and the decay over each whole chunk
    prod = am[:, steps[0]].clone()
    for p, t in zip(steps[:-1], steps[1:]):
        bm[:, t].addcmul_(am[:, t], bm[:, p])
        prod.mul_(am[:, t])
    # 2. the state at the end of each chunk (in scan order): the same recurrence on n chunk summaries
    ends = _scan_(prod, bm[:, steps[-1]].clone(), h0, reverse)
    # 3. the state entering each chunk, decayed through it and added step by step
    if reverse:
        sel, carry = slice(0, n - 1), ends[1:]
        if h0 is not None:
            sel, carry = slice(0, n), torch.cat([ends[1:], h0.unsqueeze(0)])
    else:
        sel, carry = slice(1, n), ends[:-1]
        if h0 is not None:
            sel, carry = slice(0, n), torch.cat([h0.unsqueeze(0), ends[:-1]])
    if carry.shape[0]:
        carry = carry.clone()
        for t in steps:
            carry.mul_(am[sel, t])
            bm[sel, t].add_(carry)
    # 4. the steps left over after the last whole chunk (before the first one, in reverse)
    if rest:
        prev = b[rest] if reverse else b[n * chunk - 1]
        for t in (range(rest - 1, -1, -1) if reverse else range(n * chunk, length)):
            b[t].addcmul_(a[t], prev)
            prev = b[t]
    return b


class _Workspace(threading.local):
    def __init__(self) -> None:
        self.buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}


_WORKSPACE = _Workspace()

# Largest CPU scratch buffer kept between calls (each of at most three); larger ones are allocated afresh.
WORKSPACE_MAX_BYTES = 1 << 30


def _workspace(slot: str, shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """A scratch tensor of ``shape`` (contents undefined) for the chunked scan's full-size buffers.

    On CPUs a fresh allocation of this size is returned to the OS when freed and page-faulted in again on
    the next call, which cost more than the arithmetic here (measured: 2/3 of a forward pass). So the
    buffers of the three slots (decay, state, adjoint) are kept per thread and reused; none of them is
    ever returned to the caller or alive across calls. CUDA has its own caching allocator.
    """
    numel = math.prod(shape)
    if like.device.type != "cpu" or numel * like.element_size() > WORKSPACE_MAX_BYTES:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    key = (slot, like.dtype)
    buf = _WORKSPACE.buffers.get(key)
    if buf is None or buf.numel() < numel:
        _WORKSPACE.buffers.pop(key, None)  # free the old one first
        buf = torch.empty(numel, dtype=like.dtype)
        _WORKSPACE.buffers[key] = buf
    return buf[:numel].view(shape)


def release_workspace() -> None:
    """Frees this thread's scratch buffers of the chunked scan (they are otherwise kept for reuse)."""
    _WORKSPACE.buffers.clear()


def _contract(h: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``sum_n h[..., n] * m[..., n]`` for states ``h`` (L, b, g, dg, N) and a time-major ``C`` (or ``B``):
    input-dependent ``(L, b, g or 1, N)`` as batched matrix-vector products on ``h``'s own layout (no
    full-size temporary, no transposed copy), fixed ``(g, dg, N)`` elementwise."""
    length, batch, groups, dg, n = h.shape
    if m.dim() == 3:
        return torch.linalg.vecdot(h, m)
    if m.shape[2] == 1:  # shared by all channels: one (g*dg, N) x (N,) product per (l, b)
        y = torch.bmm(h.view(length * batch, groups * dg, n), m.reshape(length * batch, n, 1))
    else:
        y = torch.bmm(h.view(length * batch * groups, dg, n), m.reshape(length * batch * groups, n, 1))
    return y.view(length, batch, groups, dg)


def _grad_of_bc(h: torch.Tensor, w: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``sum_d w[..., d] * h[..., d, n]`` reduced to the shape of ``m`` (the gradient through ``_contract``)."""
    length, batch, groups, dg, n = h.shape
    if m.dim() == 3:
        return torch.einsum("lbgdn,lbgd->gdn", h, w)
    if m.shape[2] == 1:
        out = torch.bmm(w.reshape(length * batch, 1, groups * dg), h.view(length * batch, groups * dg, n))
    else:
        out = torch.bmm(w.reshape(length * batch * groups, 1, dg), h.view(length * batch * groups, dg, n))
    return out.view(m.shape)


class _ChunkedScanFn(torch.autograd.Function):
    """``y_t = <C_t, h_t>``, ``h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t``, time-major.

    Shapes: ``u, delta``: (L, batch, groups, dg); ``A``: (groups, dg, N); ``B, C``: input-dependent
    (L, batch, groups or 1, N) or fixed (groups, dg, N). Returns ``y`` (L, batch, groups, dg) and the last
    state (batch, groups, dg, N). Only the inputs are saved: the backward pass recomputes the states and
    runs the adjoint recurrence (a reverse linear scan) with the same blocked scan. Full-size
    (L, batch, channels, N) buffers are few and updated in place: allocating them is a large part of the
    cost on CPUs, where fresh memory is page-faulted in.
    """

    @staticmethod
    def _decay(delta, A):
        # exp(delta A) as exp2(delta * A log2(e)): ATen's exp2 is about 3x faster than exp on CPUs, and the
        # factor folds into the small A
        shape = (*delta.shape, A.shape[-1])
        return torch.mul(delta.unsqueeze(-1), A * _LOG2E, out=_workspace("decay", shape, delta)).exp2_()

    @staticmethod
    def _drive(u, delta, B):
        du = (delta * u).unsqueeze(-1)
        shape = (*delta.shape, B.shape[-1])
        return torch.mul(du, B if B.dim() == 3 else B.unsqueeze(3), out=_workspace("state", shape, delta))

    @staticmethod
    def forward(ctx, u, delta, A, B, C):
        h = _scan_(_ChunkedScanFn._decay(delta, A), _ChunkedScanFn._drive(u, delta, B))
        y = _contract(h, C)
        ctx.save_for_backward(u, delta, A, B, C)
        ctx.set_materialize_grads(False)
        return y, h[-1].clone()

    @staticmethod
    def backward(ctx, dy, dlast):
        # A backward pass called inside an autocast region would cast the products below too.
        with torch.autocast(ctx.saved_tensors[0].device.type, enabled=False):
            return _ChunkedScanFn._backward(ctx, dy, dlast)

    @staticmethod
    def _backward(ctx, dy, dlast):
        u, delta, A, B, C = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(u)
        decay = _ChunkedScanFn._decay(delta, A)
        h = _scan_(decay, _ChunkedScanFn._drive(u, delta, B))
        dB = dC = du = ddelta = dA = None
        if ctx.needs_input_grad[4]:
            dC = _grad_of_bc(h, dy, C)
        # The adjoint g_t = dL/dh_t = C_t dy_t + exp(delta_{t+1} A) g_{t+1}, from t = L-1 down to 0.
        g = torch.mul(dy.unsqueeze(-1), C if C.dim() == 3 else C.unsqueeze(3), out=_workspace("adjoint", h.shape, h))
        if dlast is not None:
            g[-1].add_(dlast)
        if g.shape[0] > 1:
            _scan_(decay[1:], g[:-1], h0=g[-1], reverse=True)
        du_delta = delta * u
        dv = None  # dL/d(delta * u)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            dv = _contract(g, B)
        if ctx.needs_input_grad[3]:
            dB = _grad_of_bc(g, du_delta, B)
        if ctx.needs_input_grad[0]:
            du = dv * delta
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            # q = dL/d(delta_t A) = g_t * exp(delta_t A) * h_{t-1}, built in the decay's buffer
            q = decay
            q[1:].mul_(h[:-1])
            q[0].zero_()
            q.mul_(g)
            del g
            if ctx.needs_input_grad[2]:
                dA = torch.mul(q, delta.unsqueeze(-1), out=h).sum(dim=(0, 1))  # h's buffer is free now
            del h
            if ctx.needs_input_grad[1]:
                ddelta = q.mul_(A).sum(-1)
                if dv is not None:
                    ddelta.addcmul_(dv, u)
        return du, ddelta, dA, dB, dC


def _time_major_bc(m: torch.Tensor, groups: int, dtype: torch.dtype) -> torch.Tensor:
    m = m.to(dtype)
    if m.dim() == 2:  # fixed (channels, state) -> (groups, dg, state)
        return m.reshape(groups, m.shape[0] // groups, m.shape[1])
    if m.dim() == 3:  # (batch, state, length) -> (length, batch, 1, state)
        return m.permute(2, 0, 1).unsqueeze(2).contiguous()
    return m.permute(3, 0, 1, 2).contiguous()  # (batch, groups, state, length) -> (length, batch, groups, state)


@_outside_autocast
def selective_scan_chunked(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The selective scan by the blocked (chunked) linear scan: same arguments and results as
    :func:`selective_scan_ref`, much faster, and memory linear in the sequence length.
    """
    groups = _check_args(u, delta, A, B, C, D, z, delta_bias)
    dtype = _compute_dtype(u.dtype)
    batch, dim, length = u.shape
    dg = dim // groups
    delta = _prepare_delta(delta, delta_bias, delta_softplus, dtype)

    def time_major(x: torch.Tensor) -> torch.Tensor:
        return x.to(dtype).permute(2, 0, 1).reshape(length, batch, groups, dg).contiguous()

    y, last = _ChunkedScanFn.apply(
        time_major(u),
        time_major(delta),
        A.to(dtype).reshape(groups, dg, A.shape[1]),
        _time_major_bc(B, groups, dtype),
        _time_major_bc(C, groups, dtype),
    )
    out = _finish(y.reshape(length, batch, dim).permute(1, 2, 0), u, D, z, u.dtype)
    if return_last_state:
        return out, last.reshape(batch, dim, -1)
    return out


# ----------------------------------------------------------------------------------------------------------
# The export scan: plain tensor operations that TorchScript compiles and the tracer and ONNX exporter follow.
# ----------------------------------------------------------------------------------------------------------


def selective_scan_export_state(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    delta_softplus: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The selective scan as out-of-place tensor operations only, for TorchScript and ONNX export: returns
    ``(out, last_state)``, as :func:`selective_scan_ref` with ``return_last_state=True``; arguments as there.

    The chunked scan's speed comes from things an export cannot follow: a custom autograd function, in-place
    updates of views and per-thread scratch buffers kept between calls (the tracer fails on them with
    ``unordered_map::at``; the ONNX exporter cannot follow ``_Softplus``). This is the same blocked
    recurrence written plainly: the sequence is cut into ``n`` chunks of ``k ~ sqrt(L)`` steps (zero-padded
    at the end: a padded step has decay 1 and no input, so it changes no earlier state); ``k`` steps run
    the local recurrence of every chunk at once, keeping also the decay accumulated since the chunk's
    start; ``n - 1`` steps carry the state from chunk to chunk; each chunk then adds its entering state,
    decayed. Only products of decays ``exp(delta A) <= 1`` appear, as in the other scans. A trace or an
    ONNX graph holds ``k + n`` unrolled steps, about 30 for Vim's 197 tokens at 224 pixels. Memory is that
    of the states, ``(length, batch, channels, state)``; no input shape is checked here (see
    :func:`selective_scan_export`). Differentiable by autograd, but meant for inference.
    """
    dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    length = u.shape[2]
    dim = u.shape[1]
    step = delta.to(dtype)
    if delta_bias is not None:
        step = step + delta_bias.to(dtype).unsqueeze(-1)
    if delta_softplus:
        step = F.softplus(step)
    uu = u.to(dtype)
    # time-major: (length, batch, channels[, state]); B and C as (length, batch, channels or 1, state) or fixed
    step_t = step.permute(2, 0, 1)
    if B.dim() == 2:
        b_t = B.to(dtype)
    elif B.dim() == 3:
        b_t = B.to(dtype).permute(2, 0, 1).unsqueeze(2)
    else:
        b_t = B.to(dtype).permute(3, 0, 1, 2).repeat_interleave(dim // B.shape[1], dim=2)
    if C.dim() == 2:
        c_t = C.to(dtype)
    elif C.dim() == 3:
        c_t = C.to(dtype).permute(2, 0, 1).unsqueeze(2)
    else:
        c_t = C.to(dtype).permute(3, 0, 1, 2).repeat_interleave(dim // C.shape[1], dim=2)
    decay = torch.exp(step_t.unsqueeze(-1) * A.to(dtype))
    drive = (step_t * uu.permute(2, 0, 1)).unsqueeze(-1) * b_t
    state = A.shape[1]
    k = max(1, int(math.ceil(math.sqrt(length))))
    n = (length + k - 1) // k
    pad = n * k - length
    if pad > 0:
        decay = torch.cat([decay, torch.ones_like(decay[:pad])], dim=0)
        drive = torch.cat([drive, torch.zeros_like(drive[:pad])], dim=0)
    decay = decay.reshape(n, k, -1, dim, state)
    drive = drive.reshape(n, k, -1, dim, state)
    # 1. every chunk's local recurrence, and the decay through each of its steps
    h = drive[:, 0]
    through = decay[:, 0]
    hs = [h]
    throughs = [through]
    for t in range(1, k):
        h = decay[:, t] * h + drive[:, t]
        through = through * decay[:, t]
        hs.append(h)
        throughs.append(through)
    local = torch.stack(hs, dim=1)  # (n, k, batch, channels, state)
    decayed = torch.stack(throughs, dim=1)
    # 2. the state entering each chunk (zero for the first)
    carry = torch.zeros_like(local[0, 0])
    entering = [carry]
    for c in range(n - 1):
        carry = decayed[c, k - 1] * carry + local[c, k - 1]
        entering.append(carry)
    # 3. every state: the local one plus the entering state decayed through the chunk so far
    states = local + decayed * torch.stack(entering, dim=0).unsqueeze(1)
    states = states.reshape(n * k, -1, dim, state)[:length]
    y = (states * c_t).sum(-1).permute(1, 2, 0)  # (batch, channels, length)
    if D is not None:
        y = y + uu * D.to(dtype).unsqueeze(-1)
    if z is not None:
        y = y * F.silu(z.to(dtype))
    return y.to(u.dtype), states[length - 1]


@_outside_autocast
def selective_scan_export(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The selective scan by :func:`selective_scan_export_state` (``impl="export"``), with the arguments
    checked: same arguments and results as :func:`selective_scan_ref`. What Vim runs when it is scripted,
    traced or exported to ONNX; selectable eagerly to compare it with the other scans.
    """
    _check_args(u, delta, A, B, C, D, z, delta_bias)
    out, last = selective_scan_export_state(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if return_last_state:
        return out, last
    return out


# ----------------------------------------------------------------------------------------------------------
# The fused CPU kernel (C++, compiled on first use).
# ----------------------------------------------------------------------------------------------------------

_CPU_KERNEL_SOURCE = Path(__file__).with_name("csrc") / "selective_scan_cpu.cpp"
# The kernel's float forward pass has an AVX-512 loop where the compiler targets it and a portable one
# otherwise; True runs the portable loop everywhere (the tests use it so both loops are checked on one CPU).
_CPU_KERNEL_PORTABLE_LOOP = False


def _cpu_tag() -> str:
    """A short hash of this CPU's feature flags: the kernel is built with ``-march=native``, so a build
    cached in a home folder shared with another kind of CPU must not be reused there."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return hashlib.sha1(flags.encode()).hexdigest()[:8]


def _cpu_kernel_flags(openmp: bool) -> list[str]:
    # -fopenmp: torch's at::parallel_for is inline code that uses OpenMP pragmas when torch's parallel
    # backend is OpenMP; without the flag the kernel compiles but runs on one thread. Its GOMP calls resolve
    # to the OpenMP runtime torch already loaded, so torch.set_num_threads governs the kernel too.
    return ["-O3", "-march=native", "-ffast-math", "-fopenmp" if openmp else "-fopenmp-simd"]


@functools.lru_cache(maxsize=None)
def _load_cpu_kernel() -> tuple[Any | None, str]:
    """``(module, "")`` once the fused CPU kernel is built (or found in torch's extension cache), else ``(None, why)``.

    Where torch's threads are OpenMP's, the kernel is built with ``-fopenmp``; if that build fails (a
    compiler without OpenMP), it is built without it and a warning says the kernel will run on one thread.
    """
    try:
        from torch.utils.cpp_extension import load
    except Exception as err:
        return None, f"the fused CPU kernel could not be built here ({type(err).__name__}: {err})"
    name = f"hmn_selective_scan_cpu_{_cpu_tag()}"
    openmp_backend = torch.backends.openmp.is_available()
    failures = []
    for openmp in ([True, False] if openmp_backend else [False]):
        try:
            module = load(
                name=name if openmp else f"{name}_serial",
                sources=[str(_CPU_KERNEL_SOURCE)],
                extra_cflags=_cpu_kernel_flags(openmp),
                verbose=False,
            )
        except Exception as err:  # no compiler, no ninja, a failed build: say which
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            failures.append(f"{'with' if openmp else 'without'} OpenMP: {type(err).__name__}: {first}")
            continue
        if failures:
            logger.warning(
                "the fused CPU selective scan kernel could not be built with OpenMP (%s); it was built without "
                "and runs on one thread",
                failures[0],
            )
        return module, ""
    return None, f"the fused CPU kernel could not be built here ({'; '.join(failures)})"


def cpu_kernel_available() -> bool:
    """Whether the fused CPU kernel (``impl="cpu_kernel"``) can be used; builds it on the first call."""
    return _load_cpu_kernel()[0] is not None


class _CpuKernelScanFn(torch.autograd.Function):
    """The fused kernel as an autograd function. ``u, delta, z`` (batch, channels, L), ``A`` (channels, N),
    ``Bt, Ct`` (batch, L, N), ``D, bias`` (channels) or None, all contiguous in one dtype -> the gated output
    (batch, channels, L) and the last state (batch, channels, N)."""

    @staticmethod
    def forward(ctx, u, delta, A, Bt, Ct, D, z, bias, softplus):
        out, last = _load_cpu_kernel()[0].forward(u, delta, A, Bt, Ct, D, z, bias, softplus, _CPU_KERNEL_PORTABLE_LOOP)
        ctx.save_for_backward(u, delta, A, Bt, Ct, D, z, bias)
        ctx.softplus = softplus
        ctx.set_materialize_grads(False)
        return out, last

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A, Bt, Ct, D, z, bias = ctx.saved_tensors
        dout = torch.zeros_like(u) if dout is None else dout.contiguous()
        dlast = None if dlast is None else dlast.contiguous()
        du, ddelta, dA, dB, dC, dD, dz, dbias = _load_cpu_kernel()[0].backward(
            u, delta, A, Bt, Ct, D, z, bias, ctx.softplus, dout, dlast, torch.get_num_threads()
        )
        none_if_absent = lambda g, t: g if t is not None else None  # noqa: E731
        return du, ddelta, dA, dB, dC, none_if_absent(dD, D), none_if_absent(dz, z), none_if_absent(dbias, bias), None


@_outside_autocast
def selective_scan_cpu_kernel(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The selective scan by the fused C++ kernel: same arguments and results as :func:`selective_scan_ref`,
    for CPU tensors with input-dependent ``B`` and ``C`` of shape ``(batch, N, L)``.

    Raises :class:`SelectiveScanUnavailableError` (saying why) where the kernel cannot be built, the tensors
    are not on the CPU, or ``B``/``C`` have another layout.
    """
    _check_args(u, delta, A, B, C, D, z, delta_bias)
    if u.device.type != "cpu":
        raise SelectiveScanUnavailableError(f"selective scan impl='cpu_kernel' needs CPU tensors, got tensors on {u.device}")
    if B.dim() != 3 or C.dim() != 3:
        raise SelectiveScanUnavailableError(
            "selective scan impl='cpu_kernel' covers input-dependent B and C of shape (batch, state, length) only, "
            f"got B {tuple(B.shape)} and C {tuple(C.shape)}; use impl='chunked'"
        )
    kernel, why = _load_cpu_kernel()
    if kernel is None:
        raise SelectiveScanUnavailableError(f"selective scan impl='cpu_kernel' was asked for but {why}; use impl='chunked'")
    dtype = _compute_dtype(u.dtype)

    def prep(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(dtype).contiguous()

    out, last = _CpuKernelScanFn.apply(
        prep(u), prep(delta), prep(A), prep(B.transpose(1, 2)), prep(C.transpose(1, 2)),
        prep(D), prep(z), prep(delta_bias), bool(delta_softplus),
    )  # fmt: skip
    out = out.to(u.dtype)
    if return_last_state:
        return out, last
    return out


# ----------------------------------------------------------------------------------------------------------
# The mamba_ssm CUDA kernel and the dispatcher.
# ----------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _load_mamba_kernel() -> tuple[Callable | None, str]:
    """``(selective_scan_fn, "")`` when ``mamba_ssm`` imports with its compiled extension, else ``(None, why)``."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn  # type: ignore[import-not-found]
        import selective_scan_cuda  # type: ignore[import-not-found]  # noqa: F401  the compiled extension
    except Exception as err:  # ImportError, or OSError/RuntimeError from a broken extension build
        return None, f"mamba_ssm with its CUDA extension does not import here ({type(err).__name__}: {err})"
    return selective_scan_fn, ""


def mamba_ssm_available() -> bool:
    """Whether ``mamba_ssm``'s compiled selective-scan kernel can be used (it also needs CUDA tensors)."""
    return _load_mamba_kernel()[0] is not None


_LOGGED_PATHS: set[tuple[str, str]] = set()


def _log_path_once(path: str, device: torch.device, why: str) -> None:
    key = (path, device.type)
    if key not in _LOGGED_PATHS:
        _LOGGED_PATHS.add(key)
        logger.info("selective scan on %s: using the %s implementation (%s)", device.type, path, why)


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    impl: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The selective scan by the implementation ``impl``; arguments as :func:`selective_scan_ref`.

    Args:
        impl: ``"auto"`` (the ``mamba_ssm`` CUDA kernel for CUDA tensors where it imports, else
            ``"chunked"``), ``"chunked"``, ``"ref"`` (sequential), ``"export"`` (plain tensor operations,
            what a scripted, traced or ONNX-exported Vim runs), ``"cuda"`` (``mamba_ssm``) or
            ``"cpu_kernel"`` (the fused C++ kernel, built on first use); the last two raise
            :class:`SelectiveScanUnavailableError` where they cannot run.
    """
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if impl == "auto":
        kernel, why = _load_mamba_kernel()
        if kernel is not None and u.is_cuda:
            _log_path_once("mamba_ssm CUDA", u.device, "mamba_ssm imports with its extension")
            return kernel(*args)
        reason = "tensors are not on a CUDA device" if kernel is not None else why
        _log_path_once("chunked PyTorch", u.device, reason)
        return selective_scan_chunked(*args)
    if impl == "chunked":
        return selective_scan_chunked(*args)
    if impl == "ref":
        return selective_scan_ref(*args)
    if impl == "export":
        return selective_scan_export(*args)
    if impl == "cpu_kernel":
        return selective_scan_cpu_kernel(*args)
    if impl == "cuda":
        kernel, why = _load_mamba_kernel()
        if kernel is None:
            raise SelectiveScanUnavailableError(
                f"selective scan impl='cuda' was asked for but {why}; install mamba-ssm on a CUDA machine "
                "(pip install mamba-ssm --no-build-isolation) or use impl='auto' or 'chunked'"
            )
        if not u.is_cuda:
            raise SelectiveScanUnavailableError(
                f"selective scan impl='cuda' needs CUDA tensors, got tensors on {u.device}; "
                "move the model to a GPU or use impl='auto' or 'chunked'"
            )
        return kernel(*args)
    raise ValueError(f"unknown selective scan impl {impl!r}; valid: {', '.join(SCAN_IMPLS)}")
