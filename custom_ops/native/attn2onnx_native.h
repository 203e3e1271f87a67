// Shared pieces of the attn2onnx ONNX Runtime CPU kernel library.
//
// Every op kernel (custom_ops/<op>/kernel.cc) includes this header and registers a factory with
// ATTN2ONNX_REGISTER_OPS; register.cc's RegisterCustomOps creates every op once and adds them to
// the ai.attn2onnx domain. The library is built against ONNX Runtime's C/C++ API headers with
// ORT_API_MANUAL_INIT (the OrtApi comes from the OrtApiBase handed to RegisterCustomOps) and is
// not linked against libonnxruntime, so it loads into any ORT at least as new as its headers.
//
// The library must never crash the process that loads it, whatever the model: ops are
// Ort::CustomOpBase ops with status-returning entry points (no exception crosses into ORT:
// status_of), read their inputs through read_input (absent inputs are checked, never
// dereferenced) and their attributes through read_attr (a wrong type is refused, not ignored).
// (The lite custom-op API is not used: it builds Compute's arguments from the context without a
// null check, so a node input written as "" crashed the host in its header.)
#pragma once

#ifndef ORT_API_MANUAL_INIT
#define ORT_API_MANUAL_INIT
#endif
#include <onnxruntime_cxx_api.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <new>
#include <string>
#include <type_traits>
#include <vector>

