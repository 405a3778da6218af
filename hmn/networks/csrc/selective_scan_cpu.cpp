// The selective scan's recurrence fused into one pass, for CPUs.
//
// Built on first use by hmn.networks.selective_scan (torch.utils.cpp_extension.load) when the scan is
// asked for with impl="cpu_kernel". Everything per element is fused: the step size (bias, softplus), the
// recurrence, the skip D and the gate z:
//
//   dt_t = softplus(delta_t + bias)   h_t = exp(dt_t A) * h_{t-1} + dt_t u_t B_t
//   out_t = (<C_t, h_t> + D u_t) * silu(z_t)
//
// Shapes (contiguous): u, delta (batch, channels, L); A (channels, N); Bt, Ct (batch, L, N), i.e. B and C
// input-dependent and shared by all channels (one group).
//
// Forward: blocks of W channels of one batch element (W = one 64-byte vector: 16 floats, 8 doubles) run
// together, vectorized over the channels, so every state index is an independent recurrence and the loop is
// bound by arithmetic, not by the latency of one chain (a row at a time, vectorized over the 16 states, was
// about 1.8x slower). Where the compiler targets AVX-512, float blocks use intrinsics (2^x by vscalefps); elsewhere,
// and for doubles, a portable loop.
//
// Backward: a row at a time. The row's L states are recomputed into a small per-thread buffer and the adjoint
// recurrence runs backwards. dA, dB, dC, dD and the bias gradient are sums over rows; each worker writes its
// own partial sums, which are added up at the end.
//
// float: 2^x, softplus and sigmoid are computed inline (polynomials, relative error below 1e-7 before
// rounding) instead of by vector math library calls, which spill every vector register of the loop around
// them. double: the C library's functions.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr double kLog2e = 1.4426950408889634;

template <typename T>
inline T exp2_(T x) {
  return std::exp2(x);
}

// 2^x = 2^n * p(x - n), n = round(x), p a degree-6 polynomial for 2^f on [-1/2, 1/2] (relative error 2e-9; at
// degree 5, 8e-8, the float32 gradient of A drifted to 2e-6 of the float64 one over a 197-token scan), 2^n
// added to p's exponent bits. x is clamped to [-125, 127] first, so p * 2^n stays a normal float: 2^-125 for
// anything smaller, which the recurrence cannot tell from 0 (-ffast-math assumes no infinities).
template <>
inline float exp2_<float>(float x) {
  x = x < -125.f ? -125.f : (x > 127.f ? 127.f : x);
  const float n = std::nearbyint(x), f = x - n;
  float p = 0.000153375768f;
  p = p * f + 0.00133998604f;
  p = p * f + 0.00961851953f;
  p = p * f + 0.05550329f;
  p = p * f + 0.240226466f;
  p = p * f + 0.693147206f;
  p = p * f + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &p, sizeof bits);
  bits += static_cast<int32_t>(n) * (1 << 23);
  std::memcpy(&p, &bits, sizeof p);
  return p;
}

template <typename T>
inline T softplus_(T x) {  // log(1 + e^x) = max(x, 0) + log1p(e^-|x|): no overflow, no cancellation
  const T ax = x > T(0) ? x : -x;
  return (x > T(0) ? x : T(0)) + std::log1p(std::exp(-ax));
}

// log1p(y) for y = e^-|x| in (0, 1] as 2 atanh(s), s = y / (2 + y) in (0, 1/3]: the odd series to s^13
// (truncation below 2e-8 relative).
template <>
inline float softplus_<float>(float x) {
  const float ax = x > 0.f ? x : -x;
  const float y = exp2_<float>(-ax * static_cast<float>(kLog2e));
  const float s = y / (2.f + y), s2 = s * s;
  float p = 1.f / 13.f;
  p = p * s2 + 1.f / 11.f;
  p = p * s2 + 1.f / 9.f;
  p = p * s2 + 1.f / 7.f;
  p = p * s2 + 1.f / 5.f;
  p = p * s2 + 1.f / 3.f;
  p = p * s2 + 1.f;
  return (x > 0.f ? x : 0.f) + 2.f * s * p;
}

