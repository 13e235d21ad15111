// The instruction sets of the integer kernels, and which one a call runs ("auto": the best this CPU has).
#pragma once

#include <torch/extension.h>

#include <string>

#define AVX_VNNI_TARGET "avx2,fma,f16c,avxvnni"
#define AVX512_TARGET "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni"

namespace llminfer {

enum class Isa { avx2, avx_vnni, avx512_vnni };

inline Isa choose_isa(const std::string& name) {
  __builtin_cpu_init();
  const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool has_512 = __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
                       __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
  const bool has_vnni = __builtin_cpu_supports("avxvnni");
  if (name == "avx512_vnni" || (name == "auto" && has_512)) {
    TORCH_CHECK(has_512, "this CPU has no AVX-512 VNNI");
    return Isa::avx512_vnni;
  }
  if (name == "avx_vnni" || (name == "auto" && has_vnni)) {
    TORCH_CHECK(has_vnni, "this CPU has no AVX-VNNI");
    return Isa::avx_vnni;
  }
  TORCH_CHECK(name == "avx2" || name == "auto", "unknown instruction set '", name, "'");
  TORCH_CHECK(has_avx2, "this CPU has no AVX2/FMA");
  return Isa::avx2;
}

}  // namespace llminfer
