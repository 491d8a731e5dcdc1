// The row math of sgopd_kernels' compiled kernels, shared by the CPU and CUDA code.
//
// One row (one token position) is processed in phases. Every phase folds the
// row's elements into a small partial ("Part") that combines by max or by plain
// addition, so a row may be split into pieces (vector lanes, threads, the
// blocks of a thread-block cluster), each piece folded, and the pieces
// combined: the result is the one-piece result up to the order of the float
// additions. Phases:
//
//   1. MaxPart   raw maxima of both models' logits, the student's argmax
//                (first index on ties) and the teacher's logit there;
//   -> Frame     the references every exponent and linear sum is centred on;
//   2. SumPart   sum 2^sf, sum 2^sf sf, sum 2^sf tf (student) and sum 2^te (teacher);
//   -> decide()  normalizers, delta, the gate, lambda, a, b: a RowState;
//   3. bridge max of x = a tf + b sf over the joint support;
//   4. QPart     sum 2^(x - max x), and for forward KL the two weighted sums;
//   5. JPart     (JSD only) sum q (log q - log m), sum p (log p - log m);
//   -> finalize  the loss and the row of the table;
//   6. grad_*()  the gradient of one element from the finished RowState.
//
// Units: base 2 inside (cs = log2(e) / temperature, ct = log2(e) /
// teacher_temperature); natural units in the shared columns of the table.
// Exponents are (raw - ref) * scale, a subtraction then a product (never
// contracted into an FMA), so the row's max contributes exactly 2^0. The
// bridge value is formed by one function (with pinned roundings on the device),
// so every phase and the recompute backward see the same bits.
//
// Conventions of docs/math.md: 0 log 0 = 0; -inf logits are masked entries;
// entries outside the joint support have q = 0; an empty joint support gives a
// loss of +inf; a row that is -inf everywhere has no support (every lp = -inf);
// delta = 0 when both models give y probability 0; NaN reaches the loss of its
// row only. A row whose token is outside [0, V) or whose verdict is NaN is
// "poisoned": its loss and its gradient row are NaN.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define OPD_HD __host__ __device__ __forceinline__
#else
#define OPD_HD inline __attribute__((always_inline))
#endif

#if !defined(__CUDA_ARCH__)
#include <cmath>
#include <cstring>
#endif

namespace opd {

// ---------------------------------------------------------------------------
// the row table: (N, ROW_K) float32 for the logits loss, (N, SAMPLED_ROW_K) for
// the sampled estimator. Columns 0-6 / 0-5 have the same meaning on every
// backend (sgopd_kernels/_rows.py); the rest belong to these kernels
// (sgopd_kernels/compiled.py names them too).

enum Column : int {
  LOSS = 0,        // per-position divergence (0 where masked), nats
  DELTA = 1,       // lp_T(y) - lp_S(y), nats
  GATE = 2,        // g = sign(delta) * sigma
  TEACHER_KL = 3,  // KL(p_S || p_T), unbridged, nats
  ENTROPY = 4,     // H(p_S), nats
  COL_A = 5,       // a = lambda
  COL_B = 6,       // b = 1 - lambda + beta
  // private: the state the backward (recompute) needs, base-2 units
  C_REF_S = 7,     // student reference: its raw max (0 where that is -inf)
  C_LOG2Z_S = 8,   // log2 sum 2^((z_S - REF_S) cs)   (+inf: no support)
  C_FRAME_T = 9,   // teacher frame: its raw logit at the student's argmax (or its max)
  C_MEAN_S = 10,   // E_{p_S}[sf], sf = (z_S - REF_S) cs
  C_MEAN_T = 11,   // E_{p_S}[tf], tf = (z_T - FRAME_T) ct
  C_MAX_Q = 12,    // reference of the bridge: max x over the joint support (0 if empty)
  C_LOG2Z_Q = 13,  // log2 sum 2^(x - MAX_Q)   (+inf: empty support)
  C_MEAN_H = 14,   // JSD: E_{p_S}[h], h = (1 - pi) log(p_S / m), nats
  C_SPARE = 15,    // unused (0)
  ROW_K = 16,
};

enum SampledColumn : int {
  S_ADV = 5,       // A = lambda * delta (shared)
  S_REF = 6,       // private: the student's raw max (0 where -inf)
  S_LOG2Z = 7,     // private: log2 sum 2^((z_S - S_REF) cs)
  SAMPLED_ROW_K = 8,
};

enum Divergence : int { REVERSE_KL = 0, FORWARD_KL = 1, JSD = 2 };

constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

// ---------------------------------------------------------------------------
// scalar primitives (device: CUDA intrinsics; host: portable code that gcc vectorizes)

OPD_HD float f_inf() {
#if defined(__CUDA_ARCH__)
  return __int_as_float(0x7f800000);
#else
  return HUGE_VALF;
#endif
}
OPD_HD float f_nan() {
#if defined(__CUDA_ARCH__)
  return __int_as_float(0x7fffffff);
#else
  return NAN;
#endif
}
OPD_HD bool is_nan(float x) { return x != x; }

OPD_HD uint32_t bits_of(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
#endif
}
OPD_HD float float_of(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, 4);
  return x;
#endif
}

