// pybind11 bindings of the compiled kernels: raw pointers, shapes, strides, dtype codes
// and (for CUDA) the stream as an integer. No torch headers: the module builds with a
// C++ compiler and pybind11 alone, and nvcc for the CUDA part.
//
// Conventions of every entry point (sgopd_kernels/compiled.py builds the arguments):
//   rows   = (ptr, dtype, d1, st0, st1, stv): a (..., V) tensor read in place; row r
//            starts at ptr + ((r / d1) st0 + (r % d1) st1) elements, column v at + v stv
//   params = (divergence, has_gate, beta, lam_pos, lam_neg, jsd_pi, temperature,
//             teacher_temperature, ignore_index)
//   dtype  : 0 float32, 1 bfloat16, 2 float16
//   pointers that may be absent are 0 (sign: no gate; coef: 1; grad: no gradient)
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>
#include <tuple>

#include "cpu/kernels.h"
#if defined(SGOPD_WITH_CUDA)
#include "cuda/kernels.h"
#endif

namespace py = pybind11;

using RowsT = std::tuple<uintptr_t, int, int64_t, int64_t, int64_t, int64_t>;
using ParamsT = std::tuple<int, bool, float, float, float, float, float, float, int64_t>;

static opd::Rows rows_of(const RowsT& x, const char* name) {
  opd::Rows r;
  r.ptr = (const void*)std::get<0>(x);
  r.dtype = std::get<1>(x);
  r.d1 = std::get<2>(x);
  r.st0 = std::get<3>(x);
  r.st1 = std::get<4>(x);
  r.stv = std::get<5>(x);
  if (r.dtype < 0 || r.dtype > 2)
    throw std::invalid_argument(std::string(name) + ": dtype code must be 0, 1 or 2");
  if (r.d1 < 1) throw std::invalid_argument(std::string(name) + ": d1 must be >= 1");
  return r;
}

static opd::Params params_of(const ParamsT& t) {
  int div = std::get<0>(t);
  if (div < 0 || div > 2) throw std::invalid_argument("divergence: code must be 0, 1 or 2");
  return opd::make_params(div, std::get<1>(t), std::get<2>(t), std::get<3>(t), std::get<4>(t),
                          std::get<5>(t), std::get<6>(t), std::get<7>(t), std::get<8>(t));
}

template <class T>
static T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

static void check_dtype(int dtype, const char* name) {
  if (dtype < 0 || dtype > 2)
    throw std::invalid_argument(std::string(name) + ": dtype code must be 0, 1 or 2");
}

