// CUDA kernels of the logits loss and the sampled estimator.
//
// One thread-block cluster per row (sm_90: up to 8 blocks; before sm_90 one block).
// Block `rank` of the cluster owns the columns piece_range(V, cluster, rank) of the
// row. With a resident plan it copies its piece of both rows into shared memory
// once (128-bit loads where the row is 16-byte aligned and contiguous), and every
// phase of opd_math.h then reads shared memory:
//
//   fold its piece -> block reduction (xor shuffles, then one warp) -> the block's
//   partial in a shared slot -> cluster barrier -> every block reads all the
//   cluster's partials through distributed shared memory and combines them in rank
//   order (so all blocks hold the same bits) -> the next phase.
//
// The gradient is written in forward from shared memory (128-bit stores where
// possible), scaled by the row's coefficient; the backward only scales it by
// grad_output when that is not 1 (scale_kernel, which reads the factor on the
// device). A forward without a gradient reads the logits once and writes the
// table only. A row too long for any cluster's shared memory takes the same kernel
// with resident = false: every phase re-reads its piece from global memory.
//
// Deterministic: fixed reduction trees and a fixed combine order, no atomics.
// No host synchronization: launches only (the plan depends on V and the dtypes).

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <mutex>
#include <stdexcept>
#include <string>

#include "../opd_math.h"
#include "kernels.h"

namespace cg = cooperative_groups;

namespace opd {
namespace cuda {

constexpr int NT = 256;  // threads per block (two blocks per multiprocessor: 128 registers)
constexpr int NWARPS = NT / 32;
constexpr int MAX_CLUSTER = 8;  // the portable cluster size
constexpr int BWD_NT = 256;

// ---------------------------------------------------------------------------
// element types

template <class T>
struct Elt;
template <>
struct Elt<float> {
  static __device__ __forceinline__ float to_f(float x) { return x; }
  static __device__ __forceinline__ float from_f(float x) { return x; }
  static constexpr int code = F32;
};
template <>
struct Elt<__nv_bfloat16> {
  static __device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_f(float x) {
    return __float2bfloat16_rn(x);
  }
  static constexpr int code = BF16;
};
template <>
struct Elt<__half> {
  static __device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_f(float x) { return __float2half_rn(x); }
  static constexpr int code = F16;
};

template <class T>
__device__ __forceinline__ float f32(T x) {
  return Elt<T>::to_f(x);
}

__device__ __forceinline__ bool aligned16(const void* p) { return ((uintptr_t)p & 15u) == 0; }

// VEC consecutive elements starting at p (16-byte aligned) as floats.
template <class T>
__device__ __forceinline__ void load_vec(const T* p, float* out) {
  if (sizeof(T) == 4) {
    float4 a = reinterpret_cast<const float4*>(p)[0];
    float4 b = reinterpret_cast<const float4*>(p)[1];
    out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w;
    out[4] = b.x; out[5] = b.y; out[6] = b.z; out[7] = b.w;
  } else {
    uint4 v = *reinterpret_cast<const uint4*>(p);
    const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = f32(e[j]);
  }
}

template <class T>
__device__ __forceinline__ void store_vec(T* p, const float* v) {
  if (sizeof(T) == 4) {
    reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
  } else {
    uint4 w;
    T* e = reinterpret_cast<T*>(&w);
#pragma unroll
    for (int j = 0; j < VEC; ++j) e[j] = Elt<T>::from_f(v[j]);
    *reinterpret_cast<uint4*>(p) = w;
  }
}

// ---------------------------------------------------------------------------
// reductions

template <class P>
__device__ __forceinline__ P shfl_xor(const P& v, int m) {
  static_assert(sizeof(P) % 4 == 0, "parts are made of 32-bit words");
  constexpr int W = sizeof(P) / 4;
  int src[W], dst[W];
  memcpy(src, &v, sizeof(P));
#pragma unroll
  for (int k = 0; k < W; ++k) dst[k] = __shfl_xor_sync(0xffffffffu, src[k], m);
  P out;
  memcpy(&out, dst, sizeof(P));
  return out;
}

// (Op's comb and id are called on an instance: an op may carry parameters)
template <class Op>
__device__ __forceinline__ typename Op::P warp_reduce(typename Op::P v, const Op& op = Op()) {
#pragma unroll
  for (int m = 16; m >= 1; m >>= 1) v = op.comb(v, shfl_xor(v, m));
  return v;
}

// Scratch of the reductions, in static shared memory (kept apart from the rows).
struct Scratch {
  alignas(16) unsigned char warps[(NWARPS + 1) * 32];  // per-warp partials, then the block's
  alignas(16) unsigned char slot[8][32];               // this block's partial, one per phase
  alignas(16) unsigned char gather[MAX_CLUSTER][32];   // the cluster's partials
};

template <class Op>
__device__ typename Op::P block_reduce(typename Op::P v, Scratch& sc, const Op& op = Op()) {
  typedef typename Op::P P;
  static_assert(sizeof(P) <= 32, "a part fits a 32-byte slot");
  P* w = reinterpret_cast<P*>(sc.warps);
  v = warp_reduce<Op>(v, op);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) w[warp] = v;
  __syncthreads();
  if (warp == 0) {
    P x = lane < NWARPS ? w[lane] : op.id();
    x = warp_reduce<Op>(x, op);
    if (lane == 0) w[NWARPS] = x;
  }
  __syncthreads();
  P out = w[NWARPS];
  __syncthreads();  // the scratch may be reused
  return out;
}

__device__ __forceinline__ int cluster_rank() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return (int)cg::this_cluster().block_rank();
#else
  return 0;
#endif
}

