// ai.attn2onnx::StandardAttention — plain masked softmax attention, ONNX Runtime CPU kernel.
//
// Contract (variants.md section 0 / 1; docs/ops.md): per head h (kv head h / (N / Hk)),
// o = softmax(where(allowed, q k^T * scale, NEG)) v with the softmax in fp32, allowed = real key
// (key_padding_mask [B,S]) and, with causal, 0 <= t + S - T - s (< window when window > 0). A row
// with no allowed key is uniform over all S keys. q [B,T,N*d], k [B,S,Hk*d], v [B,S,Hk*dv] (the
// [B,T,D] layout of com.microsoft.MultiHeadAttention), fp32 / fp16 / bf16 in, fp32 accumulation.
//
// The masks arrive as modes (causal, window) and a [B,S] key mask: no [B,1,T,S] tensor exists.
//
// Single-pass flash form on the shared attention core (custom_ops/native/attention_core.h): keys
// and values are packed once per (batch, kv head), in parallel; then one work item = (batch,
// head, block of up to kTq query rows), heavy (late causal) blocks first, on ORT's intra-op pool.
// A work item sweeps the key chunks its rows may see (kChunk keys; chunks no row sees are skipped,
// as in DcmhaAttention) once: scores of the chunk (register-blocked micro-kernel), mask, running
// row max m and sum l with the exact online rescaling (o *= exp(m_old - m_new)), e = exp(L - m) by
// the polynomial exp, o += e v (micro-kernel); o / l at the end. Masked logits are NEG, so a row
// that sees no key keeps m = NEG and weighs every key 1 (uniform); a row that does see one drops
// its earlier NEG chunks with exp(NEG - m) = 0 exactly. Columns past S weigh 0 in every row.
// Work items are independent and fixed by the shapes, each row computed in one order: any thread
// count gives bit-identical results.
#include "attention_core.h"

#include <cmath>
#include <memory>