// products and sums whose rounding is pinned on the device (never contracted into an FMA).
// The host code is compiled with FMA contraction (the polynomial exp2 needs it to be
// fast); there the forward and the recompute backward run the very same compiled loops,
// which is what keeps their bits equal.
OPD_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
OPD_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// 2^x on the host: a degree-6 polynomial on [-1/2, 1/2] (about 1.5 ulp) and an
// exponent scaling in two steps, so results down to the subnormals are right.
// -inf -> 0, +inf -> +inf, NaN -> NaN. Branch-free: gcc vectorizes it.
OPD_HD float exp2_poly(float x) {
  float xc = x < -252.0f ? -252.0f : x;  // (NaN fails both tests and stays NaN)
  xc = xc > 128.0f ? 128.0f : xc;
  const float magic = 12582912.0f;       // 1.5 * 2^23: rounds to the nearest integer
  float r = xc + magic;
  float fn = r - magic;
  int32_t n = (int32_t)(bits_of(r) - bits_of(magic));
  float f = xc - fn;                     // in [-1/2, 1/2]
  float p = 1.4990888e-04f;
  p = p * f + 1.3393083e-03f;
  p = p * f + 9.6196737e-03f;
  p = p * f + 5.5503473e-02f;
  p = p * f + 2.4022637e-01f;
  p = p * f + 6.9314718e-01f;
  p = p * f + 1.0f;
  int32_t n1 = n >> 1;
  int32_t n2 = n - n1;
  float s1 = float_of((uint32_t)(n1 + 127) << 23);
  float s2 = float_of((uint32_t)(n2 + 127) << 23);
  return (p * s1) * s2;
}

OPD_HD float ex2(float x) {
#if defined(__CUDA_ARCH__)
  return exp2f(x);
#else
  return exp2_poly(x);
#endif
}

// log2 of a positive normal float on the host: x = m 2^e with m in [sqrt(1/2), sqrt(2)),
// ln m = 2 atanh(u), u = (m - 1) / (m + 1), |u| < 0.172 (a degree-4 series in u^2 is
// exact to float precision). Branch-free: gcc vectorizes it. (Used where the argument
// is known to lie in [min(pi, 1 - pi), 1]; zero, negative, subnormal, inf and NaN are
// not handled.)
OPD_HD float log2_poly(float x) {
  uint32_t u = bits_of(x);
  // shift by sqrt(1/2)'s bits so that the mantissa lands in [sqrt(1/2), sqrt(2))
  uint32_t k = u - 0x3f3504f3u;
  int32_t e = (int32_t)k >> 23;
  float m = float_of((k & 0x007fffffu) + 0x3f3504f3u);
  float t = (m - 1.0f) / (m + 1.0f);
  float t2 = t * t;
  float poly = 1.0f / 9.0f;
  poly = poly * t2 + 1.0f / 7.0f;
  poly = poly * t2 + 1.0f / 5.0f;
  poly = poly * t2 + 1.0f / 3.0f;
  poly = poly * t2 + 1.0f;
  return (float)e + (2.0f * LOG2E) * (t * poly);
}

// log2 of a value in (0, 1] bounded away from 0 (the JSD's per-element logarithm)
OPD_HD float lg2_unit(float x) {
#if defined(__CUDA_ARCH__)
  return log2f(x);
#else
  return log2_poly(x);
#endif
}

OPD_HD float lg2(float x) {
#if defined(__CUDA_ARCH__)
  return log2f(x);
#else
  return std::log2(x);
#endif
}

OPD_HD float fmax_(float a, float b) { return b > a ? b : a; }  // keeps a when b is NaN
OPD_HD float fabs_(float a) { return a < 0.0f ? -a : a; }
OPD_HD float sign_(float x) { return (float)(x > 0.0f) - (float)(x < 0.0f); }  // NaN -> 0

// ---------------------------------------------------------------------------
// options, as the kernels see them

struct Params {
  int divergence;       // Divergence
  bool has_gate;        // a verdict per row (sign tensor given)
  float beta;           // Veto's bridge exponent
  float lam_pos;        // lambda where g > 0
  float lam_neg;        // lambda where g < 0
  float jsd_pi;         // pi of the JSD
  float cs;             // log2(e) / temperature
  float ct;             // log2(e) / teacher_temperature
  float inv_temp;       // 1 / temperature (the gradient's scale)
  int64_t ignore_index;
};

OPD_HD Params make_params(int divergence, bool has_gate, float beta, float lam_pos,
                          float lam_neg, float jsd_pi, float temperature,
                          float teacher_temperature, int64_t ignore_index) {
  Params p;
  p.divergence = divergence;
  p.has_gate = has_gate;
  p.beta = beta;
  p.lam_pos = lam_pos;
  p.lam_neg = lam_neg;
  p.jsd_pi = jsd_pi;
  p.cs = LOG2E / temperature;
  p.ct = LOG2E / teacher_temperature;
  p.inv_temp = 1.0f / temperature;
  p.ignore_index = ignore_index;
  return p;
}

// ---------------------------------------------------------------------------
// phase 1: maxima

struct MaxPart {
  float ms;     // max of the raw student logits (-inf while empty)
  int64_t arg;  // its first index (INT64_MAX while empty)
  float t_arg;  // the teacher's raw logit there
  float mt;     // max of the raw teacher logits
};

OPD_HD MaxPart max_identity() {
  MaxPart m;
  m.ms = -f_inf();
  m.arg = INT64_MAX;
  m.t_arg = -f_inf();
  m.mt = -f_inf();
  return m;
}

// Fold element v. Elements must be folded in increasing v within a part (ties keep the first).
OPD_HD void max_fold(MaxPart& m, float s, float t, int64_t v) {
  bool take = s > m.ms || (m.arg == INT64_MAX && s == m.ms);  // -inf rows still get an argmax
  m.ms = take ? s : m.ms;
  m.arg = take ? v : m.arg;
  m.t_arg = take ? t : m.t_arg;
  m.mt = fmax_(m.mt, t);
}

// Combine two parts, in any order: the larger max wins, ties go to the lower index.
OPD_HD MaxPart max_combine(const MaxPart& a, const MaxPart& b) {
  bool take_b = b.ms > a.ms || (b.ms == a.ms && b.arg < a.arg);
  MaxPart m;
  m.ms = take_b ? b.ms : a.ms;
  m.arg = take_b ? b.arg : a.arg;
  m.t_arg = take_b ? b.t_arg : a.t_arg;
  m.mt = fmax_(a.mt, b.mt);
  return m;
}