__device__ __forceinline__ void cluster_barrier(int C) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (C > 1) cg::this_cluster().sync();
#endif
}

// The block's result v of phase `phase` combined over the cluster, in rank order.
template <class Op>
__device__ typename Op::P cluster_combine(typename Op::P v, int phase, int C, Scratch& sc) {
  typedef typename Op::P P;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (C > 1) {
    cg::cluster_group cl = cg::this_cluster();
    P* slot = reinterpret_cast<P*>(sc.slot[phase]);
    P* gather = reinterpret_cast<P*>(sc.gather);
    if (threadIdx.x == 0) *slot = v;
    cl.sync();  // every block's partial of this phase is written
    if ((int)threadIdx.x < C) gather[threadIdx.x] = *cl.map_shared_rank(slot, (int)threadIdx.x);
    __syncthreads();
    P acc = gather[0];
    for (int k = 1; k < C; ++k) acc = Op::comb(acc, gather[k]);
    // gather is rewritten only after the next phase's cluster barrier, which every thread
    // reaches after this combine
    return acc;
  }
#endif
  (void)phase;
  (void)C;
  (void)sc;
  return v;
}

// ---------------------------------------------------------------------------
// the arguments of one launch

struct RowsArg {
  const void* ptr;
  int64_t d1, st0, st1, stv;
};

struct OpdArgs {
  RowsArg s, t;
  int64_t n, V, chunk;
  int cluster;
  const int64_t* tok;
  const float* sign;
  const float* coef;
  const float* tlp;  // sampled: the teacher's log-probabilities
  float* table;
  void* grad;
  Params p;
};

template <class T>
__device__ __forceinline__ const T* row_start(const RowsArg& x, int64_t r) {
  return reinterpret_cast<const T*>(x.ptr) + (r / x.d1) * x.st0 + (r % x.d1) * x.st1;
}

// One piece [lo, hi) of a row: in shared memory (resident) or read from global memory.
template <class T, bool RES>
struct Piece {
  const T* g;    // the row in global memory (column v at g[v * stv])
  int64_t stv;
  const T* sm;   // the piece in shared memory (column v at sm[v - lo])
  int64_t lo, hi;

  __device__ __forceinline__ float at(int64_t v) const {
    return RES ? f32(sm[v - lo]) : f32(g[v * stv]);
  }
  // the VEC columns from c (c - lo a multiple of VEC); m of them exist
  __device__ __forceinline__ void group(int64_t c, int m, float* out) const {
    if (RES && m == VEC) {
      load_vec(sm + (c - lo), out);
    } else if (!RES && m == VEC && stv == 1 && aligned16(g + c)) {
      load_vec(g + c, out);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) out[j] = j < m ? at(c + j) : 0.0f;
    }
  }
};

// Copy the columns [lo, hi) of a row into shared memory.
template <class T>
__device__ void load_piece(T* dst, const T* row, int64_t stv, int64_t lo, int64_t hi) {
  const int64_t len = hi - lo;
  if (stv == 1 && aligned16(row + lo)) {
    const int64_t nv = len / VEC;  // 16-byte units (two for fp32)
    for (int64_t k = threadIdx.x; k < nv; k += NT) {
      if (sizeof(T) == 4) {
        const float4* src = reinterpret_cast<const float4*>(row + lo) + 2 * k;
        float4* d = reinterpret_cast<float4*>(dst) + 2 * k;
        d[0] = src[0];
        d[1] = src[1];
      } else {
        reinterpret_cast<uint4*>(dst)[k] = reinterpret_cast<const uint4*>(row + lo)[k];
      }
    }
    for (int64_t i = nv * VEC + threadIdx.x; i < len; i += NT) dst[i] = row[lo + i];
  } else {
    for (int64_t i = threadIdx.x; i < len; i += NT) dst[i] = row[(lo + i) * stv];
  }
}

template <class TS>
__device__ __forceinline__ void store_group(TS* out, int64_t c, int m, const float* g) {
  if (m == VEC && aligned16(out + c)) {
    store_vec(out + c, g);
  } else {  // (unrolled with constant indices: g stays in registers, not in local memory)
#pragma unroll
    for (int j = 0; j < VEC; ++j)
      if (j < m) out[c + j] = Elt<TS>::from_f(g[j]);
  }
}

template <class TS>
__device__ void fill_piece(TS* out, int64_t lo, int64_t hi, float x) {
  for (int64_t i = lo + threadIdx.x; i < hi; i += NT) out[i] = Elt<TS>::from_f(x);
}

// The reducer of opd_math.h's row programs on the GPU: this block's piece of the row
// (thread tid takes the column groups lo + VEC (tid + k NT), k = 0, 1, ...), block
// reductions, then the cluster's combination. For the sampled estimator TT = TS and
// two = false (no teacher).
template <class TS, class TT, bool RES>
struct BlockReducer {
  Piece<TS, RES> S;
  Piece<TT, RES> T;
  bool two;
  int C;
  Scratch* sc;
  TS* grow;  // this row of the gradient (nullptr: none)

