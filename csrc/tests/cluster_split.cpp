// Host test of the CUDA kernels' row logic: the row programs of opd_math.h driven by
// an emulation of the GPU's reducer (csrc/cuda/kernels.cu, BlockReducer): a row split
// over C blocks with piece_range, each block's NT threads folding column groups
// lo + VEC (tid + k NT), the xor-shuffle tree of a warp, the second-level tree over
// the warps, the rank-order combination over the cluster. For several cluster sizes
// and block sizes, on adversarial rows, the table and gradient must match the
// one-block result and the CPU kernels (which fold the row differently), the maxima
// and the frame exactly. Also checks plan_rows. Prints "ok ..." lines; exit status 0
// when everything holds.
//
//   g++ -O2 -std=c++17 -ffp-contract=fast csrc/tests/cluster_split.cpp csrc/cpu/kernels.cpp
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "../cpu/kernels.h"
#include "../opd_math.h"
#include "check.h"

using namespace opd;


// ---------------------------------------------------------------------------
// the emulated reducer

struct Emu {
  const float* s;
  const float* t;  // may equal s (sampled)
  bool two;
  int64_t V;
  int C, NT;
  float* grad;  // float32 gradient row (nullptr: none)

  template <class Op>
  typename Op::P butterfly(std::vector<typename Op::P> v) const {  // 32 lanes
    for (int m = 16; m >= 1; m >>= 1) {
      std::vector<typename Op::P> nv(32);
      for (int l = 0; l < 32; ++l) nv[l] = Op::comb(v[l], v[l ^ m]);
      v = nv;
    }
    return v[0];
  }

  template <class Op>
  typename Op::P block(const std::vector<typename Op::P>& threads) const {
    int nwarps = NT / 32;
    std::vector<typename Op::P> warps;
    for (int w = 0; w < nwarps; ++w)
      warps.push_back(butterfly<Op>(std::vector<typename Op::P>(threads.begin() + 32 * w,
                                                                threads.begin() + 32 * w + 32)));
    std::vector<typename Op::P> lanes(32, Op::id());
    for (int w = 0; w < nwarps; ++w) lanes[w] = warps[w];
    return butterfly<Op>(lanes);
  }

  template <class Op, class F, class W>
  typename Op::P run(F term, W visit, bool reduce_it) const {
    std::vector<typename Op::P> ranks;
    for (int r = 0; r < C; ++r) {
      int64_t lo, hi;
      piece_range(V, C, r, VEC, &lo, &hi);
      std::vector<typename Op::P> th(NT, Op::id());
      for (int tid = 0; tid < NT; ++tid)
        for (int64_t c = lo + (int64_t)VEC * tid; c < hi; c += (int64_t)VEC * NT)
          for (int j = 0; j < VEC && c + j < hi; ++j) {
            int64_t v = c + j;
            float tv = two ? t[v] : 0.0f;
            visit(s[v], tv, v);
            if (reduce_it) th[tid] = Op::comb(th[tid], term(s[v], tv, v));
          }
      ranks.push_back(block<Op>(th));
    }
    typename Op::P acc = ranks[0];
    for (int k = 1; k < C; ++k) acc = Op::comb(acc, ranks[k]);
    return acc;
  }

  template <class Op, class F>
  typename Op::P reduce(int, F term) {
    return run<Op>(term, [](float, float, int64_t) {}, true);
  }
  template <class Op, class G, class Q>
  typename Op::P grad_reduce(int, bool with_q, G g, Q q) {
    return run<Op>(q, [&](float a, float b, int64_t v) { grad[v] = g(a, b, v); }, with_q);
  }
  template <class G>
  void write_grad(G g) {
    run<FMaxOp>([](float, float, int64_t) { return 0.0f; },
                [&](float a, float b, int64_t v) { grad[v] = g(a, b, v); }, false);
  }
  void fill_grad(float x) {
    for (int64_t v = 0; v < V; ++v) grad[v] = x;
  }
  float s_at(int64_t v) const { return s[v]; }
  float t_at(int64_t v) const { return two ? t[v] : 0.0f; }
};

// ---------------------------------------------------------------------------
// comparisons

static bool same_class(float a, float b) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
  if (std::isinf(a) || std::isinf(b)) return a == b;
  return true;
}

static bool close(float a, float b, double rtol, double atol) {
  if (!same_class(a, b)) return false;
  if (!std::isfinite(a)) return true;
  return std::fabs((double)a - b) <= atol + rtol * std::fabs((double)b);
}

