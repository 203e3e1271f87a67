// Entry point of the attn2onnx ONNX Runtime kernel library:
//   SessionOptions.register_custom_ops_library(path) calls RegisterCustomOps once per session.
// Every op kernel compiled into the library (custom_ops/<op>/kernel.cc) registered a factory
// with ATTN2ONNX_REGISTER_OPS; the ops and the ai.attn2onnx domain are created on the first call
// and never destroyed, because every session built with them keeps pointers to them.
#include "attn2onnx_native.h"

#include <mutex>
#include <string>

namespace attn2onnx {

std::vector<OpFactory>& op_factories() {
  static std::vector<OpFactory> factories;
  return factories;
}

namespace {

struct Library {
  std::vector<OrtCustomOp*> ops;
  OrtCustomOpDomain* domain = nullptr;
};

// Created once, intentionally leaked: sessions may outlive any static destructor order.
Library* library(const OrtApi* api) {
  static Library* lib = [api] {
    auto* created = new Library();
    for (OpFactory factory : op_factories()) factory(created->ops);
    Ort::ThrowOnError(api->CreateCustomOpDomain(kDomain, &created->domain));
    for (auto& op : created->ops) Ort::ThrowOnError(api->CustomOpDomain_Add(created->domain, op));
    return created;
  }();
  return lib;
}

}  // namespace
}  // namespace attn2onnx

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {
    // The runtime is older than the headers this library was built with.
    const OrtApi* base = api_base->GetApi(1);
    std::string message = std::string("attn2onnx kernels need ONNX Runtime API version ") +
                          std::to_string(ORT_API_VERSION) + " or newer; this runtime is " +
                          api_base->GetVersionString();
    return base->CreateStatus(ORT_FAIL, message.c_str());
  }
  static std::once_flag init;
  std::call_once(init, [api] { Ort::InitApi(api); });
  try {
    attn2onnx::Library* lib = attn2onnx::library(api);
    return api->AddCustomOpDomain(options, lib->domain);
  } catch (const Ort::Exception& e) {
    return api->CreateStatus(e.GetOrtErrorCode(), e.what());
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  }
}