  template <class Op, class F>
  __device__ __forceinline__ typename Op::P fold(F term) const {
    typename Op::P acc = Op::id();
    for (int64_t c = S.lo + (int64_t)VEC * threadIdx.x; c < S.hi; c += (int64_t)VEC * NT) {
      int m = S.hi - c < VEC ? (int)(S.hi - c) : VEC;
      float sv[VEC], tv[VEC];
      S.group(c, m, sv);
      if (two) T.group(c, m, tv);
#pragma unroll
      for (int j = 0; j < VEC; ++j)
        if (j < m) acc = Op::comb(acc, term(sv[j], two ? tv[j] : 0.0f, c + j));
    }
    return acc;
  }

  template <class Op, class F>
  __device__ __forceinline__ typename Op::P reduce(int phase, F term) {
    return cluster_combine<Op>(block_reduce<Op>(fold<Op>(term), *sc), phase, C, *sc);
  }

  template <class Op, class G, class Q>
  __device__ __forceinline__ typename Op::P grad_reduce(int phase, bool with_q, G g, Q q) {
    typename Op::P acc = Op::id();
    for (int64_t c = S.lo + (int64_t)VEC * threadIdx.x; c < S.hi; c += (int64_t)VEC * NT) {
      int m = S.hi - c < VEC ? (int)(S.hi - c) : VEC;
      float sv[VEC], tv[VEC], gv[VEC];
      S.group(c, m, sv);
      if (two) T.group(c, m, tv);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float tj = two ? tv[j] : 0.0f;
        gv[j] = g(sv[j], tj, c + j);
        if (with_q && j < m) acc = Op::comb(acc, q(sv[j], tj, c + j));
      }
      store_group(grow, c, m, gv);
    }
    if (!with_q) return acc;
    return cluster_combine<Op>(block_reduce<Op>(acc, *sc), phase, C, *sc);
  }

  template <class G>
  __device__ __forceinline__ void write_grad(G g) {
    grad_reduce<FMaxOp>(0, false, g, [](float, float, int64_t) { return 0.0f; });
  }

  __device__ __forceinline__ void fill_grad(float x) {
    __syncthreads();  // after every thread's gradient stores of this piece
    fill_piece(grow, S.lo, S.hi, x);
  }

  __device__ __forceinline__ float s_at(int64_t v) const { return f32(S.g[v * S.stv]); }
  __device__ __forceinline__ float t_at(int64_t v) const { return f32(T.g[v * T.stv]); }
};

// ---------------------------------------------------------------------------
// the logits loss: forward (table, and with a.grad the gradient written in forward)

template <class TS, class TT, bool RES>
__global__ void __launch_bounds__(NT, 2) opd_fwd_kernel(OpdArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ Scratch sc;
  const Params p = a.p;
  const int C = a.cluster;
  const int rank = C > 1 ? cluster_rank() : 0;
  const int64_t row = blockIdx.x / C;
  int64_t lo, hi;
  piece_range(a.V, C, rank, VEC, &lo, &hi);
  TS* grow = a.grad ? reinterpret_cast<TS*>(a.grad) + row * a.V : nullptr;
  const int64_t y = a.tok[row];
  if (y == p.ignore_index) {  // a masked row reads nothing (every block of the cluster agrees)
    if (grow) fill_piece(grow, lo, hi, 0.0f);
    if (rank == 0 && threadIdx.x < ROW_K) a.table[row * ROW_K + threadIdx.x] = 0.0f;
    return;
  }
  const TS* srow = row_start<TS>(a.s, row);
  const TT* trow = row_start<TT>(a.t, row);
  TS* ss = reinterpret_cast<TS*>(smem);
  TT* ts = reinterpret_cast<TT*>(smem + a.chunk * sizeof(TS));
  if (RES) {
    load_piece(ss, srow, a.s.stv, lo, hi);
    load_piece(ts, trow, a.t.stv, lo, hi);
    __syncthreads();
  }
  BlockReducer<TS, TT, RES> rd{{srow, a.s.stv, ss, lo, hi}, {trow, a.t.stv, ts, lo, hi},
                               true, C, &sc, grow};
  const RowState st = opd_row_program(rd, a.V, y, a.sign ? a.sign[row] : 0.0f,
                                      a.coef ? a.coef[row] : 1.0f, grow != nullptr, p);
  if (rank == 0 && threadIdx.x == 0) write_row(a.table + row * ROW_K, st);
  cluster_barrier(C);  // no block leaves while another may still read its slots
}

