// reco._C: the compiled core. Arrays arrive through DLPack (torch, numpy, cupy); outputs are
// allocated by the caller and written in place. No libtorch is linked.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>
#include <vector>

#include "cpu/retrieve_attend.h"
#include "reco/dlpack.h"
#if defined(RECO_WITH_CUDA)
#include "cuda/retrieve_attend.h"
#endif

namespace py = pybind11;
using reco::DType;
using reco::TensorView;

namespace {

// Owns an imported DLPack tensor; the producer's deleter runs when this goes away.
struct Imported {
  DLManagedTensor* managed = nullptr;
  Imported() = default;
  Imported(const Imported&) = delete;
  Imported& operator=(const Imported&) = delete;
  ~Imported() {
    if (managed != nullptr && managed->deleter != nullptr) managed->deleter(managed);
  }
};

DType dtype_of(const DLDataType& t, const std::string& name) {
  if (t.lanes == 1) {
    if (t.code == kDLFloat && t.bits == 32) return DType::f32;
    if (t.code == kDLFloat && t.bits == 16) return DType::f16;
    if (t.code == kDLFloat && t.bits == 64) return DType::f64;
    if (t.code == kDLBfloat && t.bits == 16) return DType::bf16;
    if (t.code == kDLInt && t.bits == 64) return DType::i64;
    if (t.code == kDLInt && t.bits == 8) return DType::i8;
  }
  throw py::type_error(name + " has an unsupported dtype (DLPack code " + std::to_string(t.code) +
                       ", " + std::to_string(t.bits) + " bits, " + std::to_string(t.lanes) +
                       " lanes)");
}

// A view of `obj` through its __dlpack__; None gives an absent view (ndim 0).
TensorView import_array(const py::handle& obj, const std::string& name, Imported& owner) {
  TensorView v;
  if (obj.is_none()) return v;
  if (!py::hasattr(obj, "__dlpack__"))
    throw py::type_error(name + " must be an array supporting DLPack (__dlpack__), got " +
                         std::string(py::str(py::type::of(obj))));
  py::object capsule = obj.attr("__dlpack__")();
  if (!PyCapsule_IsValid(capsule.ptr(), "dltensor"))
    throw py::type_error(name + ".__dlpack__() did not return a DLPack capsule");
  auto* managed = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule.ptr(), "dltensor"));
  // Taking ownership: the capsule must no longer delete the tensor.
  PyCapsule_SetName(capsule.ptr(), "used_dltensor");
  owner.managed = managed;
  const DLTensor& t = managed->dl_tensor;
  if (t.ndim < 1 || t.ndim > 4)
    throw py::value_error(name + " must have 1 to 4 dimensions, got " + std::to_string(t.ndim));
  v.ndim = t.ndim;
  v.dtype = dtype_of(t.dtype, name);
  v.device_type = t.device.device_type;
  v.device_id = t.device.device_id;
  v.data = static_cast<char*>(t.data) + t.byte_offset;
  int64_t stride = 1;
  for (int i = t.ndim - 1; i >= 0; --i) {
    v.shape[i] = t.shape[i];
    v.strides[i] = t.strides != nullptr ? t.strides[i] : stride;
    stride *= t.shape[i];
  }
  return v;
}

// The op's inputs and outputs, the same for every device's argument struct; owners[0..8] keep
// the imported tensors alive.
template <typename Args>
void import_op_arrays(Args& a, Imported* owners, py::handle query, py::handle keys,
                      py::handle values, py::handle attn_query, py::handle exclude,
                      py::handle output, py::handle weights, py::handle indices,
                      py::handle scores) {
  a.query = import_array(query, "query", owners[0]);
  a.keys = import_array(keys, "keys", owners[1]);
  a.values = import_array(values, "values", owners[2]);
  a.attn_query = import_array(attn_query, "attn_query", owners[3]);
  a.exclude = import_array(exclude, "exclude", owners[4]);
  a.output = import_array(output, "output", owners[5]);
  a.weights = import_array(weights, "weights", owners[6]);
  a.indices = import_array(indices, "indices", owners[7]);
  a.scores = import_array(scores, "scores", owners[8]);
}

reco::cpu::Level parse_level(const std::optional<std::string>& level) {
  if (!level) return reco::cpu::default_level();
  reco::cpu::Level levels[4];
  const int n = reco::cpu::available_levels(levels, 4);
  std::string known;
  for (int i = 0; i < n; ++i) {
    if (*level == reco::cpu::level_name(levels[i])) return levels[i];
    known += std::string(i ? ", " : "") + reco::cpu::level_name(levels[i]);
  }
  throw py::value_error("level '" + *level + "' is not available here (available: " + known + ")");
}