#if !defined(SGOPD_WITH_CUDA)
[[noreturn]] static void no_cuda() {
  throw std::runtime_error("sgopd_kernels._C was built without its CUDA part");
}
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "sgopd_kernels' compiled kernels (CPU; CUDA when built with nvcc)";

  // ----------------------------------------------------------------- CPU
  m.def("cpu_isa", &opd::cpu::isa, "the vector instruction set the CPU kernels dispatch to");

  m.def(
      "cpu_opd_forward",
      [](RowsT s, RowsT t, int64_t n, int64_t V, uintptr_t tok, uintptr_t sign, uintptr_t coef,
         uintptr_t table, uintptr_t grad, int grad_dtype, ParamsT params, int nthreads) {
        opd::Rows rs = rows_of(s, "student"), rt = rows_of(t, "teacher");
        check_dtype(grad_dtype, "grad");
        opd::Params p = params_of(params);
        py::gil_scoped_release nogil;
        opd::cpu::opd_forward(rs, rt, n, V, ptr<const int64_t>(tok), ptr<const float>(sign),
                              ptr<const float>(coef), ptr<float>(table), ptr<void>(grad),
                              grad_dtype, p, nthreads);
      },
      py::arg("student"), py::arg("teacher"), py::arg("n"), py::arg("V"), py::arg("tokens"),
      py::arg("sign"), py::arg("coef"), py::arg("table"), py::arg("grad"),
      py::arg("grad_dtype"), py::arg("params"), py::arg("nthreads"));

  m.def(
      "cpu_opd_backward",
      [](RowsT s, RowsT t, int64_t n, int64_t V, uintptr_t tok, uintptr_t table,
         uintptr_t grad_rows, uintptr_t grad, int grad_dtype, ParamsT params, int nthreads) {
        opd::Rows rs = rows_of(s, "student"), rt = rows_of(t, "teacher");
        check_dtype(grad_dtype, "grad");
        opd::Params p = params_of(params);
        py::gil_scoped_release nogil;
        opd::cpu::opd_backward(rs, rt, n, V, ptr<const int64_t>(tok), ptr<const float>(table),
                               ptr<const float>(grad_rows), ptr<void>(grad), grad_dtype, p,
                               nthreads);
      },
      py::arg("student"), py::arg("teacher"), py::arg("n"), py::arg("V"), py::arg("tokens"),
      py::arg("table"), py::arg("grad_rows"), py::arg("grad"), py::arg("grad_dtype"),
      py::arg("params"), py::arg("nthreads"));

  m.def(
      "cpu_sampled_forward",
      [](RowsT s, int64_t n, int64_t V, uintptr_t tok, uintptr_t tlp, uintptr_t sign,
         uintptr_t coef, uintptr_t table, uintptr_t grad, int grad_dtype, ParamsT params,
         int nthreads) {
        opd::Rows rs = rows_of(s, "student");
        check_dtype(grad_dtype, "grad");
        opd::Params p = params_of(params);
        py::gil_scoped_release nogil;
        opd::cpu::sampled_forward(rs, n, V, ptr<const int64_t>(tok), ptr<const float>(tlp),
                                  ptr<const float>(sign), ptr<const float>(coef),
                                  ptr<float>(table), ptr<void>(grad), grad_dtype, p, nthreads);
      },
      py::arg("student"), py::arg("n"), py::arg("V"), py::arg("tokens"),
      py::arg("teacher_logprobs"), py::arg("sign"), py::arg("coef"), py::arg("table"),
      py::arg("grad"), py::arg("grad_dtype"), py::arg("params"), py::arg("nthreads"));

  m.def(
      "cpu_sampled_backward",
      [](RowsT s, int64_t n, int64_t V, uintptr_t tok, uintptr_t table, uintptr_t grad_rows,
         uintptr_t grad, int grad_dtype, ParamsT params, int nthreads) {
        opd::Rows rs = rows_of(s, "student");
        check_dtype(grad_dtype, "grad");
        opd::Params p = params_of(params);
        py::gil_scoped_release nogil;
        opd::cpu::sampled_backward(rs, n, V, ptr<const int64_t>(tok), ptr<const float>(table),
                                   ptr<const float>(grad_rows), ptr<void>(grad), grad_dtype, p,
                                   nthreads);
      },
      py::arg("student"), py::arg("n"), py::arg("V"), py::arg("tokens"), py::arg("table"),
      py::arg("grad_rows"), py::arg("grad"), py::arg("grad_dtype"), py::arg("params"),
      py::arg("nthreads"));

  m.def(
      "cpu_topk_stream",
      [](RowsT s, int64_t n, int64_t V, uintptr_t cols, int64_t J, double inv_temp,
         uintptr_t tok, int64_t ignore_index, uintptr_t out, int nthreads) {
        opd::Rows rs = rows_of(s, "student");
        py::gil_scoped_release nogil;
        opd::cpu::topk_stream(rs, n, V, ptr<const int64_t>(cols), J, inv_temp,
                              ptr<const int64_t>(tok), ignore_index, ptr<double>(out), nthreads);
      },
      py::arg("student"), py::arg("n"), py::arg("V"), py::arg("cols"), py::arg("J"),
      py::arg("inv_temp"), py::arg("tokens"), py::arg("ignore_index"), py::arg("out"),
      py::arg("nthreads"));
  m.attr("TOPK_STREAM_K") = opd::cpu::TOPK_STREAM_K;

  m.def(
      "cpu_topk_backward",
      [](RowsT s, int64_t n, int64_t V, uintptr_t cols, int64_t J, uintptr_t values,
         uintptr_t rowinfo, double inv_temp, uintptr_t tok, int64_t ignore_index, uintptr_t grad,
         int grad_dtype, int nthreads) {
        opd::Rows rs = rows_of(s, "student");
        check_dtype(grad_dtype, "grad");
        py::gil_scoped_release nogil;
        opd::cpu::topk_backward(rs, n, V, ptr<const int64_t>(cols), J,
                                ptr<const double>(values), ptr<const double>(rowinfo), inv_temp,
                                ptr<const int64_t>(tok), ignore_index, ptr<void>(grad),
                                grad_dtype, nthreads);
      },
      py::arg("student"), py::arg("n"), py::arg("V"), py::arg("cols"), py::arg("J"),
      py::arg("values"), py::arg("rowinfo"), py::arg("inv_temp"), py::arg("tokens"),
      py::arg("ignore_index"), py::arg("grad"), py::arg("grad_dtype"), py::arg("nthreads"));

  m.def(
      "cpu_scale_grad",
      [](uintptr_t grad, int dtype, int64_t n, int64_t V, uintptr_t g, bool per_row,
         int nthreads) {
        check_dtype(dtype, "grad");
        py::gil_scoped_release nogil;
        opd::cpu::scale_grad(ptr<void>(grad), dtype, n, V, ptr<const float>(g), per_row,
                             nthreads);
      },
      py::arg("grad"), py::arg("dtype"), py::arg("n"), py::arg("V"), py::arg("g"),
      py::arg("per_row"), py::arg("nthreads"));

  m.def(
      "row_plan",
      [](int64_t V, int elt_s, int elt_t, int64_t smem_limit, int64_t smem_target,
         int max_cluster) {
        opd::Plan pl = opd::plan_rows(V, elt_s, elt_t, smem_limit, smem_target, max_cluster);
        return py::make_tuple(pl.cluster, pl.chunk, pl.smem_bytes, pl.resident);
      },
      "opd_math.h's plan_rows: (cluster size, columns per block, shared memory, resident)",
      py::arg("V"), py::arg("elt_s"), py::arg("elt_t"), py::arg("smem_limit"),
      py::arg("smem_target"), py::arg("max_cluster"));

  // ----------------------------------------------------------------- CUDA
