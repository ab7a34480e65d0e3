// Every op schema of namespace dawin_ext, public and private, is defined here, with the CPU kernels,
// the private ops' implementations and the pybind11 module that reports the build. The CUDA kernels
// register themselves from csrc/cuda/*.cu under these schemas (TORCH_LIBRARY_IMPL(dawin_ext, CUDA, ...)).
#include <Python.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "cpu/cpu_kernels.h"
#include "ops.h"

// setup.py passes the versions as bare tokens; stringify them here.
#define DAWIN_EXT_STR_(x) #x
#define DAWIN_EXT_STR(x) DAWIN_EXT_STR_(x)
#ifndef DAWIN_EXT_TORCH_VERSION
#define DAWIN_EXT_TORCH_VERSION unknown
#endif
#ifndef DAWIN_EXT_VERSION
#define DAWIN_EXT_VERSION 0.0.0
#endif

TORCH_LIBRARY(dawin_ext, m) {
  m.def("softmax_entropy(Tensor logits, float temperature=1.0) -> Tensor");
  m.def(
      "entropy_coefficients(Tensor logits, float[] temperatures, bool offset_adjustment=False)"
      " -> (Tensor coefficients, Tensor entropies)");
  m.def("blend_(Tensor[] sources, Tensor coefficients, Tensor(a!)[] out) -> ()");
  m.def("sample_combine(Tensor stacked, Tensor weights) -> Tensor");
  m.def("samplewise_linear(Tensor input, Tensor weights, Tensor? biases, Tensor coefficients) -> Tensor");
  m.def(
      "samplewise_lora(Tensor input, Tensor lora_a, Tensor lora_b, Tensor coefficients, Tensor? weight=None,"
      " Tensor? bias=None) -> Tensor");
  m.def(
      "samplewise_depthwise_conv2d(Tensor input, Tensor weights, Tensor? biases, Tensor coefficients, int[2] stride,"
      " int[2] padding, int[2] dilation) -> Tensor");

  // Private ops (leading underscore): not public API.
  // Behind dawin_ext.blend's own aliasing analysis (which names state-dict keys): the pairs of
  // memory_overlaps as a flat list [first, second, exact, ...].
  m.def("_memory_overlaps(Tensor[] tensors, int num_read_only) -> int[]",
        [](at::TensorList tensors, int64_t num_read_only) {
          std::vector<int64_t> flat;
          for (const auto& o : dawin_ext::memory_overlaps(tensors, num_read_only)) {
            flat.insert(flat.end(), {o.first, o.second, o.exact ? 1 : 0});
          }
          return flat;
        });
  // entropy_coefficients' last step alone, for entropies gathered from several processes
  // (dawin_ext.methods.distributed): the same ATen sequence, so the coefficients match one process bit for bit.
  m.def("_coefficients_from_entropies(Tensor entropies, bool offset_adjustment) -> Tensor",
        &dawin_ext::coefficients_from_entropies);
  // Introspection for tests and benchmark reports: the instruction set the CPU kernels run with in this
  // process ("AVX512", "AVX2" or "DEFAULT"), and which CPU path samplewise_linear takes for float32 inputs
  // with at least kMinRowsForMixing rows per sample ("brgemm" or "stacked").
  m.def("_cpu_isa() -> str", [] { return std::string(dawin_ext::cpu::level_name(dawin_ext::cpu::level())); });
  m.def("_samplewise_linear_cpu_path() -> str",
        [] { return std::string(dawin_ext::samplewise_linear_has_brgemm() ? "brgemm" : "stacked"); });
  // Test-only: the CUDA kernels' grids run thread by thread on the CPU (cpu/cuda_emulation.cpp).
  m.def("_emulate_softmax_entropy_cuda(Tensor logits, float temperature, int num_sms) -> (Tensor, str)",
        &dawin_ext::emulation::emulate_softmax_entropy);
  m.def(
      "_emulate_blend_cuda(Tensor[] sources, Tensor coefficients, Tensor(a!)[] out, bool outputs_overlap_sources, "
      "str kernel='auto') -> str",
      &dawin_ext::emulation::emulate_blend);
  m.def("_emulate_sample_combine_cuda(Tensor stacked, Tensor weights, int num_sms) -> (Tensor, str)",
        &dawin_ext::emulation::emulate_sample_combine);
  m.def(
      "_emulate_samplewise_linear_cuda(Tensor input, Tensor weights, Tensor? biases, Tensor coefficients, "
      "int num_sms) -> Tensor",
      &dawin_ext::emulation::emulate_samplewise_linear);
  m.def(
      "_emulate_samplewise_depthwise_conv2d_cuda(Tensor input, Tensor weights, Tensor? biases, Tensor coefficients, "
      "int[2] stride, int[2] padding, int[2] dilation, int num_sms) -> Tensor",
      &dawin_ext::emulation::emulate_samplewise_depthwise);
}

TORCH_LIBRARY_IMPL(dawin_ext, CPU, m) {
  m.impl("softmax_entropy", &dawin_ext::softmax_entropy_cpu);
  m.impl("entropy_coefficients", &dawin_ext::entropy_coefficients_cpu);
  m.impl("blend_", &dawin_ext::blend_cpu);
  m.impl("sample_combine", &dawin_ext::sample_combine_cpu);
  m.impl("samplewise_linear", &dawin_ext::samplewise_linear_cpu);
  m.impl("samplewise_lora", &dawin_ext::samplewise_lora_cpu);
  m.impl("samplewise_depthwise_conv2d", &dawin_ext::samplewise_depthwise_conv2d_cpu);
}

namespace {
pybind11::dict build_info() {
  pybind11::dict info;
  info["version"] = DAWIN_EXT_STR(DAWIN_EXT_VERSION);
#ifdef DAWIN_EXT_WITH_CUDA
  info["with_cuda"] = true;
  const int v = dawin_ext::cuda_runtime_version();  // CUDART_VERSION at compile time, e.g. 13000
  info["cuda_version"] = std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
#else
  info["with_cuda"] = false;
  info["cuda_version"] = pybind11::none();
#endif
  info["torch_version"] = DAWIN_EXT_STR(DAWIN_EXT_TORCH_VERSION);
  return info;
}
}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "dawin_ext compiled kernels (ops are registered under torch.ops.dawin_ext)";
  m.def("build_info", &build_info, "How this extension was built: version, CUDA or not, CUDA version, torch version");
}
