// proxqat's fused CUDA kernels. Compiled to PTX by build.rs (nvcc --ptx) when the `cuda` feature is on and
// loaded through candle's custom ops (src/fused/). Every kernel has a CPU twin with the same semantics in
// the same Rust module; scripts/gpu-check.sh compares the two on the GPU.
//
// Conventions: statistics and accumulations in f32 whatever the storage type; one block per row for row
// ops (blockDim a multiple of 32); rows are contiguous; pointers are raw device addresses.
#include <cuda_bf16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Wide accesses: N elements (4, or 16 bytes' worth) per load or store where the pointers allow it (fresh
// allocations and rows of a multiple of N elements do); the scalar loops stay for the rest. Element-wise
// kernels with 2-byte accesses reached a third of the H200's memory bandwidth (ncu).
template <typename T> struct alignas(4 * sizeof(T)) Four {
  T v[4];
};

template <typename T> struct alignas(16) Vec16 {
  static constexpr int N = 16 / sizeof(T);
  T v[N];
};

__device__ inline uintptr_t addr(const void *p) { return reinterpret_cast<uintptr_t>(p); }

// Elements 4i … 4i + 3 of p (aligned to Four<T>) as f32, and back.
template <typename T> __device__ __forceinline__ void load4(const T *p, int i, float (&o)[4]) {
  const Four<T> f = reinterpret_cast<const Four<T> *>(p)[i];
#pragma unroll
  for (int k = 0; k < 4; ++k) o[k] = to_f(f.v[k]);
}

template <typename T> __device__ __forceinline__ void store4(T *p, int i, const float (&o)[4]) {
  Four<T> f;
#pragma unroll
  for (int k = 0; k < 4; ++k) f.v[k] = from_f<T>(o[k]);
  reinterpret_cast<Four<T> *>(p)[i] = f;
}

template <typename T> __device__ __forceinline__ bool aligned4(const T *p) { return addr(p) % sizeof(Four<T>) == 0; }

// A row's elements f(j, value), block-strided, as 16-byte vectors when the row allows it.
template <typename T, typename F> __device__ __forceinline__ void for_row(const T *row, int n, F f) {
  constexpr int W = Vec16<T>::N;
  if (addr(row) % 16 == 0 && n % W == 0) {
    for (int i = threadIdx.x; i < n / W; i += blockDim.x) {
      const Vec16<T> x = reinterpret_cast<const Vec16<T> *>(row)[i];
#pragma unroll
      for (int k = 0; k < W; ++k) f(i * W + k, to_f(x.v[k]));
    }
  } else {
    for (int j = threadIdx.x; j < n; j += blockDim.x) f(j, to_f(row[j]));
  }
}

// out[j] = g(j, in[j]) over a row, vectorized as `for_row` when both rows allow it.
template <typename T, typename G> __device__ __forceinline__ void map_row(const T *in, T *out, int n, G g) {
  constexpr int W = Vec16<T>::N;
  if ((addr(in) | addr(out)) % 16 == 0 && n % W == 0) {
    for (int i = threadIdx.x; i < n / W; i += blockDim.x) {
      const Vec16<T> x = reinterpret_cast<const Vec16<T> *>(in)[i];
      Vec16<T> y;
#pragma unroll
      for (int k = 0; k < W; ++k) y.v[k] = from_f<T>(g(i * W + k, to_f(x.v[k])));
      reinterpret_cast<Vec16<T> *>(out)[i] = y;
    }
  } else {
    for (int j = threadIdx.x; j < n; j += blockDim.x) out[j] = from_f<T>(g(j, to_f(in[j])));
  }
}

// Block-wide reductions: every thread gets the result. `scratch` holds 32 floats.
__device__ float block_sum(float v, float *scratch) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // the previous reduction's readers are done with scratch
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = threadIdx.x < (blockDim.x >> 5) ? scratch[threadIdx.x] : 0.f;
  if (warp == 0) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    if (lane == 0) scratch[0] = v;
  }
  __syncthreads();
  return scratch[0];
}

__device__ float block_max(float v, float *scratch) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = threadIdx.x < (blockDim.x >> 5) ? scratch[threadIdx.x] : -INFINITY;
  if (warp == 0) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    if (lane == 0) scratch[0] = v;
  }
  __syncthreads();
  return scratch[0];
}

// ---------------------------------------------------------------------------------------------------
// RMSNorm: y = x · rsqrt(mean(x²) + eps) · w, x and w f32, y in TOUT.
template <typename TOUT>
__device__ void rms_norm_fwd(const float *x, const float *w, TOUT *y, int d, float eps) {
  __shared__ float scratch[32];
  const float *xr = x + (size_t)blockIdx.x * d;
  TOUT *yr = y + (size_t)blockIdx.x * d;
  float ss = 0.f;
  for_row(xr, d, [&](int, float v) { ss += v * v; });
  const float inv = rsqrtf(block_sum(ss, scratch) / d + eps);
  if (d % 4 == 0 && aligned4(xr) && aligned4(w) && aligned4(yr)) {
    for (int i = threadIdx.x; i < d / 4; i += blockDim.x) {
      float xv[4], wv[4];
      load4(xr, i, xv);
      load4(w, i, wv);
#pragma unroll
      for (int k = 0; k < 4; ++k) xv[k] *= inv * wv[k];
      store4(yr, i, xv);
    }
  } else {
    for (int i = threadIdx.x; i < d; i += blockDim.x) yr[i] = from_f<TOUT>(xr[i] * inv * w[i]);
  }
}

