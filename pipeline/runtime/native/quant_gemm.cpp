// Weight-only quantized GEMV / small GEMM for the CPU engine (AVX2 + FMA + F16C), float32 activations. The weight
// kernels (weight_kernels.h) also have an AVX-512 instance, chosen at run time where the CPU has AVX-512 (Isa).
//
// y[m, n] = sum_k x'[m, k] * w[n, k] (+ bias[n]) with w[n, k] = q[n, k] * scale[n, g] (+ zero[n, g]), g = k / group:
// from three activation rows on, each weight is dequantized exactly as the reference does (one float multiply, then
// one add; no fused rounding: the module is built with -ffp-contract=off) and multiplied with float32 activations,
// accumulated in float32; at one or two rows (decode steps) the exact integer values are multiplied with x and each
// group's sum is scaled once (rows_kernel_factored: the same sum in exact arithmetic, rounded in another order),
// except int4 in the AVX-512 instance, which dequantizes each weight at every row count by looking it up in its
// group's 16 dequantized values (rows_kernel_int4_lookup). At one or two rows int4 runs four output rows at a time
// (the _tiled kernels): its decode, not memory, bounds it there.
// x' is x, optionally multiplied by `prequant` (AWQ/SmoothQuant factors) and fake-quantized per tensor with
// `act_scale` (INT8: round half to even, clamp to [-128, 127]; FP8 e4m3: clamp to +-448, round to nearest even),
// which is what the engine's Python path computes. INT8 activations times int8 weights (SmoothQuant) are multiplied in
// integers instead (int8_activation_rows: exact integer sums, one float conversion per group).
//
// Storage formats (prepared once at load by pipeline.runtime.native):
//   0 int8: (N, K) int8 values.
//   1 int4: (N, ceil(K / 32) * 16) uint8, blocks of 32 values per 16 bytes: byte j of a block holds value j + 8 in
//           its low nibble and value j + 16 + 8 in its high nibble (values stored with an offset of 8, unsigned).
//   2 fp8:  (N, K) float8_e4m3fn bits.
//   3 f32:  (N, K) float32 (with scale 1: a plain GEMV).
//   4 f16, 5 bf16: (N, K) IEEE half / bfloat16 (scale 1: a 16-bit engine's float linears, activations in float32).
// Rows are independent: the work is split over output rows (at::parallel_for), and each decoded block of weights
// is used for up to 8 activation rows before the next block is read (batch 8 reads the weights once).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Float8_e4m3fn.h>
// ATen's AVX2 vector type (and through it SLEEF's exp, which libtorch exports), so that silu computes what torch's
// own AVX2 kernel computes.
#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#endif
#include <ATen/cpu/vec/vec.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