// The references of a row. sf = (z_S - ms) cs is the student's centred logit
// (<= 0); te = (z_T - mt) ct the teacher's, for its normalizer; tf = (z_T - ft) ct
// the teacher's for the linear sums, centred on its logit at the student's mode,
// where p_S has its mass (its own max would lose precision in E_{p_S}[lp_T] when
// the teacher's mass lies elsewhere).
struct Frame {
  float ms, mt, ft;
  float cs, ct;
};

OPD_HD Frame make_frame(const MaxPart& m, const Params& p) {
  Frame f;
  f.ms = m.ms == -f_inf() ? 0.0f : m.ms;
  f.mt = m.mt == -f_inf() ? 0.0f : m.mt;
  // the teacher masks the student's mode (or is NaN there): centre on the teacher's max
  f.ft = (m.t_arg == -f_inf() || is_nan(m.t_arg)) ? f.mt : m.t_arg;
  f.cs = p.cs;
  f.ct = p.ct;
  return f;
}

OPD_HD float student_sf(float s, const Frame& f) { return (s - f.ms) * f.cs; }
OPD_HD float teacher_te(float t, const Frame& f) { return (t - f.mt) * f.ct; }
OPD_HD float teacher_tf(float t, const Frame& f) { return (t - f.ft) * f.ct; }

// ---------------------------------------------------------------------------
// phase 2: the two normalizers and the student-weighted linear sums

struct SumPart {
  float zs;   // sum 2^sf
  float sss;  // sum 2^sf sf
  float sst;  // sum 2^sf tf   (-inf where the teacher masks student mass)
  float zt;   // sum 2^te
};

OPD_HD SumPart sum_identity() {
  SumPart s;
  s.zs = 0.0f;
  s.sss = 0.0f;
  s.sst = 0.0f;
  s.zt = 0.0f;
  return s;
}

OPD_HD SumPart sum_terms(float s, float t, const Frame& f) {
  float sf = student_sf(s, f);
  float es = ex2(sf);
  SumPart k;
  k.zs = es;
  k.sss = es == 0.0f ? 0.0f : es * sf;  // 0 log 0 = 0
  k.sst = es == 0.0f ? 0.0f : es * teacher_tf(t, f);
  k.zt = ex2(teacher_te(t, f));
  return k;
}

OPD_HD void sum_add(SumPart& a, const SumPart& b) {
  a.zs += b.zs;
  a.sss += b.sss;
  a.sst += b.sst;
  a.zt += b.zt;
}

// ---------------------------------------------------------------------------
// the row's decision: normalizers, delta, the gate and the bridge coefficients

struct RowState {
  Frame f;
  float ls;       // log2 Z_s (+inf: the student has no support)
  float lt;       // log2 Z_t
  float mean_s;   // E_{p_S}[sf] (0 without support)
  float mean_t;   // E_{p_S}[tf]
  float delta2;   // delta, base 2
  float gate;     // g
  float a, b;     // bridge coefficients (NaN for a NaN verdict)
  bool poisoned;  // token outside [0, V) or a NaN verdict: NaN loss and gradient
  bool empty;     // the joint support is empty: no target (loss +inf, gradient NaN)
  // filled by the bridge phases
  float mq;       // reference of the bridge (its max; 0 if the support is empty)
  float lzq;      // log2 sum 2^(x - mq) (+inf: empty support)
  float mean_h;   // JSD: E_{p_S}[h], nats
  float loss;     // nats; NaN for a poisoned row
};

// s_y, t_y: the raw logits at the sampled token (any value when !y_ok: not read);
// sigma: the row's verdict (0 without a gate).
OPD_HD RowState decide(const SumPart& sp, const Frame& f, float s_y, float t_y, bool y_ok,
                       float sigma, const Params& p) {
  RowState r;
  r.f = f;
  r.ls = sp.zs == 0.0f ? f_inf() : lg2(sp.zs);
  r.lt = sp.zt == 0.0f ? f_inf() : lg2(sp.zt);
  r.mean_s = sp.zs == 0.0f ? 0.0f : sp.sss / sp.zs;
  r.mean_t = sp.zs == 0.0f ? 0.0f : sp.sst / sp.zs;
  float lps_y = student_sf(s_y, f) - r.ls;
  float lpt_y = teacher_te(t_y, f) - r.lt;
  bool both_zero = lps_y == -f_inf() && lpt_y == -f_inf();
  r.delta2 = both_zero ? 0.0f : lpt_y - lps_y;
  float g = p.has_gate ? sign_(r.delta2) * sigma : 0.0f;  // a NaN verdict gives NaN
  float lam = g > 0.0f ? p.lam_pos : (g < 0.0f ? p.lam_neg : 1.0f);
  bool bad_sigma = p.has_gate && is_nan(sigma);
  r.gate = g;
  r.a = bad_sigma ? f_nan() : lam;
  r.b = bad_sigma ? f_nan() : 1.0f - lam + p.beta;
  r.poisoned = !y_ok || bad_sigma;
  r.empty = false;
  r.mq = 0.0f;
  r.lzq = f_inf();
  r.mean_h = 0.0f;
  r.loss = 0.0f;
  return r;
}

// ---------------------------------------------------------------------------
// phases 3-4: the bridge x = a tf + b sf on the joint support (-inf outside)

OPD_HD float bridge_x(float s, float t, const RowState& r) {
  bool support = s != -f_inf() && t != -f_inf();
  float x = add_rn(mul_rn(r.a, teacher_tf(t, r.f)), mul_rn(r.b, student_sf(s, r.f)));
  return support ? x : -f_inf();
}

// after phase 3: the bridge's reference from its max (-inf: empty support)
OPD_HD void set_bridge_max(RowState& r, float max_x) {
  r.empty = max_x == -f_inf();
  r.mq = r.empty ? 0.0f : max_x;
}

struct QPart {
  float zq;   // sum 2^(x - mq)
  float sqx;  // sum 2^(x - mq) (x - mq)   (forward KL)
  float sqs;  // sum 2^(x - mq) sf         (forward KL)
};