// Backward, `chunk` rows per block: per row dx = inv · (gw − x̂ · mean(gw · x̂)) with gw = gy · w,
// x̂ = x · inv, and the block's partial sums of dw, part[block, j] = Σ_rows gy[r, j] · x[r, j] · inv[r]
// (rows in order: deterministic), kept in registers while the rows pass (a separate dw pass read x and
// gy again). Where x is also the input of a residual connection (the decoder block), `res` (else null)
// is that connection's gradient, added to dx, and `dx_copy` (else null) receives dx in bf16 for the next
// projection's backward: the add and the cast would each be one more pass over the rows.
// Each thread owns 4·G columns (G groups of four), G = 1, 2 or 4 by d (picked by the caller): the
// registers of unused groups would cost occupancy.
template <typename TG, int G>
__device__ void rms_norm_bwd(const float *x, const float *w, const TG *gy, const float *res, float *dx,
                             __nv_bfloat16 *dx_copy, float *part, int n, int d, int chunk, float eps) {
  __shared__ float scratch[32];
  constexpr int OWNED = 4 * G;
  const bool wide = d % 4 == 0 && aligned4(x) && aligned4(w) && aligned4(gy) && aligned4(dx) &&
                    (!res || aligned4(res)) && (!dx_copy || aligned4(dx_copy));
  float dw[OWNED];
#pragma unroll
  for (int m = 0; m < OWNED; ++m) dw[m] = 0.f;
  const int r0 = blockIdx.x * chunk, r1 = min(n, r0 + chunk);
  for (int r = r0; r < r1; ++r) {
    const size_t at = (size_t)r * d;
    const float *xr = x + at, *rr = res ? res + at : nullptr;
    const TG *gr = gy + at;
    float *dr = dx + at;
    __nv_bfloat16 *cr = dx_copy ? dx_copy + at : nullptr;
    // Σ x² and Σ gy·w·x in one pass (mean_dot = Σ gy·w·x · inv² / d needs inv only afterwards).
    float ss = 0.f, dot = 0.f;
    if (wide) {
      for (int i = threadIdx.x; i < d / 4; i += blockDim.x) {
        float xv[4], gv[4], wv[4];
        load4(xr, i, xv);
        load4(gr, i, gv);
        load4(w, i, wv);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          ss += xv[k] * xv[k];
          dot += gv[k] * wv[k] * xv[k];
        }
      }
    } else {
      for (int i = threadIdx.x; i < d; i += blockDim.x) {
        ss += xr[i] * xr[i];
        dot += to_f(gr[i]) * w[i] * xr[i];
      }
    }
    const float inv = rsqrtf(block_sum(ss, scratch) / d + eps);
    const float mean_dot = block_sum(dot, scratch) * inv * inv / d;
    if (wide) {
#pragma unroll
      for (int u = 0; u < OWNED / 4; ++u) {
        const int i = threadIdx.x + u * blockDim.x;
        if (i >= d / 4) break;
        float xv[4], gv[4], wv[4], rv[4] = {0.f, 0.f, 0.f, 0.f};
        load4(xr, i, xv);
        load4(gr, i, gv);
        load4(w, i, wv);
        if (rr) load4(rr, i, rv);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          dw[4 * u + k] += gv[k] * xv[k] * inv;
          xv[k] = inv * (gv[k] * wv[k] - xv[k] * mean_dot) + rv[k];
        }
        store4(dr, i, xv);
        if (cr) store4(cr, i, xv);
      }
    } else {
#pragma unroll
      for (int m = 0; m < OWNED; ++m) {
        const int j = threadIdx.x + m * blockDim.x;
        if (j >= d) break;
        const float g = to_f(gr[j]), xv = xr[j];
        dw[m] += g * xv * inv;
        float v = inv * (g * w[j] - xv * mean_dot);
        if (rr) v += rr[j];
        dr[j] = v;
        if (cr) cr[j] = __float2bfloat16_rn(v);
      }
    }
  }
  float *pr = part + (size_t)blockIdx.x * d;
  if (wide) {
#pragma unroll
    for (int u = 0; u < OWNED / 4; ++u) {
      const int i = threadIdx.x + u * blockDim.x;
      if (i >= d / 4) break;
      const float owned[4] = {dw[4 * u], dw[4 * u + 1], dw[4 * u + 2], dw[4 * u + 3]};
      store4(pr, i, owned);
    }
  } else {
#pragma unroll
    for (int m = 0; m < OWNED; ++m) {
      const int j = threadIdx.x + m * blockDim.x;
      if (j >= d) break;
      pr[j] = dw[m];
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Rotate-half RoPE fused with the head transpose. Forward: in (B, T, H, D) → out (B, H, T, D), rotation
// by +angle. Backward (inverse = 1): in (B, H, T, D) → out (B, T, H, D), rotation by −angle (the transpose
// of a rotation). cos/sin: (T, D/2) f32. One thread per (b, t, h) and pair of neighbouring i < D/2.
template <typename T> struct alignas(2 * sizeof(T)) Two {
  T v[2];
};

// Two neighbouring i per thread (4-byte bf16 accesses) and 32-bit index arithmetic (the 64-bit divisions
// of one thread per element made the kernel compute-bound at a third of the memory bandwidth).
// TI → TO: the backward also reads flash attention's f32 sums of dq and dk and rounds them once, to bf16.
// `row`: elements from one position's row to the next on the (B, T, H·D) side — H·D when packed, more
// when that side is a column range of a wider matrix (q or k within the fused q/k/v projection's rows).
template <typename TI, typename TO>
__device__ void rope(const TI *in, TO *out, const float *cos_t, const float *sin_t, int b, int t, int h, int d,
                     int row, int inverse) {
  const int half = d / 2,
            step = half % 2 == 0 && row % 2 == 0 && addr(in) % sizeof(Two<TI>) == 0 &&
                           addr(out) % sizeof(Two<TO>) == 0
                       ? 2
                       : 1;
  const int per_row = half / step;
  const unsigned total = (unsigned)b * t * h * per_row;  // < 2^32: checked by the caller
  for (unsigned e = blockIdx.x * blockDim.x + threadIdx.x; e < total; e += gridDim.x * blockDim.x) {
    const int i = (e % per_row) * step;
    unsigned r = e / per_row;
    const int hh = r % h;
    r /= h;
    const int tt = r % t, bb = r / t;
    const size_t bthd = ((size_t)bb * t + tt) * row + (size_t)hh * d;
    const size_t bhtd = (((size_t)bb * h + hh) * t + tt) * d;
    const size_t src = inverse ? bhtd : bthd, dst = inverse ? bthd : bhtd;
    const float sign = inverse ? -1.f : 1.f;
    if (step == 2) {
      const Two<TI> a = *reinterpret_cast<const Two<TI> *>(in + src + i),
                    c = *reinterpret_cast<const Two<TI> *>(in + src + i + half);
      Two<TO> y1, y2;
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        const float co = cos_t[tt * half + i + k], si = sign * sin_t[tt * half + i + k];
        const float x1 = to_f(a.v[k]), x2 = to_f(c.v[k]);
        y1.v[k] = from_f<TO>(x1 * co - x2 * si);
        y2.v[k] = from_f<TO>(x2 * co + x1 * si);
      }
      *reinterpret_cast<Two<TO> *>(out + dst + i) = y1;
      *reinterpret_cast<Two<TO> *>(out + dst + i + half) = y2;
    } else {
      const float co = cos_t[tt * half + i], si = sign * sin_t[tt * half + i];
      const float x1 = to_f(in[src + i]), x2 = to_f(in[src + i + half]);
      out[dst + i] = from_f<TO>(x1 * co - x2 * si);
      out[dst + i + half] = from_f<TO>(x2 * co + x1 * si);
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Causal softmax over score rows (f32) of length t; row r is query position r % t: p_j = softmax(scale·s)_j
// for j ≤ r % t, 0 above the diagonal. Probabilities stored in TOUT.
template <typename TOUT>
__device__ void causal_softmax_fwd(const float *s, TOUT *p, int t, float scale) {
  __shared__ float scratch[32];
  const size_t row = blockIdx.x;
  const int last = row % t;
  const float *sr = s + row * t;
  float m = -INFINITY;
  for (int j = threadIdx.x; j <= last; j += blockDim.x) m = fmaxf(m, sr[j] * scale);
  m = block_max(m, scratch);
  float z = 0.f;
  for (int j = threadIdx.x; j <= last; j += blockDim.x) z += __expf(sr[j] * scale - m);
  const float inv_z = 1.f / block_sum(z, scratch);
  for (int j = threadIdx.x; j < t; j += blockDim.x)
    p[row * t + j] = from_f<TOUT>(j <= last ? __expf(sr[j] * scale - m) * inv_z : 0.f);
}

// Backward from the scores (p recomputed in f32): ds_j = scale · p_j · (gp_j − Σ_k gp_k p_k).
template <typename TG>
__device__ void causal_softmax_bwd(const float *s, const TG *gp, float *ds, int t, float scale) {
  __shared__ float scratch[32];
  const size_t row = blockIdx.x;
  const int last = row % t;
  const float *sr = s + row * t;
  const TG *gr = gp + row * t;
  float m = -INFINITY;
  for (int j = threadIdx.x; j <= last; j += blockDim.x) m = fmaxf(m, sr[j] * scale);
  m = block_max(m, scratch);
  float z = 0.f, zg = 0.f;
  for (int j = threadIdx.x; j <= last; j += blockDim.x) {
    const float e = __expf(sr[j] * scale - m);
    z += e;
    zg += e * to_f(gr[j]);
  }
  z = block_sum(z, scratch);
  const float dot = block_sum(zg, scratch) / z;
  for (int j = threadIdx.x; j < t; j += blockDim.x)
    ds[row * t + j] = j <= last ? scale * __expf(sr[j] * scale - m) / z * (to_f(gr[j]) - dot) : 0.f;
}

// ---------------------------------------------------------------------------------------------------
// SwiGLU: out = silu(gate) · up; backward writes d_gate and d_up into one (2, n) buffer (the down
// projection's weight gradient reads the forward's out, which the MLP keeps: writing it again here was
// a sixth of the backward's traffic).
// Four elements per access when every pointer allows it (fresh allocations do): 8-byte bf16 loads
// instead of 2-byte ones (ncu at micro-batch 16: the scalar forward moved ~1.5 TB/s of the H200's 4.8).

__device__ inline float silu_times(float g, float u) { return g / (1.f + __expf(-g)) * u; }

// (d gate, d up) of silu(g)·u for the output gradient go.
__device__ inline float2 swiglu_grads(float g, float u, float go) {
  const float sig = 1.f / (1.f + __expf(-g));
  return make_float2(go * u * sig * (1.f + g * (1.f - sig)), go * g * sig);
}

template <typename T>
__device__ void swiglu_fwd(const T *gate, const T *up, T *out, size_t n) {
  const size_t first = blockIdx.x * (size_t)blockDim.x + threadIdx.x, stride = (size_t)gridDim.x * blockDim.x;
  size_t done = 0;
  if ((addr(gate) | addr(up) | addr(out)) % sizeof(Four<T>) == 0) {
    const Four<T> *g4 = reinterpret_cast<const Four<T> *>(gate), *u4 = reinterpret_cast<const Four<T> *>(up);
    for (size_t i = first; i < n / 4; i += stride) {
      const Four<T> g = g4[i], u = u4[i];
      Four<T> o;
#pragma unroll
      for (int k = 0; k < 4; ++k) o.v[k] = from_f<T>(silu_times(to_f(g.v[k]), to_f(u.v[k])));
      reinterpret_cast<Four<T> *>(out)[i] = o;
    }
    done = n / 4 * 4;
  }
  for (size_t i = done + first; i < n; i += stride) out[i] = from_f<T>(silu_times(to_f(gate[i]), to_f(up[i])));
}

template <typename T>
__device__ void swiglu_bwd(const T *gate, const T *up, const T *gout, T *grads, size_t n) {
  const size_t first = blockIdx.x * (size_t)blockDim.x + threadIdx.x, stride = (size_t)gridDim.x * blockDim.x;
  size_t done = 0;
  if ((addr(gate) | addr(up) | addr(gout) | addr(grads) | addr(grads + n)) % sizeof(Four<T>) == 0) {
    const Four<T> *g4 = reinterpret_cast<const Four<T> *>(gate), *u4 = reinterpret_cast<const Four<T> *>(up),
                  *o4 = reinterpret_cast<const Four<T> *>(gout);
    for (size_t i = first; i < n / 4; i += stride) {
      const Four<T> g = g4[i], u = u4[i], go = o4[i];
      Four<T> dg, du;
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const float2 d = swiglu_grads(to_f(g.v[k]), to_f(u.v[k]), to_f(go.v[k]));
        dg.v[k] = from_f<T>(d.x);
        du.v[k] = from_f<T>(d.y);
      }
      reinterpret_cast<Four<T> *>(grads)[i] = dg;
      reinterpret_cast<Four<T> *>(grads + n)[i] = du;
    }
    done = n / 4 * 4;
  }
  for (size_t i = done + first; i < n; i += stride) {
    const float2 d = swiglu_grads(to_f(gate[i]), to_f(up[i]), to_f(gout[i]));
    grads[i] = from_f<T>(d.x);
    grads[n + i] = from_f<T>(d.y);
  }
}

// The residual stream's add: out = x + f32(y), x and out f32, y a projection's output in the compute
// dtype — the cast and the add in one pass (candle's cast alone took 84 µs per (4096, 2048) at
// micro-batch 16, then its add 37 µs; this moves the same bytes once).
template <typename T>
__device__ void residual_add(const float *x, const T *y, float *out, size_t n) {
  const size_t first = blockIdx.x * (size_t)blockDim.x + threadIdx.x, stride = (size_t)gridDim.x * blockDim.x;
  size_t done = 0;
  if ((addr(x) | addr(out)) % sizeof(Four<float>) == 0 && addr(y) % sizeof(Four<T>) == 0) {
    for (size_t i = first; i < n / 4; i += stride) {
      const Four<float> a = reinterpret_cast<const Four<float> *>(x)[i];
      const Four<T> b = reinterpret_cast<const Four<T> *>(y)[i];
      Four<float> o;
#pragma unroll
      for (int k = 0; k < 4; ++k) o.v[k] = a.v[k] + to_f(b.v[k]);
      reinterpret_cast<Four<float> *>(out)[i] = o;
    }
    done = n / 4 * 4;
  }
  for (size_t i = done + first; i < n; i += stride) out[i] = x[i] + to_f(y[i]);
}

// ---------------------------------------------------------------------------------------------------
// Cross-entropy over vocabulary rows, one block per row. out (N, 2) f32: [nll or 0 if ignored, logsumexp].
// target = 0xFFFFFFFF means ignored. One pass over the row: a running max and a sum rescaled when the
// max grows (online softmax), then the block's maxima and rescaled sums combined.
template <typename T>
__device__ void cross_entropy_fwd(const T *logits, const uint32_t *target, float *out, int v) {
  __shared__ float scratch[32];
  const size_t row = blockIdx.x;
  const T *lr = logits + row * v;
  float m = -INFINITY, z = 0.f;
  for_row(lr, v, [&](int, float x) {
    if (x > m) {
      z = z * __expf(m - x) + 1.f;  // exp(−∞) = 0 at the first element
      m = x;
    } else {
      z += __expf(x - m);
    }
  });
  const float mb = block_max(m, scratch);
  const float lse = mb + logf(block_sum(m == -INFINITY ? 0.f : z * __expf(m - mb), scratch));
  if (threadIdx.x == 0) {
    const uint32_t t = target[row];
    out[2 * row] = t == 0xFFFFFFFFu ? 0.f : lse - to_f(lr[t]);
    out[2 * row + 1] = lse;
  }
}

// d logits_j = (g_nll + g_lse) · softmax_j − g_nll · [j = target]  (g_nll = 0 for ignored rows).
template <typename T>
__device__ void cross_entropy_bwd(const T *logits, const uint32_t *target, const float *res, const float *gres,
                                  T *dlogits, int v) {
  const size_t row = blockIdx.x;
  const uint32_t t = target[row];
  const float g_nll = t == 0xFFFFFFFFu ? 0.f : gres[2 * row];
  const float g_lse = gres[2 * row + 1];
  const float lse = res[2 * row + 1];
  map_row(logits + row * v, dlogits + row * v, v,
          [&](int j, float x) { return (g_nll + g_lse) * __expf(x - lse) - (j == (int)t ? g_nll : 0.f); });
}

// Distillation, per row of student logits s and teacher logits t at temperature T (w = 1/T):
//   out = [T²·KL(softmax(t·w) ‖ softmax(s·w)) (0 if ignored), lse_s = lse(s·w), lse_t = lse(t·w)],
//   KL = Σ_j p_t,j · (t_j − s_j)·w + lse_s − lse_t.
template <typename T>
__device__ void distill_fwd(const T *s, const T *t, const uint32_t *target, float *out, int v, float w) {
  __shared__ float scratch[32];
  const size_t row = blockIdx.x;
  const T *sr = s + row * v, *tr = t + row * v;
  float ms = -INFINITY, mt = -INFINITY;
  for (int j = threadIdx.x; j < v; j += blockDim.x) {
    ms = fmaxf(ms, to_f(sr[j]) * w);
    mt = fmaxf(mt, to_f(tr[j]) * w);
  }
  ms = block_max(ms, scratch);
  mt = block_max(mt, scratch);
  float zs = 0.f, zt = 0.f, cross = 0.f;
  for (int j = threadIdx.x; j < v; j += blockDim.x) {
    const float tj = to_f(tr[j]) * w, et = __expf(tj - mt);
    zs += __expf(to_f(sr[j]) * w - ms);
    zt += et;
    cross += et * (tj - to_f(sr[j]) * w);  // Σ e^{t−mt}·(t − s)·w, divided by Σ e^{t−mt} below
  }
  zs = block_sum(zs, scratch);
  zt = block_sum(zt, scratch);
  cross = block_sum(cross, scratch);
  const float lse_s = ms + logf(zs), lse_t = mt + logf(zt);
  if (threadIdx.x == 0) {
    out[3 * row] = target[row] == 0xFFFFFFFFu ? 0.f : (cross / zt + lse_s - lse_t) / (w * w);
    out[3 * row + 1] = lse_s;
    out[3 * row + 2] = lse_t;
  }
}

// ds_j = g_kl · T · (p_s,j − p_t,j)   (g_kl = 0 for ignored rows; the log-sum-exp columns are kept for
// this backward only and carry no gradient). `aux` holds the forward's three columns then their gradients.
template <typename T>
__device__ void distill_bwd(const T *s, const T *t, const uint32_t *target, const float *aux, T *ds, int v,
                            float w) {
  const size_t row = blockIdx.x;
  const float *a = aux + 6 * row;
  const float g_kl = target[row] == 0xFFFFFFFFu ? 0.f : a[3] / w;
  const T *sr = s + row * v, *tr = t + row * v;
  for (int j = threadIdx.x; j < v; j += blockDim.x) {
    const float ps = __expf(to_f(sr[j]) * w - a[1]), pt = __expf(to_f(tr[j]) * w - a[2]);
    ds[row * v + j] = from_f<T>(g_kl * (ps - pt));
  }
}

// ---------------------------------------------------------------------------------------------------
// Σ x² of gridDim.y f32 tensors in one launch, one partial per block (grid-stride over its tensor,
// fixed grid: deterministic): block (i, j) reads tensor j at table[j] (an address), of table[gridDim.y
// + j] elements, into partials[j · gridDim.x + i]. 16-byte loads where the tensor is 16-byte aligned
// (scalar ones moved ~2.6 TB/s).
extern "C" __global__ void sum_squares_many_f32(const long long *table, float *partials) {
  __shared__ float scratch[32];
  const float *x = reinterpret_cast<const float *>(table[blockIdx.y]);
  const size_t n = (size_t)table[gridDim.y + blockIdx.y];
  const size_t first = blockIdx.x * (size_t)blockDim.x + threadIdx.x, stride = (size_t)gridDim.x * blockDim.x;
  float acc = 0.f;
  size_t done = 0;
  if (addr(x) % sizeof(float4) == 0) {
    for (size_t i = first; i < n / 4; i += stride) {
      const float4 v = reinterpret_cast<const float4 *>(x)[i];
      acc += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
    }
    done = n / 4 * 4;
  }
  for (size_t i = done + first; i < n; i += stride) acc += x[i] * x[i];
  acc = block_sum(acc, scratch);
  if (threadIdx.x == 0) partials[(size_t)blockIdx.y * gridDim.x + blockIdx.x] = acc;
}

// AdamW (PyTorch's formula) on f32 master weights and f32 moments, in place, one pass per tensor, with
// the Prox-QAT treatment of a selected tensor folded in (spec §7):
//   g ← g · clip;  dist-grad mode: g ← task_scale · g + pull · (x − q)   (the dist term's gradient)
//   m ← β1 m + (1−β1) g,  v ← β2 v + (1−β2) g²,  dir = (m/bc1) / (sqrt(v)/sqrt(bc2) + eps)
//   plain / dist-grad: x ← x − lr (dir + wd x);   prox: x ← x − lr (pull (x − q) + task_scale (dir + wd x)).
// q is computed here from the uniform grid (scale per `group` consecutive elements, codes clamped to
// ±half_levels, ties to even: the CPU grid's exact arithmetic) or read from `q` (level grids).
// clip and pull are 0-d device values: no host round-trip. With `copy` set, the same pass writes the next
// step's compute copy of the updated x in bf16: x itself, or (copy_scale set) its point on the uniform grid
// of the straight-through view (scale per copy_group elements, codes clamped to ±copy_half_levels) —
// bit for bit what the step's separate cast (`compute_copy` / `grid_point_f32`, then the cast) writes.
#define ADAMW_PLAIN 0
#define ADAMW_DIST_GRAD 1
#define ADAMW_PROX 2
struct AdamWArgs {
  float lr, beta1, beta2, bc1, bc2, eps, weight_decay, task_scale;
  int mode;
  float half_levels;
  unsigned long long group;
  unsigned long long copy_group;
  float copy_half_levels;
};

__device__ __forceinline__ float grid_point(float x, const float *q, const float *scale, const AdamWArgs &a,
                                            size_t i) {
  if (scale == nullptr) return q[i];
  const float s = scale[i / a.group];
  return fminf(fmaxf(rintf(x / s), -a.half_levels), a.half_levels) * s;
}

extern "C" __global__ void adamw_f32(float *x, float *m, float *v, const float *g, const float *clip,
                                     const float *pull, const float *q, const float *scale,
                                     __nv_bfloat16 *copy, const float *copy_scale, AdamWArgs a, size_t n) {
  const float factor = *clip;
  const float c = a.mode != ADAMW_PLAIN ? *pull : 0.f;
  const float sqrt_bc2 = sqrtf(a.bc2);
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    const float xi = x[i];
    const float qi = a.mode != ADAMW_PLAIN ? grid_point(xi, q, scale, a, i) : 0.f;
    float gi = g[i] * factor;
    if (a.mode == ADAMW_DIST_GRAD) gi = a.task_scale * gi + c * (xi - qi);
    const float mi = a.beta1 * m[i] + (1.f - a.beta1) * gi;
    const float vi = a.beta2 * v[i] + (1.f - a.beta2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    const float dir = (mi / a.bc1) / (sqrtf(vi) / sqrt_bc2 + a.eps);
    const float task = dir + a.weight_decay * xi;
    const float next = a.mode == ADAMW_PROX ? xi - a.lr * (c * (xi - qi) + a.task_scale * task) : xi - a.lr * task;
    x[i] = next;
    if (copy != nullptr) {
      float y = next;
      if (copy_scale != nullptr) {
        const float sc = copy_scale[i / a.copy_group];
        y = fminf(fmaxf(rintf(next / sc), -a.copy_half_levels), a.copy_half_levels) * sc;
      }
      copy[i] = __float2bfloat16_rn(y);
    }
  }
}

// q(x) on a uniform grid, f32 in and out (the compute copy of a straight-through quantized view; the
// same arithmetic as the optimizer's grid_point).
extern "C" __global__ void grid_point_f32(const float *x, const float *scale, unsigned long long group,
                                            float half_levels, float *out, size_t n) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    const float s = scale[i / group];
    out[i] = fminf(fmaxf(rintf(x[i] / s), -half_levels), half_levels) * s;
  }
}

// acc += g in f32, in place: a weight's gradient added straight into the step's accumulator.
template <typename T>
__device__ void accumulate(float *acc, const T *g, size_t n) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    acc[i] += to_f(g[i]);
}
extern "C" __global__ void accumulate_f32(float *acc, const float *g, size_t n) { accumulate(acc, g, n); }
extern "C" __global__ void accumulate_bf16(float *acc, const __nv_bfloat16 *g, size_t n) { accumulate(acc, g, n); }