namespace {

constexpr int kBlock = 32;     // values per block of the weight kernels (4 AVX2 vectors, 2 AVX-512 ones)
constexpr int kMaxRows = 8;    // activation rows per pass over the weights
constexpr int64_t kChunkKeys = 256;  // keys per work item of the decode attention (64 KB of keys at 64 values)

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Software prefetch of the weights ahead of the block being read (a hint per 64-byte line of the block; a hint past
// the end of a matrix is harmless). The hardware prefetchers alone left an 8-row pass streaming float32 weights at
// ~10 GB/s on a 2-core Xeon VM; with hints into L1 2 KiB ahead, 30 layers of the default model's shapes (2 threads,
// best of 6 rounds) took 0.90x the time at one row and 0.73x at eight in float32, 0.65x and 0.76x in int8, 0.91x at
// one row in int4, and the float32 lm_head 0.84x and 0.63x. 2048 bytes was the best of 1, 2 and 4 KiB.
// Rows whose stream, not their decode, is the slower part (`kPrefetchToL2`: float32, half, bfloat16 and int8) take
// their hints into L2 instead, 8 KiB ahead (kL2PrefetchBytes). On a 2-core AMD EPYC Zen 4 VM, 30 layers of the
// default model's shapes, hint kinds built side by side and called alternately (medians of 11, two runs): float32
// took 0.72-0.86x the time at one row and 0.64-0.66x at eight, the float32 lm_head 0.70-0.72x and 0.61-0.73x, half
// and bfloat16 0.73-0.75x and 0.91x, int8 0.90-0.94x and 0.99-1.00x. For float32 at eight rows, hints into L2 2 KiB
// ahead took 0.85x, 4 KiB 0.69x, 16 KiB as 8 KiB; hints into both (L1 2 KiB, L2 8 KiB ahead) 1.27-1.36x. int4 and
// FP8, whose decode bounds them, keep L1 2 KiB ahead: into L2 8 KiB ahead int4 took 1.07-1.10x at one row and FP8
// 0.94-1.05x, both 1.01-1.04x at eight. (Presumably the L1 hints' few misses in flight held the denser streams back.)
// -DPREFETCH_DIST=0 compiles all hints out (for measurement).
#ifndef PREFETCH_DIST
#define PREFETCH_DIST 2048
#endif
#ifndef L2_PREFETCH_DIST
#define L2_PREFETCH_DIST 8192
#endif
constexpr int64_t kPrefetchBytes = PREFETCH_DIST;
constexpr int64_t kL2PrefetchBytes = PREFETCH_DIST > 0 ? L2_PREFETCH_DIST : 0;
// The hints for a block's bytes at `a`, one per 64-byte line.
template <class Row>
inline void prefetch_block(const char* a) {
  if constexpr (kPrefetchBytes > 0) {
    for (int64_t o = 0; o < Row::kBlockBytes; o += 64) {
      if constexpr (Row::kPrefetchToL2) _mm_prefetch(a + o, _MM_HINT_T1);
      else _mm_prefetch(a + o, _MM_HINT_T0);
    }
  }
}
template <class Row>
inline void prefetch_ahead(const Row& row, int64_t k) {
  prefetch_block<Row>(row.address(k) + (Row::kPrefetchToL2 ? kL2PrefetchBytes : kPrefetchBytes));
}
// The hints for the block at k of `row` itself (the caller chooses a row that will be read later).
template <class Row>
inline void prefetch_at(const Row& row, int64_t k) { prefetch_block<Row>(row.address(k)); }

// The L1 data cache of the CPUs the kernels are tuned on (AMD Zen 2-5, Intel since Skylake: 32-48 KB), and the bytes
// of activations a chunk of rows_kernel_k_chunks keeps there beside the weights being streamed and its kept chains.
constexpr int64_t kL1Bytes = 32 * 1024;
constexpr int64_t kChunkBytes = 16 * 1024;

struct Problem {
  const float* x;      // (m, k) activations, row stride k
  int64_t m, k, n, group, groups;
  const float* scale;  // (n, groups)
  const float* zero;   // (n, groups) or null
  const float* bias;   // (n,) or null
  float* y;            // (m, n)
  const float* xsum;   // (m, groups) sums of x over each group where the factored kernel needs them, or null
};

// f(std::integral_constant<int, mb>()) for mb in 1 .. kMaxRows: a kernel templated on its row count, chosen per pass.
template <class F>
void with_rows(int64_t mb, F&& f) {
  switch (mb) {
    case 1: f(std::integral_constant<int, 1>()); break;
    case 2: f(std::integral_constant<int, 2>()); break;
    case 3: f(std::integral_constant<int, 3>()); break;
    case 4: f(std::integral_constant<int, 4>()); break;
    case 5: f(std::integral_constant<int, 5>()); break;
    case 6: f(std::integral_constant<int, 6>()); break;
    case 7: f(std::integral_constant<int, 7>()); break;
    default: f(std::integral_constant<int, 8>()); break;
  }
}

// pass(m0, mb, n0, n1) for every pass over the weights (activation rows [m0, m0 + mb), at most kMaxRows), its output
// rows split over torch's threads.
template <class Pass>
void over_passes(const Problem& P, Pass&& pass) {
  // Enough rows per task that each thread streams a long contiguous stretch of weights.
  const int64_t grain = std::max<int64_t>(16, P.n / (4 * at::get_num_threads()));
  for (int64_t m0 = 0; m0 < P.m; m0 += kMaxRows) {
    const int64_t mb = std::min<int64_t>(kMaxRows, P.m - m0);
    at::parallel_for(0, P.n, grain, [&](int64_t n0, int64_t n1) { pass(m0, mb, n0, n1); });
  }
}

inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// The weight kernels (weight_kernels.h) in two instances: AVX2 (this module's flags) and AVX-512 (F/BW/VL/DQ, by a
// target pragma: GCC compiles the functions defined between push_options and pop_options for it), one chosen per
// call by `active_isa` (see Isa). Other compilers, and GCC before 10, build the AVX2 instance only.
#define QG_LANES 8
namespace avx2 {
#include "weight_kernels.h"
}  // namespace avx2
#undef QG_LANES
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 10 && defined(__x86_64__)
#define QG_HAVE_AVX512 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq")
#define QG_LANES 16
namespace avx512 {
#include "weight_kernels.h"
}  // namespace avx512
#undef QG_LANES
#pragma GCC pop_options
#else
#define QG_HAVE_AVX512 0
#endif

// Which instance quant_linear runs: the widest this CPU and its OS support (AVX-512 needs F, BW, VL and DQ, and the
// OS saving the 512-bit registers, which __builtin_cpu_supports checks), unless set_isa chose another. The two give
// the same result up to float32 rounding (their sums are split over 8 or 16 lanes); SmoothQuant's integer product
// gives the same bits in both.
enum class Isa { kAvx2, kAvx512 };

bool cpu_has_avx512() {
#if QG_HAVE_AVX512
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

Isa& active_isa() {
  static Isa isa = cpu_has_avx512() ? Isa::kAvx512 : Isa::kAvx2;
  return isa;
}

void run_format(int64_t format, const Problem& P, const void* w, int64_t stride) {
#if QG_HAVE_AVX512
  if (active_isa() == Isa::kAvx512) return avx512::run_format(format, P, w, stride);
#endif
  avx2::run_format(format, P, w, stride);
}

// Whether the active instance's kernels read the group sums of x in the last pass over the weights (every earlier
// pass has kMaxRows rows): see weight_kernels.h, reads_group_sums.
bool reads_group_sums(int64_t format, bool has_zero, int64_t m, int64_t group) {
  const int64_t last_pass = (m - 1) % kMaxRows + 1;
#if QG_HAVE_AVX512
  if (active_isa() == Isa::kAvx512) return avx512::reads_group_sums(format, has_zero, last_pass, group);
#endif
  return avx2::reads_group_sums(format, has_zero, last_pass, group);
}

void run_int8_activations(const Problem& P, const int16_t* xq, const int8_t* w, float act_scale) {
#if QG_HAVE_AVX512
  if (active_isa() == Isa::kAvx512) return avx512::run_int8_activations(P, xq, w, act_scale);
#endif
  avx2::run_int8_activations(P, xq, w, act_scale);
}

// Sums of x over each group of each row, for the factored kernel (its zero term, and int4's offset): groups of whole
// 32-value blocks, 8 lanes at a time.
std::vector<float> group_sums(const float* x, int64_t m, int64_t k, int64_t group) {
  const int64_t groups = k / group;
  std::vector<float> sums(m * groups, 0.f);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t g = 0; g < groups; ++g) {
      __m256 s = _mm256_setzero_ps();
      for (int64_t j = g * group; j < (g + 1) * group; j += 8) s = _mm256_add_ps(s, _mm256_loadu_ps(x + i * k + j));
      sums[i * groups + g] = hsum(s);
    }
  return sums;
}

// FP8 e4m3 values of 8 floats, as c10::Float8_e4m3fn's conversion rounds them (to nearest, ties to even) after a
// clamp to +-448: below 2^-6 (the subnormals, steps of 2^-9) v * 2^9 is rounded to an integer; from 2^-6 on the
// float32 mantissa is rounded to its top 3 bits. NaN stays NaN.
inline __m256 fp8_e4m3_round(__m256 v) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  // min/max return their second operand where either is NaN: NaN passes through the clamp
  v = _mm256_min_ps(_mm256_set1_ps(448.f), _mm256_max_ps(_mm256_set1_ps(-448.f), v));
  const __m256 a = _mm256_andnot_ps(sign, v);
  const __m256i bits = _mm256_castps_si256(a);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 20), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_and_si256(_mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7FFFF), odd)),
                                           _mm256_set1_epi32(~0xFFFFF));
  const __m256 subnormal = _mm256_mul_ps(
      _mm256_round_ps(_mm256_mul_ps(a, _mm256_set1_ps(512.f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
      _mm256_set1_ps(1.f / 512.f));
  __m256 out = _mm256_blendv_ps(_mm256_castsi256_ps(rounded), subnormal,
                                _mm256_cmp_ps(a, _mm256_set1_ps(1.f / 64.f), _CMP_LT_OQ));
  out = _mm256_or_ps(out, _mm256_and_ps(v, sign));
  return _mm256_blendv_ps(out, v, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
}

// round(v / s) clamped to [-128, 127]: the INT8 activation quantization's integers (round half to even), as floats.
inline __m256 int8_levels(__m256 v, __m256 vs) {
  const __m256 r = _mm256_round_ps(_mm256_div_ps(v, vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm256_min_ps(_mm256_set1_ps(127.f), _mm256_max_ps(_mm256_set1_ps(-128.f), r));
}

// x * prequant, then the activation fake quantization, as the engine's Python path computes them, into `out`
// (m x k floats): 8 values at a time, the rest of a row one at a time (the same float operations either way).
// `out` is a per-thread scratch buffer rather than a new tensor: at batch 1 a tensor's clone costs more than this
// arithmetic (~6 us a call, 120 calls a decode step).
void prepare_activations(const float* x, int64_t m, int64_t k, const float* prequant, float s, int64_t act_kind,
                         float* out) {
  const __m256 vs = _mm256_set1_ps(s);
  for (int64_t i = 0; i < m; ++i) {
    const float* xr = x + i * k;
    float* yr = out + i * k;
    int64_t j = 0;
    for (; j + 8 <= k; j += 8) {
      __m256 v = _mm256_loadu_ps(xr + j);
      if (prequant) v = _mm256_mul_ps(v, _mm256_loadu_ps(prequant + j));
      if (act_kind == 1) {
        v = _mm256_mul_ps(int8_levels(v, vs), vs);
      } else if (act_kind == 2) {
        v = _mm256_mul_ps(fp8_e4m3_round(_mm256_div_ps(v, vs)), vs);
      }
      _mm256_storeu_ps(yr + j, v);
    }
    for (; j < k; ++j) {
      float v = xr[j];
      if (prequant) v = v * prequant[j];
      if (act_kind == 1) {
        v = std::min(std::max(std::nearbyint(v / s), -128.f), 127.f) * s;
      } else if (act_kind == 2) {
        v = std::min(std::max(v / s, -448.f), 448.f);
        v = static_cast<float>(c10::Float8_e4m3fn(v)) * s;
      }
      yr[j] = v;
    }
  }
}

// SmoothQuant's INT8 activations times int8 weights, in integers, as an INT8 GEMM computes them: the activations'
// integers r = clamp(round(x * prequant / act_scale), -128, 127) (the fake quantization's, before its multiply by
// act_scale) times the weights' integers, 16-bit products summed in pairs into 32-bit lanes (vpmaddwd: exact, every
// product at most 2^14), each group's integer sum converted once and multiplied by the group's scale, the row's sum
// by act_scale. The float path multiplies the same values rounded after every product; this one is exact up to those
// last three roundings. At one row it does a sixth of the float path's instructions per weight (no conversion of the
// weights to float), and from three rows on half of the float path's vector-unit work per weight and row.

// r for m rows of k values (k a multiple of 16), as int16 into `out`; false, with `out` incomplete, where an
// activation is NaN (the float path carries NaN through; integers cannot). The division and rounding are
// prepare_activations' (int8_levels), so r * act_scale is its value.
bool quantize_int8_activations(const float* x, int64_t m, int64_t k, const float* prequant, float s, int16_t* out) {
  const __m256 vs = _mm256_set1_ps(s);
  __m256 nan = _mm256_setzero_ps();
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < k; j += 16) {
      __m256i r[2];
      for (int h = 0; h < 2; ++h) {
        __m256 v = _mm256_loadu_ps(x + i * k + j + 8 * h);
        if (prequant) v = _mm256_mul_ps(v, _mm256_loadu_ps(prequant + j + 8 * h));
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        r[h] = _mm256_cvtps_epi32(int8_levels(v, vs));  // integers in [-128, 127]: exact
      }
      // packs interleaves the two registers' 128-bit halves; the permute puts the 16 values back in order
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i * k + j),
                          _mm256_permute4x64_epi64(_mm256_packs_epi32(r[0], r[1]), 0xD8));
    }
  }
  return _mm256_movemask_ps(nan) == 0;
}

// The first n values of a per-thread scratch buffer, starting at a 64-byte boundary, as torch's own tensors do: the
// kernels load activations a whole vector at a time, and an AVX-512 load from an address that is not a multiple of 64
// spans two cache lines. With the buffer where malloc put it (16-byte aligned), int4 with AWQ's pre-quant factor or
// W4A8's FP8 activations and SmoothQuant's integer product took 1.4-1.7x the time at eight rows in some runs of
// `benchmarks/linear_kernels.py` and not in others (2-core AMD EPYC, AVX-512 instance), as the buffer's start moved.
template <class T>
T* aligned_scratch(std::vector<T>& buffer, int64_t n) {
  constexpr std::uintptr_t kAlign = 64;
  buffer.resize(n + kAlign / sizeof(T));
  const auto start = reinterpret_cast<std::uintptr_t>(buffer.data());
  return reinterpret_cast<T*>((start + kAlign - 1) & ~(kAlign - 1));
}

at::Tensor quant_linear(const at::Tensor& x_in, const at::Tensor& weight, int64_t format, int64_t in_features,
                        const at::Tensor& scale, const c10::optional<at::Tensor>& zero,
                        const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& prequant,
                        const c10::optional<at::Tensor>& act_scale, int64_t act_kind) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat, "quant_linear: float32 activations expected");
  TORCH_CHECK(x_in.size(-1) == in_features, "quant_linear: activations have ", x_in.size(-1), " features, weight ",
              in_features);
  TORCH_CHECK(weight.is_contiguous() && scale.is_contiguous() && scale.scalar_type() == at::kFloat,
              "quant_linear: contiguous weight and float32 scale expected");
  const int64_t n = weight.size(0), groups = scale.size(1);
  TORCH_CHECK(scale.size(0) == n && groups > 0 && in_features % groups == 0, "quant_linear: scale shape");
  auto sizes = x_in.sizes().vec();
  const at::Tensor x = x_in.reshape({-1, in_features}).contiguous();
  const int64_t m = x.size(0);
  const float* xp = x.data_ptr<float>();
  const bool pre = prequant.has_value() && prequant->defined();
  const bool act = act_kind != 0 && act_scale.has_value() && act_scale->defined();
  sizes.back() = n;
  at::Tensor y = at::empty({m, n}, x.options());
  const bool has_zero = zero.has_value() && zero->defined();
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_zero) TORCH_CHECK(zero->is_contiguous() && zero->sizes() == scale.sizes(), "quant_linear: zero shape");
  at::Tensor b = has_bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const int64_t group = in_features / groups;
  const int64_t stride = weight.size(1);
  if (format == 0 && act && act_kind == 1 && !has_zero && group % kBlock == 0) {  // SmoothQuant: in integers
    TORCH_CHECK(weight.scalar_type() == at::kChar && stride == in_features, "quant_linear: int8 weight layout");
    const float s = act_scale->data_ptr<float>()[0];
    thread_local std::vector<int16_t> xq_buffer;
    int16_t* xq = aligned_scratch(xq_buffer, m * in_features);
    if (quantize_int8_activations(xp, m, in_features, pre ? prequant->data_ptr<float>() : nullptr, s, xq)) {
      const Problem P{nullptr, m, in_features, n, group, groups, scale.data_ptr<float>(), nullptr,
                      has_bias ? b.data_ptr<float>() : nullptr, y.data_ptr<float>(), nullptr};
      run_int8_activations(P, xq, weight.data_ptr<int8_t>(), s);
      return y.reshape(sizes);
    }
  }
  thread_local std::vector<float> prepared_buffer;
  if (pre || act) {
    float* prepared = aligned_scratch(prepared_buffer, m * in_features);
    prepare_activations(xp, m, in_features, pre ? prequant->data_ptr<float>() : nullptr,
                        act ? act_scale->data_ptr<float>()[0] : 1.f, act ? act_kind : 0, prepared);
    xp = prepared;
  }
  const bool sums = reads_group_sums(format, has_zero, m, group);  // the factored kernel's
  const std::vector<float> xsum = sums ? group_sums(xp, m, in_features, group) : std::vector<float>();
  Problem P{xp, m, in_features, n, group, groups, scale.data_ptr<float>(),
            has_zero ? zero->data_ptr<float>() : nullptr, has_bias ? b.data_ptr<float>() : nullptr,
            y.data_ptr<float>(), sums ? xsum.data() : nullptr};
  if (format == 0) {
    TORCH_CHECK(weight.scalar_type() == at::kChar && stride == in_features, "quant_linear: int8 weight layout");
  } else if (format == 1) {
    TORCH_CHECK(weight.scalar_type() == at::kByte && stride == (in_features + kBlock - 1) / kBlock * (kBlock / 2),
                "quant_linear: int4 weight layout");
  } else if (format == 3) {
    TORCH_CHECK(weight.scalar_type() == at::kFloat && stride == in_features, "quant_linear: float32 weight layout");
  } else if (format == 4 || format == 5) {
    TORCH_CHECK(weight.scalar_type() == (format == 4 ? at::kHalf : at::kBFloat16) && stride == in_features,
                "quant_linear: 16-bit float weight layout");
  } else {
    TORCH_CHECK(format == 2 && weight.scalar_type() == at::kByte && stride == in_features,
                "quant_linear: fp8 weight layout");
  }
  run_format(format, P, weight.data_ptr(), stride);
  return y.reshape(sizes);
}