static void compare_rows(const float* a, const float* b, int k, const char* what, bool exact_frame) {
  // a NaN row's private columns hold whatever its phases left (its loss and gradient are NaN)
  if (std::isnan(b[LOSS])) k = COL_A + 1;
  for (int c = 0; c < k; ++c) {
    double scale = 1.0 + std::fabs((double)b[c]);
    bool ok = close(a[c], b[c], 2e-4, 2e-5 * scale);
    CHECK(ok, "%s: column %d: %.9g vs %.9g", what, c, a[c], b[c]);
  }
  if (exact_frame) {  // the maxima do not depend on how the row is split
    CHECK(a[C_REF_S] == b[C_REF_S], "%s: REF_S %.9g vs %.9g", what, a[C_REF_S], b[C_REF_S]);
    CHECK(a[C_FRAME_T] == b[C_FRAME_T] || (std::isnan(a[C_FRAME_T]) && std::isnan(b[C_FRAME_T])),
          "%s: FRAME_T %.9g vs %.9g", what, a[C_FRAME_T], b[C_FRAME_T]);
    CHECK(a[GATE] == b[GATE] || (std::isnan(a[GATE]) && std::isnan(b[GATE])), "%s: gate", what);
  }
}

// unit[v]: the gradient that one ulp of p_S(v) carries (p_S(v) coef / temperature), the
// floor where a gradient cancels (p = q, or a JSD whose m is p): 64 ulps of it, plus
// 2e-6 of the row's largest gradient, plus 1e-4 relative.
static void compare_grads(const std::vector<float>& a, const std::vector<float>& b,
                          const std::vector<double>& unit, const char* what) {
  double mx = 0;
  for (float x : b)
    if (std::isfinite(x)) mx = std::fmax(mx, std::fabs(x));
  for (size_t i = 0; i < a.size(); ++i) {
    double atol = 2e-6 * mx + 64 * std::ldexp(1.0, -24) * unit[i] + 1e-30;
    bool ok = close(a[i], b[i], 1e-4, atol);
    CHECK(ok, "%s: grad[%zu] %.9g vs %.9g (max %.3g, unit %.3g)", what, i, a[i], b[i], mx,
          unit[i]);
    if (!ok) break;
  }
}

// p_S(v) * |coef| / temperature from a row of the table
static std::vector<double> units(const std::vector<float>& s, const float* row, int ref_col,
                                 int lz_col, const Params& p, float coef) {
  std::vector<double> u(s.size());
  for (size_t v = 0; v < s.size(); ++v) {
    double pv = std::exp2(((double)s[v] - row[ref_col]) * p.cs - row[lz_col]);
    u[v] = std::isfinite(pv) ? pv * std::fabs(coef) * p.inv_temp : 0.0;
  }
  return u;
}

// ---------------------------------------------------------------------------
// rows

struct Case {
  const char* name;
  std::vector<float> s, t;
  int64_t y;
  float sigma;
};

static std::vector<Case> make_cases() {
  std::mt19937 rng(7);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<Case> cs;
  const float NEG = -INFINITY;
  for (int64_t V : {1, 7, 8, 9, 61, 257, 2048, 4099, 33001}) {
    for (float scale : {0.5f, 4.0f, 15.0f}) {
      Case c;
      c.name = "random";
      c.s.resize(V);
      c.t.resize(V);
      for (auto& x : c.s) x = scale * nd(rng);
      for (auto& x : c.t) x = scale * nd(rng);
      c.y = (int64_t)(rng() % V);
      c.sigma = (float)((int)(rng() % 3) - 1);
      cs.push_back(c);
      if (V < 9) continue;
      Case m = c;  // masks: shared, the student's own, the teacher's own; huge negatives
      m.name = "masks";
      for (int64_t v = 0; v < V; v += 5) m.s[v] = NEG;
      for (int64_t v = 0; v < V; v += 7) m.t[v] = NEG;
      for (int64_t v = 3; v < V; v += 11) m.s[v] = -1e4f;
      m.y = 1;
      cs.push_back(m);
      Case tie = c;  // the student's max repeated in every piece: the first index wins
      tie.name = "ties";
      float top = 3.0f * scale + 5.0f;
      for (int64_t v = V / 3; v < V; v += V / 3 + 1) tie.s[v] = top;
      tie.t = tie.s;  // delta == 0 with a verdict
      tie.sigma = 1.0f;
      cs.push_back(tie);
    }
  }
  Case e;  // a student without support, a teacher without support, both
  e.name = "no_support";
  e.s.assign(300, NEG);
  e.t.assign(300, 1.0f);
  e.y = 4;
  e.sigma = 1.0f;
  cs.push_back(e);
  e.s.assign(300, 0.5f);
  e.t.assign(300, NEG);
  cs.push_back(e);
  e.s.assign(300, NEG);
  cs.push_back(e);
  Case n = cs[6];  // NaN in the student, in the teacher; a NaN verdict; a bad token
  n.name = "nan_s";
  n.s[n.s.size() / 2] = NAN;
  cs.push_back(n);
  n = cs[6];
  n.name = "nan_t";
  n.t[3] = NAN;
  cs.push_back(n);
  n = cs[6];
  n.name = "nan_sigma";
  n.sigma = NAN;
  cs.push_back(n);
  n = cs[6];
  n.name = "bad_token";
  n.y = (int64_t)n.s.size() + 3;
  cs.push_back(n);
  return cs;
}