// Recompute backward: grad_rows[r] * d loss_r / d z_S from the table; a 2-D grid of
// (column blocks, rows).
template <class TS, class TT>
__global__ void __launch_bounds__(BWD_NT) opd_bwd_kernel(OpdArgs a, const float* grad_rows) {
  const Params p = a.p;
  const int64_t c = ((int64_t)blockIdx.x * BWD_NT + threadIdx.x) * VEC;
  if (c >= a.V) return;
  const int m = a.V - c < VEC ? (int)(a.V - c) : VEC;
  for (int64_t row = blockIdx.y; row < a.n; row += gridDim.y) {
    TS* out = reinterpret_cast<TS*>(a.grad) + row * a.V;
    float g[VEC];
    if (a.tok[row] == p.ignore_index) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) g[j] = 0.0f;
    } else {
      const RowState st = read_row(a.table + row * ROW_K, p);
      const float scale = grad_scale(st, grad_rows[row], p);
      Piece<TS, false> S{row_start<TS>(a.s, row), a.s.stv, nullptr, 0, a.V};
      Piece<TT, false> T{row_start<TT>(a.t, row), a.t.stv, nullptr, 0, a.V};
      float sv[VEC], tv[VEC];
      S.group(c, m, sv);
      T.group(c, m, tv);
#pragma unroll
      for (int j = 0; j < VEC; ++j) g[j] = grad_elem(sv[j], tv[j], st, scale, p);
    }
    store_group(out, c, m, g);
  }
}

// ---------------------------------------------------------------------------
// the sampled estimator

template <class TS, bool RES>
__global__ void __launch_bounds__(NT, 2) sampled_fwd_kernel(OpdArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ Scratch sc;
  const Params p = a.p;
  const int C = a.cluster;
  const int rank = C > 1 ? cluster_rank() : 0;
  const int64_t row = blockIdx.x / C;
  int64_t lo, hi;
  piece_range(a.V, C, rank, VEC, &lo, &hi);
  TS* grow = a.grad ? reinterpret_cast<TS*>(a.grad) + row * a.V : nullptr;
  const int64_t y = a.tok[row];
  if (y == p.ignore_index) {
    if (grow) fill_piece(grow, lo, hi, 0.0f);
    if (rank == 0 && threadIdx.x < SAMPLED_ROW_K)
      a.table[row * SAMPLED_ROW_K + threadIdx.x] = 0.0f;
    return;
  }
  const TS* srow = row_start<TS>(a.s, row);
  TS* ss = reinterpret_cast<TS*>(smem);
  if (RES) {
    load_piece(ss, srow, a.s.stv, lo, hi);
    __syncthreads();
  }
  BlockReducer<TS, TS, RES> rd{{srow, a.s.stv, ss, lo, hi}, {srow, a.s.stv, ss, lo, hi},
                               false, C, &sc, grow};
  float out[SAMPLED_ROW_K];
  sampled_row_program(rd, a.V, y, a.tlp[row], a.sign ? a.sign[row] : 0.0f,
                      a.coef ? a.coef[row] : 1.0f, grow != nullptr, p, out);
  if (rank == 0 && threadIdx.x == 0)
    for (int k = 0; k < SAMPLED_ROW_K; ++k) a.table[row * SAMPLED_ROW_K + k] = out[k];
  cluster_barrier(C);
}

template <class TS>
__global__ void __launch_bounds__(BWD_NT) sampled_bwd_kernel(OpdArgs a, const float* grad_rows) {
  const Params p = a.p;
  const int64_t c = ((int64_t)blockIdx.x * BWD_NT + threadIdx.x) * VEC;
  if (c >= a.V) return;
  const int m = a.V - c < VEC ? (int)(a.V - c) : VEC;
  for (int64_t row = blockIdx.y; row < a.n; row += gridDim.y) {
    TS* out = reinterpret_cast<TS*>(a.grad) + row * a.V;
    float g[VEC];
    const int64_t y = a.tok[row];
    if (y == p.ignore_index) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) g[j] = 0.0f;
    } else {
      const SampledState st = sampled_read_row(a.table + row * SAMPLED_ROW_K);
      const float scale = sampled_grad_scale(st, grad_rows[row], p);
      Piece<TS, false> S{row_start<TS>(a.s, row), a.s.stv, nullptr, 0, a.V};
      float sv[VEC];
      S.group(c, m, sv);
#pragma unroll
      for (int j = 0; j < VEC; ++j) g[j] = sampled_grad_elem(sv[j], c + j == y, st, scale, p);
    }
    store_group(out, c, m, g);
  }
}

// ---------------------------------------------------------------------------
// the backward of the gradient written in forward: grad *= g, nothing when g == 1

template <class T>
__global__ void scale_kernel(T* grad, int64_t n, int64_t V, const float* g, bool per_row) {
  if (!per_row && g[0] == 1.0f) return;  // the common case: one read, no traffic
  const int64_t total = n * V;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
       i += (int64_t)gridDim.x * blockDim.x) {
    const float f = per_row ? g[i / V] : g[0];
    if (f != 1.0f) grad[i] = Elt<T>::from_f(f32(grad[i]) * f);
  }
}

// ---------------------------------------------------------------------------
// the top-k teacher: the passes over the student's row (the O(k) terms of the loss are
// formed outside, from the stream's sums: sgopd_kernels/compiled.py)
//
// One block per row (a grid-stride loop over rows). The row's category columns are
// marked in a bitmap in shared memory (V bits); each thread folds its column groups
// into a TopkAcc (opd_math.h: the tail against its own running maximum, one exponent
// per tail element), one block reduction combines the threads, and warp 0 adds the
// categories' own terms in double. The backward writes the tail's gradient everywhere,
// then (after a barrier) the categories' values over it.