// RMSNorm of float32 rows: w * (x * rsqrt(mean(x^2) + eps)), the engine's formula in its order of float operations
// (each square and product rounded to float32; the module is built without FMA contraction). The squares are summed
// in double and the sum rounded once: torch sums them in float32 in another order, so the two can differ in the last
// bit of the mean (and then of the output), never more.
at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, "rms_norm: float32 expected");
  const int64_t n = x_in.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == n, "rms_norm: weight of ", n, " values expected");
  at::Tensor x = x_in.contiguous();
  at::Tensor w = weight.contiguous();
  at::Tensor y = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float feps = static_cast<float>(eps);
  const int64_t rows = n ? x.numel() / n : 0;
  // One row is too little work to share between threads (a decode step's rows take a microsecond each).
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = xp + r * n;
      float* yr = yp + r * n;
      double sum = 0.0;
      for (int64_t j = 0; j < n; ++j) sum += static_cast<double>(xr[j] * xr[j]);
      const float mean = static_cast<float>(sum) / static_cast<float>(n);
      const float inv = 1.f / std::sqrt(mean + feps);
      for (int64_t j = 0; j < n; ++j) yr[j] = wp[j] * (xr[j] * inv);
    }
  });
  return y;
}


// silu(a) * b for a gated MLP, a and b the two halves of each row of the fused [fc; gate] projection's output
// (`act_on_second`: silu of the second half, Phi-3's [up; gate] order); one call instead of torch's chunk, silu and
// multiply, ~25 us a layer at batch 1. Bit-identical to F.silu(a) * b: torch's float32 silu is x / (1 + exp(-x)),
// ATen's vectorized exp over runs of `run` values from the start of each row (two of torch's vectors: 16 values
// where torch dispatches to AVX2, 32 where to AVX-512) and std::exp for the rest of the row, and this is the same
// code on the same values (SLEEF's 8-lane exp gives each lane the bits of its 16-lane one).
at::Tensor silu_mul(const at::Tensor& fused_in, bool act_on_second, int64_t run) {
  TORCH_CHECK(fused_in.scalar_type() == at::kFloat, "silu_mul: float32 expected");
  using Vec = at::vec::Vectorized<float>;
  TORCH_CHECK(run > 0 && run % Vec::size() == 0, "silu_mul: a run of whole vectors expected, got ", run);
  const int64_t width = fused_in.size(-1);
  TORCH_CHECK(width % 2 == 0, "silu_mul: the last dim holds two halves, got ", width);
  const int64_t half = width / 2;
  at::Tensor fused = fused_in.contiguous();
  auto sizes = fused.sizes().vec();
  sizes.back() = half;
  at::Tensor y = at::empty(sizes, fused.options());
  const int64_t rows = half ? y.numel() / half : 0;
  const float* src = fused.data_ptr<float>();
  float* dst = y.data_ptr<float>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(half, 1)), [&](int64_t r0, int64_t r1) {
    const Vec one(1.f);
    for (int64_t r = r0; r < r1; ++r) {
      const float* a = src + r * width + (act_on_second ? half : 0);
      const float* b = src + r * width + (act_on_second ? 0 : half);
      float* out = dst + r * half;
      int64_t j = 0;
      for (; j + run <= half; j += run) {
        for (int64_t v = 0; v < run; v += Vec::size()) {
          const Vec x = Vec::loadu(a + j + v);
          ((x / (one + x.neg().exp())) * Vec::loadu(b + j + v)).store(out + j + v);
        }
      }
      for (; j < half; ++j) {
        const float silu = a[j] / (1.f + std::exp(-a[j]));
        out[j] = silu * b[j];
      }
    }
  });
  return y;
}


