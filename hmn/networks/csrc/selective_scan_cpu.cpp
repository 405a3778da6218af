// The selective scan's recurrence fused into one pass per (batch, channel) row, for CPUs.
//
// Built on first use by hmn.networks.selective_scan (torch.utils.cpp_extension.load) when the scan is
// asked for with impl="cpu_kernel". Everything per element is fused into the row's loop: the step size
// (bias, softplus), the recurrence, the skip D and the gate z:
//
//   dt_t = softplus(delta_t + bias)   h_t = exp(dt_t A) * h_{t-1} + dt_t u_t B_t
//   out_t = (<C_t, h_t> + D u_t) * silu(z_t)
//
// Shapes (contiguous): u, delta (batch, channels, L); A (channels, N); Bt, Ct (batch, L, N), i.e. B and C
// input-dependent and shared by all channels (one group). The state of one row lives in registers; the
// backward pass keeps the row's L states in a small per-thread buffer and runs the adjoint recurrence
// backwards. dA, dB, dC, dD and the bias gradient are sums over rows; each worker writes its own partial
// sums, which are added up at the end.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

namespace {

constexpr double kLog2e = 1.4426950408889634;

template <typename T>
inline T softplus_(T x) {  // log(1 + e^x) = max(x, 0) + log(1 + e^-|x|): no overflow, no cancellation
  const T ax = x > T(0) ? x : -x;
  return (x > T(0) ? x : T(0)) + std::log1p(std::exp(-ax));
}

template <typename T>
inline T sigmoid_(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

// Optional per-row inputs: null pointers when absent.
template <typename T>
struct Extras {
  const T* D;     // (channels)
  const T* z;     // (batch, channels, L)
  const T* bias;  // (channels)
  bool softplus;
};

// The row's step sizes into dts (and, with softplus, their derivatives sigmoid(raw + bias) into dsp), in
// loops over t that the compiler vectorizes (transcendental calls one token at a time would dominate).
template <typename T>
void step_sizes(const T* raw, int64_t L, T bias, bool softplus, T* dts, T* dsp) {
  if (softplus) {
#pragma omp simd
    for (int64_t t = 0; t < L; ++t) dts[t] = softplus_(raw[t] + bias);
    if (dsp) {
#pragma omp simd
      for (int64_t t = 0; t < L; ++t) dsp[t] = sigmoid_(raw[t] + bias);
    }
  } else {
#pragma omp simd
    for (int64_t t = 0; t < L; ++t) dts[t] = raw[t] + bias;
  }
}

// NS > 0: the state size known at compile time (vectorized over it); NS == 0: runtime size n_rt.
template <typename T, int NS>
void forward_rows(int64_t r0, int64_t r1, int64_t channels, int64_t L, int64_t n_rt, const T* u, const T* delta,
                  const T* A, const T* Bt, const T* Ct, Extras<T> ex, T* out, T* last) {
  const int64_t n = NS > 0 ? NS : n_rt;
  std::vector<T> h_buf(n), a_buf(n), dts_buf(L);
  T* h = h_buf.data();
  T* a = a_buf.data();
  T* dts = dts_buf.data();
  for (int64_t row = r0; row < r1; ++row) {
    const int64_t b = row / channels, d = row % channels;
    for (int64_t k = 0; k < n; ++k) {
      h[k] = T(0);
      a[k] = A[d * n + k] * T(kLog2e);
    }
    const T* ur = u + row * L;
    const T* zr = ex.z ? ex.z + row * L : nullptr;
    const T skip = ex.D ? ex.D[d] : T(0);
    T* outr = out + row * L;
    const T* Bb = Bt + b * L * n;
    const T* Cb = Ct + b * L * n;
    step_sizes(delta + row * L, L, ex.bias ? ex.bias[d] : T(0), ex.softplus, dts, static_cast<T*>(nullptr));
    for (int64_t t = 0; t < L; ++t) {
      const T dt = dts[t], x = dt * ur[t];
      const T* bt = Bb + t * n;
      const T* ct = Cb + t * n;
      T acc = T(0);
#pragma omp simd reduction(+ : acc)
      for (int64_t k = 0; k < n; ++k) {
        h[k] = std::exp2(dt * a[k]) * h[k] + x * bt[k];
        acc += ct[k] * h[k];
      }
      outr[t] = acc;
    }
    if (zr) {
#pragma omp simd
      for (int64_t t = 0; t < L; ++t) outr[t] = (outr[t] + skip * ur[t]) * zr[t] * sigmoid_(zr[t]);
    } else {
#pragma omp simd
      for (int64_t t = 0; t < L; ++t) outr[t] += skip * ur[t];
    }
    for (int64_t k = 0; k < n; ++k) last[row * n + k] = h[k];
  }
}

// Gradients of one worker's rows. du, ddelta, dz: per element (each row is one worker's); dA, dB, dC, dD,
// dbias: this worker's partial sums.
template <typename T>
struct Grads {
  T *du, *ddelta, *dz, *dA, *dB, *dC, *dD, *dbias;
};

template <typename T, int NS>
void backward_rows(int64_t r0, int64_t r1, int64_t channels, int64_t L, int64_t n_rt, const T* u, const T* delta,
                   const T* A, const T* Bt, const T* Ct, Extras<T> ex, const T* dout, const T* dlast, Grads<T> gr) {
  const int64_t n = NS > 0 ? NS : n_rt;
  std::vector<T> hs_buf(L * n), dts_buf(L), dsp_buf(L), dys_buf(L), g_buf(n), a_buf(n);
  T* hs = hs_buf.data();
  T* dts = dts_buf.data();
  T* dsp = dsp_buf.data();
  T* dys = dys_buf.data();
  T* g = g_buf.data();
  T* a = a_buf.data();
  for (int64_t row = r0; row < r1; ++row) {
    const int64_t b = row / channels, d = row % channels;
    const T* ur = u + row * L;
    const T* dr = delta + row * L;
    const T* zr = ex.z ? ex.z + row * L : nullptr;
    const T* doutr = dout + row * L;
    const T bias = ex.bias ? ex.bias[d] : T(0), skip = ex.D ? ex.D[d] : T(0);
    const T* Bb = Bt + b * L * n;
    const T* Cb = Ct + b * L * n;
    T* dBb = gr.dB + b * L * n;
    T* dCb = gr.dC + b * L * n;
    T* dur = gr.du + row * L;
    for (int64_t k = 0; k < n; ++k) a[k] = A[d * n + k] * T(kLog2e);
    // recompute the step sizes, the states and the scan's output <C_t, h_t> (into dys)
    step_sizes(dr, L, bias, ex.softplus, dts, dsp);
    for (int64_t t = 0; t < L; ++t) {
      const T dt = dts[t], x = dt * ur[t];
      const T* bt = Bb + t * n;
      const T* ct = Cb + t * n;
      const T* prev = t > 0 ? hs + (t - 1) * n : nullptr;
      T* cur = hs + t * n;
      T acc = T(0);
#pragma omp simd reduction(+ : acc)
      for (int64_t k = 0; k < n; ++k) {
        cur[k] = std::exp2(dt * a[k]) * (prev ? prev[k] : T(0)) + x * bt[k];
        acc += ct[k] * cur[k];
      }
      dys[t] = acc;
    }
    // the gate and the skip: dz, and the gradient at the scan's output (into dys), at D and at u
    T dskip = T(0);
    if (zr) {
      T* dzr = gr.dz + row * L;
#pragma omp simd reduction(+ : dskip)
      for (int64_t t = 0; t < L; ++t) {
        const T s = sigmoid_(zr[t]), pre = dys[t] + skip * ur[t];
        dzr[t] = doutr[t] * pre * s * (T(1) + zr[t] * (T(1) - s));
        const T dpre = doutr[t] * zr[t] * s;
        dys[t] = dpre;
        dskip += dpre * ur[t];
        dur[t] = dpre * skip;
      }
    } else {
#pragma omp simd reduction(+ : dskip)
      for (int64_t t = 0; t < L; ++t) {
        dys[t] = doutr[t];
        dskip += doutr[t] * ur[t];
        dur[t] = doutr[t] * skip;
      }
    }
    if (gr.dD) gr.dD[d] += dskip;
    for (int64_t k = 0; k < n; ++k) g[k] = dlast ? dlast[row * n + k] : T(0);
    const T* Ad = A + d * n;
    T* dAd = gr.dA + d * n;
    T dbias = T(0);
    // the adjoint g_t = dL/dh_t = C_t dys_t + exp(dt_{t+1} A) g_{t+1}, from t = L-1 down to 0
    for (int64_t t = L - 1; t >= 0; --t) {
      const T dt = dts[t], x = dt * ur[t], dyt = dys[t];
      const T* bt = Bb + t * n;
      const T* ct = Cb + t * n;
      const T* cur = hs + t * n;
      const T* prev = t > 0 ? hs + (t - 1) * n : nullptr;
      T* dbt = dBb + t * n;
      T* dct = dCb + t * n;
      T dx = T(0), ddt = T(0);
#pragma omp simd reduction(+ : dx, ddt)
      for (int64_t k = 0; k < n; ++k) {
        const T gk = g[k] + dyt * ct[k];
        dct[k] += dyt * cur[k];
        dbt[k] += gk * x;
        dx += gk * bt[k];
        const T decay = std::exp2(dt * a[k]);
        const T ddecay = gk * (prev ? prev[k] : T(0)) * decay;  // dL/d(decay) * decay
        ddt += ddecay * Ad[k];
        dAd[k] += ddecay * dt;
        g[k] = gk * decay;
      }
      dur[t] += dx * dt;
      ddt += dx * ur[t];
      const T draw = ex.softplus ? ddt * dsp[t] : ddt;
      gr.ddelta[row * L + t] = draw;
      dbias += draw;
    }
    if (gr.dbias) gr.dbias[d] += dbias;
  }
}

// Splits the rows into `parts` contiguous ranges, one per worker.
template <typename F>
void for_parts(int64_t rows, int64_t parts, const F& f) {
  const int64_t per = (rows + parts - 1) / parts;
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t r0 = p * per, r1 = std::min(rows, r0 + per);
      if (r0 < r1) f(p, r0, r1);
    }
  });
}