// The embedding lookup's backward: acc[id] += Σ g[t] over the tokens t with ids[t] = id, in place, each
// id's rows summed in token order by one writer (no atomics: the same bits every run). Three kernels:
// `embedding_ranks` (one warp per token, 32 ids compared per step) finds each token's id's first token,
// its rank among that id's tokens and their count; `embedding_order` (one block) lays the tokens out
// grouped by id, in token order within an id; `embedding_bwd` sums each id's rows from that list, a
// block per (id, 128 columns). Walking a linked list of an id's tokens instead (one dependent load per
// row) took 0.95 ms per micro-batch of 4,096 tokens on the H200 when a few ids repeat hundreds of times.
extern "C" __global__ void embedding_ranks(const unsigned int *ids, int *first, int *rank, int *count, int tokens) {
  const int t = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
  if (t >= tokens) return;  // the whole warp
  const unsigned int id = ids[t];
  int first_t = t, earlier = 0, total = 0;
  for (int base = 0; base < tokens; base += 32) {
    const int u = base + lane;
    const unsigned int same = __ballot_sync(0xffffffff, u < tokens && ids[u] == id);
    if (same == 0) continue;
    if (total == 0) first_t = base + __ffs(same) - 1;
    const int before = t - base;  // lanes below this one hold earlier tokens
    earlier += before >= 32 ? __popc(same) : before > 0 ? __popc(same & ((1u << before) - 1)) : 0;
    total += __popc(same);
  }
  if (lane == 0) {
    first[t] = first_t;
    rank[t] = earlier;
    count[t] = total;
  }
}