namespace attn2onnx {
namespace {

constexpr int kTq = 8 * kMR;     // query rows per work item, at most
constexpr int kChunk = 4 * kCB;  // keys per chunk: the chunk's scores stay in L1
constexpr int64_t kMaxLength = INT32_MAX - kChunk;  // int32 key lanes hold every index up to S rounded up

struct Flash {
  int64_t B, T, S, N, Hk, d, dv;
  float scale;
  bool causal;
  int64_t window;
  int64_t Sp, dvb, dvp, nqb;  // dvp: dv rounded up to kVL (the accumulators' row)
  const float* q;             // [B,T,N,d]
  const float* kt;            // [B,Hk,Sp/kCB,d,kCB]
  const float* vp;            // [B,Hk,dvb,Sp,kCB]
  const int32_t* pad;         // [B,Sp]
  const int64_t* count;       // [B,S+1]
  float* out;                 // [B,T,N,dv]
};

// One work item: batch b, head h, query rows t0 .. t0+tn-1.
void run_block(const Flash& p, int64_t item) {
  const int64_t BN = p.B * p.N, qb = p.nqb - 1 - item / BN, bh = item % BN;
  const int64_t b = bh / p.N, h = bh % p.N, g = h / (p.N / p.Hk);
  const int64_t d = p.d, dv = p.dv, dvp = p.dvp, S = p.S, Sp = p.Sp, T = p.T;
  const int64_t t0 = qb * kTq, tn = std::min<int64_t>(kTq, T - t0);
  const int32_t* pad = p.pad + b * Sp;
  const int64_t* count = p.count + b * (S + 1);
  int64_t lo[kTq], hi[kTq], s_lo, s_hi;
  block_keys(pad, count, T, S, p.causal, p.window, t0, tn, lo, hi, s_lo, s_hi);
  s_lo = s_lo / kCB * kCB;
  int64_t lo_max = 0, hi_min = S - 1;
  for (int64_t i = 0; i < tn; ++i) lo_max = std::max(lo_max, lo[i]), hi_min = std::min(hi_min, hi[i]);

  // Scratch: scores [kTq, kChunk] | o [kTq, dvp] | m, l [kTq]; the block's q rows [tn, d].
  float* scores = thread_scratch(static_cast<size_t>(kTq * (kChunk + dvp + 2)));
  float* acc = scores + kTq * kChunk;
  float* m = acc + kTq * dvp;
  float* l = m + kTq;
  float* qpack = thread_scratch(static_cast<size_t>(std::max<int64_t>(1, tn * d)), 1);
  for (int64_t i = 0; i < tn; ++i) {
    std::memcpy(qpack + i * d, p.q + ((b * T + t0 + i) * p.N + h) * d, sizeof(float) * d);
    m[i] = -INFINITY, l[i] = 0.f;
  }
  std::fill(acc, acc + tn * dvp, 0.f);

  const float* kb = p.kt + (b * p.Hk + g) * Sp * d;
  const float* vb = p.vp + (b * p.Hk + g) * p.dvb * Sp * kCB;
  const vi iota = viota();
  for (int64_t c0 = s_lo; c0 < s_hi; c0 += kChunk) {
    const int64_t c1 = std::min(round_up(s_hi, kCB), c0 + kChunk), w = c1 - c0;
    // scores = scale * q k^T over the chunk (keys packed per kCB block).
    for (int64_t j = 0; j < w; j += kCB)
      for (int64_t i = 0; i < tn; i += kMR)
        qk_rows<kMR>(tn - i, qpack + i * d, d, kb + (c0 + j) * d, kCB, d, scores + i * kChunk + j, kChunk, p.scale);
    // Every row sees every key of the chunk: no mask to apply.
    const bool open = c0 >= lo_max && c1 - 1 <= hi_min && c1 <= S && count[c1] - count[c0] == w;
    for (int64_t i = 0; i < tn; ++i) {
      float* r = scores + i * kChunk;
      vf mx = vset1(-INFINITY);
      if (open) {
        for (int64_t c = 0; c < w; c += kVL) mx = vmax(mx, vload(r + c));
      } else {
        for (int64_t c = 0; c < w; c += kVL) {
          const vi s = iota + static_cast<int32_t>(c0 + c);
          vi real;
          std::memcpy(&real, pad + c0 + c, sizeof real);
          const vi allowed = (s >= static_cast<int32_t>(lo[i])) & (s <= static_cast<int32_t>(hi[i])) & (real != 0);
          const vf x = allowed ? vload(r + c) : vset1(kNeg);
          vstore(r + c, x);
          mx = vmax(mx, x);
        }
      }
      const float m_new = std::max(m[i], hmax(mx));
      const float alpha = std::exp(m[i] - m_new);  // 0 on the first chunk (m = -inf)
      const vf mv = vset1(m_new);
      vf sum = vf{};
      for (int64_t c = 0; c < w; c += kVL) {
        vf e = vexp_nonpos(vload(r + c) - mv);
        if (c0 + c + kVL > S) e = (iota + static_cast<int32_t>(c0 + c)) < static_cast<int32_t>(S) ? e : vf{};
        vstore(r + c, e);
        sum += e;
      }
      l[i] = l[i] * alpha + hsum(sum);
      m[i] = m_new;
      if (alpha != 1.f) {
        float* o = acc + i * dvp;
        const vf av = vset1(alpha);
        for (int64_t c = 0; c < dvp; c += kVL) vstore(o + c, vload(o + c) * av);
      }
    }
    // o += e v over the chunk (values packed per kCB head dims; a last block of kVL columns or
    // fewer takes the one-vector micro-kernel: at dv = 80 the work of 80 columns, not 96).
    for (int64_t dc = 0; dc < dvp; dc += kCB)
      for (int64_t i = 0; i < tn; i += kMR) {
        const float* e = scores + i * kChunk;
        const float* vs = vb + dc * Sp + c0 * kCB;
        if (dvp - dc > kVL) {
          pv_rows<kMR, 2>(tn - i, e, kChunk, vs, kCB, w, acc + i * dvp + dc, dvp, kCB, true);
        } else {
          pv_rows<kMR, 1>(tn - i, e, kChunk, vs, kCB, w, acc + i * dvp + dc, dvp, kVL, true);
        }
      }
  }
  for (int64_t i = 0; i < tn; ++i) {
    const float inv = 1.f / l[i];
    float* o = p.out + ((b * T + t0 + i) * p.N + h) * dv;
    for (int64_t c = 0; c < dv; ++c) o[c] = acc[i * dvp + c] * inv;
  }
}

void run_item(void* data, size_t item) { run_block(*static_cast<const Flash*>(data), static_cast<int64_t>(item)); }

template <typename E>
struct PackJob {
  const Flash* p;
  const E* k;
  const E* v;
  float* kt;
  float* vp;
};

template <typename E>
void pack_item(void* data, size_t item) {
  const auto* job = static_cast<const PackJob<E>*>(data);
  const Flash& p = *job->p;
  const int64_t b = static_cast<int64_t>(item) / p.Hk, g = static_cast<int64_t>(item) % p.Hk;
  pack_head(job->k + (b * p.S * p.Hk + g) * p.d, p.Hk * p.d, job->v + (b * p.S * p.Hk + g) * p.dv, p.Hk * p.dv, p.S,
            p.d, p.dv, p.Sp, job->kt + (b * p.Hk + g) * p.Sp * p.d, job->vp + (b * p.Hk + g) * p.dvb * p.Sp * kCB);
}

// ------------------------------------------------------------------ the ORT kernel
constexpr const char* kOp = "StandardAttention";
constexpr const char* kInputNames[] = {"q", "k", "v", "key_padding_mask"};
constexpr size_t kInputs = 4, kKeyPaddingMask = 3;

template <typename E>
struct StandardAttentionKernel {
  float scale_ = 0.f;
  int64_t num_heads_ = 0, kv_num_heads_ = 0, causal_ = 0, window_ = 0;

