// Host test of the CUDA top-k kernels' row logic (csrc/cuda/kernels.cu,
// topk_stream_kernel and topk_bwd_kernel): opd_math.h's TopkAcc / TopkOp / topk_finish
// driven by an emulation of the kernel's layout (thread tid folds the column groups
// VEC (tid + k NT), its categories marked in a bitmap of V bits; the xor-shuffle tree
// of each warp, then the tree over the warps; warp 0 adds the categories' terms, lane
// j + 32 i, with a butterfly in double). For block sizes 64 and 256, on adversarial
// rows (a tail of 1e-12 of the mass, logits near 1e4, -inf, +inf and NaN entries, an empty
// tail, ids outside the row, masked rows, V not a multiple of 8), its output must match
// cpu::topk_stream (which folds the row in two passes, in double): the maxima exactly,
// the sums to float precision; the backward's gradient must equal cpu::topk_backward's
// bit for bit. Prints "ok ..." lines; exit status 0 when everything holds.
//
//   g++ -O2 -std=c++17 -ffp-contract=fast csrc/tests/topk_split.cpp csrc/cpu/kernels.cpp
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "../cpu/kernels.h"
#include "../opd_math.h"
#include "check.h"

using namespace opd;


static bool in_row(int64_t v, int64_t V) { return v >= 0 && v < V; }

template <class P, class F>
static P butterfly(std::vector<P> v, F comb) {  // 32 lanes; lane 0's value
  for (int m = 16; m >= 1; m >>= 1) {
    std::vector<P> nv(32);
    for (int l = 0; l < 32; ++l) nv[l] = comb(v[l], v[l ^ m]);
    v = nv;
  }
  return v[0];
}

// The stream kernel's output for one row (TOPK_OUT + J doubles).
static void emulate_stream(const float* s, int64_t V, const int64_t* c, int64_t J,
                           double inv_temp, int NT, double* o) {
  const float scale2 = (float)(inv_temp * (double)LOG2E), inv_t = (float)inv_temp;
  const TopkOp op{scale2, inv_t};
  std::vector<uint32_t> bits((size_t)(V + 31) / 32, 0u);
  std::vector<float> zc((size_t)J);
  for (int64_t j = 0; j < J; ++j) {
    bool in = in_row(c[j], V);
    if (in) bits[c[j] >> 5] |= 1u << (c[j] & 31);
    zc[j] = in ? s[c[j]] : 0.0f;
    o[TOPK_OUT + j] = in ? (double)zc[j] * inv_temp : 0.0;
  }
  std::vector<TopkPart> th((size_t)NT);
  for (int tid = 0; tid < NT; ++tid) {
    TopkAcc acc;
    topk_acc_init(acc);
    for (int64_t g = (int64_t)VEC * tid; g < V; g += (int64_t)VEC * NT) {
      int m = V - g < VEC ? (int)(V - g) : VEC;
      float z[VEC];
      for (int j = 0; j < VEC; ++j) z[j] = j < m ? s[g + j] : 0.0f;
      uint32_t member = (bits[g >> 5] >> (g & 31)) & 0xffu;
      topk_fold_group(acc, z, member, m, scale2, inv_t);
    }
    th[tid] = topk_part(acc);
  }
  auto comb = [&](const TopkPart& a, const TopkPart& b) { return op.comb(a, b); };
  std::vector<TopkPart> lanes(32, op.id());
  for (int w = 0; w < NT / 32; ++w)
    lanes[w] = butterfly(std::vector<TopkPart>(th.begin() + 32 * w, th.begin() + 32 * w + 32),
                         comb);
  const TopkPart tail = butterfly(lanes, comb);
  std::vector<float> mx(32, tail.m);
  for (int l = 0; l < 32; ++l)
    for (int64_t j = l; j < J; j += 32)
      if (in_row(c[j], V)) mx[l] = fmax_(mx[l], zc[j]);
  const float mr = butterfly(mx, [](float a, float b) { return fmax_(a, b); });
  const double m = topk_natural(mr, inv_temp);
  std::vector<double> se(32, 0.0), sez(32, 0.0);
  for (int l = 0; l < 32; ++l)
    for (int64_t j = l; j < J; j += 32)
      if (in_row(c[j], V)) topk_cat_add(zc[j], m, inv_temp, se[l], sez[l]);
  auto add = [](double a, double b) { return a + b; };
  topk_finish(tail, mr, butterfly(se, add), butterfly(sez, add), inv_temp, o);
}

// The backward kernel's gradient row (float32).
static void emulate_backward(const float* s, int64_t V, const int64_t* c, int64_t J,
                             const double* values, const double* info, double inv_temp,
                             bool masked, float* g) {
  if (masked) {
    for (int64_t v = 0; v < V; ++v) g[v] = 0.0f;
    return;
  }
  for (int64_t v = 0; v < V; ++v) g[v] = topk_tail_grad(s[v], inv_temp, info[0], (float)info[1]);
  for (int64_t j = 0; j < J; ++j)
    if (in_row(c[j], V)) g[c[j]] = (float)values[j];
}

static bool same(double a, double b, double rtol) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
  if (std::isinf(a) || std::isinf(b)) return a == b;
  return std::fabs(a - b) <= rtol * std::fabs(b) + 1e-300;
}

struct Case {
  const char* name;
  int64_t V, J;
  double inv_temp;
};