OPD_HD QPart q_identity() {
  QPart q;
  q.zq = 0.0f;
  q.sqx = 0.0f;
  q.sqs = 0.0f;
  return q;
}

OPD_HD QPart q_terms(float s, float t, const RowState& r) {
  float xm = bridge_x(s, t, r) - r.mq;
  float e = ex2(xm);
  QPart k;
  k.zq = e;
  k.sqx = e == 0.0f ? 0.0f : e * xm;
  k.sqs = e == 0.0f ? 0.0f : e * student_sf(s, r.f);
  return k;
}

OPD_HD void q_add(QPart& a, const QPart& b) {
  a.zq += b.zq;
  a.sqx += b.sqx;
  a.sqs += b.sqs;
}

OPD_HD void set_bridge_sum(RowState& r, const QPart& q) {
  r.lzq = q.zq == 0.0f ? f_inf() : lg2(q.zq);
}

// ---------------------------------------------------------------------------
// per-element log-probabilities

OPD_HD float lp_s2(float s, const RowState& r) { return student_sf(s, r.f) - r.ls; }
OPD_HD float lq2(float s, float t, const RowState& r) {
  return (bridge_x(s, t, r) - r.mq) - r.lzq;  // -inf off the support and for an empty one
}

// ---------------------------------------------------------------------------
// phase 5 (JSD): m = (1 - pi) p + pi q. With d = log2 q - log2 p,
// phi(d) = log2((1 - pi) + pi 2^d) = log2 p - log2 m ... negated: log2 m = log2 p + phi,
// log2 q - log2 m = d - phi. Both are formed without overflow for any d.

struct JsdTerm {
  float p, q;
  float phi;    // log2 m - log2 p   (meaningful where p > 0)
  float dmphi;  // log2 q - log2 m   (meaningful where q > 0)
};

OPD_HD JsdTerm jsd_term(float s, float t, const RowState& r, float pi) {
  float lp = lp_s2(s, r);
  float lq = lq2(s, t, r);
  JsdTerm j;
  j.p = ex2(lp);
  j.q = ex2(lq);
  float d = lq - lp;
  float e = ex2(-fabs_(d));  // 2^-|d|, in [0, 1]
  bool up = d > 0.0f;
  // d <= 0: phi = log2((1-pi) + pi 2^d);  d > 0: phi = d + log2(pi + (1-pi) 2^-d)
  float l = lg2_unit(up ? pi + (1.0f - pi) * e : (1.0f - pi) + pi * e);
  j.phi = up ? d + l : l;
  j.dmphi = up ? -l : d - l;
  return j;
}

struct JPart {
  float sq;  // sum q (log2 q - log2 m)
  float sp;  // sum p (log2 m - log2 p) ... = sum p phi
};

OPD_HD JPart j_identity() {
  JPart j;
  j.sq = 0.0f;
  j.sp = 0.0f;
  return j;
}

OPD_HD JPart j_terms(float s, float t, const RowState& r, float pi) {
  JsdTerm k = jsd_term(s, t, r, pi);
  JPart j;
  j.sq = k.q == 0.0f ? 0.0f : k.q * k.dmphi;
  j.sp = k.p == 0.0f ? 0.0f : k.p * k.phi;
  return j;
}

OPD_HD void j_add(JPart& a, const JPart& b) {
  a.sq += b.sq;
  a.sp += b.sp;
}

// after phase 5: E_p[h] = -(1 - pi) ln2 sum p phi, which the gradient needs
OPD_HD void set_jsd(RowState& r, const JPart& j, float pi) {
  r.mean_h = -(1.0f - pi) * LN2 * j.sp;
}

// ---------------------------------------------------------------------------
// finalize: the loss (nats). qp: the bridge sums (phase 4); jp: the JSD sums.

OPD_HD void finalize(RowState& r, const QPart& qp, const JPart& jp, const Params& p) {
  float loss2;
  if (p.divergence == REVERSE_KL) {
    // (1-b) E_p[lp_S] - a E_p[lp_T] + L_q; the teacher's normalizer cancels
    loss2 = (1.0f - r.b) * r.mean_s - r.a * r.mean_t + ((r.mq + r.lzq) - r.ls);
    // a student without support: both expectations are 0 (and the support is empty)
  } else if (p.divergence == FORWARD_KL) {
    // E_q[log2 q] - E_q[lp_S]
    loss2 = (qp.sqx / qp.zq - r.lzq) - (qp.sqs / qp.zq - r.ls);
  } else {
    float pi = p.jsd_pi;
    loss2 = pi * jp.sq - (1.0f - pi) * jp.sp;
  }
  float loss = qp.zq == 0.0f ? f_inf() : loss2 * LN2;  // an empty joint support
  r.loss = r.poisoned ? f_nan() : loss;
}

// The shared and private columns of a finished row.
OPD_HD void write_row(float* out, const RowState& r) {
  float elp_s = r.ls == f_inf() ? 0.0f : r.mean_s - r.ls;  // E_p[lp_S], base 2
  // E_p[lp_T] = E_p[tf] + (ft - mt) ct - lt
  float elp_t = r.ls == f_inf() ? 0.0f : r.mean_t + ((r.f.ft - r.f.mt) * r.f.ct - r.lt);
  out[LOSS] = r.loss;
  out[DELTA] = r.delta2 * LN2;
  out[GATE] = r.gate;
  out[TEACHER_KL] = (elp_s - elp_t) * LN2;
  out[ENTROPY] = -elp_s * LN2;
  out[COL_A] = r.a;
  out[COL_B] = r.b;
  out[C_REF_S] = r.f.ms;
  out[C_LOG2Z_S] = r.ls;
  out[C_FRAME_T] = r.f.ft;
  out[C_MEAN_S] = r.mean_s;
  out[C_MEAN_T] = r.mean_t;
  out[C_MAX_Q] = r.mq;
  out[C_LOG2Z_Q] = r.lzq;
  out[C_MEAN_H] = r.mean_h;
  out[C_SPARE] = 0.0f;
}

