"""The selective scan: the sequential reference against a hand-worked case, the chunked scan against the
reference (float64, values and gradients) and finite differences, and the dispatcher's choices."""

from __future__ import annotations

import logging
import math
import os

import pytest
import torch
import torch.nn.functional as F

from hmn.networks import selective_scan as ss
from hmn.networks.selective_scan import (
    SelectiveScanUnavailableError,
    mamba_ssm_available,
    selective_scan,
    selective_scan_chunked,
    selective_scan_cpu_kernel,
    selective_scan_ref,
)

F64 = torch.float64


def make_inputs(batch=2, dim=6, state=4, length=9, layout="input", groups=2, dtype=F64, seed=0,
                delta_shift=-1.0, a_scale=1.0):  # fmt: skip
    """Random scan inputs; ``layout``: input-dependent B/C (batch, N, L), grouped, or fixed (D, N)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    u = rnd(batch, dim, length)
    delta = F.softplus(rnd(batch, dim, length) * 0.5 + delta_shift)  # positive, so decays are <= 1 either way
    A = -torch.exp(rnd(dim, state)) * a_scale
    if layout == "input":
        B, C = rnd(batch, state, length), rnd(batch, state, length)
    elif layout == "grouped":
        B, C = rnd(batch, groups, state, length), rnd(batch, groups, state, length)
    elif layout == "fixed_b":
        B, C = rnd(dim, state), rnd(batch, state, length)
    else:
        raise ValueError(layout)
    return dict(u=u, delta=delta, A=A, B=B, C=C, D=rnd(dim), z=rnd(batch, dim, length), delta_bias=rnd(dim) * 0.3)


def run(fn, inputs, *, with_z=True, with_d=True, with_bias=True, softplus=True, grad=True, seed=1):
    """Output, last state and the gradients of every input for a random linear function of both."""
    leaves = {k: v.clone().requires_grad_(grad) for k, v in inputs.items()}
    kw = dict(
        D=leaves["D"] if with_d else None,
        z=leaves["z"] if with_z else None,
        delta_bias=leaves["delta_bias"] if with_bias else None,
        delta_softplus=softplus,
        return_last_state=True,
    )
    out, last = fn(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"], **kw)
    grads = {}
    if grad:
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(out.shape, generator=g, dtype=F64).to(out.device, out.dtype)  # the same weights in any dtype
        wl = torch.randn(last.shape, generator=g, dtype=F64).to(last.device, last.dtype)
        used = [k for k in leaves if kw.get(k, True) is not None]
        ds = torch.autograd.grad((out * w).sum() + (last * wl).sum(), [leaves[k] for k in used])
        grads = dict(zip(used, ds))
    return out, last, grads


def assert_same(a, b, rtol=1e-10, atol=1e-10):
    out_a, last_a, grads_a = a
    out_b, last_b, grads_b = b
    torch.testing.assert_close(out_a, out_b, rtol=rtol, atol=atol)
    torch.testing.assert_close(last_a, last_b, rtol=rtol, atol=atol)
    assert grads_a.keys() == grads_b.keys()
    for k in grads_a:
        torch.testing.assert_close(grads_a[k], grads_b[k], rtol=rtol, atol=atol, msg=lambda m: f"d{k}: {m}")


def test_reference_against_a_hand_worked_case():
    # One channel, one state, exp(delta * A) = 1/2 at every step, B = 1:
    # h = ln2 * [1, 2.5, 4.25], y = C h + D u, out = y * silu(z).
    ln2 = math.log(2.0)
    u = torch.tensor([[[1.0, 2.0, 3.0]]], dtype=F64)
    delta = torch.full_like(u, ln2)
    A = torch.tensor([[-1.0]], dtype=F64)
    B = torch.ones(1, 1, 3, dtype=F64)
    C = torch.tensor([[[1.0, 2.0, 1.0]]], dtype=F64)
    D = torch.tensor([0.5], dtype=F64)
    z = torch.tensor([[[0.0, 1.0, -2.0]]], dtype=F64)
    h = ln2 * torch.tensor([1.0, 2.5, 4.25], dtype=F64)
    expected = (C[0, 0] * h + 0.5 * u[0, 0]) * F.silu(z[0, 0])
    for fn in (selective_scan_ref, selective_scan_chunked):
        out, last = fn(u, delta, A, B, C, D=D, z=z, return_last_state=True)
        torch.testing.assert_close(out[0, 0], expected)
        torch.testing.assert_close(last, h[-1].reshape(1, 1, 1))
    # softplus(delta + bias) with bias = 0 and delta = log(e^ln2 - 1) gives the same step size
    pre = torch.full_like(u, math.log(math.exp(ln2) - 1.0))
    out = selective_scan_ref(u, pre, A, B, C, D=D, z=z, delta_bias=torch.zeros(1, dtype=F64), delta_softplus=True)
    torch.testing.assert_close(out[0, 0], expected)


@pytest.mark.numerics
@pytest.mark.parametrize("length", [1, 2, 7, 8, 9, 10, 64, 65, 197, 1025])
@pytest.mark.parametrize("options", ["plain", "full"])
def test_chunked_matches_the_reference(length, options):
    """float64, lengths below, at and around the blocking sizes (chunks of ceil(sqrt(L)), with leftovers)."""
    full = options == "full"
    dim = 4 if length > 200 else 6
    inputs = make_inputs(dim=dim, length=length, seed=length)
    kw = dict(with_z=full, with_d=full, with_bias=full, softplus=full)
    assert_same(run(selective_scan_chunked, inputs, **kw), run(selective_scan_ref, inputs, **kw))


@pytest.mark.parametrize("layout", ["grouped", "fixed_b"])
@pytest.mark.parametrize("length", [5, 50])
def test_chunked_matches_the_reference_for_grouped_and_fixed_b(layout, length):
    inputs = make_inputs(layout=layout, length=length, seed=3)
    assert_same(run(selective_scan_chunked, inputs), run(selective_scan_ref, inputs))


def test_chunked_gradients_against_finite_differences():
    inputs = make_inputs(batch=1, dim=3, state=2, length=11, seed=5)
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    leaves = [inputs[k].clone().requires_grad_() for k in names]

    def fn(u, delta, A, B, C, D, z, delta_bias):
        out, last = selective_scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True,
                                           return_last_state=True)  # fmt: skip
        return out, last

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_extreme_step_sizes_stay_finite_and_exact(dtype):
    """Decays that underflow to exactly 0 (delta * A down to -2e3) next to decays of ~1 (delta ~ 1e-6):
    the chunked scan only ever multiplies decays, so it stays finite and matches the reference."""
    inputs = make_inputs(dim=8, length=300, seed=7)
    g = torch.Generator().manual_seed(8)
    scale = torch.where(torch.rand(2, 8, 300, generator=g) < 0.5, 40.0, 1e-6).to(F64)
    inputs["delta"] = torch.rand(2, 8, 300, generator=g, dtype=F64) * scale
    inputs["A"] = inputs["A"] * 10
    ref = run(selective_scan_ref, inputs, softplus=False, with_bias=False)
    low = {k: v.to(dtype) for k, v in inputs.items()}
    got = run(selective_scan_chunked, low, softplus=False, with_bias=False)
    for t in (got[0], got[1], *got[2].values()):
        assert torch.isfinite(t).all()
    tol = 1e-10 if dtype == F64 else 1e-5
    scale_out = ref[0].abs().max()
    torch.testing.assert_close(got[0].to(F64) / scale_out, ref[0] / scale_out, rtol=tol, atol=tol)
    for k in ref[2]:
        s = ref[2][k].abs().max()
        torch.testing.assert_close(got[2][k].to(F64) / s, ref[2][k] / s, rtol=tol, atol=tol)


@pytest.mark.numerics
def test_float32_and_bfloat16_follow_the_float64_reference():
    inputs = make_inputs(dim=16, state=8, length=197, seed=11)
    ref, last_ref, _ = run(selective_scan_ref, inputs, grad=False)
    f32 = {k: v.float() for k, v in inputs.items()}
    out, last, _ = run(selective_scan_chunked, f32, grad=False)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    bf16 = {k: v.to(torch.bfloat16) if k in ("u", "delta", "z", "B", "C") else v.float() for k, v in inputs.items()}
    out16, _, _ = run(selective_scan_chunked, bf16, grad=False)
    assert out16.dtype == torch.bfloat16  # computed in float32 like the CUDA kernel, returned in u's dtype
    ref16, _, _ = run(selective_scan_ref, bf16, grad=False)
    torch.testing.assert_close(out16.float(), ref16.float(), rtol=2e-2, atol=2e-2 * ref16.abs().max().item())


@pytest.mark.numerics
@pytest.mark.parametrize("fn", [selective_scan_chunked, selective_scan_ref])
def test_scans_stay_float32_under_cpu_bfloat16_autocast(fn):
    """The bundles' CPU training runs the network under bfloat16 autocast; the scan must not follow it."""
    inputs = {k: v.float() for k, v in make_inputs(dim=16, state=8, length=197, seed=5).items()}
    plain = run(fn, inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = run(fn, inputs)
    assert autocast[0].dtype == torch.float32
    assert_same(autocast, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("length", [3, 9, 50, 1000, 4099])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("with_h0", [False, True])
def test_blocked_linear_recurrence_against_a_loop(length, reverse, with_h0):
    """The primitive under the chunked scan, recursion levels and leftover steps included."""
    g = torch.Generator().manual_seed(length)
    a = torch.rand(length, 3, 2, generator=g, dtype=F64)
    b = torch.randn(length, 3, 2, generator=g, dtype=F64)
    h0 = torch.randn(3, 2, generator=g, dtype=F64) if with_h0 else None
    expected = torch.empty_like(b)
    prev = h0 if with_h0 else torch.zeros(3, 2, dtype=F64)
    for t in range(length - 1, -1, -1) if reverse else range(length):
        prev = a[t] * prev + b[t]
        expected[t] = prev
    a_before = a.clone()
    got = ss._scan_(a, b.clone(), h0, reverse=reverse)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(a, a_before)


def test_auto_uses_the_chunked_scan_on_cpu_and_says_so_once(caplog, monkeypatch):
    monkeypatch.setattr(ss, "_LOGGED_PATHS", set())
    inputs = make_inputs(length=20)
    args = [inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "z")]
    with caplog.at_level(logging.INFO, logger="hmn.networks.selective_scan"):
        out = selective_scan(*args, impl="auto")
        selective_scan(*args, impl="auto")
    torch.testing.assert_close(out, selective_scan_ref(*args))
    messages = [r.getMessage() for r in caplog.records if "selective scan" in r.getMessage()]
    assert len(messages) == 1 and "chunked PyTorch" in messages[0] and "cpu" in messages[0]


def test_cuda_impl_where_unavailable_says_why():
    inputs = make_inputs(length=4)
    args = [inputs[k] for k in ("u", "delta", "A", "B", "C")]
    # CPU tensors: either mamba_ssm is missing or the tensors are not on a GPU; both are named.
    with pytest.raises(SelectiveScanUnavailableError, match=r"impl='cuda'.*(does not import|needs CUDA tensors)"):
        selective_scan(*args, impl="cuda")
    with pytest.raises(ValueError, match="unknown selective scan impl 'fast'; valid: auto, ref, chunked, cuda, cpu_kernel"):
        selective_scan(*args, impl="fast")


def test_bad_shapes_are_named():
    inputs = make_inputs(length=4)
    u, delta, A, B, C = (inputs[k] for k in ("u", "delta", "A", "B", "C"))
    with pytest.raises(ValueError, match=r"delta must have the shape of u \(2, 6, 4\), got \(2, 6, 5\)"):
        selective_scan_chunked(u, torch.zeros(2, 6, 5, dtype=F64), A, B, C)
    with pytest.raises(ValueError, match=r"input-dependent B must be \(batch=2, state=4, length=4\)"):
        selective_scan_chunked(u, delta, A, B[:, :3], C)
    with pytest.raises(ValueError, match="complex A"):
        selective_scan_chunked(u, delta, A.to(torch.complex128), B, C)
    with pytest.raises(ValueError, match="groups of B must divide the 6 channels"):
        selective_scan_chunked(u, delta, A, torch.zeros(2, 4, 4, 4, dtype=F64), C)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_mamba = pytest.mark.skipif(
    not (torch.cuda.is_available() and mamba_ssm_available()), reason="needs mamba_ssm with its CUDA extension"
)


@needs_cuda
def test_chunked_scan_on_cuda_matches_the_reference():
    inputs = make_inputs(dim=32, state=16, length=197, dtype=torch.float32, seed=2)
    ref = run(selective_scan_ref, {k: v.double() for k, v in inputs.items()})
    got = run(selective_scan_chunked, {k: v.cuda() for k, v in inputs.items()})
    torch.testing.assert_close(got[0].cpu().double(), ref[0], rtol=1e-3, atol=1e-3)
    for k in ref[2]:
        s = ref[2][k].abs().max()
        torch.testing.assert_close(got[2][k].cpu().double() / s, ref[2][k] / s, rtol=1e-3, atol=1e-3)


@needs_mamba
@pytest.mark.parametrize("length", [197, 1025])
def test_mamba_ssm_kernel_agrees_with_the_chunked_scan(length):
    inputs = {k: v.cuda() for k, v in make_inputs(dim=64, state=16, length=length, dtype=torch.float32).items()}
    kernel = run(lambda *a, **k: selective_scan(*a, impl="cuda", **k), inputs)
    ours = run(selective_scan_chunked, inputs)
    torch.testing.assert_close(kernel[0], ours[0], rtol=1e-3, atol=1e-3)
    for k in ours[2]:
        s = ours[2][k].abs().max()
        torch.testing.assert_close(kernel[2][k] / s, ours[2][k] / s, rtol=2e-3, atol=2e-3)


def test_results_do_not_share_the_reused_scratch_buffers():
    """The chunked scan reuses its CPU scratch buffers between calls; nothing it returns may alias them."""
    first = make_inputs(length=40, seed=21)
    second = make_inputs(length=40, seed=22)
    out1, last1, grads1 = run(selective_scan_chunked, first)
    kept = (out1.clone(), last1.clone(), {k: v.clone() for k, v in grads1.items()})
    leaves = {k: v.clone().requires_grad_() for k, v in second.items()}
    out2 = selective_scan_chunked(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"])
    out2.sum().backward()  # another forward and backward in between
    assert_same((out1, last1, grads1), kept, rtol=0, atol=0)
    assert_same((out1, last1, grads1), run(selective_scan_ref, first))


def test_softplus_matches_log1p_exp_everywhere():
    from hmn.networks.selective_scan import softplus

    x = torch.cat([torch.linspace(-700, 700, 20001, dtype=F64), torch.randn(5000, dtype=F64)]).requires_grad_()
    y = softplus(x)
    # independent expectation: log1p(exp(x)) is exact in float64 wherever exp(x) does not overflow
    def expected_of(v):
        return torch.where(v > 30, v + torch.exp(-v), torch.log1p(torch.exp(v.clamp(max=30))))

    torch.testing.assert_close(y, expected_of(x.detach()), rtol=4 * torch.finfo(F64).eps, atol=0)
    (grad,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(grad, torch.sigmoid(x.detach()), rtol=0, atol=0)
    x32 = x.detach().float()
    expected32 = expected_of(x32.double()).float()
    # float32: a few ulp, and absolute for the subnormal results (x below about -87)
    f32 = torch.finfo(torch.float32)
    torch.testing.assert_close(softplus(x32), expected32, rtol=4 * f32.eps, atol=f32.tiny)


# ----------------------------------------------------------------------------------------------------------
# The fused CPU kernel (compiled on first use; skipped, with the reason, where no C++ toolchain builds it).
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cpu_kernel():
    kernel, why = ss._load_cpu_kernel()
    if kernel is None:
        pytest.skip(why)
    return kernel


@pytest.mark.parametrize("state", [16, 5])  # the compile-time state size of Vim, and the generic loop
@pytest.mark.parametrize("length", [1, 2, 9, 64, 197])
@pytest.mark.parametrize("options", ["plain", "softplus", "full"])
def test_cpu_kernel_matches_the_reference(cpu_kernel, state, length, options):
    """float64: values, last state and the gradients of every input, with and without z, D, bias, softplus."""
    inputs = make_inputs(dim=6, state=state, length=length, seed=length + state)
    kw = dict(with_z=options == "full", with_d=options == "full", with_bias=options != "plain", softplus=options != "plain")
    ref = run(selective_scan_ref, inputs, **kw)
    assert_same(run(selective_scan_cpu_kernel, inputs, **kw), ref)
    assert_same(run(lambda *a, **k: selective_scan(*a, impl="cpu_kernel", **k), inputs, **kw), ref)  # the dispatcher


def test_cpu_kernel_partial_sums_over_threads(cpu_kernel):
    """dA, dB, dC, dD and the bias gradient are summed over rows by several workers."""
    inputs = make_inputs(batch=3, dim=10, state=16, length=33, seed=3)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert_same(run(selective_scan_cpu_kernel, inputs), run(selective_scan_ref, inputs))
    finally:
        torch.set_num_threads(threads)


def test_cpu_kernel_float32_and_extreme_steps(cpu_kernel):
    inputs = make_inputs(dim=16, state=16, length=197, seed=11, delta_shift=4.0, a_scale=50.0)
    ref, last_ref, _ = run(selective_scan_ref, inputs, grad=False)
    out, last, grads = run(selective_scan_cpu_kernel, {k: v.float() for k, v in inputs.items()})
    assert out.dtype == torch.float32 and all(torch.isfinite(g).all() for g in grads.values())
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    torch.testing.assert_close(last.double(), last_ref, rtol=1e-4, atol=1e-4 * last_ref.abs().max().item())


@pytest.mark.parametrize("loop", ["default", "portable"])
@pytest.mark.parametrize("state", [16, 5])
def test_cpu_kernel_float32_blocks_match_the_reference(cpu_kernel, monkeypatch, loop, state):
    """float32 through both forward loops (AVX-512 intrinsics where built, and the portable one): 2 images x 40
    channels, so two full 16-channel blocks and a partial one per image; every fifth raw step size drawn from
    -30..30 so softplus, 2^x and sigmoid are exercised far from 0. Output, last state and every gradient
    within 2e-6 of the float64 reference, relative to its largest value (observed: at most 7e-7; the
    reference's own float32 run, 3e-7; a degree-5 2^x polynomial, 2.4e-6 for the gradient of A)."""
    monkeypatch.setattr(ss, "_CPU_KERNEL_PORTABLE_LOOP", loop == "portable")
    inputs = make_inputs(batch=2, dim=40, state=state, length=197, seed=5)
    g = torch.Generator().manual_seed(6)
    wide = torch.rand(2, 40, 197, generator=g, dtype=F64) * 60 - 30
    small = torch.randn(2, 40, 197, generator=g, dtype=F64) * 0.5 - 1
    inputs["delta"] = torch.where(torch.arange(197) % 5 == 0, wide, small)
    ref_out, ref_last, ref_grads = run(selective_scan_ref, inputs)
    out, last, grads = run(selective_scan_cpu_kernel, {k: v.float() for k, v in inputs.items()})
    assert out.dtype == last.dtype == torch.float32

    def rel_err(got, want):
        return ((got.double() - want).abs().max() / want.abs().max()).item()

    assert rel_err(out, ref_out) < 2e-6
    assert rel_err(last, ref_last) < 2e-6
    assert grads.keys() == ref_grads.keys()
    for k in ref_grads:
        assert rel_err(grads[k], ref_grads[k]) < 2e-6, k


def test_cpu_kernel_takes_the_avx512_loop_where_the_cpu_has_it(cpu_kernel):
    """The kernel is built with -march=native: on a CPU with AVX-512F its float forward pass must use it."""
    if not os.path.exists("/proc/cpuinfo"):
        pytest.skip("no /proc/cpuinfo to read the CPU's flags from")
    with open("/proc/cpuinfo") as f:
        flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    assert cpu_kernel.vector_path() == ("avx512" if "avx512f" in flags else "portable")


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two CPU cores")
def test_cpu_kernel_runs_on_torchs_threads(cpu_kernel):
    """The kernel's parallel loops use as many threads as torch is set to (a build without the OpenMP flag
    compiles, but runs on one thread)."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert cpu_kernel.workers_used(64) == 2
        torch.set_num_threads(1)
        assert cpu_kernel.workers_used(64) == 1
    finally:
        torch.set_num_threads(threads)


def test_cpu_kernel_build_without_openmp_is_said(monkeypatch, caplog):
    """Where the OpenMP build fails, the kernel is built without it and a warning says it runs on one thread."""
    import torch.utils.cpp_extension as cpp_extension

    calls = []

    def fake_load(name, sources, extra_cflags, verbose):
        calls.append((name, extra_cflags))
        if "-fopenmp" in extra_cflags:
            raise RuntimeError("unsupported option '-fopenmp'")
        return "serial module"

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    monkeypatch.setattr(torch.backends.openmp, "is_available", lambda: True)
    ss._load_cpu_kernel.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="hmn.networks.selective_scan"):
            assert ss._load_cpu_kernel() == ("serial module", "")
        assert [flags[-1] for _, flags in calls] == ["-fopenmp", "-fopenmp-simd"]
        assert calls[1][0] == calls[0][0] + "_serial"  # its own cache entry
        assert "could not be built with OpenMP (with OpenMP: RuntimeError: unsupported option '-fopenmp')" in caplog.text
        assert "runs on one thread" in caplog.text

        def failing_load(name, sources, extra_cflags, verbose):
            raise RuntimeError(f"no compiler ({extra_cflags[-1]})")

        monkeypatch.setattr(cpp_extension, "load", failing_load)
        ss._load_cpu_kernel.cache_clear()
        module, why = ss._load_cpu_kernel()
        assert module is None
        assert why == (
            "the fused CPU kernel could not be built here (with OpenMP: RuntimeError: no compiler (-fopenmp); "
            "without OpenMP: RuntimeError: no compiler (-fopenmp-simd))"
        )
    finally:
        ss._load_cpu_kernel.cache_clear()


def test_cpu_kernel_says_what_it_does_not_cover(cpu_kernel):
    inputs = make_inputs(layout="fixed_b", length=5)
    args = [inputs[k] for k in ("u", "delta", "A", "B", "C")]
    with pytest.raises(SelectiveScanUnavailableError, match=r"impl='cpu_kernel' covers input-dependent B and C"):
        selective_scan(*args, impl="cpu_kernel")
    with pytest.raises(ValueError, match=r"delta must have the shape of u"):
        selective_scan_cpu_kernel(args[0], args[1][..., :3], *args[2:])


def test_cpu_kernel_unavailable_is_an_error_not_a_fallback(monkeypatch):
    monkeypatch.setattr(ss, "_load_cpu_kernel", lambda: (None, "the fused CPU kernel could not be built here (no compiler)"))
    inputs = make_inputs(length=5)
    args = [inputs[k] for k in ("u", "delta", "A", "B", "C")]
    with pytest.raises(SelectiveScanUnavailableError, match=r"impl='cpu_kernel' was asked for but .*no compiler"):
        selective_scan(*args, impl="cpu_kernel")


# ----------------------------------------------------------------------------------------------------------
# The export scan (impl="export"): what a scripted, traced or ONNX-exported Vim runs.
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.numerics
@pytest.mark.parametrize("layout", ["input", "grouped", "fixed_b"])
@pytest.mark.parametrize("length", [1, 2, 9, 17, 50, 197])
@pytest.mark.parametrize("options", ["plain", "full"])
def test_export_scan_matches_the_reference(layout, length, options):
    """float64 values, last state and gradients, at lengths that fill the last chunk and that leave it padded."""
    full = options == "full"
    inputs = make_inputs(layout=layout, length=length, seed=length + 100)
    kw = dict(with_z=full, with_d=full, with_bias=full, softplus=full)
    assert_same(run(ss.selective_scan_export, inputs, **kw), run(selective_scan_ref, inputs, **kw))
    assert_same(run(lambda *a, **k: selective_scan(*a, **k, impl="export"), inputs, **kw),
                run(selective_scan_ref, inputs, **kw))  # fmt: skip


def test_export_scan_with_extreme_step_sizes():
    """Decays that underflow to 0 next to decays of ~1, as for the chunked scan: only products of decays."""
    inputs = make_inputs(dim=8, length=300, seed=7)
    g = torch.Generator().manual_seed(8)
    scale = torch.where(torch.rand(2, 8, 300, generator=g) < 0.5, 40.0, 1e-6).to(F64)
    inputs["delta"] = torch.rand(2, 8, 300, generator=g, dtype=F64) * scale
    inputs["A"] = inputs["A"] * 10
    ref = run(selective_scan_ref, inputs, softplus=False, with_bias=False, grad=False)
    got = run(ss.selective_scan_export, {k: v.float() for k, v in inputs.items()}, softplus=False, with_bias=False,
              grad=False)  # fmt: skip
    assert torch.isfinite(got[0]).all() and torch.isfinite(got[1]).all()
    scale_out = ref[0].abs().max()
    torch.testing.assert_close(got[0].double() / scale_out, ref[0] / scale_out, rtol=1e-5, atol=1e-5)


def test_export_scan_scripts_traces_and_follows_the_batch_size():
    """TorchScript compiles the core; a trace at batch 1 runs at batch 3 (the batch axis stays symbolic), and
    both equal the eager function."""
    inputs = make_inputs(length=23, seed=4)
    order = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    args = [inputs[k] for k in order]
    want_out, want_last = ss.selective_scan_export_state(*args, True)
    out, last = torch.jit.script(ss.selective_scan_export_state)(*args, True)
    torch.testing.assert_close(out, want_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(last, want_last, rtol=1e-12, atol=1e-12)

    def core(u, delta, A, B, C, D, z, bias):
        return ss.selective_scan_export_state(u, delta, A, B, C, D, z, bias, True)

    one = [a[:1] if a.dim() == 3 else a for a in args]
    traced = torch.jit.trace(core, tuple(one))
    three = make_inputs(batch=3, length=23, seed=5)
    args3 = [three[k] for k in order]
    for got, want in zip(traced(*args3), core(*args3)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
