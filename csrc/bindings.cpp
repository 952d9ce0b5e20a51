// reco._C: the compiled core. Arrays arrive through DLPack (torch, numpy, cupy); outputs are
// allocated by the caller and written in place. No libtorch is linked.
// Compiled a second time with RECO_EMULATION as reco._C_emu: only the CUDA functions, against the
// CPU emulation of csrc/emulation, where the "device" arrays are CPU arrays.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <initializer_list>
#include <optional>
#include <string>
#include <vector>

#include "reco/dlpack.h"
#if !defined(RECO_EMULATION)
#include "cpu/machine_limits.h"
#include "cpu/retrieve_attend.h"
#endif
#if defined(RECO_WITH_CUDA)
#include "cuda/retrieve_attend.h"
#endif
#if defined(RECO_EMULATION)
#include "emulation/reco_emu.h"
#define RECO_MODULE _C_emu
constexpr int kDeviceType = kDLCPU;  // the emulated GPU works on host memory
#else
#define RECO_MODULE _C
constexpr int kDeviceType = kDLCUDA;
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
    // allow masks: torch.bool exports as kDLBool (older torch as kDLUInt), one byte each
    if ((t.code == kDLUInt || t.code == kDLBool) && t.bits == 8) return DType::u8;
  }
  throw py::type_error(name + " has an unsupported dtype (DLPack code " + std::to_string(t.code) +
                       ", " + std::to_string(t.bits) + " bits, " + std::to_string(t.lanes) +
                       " lanes)");
}

// A view of `obj` through its __dlpack__; None gives an absent view (ndim 0). With `stream`
// (the consumer's stream, as the DLPack protocol defines it: None for host arrays), the producer
// orders its pending work before that stream; without it, the producer's default applies.
// The strides of size-1 dims (and of arrays with no elements) are replaced by the contiguous
// ones: they address nothing, and producers differ (torch 1.13 to 2.9 exports 1 for them).
TensorView import_array(const py::handle& obj, const std::string& name, Imported& owner,
                        const std::optional<py::object>& stream = std::nullopt) {
  TensorView v;
  if (obj.is_none()) return v;
  if (!py::hasattr(obj, "__dlpack__"))
    throw py::type_error(name + " must be an array supporting DLPack (__dlpack__), got " +
                         std::string(py::str(py::type::of(obj))));
  py::object capsule = stream ? obj.attr("__dlpack__")(py::arg("stream") = *stream)
                              : obj.attr("__dlpack__")();
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
  bool empty = false;  // no elements: no stride addresses anything
  for (int i = 0; i < t.ndim; ++i) empty |= t.shape[i] == 0;
  int64_t stride = 1;
  for (int i = t.ndim - 1; i >= 0; --i) {
    v.shape[i] = t.shape[i];
    v.strides[i] = t.strides != nullptr && t.shape[i] != 1 && !empty ? t.strides[i] : stride;
    stride *= std::max<int64_t>(t.shape[i], 1);
  }
  return v;
}

// The op's inputs and outputs, the same for every device's argument struct; owners[0..9] keep
// the imported tensors alive.
template <typename Args>
void import_op_arrays(Args& a, Imported* owners, py::handle query, py::handle keys,
                      py::handle values, py::handle attn_query, py::handle exclude,
                      py::handle allow, py::handle output, py::handle weights, py::handle indices,
                      py::handle scores, const std::optional<py::object>& stream = std::nullopt) {
  a.query = import_array(query, "query", owners[0], stream);
  a.keys = import_array(keys, "keys", owners[1], stream);
  a.values = import_array(values, "values", owners[2], stream);
  a.attn_query = import_array(attn_query, "attn_query", owners[3], stream);
  a.exclude = import_array(exclude, "exclude", owners[4], stream);
  a.output = import_array(output, "output", owners[5], stream);
  a.weights = import_array(weights, "weights", owners[6], stream);
  a.indices = import_array(indices, "indices", owners[7], stream);
  a.scores = import_array(scores, "scores", owners[8], stream);
  a.allow = import_array(allow, "allow", owners[9], stream);
}

#if !defined(RECO_EMULATION)

reco::cpu::Level parse_level(const std::optional<std::string>& level) {
  if (!level) return reco::cpu::default_level();
  reco::cpu::Level levels[reco::cpu::kMaxLevels];
  const int n = reco::cpu::available_levels(levels, reco::cpu::kMaxLevels);
  std::string known;
  for (int i = 0; i < n; ++i) {
    if (*level == reco::cpu::level_name(levels[i])) return levels[i];
    known += std::string(i ? ", " : "") + reco::cpu::level_name(levels[i]);
  }
  throw py::value_error("level '" + *level + "' is not available here (available: " + known + ")");
}