OPD_HD void write_zero_row(float* out, int k) {
  for (int i = 0; i < k; ++i) out[i] = 0.0f;
}

// What the gradient needs, read back from a row of the table (the recompute backward).
OPD_HD RowState read_row(const float* in, const Params& p) {
  RowState r;
  r.f.ms = in[C_REF_S];
  r.f.mt = 0.0f;  // not needed by the gradient
  r.f.ft = in[C_FRAME_T];
  r.f.cs = p.cs;
  r.f.ct = p.ct;
  r.ls = in[C_LOG2Z_S];
  r.lt = 0.0f;
  r.mean_s = in[C_MEAN_S];
  r.mean_t = in[C_MEAN_T];
  r.delta2 = 0.0f;
  r.gate = in[GATE];
  r.a = in[COL_A];
  r.b = in[COL_B];
  r.mq = in[C_MAX_Q];
  r.lzq = in[C_LOG2Z_Q];
  r.mean_h = in[C_MEAN_H];
  r.loss = in[LOSS];
  r.poisoned = is_nan(r.loss);
  r.empty = r.lzq == f_inf();  // the max of a non-empty support contributes 2^0
  return r;
}

// ---------------------------------------------------------------------------
// phase 6: the gradient of one element, d loss / d z_S times `scale` (the row's
// coefficient, or its incoming gradient). A row whose loss is NaN gets NaN.

OPD_HD float grad_reverse(float s, float t, const RowState& r, float scale) {
  float sf = student_sf(s, r.f);
  float p = ex2(sf - r.ls);
  // p (u - E_p[u]), u = (1 - b) lp_S - a lp_T, centred on the frame
  float w = (1.0f - r.b) * (sf - r.mean_s) - r.a * (teacher_tf(t, r.f) - r.mean_t);
  return p == 0.0f ? 0.0f : p * w * scale;
}

OPD_HD float grad_forward(float s, float t, const RowState& r, float scale) {
  float p = ex2(lp_s2(s, r));
  float q = ex2(lq2(s, t, r));
  return (p - q) * scale;
}

OPD_HD float grad_jsd(float s, float t, const RowState& r, float pi, float scale) {
  JsdTerm k = jsd_term(s, t, r, pi);
  float h = -(1.0f - pi) * LN2 * k.phi;  // (1 - pi) ln(p / m)
  return k.p == 0.0f ? 0.0f : k.p * (h - r.mean_h) * scale;
}

// The row's scale for grad_*: coef / temperature (and ln 2 for reverse KL, whose w is
// base 2); NaN for a row whose loss is NaN or that has no target (an empty joint
// support: the reference's softmax over no entries is NaN too), except where reverse KL
// and JSD weigh every entry by p_S and the student has no support: p_S = 0 gives 0.
OPD_HD float grad_scale(const RowState& r, float coef, const Params& p) {
  float sc = coef * p.inv_temp * (p.divergence == REVERSE_KL ? LN2 : 1.0f);
  if (is_nan(r.loss)) return f_nan();
  if (r.empty && !(r.ls == f_inf() && p.divergence != FORWARD_KL)) return f_nan();
  return sc;
}

OPD_HD float grad_elem(float s, float t, const RowState& r, float scale, const Params& p) {
  float g;
  if (p.divergence == REVERSE_KL)
    g = grad_reverse(s, t, r, scale);
  else if (p.divergence == FORWARD_KL)
    g = grad_forward(s, t, r, scale);
  else
    g = grad_jsd(s, t, r, p.jsd_pi, scale);
  return is_nan(scale) ? f_nan() : g;
}

// ---------------------------------------------------------------------------
// the sampled-token estimator: phase 1 (max, without argmax), phase 2 (sum 2^sf and
// sum 2^sf sf), then everything from s_y and the teacher's log-probability.

struct SampledPart {
  float zs, sss;
};

OPD_HD SampledPart sampled_identity() {
  SampledPart s;
  s.zs = 0.0f;
  s.sss = 0.0f;
  return s;
}

OPD_HD SampledPart sampled_terms(float s, float ms_ref, float cs) {
  float sf = (s - ms_ref) * cs;
  float e = ex2(sf);
  SampledPart k;
  k.zs = e;
  k.sss = e == 0.0f ? 0.0f : e * sf;
  return k;
}

OPD_HD void sampled_add(SampledPart& a, const SampledPart& b) {
  a.zs += b.zs;
  a.sss += b.sss;
}

struct SampledState {
  float ms;    // reference (raw max, 0 if -inf)
  float ls;    // log2 Z_s
  float adv;   // A = lambda delta
  float loss;  // nats; NaN for a poisoned row
};

// ms_raw: the raw max; tlp: the teacher's log-probability of y (nats).
OPD_HD SampledState sampled_finish(float* out, float ms_raw, const SampledPart& sp, float s_y,
                                   bool y_ok, float tlp, float sigma, const Params& p) {
  SampledState st;
  st.ms = ms_raw == -f_inf() ? 0.0f : ms_raw;
  st.ls = sp.zs == 0.0f ? f_inf() : lg2(sp.zs);
  float lps = ((s_y - st.ms) * p.cs - st.ls) * LN2;
  bool both_zero = lps == -f_inf() && tlp == -f_inf();
  float delta = both_zero ? 0.0f : tlp - lps;
  float g = p.has_gate ? sign_(delta) * sigma : 0.0f;
  float lam = g > 0.0f ? p.lam_pos : (g < 0.0f ? p.lam_neg : 1.0f);
  if (p.has_gate && is_nan(sigma)) lam = f_nan();
  float adv = lam * delta;
  float loss = adv == 0.0f ? 0.0f : -adv * lps;  // A = 0 contributes 0 (0 log 0 = 0)
  st.adv = adv;
  st.loss = y_ok ? loss : f_nan();
  float mean_s = sp.zs == 0.0f ? 0.0f : sp.sss / sp.zs;
  float entropy = sp.zs == 0.0f ? 0.0f : (st.ls - mean_s) * LN2;
  out[LOSS] = st.loss;
  out[DELTA] = delta;
  out[GATE] = g;
  out[TEACHER_KL] = -delta;
  out[ENTROPY] = entropy;
  out[S_ADV] = adv;
  out[S_REF] = st.ms;
  out[S_LOG2Z] = st.ls;
  return st;
}