void retrieve_attend(py::handle query, py::handle keys, py::handle values, py::handle attn_query,
                     py::handle exclude, int64_t k, double temperature, py::handle output,
                     py::handle weights, py::handle indices, py::handle scores, int num_threads,
                     const std::optional<std::string>& level) {
  Imported owners[9];
  reco::cpu::RetrieveAttendArgs a;
  import_op_arrays(a, owners, query, keys, values, attn_query, exclude, output, weights, indices,
                   scores);
  a.k = k;
  a.temperature = temperature;
  a.num_threads = num_threads;
  const reco::cpu::Level lv = parse_level(level);
  py::gil_scoped_release release;
  reco::cpu::retrieve_attend(a, lv);
}

void coarse_int8(py::handle query_codes, py::handle codes, py::handle scales, py::handle exclude,
                 int64_t candidates, py::handle rows, py::handle scores, int num_threads) {
  Imported owners[6];
  reco::cpu::CoarseInt8Args a;
  a.query_codes = import_array(query_codes, "query_codes", owners[0]);
  a.codes = import_array(codes, "codes", owners[1]);
  a.scales = import_array(scales, "scales", owners[2]);
  a.exclude = import_array(exclude, "exclude", owners[3]);
  a.rows = import_array(rows, "rows", owners[4]);
  a.scores = import_array(scores, "scores", owners[5]);
  for (const TensorView* v : {&a.query_codes, &a.codes, &a.scales, &a.rows, &a.scores})
    if (v->device_type != 1) throw py::value_error("coarse_int8: every array must be on the CPU");
  const int64_t B = a.query_codes.ndim == 2 ? a.query_codes.shape[0] : -1;
  if (a.query_codes.ndim != 2 || a.codes.ndim != 2 || a.scales.ndim != 1 || a.rows.ndim != 2 ||
      a.scores.ndim != 2 || a.rows.dtype != DType::i64 || a.scores.dtype != DType::f32 ||
      a.rows.shape[0] != B || a.scores.shape[0] != B || a.rows.shape[1] != candidates ||
      a.scores.shape[1] != candidates || a.rows.strides[1] != 1 || a.scores.strides[1] != 1 ||
      (a.exclude.present() && (a.exclude.ndim != 2 || a.exclude.dtype != DType::i64 ||
                               a.exclude.shape[0] != B || a.exclude.strides[1] != 1)))
    throw py::value_error(
        "coarse_int8: rows [B, candidates] int64, scores [B, candidates] float32, exclude [B, E] "
        "int64");
  a.candidates = candidates;
  a.num_threads = num_threads;
  py::gil_scoped_release release;
  reco::cpu::coarse_int8(a);
}