// One block: offset[f] (the start of first token f's id in `order`) by a scan over the tokens, then
// order[offset[first[t]] + rank[t]] = t.
extern "C" __global__ void embedding_order(const int *first, const int *rank, const int *count, int *offset, int *order,
                                           int tokens) {
  __shared__ int partial[1024];
  const int per = (tokens + blockDim.x - 1) / blockDim.x;
  const int lo = min(tokens, (int)threadIdx.x * per), hi = min(tokens, lo + per);
  int sum = 0;
  for (int t = lo; t < hi; ++t) sum += first[t] == t ? count[t] : 0;
  partial[threadIdx.x] = sum;
  __syncthreads();
  for (int o = 1; o < blockDim.x; o <<= 1) {  // inclusive scan of the threads' sums
    const int v = threadIdx.x >= o ? partial[threadIdx.x - o] : 0;
    __syncthreads();
    partial[threadIdx.x] += v;
    __syncthreads();
  }
  int run = threadIdx.x ? partial[threadIdx.x - 1] : 0;
  for (int t = lo; t < hi; ++t)
    if (first[t] == t) {
      offset[t] = run;
      run += count[t];
    }
  __syncthreads();  // makes the block's global writes of `offset` visible to all its threads
  for (int t = threadIdx.x; t < tokens; t += blockDim.x) order[offset[first[t]] + rank[t]] = t;
}