OPD_HD SampledState sampled_read_row(const float* in) {
  SampledState st;
  st.ms = in[S_REF];
  st.ls = in[S_LOG2Z];
  st.adv = in[S_ADV];
  st.loss = in[LOSS];
  return st;
}

// -(A / tau) (1[v = y] - p_v) times scale; NaN for a row whose loss is NaN.
OPD_HD float sampled_grad_scale(const SampledState& st, float coef, const Params& p) {
  return is_nan(st.loss) ? f_nan() : -(st.adv * p.inv_temp) * coef;
}

OPD_HD float sampled_grad_elem(float s, bool is_y, const SampledState& st, float scale,
                               const Params& p) {
  float prob = ex2((s - st.ms) * p.cs - st.ls);
  float g = ((is_y ? 1.0f : 0.0f) - prob) * scale;
  return is_nan(scale) ? f_nan() : g;
}

// ---------------------------------------------------------------------------
// the combine operations of the parts, as types (the CUDA block and cluster
// reductions and their host test are generic over them). Each is commutative, so
// a butterfly (xor-shuffle) reduction gives every lane the same bits.

struct MaxOp {
  typedef MaxPart P;
  static OPD_HD P id() { return max_identity(); }
  static OPD_HD P one(float s, float t, int64_t v) {
    P m;
    m.ms = s;
    m.arg = v;
    m.t_arg = t;
    m.mt = t;
    return m;
  }
  static OPD_HD P comb(const P& a, const P& b) { return max_combine(a, b); }
};

struct FMaxOp {
  typedef float P;
  static OPD_HD P id() { return -f_inf(); }
  static OPD_HD P comb(const P& a, const P& b) { return fmax_(a, b); }
};

struct SumOp {
  typedef SumPart P;
  static OPD_HD P id() { return sum_identity(); }
  static OPD_HD P comb(P a, const P& b) {
    sum_add(a, b);
    return a;
  }
};

struct QOp {
  typedef QPart P;
  static OPD_HD P id() { return q_identity(); }
  static OPD_HD P comb(P a, const P& b) {
    q_add(a, b);
    return a;
  }
};

struct JOp {
  typedef JPart P;
  static OPD_HD P id() { return j_identity(); }
  static OPD_HD P comb(P a, const P& b) {
    j_add(a, b);
    return a;
  }
};

struct SampledOp {
  typedef SampledPart P;
  static OPD_HD P id() { return sampled_identity(); }
  static OPD_HD P comb(P a, const P& b) {
    sampled_add(a, b);
    return a;
  }
};

// ---------------------------------------------------------------------------
// the phase sequence of one row, generic over how the row's columns are folded
//
// R (the "reducer") owns the row's columns on this worker and provides
//   template <class Op, class F> typename Op::P reduce(int phase, F term)
//       term(s, t, v) -> Op::P for each column v, folded and combined over the row
//       (on the GPU: the block's threads, then the cluster's blocks; every worker gets
//       the same result); `phase` numbers the exchange slot (0..5);
//   template <class Op, class G, class Q> typename Op::P grad_reduce(int phase, bool with_q,
//       G g, Q q)   writes g(s, t, v) as the gradient of each of its columns and, with
//       with_q, reduces q(s, t, v) like reduce (one loop over the row);
//   template <class G> void write_grad(G g)   the gradient without a reduction;
//   void fill_grad(float x)   every gradient column of this worker := x;
//   float s_at(int64_t v), t_at(int64_t v)   one raw logit of the row (any column).
// The CUDA kernel instantiates it with its block/cluster reducer, the host test of the
// cluster split with an emulation of it.

// The logits loss of one unmasked row; the gradient (times coef) when want_grad.
template <class R>
OPD_HD RowState opd_row_program(R& rd, int64_t V, int64_t y, float sigma, float coef,
                                bool want_grad, const Params& p) {
  // 1. maxima -> the frame
  MaxPart mp = rd.template reduce<MaxOp>(0, [](float s, float t, int64_t v) {
    return MaxOp::one(s, t, v);
  });
  const Frame f = make_frame(mp, p);
  // 2. normalizers and linear sums -> delta, the gate, a, b
  SumPart sp = rd.template reduce<SumOp>(1, [&](float s, float t, int64_t) {
    return sum_terms(s, t, f);
  });
  const bool y_ok = y >= 0 && y < V;
  const int64_t ys = y_ok ? y : 0;  // never read out of bounds (the row is NaN then)
  RowState st = decide(sp, f, rd.s_at(ys), rd.t_at(ys), y_ok, sigma, p);
  // 3. the bridge's max
  float mx = rd.template reduce<FMaxOp>(2, [&](float s, float t, int64_t) {
    return bridge_x(s, t, st);
  });
  set_bridge_max(st, mx);
  QPart qp = q_identity();
  JPart jp = j_identity();
  const bool reverse = p.divergence == REVERSE_KL;
  // 4. the bridge's sums (reverse KL with a gradient: in the gradient's loop)
  if (!reverse || !want_grad) {
    qp = rd.template reduce<QOp>(3, [&](float s, float t, int64_t) {
      return q_terms(s, t, st);
    });
    set_bridge_sum(st, qp);
  }
  // 5. JSD
  if (p.divergence == JSD) {
    jp = rd.template reduce<JOp>(4, [&](float s, float t, int64_t) {
      return j_terms(s, t, st, p.jsd_pi);
    });
    set_jsd(st, jp, p.jsd_pi);
  }
  // 6. the gradient
  if (want_grad) {
    RowState gs = st;
    gs.loss = st.poisoned ? f_nan() : 0.0f;  // the NaN rules known before the loss
    const float scale = grad_scale(gs, coef, p);
    QPart q2 = rd.template grad_reduce<QOp>(
        5, reverse,
        [&](float s, float t, int64_t) { return grad_elem(s, t, st, scale, p); },
        [&](float s, float t, int64_t) { return q_terms(s, t, st); });
    if (reverse) {
      qp = q2;
      set_bridge_sum(st, qp);
    }
    finalize(st, qp, jp, p);
    if (is_nan(st.loss) && !is_nan(scale)) rd.fill_grad(f_nan());  // NaN data: a NaN row
  } else {
    finalize(st, qp, jp, p);
  }
  return st;
}