void retrieve_attend(py::handle query, py::handle keys, py::handle values, py::handle attn_query,
                     py::handle exclude, py::handle allow, int64_t k, double temperature,
                     py::handle output, py::handle weights, py::handle indices, py::handle scores,
                     int num_threads, const std::optional<std::string>& level) {
  Imported owners[10];
  reco::cpu::RetrieveAttendArgs a;
  import_op_arrays(a, owners, query, keys, values, attn_query, exclude, allow, output, weights,
                   indices, scores);
  a.k = k;
  a.temperature = temperature;
  a.num_threads = num_threads;
  const reco::cpu::Level lv = parse_level(level);
  py::gil_scoped_release release;
  reco::cpu::retrieve_attend(a, lv);
}

void coarse_int8(py::handle query_codes, py::handle codes, py::handle scales, py::handle exclude,
                 py::handle allow, int64_t candidates, py::handle rows, py::handle scores,
                 int num_threads) {
  Imported owners[7];
  reco::cpu::CoarseInt8Args a;
  a.query_codes = import_array(query_codes, "query_codes", owners[0]);
  a.codes = import_array(codes, "codes", owners[1]);
  a.scales = import_array(scales, "scales", owners[2]);
  a.exclude = import_array(exclude, "exclude", owners[3]);
  a.rows = import_array(rows, "rows", owners[4]);
  a.scores = import_array(scores, "scores", owners[5]);
  a.allow = import_array(allow, "allow", owners[6]);
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

#endif  // !RECO_EMULATION

#if defined(RECO_WITH_CUDA)
// A contiguous array of this dtype and shape.
bool contiguous(const TensorView& v, DType dtype, std::initializer_list<int64_t> shape) {
  if (v.ndim != int(shape.size()) || v.dtype != dtype) return false;
  int64_t stride = 1;
  int i = v.ndim;
  for (auto it = shape.end(); it != shape.begin();) {
    --it;
    --i;
    if (v.shape[i] != *it || v.strides[i] != stride) return false;
    stride *= std::max<int64_t>(*it, 1);  // as import_array gives arrays with no elements
  }
  return true;
}

// Everything the kernels read or write lies where they expect it: they index by these shapes.
void check_cuda_arrays(const reco::cuda::Args& a, int64_t k) {
  auto fail = [](const std::string& what) {
    throw py::value_error("retrieve_attend_cuda: " + what);
  };
  for (const TensorView* v : {&a.query, &a.keys, &a.values, &a.output, &a.weights, &a.indices,
                              &a.scores, &a.part_scores, &a.part_rows, &a.query_terms, &a.codes,
                              &a.key_scales, &a.attn_query, &a.exclude, &a.allow})
    if (v->present() && (v->device_type != kDeviceType || v->device_id != a.query.device_id))
      fail("every array must be on the query's CUDA device");
  const bool attend = a.values.present();  // absent: the search alone
  if (a.query.ndim != 2 || a.keys.ndim != 2 || (attend && a.values.ndim != 2))
    fail("query [B, d], keys [N, d] and values [N, dv] must be 2-D");
  const int64_t B = a.query.shape[0], d = a.query.shape[1], N = a.keys.shape[0];
  const int64_t dv = attend ? a.values.shape[1] : 1;
  const int64_t H = a.attn_query.present() ? a.attn_query.shape[1] : 1;
  if (!contiguous(a.query, DType::f32, {B, d})) fail("query must be contiguous float32 [B, d]");
  if (a.keys.shape[1] != d || (attend && a.values.shape[0] != N) || N < 1 || d < 1 || dv < 1)
    fail("keys must be [N, d] and values [N, dv], N, d, dv >= 1");
  if (a.keys.strides[1] != 1 || (attend && a.values.strides[1] != 1))
    fail("keys and values need unit inner stride");
  if (!attend && (a.attn_query.present() || a.output.present() || a.weights.present()))
    fail("without values there is no attention: attn_query, output and weights must be None");
  if (k < 1 || k > N) fail("k must be in [1, N]");
  if (a.attn_query.present() && !contiguous(a.attn_query, DType::f32, {B, H, dv}))
    fail("attn_query must be contiguous float32 [B, H, dv]");
  if (a.exclude.present() &&
      !contiguous(a.exclude, DType::i64, {B, a.exclude.ndim == 2 ? a.exclude.shape[1] : -1}))
    fail("exclude must be contiguous int64 [B, E]");
  if (a.allow.present() && !contiguous(a.allow, DType::u8, {N}))
    fail("allow must be a contiguous bool [N] array");
  if ((attend && (!contiguous(a.output, DType::f32, {B, H, dv}) ||
                  !contiguous(a.weights, DType::f32, {B, H, k}))) ||
      !contiguous(a.indices, DType::i64, {B, k}) || !contiguous(a.scores, DType::f32, {B, k}))
    fail("output [B, H, dv], weights [B, H, k], indices [B, k] (int64) and scores [B, k] must be "
         "contiguous float32 except indices");
  if (a.codes.present() &&
      (a.codes.ndim != 2 || a.codes.dtype != DType::i8 || a.codes.shape[0] != N ||
       a.codes.shape[1] != d || a.codes.strides[1] != 1 ||
       !contiguous(a.key_scales, DType::f32, {N})))
    fail("codes must be int8 [N, d] with unit inner stride and key_scales contiguous float32 [N]");
  if (a.query_terms.present() &&
      (a.query_terms.ndim != 3 ||
       !contiguous(a.query_terms, a.codes.present() ? DType::i8 : a.keys.dtype,
                   {a.query_terms.shape[0], B, d})))
    fail("query_terms must be contiguous [terms, B, d] of the keys' dtype (int8 with codes)");
}
#endif

#if defined(RECO_WITH_CUDA)
void retrieve_attend_cuda(py::handle query, py::handle query_terms, py::handle codes,
                          py::handle key_scales, py::handle keys, py::handle values,
                          py::handle attn_query, py::handle exclude, py::handle allow, int64_t k,
                          int64_t candidates,
                          double temperature, py::handle output, py::handle weights,
                          py::handle indices, py::handle scores, py::handle part_scores,
                          py::handle part_rows, int splits, int pow2, int queries, bool mma,
                          const py::object& stream) {
  // The launch stream (a cudaStream_t as an int; None: the default stream, or a host array in
  // the emulation), and the one __dlpack__ is told: DLPack's 1 for the legacy default stream.
  uintptr_t launch_stream = 0;
  py::object dl_stream = py::none();
  if (!stream.is_none()) {
    launch_stream = stream.cast<uintptr_t>();
    dl_stream = py::int_(launch_stream == 0 ? uintptr_t(1) : launch_stream);
  }
  Imported owners[15];
  reco::cuda::Args a;
  import_op_arrays(a, owners, query, keys, values, attn_query, exclude, allow, output, weights,
                   indices, scores, dl_stream);
  a.part_scores = import_array(part_scores, "part_scores", owners[10], dl_stream);
  a.part_rows = import_array(part_rows, "part_rows", owners[11], dl_stream);
  a.query_terms = import_array(query_terms, "query_terms", owners[12], dl_stream);
  a.codes = import_array(codes, "codes", owners[13], dl_stream);
  a.key_scales = import_array(key_scales, "key_scales", owners[14], dl_stream);
  check_cuda_arrays(a, k);
  if (candidates < k) throw py::value_error("retrieve_attend_cuda: candidates must be >= k");
  a.k = k;
  a.candidates = candidates;
  a.temperature = temperature;
  a.plan.splits = splits;
  a.plan.pow2 = pow2;
  a.plan.queries = queries;
  a.plan.mma = mma;
  a.plan.ok = true;
  a.stream = launch_stream;
  py::gil_scoped_release release;
  reco::cuda::retrieve_attend(a);
}
#endif

}  // namespace