int main() {
  std::mt19937 rng(7);
  std::normal_distribution<float> nd(0.0f, 3.0f);
  const Case cases[] = {{"random", 1000, 21, 1.0},     {"odd V", 1003, 9, 1.0 / 0.7},
                        {"top-heavy", 4099, 21, 1.0},  {"large logits", 2048, 65, 1.0},
                        {"-inf and NaN", 777, 13, 2.0}, {"empty tail", 16, 17, 1.0},
                        {"k > warp", 3000, 129, 1.0},   {"one column", 1, 2, 1.0}};
  for (const Case& cs : cases) {
    const int64_t n = 6, V = cs.V, J = cs.J;
    std::vector<float> s((size_t)(n * V));
    std::vector<int64_t> cols((size_t)(n * J)), tok((size_t)n);
    for (int64_t r = 0; r < n; ++r) {
      float* x = s.data() + r * V;
      for (int64_t v = 0; v < V; ++v) x[v] = nd(rng);
      int64_t* c = cols.data() + r * J;
      std::vector<int64_t> perm((size_t)V);
      for (int64_t v = 0; v < V; ++v) perm[v] = v;
      std::shuffle(perm.begin(), perm.end(), rng);
      for (int64_t j = 0; j < J; ++j) c[j] = j < V ? perm[j] : V;  // (V: no column)
      if (r == 1 && J > 2) c[J - 1] = V, c[0] = V + 5;             // columns outside the row
      if (!std::strcmp(cs.name, "top-heavy"))  // the categories hold all but ~1e-12
        for (int64_t j = 0; j < J; ++j)
          if (in_row(c[j], V)) x[c[j]] = 40.0f + nd(rng) * 0.1f;
      if (!std::strcmp(cs.name, "large logits"))
        for (int64_t v = 0; v < V; ++v) x[v] += r % 2 ? 1.0e4f : -1.0e4f;
      if (!std::strcmp(cs.name, "-inf and NaN")) {
        for (int64_t v = 0; v < V; v += 3) x[v] = -f_inf();
        if (r == 2) x[V / 2] = f_nan();
        if (r == 1) x[V / 3] = x[V / 3 + 1] = f_inf();  // (+inf in two threads' pieces)
        if (r == 3)  // a tail of -inf only
          for (int64_t v = 0; v < V; ++v) {
            bool cat = false;
            for (int64_t j = 0; j < J; ++j) cat = cat || c[j] == v;
            if (!cat) x[v] = -f_inf();
          }
        if (r == 4)
          for (int64_t v = 0; v < V; ++v) x[v] = -f_inf();
      }
      tok[r] = r == 5 ? -100 : 0;
    }
    Rows rows{s.data(), F32, 1, V, 0, 1};
    const int64_t W = TOPK_OUT + J;
    std::vector<double> ref((size_t)(n * W)), emu((size_t)(n * W));
    cpu::topk_stream(rows, n, V, cols.data(), J, cs.inv_temp, tok.data(), -100, ref.data(), 1);
    for (int NT : {64, 256}) {
      for (int64_t r = 0; r < n; ++r) {
        double* o = emu.data() + r * W;
        if (tok[r] == -100) {
          for (int64_t k = 0; k < W; ++k) o[k] = 0.0;
          continue;
        }
        emulate_stream(s.data() + r * V, V, cols.data() + r * J, J, cs.inv_temp, NT, o);
      }
      for (int64_t r = 0; r < n; ++r) {
        const double* a = emu.data() + r * W;
        const double* b = ref.data() + r * W;
        CHECK(a[0] == b[0] && a[1] == b[1], "%s NT=%d row %lld: maxima %.17g %.17g vs %.17g %.17g",
              cs.name, NT, (long long)r, a[0], a[1], b[0], b[1]);
        for (int k = 2; k < TOPK_OUT; ++k)
          CHECK(same(a[k], b[k], k == 3 ? 2e-5 : 1e-5) ||
                    (k == 3 && std::fabs(a[k] - b[k]) <= 2e-5 * std::fabs(b[2])),
                "%s NT=%d row %lld: sum %d %.17g vs %.17g", cs.name, NT, (long long)r, k, a[k],
                b[k]);
        for (int64_t j = 0; j < J; ++j)
          CHECK(a[TOPK_OUT + j] == b[TOPK_OUT + j], "%s: column %lld", cs.name, (long long)j);
      }
    }
    // the backward: offsets and signs of every kind, values at the columns
    std::vector<double> values((size_t)(n * J)), info((size_t)(n * 2));
    for (int64_t r = 0; r < n; ++r) {
      info[r * 2] = r == 0 ? 700.0 : (r == 1 ? -9000.0 : -std::log(1.0 + r));
      info[r * 2 + 1] = r % 2 ? -1.0 : 1.0;
      for (int64_t j = 0; j < J; ++j) values[r * J + j] = 0.01 * (double)(j + 1) * (r + 1);
    }
    std::vector<float> gref((size_t)(n * V)), gemu((size_t)(n * V));
    cpu::topk_backward(rows, n, V, cols.data(), J, values.data(), info.data(), cs.inv_temp,
                       tok.data(), -100, gref.data(), F32, 1);
    for (int64_t r = 0; r < n; ++r)
      emulate_backward(s.data() + r * V, V, cols.data() + r * J, J, values.data() + r * J,
                       info.data() + r * 2, cs.inv_temp, tok[r] == -100, gemu.data() + r * V);
    CHECK(std::memcmp(gref.data(), gemu.data(), gref.size() * 4) == 0, "%s: backward bits",
          cs.name);
    std::printf("ok %s\n", cs.name);
  }
  if (failures) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("ok all\n");
  return 0;
}