static Rows rows_of(const std::vector<float>& x) {
  Rows r;
  r.ptr = x.data();
  r.dtype = F32;
  r.d1 = 1;
  r.st0 = (int64_t)x.size();
  r.st1 = 0;
  r.stv = 1;
  return r;
}

static void test_opd() {
  int n_checked = 0;
  for (const Case& c : make_cases()) {
    int64_t V = (int64_t)c.s.size();
    for (int div = 0; div < 3; ++div) {
      for (int gate = 0; gate < 2; ++gate) {
        Params p = make_params(div, gate == 1, 0.3f, 1.8f, 0.4f, 0.3f, 1.3f, 0.9f, -100);
        const float coef = 0.75f;
        // the CPU kernels: another fold of the same row
        std::vector<float> cpu_row(ROW_K), cpu_grad(V);
        float sigma = c.sigma;
        int64_t tok = c.y;
        cpu::opd_forward(rows_of(c.s), rows_of(c.t), 1, V, &tok, gate ? &sigma : nullptr,
                         &coef, cpu_row.data(), cpu_grad.data(), F32, p, 1);
        std::vector<float> one_row(ROW_K), one_grad(V);
        for (int C : {1, 2, 3, 5, 8}) {
          for (int NT : {256, 64}) {
            for (int want_grad = 0; want_grad < 2; ++want_grad) {
              std::vector<float> row(ROW_K), grad(V, -7.0f);
              Emu rd{c.s.data(), c.t.data(), true, V, C, NT, want_grad ? grad.data() : nullptr};
              RowState st = opd_row_program(rd, V, c.y, gate ? c.sigma : 0.0f, coef,
                                            want_grad == 1, p);
              write_row(row.data(), st);
              char what[160];
              std::snprintf(what, sizeof what, "%s V=%lld div=%d gate=%d C=%d NT=%d grad=%d",
                            c.name, (long long)V, div, gate, C, NT, want_grad);
              if (C == 1 && NT == 256 && want_grad) {
                one_row = row;
                one_grad = grad;
              }
              compare_rows(row.data(), cpu_row.data(), ROW_K, what, true);
              if (want_grad) {
                std::vector<double> u = units(c.s, cpu_row.data(), C_REF_S, C_LOG2Z_S, p, coef);
                compare_grads(grad, cpu_grad, u, what);
                if (C > 1) compare_grads(grad, one_grad, u, what);
                // a repeat gives the same bits (a fixed tree, a fixed order)
                std::vector<float> again(V);
                Emu rd2{c.s.data(), c.t.data(), true, V, C, NT, again.data()};
                opd_row_program(rd2, V, c.y, gate ? c.sigma : 0.0f, coef, true, p);
                bool same = true;
                for (int64_t v = 0; v < V; ++v)
                  same = same && (std::memcmp(&again[v], &grad[v], 4) == 0);
                CHECK(same, "%s: not deterministic", what);
              }
              if (C > 1 && want_grad) compare_rows(row.data(), one_row.data(), ROW_K, what, true);
              ++n_checked;
            }
          }
        }
      }
    }
  }
  std::printf("ok opd: %d (row, divergence, gate, cluster size, block size, grad) cases\n",
              n_checked);
}