struct TopkArgs {
  RowsArg s;
  int64_t n, V, J, words;
  const int64_t* cols;    // (n, J): the category columns (outside [0, V): none)
  const int64_t* tok;
  int64_t ignore_index;
  double inv_temp;
  float scale2, inv_t;
  double* out;            // stream: (n, TOPK_OUT + J)
  const double* values;   // backward: (n, J), the categories' gradient
  const double* rowinfo;  // backward: (n, 2), the tail's offset and sign
  void* grad;             // backward: (n, V)
};

__device__ __forceinline__ bool in_row(int64_t v, int64_t V) { return v >= 0 && v < V; }

__device__ __forceinline__ double warp_sum_d(double x) {
#pragma unroll
  for (int m = 16; m >= 1; m >>= 1) x += __shfl_xor_sync(0xffffffffu, x, m);
  return x;
}

__device__ __forceinline__ float warp_max_f(float x) {
#pragma unroll
  for (int m = 16; m >= 1; m >>= 1) x = fmax_(x, __shfl_xor_sync(0xffffffffu, x, m));
  return x;
}

template <class TS>
__global__ void __launch_bounds__(NT) topk_stream_kernel(TopkArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ Scratch sc;
  uint32_t* bits = reinterpret_cast<uint32_t*>(smem);  // a.words
  float* zc = reinterpret_cast<float*>(bits + a.words);  // a.J raw logits
  const TopkOp op{a.scale2, a.inv_t};
  const int64_t W = TOPK_OUT + a.J;
  for (int64_t row = blockIdx.x; row < a.n; row += gridDim.x) {
    double* o = a.out + row * W;
    if (a.tok[row] == a.ignore_index) {  // a masked row reads nothing
      for (int64_t k = threadIdx.x; k < W; k += NT) o[k] = 0.0;
      continue;
    }
    const TS* srow = row_start<TS>(a.s, row);
    const int64_t* c = a.cols + row * a.J;
    for (int64_t w = threadIdx.x; w < a.words; w += NT) bits[w] = 0u;
    __syncthreads();
    for (int64_t j = threadIdx.x; j < a.J; j += NT) {
      const int64_t v = c[j];
      const bool in = in_row(v, a.V);
      if (in) atomicOr(&bits[v >> 5], 1u << (v & 31));  // (an OR: any order gives the same)
      zc[j] = in ? f32(srow[v * a.s.stv]) : 0.0f;
      o[TOPK_OUT + j] = in ? (double)zc[j] * a.inv_temp : 0.0;
    }
    __syncthreads();
    Piece<TS, false> S{srow, a.s.stv, nullptr, 0, a.V};
    TopkAcc acc;
    topk_acc_init(acc);
    for (int64_t g = (int64_t)VEC * threadIdx.x; g < a.V; g += (int64_t)VEC * NT) {
      const int m = a.V - g < VEC ? (int)(a.V - g) : VEC;
      float z[VEC];
      S.group(g, m, z);
      // (g is a multiple of VEC = 8: its bits lie in one word)
      const uint32_t member = (bits[g >> 5] >> (g & 31)) & 0xffu;
      topk_fold_group(acc, z, member, m, a.scale2, a.inv_t);
    }
    const TopkPart tail = block_reduce<TopkOp>(topk_part(acc), sc, op);
    if (threadIdx.x < 32) {  // warp 0: the categories (fixed lanes and tree: deterministic)
      float mr = tail.m;
      for (int64_t j = threadIdx.x; j < a.J; j += 32)
        if (in_row(c[j], a.V)) mr = fmax_(mr, zc[j]);
      mr = warp_max_f(mr);
      const double m = topk_natural(mr, a.inv_temp);
      double se = 0.0, sez = 0.0;
      for (int64_t j = threadIdx.x; j < a.J; j += 32)
        if (in_row(c[j], a.V)) topk_cat_add(zc[j], m, a.inv_temp, se, sez);
      se = warp_sum_d(se);
      sez = warp_sum_d(sez);
      if (threadIdx.x == 0) topk_finish(tail, mr, se, sez, a.inv_temp, o);
    }
    __syncthreads();  // the bitmap and zc are rewritten for the next row
  }
}