PYBIND11_MODULE(RECO_MODULE, m) {
#if defined(RECO_EMULATION)
  m.doc() = "reco's CUDA path compiled against the CPU emulation (csrc/emulation): CPU arrays";
  m.def(
      "set_arch",
      [](const std::string& name) {
        if (!reco::emu::set_arch(name.c_str()))
          throw py::value_error("emulated GPU architecture must be sm_80 or sm_90, got '" + name +
                                "'");
      },
      py::arg("name"), "Emulate this GPU: sm_80 (A100) or sm_90 (H100).");
  m.def(
      "arch", [] { return std::string(reco::emu::arch().name); }, "The emulated architecture.");
  m.def("take_launch_log", &reco::emu::take_launch_log,
        "The kernels launched since the last call (demangled names, oldest first).");
  m.def(
      "get_device",
      [] {
        int d = -1;
        if (cudaGetDevice(&d) != cudaSuccess) throw std::runtime_error("cudaGetDevice failed");
        return d;
      },
      "The emulated runtime's current device (this OS thread's).");
  m.def(
      "set_device",
      [](int d) {
        if (cudaSetDevice(d) != cudaSuccess)
          throw py::value_error("no emulated device " + std::to_string(d));
      },
      py::arg("device"), "cudaSetDevice in the emulated runtime.");
#else
  m.doc() = "reco's compiled kernels (framework-free; arrays through DLPack)";
  m.def("retrieve_attend", &retrieve_attend, py::arg("query"), py::arg("keys"), py::arg("values"),
        py::arg("attn_query"), py::arg("exclude"), py::arg("allow"), py::arg("k"),
        py::arg("temperature"), py::arg("output"), py::arg("weights"), py::arg("indices"),
        py::arg("scores"), py::arg("num_threads"), py::arg("level") = py::none(),
        "CPU fused top-k retrieval + attention, writing into the given output arrays.");
  m.def(
      "cpu_levels",
      [] {
        reco::cpu::Level levels[reco::cpu::kMaxLevels];
        const int n = reco::cpu::available_levels(levels, reco::cpu::kMaxLevels);
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
        py::arg("exclude"), py::arg("allow"), py::arg("candidates"), py::arg("rows"),
        py::arg("scores"),
        py::arg("num_threads"),
        "CPU coarse int8 search of fused_retrieve_attend_int8, writing rows and scores.");
  m.def("coarse_int8_uses_vnni", &reco::cpu::coarse_int8_uses_vnni,
        "Whether the CPU coarse int8 search uses AVX512-VNNI here.");
  // The machine's limits, for benchmarks/ (not part of the op).
  m.def(
      "bench_fma_rate",
      [](const std::optional<std::string>& level, int num_threads, double seconds, bool bf16_dot) {
        const reco::cpu::Level lv = parse_level(level);
        py::gil_scoped_release release;
        return reco::cpu::fma_rate(lv, num_threads, seconds, bf16_dot);
      },
      py::arg("level"), py::arg("num_threads"), py::arg("seconds") = 0.3,
      py::arg("bf16_dot") = false,
      "Benchmarks only: multiply-adds per second of the level's float32 vector FMA chains on "
      "num_threads threads (bf16_dot: vdpbf16ps, 0 where the level has none).");
  m.def(
      "bench_read_seconds",
      [](py::handle array, int num_threads, const std::optional<std::string>& level) {
        Imported owner;
        const TensorView v = import_array(array, "array", owner);
        if (v.device_type != 1) throw py::value_error("array must be on the CPU");
        int64_t want = 1;
        for (int i = v.ndim - 1; i >= 0; --i) {
          if (v.shape[i] != 1 && v.strides[i] != want)
            throw py::value_error("array must be contiguous");
          want *= v.shape[i];
        }
        const reco::cpu::Level lv = parse_level(level);
        const int64_t bytes = v.numel() * reco::dtype_size(v.dtype);
        py::gil_scoped_release release;
        return reco::cpu::read_seconds(lv, v.data, bytes, num_threads);
      },
      py::arg("array"), py::arg("num_threads"), py::arg("level") = py::none(),
      "Benchmarks only: seconds of one pass reading every byte of a contiguous CPU array with "
      "the level's vector loads, split over num_threads threads.");
#endif
#if defined(RECO_CXX_COMPILER)
  m.attr("cxx_compiler") = RECO_CXX_COMPILER;
#endif
#if defined(RECO_WITH_CUDA)
  m.attr("with_cuda") = true;
  m.attr("cuda_max_candidates") = reco::cuda::kMaxCandidates;
#if defined(RECO_CUDA_ARCHS)
  {
    std::vector<std::string> archs;  // "80-real,90-real,90-virtual"
    std::string all = RECO_CUDA_ARCHS;
    for (size_t p = 0, q; p <= all.size(); p = q + 1) {
      q = all.find(',', p);
      if (q == std::string::npos) q = all.size();
      if (q > p) archs.push_back(all.substr(p, q - p));
    }
    m.attr("cuda_architectures") = archs;
    m.attr("cuda_compiler") = RECO_CUDA_COMPILER;
  }
#endif
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
        py::arg("attn_query"), py::arg("exclude"), py::arg("allow"), py::arg("k"),
        py::arg("candidates"),
        py::arg("temperature"), py::arg("output"), py::arg("weights"), py::arg("indices"),
        py::arg("scores"), py::arg("part_scores"), py::arg("part_rows"), py::arg("splits"),
        py::arg("pow2"), py::arg("queries"), py::arg("mma"), py::arg("stream"),
        "CUDA fused top-k retrieval + attention on the given stream (a cudaStream_t as an int, "
        "or None: the default stream), workspace from the caller.");
#else
  m.attr("with_cuda") = false;
#endif
}