void check_same(const torch::Tensor& t, const torch::Tensor& like, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == like.scalar_type(),
              "selective_scan_cpu: ", what, " must be a contiguous CPU tensor of u's dtype");
}

void check(const torch::Tensor& u, const torch::Tensor& delta, const torch::Tensor& A, const torch::Tensor& Bt,
           const torch::Tensor& Ct, const c10::optional<torch::Tensor>& D, const c10::optional<torch::Tensor>& z,
           const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(u.dim() == 3 && delta.sizes() == u.sizes(), "selective_scan_cpu: u and delta must be (batch, channels, L)");
  TORCH_CHECK(A.dim() == 2 && A.size(0) == u.size(1), "selective_scan_cpu: A must be (channels, N)");
  TORCH_CHECK(Bt.dim() == 3 && Bt.size(0) == u.size(0) && Bt.size(1) == u.size(2) && Bt.size(2) == A.size(1),
              "selective_scan_cpu: B must be (batch, L, N)");
  TORCH_CHECK(Ct.sizes() == Bt.sizes(), "selective_scan_cpu: C must be (batch, L, N)");
  check_same(u, u, "u");
  check_same(delta, u, "delta");
  check_same(A, u, "A");
  check_same(Bt, u, "B");
  check_same(Ct, u, "C");
  if (D) {
    check_same(*D, u, "D");
    TORCH_CHECK(D->numel() == u.size(1), "selective_scan_cpu: D must have one value per channel");
  }
  if (bias) {
    check_same(*bias, u, "delta_bias");
    TORCH_CHECK(bias->numel() == u.size(1), "selective_scan_cpu: delta_bias must have one value per channel");
  }
  if (z) {
    check_same(*z, u, "z");
    TORCH_CHECK(z->sizes() == u.sizes(), "selective_scan_cpu: z must be shaped like u");
  }
}