namespace attn2onnx {

inline constexpr const char* kDomain = "ai.attn2onnx";
inline constexpr const char* kCpuEP = "CPUExecutionProvider";
// Masked logits are replaced by this finite negative (never added as a bias).
inline constexpr float kNeg = -1e30f;

// ---------------------------------------------------------------- op registration
// A factory appends the op's OrtCustomOp objects (one per supported element type). It runs once
// per process and the objects are never freed: every session built with them points at them.
using OpFactory = void (*)(std::vector<OrtCustomOp*>& ops);
std::vector<OpFactory>& op_factories();
struct OpRegistrar {
  explicit OpRegistrar(OpFactory factory) { op_factories().push_back(factory); }
};
#define ATTN2ONNX_CONCAT_(a, b) a##b
#define ATTN2ONNX_CONCAT(a, b) ATTN2ONNX_CONCAT_(a, b)
#define ATTN2ONNX_REGISTER_OPS(factory) \
  static ::attn2onnx::OpRegistrar ATTN2ONNX_CONCAT(attn2onnx_registrar_, __LINE__)(factory)

// ---------------------------------------------------------------- SIMD helpers
// One vector register of floats for the ISA the library is compiled for (-march=native at build
// time). GCC/Clang vector extensions keep the register-blocked micro-kernels portable across
// SSE / AVX2 / AVX-512; plain loops elsewhere are left to the auto-vectoriser.
#if defined(__AVX512F__)
inline constexpr int kVL = 16;
#elif defined(__AVX__)
inline constexpr int kVL = 8;
#else
inline constexpr int kVL = 4;
#endif
typedef float vf __attribute__((vector_size(kVL * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(kVL * sizeof(int32_t))));

inline vf vload(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void vstore(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
// x in every lane. Written x - 0, which IEEE lets the compiler fold to a plain broadcast (an
// FMA's embedded {1to16} operand), where `vf{} + x` costs an add per broadcast (0 + x is not x
// for x = -0): one extra operation per two FMAs in the micro-kernels.
inline vf vset1(float x) { return x - vf{}; }
inline vi viota() {
  vi v;
  for (int i = 0; i < kVL; ++i) v[i] = i;
  return v;
}
inline float hsum(vf v) {  // fixed order: deterministic whatever the thread
  float s = 0.f;
  for (int i = 0; i < kVL; ++i) s += v[i];
  return s;
}
inline float hmax(vf v) {
  float m = v[0];
  for (int i = 1; i < kVL; ++i) m = v[i] > m ? v[i] : m;
  return m;
}
inline vf vmax(vf a, vf b) { return a > b ? a : b; }

// exp for x <= 0 (softmax after max subtraction), accurate to ~1 ulp (Cephes expf polynomial,
// Cody-Waite range reduction, exact 2^n). x < -87 returns exactly 0, so masked logits (NEG - max)
// give probability 0 exactly, as in an fp32 softmax.
inline vf vexp_nonpos(vf x) {
  const vf lo = vset1(-87.0f);
  vi underflow = x < lo;
  x = x < lo ? lo : x;
  x = x > vset1(0.f) ? vset1(0.f) : x;
  const vf magic = vset1(12582912.0f);  // 1.5 * 2^23: adding it rounds to nearest integer
  vf t = x * vset1(1.44269504088896341f) + magic;
  vf n = t - magic;
  vf r = x - n * vset1(0.693359375f);
  r = r - n * vset1(-2.12194440e-4f);
  vf p = vset1(1.9875691500e-4f);
  p = p * r + vset1(1.3981999507e-3f);
  p = p * r + vset1(8.3334519073e-3f);
  p = p * r + vset1(4.1665795894e-2f);
  p = p * r + vset1(1.6666665459e-1f);
  p = p * r + vset1(5.0000001201e-1f);
  p = p * r * r + r + vset1(1.0f);
  vi ni = __builtin_convertvector(n, vi);
  vi bits = (ni + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof scale);
  vf result = p * scale;
  return underflow ? vset1(0.f) : result;
}

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// ---------------------------------------------------------------- element types
inline float to_float(float x) { return x; }
inline float to_float(Ort::Float16_t x) { return x.ToFloat(); }
inline float to_float(Ort::BFloat16_t x) { return x.ToFloat(); }
template <typename T>
inline T from_float(float x) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else {
    return T(x);
  }
}
template <typename T>
constexpr ONNXTensorElementDataType onnx_type() {
  if constexpr (std::is_same_v<T, float>) return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  if constexpr (std::is_same_v<T, Ort::Float16_t>) return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
  if constexpr (std::is_same_v<T, Ort::BFloat16_t>) return ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16;
  return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
}

// ---------------------------------------------------------------- statuses
inline Ort::Status ok() { return Ort::Status{nullptr}; }
inline Ort::Status invalid(const char* op, const std::string& what) {
  return Ort::Status((std::string(op) + ": " + what).c_str(), ORT_INVALID_ARGUMENT);
}
#define ATTN2ONNX_RETURN_IF_ERROR(expr)                \
  do {                                                 \
    if (Ort::Status status_ = (expr); !status_.IsOK()) \
      return status_;                                  \
  } while (0)

// `body()` (an Ort::Status) as the OrtStatus* an entry point hands ORT: every exception becomes
// a status (an Ort::Exception keeps its code), none crosses into ORT.
template <typename Body>
OrtStatusPtr status_of(const char* op, Body&& body) noexcept {
  char message[1024];
  OrtErrorCode code = ORT_RUNTIME_EXCEPTION;
  try {
    return body().release();
  } catch (const Ort::Exception& e) {
    code = e.GetOrtErrorCode();
    std::snprintf(message, sizeof message, "%s: %s", op, e.what());
  } catch (const std::bad_alloc&) {
    code = ORT_FAIL;
    std::snprintf(message, sizeof message, "%s: out of memory", op);
  } catch (const std::exception& e) {
    std::snprintf(message, sizeof message, "%s: %s", op, e.what());
  } catch (...) {
    std::snprintf(message, sizeof message, "%s: unknown exception", op);
  }
  return Ort::GetApi().CreateStatus(code, message);
}

// ---------------------------------------------------------------- inputs
// One input of a kernel call, as read_input found it.
template <typename T>
struct Input {
  bool present = false;
  std::vector<int64_t> shape;
  const T* data = nullptr;
};

// Input `index` (called `name`) of the call. ORT hands a null OrtValue for an input the node
// writes as "" (ONNX's "absent") or leaves off the end: required, that is INVALID_ARGUMENT;
// optional, in.present stays false. A value that is not a tensor of `type` is refused too (ORT
// checks types against the op's declaration at load; the kernel stays safe whatever the runtime
// checked). Bool tensors are read as uint8_t (T): a byte other than 0 / 1 (an initializer's raw
// data) is a mask byte here, where as a C++ bool it would be undefined behaviour.
template <typename T>
Ort::Status read_input(const Ort::KernelContext& ctx, size_t index, const char* op, const char* name,
                       ONNXTensorElementDataType type, bool required, Input<T>& in) {
  const OrtValue* value = index < ctx.GetInputCount() ? static_cast<const OrtValue*>(ctx.GetInput(index)) : nullptr;
  if (value == nullptr) {
    if (!required) return ok();
    return invalid(op, "required input " + std::to_string(index) + " (" + name +
                           ") has no value: the node leaves it out or names it \"\"");
  }
  const Ort::ConstValue tensor{value};
  if (!tensor.IsTensor()) return invalid(op, std::string("input ") + name + " must be a tensor");
  const Ort::TensorTypeAndShapeInfo info = tensor.GetTensorTypeAndShapeInfo();
  if (info.GetElementType() != type)
    return invalid(op, std::string("input ") + name + " has element type " + std::to_string(info.GetElementType()) +
                           ", expected " + std::to_string(type));
  in.present = true;
  in.shape = info.GetShape();
  in.data = static_cast<const T*>(tensor.GetTensorRawData());
  return ok();
}

// ---------------------------------------------------------------- attributes
// Whether the node gives attribute `name` in any type the C API can read (scalar, string, list).
inline bool has_attribute(const OrtApi* api, const OrtKernelInfo* info, const char* name) {
  int64_t i = 0;
  float f = 0.f;
  size_t size = 0;
  OrtStatus* tries[] = {
      api->KernelInfoGetAttribute_int64(info, name, &i),
      api->KernelInfoGetAttribute_float(info, name, &f),
      api->KernelInfoGetAttribute_string(info, name, nullptr, &size),
      api->KernelInfoGetAttributeArray_int64(info, name, nullptr, &size),
      api->KernelInfoGetAttributeArray_float(info, name, nullptr, &size),
  };
  bool found = false;
  for (OrtStatus* status : tries) {
    found = found || status == nullptr;
    if (status != nullptr) api->ReleaseStatus(status);
  }
  return found;
}

// Attribute `name` (an int or a float, T) into `value`, which keeps its default when the node
// does not give it. Given with another type it is refused: ORT's custom-op schema declares no
// attributes, so nothing else would stop a float `window` or an int `scale` being ignored.
template <typename T>
Ort::Status read_attr(const OrtApi* api, const OrtKernelInfo* info, const char* op, const char* name, T& value) {
  static_assert(std::is_same_v<T, int64_t> || std::is_same_v<T, float>);
  T read{};
  OrtStatus* status = nullptr;
  if constexpr (std::is_same_v<T, float>) {
    status = api->KernelInfoGetAttribute_float(info, name, &read);
  } else {
    status = api->KernelInfoGetAttribute_int64(info, name, &read);
  }
  if (status == nullptr) {
    value = read;
    return ok();
  }
  api->ReleaseStatus(status);
  if (has_attribute(api, info, name))
    return invalid(op, std::string("attribute ") + name + " must be " + (std::is_same_v<T, float> ? "a float" : "an int"));
  return ok();
}

// ---------------------------------------------------------------- per-thread scratch
// Reused across calls by the same thread (ORT's intra-op pool threads live as long as the
// session), grown on demand; no call allocates in the hot loop.
// `slot` picks one of a few independent buffers (a kernel's panel and its packed inputs).
inline float* thread_scratch(size_t count, int slot = 0) {
  thread_local std::vector<float> buffers[2];
  std::vector<float>& buffer = buffers[slot];
  if (buffer.size() < count) buffer.resize(count);
  return buffer.data();
}

}  // namespace attn2onnx