#if defined(RECO_WITH_CUDA)
void retrieve_attend_cuda(py::handle query, py::handle query_terms, py::handle codes,
                          py::handle key_scales, py::handle keys, py::handle values,
                          py::handle attn_query, py::handle exclude, int64_t k, int64_t candidates,
                          double temperature, py::handle output, py::handle weights,
                          py::handle indices, py::handle scores, py::handle part_scores,
                          py::handle part_rows, int splits, int pow2, int queries, bool mma,
                          uintptr_t stream) {
  Imported owners[14];
  reco::cuda::Args a;
  import_op_arrays(a, owners, query, keys, values, attn_query, exclude, output, weights, indices,
                   scores);
  a.part_scores = import_array(part_scores, "part_scores", owners[9]);
  a.part_rows = import_array(part_rows, "part_rows", owners[10]);
  a.query_terms = import_array(query_terms, "query_terms", owners[11]);
  a.codes = import_array(codes, "codes", owners[12]);
  a.key_scales = import_array(key_scales, "key_scales", owners[13]);
  for (const TensorView* v : {&a.codes, &a.key_scales})
    if (v->present() && (v->device_type != 2 || v->device_id != a.query.device_id))
      throw py::value_error("retrieve_attend_cuda: every array must be on the query's CUDA device");
  if (a.codes.present() &&
      (a.codes.ndim != 2 || a.codes.dtype != DType::i8 || a.codes.shape[0] != a.keys.shape[0] ||
       a.codes.shape[1] != a.keys.shape[1] || a.codes.strides[1] != 1 || !a.key_scales.present() ||
       a.key_scales.ndim != 1 || a.key_scales.dtype != DType::f32 ||
       a.key_scales.shape[0] != a.keys.shape[0] || a.key_scales.strides[0] != 1))
    throw py::value_error(
        "retrieve_attend_cuda: codes must be int8 [N, d] with unit inner stride and key_scales "
        "contiguous float32 [N]");
  if (candidates < k) throw py::value_error("retrieve_attend_cuda: candidates must be >= k");
  if (a.query_terms.present() &&
      (a.query_terms.ndim != 3 ||
       a.query_terms.dtype != (a.codes.present() ? DType::i8 : a.keys.dtype) ||
       a.query_terms.shape[1] != a.query.shape[0] || a.query_terms.shape[2] != a.query.shape[1] ||
       a.query_terms.strides[2] != 1 || a.query_terms.strides[1] != a.query.shape[1] ||
       a.query_terms.strides[0] != a.query.shape[0] * a.query.shape[1] ||
       a.query_terms.device_type != 2 || a.query_terms.device_id != a.query.device_id))
    throw py::value_error(
        "retrieve_attend_cuda: query_terms must be contiguous [terms, B, d] of the keys' dtype, "
        "on the query's device");
  for (const TensorView* v : {&a.query, &a.keys, &a.values, &a.output, &a.weights, &a.indices,
                              &a.scores, &a.part_scores, &a.part_rows})
    if (v->device_type != 2 || v->device_id != a.query.device_id)
      throw py::value_error("retrieve_attend_cuda: every array must be on the query's CUDA device");
  if (a.query.dtype != DType::f32 || a.query.strides[1] != 1 ||
      a.query.strides[0] != a.query.shape[1])
    throw py::type_error("retrieve_attend_cuda: query must be contiguous float32");
  if (a.keys.strides[1] != 1 || a.values.strides[1] != 1)
    throw py::value_error("retrieve_attend_cuda: keys and values need unit inner stride");
  a.k = k;
  a.candidates = candidates;
  a.temperature = temperature;
  a.plan.splits = splits;
  a.plan.pow2 = pow2;
  a.plan.queries = queries;
  a.plan.mma = mma;
  a.plan.ok = true;
  a.stream = stream;
  py::gil_scoped_release release;
  reco::cuda::retrieve_attend(a);
}
#endif

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "reco's compiled kernels (framework-free; arrays through DLPack)";
  m.def("retrieve_attend", &retrieve_attend, py::arg("query"), py::arg("keys"), py::arg("values"),
        py::arg("attn_query"), py::arg("exclude"), py::arg("k"), py::arg("temperature"),
        py::arg("output"), py::arg("weights"), py::arg("indices"), py::arg("scores"),
        py::arg("num_threads"), py::arg("level") = py::none(),
        "CPU fused top-k retrieval + attention, writing into the given output arrays.");
  m.def(
      "cpu_levels",
      [] {
        reco::cpu::Level levels[4];
        const int n = reco::cpu::available_levels(levels, 4);
        std::vector<std::string> out;
        for (int i = 0; i < n; ++i) out.emplace_back(reco::cpu::level_name(levels[i]));
        return out;
      },
      "SIMD levels compiled in and supported by this CPU, lowest first.");
  m.def(
      "default_cpu_level",
      [] { return std::string(reco::cpu::level_name(reco::cpu::default_level())); },
      "The level used when none is given (RECO_CPU_LEVEL overrides).");
  m.def("coarse_int8", &coarse_int8, py::arg("query_codes"), py::arg("codes"), py::arg("scales"),
        py::arg("exclude"), py::arg("candidates"), py::arg("rows"), py::arg("scores"),
        py::arg("num_threads"),
        "CPU coarse int8 search of fused_retrieve_attend_int8, writing rows and scores.");
  m.def("coarse_int8_uses_vnni", &reco::cpu::coarse_int8_uses_vnni,
        "Whether the CPU coarse int8 search uses AVX512-VNNI here.");
#if defined(RECO_WITH_CUDA)
  m.attr("with_cuda") = true;
  m.def(
      "cuda_plan",
      [](int64_t batch, int64_t rows, int64_t dim, int64_t k, int terms, int device) {
        const reco::cuda::Plan p = reco::cuda::plan(batch, rows, dim, k, terms, device);
        return py::make_tuple(p.ok, p.splits, p.pow2, p.queries, p.mma);
      },
      py::arg("batch"), py::arg("rows"), py::arg("dim"), py::arg("k"), py::arg("terms"),
      py::arg("device"),
      "(ok, splits, pow2, queries, mma): how a CUDA call is split (ok False: k too large for the "
      "kernel; mma: the tensor-core search applies, given the query as `terms` 16-bit terms of "
      "the keys' dtype, 0 for none).");
  m.def("retrieve_attend_cuda", &retrieve_attend_cuda, py::arg("query"), py::arg("query_terms"),
        py::arg("codes"), py::arg("key_scales"), py::arg("keys"), py::arg("values"),
        py::arg("attn_query"), py::arg("exclude"), py::arg("k"), py::arg("candidates"),
        py::arg("temperature"), py::arg("output"), py::arg("weights"), py::arg("indices"),
        py::arg("scores"), py::arg("part_scores"), py::arg("part_rows"), py::arg("splits"),
        py::arg("pow2"), py::arg("queries"), py::arg("mma"), py::arg("stream"),
        "CUDA fused top-k retrieval + attention on the given stream (workspace from the caller).");
#else
  m.attr("with_cuda") = false;
#endif
}