template <typename T>
__device__ void embedding_bwd(float *acc, const T *g, const unsigned int *ids, const int *first, const int *count,
                              const int *offset, const int *order, size_t tokens, size_t dim) {
  const size_t j = blockIdx.y * (size_t)blockDim.x + threadIdx.x;
  if (j >= dim) return;
  for (size_t t = blockIdx.x; t < tokens; t += gridDim.x) {
    if (first[t] != (int)t) continue;
    const int *rows = order + offset[t];
    const int n = count[t];
    float sum = 0.f;
    int k = 0;
    for (; k + 4 <= n; k += 4) {  // four independent loads in flight, added in token order
      const float a = to_f(g[(size_t)rows[k] * dim + j]), b = to_f(g[(size_t)rows[k + 1] * dim + j]);
      const float c = to_f(g[(size_t)rows[k + 2] * dim + j]), d = to_f(g[(size_t)rows[k + 3] * dim + j]);
      sum += a;
      sum += b;
      sum += c;
      sum += d;
    }
    for (; k < n; ++k) sum += to_f(g[(size_t)rows[k] * dim + j]);
    acc[(size_t)ids[t] * dim + j] += sum;
  }
}
extern "C" __global__ void embedding_bwd_f32(float *acc, const float *g, const unsigned int *ids, const int *first,
                                             const int *count, const int *offset, const int *order, size_t tokens,
                                             size_t dim) {
  embedding_bwd(acc, g, ids, first, count, offset, order, tokens, dim);
}
extern "C" __global__ void embedding_bwd_bf16(float *acc, const __nv_bfloat16 *g, const unsigned int *ids,
                                              const int *first, const int *count, const int *offset, const int *order,
                                              size_t tokens, size_t dim) {
  embedding_bwd(acc, g, ids, first, count, offset, order, tokens, dim);
}

// Grid statistics of one f32 tensor on a uniform grid, one pass: per block, [hits (|x − q| ≤ atol),
// q at an outermost level, |x| beyond L·s, Σ|x − q|] → partials[4 · blockIdx + k] (summed in f64 after).
extern "C" __global__ void grid_counts_f32(const float *x, const float *scale, unsigned long long group,
                                           float half_levels, float atol, float *partials, size_t n) {
  __shared__ float scratch[32];
  float hit = 0.f, sat_q = 0.f, sat_w = 0.f, err = 0.f;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    const float s = scale[i / group];
    const float code = fminf(fmaxf(rintf(x[i] / s), -half_levels), half_levels);
    const float e = fabsf(x[i] - code * s);
    hit += e <= atol;
    sat_q += fabsf(code) == half_levels;
    sat_w += fabsf(x[i]) > half_levels * s;
    err += e;
  }
  const float sums[4] = {block_sum(hit, scratch), block_sum(sat_q, scratch), block_sum(sat_w, scratch),
                         block_sum(err, scratch)};
  if (threadIdx.x < 4) partials[4 * blockIdx.x + threadIdx.x] = sums[threadIdx.x];
}

// ---------------------------------------------------------------------------------------------------
// extern "C" entry points, one per storage type.
#define RMS_NORM_BWD(SUF, T, G)                                                                                  \
  extern "C" __global__ void __launch_bounds__(1024)                                                             \
      rms_norm_bwd_##SUF##_x##G(const float *x, const float *w, const T *gy,                                    \
                                                       const float *r, float *dx, __nv_bfloat16 *dxc,            \
                                                       float *part, int n, int d, int chunk, float eps) {        \
    rms_norm_bwd<T, G>(x, w, gy, r, dx, dxc, part, n, d, chunk, eps);                                            \
  }
#define ROW_OPS(SUF, T)                                                                                          \
  extern "C" __global__ void rms_norm_fwd_##SUF(const float *x, const float *w, T *y, int d, float eps) {       \
    rms_norm_fwd<T>(x, w, y, d, eps);                                                                            \
  }                                                                                                              \
  RMS_NORM_BWD(SUF, T, 1)                                                                                        \
  RMS_NORM_BWD(SUF, T, 2)                                                                                        \
  RMS_NORM_BWD(SUF, T, 4)                                                                                        \
  extern "C" __global__ void rope_##SUF(const T *in, T *out, const float *c, const float *s, int b, int t,      \
                                        int h, int d, int row, int inverse) {                                    \
    rope<T, T>(in, out, c, s, b, t, h, d, row, inverse);                                                         \
  }                                                                                                              \
  extern "C" __global__ void causal_softmax_fwd_##SUF(const float *s, T *p, int t, float scale) {               \
    causal_softmax_fwd<T>(s, p, t, scale);                                                                       \
  }                                                                                                              \
  extern "C" __global__ void causal_softmax_bwd_##SUF(const float *s, const T *gp, float *ds, int t,             \
                                                      float scale) {                                             \
    causal_softmax_bwd<T>(s, gp, ds, t, scale);                                                                  \
  }                                                                                                              \
  extern "C" __global__ void swiglu_fwd_##SUF(const T *g, const T *u, T *o, size_t n) {                         \
    swiglu_fwd<T>(g, u, o, n);                                                                                   \
  }                                                                                                              \
  extern "C" __global__ void residual_add_##SUF(const float *x, const T *y, float *o, size_t n) {               \
    residual_add<T>(x, y, o, n);                                                                                 \
  }                                                                                                              \
  extern "C" __global__ void swiglu_bwd_##SUF(const T *g, const T *u, const T *go, T *gr, size_t n) {           \
    swiglu_bwd<T>(g, u, go, gr, n);                                                                              \
  }                                                                                                              \
  extern "C" __global__ void cross_entropy_fwd_##SUF(const T *l, const uint32_t *t, float *o, int v) {          \
    cross_entropy_fwd<T>(l, t, o, v);                                                                            \
  }                                                                                                              \
  extern "C" __global__ void cross_entropy_bwd_##SUF(const T *l, const uint32_t *t, const float *r,             \
                                                     const float *g, T *dl, int v) {                             \
    cross_entropy_bwd<T>(l, t, r, g, dl, v);                                                                     \
  }                                                                                                              \
  extern "C" __global__ void distill_fwd_##SUF(const T *s, const T *t, const uint32_t *g, float *o, int v,      \
                                               float w) {                                                        \
    distill_fwd<T>(s, t, g, o, v, w);                                                                            \
  }                                                                                                              \
  extern "C" __global__ void distill_bwd_##SUF(const T *s, const T *t, const uint32_t *g, const float *a,       \
                                               T *ds, int v, float w) {                                          \
    distill_bwd<T>(s, t, g, a, ds, v, w);                                                                        \
  }