// Attention of a few query positions per sequence (decode steps) for the engine's plain layer: full rotate-half
// (neox) RoPE on q and k, the KV cache written at each sequence's positions, causal attention over cache positions
// [0, kv_len) with key position <= query position, grouped KV heads. One call does what the Python path does in
// about fifteen ops (view, RoPE, two scatters, SDPA with its mask, the output transpose); the result is laid out as
// the output projection reads it, [B, T, heads * D].
//   qkv [B, T, (heads + 2 * kv_heads) * D] float32 (the fused projection's output); cos, sin [B, 1, T, D];
//   k_cache, v_cache [rows >= B, kv_heads, S, D] float32 (rows may be a view); positions [B, T] int64 < S.
// RoPE rounds as the Python path does (x * cos, rotated * sin, then their sum); scores, softmax and the weighted sum
// of values accumulate in float32 in another order than SDPA's, so results agree to float32 rounding.
inline float dot(const float* a, const float* b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j + 8), _mm256_loadu_ps(b + j + 8), acc1);
  }
  float s = hsum(_mm256_add_ps(acc0, acc1));
  for (; j < n; ++j) s += a[j] * b[j];
  return s;
}

inline void rope(const float* x, const float* c, const float* sn, float* out, int64_t d) {
  const int64_t half = d / 2;
  for (int64_t j = 0; j < half; ++j) out[j] = x[j] * c[j] + (-x[j + half]) * sn[j];
  for (int64_t j = half; j < d; ++j) out[j] = x[j] * c[j] + x[j - half] * sn[j];
}