  Ort::Status read_attributes(const OrtApi* api, const OrtKernelInfo* info) {
    ATTN2ONNX_RETURN_IF_ERROR(read_attr(api, info, kOp, "num_heads", num_heads_));
    ATTN2ONNX_RETURN_IF_ERROR(read_attr(api, info, kOp, "kv_num_heads", kv_num_heads_));
    ATTN2ONNX_RETURN_IF_ERROR(read_attr(api, info, kOp, "scale", scale_));
    ATTN2ONNX_RETURN_IF_ERROR(read_attr(api, info, kOp, "causal", causal_));
    return read_attr(api, info, kOp, "window", window_);
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) const noexcept {
    return status_of(kOp, [&] { return compute(Ort::KernelContext(context)); });
  }

  Ort::Status compute(Ort::KernelContext ctx) const {
    Input<E> q, k, v;
    Input<uint8_t> mask;
    const auto type = onnx_type<E>();
    ATTN2ONNX_RETURN_IF_ERROR(read_input(ctx, 0, kOp, kInputNames[0], type, true, q));
    ATTN2ONNX_RETURN_IF_ERROR(read_input(ctx, 1, kOp, kInputNames[1], type, true, k));
    ATTN2ONNX_RETURN_IF_ERROR(read_input(ctx, 2, kOp, kInputNames[2], type, true, v));
    ATTN2ONNX_RETURN_IF_ERROR(read_input(ctx, kKeyPaddingMask, kOp, kInputNames[kKeyPaddingMask],
                                         ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL, true, mask));
    return run(ctx, q, k, v, mask);
  }