// The sampled estimator of one unmasked row (out: its SAMPLED_ROW_K table values).
template <class R>
OPD_HD SampledState sampled_row_program(R& rd, int64_t V, int64_t y, float tlp, float sigma,
                                        float coef, bool want_grad, const Params& p,
                                        float* out) {
  float ms = rd.template reduce<FMaxOp>(0, [](float s, float, int64_t) { return s; });
  const float ref = ms == -f_inf() ? 0.0f : ms;
  SampledPart sp = rd.template reduce<SampledOp>(1, [&](float s, float, int64_t) {
    return sampled_terms(s, ref, p.cs);
  });
  const bool y_ok = y >= 0 && y < V;
  const SampledState st = sampled_finish(out, ms, sp, rd.s_at(y_ok ? y : 0), y_ok, tlp, sigma,
                                         p);
  if (want_grad) {
    const float scale = sampled_grad_scale(st, coef, p);
    rd.write_grad([&](float s, float, int64_t v) {
      return sampled_grad_elem(s, v == y, st, scale, p);
    });
  }
  return st;
}

// ---------------------------------------------------------------------------
// how a row is split over the blocks of a cluster (the CUDA kernel and its host test)

// The columns [lo, hi) of piece `rank` of `pieces`, in multiples of `align` columns.
OPD_HD void piece_range(int64_t V, int pieces, int rank, int64_t align, int64_t* lo,
                        int64_t* hi) {
  int64_t per = (V + pieces - 1) / pieces;
  per = (per + align - 1) / align * align;
  int64_t a = per * rank;
  int64_t b = a + per;
  *lo = a < V ? a : V;
  *hi = b < V ? b : V;
}

// Columns per vector group: a thread folds groups of VEC consecutive columns, group
// lo + VEC (tid + k threads), k = 0, 1, ... (16-byte loads of bf16/fp16, two of fp32).
constexpr int VEC = 8;

// How the rows of one launch are laid out on a GPU. A row is split over `cluster`
// blocks of one thread-block cluster, `chunk` columns each (a multiple of VEC); with
// `resident` each block holds its piece of both rows in shared memory (smem_bytes)
// and reads global memory once; otherwise (a row too long for any cluster) every
// phase reads its piece from global memory (L2) again.
struct Plan {
  int cluster;
  int64_t chunk;
  int64_t smem_bytes;
  bool resident;
};

// elt_s, elt_t: bytes per column of the student and teacher rows (elt_t = 0: the
// sampled estimator); smem_limit: the most dynamic shared memory a block may take;
// smem_target: the size that still lets two blocks share a multiprocessor (so one
// computes while the other loads); max_cluster: 1 without clusters (before sm_90).
OPD_HD Plan plan_rows(int64_t V, int elt_s, int elt_t, int64_t smem_limit,
                      int64_t smem_target, int max_cluster) {
  Plan pl;
  int64_t per_col = elt_s + elt_t;
  for (int pass = 0; pass < 2; ++pass) {
    int64_t budget = pass == 0 ? smem_target : smem_limit;
    for (int c = 1; c <= max_cluster; ++c) {
      // the pieces' aligned width (the last piece may be shorter): the teacher's piece
      // starts chunk * elt_s bytes into shared memory, a multiple of 16
      int64_t chunk = ((V + c - 1) / c + VEC - 1) / VEC * VEC;
      int64_t bytes = chunk * per_col;
      bytes = (bytes + 15) / 16 * 16;
      if (bytes <= budget && chunk > 0) {
        pl.cluster = c;
        pl.chunk = chunk;
        pl.smem_bytes = bytes;
        pl.resident = true;
        return pl;
      }
    }
  }
  pl.cluster = max_cluster;
  pl.chunk = ((V + max_cluster - 1) / max_cluster + VEC - 1) / VEC * VEC;
  pl.smem_bytes = 0;
  pl.resident = false;
  return pl;
}

// ---------------------------------------------------------------------------
// the top-k teacher's pass over the student's row, as the CUDA kernel folds it (the
// CPU kernel folds the row in two passes instead; both give the sums of
// cpu::topk_stream). The tail (the tokens outside the row's categories, `member`
// bits) is summed against its own running maximum, one exponent per tail element;
// the categories' own terms are added at the end from their logits, in double
// (topk_finish). Every piece of the row (a thread's column groups) keeps one
// maximum and VEC slots of sums; pieces combine by rescaling to the larger maximum.

OPD_HD float finite_or_zero(float x) { return (x - x == 0.0f) ? x : 0.0f; }

// A piece of the tail: its raw maximum m (-inf: nothing seen) and, against ref =
// finite_or_zero(m), s = sum 2^((z - ref) scale2) and sz = sum 2^((z - ref) scale2)
// (z - ref) inv_t.
struct TopkPart {
  float m, s, sz;
};

struct TopkAcc {  // one thread's running state: one maximum, VEC slots
  float m;
  float s[VEC], sz[VEC];
};