template <typename T>
Extras<T> extras(const c10::optional<torch::Tensor>& D, const c10::optional<torch::Tensor>& z,
                 const c10::optional<torch::Tensor>& bias, bool softplus) {
  return {D ? D->data_ptr<T>() : nullptr, z ? z->data_ptr<T>() : nullptr, bias ? bias->data_ptr<T>() : nullptr,
          softplus};
}

}  // namespace

std::vector<torch::Tensor> scan_forward(torch::Tensor u, torch::Tensor delta, torch::Tensor A, torch::Tensor Bt,
                                        torch::Tensor Ct, c10::optional<torch::Tensor> D,
                                        c10::optional<torch::Tensor> z, c10::optional<torch::Tensor> bias,
                                        bool softplus) {
  check(u, delta, A, Bt, Ct, D, z, bias);
  const int64_t batch = u.size(0), channels = u.size(1), L = u.size(2), n = A.size(1);
  auto out = torch::empty_like(u);
  auto last = torch::empty({batch, channels, n}, u.options());
  const int64_t rows = batch * channels;
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_cpu_forward", [&] {
    const auto ex = extras<scalar_t>(D, z, bias, softplus);
    const auto* up = u.data_ptr<scalar_t>();
    const auto* dp = delta.data_ptr<scalar_t>();
    const auto* ap = A.data_ptr<scalar_t>();
    const auto* bp = Bt.data_ptr<scalar_t>();
    const auto* cp = Ct.data_ptr<scalar_t>();
    auto* op = out.data_ptr<scalar_t>();
    auto* lp = last.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
      if (n == 16)
        forward_rows<scalar_t, 16>(r0, r1, channels, L, n, up, dp, ap, bp, cp, ex, op, lp);
      else
        forward_rows<scalar_t, 0>(r0, r1, channels, L, n, up, dp, ap, bp, cp, ex, op, lp);
    });
  });
  return {out, last};
}