#if defined(SGOPD_WITH_CUDA)
  m.attr("has_cuda") = true;
  m.attr("cuda_archs") = opd::cuda::archs();
  m.def("cuda_device_count", &opd::cuda::device_count,
        "CUDA devices this module can run on (0 without a driver or a GPU)");
  m.def(
      "cuda_opd_forward",
      [](RowsT s, RowsT t, int64_t n, int64_t V, uintptr_t tok, uintptr_t sign, uintptr_t coef,
         uintptr_t table, uintptr_t grad, int grad_dtype, ParamsT params,
         uintptr_t stream, int device) {
        opd::Rows rs = rows_of(s, "student"), rt = rows_of(t, "teacher");
        check_dtype(grad_dtype, "grad");
        opd::cuda::check(opd::cuda::opd_forward(
            rs, rt, n, V, ptr<const int64_t>(tok), ptr<const float>(sign),
            ptr<const float>(coef), ptr<float>(table), ptr<void>(grad), grad_dtype,
            params_of(params), stream, device));
      },
      py::arg("student"), py::arg("teacher"), py::arg("n"), py::arg("V"), py::arg("tokens"),
      py::arg("sign"), py::arg("coef"), py::arg("table"), py::arg("grad"),
      py::arg("grad_dtype"), py::arg("params"), py::arg("stream"), py::arg("device"));
  m.def(
      "cuda_opd_backward",
      [](RowsT s, RowsT t, int64_t n, int64_t V, uintptr_t tok, uintptr_t table,
         uintptr_t grad_rows, uintptr_t grad, int grad_dtype, ParamsT params,
         uintptr_t stream, int device) {
        opd::Rows rs = rows_of(s, "student"), rt = rows_of(t, "teacher");
        check_dtype(grad_dtype, "grad");
        opd::cuda::check(opd::cuda::opd_backward(
            rs, rt, n, V, ptr<const int64_t>(tok), ptr<const float>(table),
            ptr<const float>(grad_rows), ptr<void>(grad), grad_dtype, params_of(params),
            stream, device));
      },
      py::arg("student"), py::arg("teacher"), py::arg("n"), py::arg("V"), py::arg("tokens"),
      py::arg("table"), py::arg("grad_rows"), py::arg("grad"), py::arg("grad_dtype"),
      py::arg("params"), py::arg("stream"), py::arg("device"));
  m.def(
      "cuda_sampled_forward",
      [](RowsT s, int64_t n, int64_t V, uintptr_t tok, uintptr_t tlp, uintptr_t sign,
         uintptr_t coef, uintptr_t table, uintptr_t grad, int grad_dtype, ParamsT params,
         uintptr_t stream, int device) {
        opd::Rows rs = rows_of(s, "student");
        check_dtype(grad_dtype, "grad");
        opd::cuda::check(opd::cuda::sampled_forward(
            rs, n, V, ptr<const int64_t>(tok), ptr<const float>(tlp), ptr<const float>(sign),
            ptr<const float>(coef), ptr<float>(table), ptr<void>(grad), grad_dtype,
            params_of(params), stream, device));
      },
      py::arg("student"), py::arg("n"), py::arg("V"), py::arg("tokens"),
      py::arg("teacher_logprobs"), py::arg("sign"), py::arg("coef"), py::arg("table"),
      py::arg("grad"), py::arg("grad_dtype"), py::arg("params"), py::arg("stream"),
      py::arg("device"));
  m.def(
      "cuda_sampled_backward",
      [](RowsT s, int64_t n, int64_t V, uintptr_t tok, uintptr_t table, uintptr_t grad_rows,
         uintptr_t grad, int grad_dtype, ParamsT params, uintptr_t stream, int device) {
        opd::Rows rs = rows_of(s, "student");
        check_dtype(grad_dtype, "grad");
        opd::cuda::check(opd::cuda::sampled_backward(
            rs, n, V, ptr<const int64_t>(tok), ptr<const float>(table),
            ptr<const float>(grad_rows), ptr<void>(grad), grad_dtype, params_of(params),
            stream, device));
      },
      py::arg("student"), py::arg("n"), py::arg("V"), py::arg("tokens"), py::arg("table"),
      py::arg("grad_rows"), py::arg("grad"), py::arg("grad_dtype"), py::arg("params"),
      py::arg("stream"), py::arg("device"));
  m.def(
      "cuda_scale_grad",
      [](uintptr_t grad, int dtype, int64_t n, int64_t V, uintptr_t g, bool per_row,
         uintptr_t stream, int device) {
        check_dtype(dtype, "grad");
        opd::cuda::check(opd::cuda::scale_grad(ptr<void>(grad), dtype, n, V,
                                               ptr<const float>(g), per_row, stream, device));
      },
      py::arg("grad"), py::arg("dtype"), py::arg("n"), py::arg("V"), py::arg("g"),
      py::arg("per_row"), py::arg("stream"), py::arg("device"));
  m.def(
      "cuda_topk_stream",
      [](RowsT s, int64_t n, int64_t V, uintptr_t cols, int64_t J, double inv_temp,
         uintptr_t tok, int64_t ignore_index, uintptr_t out, uintptr_t stream, int device) {
        opd::Rows rs = rows_of(s, "student");
        opd::cuda::check(opd::cuda::topk_stream(rs, n, V, ptr<const int64_t>(cols), J,
                                                inv_temp, ptr<const int64_t>(tok), ignore_index,
                                                ptr<double>(out), stream, device));
      },
      py::arg("student"), py::arg("n"), py::arg("V"), py::arg("cols"), py::arg("J"),
      py::arg("inv_temp"), py::arg("tokens"), py::arg("ignore_index"), py::arg("out"),
      py::arg("stream"), py::arg("device"));
  m.def(
      "cuda_topk_backward",
      [](RowsT s, int64_t n, int64_t V, uintptr_t cols, int64_t J, uintptr_t values,
         uintptr_t rowinfo, double inv_temp, uintptr_t tok, int64_t ignore_index, uintptr_t grad,
         int grad_dtype, uintptr_t stream, int device) {
        opd::Rows rs = rows_of(s, "student");
        check_dtype(grad_dtype, "grad");
        opd::cuda::check(opd::cuda::topk_backward(
            rs, n, V, ptr<const int64_t>(cols), J, ptr<const double>(values),
            ptr<const double>(rowinfo), inv_temp, ptr<const int64_t>(tok), ignore_index,
            ptr<void>(grad), grad_dtype, stream, device));
      },
      py::arg("student"), py::arg("n"), py::arg("V"), py::arg("cols"), py::arg("J"),
      py::arg("values"), py::arg("rowinfo"), py::arg("inv_temp"), py::arg("tokens"),
      py::arg("ignore_index"), py::arg("grad"), py::arg("grad_dtype"), py::arg("stream"),
      py::arg("device"));
  m.def("cuda_topk_fits", &opd::cuda::topk_fits,
        "whether the top-k stream takes rows of V columns with J categories on `device`",
        py::arg("V"), py::arg("J"), py::arg("device"));
  m.def(
      "cuda_plan",
      [](int64_t V, int s_dtype, int t_dtype, int device) {
        opd::Plan pl = opd::cuda::plan_for(V, s_dtype, t_dtype, device);
        return py::make_tuple(pl.cluster, pl.chunk, pl.smem_bytes, pl.resident);
      },
      "how rows of V columns are laid out on `device` (t_dtype -1: the sampled estimator): "
      "(cluster size, columns per block, shared memory per block, resident)",
      py::arg("V"), py::arg("s_dtype"), py::arg("t_dtype"), py::arg("device"));
  m.def(
      "cuda_synchronize", [](int device) { opd::cuda::check(opd::cuda::synchronize(device)); },
      py::arg("device"));
#else
  m.attr("has_cuda") = false;
  m.attr("cuda_archs") = "";
  m.def("cuda_device_count", []() { return 0; });
  for (const char* name : {"cuda_opd_forward", "cuda_opd_backward", "cuda_sampled_forward",
                           "cuda_sampled_backward", "cuda_scale_grad", "cuda_topk_stream",
                           "cuda_topk_backward", "cuda_topk_fits", "cuda_plan",
                           "cuda_synchronize"})
    m.def(name, [](py::args, py::kwargs) { no_cuda(); });
#endif
}