template <class TS>
__global__ void __launch_bounds__(NT) topk_bwd_kernel(TopkArgs a) {
  for (int64_t row = blockIdx.x; row < a.n; row += gridDim.x) {
    TS* out = reinterpret_cast<TS*>(a.grad) + row * a.V;
    if (a.tok[row] == a.ignore_index) {
      fill_piece(out, 0, a.V, 0.0f);
      continue;
    }
    const double off = a.rowinfo[row * 2];
    const float sign = (float)a.rowinfo[row * 2 + 1];
    Piece<TS, false> S{row_start<TS>(a.s, row), a.s.stv, nullptr, 0, a.V};
    for (int64_t g = (int64_t)VEC * threadIdx.x; g < a.V; g += (int64_t)VEC * NT) {
      const int m = a.V - g < VEC ? (int)(a.V - g) : VEC;
      float z[VEC], gv[VEC];
      S.group(g, m, z);
#pragma unroll
      for (int j = 0; j < VEC; ++j) gv[j] = topk_tail_grad(z[j], a.inv_temp, off, sign);
      store_group(out, g, m, gv);
    }
    __syncthreads();  // the categories' values overwrite the tail's, after every store
    const int64_t* c = a.cols + row * a.J;
    for (int64_t j = threadIdx.x; j < a.J; j += NT)
      if (in_row(c[j], a.V)) out[c[j]] = Elt<TS>::from_f((float)a.values[row * a.J + j]);
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------
// host side

struct DeviceInfo {
  bool ready = false;
  int major = 0, sms = 0;
  int64_t smem_optin = 0;
};

static DeviceInfo& info(int device) {
  static DeviceInfo infos[64];
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  DeviceInfo& d = infos[device & 63];
  if (!d.ready) {
    int v = 0;
    cudaDeviceGetAttribute(&v, cudaDevAttrComputeCapabilityMajor, device);
    d.major = v;
    cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device);
    d.sms = v;
    cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    d.smem_optin = v;
    d.ready = true;
  }
  return d;
}

static int elt_bytes(int dtype) { return dtype == F32 ? 4 : 2; }

Plan plan_for(int64_t V, int s_dtype, int t_dtype, int device) {
  DeviceInfo& d = info(device);
  const int64_t limit = d.smem_optin - (int64_t)sizeof(Scratch) - 1024;
  // two blocks per multiprocessor when that is possible
  const int64_t target = limit / 2 - (int64_t)sizeof(Scratch) - 1024;
  return plan_rows(V, elt_bytes(s_dtype), t_dtype < 0 ? 0 : elt_bytes(t_dtype), limit, target,
                   // clusters only where the sm_90a code runs: a newer GPU JITs the
                   // compute_80 PTX, which holds the one-block form of the kernels
                   d.major == 9 ? MAX_CLUSTER : 1);
}

static OpdArgs make_args(const Rows& s, const Rows* t, int64_t n, int64_t V, const int64_t* tok,
                         const float* sign, const float* coef, const float* tlp, float* table,
                         void* grad, const Params& p) {
  OpdArgs a;
  a.s = RowsArg{s.ptr, s.d1, s.st0, s.st1, s.stv};
  a.t = t ? RowsArg{t->ptr, t->d1, t->st0, t->st1, t->stv} : a.s;
  a.n = n;
  a.V = V;
  a.chunk = 0;
  a.cluster = 1;
  a.tok = tok;
  a.sign = sign;
  a.coef = coef;
  a.tlp = tlp;
  a.table = table;
  a.grad = grad;
  a.p = p;
  return a;
}

// Launch one row kernel over n rows with the plan; a resident plan whose cluster cannot be
// scheduled (shared memory taken by others, a partitioned GPU) falls back to non-resident.
template <class K>
static int launch_rows(K kernel_res, K kernel_str, OpdArgs a, Plan pl, cudaStream_t stream) {
  for (int attempt = 0; attempt < 2; ++attempt) {
    K k = pl.resident ? kernel_res : kernel_str;
    a.cluster = pl.cluster;
    a.chunk = pl.chunk;
    cudaError_t e = cudaSuccess;
    if (pl.resident && pl.smem_bytes + (int64_t)sizeof(Scratch) > 48 * 1024)
      e = cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               (int)pl.smem_bytes);
    if (e != cudaSuccess) return e;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3((unsigned)(a.n * pl.cluster), 1, 1);
    cfg.blockDim = dim3(NT, 1, 1);
    cfg.dynamicSmemBytes = pl.resident ? (size_t)pl.smem_bytes : 0;
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = pl.cluster;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = pl.cluster > 1 ? 1 : 0;
    if (pl.cluster > 1 && pl.resident) {
      int clusters = 0;
      e = cudaOccupancyMaxActiveClusters(&clusters, k, &cfg);
      if (e != cudaSuccess || clusters == 0) {
        (void)cudaGetLastError();
        pl.resident = false;  // retry streaming from global memory
        continue;
      }
    }
    e = cudaLaunchKernelEx(&cfg, k, a);
    if (e != cudaSuccess) return e;
    return cudaGetLastError();
  }
  return cudaErrorLaunchOutOfResources;
}

template <class TS, class TT>
static int opd_fwd_typed(OpdArgs a, Plan pl, cudaStream_t st) {
  return launch_rows(opd_fwd_kernel<TS, TT, true>, opd_fwd_kernel<TS, TT, false>, a, pl, st);
}

template <class TS, class TT>
static int opd_bwd_typed(OpdArgs a, const float* grad_rows, cudaStream_t st) {
  const int64_t groups = (a.V + VEC - 1) / VEC;
  dim3 grid((unsigned)((groups + BWD_NT - 1) / BWD_NT),
            (unsigned)(a.n < 65535 ? a.n : 65535), 1);
  opd_bwd_kernel<TS, TT><<<grid, BWD_NT, 0, st>>>(a, grad_rows);
  return cudaGetLastError();
}