// scores[j] = q . keys[j] * scale for `n` keys of `d` values: 8 keys at a time, their 8 dot products summed
// together by one transposed reduction (a horizontal sum per key costs as much as its dot product at d = 64).
inline void key_scores(const float* q, const float* keys, int64_t n, int64_t d, float scale, float* scores) {
  const int64_t vec_d = d / 8 * 8;
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    __m256 acc[8];
    for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t e = 0; e < vec_d; e += 8) {
      const __m256 qe = _mm256_loadu_ps(q + e);
      for (int i = 0; i < 8; ++i) acc[i] = _mm256_fmadd_ps(qe, _mm256_loadu_ps(keys + (j + i) * d + e), acc[i]);
    }
    // [sum acc0, ..., sum acc7]: pairwise hadds within 128-bit lanes, then the two lanes added
    const __m256 h01 = _mm256_hadd_ps(acc[0], acc[1]), h23 = _mm256_hadd_ps(acc[2], acc[3]);
    const __m256 h45 = _mm256_hadd_ps(acc[4], acc[5]), h67 = _mm256_hadd_ps(acc[6], acc[7]);
    const __m256 h0123 = _mm256_hadd_ps(h01, h23), h4567 = _mm256_hadd_ps(h45, h67);
    __m256 sums = _mm256_add_ps(_mm256_permute2f128_ps(h0123, h4567, 0x20), _mm256_permute2f128_ps(h0123, h4567, 0x31));
    if (vec_d < d) {
      alignas(32) float tail[8];
      for (int i = 0; i < 8; ++i) {
        float t = 0.f;
        for (int64_t e = vec_d; e < d; ++e) t += q[e] * keys[(j + i) * d + e];
        tail[i] = t;
      }
      sums = _mm256_add_ps(sums, _mm256_load_ps(tail));
    }
    _mm256_storeu_ps(scores + j, _mm256_mul_ps(sums, _mm256_set1_ps(scale)));
  }
  for (; j < n; ++j) scores[j] = dot(q, keys + j * d, d) * scale;
}