ROW_OPS(f32, float)
ROW_OPS(bf16, __nv_bfloat16)

extern "C" __global__ void rope_f32_bf16(const float *in, __nv_bfloat16 *out, const float *c, const float *s, int b,
                                         int t, int h, int d, int row, int inverse) {
  rope<float, __nv_bfloat16>(in, out, c, s, b, t, h, d, row, inverse);
}

// ---------------------------------------------------------------------------------------------------
// Causal GQA attention in tiles (flash-attention 2 style), bf16 storage, head_dim 64, tensor cores through
// mma.sync m16n8k16 with f32 accumulation. The (T, T) scores and probabilities never leave registers
// except one 64 × 64 bf16 tile of dS per step of the backward (shared memory, for dq). Every tensor is
// addressed as base + b·sb + head·sh + t·st (+ d), so the kernels read q, k, v and the output gradient
// and write o, dq, dk, dv in the layouts the decoder block already has (no transposes). Query head h
// reads KV head h / g. Shared tiles are (64, 72) bf16: rows padded to 144 bytes so the lanes' 32-bit
// fragment loads and the ldmatrix rows fall in 32 distinct banks.
// Register fragments (PTX ISA, mma.m16n8k16): lane = 4·gr + tg; A (16 × 16) holds rows gr, gr + 8 and
// columns 2tg, 2tg + 1 (+ 8); B (16 × 8) rows 2tg, 2tg + 1 (+ 8) of column gr; C (16 × 8) rows gr, gr + 8
// and columns 2tg, 2tg + 1. Two adjacent C tiles of a product are, packed to bf16, the A fragment of the
// next product over the same 16 columns: scores become probabilities and feed P·V without a round trip.
// Forward: one block per (64 query rows, head, batch), four warps of 16 rows; online softmax in base 2
// (running max and sum in f32, output rows rescaled in registers); writes o and the rows' log-sum-exp.
// Backward (FA2 order): delta = rowsum(o·do) first; then one block per (query head, batch, 64 keys), each
// warp 16 keys, walks the 64-row query tiles that see those keys, recomputing Pᵀ = exp(scale·k·qᵀ − lse):
// dv += Pᵀ·do and dk += dSᵀ·q in registers (added to f32 buffers at the end: the g query heads of a KV
// head share them), dq += dS·k through shared dS and atomic adds into f32. dS = P·(dP − delta)·scale.
namespace flash {
typedef __nv_bfloat16 bf16;
constexpr int D = 64;   // head_dim
constexpr int LD = 72;  // padded row of a bf16 (64, D) tile
constexpr float LOG2E = 1.4426950408889634f;

// `rows` rows of D bf16 from `src` (row r at src + (t0 + r)·st) into a (rows, LD) tile, zeros past t,
// through cp.async (16 bytes per copy): the copies run while the block computes on the previous tile; `commit` closes a group, `wait_groups<N>` waits for all but the newest N.
// Synchronous loads left the flash kernels stalled on global memory half of the time (ncu).
__device__ __forceinline__ void load_tile_async(bf16 *dst, const bf16 *src, long long st, int t0, int rows, int t) {
  for (int i = threadIdx.x; i < rows * (D / 8); i += blockDim.x) {
    const int r = i / (D / 8), c = (i % (D / 8)) * 8;
    const bool in = t0 + r < t;
    const uint32_t to = static_cast<uint32_t>(__cvta_generic_to_shared(dst + r * LD + c));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(to), "l"(in ? src + (t0 + r) * st + c : src),
                 "r"(in ? 16 : 0));
  }
}

// `rows` floats from src + t0 into dst (zeros past t), four bytes per copy.
__device__ __forceinline__ void load_floats_async(float *dst, const float *src, int t0, int rows, int t) {
  for (int i = threadIdx.x; i < rows; i += blockDim.x) {
    const bool in = t0 + i < t;
    const uint32_t to = static_cast<uint32_t>(__cvta_generic_to_shared(dst + i));
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(to), "l"(in ? src + t0 + i : src),
                 "r"(in ? 4 : 0));
  }
}

__device__ __forceinline__ void commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N> __device__ __forceinline__ void wait_groups() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ uint32_t pack(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t *>(&v);
}

// c (16 × 8, f32) += a (16 × 16) · b (16 × 8), bf16 operands.
__device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Four 8 × 8 bf16 matrices (ldmatrix; TRANS: transposed on the way); lane l gives the row address of
// matrix l / 8, row l % 8. One instruction where 32-bit shared loads took four (ncu had the flash
// kernels issue-bound).
template <bool TRANS> __device__ __forceinline__ void ldsm(uint32_t (&r)[4], const bf16 *row) {
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(row));
  if constexpr (TRANS)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}

// The A fragment of rows r0 … r0 + 15, columns k0 … k0 + 15 of a row-major tile.
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const bf16 *tile, int r0, int k0) {
  const int lane = threadIdx.x & 31;
  ldsm<false>(a, tile + (r0 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + k0 + (lane >> 4) * 8);
}

// The B fragments of columns n0 … n0 + 7 (b[0], b[1]) and n0 + 8 … n0 + 15 (b[2], b[3]) over rows
// k0 … k0 + 15 of a tile stored with n as the row: b(k, n) = tile[n][k].
__device__ __forceinline__ void load_b(uint32_t (&b)[4], const bf16 *tile, int n0, int k0) {
  const int lane = threadIdx.x & 31;
  ldsm<false>(b, tile + (n0 + (lane & 7) + (lane >> 4) * 8) * LD + k0 + ((lane >> 3) & 1) * 8);
}

// The B fragments of columns n0 … n0 + 7 (b[0], b[1]) and n0 + 8 … n0 + 15 (b[2], b[3]) over rows
// k0 … k0 + 15 of a tile stored with k as the row: b(k, n) = tile[k][n].
__device__ __forceinline__ void load_b_t(uint32_t (&b)[4], const bf16 *tile, int k0, int n0) {
  const int lane = threadIdx.x & 31;
  ldsm<true>(b, tile + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + n0 + (lane >> 4) * 8);
}

// The A fragment of rows r0 … r0 + 15, columns k0 … k0 + 15 of a tile stored transposed: a(r, k) =
// tile[k][r].
__device__ __forceinline__ void load_a_t(uint32_t (&a)[4], const bf16 *tile, int r0, int k0) {
  const int lane = threadIdx.x & 31;
  ldsm<true>(a, tile + (k0 + (lane & 7) + (lane >> 4) * 8) * LD + r0 + ((lane >> 3) & 1) * 8);
}

// The A fragment of columns 16j … 16j + 15 of a warp's (16, 64) f32 accumulator tiles c[8], in bf16.
__device__ __forceinline__ void c_to_a(uint32_t (&a)[4], const float (&c)[8][4], int j) {
  a[0] = pack(c[2 * j][0], c[2 * j][1]);
  a[1] = pack(c[2 * j][2], c[2 * j][3]);
  a[2] = pack(c[2 * j + 1][0], c[2 * j + 1][1]);
  a[3] = pack(c[2 * j + 1][2], c[2 * j + 1][3]);
}

// c (16 × 64) = a · bᵀ for rows r0 … r0 + 15 of a tile `a` and a tile `b` of 64 rows (both rows of D).
__device__ __forceinline__ void rows_times_tile_t(float (&c)[8][4], const bf16 *a, int r0, const bf16 *b) {
#pragma unroll
  for (int n = 0; n < 8; ++n) c[n][0] = c[n][1] = c[n][2] = c[n][3] = 0.f;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t af[4];
    load_a(af, a, r0, kk * 16);
#pragma unroll
    for (int n = 0; n < 4; ++n) {
      uint32_t bf[4];
      load_b(bf, b, n * 16, kk * 16);
      mma(c[2 * n], af, bf[0], bf[1]);
      mma(c[2 * n + 1], af, bf[2], bf[3]);
    }
  }
}