std::vector<torch::Tensor> scan_backward(torch::Tensor u, torch::Tensor delta, torch::Tensor A, torch::Tensor Bt,
                                         torch::Tensor Ct, c10::optional<torch::Tensor> D,
                                         c10::optional<torch::Tensor> z, c10::optional<torch::Tensor> bias,
                                         bool softplus, torch::Tensor dout, c10::optional<torch::Tensor> dlast,
                                         int64_t parts) {
  check(u, delta, A, Bt, Ct, D, z, bias);
  check_same(dout, u, "the output gradient");
  TORCH_CHECK(dout.sizes() == u.sizes(), "selective_scan_cpu: the output gradient must be shaped like u");
  const int64_t batch = u.size(0), channels = u.size(1), L = u.size(2), n = A.size(1);
  const int64_t rows = batch * channels;
  if (dlast) {
    check_same(*dlast, u, "the last-state gradient");
    TORCH_CHECK(dlast->numel() == rows * n, "selective_scan_cpu: the last-state gradient must be (batch, channels, N)");
  }
  parts = std::max<int64_t>(1, std::min(parts, rows));
  auto du = torch::empty_like(u);
  auto ddelta = torch::empty_like(u);
  auto dz = z ? torch::empty_like(u) : torch::Tensor();
  auto dA = torch::zeros({parts, channels, n}, u.options());
  auto dB = torch::zeros({parts, batch, L, n}, u.options());
  auto dC = torch::zeros({parts, batch, L, n}, u.options());
  auto dD = torch::zeros({parts, channels}, u.options());
  auto dbias = torch::zeros({parts, channels}, u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_cpu_backward", [&] {
    const auto ex = extras<scalar_t>(D, z, bias, softplus);
    const auto* up = u.data_ptr<scalar_t>();
    const auto* dp = delta.data_ptr<scalar_t>();
    const auto* ap = A.data_ptr<scalar_t>();
    const auto* bp = Bt.data_ptr<scalar_t>();
    const auto* cp = Ct.data_ptr<scalar_t>();
    const auto* dop = dout.data_ptr<scalar_t>();
    const scalar_t* dlp = dlast ? dlast->data_ptr<scalar_t>() : nullptr;
    for_parts(rows, parts, [&](int64_t p, int64_t r0, int64_t r1) {
      Grads<scalar_t> gr{du.data_ptr<scalar_t>(),
                         ddelta.data_ptr<scalar_t>(),
                         z ? dz.data_ptr<scalar_t>() : nullptr,
                         dA.data_ptr<scalar_t>() + p * channels * n,
                         dB.data_ptr<scalar_t>() + p * batch * L * n,
                         dC.data_ptr<scalar_t>() + p * batch * L * n,
                         D ? dD.data_ptr<scalar_t>() + p * channels : nullptr,
                         bias ? dbias.data_ptr<scalar_t>() + p * channels : nullptr};
      if (n == 16)
        backward_rows<scalar_t, 16>(r0, r1, channels, L, n, up, dp, ap, bp, cp, ex, dop, dlp, gr);
      else
        backward_rows<scalar_t, 0>(r0, r1, channels, L, n, up, dp, ap, bp, cp, ex, dop, dlp, gr);
    });
  });
  return {du, ddelta, dA.sum(0), dB.sum(0), dC.sum(0), D ? dD.sum(0) : torch::Tensor(), dz,
          bias ? dbias.sum(0) : torch::Tensor()};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &scan_forward, "selective scan, forward (CPU, fused)");
  m.def("backward", &scan_backward, "selective scan, backward (CPU, fused)");
}