  Ort::Status run(Ort::KernelContext& ctx, const Input<E>& q, const Input<E>& k, const Input<E>& v,
                  const Input<uint8_t>& mask) const {
    auto fail = [](const std::string& what) { return invalid(kOp, what); };
    const int64_t N = num_heads_, Hk = kv_num_heads_ > 0 ? kv_num_heads_ : num_heads_;
    if (N < 1) return fail("num_heads must be >= 1");
    if (kv_num_heads_ < 0 || N % Hk != 0) return fail("kv_num_heads must be 0 or divide num_heads");
    if (window_ < 0) return fail("window must be >= 0");
    if (window_ > 0 && !causal_) return fail("window requires causal = 1");
    const auto &qs = q.shape, &ks = k.shape, &vs = v.shape;
    if (qs.size() != 3 || qs[2] % N != 0)
      return fail("q must be [B,T,num_heads*d], got " + shape_str(qs) + " with num_heads " + std::to_string(N));
    const int64_t B = qs[0], T = qs[1], d = qs[2] / N;
    if (ks.size() != 3 || ks[0] != B || ks[2] != Hk * d)
      return fail("k must be [B,S,kv_num_heads*d] = [" + std::to_string(B) + ",S," + std::to_string(Hk * d) + "], got " +
                  shape_str(ks));
    const int64_t S = ks[1];
    if (vs.size() != 3 || vs[0] != B || vs[1] != S || vs[2] % Hk != 0)
      return fail("v must be [B,S,kv_num_heads*dv] matching k " + shape_str(ks) + ", got " + shape_str(vs));
    const int64_t dv = vs[2] / Hk;
    if (mask.shape != std::vector<int64_t>{B, S}) return fail("key_padding_mask must be [B,S], got " + shape_str(mask.shape));
    if (T > kMaxLength || S > kMaxLength) return fail("T and S must be at most " + std::to_string(kMaxLength));
    int64_t out_elements = 0, packed = 0;
    if (!element_count({B, T, N, dv}, out_elements) || !element_count({B, Hk, round_up(S, kCB), d + dv + kCB}, packed))
      return fail("the tensors have too many elements");

    Ort::UnownedValue o = ctx.GetOutput(0, {B, T, N * dv});
    if (o == nullptr) return fail("output o has no value: the node names it \"\"");
    E* out = o.GetTensorMutableData<E>();
    const size_t out_count = static_cast<size_t>(out_elements);
    if (out_count == 0) return ok();
    if (S == 0) {  // no key at all: nothing to average
      std::fill(out, out + out_count, from_float<E>(0.f));
      return ok();
    }

    Flash p{};
    p.B = B, p.T = T, p.S = S, p.N = N, p.Hk = Hk, p.d = d, p.dv = dv;
    p.scale = d == 0 ? 1.f : scale_ != 0.f ? scale_ : static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
    p.causal = causal_ != 0;
    p.window = std::min(window_, S);
    p.Sp = round_up(S, kCB), p.dvb = (dv + kCB - 1) / kCB, p.dvp = round_up(dv, kVL), p.nqb = (T + kTq - 1) / kTq;
    std::vector<float> q32, out32;
    p.q = float_view(q.data, static_cast<size_t>(B * T * N * d), q32);
    if constexpr (std::is_same_v<E, float>) {
      p.out = out;
    } else {
      out32.resize(out_count);
      p.out = out32.data();
    }
    std::vector<int32_t> pad;
    std::vector<int64_t> count;
    key_padding(mask.data, B, S, p.Sp, pad, count);
    p.pad = pad.data(), p.count = count.data();
    std::vector<float> kt(static_cast<size_t>(B * Hk * p.Sp * d)), vp(static_cast<size_t>(B * Hk * p.dvb * p.Sp * kCB));
    p.kt = kt.data(), p.vp = vp.data();
    PackJob<E> pack{&p, k.data, v.data, kt.data(), vp.data()};
    ctx.ParallelFor(pack_item<E>, static_cast<size_t>(B * Hk), 0, &pack);
    ctx.ParallelFor(run_item, static_cast<size_t>(B * N * p.nqb), 0, &p);
    if constexpr (!std::is_same_v<E, float>) {
      for (size_t i = 0; i < out_count; ++i) out[i] = from_float<E>(p.out[i]);
    }
    return ok();
  }
};

// Output [B,T,N*dv]: q's shape (symbolic dims kept) with its last dim N*dv when the shapes give it
// (q's own when v and k have the same last dim), of q's element type.
OrtStatusPtr infer_output(const OrtCustomOp*, OrtShapeInferContext* context) noexcept {
  return status_of(kOp, [context] {
    const OrtApi& api = Ort::GetApi();
    auto input = [&](size_t index) {
      OrtTensorTypeAndShapeInfo* info = nullptr;
      Ort::ThrowOnError(api.ShapeInferContext_GetInputTypeShape(context, index, &info));
      return Ort::ConstTensorTypeAndShapeInfo{info};
    };
    auto symbols = [](const Ort::ConstTensorTypeAndShapeInfo& info) {
      std::vector<const char*> names(info.GetDimensionsCount(), nullptr);
      if (!names.empty()) info.GetSymbolicDimensions(names.data(), names.size());
      return names;
    };
    const Ort::ConstTensorTypeAndShapeInfo q = input(0), k = input(1), v = input(2);
    std::vector<int64_t> dims = q.GetShape();
    std::vector<const char*> names = symbols(q);
    if (dims.size() == 3 && k.GetDimensionsCount() == 3 && v.GetDimensionsCount() == 3) {
      const int64_t kl = k.GetShape()[2], vl = v.GetShape()[2];
      const char* ksym = symbols(k)[2];
      const char* vsym = symbols(v)[2];
      const bool same = (kl >= 0 && kl == vl) || (kl < 0 && vl < 0 && ksym && vsym && std::strcmp(ksym, vsym) == 0 && *ksym);
      if (!same) {
        dims[2] = dims[2] >= 0 && kl > 0 && vl >= 0 && dims[2] % kl == 0 ? dims[2] / kl * vl : -1;
        names[2] = "";
      }
    }
    OrtTensorTypeAndShapeInfo* raw = nullptr;
    Ort::ThrowOnError(api.CreateTensorTypeAndShapeInfo(&raw));
    const Ort::TensorTypeAndShapeInfo owner{raw};
    Ort::ThrowOnError(api.SetTensorElementType(raw, q.GetElementType()));
    Ort::ThrowOnError(api.SetDimensions(raw, dims.data(), dims.size()));
    for (auto& name : names)
      if (name == nullptr) name = "";
    Ort::ThrowOnError(api.SetSymbolicDimensions(raw, names.data(), names.size()));
    return Ort::Status(api.ShapeInferContext_SetOutputTypeShape(context, 0, raw));
  });
}

template <typename E>
struct StandardAttentionOp : Ort::CustomOpBase<StandardAttentionOp<E>, StandardAttentionKernel<E>, true> {
  StandardAttentionOp() { OrtCustomOp::InferOutputShapeFn = infer_output; }
  const char* GetName() const { return kOp; }
  const char* GetExecutionProviderType() const { return kCpuEP; }
  size_t GetInputTypeCount() const { return kInputs; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    return index == kKeyPaddingMask ? ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL : onnx_type<E>();
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t) const { return INPUT_OUTPUT_REQUIRED; }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return onnx_type<E>(); }
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const noexcept {
    return status_of(kOp, [&] {
      auto created = std::make_unique<StandardAttentionKernel<E>>();
      ATTN2ONNX_RETURN_IF_ERROR(created->read_attributes(&api, info));
      *kernel = created.release();
      return ok();
    });
  }
};

void make_ops(std::vector<OrtCustomOp*>& ops) {
  ops.push_back(new StandardAttentionOp<float>());
  ops.push_back(new StandardAttentionOp<Ort::Float16_t>());
  ops.push_back(new StandardAttentionOp<Ort::BFloat16_t>());
}
ATTN2ONNX_REGISTER_OPS(make_ops);

}  // namespace
}  // namespace attn2onnx