// acc (16 × D) += a (16 × 16: columns 16kk … 16kk + 15 of a product) · rows 16kk … of a tile of D columns
// (k as the row).
__device__ __forceinline__ void add_a_times_rows(float (&acc)[8][4], const uint32_t (&a)[4], const bf16 *tile, int kk) {
#pragma unroll
  for (int n = 0; n < D / 16; ++n) {
    uint32_t b[4];
    load_b_t(b, tile, kk * 16, n * 16);
    mma(acc[2 * n], a, b[0], b[1]);
    mma(acc[2 * n + 1], a, b[2], b[3]);
  }
}

// acc (16 × D) += p (16 × 64, f32 accumulator tiles, rounded to bf16) · tile (64 rows of D, k as the row).
__device__ __forceinline__ void acc_times_tile(float (&acc)[8][4], const float (&p)[8][4], const bf16 *tile) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    uint32_t a[4];
    c_to_a(a, p, kk);
    add_a_times_rows(acc, a, tile, kk);
  }
}

// A warp's (16, D) f32 accumulator tiles added into rows row0 … row0 + 15 (those < t) at dst + row·st,
// four columns per atomic (sm_90 float4 atomics; rows 16-byte aligned): lanes tg and tg ^ 1 swap halves,
// so the even lane adds columns 2tg … 2tg + 3 of row gr and the odd lane 2tg − 2 … 2tg + 1 of row gr + 8.
__device__ __forceinline__ void add_rows(float *dst, long long st, int row0, int t, const float (&c)[8][4]) {
  const int lane = threadIdx.x & 31, gr = lane >> 2, tg = lane & 3, odd = tg & 1;
  const int row = row0 + gr + 8 * odd, col = 2 * (tg - odd);
#pragma unroll
  for (int n = 0; n < 8; ++n) {
    // Even lanes keep row gr (c[n][0..1]) and receive the neighbour's row-gr pair; odd lanes keep row gr + 8.
    const float give0 = odd ? c[n][0] : c[n][2], give1 = odd ? c[n][1] : c[n][3];
    const float got0 = __shfl_xor_sync(0xffffffff, give0, 1), got1 = __shfl_xor_sync(0xffffffff, give1, 1);
    const float4 v = odd ? make_float4(got0, got1, c[n][2], c[n][3]) : make_float4(c[n][0], c[n][1], got0, got1);
    if (row < t) atomicAdd(reinterpret_cast<float4 *>(dst + row * st + n * 8 + col), v);
  }
}
// One step of the forward's online softmax for a warp's 16 query rows against the 64 keys of tile j0:
// S = q·kᵀ (base 2, causal mask where MASK: a tile on the diagonal or past t), running max m and sum
// l, acc rescaled and += P·v.
template <bool MASK>
__device__ __forceinline__ void attend_tile(float (&acc)[8][4], float (&m)[2], float (&l)[2], const bf16 *sq,
                                            const bf16 *sk, const bf16 *sv, int warp, int j0, int row0, int t,
                                            float scale2) {
  const int lane = threadIdx.x & 31, gr = lane >> 2, tg = lane & 3;
  float s[8][4];
  rows_times_tile_t(s, sq, warp * 16, sk);  // S (16 × 64) = q rows · kᵀ
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int row = row0 + gr + 8 * hh;
    float mx = -INFINITY;
#pragma unroll
    for (int n = 0; n < 8; ++n)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = j0 + n * 8 + 2 * tg + e;
        const float x = (!MASK || (col <= row && col < t)) ? s[n][2 * hh + e] * scale2 : -INFINITY;
        s[n][2 * hh + e] = x;
        mx = fmaxf(mx, x);
      }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
    const float m_new = fmaxf(m[hh], mx);  // finite: key 0 is seen by every row
    const float alpha = exp2f(m[hh] - m_new);
    float sum = 0.f;
#pragma unroll
    for (int n = 0; n < 8; ++n)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float p = exp2f(s[n][2 * hh + e] - m_new);
        s[n][2 * hh + e] = p;
        sum += p;
        acc[n][2 * hh + e] *= alpha;
      }
    sum += __shfl_xor_sync(0xffffffff, sum, 1);
    sum += __shfl_xor_sync(0xffffffff, sum, 2);
    l[hh] = l[hh] * alpha + sum;
    m[hh] = m_new;
  }
  acc_times_tile(acc, s, sv);  // O (16 × D) += P (16 × 64) · v (64 × D)
}
}  // namespace flash

extern "C" __global__ void __launch_bounds__(128)
    flash_fwd_bf16(const __nv_bfloat16 *q, const __nv_bfloat16 *k, const __nv_bfloat16 *v, __nv_bfloat16 *o,
                   float *lse, int t, int h, int g, float scale, long long qsb, long long qsh, long long qst,
                   long long ksb, long long ksh, long long kst, long long vsb, long long vsh, long long vst,
                   long long osb, long long osh, long long ost) {
  using namespace flash;
  // K and V double-buffered: tile j0 + 64 is copied while the warps compute on tile j0.
  __shared__ __align__(16) bf16 sq[64 * LD], sk[2][64 * LD], sv[2][64 * LD];
  const int q0 = blockIdx.x * 64, head = blockIdx.y, b = blockIdx.z, kvh = head / g;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gr = lane >> 2, tg = lane & 3;
  const int row0 = q0 + warp * 16;  // the warp's first query position
  const int keys = min(t, q0 + 64);  // the keys some row of the block sees
  const bf16 *kb = k + b * ksb + kvh * ksh, *vb = v + b * vsb + kvh * vsh;
  load_tile_async(sq, q + b * qsb + head * qsh, qst, q0, 64, t);
  load_tile_async(sk[0], kb, kst, 0, 64, t);
  load_tile_async(sv[0], vb, vst, 0, 64, t);
  commit();
  // Scores in base 2: x = scale·log2(e)·q·k, p = 2^(x − m).
  const float scale2 = scale * LOG2E;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f}, acc[8][4];
#pragma unroll
  for (int n = 0; n < 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
  for (int j0 = 0, buf = 0; j0 < keys; j0 += 64, buf ^= 1) {
    if (j0 + 64 < keys) {  // buf ^ 1 was last read in the previous step, before its closing barrier
      load_tile_async(sk[buf ^ 1], kb, kst, j0 + 64, 64, t);
      load_tile_async(sv[buf ^ 1], vb, vst, j0 + 64, 64, t);
      commit();
      wait_groups<1>();
    } else {
      wait_groups<0>();
    }
    __syncthreads();  // every thread's copies of tile j0 are visible
    if (j0 + 63 <= row0 && j0 + 64 <= t)  // every key of the tile is seen by every row of the warp
      attend_tile<false>(acc, m, l, sq, sk[buf], sv[buf], warp, j0, row0, t, scale2);
    else if (j0 <= row0 + 15)
      attend_tile<true>(acc, m, l, sq, sk[buf], sv[buf], warp, j0, row0, t, scale2);
    __syncthreads();  // every warp is done with buf
  }
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int row = row0 + gr + 8 * hh;
    if (row >= t) continue;
    bf16 *orow = o + b * osb + head * osh + row * ost;
    const float inv = 1.f / l[hh];
#pragma unroll
    for (int n = 0; n < 8; ++n)
      *reinterpret_cast<uint32_t *>(orow + n * 8 + 2 * tg) = pack(acc[n][2 * hh] * inv, acc[n][2 * hh + 1] * inv);
    if (tg == 0) lse[((long long)b * h + head) * t + row] = (m[hh] + __log2f(l[hh])) / LOG2E;
  }
}