// out[0, d) = sum over j < n of p[j] * values[j]: up to 64 output values held in registers across all keys.
inline void weighted_values(const float* p, const float* values, int64_t n, int64_t d, float* out) {
  int64_t e = 0;
  for (; e + 64 <= d; e += 64) {
    __m256 acc[8];
    for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t j = 0; j < n; ++j) {
      const __m256 pj = _mm256_set1_ps(p[j]);
      for (int i = 0; i < 8; ++i) acc[i] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(values + j * d + e + 8 * i), acc[i]);
    }
    for (int i = 0; i < 8; ++i) _mm256_storeu_ps(out + e + 8 * i, acc[i]);
  }
  for (; e + 8 <= d; e += 8) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t j = 0; j < n; ++j) acc = _mm256_fmadd_ps(_mm256_set1_ps(p[j]), _mm256_loadu_ps(values + j * d + e), acc);
    _mm256_storeu_ps(out + e, acc);
  }
  for (; e < d; ++e) {
    float acc = 0.f;
    for (int64_t j = 0; j < n; ++j) acc += p[j] * values[j * d + e];
    out[e] = acc;
  }
}

// scores[j] = exp(scores[j] - top) over n scores, top their max (ATen's vectorized exp, then std::exp for the rest);
// returns the sum of the exponentials.
inline float softmax_numerators(float* scores, int64_t n, float& top) {
  using Vec = at::vec::Vectorized<float>;
  top = -INFINITY;
  for (int64_t j = 0; j < n; ++j) top = std::max(top, scores[j]);
  const Vec vtop(top);
  Vec vsum(0.f);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    const Vec x = (Vec::loadu(scores + j) - vtop).exp();
    x.store(scores + j);
    vsum = vsum + x;
  }
  alignas(32) float lanes[Vec::size()];
  vsum.store(lanes);
  float total = 0.f;
  for (float v : lanes) total += v;
  for (; j < n; ++j) {
    scores[j] = std::exp(scores[j] - top);
    total += scores[j];
  }
  return total;
}