template <typename T>
inline T sigmoid_(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

template <>
inline float sigmoid_<float>(float x) {
  return 1.f / (1.f + exp2_<float>(-x * static_cast<float>(kLog2e)));
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

#if defined(__AVX512F__)
constexpr bool kHaveAvx512 = true;

// 2^x for 16 floats: 2^n * p(x - n), n = round(x), p the degree-6 polynomial of exp2_<float>; vscalefps applies
// 2^n, giving 0 or infinity out of range without clamping.
inline __m512 exp2_x16(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(0.000153375768f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.00133998604f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.00961851953f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.05550329f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.240226466f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.693147206f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// One block's recurrence over L steps, 16 float channels per vector (see scan_block). Two accumulators
// for <C_t, h_t> halve the chain of additions over the states.
template <int NS>
void scan_block_avx512(int64_t L, int64_t n_rt, const float* dtT, const float* xT, const float* a, const float* Bb,
                       const float* Cb, float* h, float* yT) {
  const int64_t n = NS > 0 ? NS : n_rt;
  for (int64_t t = 0; t < L; ++t) {
    const __m512 dtv = _mm512_loadu_ps(dtT + t * 16), xv = _mm512_loadu_ps(xT + t * 16);
    const float* bt = Bb + t * n;
    const float* ct = Cb + t * n;
    __m512 acc[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t k = 0; k < n; ++k) {
      const __m512 decay = exp2_x16(_mm512_mul_ps(dtv, _mm512_loadu_ps(a + k * 16)));
      const __m512 hk = _mm512_fmadd_ps(decay, _mm512_loadu_ps(h + k * 16), _mm512_mul_ps(xv, _mm512_set1_ps(bt[k])));
      _mm512_storeu_ps(h + k * 16, hk);
      acc[k & 1] = _mm512_fmadd_ps(_mm512_set1_ps(ct[k]), hk, acc[k & 1]);
    }
    _mm512_storeu_ps(yT + t * 16, _mm512_add_ps(acc[0], acc[1]));
  }
}
#else
constexpr bool kHaveAvx512 = false;
#endif

// One block's recurrence over L steps (one time tile): dtT, xT (L, W) the step sizes and dt * u,
// channel-minor; a (n, W) A * log2(e); h (n, W) the states (in: before the tile's first step, out: after its
// last); yT (L, W) receives <C_t, h_t>.
template <typename T, int NS, int W>
void scan_block(int64_t L, int64_t n_rt, const T* dtT, const T* xT, const T* a, const T* Bb, const T* Cb, T* h, T* yT,
                bool portable) {
#if defined(__AVX512F__)
  if constexpr (std::is_same<T, float>::value && W == 16) {
    if (!portable) return scan_block_avx512<NS>(L, n_rt, dtT, xT, a, Bb, Cb, h, yT);
  }
#endif
  (void)portable;
  const int64_t n = NS > 0 ? NS : n_rt;
  for (int64_t t = 0; t < L; ++t) {
    const T* dtv = dtT + t * W;
    const T* xv = xT + t * W;
    const T* bt = Bb + t * n;
    const T* ct = Cb + t * n;
    T acc[W] = {};
    for (int64_t k = 0; k < n; ++k) {
      const T bk = bt[k], ck = ct[k];
      T* hk = h + k * W;
      const T* ak = a + k * W;
#pragma omp simd
      for (int j = 0; j < W; ++j) {
        const T hv = exp2_(dtv[j] * ak[j]) * hk[j] + xv[j] * bk;
        hk[j] = hv;
        acc[j] += ck * hv;
      }
    }
    T* yv = yT + t * W;
#pragma omp simd
    for (int j = 0; j < W; ++j) yv[j] = acc[j];
  }
}

// The forward pass of blocks blk0..blk1-1 (block = batch element b, channels d0..d0+W-1; a last partial block
// runs its missing channels with zero step, input and A, and drops them). Time runs in tiles of kTile steps:
// the step sizes and inputs of a tile are transposed to channel-minor, scanned, and the tile's outputs
// transposed back, so the transposes stay in L1 (whole-row transposes cost 1.2x at 1025 tokens).
constexpr int64_t kTile = 64;

template <typename T, int NS>
void forward_blocks(int64_t blk0, int64_t blk1, int64_t channels, int64_t L, int64_t n_rt, const T* u, const T* delta,
                    const T* A, const T* Bt, const T* Ct, Extras<T> ex, T* out, T* last, bool portable) {
  constexpr int W = 64 / sizeof(T);
  const int64_t n = NS > 0 ? NS : n_rt;
  const int64_t blocks_per_batch = (channels + W - 1) / W;
  std::vector<T> h_buf(n * W), a_buf(n * W), dts_buf(kTile), dtT_buf(kTile * W), xT_buf(kTile * W),
      yT_buf(kTile * W);
  T* h = h_buf.data();
  T* a = a_buf.data();
  T* dts = dts_buf.data();
  T* dtT = dtT_buf.data();
  T* xT = xT_buf.data();
  T* yT = yT_buf.data();
  for (int64_t blk = blk0; blk < blk1; ++blk) {
    const int64_t b = blk / blocks_per_batch, d0 = (blk % blocks_per_batch) * W;
    const int64_t w = std::min<int64_t>(W, channels - d0);
    for (int64_t j = 0; j < W; ++j) {
      for (int64_t k = 0; k < n; ++k) {
        h[k * W + j] = T(0);
        a[k * W + j] = j < w ? A[(d0 + j) * n + k] * T(kLog2e) : T(0);
      }
    }
    for (int64_t t0 = 0; t0 < L; t0 += kTile) {
      const int64_t tl = std::min(kTile, L - t0);
      for (int64_t j = 0; j < W; ++j) {
        if (j < w) {
          const int64_t row = b * channels + d0 + j;
          const T* ur = u + row * L + t0;
          step_sizes(delta + row * L + t0, tl, ex.bias ? ex.bias[d0 + j] : T(0), ex.softplus, dts,
                     static_cast<T*>(nullptr));
          for (int64_t t = 0; t < tl; ++t) {
            dtT[t * W + j] = dts[t];
            xT[t * W + j] = dts[t] * ur[t];
          }
        } else {
          for (int64_t t = 0; t < tl; ++t) dtT[t * W + j] = xT[t * W + j] = T(0);
        }
      }
      scan_block<T, NS, W>(tl, n, dtT, xT, a, Bt + (b * L + t0) * n, Ct + (b * L + t0) * n, h, yT, portable);
      for (int64_t j = 0; j < w; ++j) {
        const int64_t d = d0 + j, row = b * channels + d;
        const T* ur = u + row * L + t0;
        const T* zr = ex.z ? ex.z + row * L + t0 : nullptr;
        const T skip = ex.D ? ex.D[d] : T(0);
        T* outr = out + row * L + t0;
        for (int64_t t = 0; t < tl; ++t) outr[t] = yT[t * W + j];
        if (zr) {
#pragma omp simd
          for (int64_t t = 0; t < tl; ++t) outr[t] = (outr[t] + skip * ur[t]) * zr[t] * sigmoid_(zr[t]);
        } else {
#pragma omp simd
          for (int64_t t = 0; t < tl; ++t) outr[t] += skip * ur[t];
        }
      }
    }
    for (int64_t j = 0; j < w; ++j)
      for (int64_t k = 0; k < n; ++k) last[((b * channels) + d0 + j) * n + k] = h[k * W + j];
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
        cur[k] = exp2_(dt * a[k]) * (prev ? prev[k] : T(0)) + x * bt[k];
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
        const T decay = exp2_(dt * a[k]);
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
                                        bool softplus, bool portable) {
  check(u, delta, A, Bt, Ct, D, z, bias);
  const int64_t batch = u.size(0), channels = u.size(1), L = u.size(2), n = A.size(1);
  auto out = torch::empty_like(u);
  auto last = torch::empty({batch, channels, n}, u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_cpu_forward", [&] {
    const auto ex = extras<scalar_t>(D, z, bias, softplus);
    const auto* up = u.data_ptr<scalar_t>();
    const auto* dp = delta.data_ptr<scalar_t>();
    const auto* ap = A.data_ptr<scalar_t>();
    const auto* bp = Bt.data_ptr<scalar_t>();
    const auto* cp = Ct.data_ptr<scalar_t>();
    auto* op = out.data_ptr<scalar_t>();
    auto* lp = last.data_ptr<scalar_t>();
    constexpr int64_t W = 64 / sizeof(scalar_t);
    const int64_t blocks = batch * ((channels + W - 1) / W);
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      if (n == 16)
        forward_blocks<scalar_t, 16>(b0, b1, channels, L, n, up, dp, ap, bp, cp, ex, op, lp, portable);
      else
        forward_blocks<scalar_t, 0>(b0, b1, channels, L, n, up, dp, ap, bp, cp, ex, op, lp, portable);
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

// How many threads at::parallel_for used for `items` one-item tasks: the kernel's own view of whether it was
// built with the threading torch uses (a build without it runs everything on one thread).
int64_t workers_used(int64_t items) {
  std::vector<std::atomic<bool>> seen(256);
  at::parallel_for(0, items, 1, [&](int64_t, int64_t) {
    const int id = at::get_thread_num();
    if (id >= 0 && id < 256) seen[id] = true;
  });
  return std::count_if(seen.begin(), seen.end(), [](const std::atomic<bool>& s) { return s.load(); });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &scan_forward,
        "selective scan, forward (CPU, fused); portable=True runs the portable loop where the AVX-512 one is built");
  m.def("workers_used", &workers_used, "how many threads at::parallel_for used for `items` one-item tasks");
  m.def("vector_path", [] { return kHaveAvx512 ? "avx512" : "portable"; },
        "which loop the float forward pass takes by default: 'avx512' or 'portable'");
  m.def("backward", &scan_backward, "selective scan, backward (CPU, fused)");
}
