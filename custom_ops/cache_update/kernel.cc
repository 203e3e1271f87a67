// ai.attn2onnx::CacheUpdate — a decode step's new cache rows written into a max-length buffer,
// ONNX Runtime CPU kernel.
//
// Contract (custom_ops/cache_update/reference.py): out = buffer; out[:, position:position+T] = new_rows,
// buffer [B,S,...], new_rows [B,T,...] (equal on every axis but 1), position an int64 scalar or [1]
// with 0 <= position <= S - T. Any float element type (the bytes are copied, never converted).
//
// In place: when ORT hands the kernel an output whose memory is the buffer's (the caller binds
// past and present to one OrtValue, as ONNX Runtime GenAI's past_present_share_buffer), only the
// T new rows of each batch row are written: the cost is O(B * T * row), whatever S. Otherwise
// (a plain session run, ORT allocating the output) the buffer is copied first.
// Every shape and the position are checked before a byte is written: a bad call is one
// INVALID_ARGUMENT status, never a write out of bounds.
#include "attn2onnx_native.h"

#include <memory>

namespace attn2onnx {
namespace {

constexpr const char* kOp = "CacheUpdate";
constexpr size_t kBuffer = 0, kNewRows = 1, kPosition = 2;

std::string dims_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? "," : "") + std::to_string(shape[i]);
  return s + "]";
}

// Elements of `shape` into `count`; false when a dim is negative or the count overflows.
bool elements(const std::vector<int64_t>& shape, int64_t& count) {
  count = 1;
  for (int64_t dim : shape)
    if (dim < 0 || __builtin_mul_overflow(count, dim, &count)) return false;
  return true;
}

template <typename E>
struct CacheUpdateKernel {
  OrtStatusPtr ComputeV2(OrtKernelContext* context) const noexcept {
    return status_of(kOp, [&] { return compute(Ort::KernelContext(context)); });
  }

  Ort::Status compute(Ort::KernelContext ctx) const {
    Input<E> buffer, rows;
    Input<int64_t> position;
    ATTN2ONNX_RETURN_IF_ERROR(read_input(ctx, kBuffer, kOp, "buffer", onnx_type<E>(), true, buffer));
    ATTN2ONNX_RETURN_IF_ERROR(read_input(ctx, kNewRows, kOp, "new_rows", onnx_type<E>(), true, rows));
    ATTN2ONNX_RETURN_IF_ERROR(
        read_input(ctx, kPosition, kOp, "position", ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, true, position));
    auto fail = [](const std::string& what) { return invalid(kOp, what); };
    const auto& bs = buffer.shape;
    const auto& rs = rows.shape;
    if (bs.size() < 2 || rs.size() != bs.size())
      return fail("buffer must be [B,S,...] and new_rows [B,T,...] of the same rank, got " + dims_str(bs) + " and " +
                  dims_str(rs));
    for (size_t axis = 0; axis < bs.size(); ++axis)
      if (axis != 1 && rs[axis] != bs[axis])
        return fail("new_rows " + dims_str(rs) + " must match buffer " + dims_str(bs) + " on every axis but 1");
    int64_t total = 0, added = 0, one = 0;
    if (!elements(bs, total) || !elements(rs, added)) return fail("a shape has too many elements");
    if (!elements(position.shape, one) || one != 1 || position.shape.size() > 1)
      return fail("position must be an int64 scalar or [1], got " + dims_str(position.shape));
    const int64_t S = bs[1], T = rs[1], at = position.data[0];
    if (T > S || at < 0 || at > S - T)
      return fail(std::to_string(T) + " rows at position " + std::to_string(at) + " do not fit a buffer of " +
                  std::to_string(S) + " positions");

    Ort::UnownedValue out = ctx.GetOutput(0, bs);
    if (out == nullptr) return fail("output out has no value: the node names it \"\"");
    E* dst = out.GetTensorMutableData<E>();
    if (total == 0) return ok();
    if (dst != buffer.data) std::memmove(dst, buffer.data, sizeof(E) * static_cast<size_t>(total));
    if (added == 0) return ok();
    const int64_t batch = bs[0], row = total / (batch * S);  // elements per position
    for (int64_t b = 0; b < batch; ++b)
      std::memmove(dst + (b * S + at) * row, rows.data + b * T * row, sizeof(E) * static_cast<size_t>(T * row));
    return ok();
  }
};

// The output has the buffer's type and shape.
OrtStatusPtr infer_output(const OrtCustomOp*, OrtShapeInferContext* context) noexcept {
  return status_of(kOp, [context] {
    const OrtApi& api = Ort::GetApi();
    OrtTensorTypeAndShapeInfo* info = nullptr;  // owned by the context
    Ort::ThrowOnError(api.ShapeInferContext_GetInputTypeShape(context, kBuffer, &info));
    return Ort::Status(api.ShapeInferContext_SetOutputTypeShape(context, 0, info));
  });
}

template <typename E>
struct CacheUpdateOp : Ort::CustomOpBase<CacheUpdateOp<E>, CacheUpdateKernel<E>, true> {
  CacheUpdateOp() { OrtCustomOp::InferOutputShapeFn = infer_output; }
  const char* GetName() const { return kOp; }
  const char* GetExecutionProviderType() const { return kCpuEP; }
  size_t GetInputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    return index == kPosition ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 : onnx_type<E>();
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t) const { return INPUT_OUTPUT_REQUIRED; }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return onnx_type<E>(); }
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo*, void** kernel) const noexcept {
    return status_of(kOp, [&] {
      *kernel = new CacheUpdateKernel<E>();
      return ok();
    });
  }
};

void make_ops(std::vector<OrtCustomOp*>& ops) {
  ops.push_back(new CacheUpdateOp<float>());
  ops.push_back(new CacheUpdateOp<Ort::Float16_t>());
  ops.push_back(new CacheUpdateOp<Ort::BFloat16_t>());
}
ATTN2ONNX_REGISTER_OPS(make_ops);

}  // namespace
}  // namespace attn2onnx