at::Tensor decode_attention(const at::Tensor& qkv_in, const at::Tensor& cos_in, const at::Tensor& sin_in,
                            at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& positions_in, int64_t kv_len,
                            int64_t heads, int64_t kv_heads, double scale) {
  TORCH_CHECK(qkv_in.dim() == 3 && qkv_in.scalar_type() == at::kFloat, "decode_attention: qkv [B, T, H] float32");
  const int64_t b = qkv_in.size(0), t = qkv_in.size(1);
  const int64_t d = qkv_in.size(2) / (heads + 2 * kv_heads);
  TORCH_CHECK(heads % kv_heads == 0 && d * (heads + 2 * kv_heads) == qkv_in.size(2) && d % 2 == 0,
              "decode_attention: qkv width");
  TORCH_CHECK(k_cache.scalar_type() == at::kFloat && v_cache.scalar_type() == at::kFloat && k_cache.dim() == 4 &&
              k_cache.sizes() == v_cache.sizes() && k_cache.size(0) >= b && k_cache.size(1) == kv_heads &&
              k_cache.size(3) == d && k_cache.stride(3) == 1 && k_cache.stride(2) == d &&
              v_cache.strides() == k_cache.strides(), "decode_attention: cache layout");
  const int64_t slots = k_cache.size(2);
  TORCH_CHECK(kv_len >= 1 && kv_len <= slots, "decode_attention: kv_len ", kv_len, " outside the cache's ", slots);
  at::Tensor qkv = qkv_in.contiguous();
  at::Tensor cs = cos_in.to(at::kFloat).contiguous(), sn = sin_in.to(at::kFloat).contiguous();
  at::Tensor positions = positions_in.to(at::kLong).contiguous();
  TORCH_CHECK(cs.numel() == b * t * d && sn.numel() == b * t * d && positions.numel() == b * t,
              "decode_attention: cos/sin [B, 1, T, D] and positions [B, T] expected");
  const float* q_all = qkv.data_ptr<float>();
  const float* cp = cs.data_ptr<float>();
  const float* sp = sn.data_ptr<float>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();
  const int64_t row_stride = k_cache.stride(0), head_stride = k_cache.stride(1);
  const int64_t width = (heads + 2 * kv_heads) * d;
  for (int64_t i = 0; i < b * t; ++i) {
    TORCH_CHECK(pos[i] >= 0 && pos[i] < slots, "decode_attention: position ", pos[i], " outside the cache's ", slots);
  }
  // Keys and values first: a query sees the keys written in this same call at positions up to its own.
  for (int64_t bi = 0; bi < b; ++bi) {
    for (int64_t ti = 0; ti < t; ++ti) {
      const int64_t r = bi * t + ti;
      const float* src = q_all + r * width;
      for (int64_t g = 0; g < kv_heads; ++g) {
        const int64_t at_slot = bi * row_stride + g * head_stride + pos[r] * d;
        rope(src + (heads + g) * d, cp + r * d, sp + r * d, kc + at_slot, d);
        std::copy(src + (heads + kv_heads + g) * d, src + (heads + kv_heads + g + 1) * d, vc + at_slot);
      }
    }
  }
  at::Tensor y = at::empty({b, t, heads * d}, qkv.options());
  float* yp = y.data_ptr<float>();
  const int64_t group = heads / kv_heads;
  const float fscale = static_cast<float>(scale);
  // Work items: a sequence's KV head and a chunk of its keys, for all the query heads that share the KV head, so
  // each key and value is read from memory once (the group's other heads find it in the core's cache) and a long
  // context is shared between threads. Each item leaves, per query, its unnormalized output, its scores' max and the
  // sum of their exponentials; the chunks are merged afterwards (flash-decoding's split over keys).
  const int64_t chunks = (kv_len + kChunkKeys - 1) / kChunkKeys;
  const int64_t part_size = d + 2;
  std::vector<float> partial(b * kv_heads * chunks * t * group * part_size);
  at::parallel_for(0, b * kv_heads * chunks, 1, [&](int64_t w0, int64_t w1) {
    std::vector<float> q(d), scores(kChunkKeys);
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t bi = w / (kv_heads * chunks), g = w / chunks % kv_heads, first = w % chunks * kChunkKeys;
      const float* keys = kc + bi * row_stride + g * head_stride + first * d;
      const float* values = vc + bi * row_stride + g * head_stride + first * d;
      for (int64_t ti = 0; ti < t; ++ti) {
        const int64_t r = bi * t + ti;
        const int64_t visible = std::min(kv_len, pos[r] + 1);  // keys 0 .. position
        const int64_t n = std::min(visible - first, kChunkKeys);
        for (int64_t hq = 0; hq < group; ++hq) {
          float* part = partial.data() + ((w * t + ti) * group + hq) * part_size;
          if (n <= 0) {  // a chunk past this query's position
            part[d] = -INFINITY;
            part[d + 1] = 0.f;
            continue;
          }
          rope(q_all + r * width + (g * group + hq) * d, cp + r * d, sp + r * d, q.data(), d);
          key_scores(q.data(), keys, n, d, fscale, scores.data());
          part[d + 1] = softmax_numerators(scores.data(), n, part[d]);
          weighted_values(scores.data(), values, n, d, part);
        }
      }
    }
  });
  for (int64_t bi = 0; bi < b; ++bi) {
    for (int64_t ti = 0; ti < t; ++ti) {
      for (int64_t h = 0; h < heads; ++h) {
        const int64_t g = h / group, hq = h % group;
        auto part = [&](int64_t c) {
          return partial.data() + ((((bi * kv_heads + g) * chunks + c) * t + ti) * group + hq) * part_size;
        };
        float top = -INFINITY;
        for (int64_t c = 0; c < chunks; ++c) top = std::max(top, part(c)[d]);
        float* out = yp + (bi * t + ti) * heads * d + h * d;
        std::fill(out, out + d, 0.f);
        float total = 0.f;
        for (int64_t c = 0; c < chunks; ++c) {
          const float* pc = part(c);
          if (pc[d + 1] == 0.f) continue;  // no visible keys in this chunk
          const float f = std::exp(pc[d] - top);
          total += f * pc[d + 1];
          for (int64_t e = 0; e < d; ++e) out[e] += f * pc[e];
        }
        const float inv = 1.f / total;
        for (int64_t e = 0; e < d; ++e) out[e] *= inv;
      }
    }
  }
  return y;
}

}  // namespace