// the (student, teacher) dtype pairs with kernels: equal dtypes, or a float32 teacher
// (sgopd_kernels/compiled.py upcasts any other teacher to float32, exactly)
#define OPD_DISPATCH(SDT, TDT, FN, ...)                                               \
  do {                                                                                \
    if ((SDT) == F32 && (TDT) == F32) return FN<float, float>(__VA_ARGS__);           \
    if ((SDT) == BF16 && (TDT) == BF16) return FN<__nv_bfloat16, __nv_bfloat16>(__VA_ARGS__); \
    if ((SDT) == BF16 && (TDT) == F32) return FN<__nv_bfloat16, float>(__VA_ARGS__);  \
    if ((SDT) == F16 && (TDT) == F16) return FN<__half, __half>(__VA_ARGS__);         \
    if ((SDT) == F16 && (TDT) == F32) return FN<__half, float>(__VA_ARGS__);          \
    return cudaErrorInvalidValue;                                                     \
  } while (0)

int opd_forward(const Rows& s, const Rows& t, int64_t n, int64_t V, const int64_t* tok,
                const float* sign, const float* coef, float* table, void* grad, int grad_dtype,
                const Params& p, uintptr_t stream, int device) {
  if (n == 0) return 0;
  if (grad && grad_dtype != s.dtype) return cudaErrorInvalidValue;
  cudaError_t e = cudaSetDevice(device);
  if (e != cudaSuccess) return e;
  OpdArgs a = make_args(s, &t, n, V, tok, sign, coef, nullptr, table, grad, p);
  Plan pl = plan_for(V, s.dtype, t.dtype, device);
  OPD_DISPATCH(s.dtype, t.dtype, opd_fwd_typed, a, pl, (cudaStream_t)stream);
}

int opd_backward(const Rows& s, const Rows& t, int64_t n, int64_t V, const int64_t* tok,
                 const float* table, const float* grad_rows, void* grad, int grad_dtype,
                 const Params& p, uintptr_t stream, int device) {
  if (n == 0) return 0;
  if (grad_dtype != s.dtype) return cudaErrorInvalidValue;
  cudaError_t e = cudaSetDevice(device);
  if (e != cudaSuccess) return e;
  OpdArgs a = make_args(s, &t, n, V, tok, nullptr, nullptr, nullptr, const_cast<float*>(table),
                        grad, p);
  OPD_DISPATCH(s.dtype, t.dtype, opd_bwd_typed, a, grad_rows, (cudaStream_t)stream);
}

template <class TS>
static int sampled_fwd_typed(OpdArgs a, Plan pl, cudaStream_t st) {
  return launch_rows(sampled_fwd_kernel<TS, true>, sampled_fwd_kernel<TS, false>, a, pl, st);
}

template <class TS>
static int sampled_bwd_typed(OpdArgs a, const float* grad_rows, cudaStream_t st) {
  const int64_t groups = (a.V + VEC - 1) / VEC;
  dim3 grid((unsigned)((groups + BWD_NT - 1) / BWD_NT),
            (unsigned)(a.n < 65535 ? a.n : 65535), 1);
  sampled_bwd_kernel<TS><<<grid, BWD_NT, 0, st>>>(a, grad_rows);
  return cudaGetLastError();
}

#define OPD_DISPATCH1(SDT, FN, ...)                                        \
  do {                                                                     \
    if ((SDT) == F32) return FN<float>(__VA_ARGS__);                       \
    if ((SDT) == BF16) return FN<__nv_bfloat16>(__VA_ARGS__);              \
    if ((SDT) == F16) return FN<__half>(__VA_ARGS__);                      \
    return cudaErrorInvalidValue;                                          \
  } while (0)

int sampled_forward(const Rows& s, int64_t n, int64_t V, const int64_t* tok,
                    const float* teacher_lp, const float* sign, const float* coef, float* table,
                    void* grad, int grad_dtype, const Params& p, uintptr_t stream, int device) {
  if (n == 0) return 0;
  if (grad && grad_dtype != s.dtype) return cudaErrorInvalidValue;
  cudaError_t e = cudaSetDevice(device);
  if (e != cudaSuccess) return e;
  OpdArgs a = make_args(s, nullptr, n, V, tok, sign, coef, teacher_lp, table, grad, p);
  Plan pl = plan_for(V, s.dtype, -1, device);
  OPD_DISPATCH1(s.dtype, sampled_fwd_typed, a, pl, (cudaStream_t)stream);
}

int sampled_backward(const Rows& s, int64_t n, int64_t V, const int64_t* tok,
                     const float* table, const float* grad_rows, void* grad, int grad_dtype,
                     const Params& p, uintptr_t stream, int device) {
  if (n == 0) return 0;
  if (grad_dtype != s.dtype) return cudaErrorInvalidValue;
  cudaError_t e = cudaSetDevice(device);
  if (e != cudaSuccess) return e;
  OpdArgs a = make_args(s, nullptr, n, V, tok, nullptr, nullptr, nullptr,
                        const_cast<float*>(table), grad, p);
  OPD_DISPATCH1(s.dtype, sampled_bwd_typed, a, grad_rows, (cudaStream_t)stream);
}

template <class T>
static int scale_typed(void* grad, int64_t n, int64_t V, const float* g, bool per_row,
                       cudaStream_t st, int sms) {
  const int64_t total = n * V;
  int64_t blocks = (total + 255) / 256;
  const int64_t cap = (int64_t)sms * 8;
  if (blocks > cap) blocks = cap;
  if (blocks < 1) blocks = 1;
  scale_kernel<T><<<(unsigned)blocks, 256, 0, st>>>(reinterpret_cast<T*>(grad), n, V, g, per_row);
  return cudaGetLastError();
}