// delta[b, head, t] = Σ_d o·do, eight lanes per row, one 16-byte vector each (rows ordered b, head, t).
extern "C" __global__ void flash_delta_bf16(const __nv_bfloat16 *o, const __nv_bfloat16 *d_o, float *delta,
                                            int rows, int t, int h, long long osb, long long osh, long long ost,
                                            long long dsb, long long dsh, long long dst) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  const int row = (int)(i >> 3), part = (int)(i & 7);
  float s = 0.f;
  if (row < rows) {
    const int pos = row % t, head = (row / t) % h, b = row / (t * h);
    const uint4 ov = *reinterpret_cast<const uint4 *>(o + b * osb + head * osh + pos * ost + part * 8);
    const uint4 dv = *reinterpret_cast<const uint4 *>(d_o + b * dsb + head * dsh + pos * dst + part * 8);
    const __nv_bfloat162 *op = reinterpret_cast<const __nv_bfloat162 *>(&ov);
    const __nv_bfloat162 *dp = reinterpret_cast<const __nv_bfloat162 *>(&dv);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 a = __bfloat1622float2(op[j]), c = __bfloat1622float2(dp[j]);
      s += a.x * c.x + a.y * c.y;
    }
  }
  s += __shfl_xor_sync(0xffffffff, s, 1);
  s += __shfl_xor_sync(0xffffffff, s, 2);
  s += __shfl_xor_sync(0xffffffff, s, 4);
  if (row < rows && part == 0) delta[row] = s;
}

// At most 168 registers, so that three blocks fit an SM (unbounded it takes 180, and two blocks left 8
// warps to hide every tile's barriers and shared loads; ncu at B 16 × T 256: 124.6 → 116.7 µs, with
// 4 bytes spilled).
extern "C" __global__ void __launch_bounds__(128, 3)
    flash_bwd_bf16(const __nv_bfloat16 *q, const __nv_bfloat16 *k, const __nv_bfloat16 *v,
                   const __nv_bfloat16 *d_o, const float *lse, const float *delta, float *dq, float *dk, float *dv,
                   int t, int h, int g, float scale, long long qsb, long long qsh, long long qst, long long ksb,
                   long long ksh, long long kst, long long vsb, long long vsh, long long vst, long long dosb,
                   long long dosh, long long dost, long long dqsb, long long dqsh, long long dqst,
                   long long dksb, long long dksh, long long dkst, long long dvsb, long long dvsh,
                   long long dvst) {
  using namespace flash;
  // Dynamic shared memory (64 KiB, over the 48 KiB of static): k, v, dSᵀ, and q, do, the rows'
  // log-sum-exps and deltas double-buffered, so query tile q0 + 64 is copied while the warps compute
  // on tile q0.
  extern __shared__ __align__(16) unsigned char smem[];
  // Tiles: k, v, dSᵀ, q (two), do (two); then log-sum-exps (two × 64), deltas (two × 64).
  bf16 *sk = reinterpret_cast<bf16 *>(smem), *sv = sk + 64 * LD, *sds = sv + 64 * LD;
  bf16 *sq = sds + 64 * LD, *sdo = sq + 2 * 64 * LD;
  float *slse = reinterpret_cast<float *>(sdo + 2 * 64 * LD), *sdelta = slse + 2 * 64;
  // Key tiles vary slowest in the grid: the first (the most query tiles to walk) are dispatched first.
  const int j0 = blockIdx.z * 64, head = blockIdx.x, b = blockIdx.y, kvh = head / g;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gr = lane >> 2, tg = lane & 3;
  const int key0 = j0 + warp * 16;  // the warp's first key
  const bf16 *qb = q + b * qsb + head * qsh, *dob = d_o + b * dosb + head * dosh;
  const float *lse_b = lse + ((long long)b * h + head) * t, *delta_b = delta + ((long long)b * h + head) * t;
  // Query tile q0's q, do, log-sum-exps and deltas into buffer `buf`, closing one cp.async group.
  auto fetch = [&](int q0, int buf) {
    load_tile_async(sq + buf * 64 * LD, qb, qst, q0, 64, t);
    load_tile_async(sdo + buf * 64 * LD, dob, dost, q0, 64, t);
    load_floats_async(slse + 64 * buf, lse_b, q0, 64, t);
    load_floats_async(sdelta + 64 * buf, delta_b, q0, 64, t);
    commit();
  };
  load_tile_async(sk, k + b * ksb + kvh * ksh, kst, j0, 64, t);
  load_tile_async(sv, v + b * vsb + kvh * vsh, vst, j0, 64, t);
  fetch(j0, 0);  // the first group holds k and v too
  float dk_acc[8][4], dv_acc[8][4];
#pragma unroll
  for (int n = 0; n < 8; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk_acc[n][e] = dv_acc[n][e] = 0.f;
  float *dqb = dq + b * dqsb + head * dqsh;
  const float scale2 = scale * LOG2E;
  for (int q0 = j0, buf = 0; q0 < t; q0 += 64, buf ^= 1) {  // the query tiles that see these keys
    if (q0 + 64 < t) {  // buf ^ 1 was last read in the previous step, before its closing barrier
      fetch(q0 + 64, buf ^ 1);
      wait_groups<1>();
    } else {
      wait_groups<0>();
    }
    __syncthreads();  // every thread's copies of tile q0 are visible
    const bf16 *sqb = sq + buf * 64 * LD, *sdob = sdo + buf * 64 * LD;
    const float *lse_t = slse + 64 * buf, *delta_t = sdelta + 64 * buf;
    float p[8][4], ds[8][4];
    rows_times_tile_t(p, sk, warp * 16, sqb);  // Sᵀ (16 keys × 64 queries) = k rows · qᵀ
    const bool masked = q0 == j0 || q0 + 64 > t;  // the diagonal tile, or one past t
#pragma unroll
    for (int n = 0; n < 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int c = n * 8 + 2 * tg + (e & 1), key = key0 + gr + 8 * (e >> 1), qi = q0 + c;
        p[n][e] = (!masked || (key <= qi && qi < t)) ? exp2f(p[n][e] * scale2 - lse_t[c] * LOG2E) : 0.f;
      }
    acc_times_tile(dv_acc, p, sdob);  // dv += Pᵀ (16 × 64) · do (64 × D)
    rows_times_tile_t(ds, sv, warp * 16, sdob);  // dPᵀ (16 × 64) = v rows · doᵀ
#pragma unroll
    for (int n = 0; n < 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) ds[n][e] = p[n][e] * (ds[n][e] - delta_t[n * 8 + 2 * tg + (e & 1)]) * scale;
#pragma unroll
      for (int hh = 0; hh < 2; ++hh)
        *reinterpret_cast<uint32_t *>(sds + (warp * 16 + gr + 8 * hh) * LD + n * 8 + 2 * tg) =
            pack(ds[n][2 * hh], ds[n][2 * hh + 1]);
    }
    acc_times_tile(dk_acc, ds, sqb);  // dk += dSᵀ (16 × 64) · q (64 × D)
    __syncthreads();                 // all of dSᵀ is in sds
    // dq (64 × D) += dS (64 queries × 64 keys) · k (64 × D): warp w owns query rows 16w … 16w + 15.
    float dq_acc[8][4];
#pragma unroll
    for (int n = 0; n < 8; ++n) dq_acc[n][0] = dq_acc[n][1] = dq_acc[n][2] = dq_acc[n][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      uint32_t a[4];
      load_a_t(a, sds, warp * 16, kk * 16);
      add_a_times_rows(dq_acc, a, sk, kk);
    }
    // No closing barrier: the next step's copies overwrite this step's q and do (read before the
    // barrier above) and its dSᵀ is written after the next step's first barrier.
    add_rows(dqb, dqst, q0 + warp * 16, t, dq_acc);
  }
  // This head's share of dk and dv (the g heads of a KV head add into the same f32 rows).
  add_rows(dk + b * dksb + kvh * dksh, dkst, key0, t, dk_acc);
  add_rows(dv + b * dvsb + kvh * dvsh, dvst, key0, t, dv_acc);
}