// GPTQ's column loop (the converter's pipeline.quantize.algorithms.gptq_quantize) over columns [j0, j1) of one block,
// all in one group: in float64, operation for operation what the Python loop computes (no FMA contraction), once per
// column instead of about ten torch calls. Column j of the block is row j of wb [block, rows]; it is rounded on the
// group's grid (scale, zero [rows]), q[j] = clamp(round(x / scale) + zero, 0, umax) (half to even, as torch.round),
// its error err[j] = (x - (q - zero) * scale) / h[j, j], and h[j, i] * err[j] is subtracted from each later column i
// of the block. Rows are independent: the work is split over them.
void gptq_columns(at::Tensor wb, const at::Tensor& hb, at::Tensor q, at::Tensor errs, const at::Tensor& scale,
                  const at::Tensor& zero, int64_t j0, int64_t j1, int64_t umax) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&wb, &hb, &q, &errs, &scale, &zero})
    TORCH_CHECK(t->scalar_type() == at::kDouble && t->is_contiguous(), "gptq_columns: contiguous float64 tensors");
  const int64_t block = wb.size(0), rows = wb.size(1);
  TORCH_CHECK(hb.size(0) == block && hb.size(1) == block && q.sizes() == wb.sizes() && errs.sizes() == wb.sizes() &&
              scale.numel() == rows && zero.numel() == rows && 0 <= j0 && j0 <= j1 && j1 <= block,
              "gptq_columns: mismatched shapes");
  double* w = wb.data_ptr<double>();
  const double* h = hb.data_ptr<double>();
  double* qo = q.data_ptr<double>();
  double* e = errs.data_ptr<double>();
  const double* s = scale.data_ptr<double>();
  const double* z = zero.data_ptr<double>();
  const double top = static_cast<double>(umax);
  at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t j = j0; j < j1; ++j) {
      const double diag = h[j * block + j];
      const double* x = w + j * rows;
      double* qj = qo + j * rows;
      double* ej = e + j * rows;
      for (int64_t r = r0; r < r1; ++r) {
        double v = std::nearbyint(x[r] / s[r]) + z[r];
        if (!std::isnan(v)) v = std::min(std::max(v, 0.0), top);  // torch.clamp keeps NaN
        qj[r] = v;
        ej[r] = (x[r] - (v - z[r]) * s[r]) / diag;
      }
      for (int64_t i = j + 1; i < block; ++i) {
        const double hv = h[j * block + i];
        double* wi = w + i * rows;
        for (int64_t r = r0; r < r1; ++r) wi[r] -= hv * ej[r];
      }
    }
  });
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> isas{"avx2"};
  if (cpu_has_avx512()) isas.push_back("avx512");
  return isas;
}

std::string isa_name() { return active_isa() == Isa::kAvx512 ? "avx512" : "avx2"; }

void set_isa(const std::string& name) {
  TORCH_CHECK(name == "avx2" || name == "avx512", "set_isa: 'avx2' or 'avx512' expected, got '", name, "'");
  TORCH_CHECK(name == "avx2" || cpu_has_avx512(), "set_isa: this CPU (or its OS) lacks AVX-512 F/BW/VL/DQ");
  active_isa() = name == "avx512" ? Isa::kAvx512 : Isa::kAvx2;
}

// One linear layer's quant_linear arguments, bound once at load (pipeline.runtime: QuantLinear.native_op,
// NativeFloatLinear.native_op), so that decoder_layer takes four of them rather than forty arguments.
struct LinearOp {
  at::Tensor weight, scale;
  int64_t format, in_features, act_kind;
  c10::optional<at::Tensor> zero, bias, prequant, act_scale;
  at::Tensor operator()(const at::Tensor& x) const {
    return quant_linear(x, weight, format, in_features, scale, zero, bias, prequant, act_scale, act_kind);
  }
};

// A pre-norm decoder layer (RMSNorms, attention in decode_attention's case, a gated MLP with silu) at tp 1 for a few
// positions, as DecoderLayer.forward computes it through NativeKernel: the same compiled calls and additions in the
// same order, so the same bits, in one call from Python where the modules make eight calls and about twenty Python
// frames (~40 us a layer at batch 1, a quarter of a decode step of the default model's int4 engine).
at::Tensor decoder_layer(const at::Tensor& x, const at::Tensor& attn_norm, double attn_eps, const LinearOp& qkv,
                         const at::Tensor& cos, const at::Tensor& sin, at::Tensor k_cache, at::Tensor v_cache,
                         const at::Tensor& positions, int64_t kv_len, int64_t heads, int64_t kv_heads, double scale,
                         const LinearOp& dense, const c10::optional<at::Tensor>& dense_bias,
                         const at::Tensor& mlp_norm, double mlp_eps, const LinearOp& fc_gate, bool act_on_second,
                         int64_t run, const LinearOp& proj, const c10::optional<at::Tensor>& proj_bias) {
  at::Tensor y = dense(decode_attention(qkv(rms_norm(x, attn_norm, attn_eps)), cos, sin, k_cache, v_cache, positions,
                                        kv_len, heads, kv_heads, scale));
  if (dense_bias.has_value() && dense_bias->defined()) y = y + *dense_bias;
  const at::Tensor h = x + y;
  at::Tensor m = proj(silu_mul(fc_gate(rms_norm(h, mlp_norm, mlp_eps)), act_on_second, run));
  if (proj_bias.has_value() && proj_bias->defined()) m = m + *proj_bias;
  return h + m;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<LinearOp>(m, "LinearOp", pybind11::module_local())
      .def(pybind11::init([](at::Tensor weight, int64_t format, int64_t in_features, at::Tensor scale,
                             c10::optional<at::Tensor> zero, c10::optional<at::Tensor> bias,
                             c10::optional<at::Tensor> prequant, c10::optional<at::Tensor> act_scale,
                             int64_t act_kind) {
        return LinearOp{weight, scale, format, in_features, act_kind, zero, bias, prequant, act_scale};
      }));
  m.def("decoder_layer", &decoder_layer, "a plain pre-norm decoder layer at decode widths (see quant_gemm.cpp)");
  m.def("quant_linear", &quant_linear, "weight-only quantized linear (see quant_gemm.cpp)");
  m.def("silu_mul", &silu_mul, "silu of one half of each row times the other half (a gated MLP's activation)");
  m.def("rms_norm", &rms_norm, "float32 RMSNorm of the last dim, times weight");
  m.def("decode_attention", &decode_attention, "RoPE, KV-cache write and causal attention for a few positions");
  m.def("gptq_columns", &gptq_columns, "GPTQ's column loop over part of one block, in float64");
  m.def("supported_isas", &supported_isas, "the instruction sets the weight kernels have an instance for on this CPU");
  m.def("isa", &isa_name, "the instruction set quant_linear's weight kernels run now");
  m.def("set_isa", &set_isa, "run the weight kernels' instance for this instruction set ('avx2' or 'avx512')");
}