OPD_HD void topk_acc_init(TopkAcc& a) {
  a.m = -f_inf();
  for (int j = 0; j < VEC; ++j) a.s[j] = a.sz[j] = 0.0f;
}

// Move sums taken against finite_or_zero(m_old) to finite_or_zero(m_new) (m_new > m_old).
// A piece that saw only -inf (m_old = -inf) holds 0 (or NaN) and is left as it is.
OPD_HD bool topk_rescale_factor(float m_old, float m_new, float scale2, float inv_t,
                                float* f, float* shift) {
  if (!(m_old > -f_inf())) return false;
  const float d = finite_or_zero(m_old) - finite_or_zero(m_new);
  *f = ex2(mul_rn(d, scale2));
  *shift = mul_rn(d, inv_t);
  return true;
}

// s * shift, 0 where shift is 0 (two pieces whose maximum is +inf: s is +inf there)
OPD_HD float topk_shifted(float s, float shift) { return shift == 0.0f ? 0.0f : s * shift; }

// Fold the group of `cnt` (<= VEC) consecutive columns z[0..cnt) whose bit j of `member`
// is set where column j is a category (not part of the tail).
OPD_HD void topk_fold_group(TopkAcc& a, const float* z, uint32_t member, int cnt,
                            float scale2, float inv_t) {
  float gm = -f_inf();
  for (int j = 0; j < VEC; ++j)
    if (j < cnt && !((member >> j) & 1u)) gm = fmax_(gm, z[j]);
  if (gm > a.m) {  // (rare after the row's first groups)
    float f, shift;
    if (topk_rescale_factor(a.m, gm, scale2, inv_t, &f, &shift))
      for (int j = 0; j < VEC; ++j) {
        a.sz[j] = (a.sz[j] + topk_shifted(a.s[j], shift)) * f;
        a.s[j] *= f;
      }
    a.m = gm;
  }
  const float ref = finite_or_zero(a.m);
  for (int j = 0; j < VEC; ++j) {
    if (j < cnt && !((member >> j) & 1u)) {
      const float d = add_rn(z[j], -ref);
      const float e = ex2(mul_rn(d, scale2));
      a.s[j] += e;
      a.sz[j] += e == 0.0f ? 0.0f : e * mul_rn(d, inv_t);  // (0 log 0 = 0)
    }
  }
}

OPD_HD TopkPart topk_part(const TopkAcc& a) {
  TopkPart p;
  p.m = a.m;
  p.s = 0.0f;
  p.sz = 0.0f;
  for (int j = 0; j < VEC; ++j) {
    p.s += a.s[j];
    p.sz += a.sz[j];
  }
  return p;
}

struct TopkOp {  // combines pieces of the tail (an instance: it needs the scales)
  typedef TopkPart P;
  float scale2, inv_t;
  OPD_HD P id() const {
    P p;
    p.m = -f_inf();
    p.s = p.sz = 0.0f;
    return p;
  }
  OPD_HD P comb(P a, P b) const {
    if (b.m > a.m) {  // a is the piece with the larger maximum
      P t = a;
      a = b;
      b = t;
    }
    float f, shift;
    if (topk_rescale_factor(b.m, a.m, scale2, inv_t, &f, &shift)) {
      a.s += b.s * f;
      a.sz += (b.sz + topk_shifted(b.s, shift)) * f;
    } else {  // (b saw only -inf: 0, or NaN, which must reach the sums)
      a.s += b.s;
      a.sz += b.sz;
    }
    return a;
  }
};

constexpr int TOPK_OUT = 5;  // the row's output before its J category logits

// The row's output of cpu::topk_stream is formed from its tail and its J category
// columns (raw logits zc[j]; a column outside the row is none):
//   out[0] = m, the row's maximum of z / tau (0 where not finite); out[1] = the tail's;
//   out[2] = sum e^(z/tau - m); out[3] = sum e^(z/tau - m) (z/tau - m);
//   out[4] = the tail's sum e^(z/tau - out[1]); out[TOPK_OUT + j] = z/tau at column j
//   (0 for none).
// In three steps, so that the categories may be spread over threads: the row's raw
// maximum mr = fmax_ of the tail's and every category's; each category's terms
// (topk_cat_add, against m = topk_natural(mr)); then the tail's terms (topk_finish).
OPD_HD double topk_natural(float raw, double inv_temp) {
  return (double)finite_or_zero(raw) * inv_temp;
}

OPD_HD void topk_cat_add(float zc, double m, double inv_temp, double& se, double& sez) {
  const double d = (double)zc * inv_temp - m;
  const double e = exp(d);
  se += e;
  sez += e == 0.0 ? 0.0 : e * d;
}

OPD_HD void topk_finish(const TopkPart& tail, float mr, double se, double sez,
                        double inv_temp, double* out) {
  const double m = topk_natural(mr, inv_temp), mt = topk_natural(tail.m, inv_temp);
  const double ts = (double)tail.s, tsz = (double)tail.sz;
  if (ts != 0.0) {  // (no tail, or one of -inf only: nothing to add; NaN is added)
    const double d = mt - m;
    const double f = exp(d);
    se += ts * f;
    sez += (tsz + (d == 0.0 ? 0.0 : ts * d)) * f;  // (d = 0: a tail whose maximum is +inf)
  }
  out[0] = m;
  out[1] = mt;
  out[2] = se;
  out[3] = sez;
  out[4] = ts;
}

// The gradient at a tail element: sign e^(z / tau + off), the exponent formed in double
// (off = log|alpha_tail g / tau| - log Z_S may lie far outside float32's range); 0 where
// z = -inf (p_S = 0).
OPD_HD float topk_tail_grad(float z, double inv_temp, double off, float sign) {
  const float e = (float)(((double)z * inv_temp + off) * (double)LOG2E);
  return z == -f_inf() ? 0.0f : sign * ex2(e);
}

}  // namespace opd