static void test_sampled() {
  int n_checked = 0;
  for (const Case& c : make_cases()) {
    int64_t V = (int64_t)c.s.size();
    for (int gate = 0; gate < 2; ++gate) {
      Params p = make_params(0, gate == 1, 0.0f, 1.8f, 0.4f, 0.5f, 0.7f, 0.7f, -100);
      const float coef = 1.5f, tlp = -2.25f;
      float sigma = c.sigma;
      int64_t tok = c.y;
      std::vector<float> cpu_row(SAMPLED_ROW_K), cpu_grad(V);
      cpu::sampled_forward(rows_of(c.s), 1, V, &tok, &tlp, gate ? &sigma : nullptr, &coef,
                           cpu_row.data(), cpu_grad.data(), F32, p, 1);
      for (int C : {1, 2, 3, 8}) {
        std::vector<float> row(SAMPLED_ROW_K), grad(V);
        Emu rd{c.s.data(), c.s.data(), false, V, C, 256, grad.data()};
        sampled_row_program(rd, V, c.y, tlp, gate ? c.sigma : 0.0f, coef, true, p, row.data());
        char what[160];
        std::snprintf(what, sizeof what, "sampled %s V=%lld gate=%d C=%d", c.name,
                      (long long)V, gate, C);
        compare_rows(row.data(), cpu_row.data(), SAMPLED_ROW_K, what, false);
        CHECK(row[S_REF] == cpu_row[S_REF], "%s: max", what);
        compare_grads(grad, cpu_grad, units(c.s, cpu_row.data(), S_REF, S_LOG2Z, p,
                                             coef * std::fmax(1.0f, std::fabs(cpu_row[S_ADV]))),
                      what);
        ++n_checked;
      }
    }
  }
  std::printf("ok sampled: %d cases\n", n_checked);
}

static void test_plan() {
  // H100/H200: 227 KiB of shared memory per block (opt-in), clusters of up to 8
  const int64_t limit = 227 * 1024 - 2048, target = limit / 2 - 2048;
  int n = 0;
  for (int64_t V = 1; V < 700000; V = V * 3 + 7) {
    for (int es : {2, 4}) {
      for (int et : {0, 2, 4}) {
        for (int maxc : {1, 8}) {
          Plan pl = plan_rows(V, es, et, limit, target, maxc);
          CHECK(pl.cluster >= 1 && pl.cluster <= maxc, "plan V=%lld: cluster %d", (long long)V,
                pl.cluster);
          CHECK(pl.chunk % VEC == 0, "plan V=%lld: chunk %lld", (long long)V, (long long)pl.chunk);
          if (pl.resident) CHECK(pl.smem_bytes <= limit, "plan V=%lld: smem", (long long)V);
          if (pl.resident) CHECK(pl.smem_bytes >= pl.chunk * (es + et), "plan: smem too small");
          int64_t covered = 0, prev = 0;
          for (int r = 0; r < pl.cluster; ++r) {
            int64_t lo, hi;
            piece_range(V, pl.cluster, r, VEC, &lo, &hi);
            CHECK(lo == prev && hi >= lo && hi - lo <= pl.chunk, "plan V=%lld: piece %d",
                  (long long)V, r);
            covered += hi - lo;
            prev = hi;
          }
          CHECK(covered == V, "plan V=%lld: covers %lld", (long long)V, (long long)covered);
          ++n;
        }
      }
    }
  }
  // the sizes the design is for: both bf16 rows of V = 151936 on chip, in at most 8 blocks
  Plan q = plan_rows(151936, 2, 2, limit, target, 8);
  CHECK(q.resident && q.cluster <= 8, "bf16 V=151936: cluster %d resident %d", q.cluster,
        (int)q.resident);
  Plan f = plan_rows(151936, 4, 4, limit, target, 8);
  CHECK(f.resident && f.cluster <= 8, "fp32 V=151936: cluster %d resident %d", f.cluster,
        (int)f.resident);
  Plan big = plan_rows(1 << 20, 2, 2, limit, target, 8);
  CHECK(!big.resident, "V=2^20 bf16 must fall back to the streaming kernel");
  Plan old = plan_rows(151936, 2, 2, 163 * 1024, 80 * 1024, 1);  // sm_80: no clusters
  CHECK(!old.resident && old.cluster == 1, "sm_80 V=151936: one block, streaming");
  std::printf("ok plan: %d plans (bf16 V=151936: %d blocks of %lld bytes)\n", n, q.cluster,
              (long long)q.smem_bytes);
}

int main() {
  test_plan();
  test_opd();
  test_sampled();
  if (failures) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("ok all\n");
  return 0;
}