int scale_grad(void* grad, int dtype, int64_t n, int64_t V, const float* g, bool per_row,
               uintptr_t stream, int device) {
  if (n == 0 || V == 0) return 0;
  cudaError_t e = cudaSetDevice(device);
  if (e != cudaSuccess) return e;
  const int sms = info(device).sms;
  OPD_DISPATCH1(dtype, scale_typed, grad, n, V, g, per_row, (cudaStream_t)stream, sms);
}

// the bitmap of the categories and their J logits
static int64_t topk_smem(int64_t V, int64_t J) { return ((V + 31) / 32) * 4 + J * 4; }

bool topk_fits(int64_t V, int64_t J, int device) {
  return topk_smem(V, J) <= info(device).smem_optin - (int64_t)sizeof(Scratch) - 1024;
}

static TopkArgs topk_args(const Rows& s, int64_t n, int64_t V, const int64_t* cols, int64_t J,
                          double inv_temp, const int64_t* tok, int64_t ignore_index) {
  TopkArgs a = {};
  a.s = RowsArg{s.ptr, s.d1, s.st0, s.st1, s.stv};
  a.n = n;
  a.V = V;
  a.J = J;
  a.words = (V + 31) / 32;
  a.cols = cols;
  a.tok = tok;
  a.ignore_index = ignore_index;
  a.inv_temp = inv_temp;
  a.scale2 = (float)(inv_temp * (double)LOG2E);
  a.inv_t = (float)inv_temp;
  return a;
}

static unsigned topk_grid(int64_t n, int device) {
  const int64_t cap = (int64_t)info(device).sms * 16;
  return (unsigned)(n < cap ? n : cap);
}

template <class TS>
static int topk_stream_typed(TopkArgs a, int64_t smem, unsigned grid, cudaStream_t st) {
  // (the default limit, 48 KiB, holds the static Scratch too)
  if (smem + (int64_t)sizeof(Scratch) > 48 * 1024) {
    cudaError_t e = cudaFuncSetAttribute(topk_stream_kernel<TS>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (e != cudaSuccess) return e;
  }
  topk_stream_kernel<TS><<<grid, NT, (size_t)smem, st>>>(a);
  return cudaGetLastError();
}

int topk_stream(const Rows& s, int64_t n, int64_t V, const int64_t* cols, int64_t J,
                double inv_temp, const int64_t* tok, int64_t ignore_index, double* out,
                uintptr_t stream, int device) {
  if (n == 0) return 0;
  cudaError_t e = cudaSetDevice(device);
  if (e != cudaSuccess) return e;
  if (!topk_fits(V, J, device)) return cudaErrorInvalidValue;  // (compiled.py refuses first)
  const int64_t smem = topk_smem(V, J);
  TopkArgs a = topk_args(s, n, V, cols, J, inv_temp, tok, ignore_index);
  a.out = out;
  OPD_DISPATCH1(s.dtype, topk_stream_typed, a, smem, topk_grid(n, device),
                (cudaStream_t)stream);
}

template <class TS>
static int topk_bwd_typed(TopkArgs a, unsigned grid, cudaStream_t st) {
  topk_bwd_kernel<TS><<<grid, NT, 0, st>>>(a);
  return cudaGetLastError();
}

int topk_backward(const Rows& s, int64_t n, int64_t V, const int64_t* cols, int64_t J,
                  const double* values, const double* rowinfo, double inv_temp,
                  const int64_t* tok, int64_t ignore_index, void* grad, int grad_dtype,
                  uintptr_t stream, int device) {
  if (n == 0) return 0;
  if (grad_dtype != s.dtype) return cudaErrorInvalidValue;
  cudaError_t e = cudaSetDevice(device);
  if (e != cudaSuccess) return e;
  TopkArgs a = topk_args(s, n, V, cols, J, inv_temp, tok, ignore_index);
  a.values = values;
  a.rowinfo = rowinfo;
  a.grad = grad;
  OPD_DISPATCH1(s.dtype, topk_bwd_typed, a, topk_grid(n, device), (cudaStream_t)stream);
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

#define OPD_STR2(x) #x
#define OPD_STR(x) OPD_STR2(x)
std::string archs() {  // setup.py passes the gencode targets as one token: sm_90a__sm_80__...
#if defined(SGOPD_CUDA_ARCHS)
  std::string t = OPD_STR(SGOPD_CUDA_ARCHS);
  for (size_t i; (i = t.find("__")) != std::string::npos;) t.replace(i, 2, " ");
  return t;
#else
  return "";
#endif
}

void check(int err) {
  if (err != 0)
    throw std::runtime_error(std::string("sgopd_kernels CUDA kernel: ") +
                             cudaGetErrorString((cudaError_t)err));
}

int synchronize(int device) {
  cudaError_t e = cudaSetDevice(device);
  if (e != cudaSuccess) return e;
  return cudaDeviceSynchronize();
}

}  // namespace cuda
}  // namespace opd
