// CPU kernels of the logits loss and the sampled estimator.
//
// Threads take contiguous blocks of rows (each row is computed by one thread, so
// the results do not depend on the number of threads). Within a row the phases
// of opd_math.h run one after the other over the row while it sits in the
// core's cache: the exact maxima first, then the sums centred on them, then
// the bridge, then the gradient, written in forward when asked for. A bf16,
// fp16 or strided row is converted once into a float32 scratch row; a
// contiguous float32 row is read in place.
//
// The vector loops keep LANES independent accumulators (one per vector lane,
// combined at the end in a fixed order), so gcc vectorizes them without
// reordering any float sum; the polynomial exp2 of opd_math.h is branch-free.
// The row functions are compiled for x86-64-v4 (AVX-512), x86-64-v3 (AVX2 +
// FMA) and the baseline, and the best one is chosen when the module loads
// (gcc's target_clones). The code is compiled with -ffp-contract=fast, so the
// AVX2 and AVX-512 clones use FMA (the baseline one cannot); the gradient
// written in forward and the recompute backward call the same clone of the same
// loop (for reverse KL the backward also forms the bridge sum that the forward's
// loop forms for its loss), so their results are equal bit for bit.

#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace opd {
namespace cpu {

namespace {

constexpr int LANES = 16;

// helpers of the cloned row functions must be inlined into each clone
#define OPD_INLINE inline __attribute__((always_inline))

#if defined(__x86_64__) && !defined(SGOPD_NO_CLONES)
#define OPD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define OPD_CLONES
#endif

// ---------------------------------------------------------------------------
// element conversions

OPD_INLINE float bf16_to_f32(uint16_t h) { return float_of((uint32_t)h << 16); }

OPD_INLINE uint16_t f32_to_bf16(float x) {  // round to nearest even; NaN stays a (quiet) NaN
  uint32_t u = bits_of(x);
  uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  uint32_t q = (u >> 16) | 0x40u;
  return (uint16_t)(is_nan(x) ? q : r);
}

OPD_INLINE float f16_to_f32(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t em = h & 0x7fffu;
  // normals and subnormals: place the bits and rescale by 2^(127 - 15)
  float mag = float_of(em << 13) * 5.192296858534828e+33f;
  uint32_t special = 0x7f800000u | (em << 13);  // inf, NaN
  uint32_t out = em >= 0x7c00u ? special : bits_of(mag);
  return float_of(out | sign);
}

OPD_INLINE uint16_t f32_to_f16(float x) {  // round to nearest even, branch-free
  uint32_t u = bits_of(x);
  uint32_t sign = (u >> 16) & 0x8000u;
  u &= 0x7fffffffu;
  // a normal half: rebias the exponent (-112 << 23) and round at bit 13
  uint32_t normal = (u + 0xc8000000u + 0xfffu + ((u >> 13) & 1u)) >> 13;
  // a subnormal half: let the float adder round at the half's spacing 2^-24
  uint32_t sub = bits_of(float_of(u) + 0.5f) - bits_of(0.5f);
  uint32_t h = u < 0x38800000u ? sub : normal;
  h = u >= 0x477ff000u ? 0x7c00u : h;                 // rounds to inf (or is inf)
  h = u > 0x7f800000u ? 0x7e00u : h;                  // NaN
  return (uint16_t)(h | sign);
}

OPD_INLINE const char* row_ptr(const Rows& x, int64_t r) {
  int64_t off = (r / x.d1) * x.st0 + (r % x.d1) * x.st1;
  int elt = x.dtype == F32 ? 4 : 2;
  return (const char*)x.ptr + off * elt;
}

OPD_INLINE float load_one(const Rows& x, const char* row, int64_t v) {
  int64_t i = v * x.stv;
  if (x.dtype == F32) return ((const float*)row)[i];
  if (x.dtype == BF16) return bf16_to_f32(((const uint16_t*)row)[i]);
  return f16_to_f32(((const uint16_t*)row)[i]);
}

// Columns [0, V) of row r as float32: the row itself when it is contiguous float32,
// else converted into buf.
OPD_CLONES const float* load_row(const Rows& x, int64_t r, int64_t V, float* buf) {
  const char* row = row_ptr(x, r);
  if (x.stv == 1) {
    if (x.dtype == F32) return (const float*)row;
    const uint16_t* h = (const uint16_t*)row;
    if (x.dtype == BF16) {
      for (int64_t v = 0; v < V; ++v) buf[v] = bf16_to_f32(h[v]);
    } else {
      for (int64_t v = 0; v < V; ++v) buf[v] = f16_to_f32(h[v]);
    }
    return buf;
  }
  for (int64_t v = 0; v < V; ++v) buf[v] = load_one(x, row, v);
  return buf;
}

// ---------------------------------------------------------------------------
// the phases over one row (s, t: float32, V columns)

OPD_CLONES MaxPart phase_max(const float* __restrict s, const float* __restrict t, int64_t V) {
  MaxPart m = max_identity();
  int64_t i = 0;
  if (V >= LANES) {
    float ms[LANES], ta[LANES], mt[LANES];
    int32_t arg[LANES];
    for (int j = 0; j < LANES; ++j) {
      ms[j] = s[j];
      ta[j] = t[j];
      mt[j] = t[j];
      arg[j] = j;
    }
    for (i = LANES; i + LANES <= V; i += LANES) {
      for (int j = 0; j < LANES; ++j) {
        float x = s[i + j];
        float y = t[i + j];
        bool take = x > ms[j];
        ms[j] = take ? x : ms[j];
        ta[j] = take ? y : ta[j];
        arg[j] = take ? (int32_t)(i + j) : arg[j];
        mt[j] = y > mt[j] ? y : mt[j];
      }
    }
    for (int j = 0; j < LANES; ++j) {
      MaxPart l;
      l.ms = ms[j];
      l.arg = arg[j];
      l.t_arg = ta[j];
      l.mt = mt[j];
      m = max_combine(m, l);
    }
  }
  MaxPart tail = max_identity();
  for (; i < V; ++i) max_fold(tail, s[i], t[i], i);
  return max_combine(m, tail);
}

OPD_CLONES SumPart phase_sums(const float* __restrict s, const float* __restrict t, int64_t V,
                              Frame f) {
  float zs[LANES] = {}, sss[LANES] = {}, sst[LANES] = {}, zt[LANES] = {};
  int64_t i = 0;
  for (; i + LANES <= V; i += LANES) {
    for (int j = 0; j < LANES; ++j) {
      SumPart k = sum_terms(s[i + j], t[i + j], f);
      zs[j] += k.zs;
      sss[j] += k.sss;
      sst[j] += k.sst;
      zt[j] += k.zt;
    }
  }
  SumPart out = sum_identity();
  for (int j = 0; j < LANES; ++j) {
    SumPart l;
    l.zs = zs[j];
    l.sss = sss[j];
    l.sst = sst[j];
    l.zt = zt[j];
    sum_add(out, l);
  }
  for (; i < V; ++i) sum_add(out, sum_terms(s[i], t[i], f));
  return out;
}

OPD_CLONES float phase_bridge_max(const float* __restrict s, const float* __restrict t,
                                  int64_t V, RowState r) {
  float mx[LANES];
  for (int j = 0; j < LANES; ++j) mx[j] = -f_inf();
  int64_t i = 0;
  for (; i + LANES <= V; i += LANES)
    for (int j = 0; j < LANES; ++j) mx[j] = fmax_(mx[j], bridge_x(s[i + j], t[i + j], r));
  float m = -f_inf();
  for (int j = 0; j < LANES; ++j) m = fmax_(m, mx[j]);
  for (; i < V; ++i) m = fmax_(m, bridge_x(s[i], t[i], r));
  return m;
}

OPD_CLONES QPart phase_q(const float* __restrict s, const float* __restrict t, int64_t V,
                         RowState r) {
  float zq[LANES] = {}, sqx[LANES] = {}, sqs[LANES] = {};
  int64_t i = 0;
  for (; i + LANES <= V; i += LANES) {
    for (int j = 0; j < LANES; ++j) {
      QPart k = q_terms(s[i + j], t[i + j], r);
      zq[j] += k.zq;
      sqx[j] += k.sqx;
      sqs[j] += k.sqs;
    }
  }
  QPart out = q_identity();
  for (int j = 0; j < LANES; ++j) {
    QPart l;
    l.zq = zq[j];
    l.sqx = sqx[j];
    l.sqs = sqs[j];
    q_add(out, l);
  }
  for (; i < V; ++i) q_add(out, q_terms(s[i], t[i], r));
  return out;
}

OPD_CLONES JPart phase_jsd(const float* __restrict s, const float* __restrict t, int64_t V,
                           RowState r, float pi) {
  float sq[LANES] = {}, sp[LANES] = {};
  int64_t i = 0;
  for (; i + LANES <= V; i += LANES) {
    for (int j = 0; j < LANES; ++j) {
      JPart k = j_terms(s[i + j], t[i + j], r, pi);
      sq[j] += k.sq;
      sp[j] += k.sp;
    }
  }
  JPart out = j_identity();
  for (int j = 0; j < LANES; ++j) {
    JPart l;
    l.sq = sq[j];
    l.sp = sp[j];
    j_add(out, l);
  }
  for (; i < V; ++i) j_add(out, j_terms(s[i], t[i], r, pi));
  return out;
}

template <int DT>
OPD_INLINE void store(void* out, int64_t i, float g) {
  if (DT == F32) {
    ((float*)out)[i] = g;
  } else if (DT == BF16) {
    ((uint16_t*)out)[i] = f32_to_bf16(g);
  } else {
    ((uint16_t*)out)[i] = f32_to_f16(g);
  }
}

// The gradient row (and, with WANT_Q, the bridge sums of reverse KL in the same loop).
template <int DT, int DIV, bool WANT_Q>
OPD_INLINE QPart grad_loop(const float* __restrict s, const float* __restrict t, int64_t V,
                           RowState r, float scale, float pi, void* __restrict out) {
  // (r by value: a reference could alias `out` for the compiler, which then reloads it and
  // does not vectorize)
  float zq[LANES] = {};
  int64_t i = 0;
  for (; i + LANES <= V; i += LANES) {
    for (int j = 0; j < LANES; ++j) {
      float g;
      if (DIV == REVERSE_KL)
        g = grad_reverse(s[i + j], t[i + j], r, scale);
      else if (DIV == FORWARD_KL)
        g = grad_forward(s[i + j], t[i + j], r, scale);
      else
        g = grad_jsd(s[i + j], t[i + j], r, pi, scale);
      store<DT>(out, i + j, g);
      if (WANT_Q) zq[j] += q_terms(s[i + j], t[i + j], r).zq;
    }
  }
  QPart q = q_identity();
  for (int j = 0; j < LANES; ++j) {
    QPart l = q_identity();
    l.zq = zq[j];
    q_add(q, l);
  }
  for (; i < V; ++i) {
    float g;
    if (DIV == REVERSE_KL)
      g = grad_reverse(s[i], t[i], r, scale);
    else if (DIV == FORWARD_KL)
      g = grad_forward(s[i], t[i], r, scale);
    else
      g = grad_jsd(s[i], t[i], r, pi, scale);
    store<DT>(out, i, g);
    if (WANT_Q) q_add(q, q_terms(s[i], t[i], r));
  }
  return q;
}

template <int DT>
OPD_INLINE void fill_row(void* out, int64_t V, float x) {
  for (int64_t i = 0; i < V; ++i) store<DT>(out, i, x);
}

template <int DT>
OPD_INLINE QPart grad_row_dt(const float* s, const float* t, int64_t V, const RowState& r,
                         float scale, const Params& p, void* out, bool want_q) {
  if (is_nan(scale)) {  // a poisoned row, NaN data, or no target: a NaN row
    fill_row<DT>(out, V, f_nan());
    return q_identity();  // (its loss is NaN or +inf whatever L_q is)
  }
  float pi = p.jsd_pi;
  if (p.divergence == REVERSE_KL) {
    if (want_q) return grad_loop<DT, REVERSE_KL, true>(s, t, V, r, scale, pi, out);
    return grad_loop<DT, REVERSE_KL, false>(s, t, V, r, scale, pi, out);
  }
  if (p.divergence == FORWARD_KL) return grad_loop<DT, FORWARD_KL, false>(s, t, V, r, scale, pi, out);
  return grad_loop<DT, JSD, false>(s, t, V, r, scale, pi, out);
}

OPD_CLONES QPart grad_row(const float* s, const float* t, int64_t V, const RowState& r,
                          float scale, const Params& p, void* out, int dtype, bool want_q) {
  if (dtype == F32) return grad_row_dt<F32>(s, t, V, r, scale, p, out, want_q);
  if (dtype == BF16) return grad_row_dt<BF16>(s, t, V, r, scale, p, out, want_q);
  return grad_row_dt<F16>(s, t, V, r, scale, p, out, want_q);
}

OPD_CLONES void zero_row(void* out, int dtype, int64_t V) {
  std::memset(out, 0, (size_t)V * (dtype == F32 ? 4 : 2));
}

OPD_INLINE void* grad_row_ptr(void* grad, int dtype, int64_t r, int64_t V) {
  return (char*)grad + r * V * (dtype == F32 ? 4 : 2);
}

// ---------------------------------------------------------------------------
// the sampled estimator's phases

OPD_CLONES float phase_max_s(const float* __restrict s, int64_t V) {
  float mx[LANES];
  for (int j = 0; j < LANES; ++j) mx[j] = -f_inf();
  int64_t i = 0;
  for (; i + LANES <= V; i += LANES)
    for (int j = 0; j < LANES; ++j) mx[j] = fmax_(mx[j], s[i + j]);
  float m = -f_inf();
  for (int j = 0; j < LANES; ++j) m = fmax_(m, mx[j]);
  for (; i < V; ++i) m = fmax_(m, s[i]);
  return m;
}

OPD_CLONES SampledPart phase_sums_s(const float* __restrict s, int64_t V, float ms, float cs) {
  float zs[LANES] = {}, sss[LANES] = {};
  int64_t i = 0;
  for (; i + LANES <= V; i += LANES) {
    for (int j = 0; j < LANES; ++j) {
      SampledPart k = sampled_terms(s[i + j], ms, cs);
      zs[j] += k.zs;
      sss[j] += k.sss;
    }
  }
  SampledPart out = sampled_identity();
  for (int j = 0; j < LANES; ++j) {
    SampledPart l;
    l.zs = zs[j];
    l.sss = sss[j];
    sampled_add(out, l);
  }
  for (; i < V; ++i) sampled_add(out, sampled_terms(s[i], ms, cs));
  return out;
}

template <int DT>
OPD_INLINE void sampled_grad_dt(const float* __restrict s, int64_t V, int64_t y,
                            SampledState st, float scale, const Params& p, void* out) {
  for (int64_t i = 0; i < V; ++i) store<DT>(out, i, sampled_grad_elem(s[i], i == y, st, scale, p));
}

OPD_CLONES void sampled_grad_row(const float* s, int64_t V, int64_t y, const SampledState& st,
                                 float scale, const Params& p, void* out, int dtype) {
  if (dtype == F32)
    sampled_grad_dt<F32>(s, V, y, st, scale, p, out);
  else if (dtype == BF16)
    sampled_grad_dt<BF16>(s, V, y, st, scale, p, out);
  else
    sampled_grad_dt<F16>(s, V, y, st, scale, p, out);
}

// ---------------------------------------------------------------------------
// threads over rows

template <class F>
void parallel_rows(int64_t n, int64_t V, int nthreads, F&& body) {
  // below about 64K elements per thread the threads cost more than they save
  int64_t work = n * std::max<int64_t>(V, 1);
  int64_t useful = std::max<int64_t>(1, work / (1 << 16));
  int nt = (int)std::min<int64_t>({(int64_t)std::max(nthreads, 1), n, useful});
  if (nt <= 1) {
    body(0, n);
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(nt - 1);
  for (int k = 1; k < nt; ++k)
    pool.emplace_back([&, k] { body(n * k / nt, n * (k + 1) / nt); });
  body(0, n / nt);
  for (auto& th : pool) th.join();
}

inline bool token_ok(int64_t y, int64_t V) { return y >= 0 && y < V; }

// A fresh gradient buffer is written once, page by page: with 4 KiB pages the page
// faults of its first touch cost more than the kernel (about 2 us per page). Ask for
// transparent huge pages on its 2 MiB-aligned interior (advice only; harmless where
// the kernel ignores it, and a no-op off Linux).
void advise_huge(void* p, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const uintptr_t huge = (uintptr_t)1 << 21;
  uintptr_t a = ((uintptr_t)p + huge - 1) & ~(huge - 1);
  uintptr_t b = ((uintptr_t)p + (uintptr_t)bytes) & ~(huge - 1);
  if (b > a) madvise((void*)a, b - a, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

inline void advise_grad(void* grad, int dtype, int64_t n, int64_t V) {
  static const bool off = [] {  // SGOPD_NO_HUGEPAGES=1: no advice
    const char* e = std::getenv("SGOPD_NO_HUGEPAGES");
    return e && *e && *e != '0';
  }();
  if (grad && !off) advise_huge(grad, n * V * (dtype == F32 ? 4 : 2));
}

}  // namespace

// ---------------------------------------------------------------------------
// entry points

void opd_forward(const Rows& s, const Rows& t, int64_t n, int64_t V, const int64_t* tok,
                 const float* sign, const float* coef, float* table, void* grad,
                 int grad_dtype, const Params& p, int nthreads) {
  advise_grad(grad, grad_dtype, n, V);
  parallel_rows(n, V, nthreads, [&](int64_t r0, int64_t r1) {
    std::vector<float> sbuf((size_t)V), tbuf((size_t)V);
    for (int64_t r = r0; r < r1; ++r) {
      float* out = table + r * ROW_K;
      int64_t y = tok[r];
      if (y == p.ignore_index) {  // a masked row reads nothing
        write_zero_row(out, ROW_K);
        if (grad) zero_row(grad_row_ptr(grad, grad_dtype, r, V), grad_dtype, V);
        continue;
      }
      bool y_ok = token_ok(y, V);
      const float* sr = load_row(s, r, V, sbuf.data());
      const float* tr = load_row(t, r, V, tbuf.data());
      Frame f = make_frame(phase_max(sr, tr, V), p);
      SumPart sp = phase_sums(sr, tr, V, f);
      int64_t ys = y_ok ? y : 0;  // never read out of bounds (the row is NaN then)
      float sigma = sign ? sign[r] : 0.0f;
      RowState st = decide(sp, f, sr[ys], tr[ys], y_ok, sigma, p);
      set_bridge_max(st, phase_bridge_max(sr, tr, V, st));
      QPart qp = q_identity();
      JPart jp = j_identity();
      bool reverse = p.divergence == REVERSE_KL;
      if (!reverse) {
        qp = phase_q(sr, tr, V, st);
        set_bridge_sum(st, qp);
        if (p.divergence == JSD) {
          jp = phase_jsd(sr, tr, V, st, p.jsd_pi);
          set_jsd(st, jp, p.jsd_pi);
        }
      }
      if (reverse && !grad) {
        qp = phase_q(sr, tr, V, st);
        set_bridge_sum(st, qp);
      }
      if (grad) {
        // reverse KL: the gradient needs only E_p[lp_S] and E_p[lp_T]; its loss's
        // normalizer L_q is summed in the same loop. The NaN rule of the loss is known
        // before: a poisoned row or an empty support.
        float pre_loss = st.poisoned ? f_nan() : 0.0f;
        RowState gs = st;
        gs.loss = pre_loss;
        float scale = grad_scale(gs, coef ? coef[r] : 1.0f, p);
        void* go = grad_row_ptr(grad, grad_dtype, r, V);
        QPart q2 = grad_row(sr, tr, V, st, scale, p, go, grad_dtype, reverse);
        if (reverse) {
          qp = q2;
          set_bridge_sum(st, qp);
        }
        finalize(st, qp, jp, p);
        if (is_nan(st.loss) && !st.poisoned)  // NaN data: the whole gradient row is NaN
          grad_row(sr, tr, V, st, f_nan(), p, go, grad_dtype, false);
      } else {
        finalize(st, qp, jp, p);
      }
      write_row(out, st);
    }
  });
}

void opd_backward(const Rows& s, const Rows& t, int64_t n, int64_t V, const int64_t* tok,
                  const float* table, const float* grad_rows, void* grad, int grad_dtype,
                  const Params& p, int nthreads) {
  advise_grad(grad, grad_dtype, n, V);
  parallel_rows(n, V, nthreads, [&](int64_t r0, int64_t r1) {
    std::vector<float> sbuf((size_t)V), tbuf((size_t)V);
    for (int64_t r = r0; r < r1; ++r) {
      void* go = grad_row_ptr(grad, grad_dtype, r, V);
      if (tok[r] == p.ignore_index) {
        zero_row(go, grad_dtype, V);
        continue;
      }
      const float* sr = load_row(s, r, V, sbuf.data());
      const float* tr = load_row(t, r, V, tbuf.data());
      RowState st = read_row(table + r * ROW_K, p);
      // reverse KL: the very loop of the forward (which also sums the bridge for its loss),
      // so that with FMA contraction the recomputed gradient has the forward's bits
      grad_row(sr, tr, V, st, grad_scale(st, grad_rows[r], p), p, go, grad_dtype,
               p.divergence == REVERSE_KL);
    }
  });
}

void sampled_forward(const Rows& s, int64_t n, int64_t V, const int64_t* tok,
                     const float* teacher_lp, const float* sign, const float* coef,
                     float* table, void* grad, int grad_dtype, const Params& p, int nthreads) {
  advise_grad(grad, grad_dtype, n, V);
  parallel_rows(n, V, nthreads, [&](int64_t r0, int64_t r1) {
    std::vector<float> sbuf((size_t)V);
    for (int64_t r = r0; r < r1; ++r) {
      float* out = table + r * SAMPLED_ROW_K;
      int64_t y = tok[r];
      if (y == p.ignore_index) {
        write_zero_row(out, SAMPLED_ROW_K);
        if (grad) zero_row(grad_row_ptr(grad, grad_dtype, r, V), grad_dtype, V);
        continue;
      }
      bool y_ok = token_ok(y, V);
      const float* sr = load_row(s, r, V, sbuf.data());
      float ms = phase_max_s(sr, V);
      float ref = ms == -f_inf() ? 0.0f : ms;
      SampledPart sp = phase_sums_s(sr, V, ref, p.cs);
      float sy = sr[y_ok ? y : 0];
      SampledState st = sampled_finish(out, ms, sp, sy, y_ok, teacher_lp[r],
                                       sign ? sign[r] : 0.0f, p);
      if (grad)
        sampled_grad_row(sr, V, y, st, sampled_grad_scale(st, coef ? coef[r] : 1.0f, p), p,
                         grad_row_ptr(grad, grad_dtype, r, V), grad_dtype);
    }
  });
}

void sampled_backward(const Rows& s, int64_t n, int64_t V, const int64_t* tok,
                      const float* table, const float* grad_rows, void* grad, int grad_dtype,
                      const Params& p, int nthreads) {
  advise_grad(grad, grad_dtype, n, V);
  parallel_rows(n, V, nthreads, [&](int64_t r0, int64_t r1) {
    std::vector<float> sbuf((size_t)V);
    for (int64_t r = r0; r < r1; ++r) {
      void* go = grad_row_ptr(grad, grad_dtype, r, V);
      if (tok[r] == p.ignore_index) {
        zero_row(go, grad_dtype, V);
        continue;
      }
      const float* sr = load_row(s, r, V, sbuf.data());
      SampledState st = sampled_read_row(table + r * SAMPLED_ROW_K);
      sampled_grad_row(sr, V, tok[r], st, sampled_grad_scale(st, grad_rows[r], p), p, go,
                       grad_dtype);
    }
  });
}

namespace {
OPD_CLONES void scale_row(void* row, int dtype, int64_t V, float g) {
  if (dtype == F32) {
    float* x = (float*)row;
    for (int64_t i = 0; i < V; ++i) x[i] *= g;
  } else if (dtype == BF16) {
    uint16_t* x = (uint16_t*)row;
    for (int64_t i = 0; i < V; ++i) x[i] = f32_to_bf16(bf16_to_f32(x[i]) * g);
  } else {
    uint16_t* x = (uint16_t*)row;
    for (int64_t i = 0; i < V; ++i) x[i] = f32_to_f16(f16_to_f32(x[i]) * g);
  }
}
}  // namespace

// ---------------------------------------------------------------------------
// the top-k teacher's passes over the student's row (the O(k) part of the loss is
// formed outside, from their sums)

namespace {
OPD_INLINE bool in_row(int64_t c, int64_t V) { return c >= 0 && c < V; }

// The row's maximum and its maximum outside the categories (mark[v] = 1 inside).
OPD_CLONES void topk_row_max(const float* __restrict s, const uint8_t* __restrict mark,
                             int64_t V, float* m_out, float* mt_out) {
  float mx[LANES], mt[LANES];
  for (int j = 0; j < LANES; ++j) mx[j] = mt[j] = -f_inf();
  int64_t i = 0;
  for (; i + LANES <= V; i += LANES) {
    for (int j = 0; j < LANES; ++j) {  // (a NaN is passed over here; the sums carry it)
      float x = s[i + j];
      mx[j] = x > mx[j] ? x : mx[j];
      float xt = mark[i + j] ? -f_inf() : x;
      mt[j] = xt > mt[j] ? xt : mt[j];
    }
  }
  float m = -f_inf(), t = -f_inf();
  for (int j = 0; j < LANES; ++j) {
    m = mx[j] > m ? mx[j] : m;
    t = mt[j] > t ? mt[j] : t;
  }
  for (; i < V; ++i) {
    m = s[i] > m ? s[i] : m;
    t = (!mark[i] && s[i] > t) ? s[i] : t;
  }
  *m_out = m;
  *mt_out = t;
}

// sum 2^((z - m) scale2), sum of it times (z - m) / tau, and outside the categories
// sum 2^((z - mt) scale2): float terms, double sums (LANES of each, combined in order).
OPD_CLONES void topk_row_sums(const float* __restrict s, const uint8_t* __restrict mark,
                              int64_t V, float m, float mt, float scale2, float inv_t,
                              double* out) {
  double se[LANES], sez[LANES], st[LANES];
  for (int j = 0; j < LANES; ++j) se[j] = sez[j] = st[j] = 0.0;
  int64_t i = 0;
  for (; i + LANES <= V; i += LANES) {
    for (int j = 0; j < LANES; ++j) {
      float d = s[i + j] - m;
      float e = ex2(d * scale2);
      float et = ex2((s[i + j] - mt) * scale2);
      se[j] += (double)e;
      sez[j] += e == 0.0f ? 0.0 : (double)e * (double)(d * inv_t);  // (0 log 0 = 0)
      st[j] += mark[i + j] ? 0.0 : (double)et;
    }
  }
  double a = 0.0, b = 0.0, c = 0.0;
  for (int j = 0; j < LANES; ++j) {
    a += se[j];
    b += sez[j];
    c += st[j];
  }
  for (; i < V; ++i) {
    float d = s[i] - m;
    float e = ex2(d * scale2);
    a += (double)e;
    b += e == 0.0f ? 0.0 : (double)e * (double)(d * inv_t);
    if (!mark[i]) c += (double)ex2((s[i] - mt) * scale2);
  }
  out[0] = a;
  out[1] = b;
  out[2] = c;
}

// topk_tail_grad (opd_math.h) over the row
template <int DT>
OPD_INLINE void topk_tail_loop(const float* __restrict s, int64_t V, double inv_temp,
                               double off, float sign, void* __restrict out) {
  for (int64_t v = 0; v < V; ++v) store<DT>(out, v, topk_tail_grad(s[v], inv_temp, off, sign));
}

OPD_CLONES void topk_row_tail_grad(const float* s, int64_t V, double inv_temp, double off,
                                   float sign, void* out, int dtype) {
  if (dtype == F32)
    topk_tail_loop<F32>(s, V, inv_temp, off, sign, out);
  else if (dtype == BF16)
    topk_tail_loop<BF16>(s, V, inv_temp, off, sign, out);
  else
    topk_tail_loop<F16>(s, V, inv_temp, off, sign, out);
}
}  // namespace

void topk_stream(const Rows& s, int64_t n, int64_t V, const int64_t* cols, int64_t J,
                 double inv_temp, const int64_t* tok, int64_t ignore_index, double* out,
                 int nthreads) {
  static_assert(TOPK_STREAM_K == TOPK_OUT, "the CPU and CUDA passes give the same output");
  const int64_t W = TOPK_STREAM_K + J;
  const float scale2 = (float)(inv_temp * (double)LOG2E);
  const float inv_t = (float)inv_temp;
  parallel_rows(n, V, nthreads, [&](int64_t r0, int64_t r1) {
    std::vector<float> sbuf((size_t)V);
    std::vector<uint8_t> mark((size_t)V + 1, 0);
    for (int64_t r = r0; r < r1; ++r) {
      double* o = out + r * W;
      if (tok[r] == ignore_index) {  // a masked row reads nothing
        for (int64_t k = 0; k < W; ++k) o[k] = 0.0;
        continue;
      }
      const int64_t* c = cols + r * J;
      for (int64_t j = 0; j < J; ++j)
        if (in_row(c[j], V)) mark[c[j]] = 1;
      const float* sr = load_row(s, r, V, sbuf.data());
      float m, mt;
      topk_row_max(sr, mark.data(), V, &m, &mt);
      m = finite_or_zero(m);
      mt = finite_or_zero(mt);
      double sums[3];
      topk_row_sums(sr, mark.data(), V, m, mt, scale2, inv_t, sums);
      // (the logits over tau in double, as the O(k) terms form them from the same logits)
      o[0] = (double)m * inv_temp;
      o[1] = (double)mt * inv_temp;
      o[2] = sums[0];
      o[3] = sums[1];
      o[4] = sums[2];
      for (int64_t j = 0; j < J; ++j) {
        o[TOPK_STREAM_K + j] = in_row(c[j], V) ? (double)sr[c[j]] * inv_temp : 0.0;
        if (in_row(c[j], V)) mark[c[j]] = 0;
      }
    }
  });
}

void topk_backward(const Rows& s, int64_t n, int64_t V, const int64_t* cols, int64_t J,
                   const double* values, const double* rowinfo, double inv_temp,
                   const int64_t* tok, int64_t ignore_index, void* grad, int grad_dtype,
                   int nthreads) {
  advise_grad(grad, grad_dtype, n, V);
  parallel_rows(n, V, nthreads, [&](int64_t r0, int64_t r1) {
    std::vector<float> sbuf((size_t)V);
    for (int64_t r = r0; r < r1; ++r) {
      void* go = grad_row_ptr(grad, grad_dtype, r, V);
      if (tok[r] == ignore_index) {
        zero_row(go, grad_dtype, V);
        continue;
      }
      const float* sr = load_row(s, r, V, sbuf.data());
      // the tail's gradient p_v alpha g / tau = sign exp(z_v / tau - log Z + log|alpha g / tau|),
      // its exponent formed in double: alpha alone may lie far outside float32's range
      const double off = rowinfo[r * 2];
      const float sign = (float)rowinfo[r * 2 + 1];
      topk_row_tail_grad(sr, V, inv_temp, off, sign, go, grad_dtype);
      const int64_t* c = cols + r * J;
      for (int64_t j = 0; j < J; ++j) {
        if (!in_row(c[j], V)) continue;
        float g = (float)values[r * J + j];
        if (grad_dtype == F32)
          store<F32>(go, c[j], g);
        else if (grad_dtype == BF16)
          store<BF16>(go, c[j], g);
        else
          store<F16>(go, c[j], g);
      }
    }
  });
}

void scale_grad(void* grad, int dtype, int64_t n, int64_t V, const float* g, bool per_row,
                int nthreads) {
  if (!per_row && g[0] == 1.0f) return;
  parallel_rows(n, V, nthreads, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float f = per_row ? g[r] : g[0];
      if (f != 1.0f) scale_row(grad_row_ptr(grad, dtype, r, V), dtype, V, f);
    }
  });
}

const char* isa() {
#if defined(__x86_64__) && !defined(SGOPD_NO_CLONES)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return "x86-64-v4";
  if (__builtin_cpu_supports("x86-64-v3")) return "x86-64-v3";
  return "x86-64";
#else
  return "generic";
#endif
}

}  // namespace cpu
}  // namespace opd
