// The weight kernels of quant_gemm.cpp, written once for a vector width and included twice by it: in namespace avx2
// (8 float lanes, the module's -mavx2 -mfma -mf16c) and in namespace avx512 (16 lanes, compiled for AVX-512
// F/BW/VL/DQ by a target pragma), one of which quant_linear calls per the CPU (see quant_gemm.cpp: Isa).
// QG_LANES (8 or 16) chooses the width; everything here is in terms of `V`, its vector operations. The avx2 instance
// is the code the module had before the avx512 one was added, operation for operation, so the same bits.
//
// Not a standalone header: quant_gemm.cpp defines Problem, kBlock, kL1Bytes, kChunkBytes, prefetch_ahead,
// prefetch_at, with_rows and over_passes before including it, inside the namespace of each instance.

// One source for both widths: QG_OP names a full-width operation (_mm256_add_ps, _mm512_add_ps), QG_SI a
// full-width integer one (_mm256_and_si256, _mm512_and_si512), QG_HALF and QG_HALF_SI the half-width ones that
// work on the stored bytes before they are widened. What differs in form is written per width below.
#if QG_LANES == 8
#define QG_OP(name) _mm256_##name
#define QG_SI(name) _mm256_##name##_si256
#define QG_HALF(name) _mm_##name
#define QG_HALF_SI(name) _mm_##name##_si128
#define QG_F __m256
#define QG_I __m256i
#elif QG_LANES == 16
#define QG_OP(name) _mm512_##name
#define QG_SI(name) _mm512_##name##_si512
#define QG_HALF(name) _mm256_##name
#define QG_HALF_SI(name) _mm256_##name##_si256
#define QG_F __m512
#define QG_I __m512i
#else
#error "QG_LANES must be 8 or 16"
#endif

struct V {
  using F = QG_F;
  using I = QG_I;
  static constexpr int kLanes = QG_LANES;
  static inline F zero() { return QG_OP(setzero_ps)(); }
  static inline F set1(float v) { return QG_OP(set1_ps)(v); }
  static inline F load(const float* p) { return QG_OP(loadu_ps)(p); }
  static inline void store(float* p, F v) { QG_OP(storeu_ps)(p, v); }
  static inline F add(F a, F b) { return QG_OP(add_ps)(a, b); }
  static inline F sub(F a, F b) { return QG_OP(sub_ps)(a, b); }
  static inline F mul(F a, F b) { return QG_OP(mul_ps)(a, b); }
  static inline F fmadd(F a, F b, F c) { return QG_OP(fmadd_ps)(a, b, c); }
#if QG_LANES == 8
  // kLanes bytes at p (the rest of the register zero), and 2 kLanes bytes
  static inline __m128i bytes(const void* p) { return _mm_loadl_epi64(static_cast<const __m128i*>(p)); }
  static inline __m128i byte_pairs(const void* p) { return _mm_loadu_si128(static_cast<const __m128i*>(p)); }
  static inline float sum(F v) { return hsum(v); }
  static inline int32_t isum(I v) { return hsum_epi32(v); }
  static inline F first_lane(float v) { return _mm256_zextps128_ps256(_mm_set_ss(v)); }
  static inline F bits_as_float(I v) { return _mm256_castsi256_ps(v); }
#else
  static inline __m128i bytes(const void* p) { return _mm_loadu_si128(static_cast<const __m128i*>(p)); }
  static inline __m256i byte_pairs(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
  static inline float sum(F v) { return _mm512_reduce_add_ps(v); }
  static inline int32_t isum(I v) { return _mm512_reduce_add_epi32(v); }
  static inline F first_lane(float v) { return _mm512_zextps128_ps512(_mm_set_ss(v)); }
  static inline F bits_as_float(I v) { return _mm512_castsi512_ps(v); }
#endif
  // A 32-value int4 block (16 bytes, see quant_gemm.cpp: format 1) as its stored values q + 8, in kVecs vectors:
  // each kLanes bytes of the block widened to 32-bit lanes by the load itself (vpmovzxbd); their low nibbles are
  // values 0-15 of the block, the high ones 16-31, and the mask or shift leaves one nibble per lane.
  static inline void int4_offset_values(const uint8_t* p, F w[]) {
    constexpr int kHalf = 16 / kLanes;  // vectors per nibble half of the block
    _Pragma("GCC unroll 2")
    for (int h = 0; h < kHalf; ++h) {
      const I a = QG_OP(cvtepu8_epi32)(bytes(p + kLanes * h));
      w[h] = QG_OP(cvtepi32_ps)(QG_SI(and)(a, QG_OP(set1_epi32)(0x0F)));
      w[kHalf + h] = QG_OP(cvtepi32_ps)(QG_OP(srli_epi32)(a, 4));
    }
  }
  // kLanes int8 values at p as floats (exact)
  static inline F int8_values(const int8_t* p) { return QG_OP(cvtepi32_ps)(QG_OP(cvtepi8_epi32)(bytes(p))); }
  // kLanes e4m3 bytes at p as their values * 2^-8 (see Fp8Row), through the half-precision converter
  static inline F fp8_values(const uint8_t* p) {
    const auto halves = QG_HALF(slli_epi16)(QG_HALF(cvtepi8_epi16)(bytes(p)), 7);
    return QG_OP(cvtph_ps)(QG_HALF_SI(and)(halves, QG_HALF(set1_epi16)(static_cast<short>(0xBFFF))));
  }
  // kLanes IEEE half values at p (2 kLanes bytes) as floats (F16C; exact)
  static inline F half_values(const uint16_t* p) { return QG_OP(cvtph_ps)(byte_pairs(p)); }
  // kLanes bfloat16 values at p as floats: each one's 16 bits are the high half of its float32 bits (exact)
  static inline F bf16_values(const uint16_t* p) {
    return bits_as_float(QG_OP(slli_epi32)(QG_OP(cvtepu16_epi32)(byte_pairs(p)), 16));
  }
  // The integer product of int8_activation_rows: 32 weights as int16, kIntRegs registers of 2 kLanes.
  static constexpr int kIntRegs = 16 / QG_LANES;
  static inline I izero() { return QG_SI(setzero)(); }
  static inline I int8_as_int16(const int8_t* p) { return QG_OP(cvtepi8_epi16)(byte_pairs(p)); }
  static inline I load_int16(const int16_t* p) { return QG_SI(loadu)(reinterpret_cast<const I*>(p)); }
  static inline I madd(I a, I b) { return QG_OP(madd_epi16)(a, b); }
  static inline I iadd(I a, I b) { return QG_OP(add_epi32)(a, b); }
};
#undef QG_OP
#undef QG_SI
#undef QG_HALF
#undef QG_HALF_SI
#undef QG_F
#undef QG_I

constexpr int kVecs = kBlock / V::kLanes;  // vectors per 32-value block

struct Int8Row {
  using T = int8_t;
  const int8_t* p;
  static constexpr float kUnit = 1.0f;
  static constexpr int64_t kBlockBytes = 32;  // bytes of one 32-value block
  static constexpr bool kOffset = false;
  static constexpr bool kPrefetchToL2 = true;  // see quant_gemm.cpp: prefetch_block
  inline void decode(int64_t k, V::F w[kVecs]) const {
    for (int c = 0; c < kVecs; ++c) w[c] = V::int8_values(p + k + V::kLanes * c);
  }
  inline float at(int64_t k) const { return static_cast<float>(p[k]); }
  inline const char* address(int64_t k) const { return reinterpret_cast<const char*>(p + k); }
};

struct Int4Row {
  using T = uint8_t;
  const uint8_t* p;
  static constexpr float kUnit = 1.0f;
  static constexpr int64_t kBlockBytes = 16;  // bytes of one 32-value block
  // The factored kernel multiplies the stored values u = q + 8 (decode_offset) and subtracts 8 * sum(x) per group.
  static constexpr bool kOffset = true;
  static constexpr bool kPrefetchToL2 = false;  // its decode, not its stream, is the slower part
  inline void decode_offset(int64_t k, V::F w[kVecs]) const { V::int4_offset_values(p + k / 2, w); }
  inline void decode(int64_t k, V::F w[kVecs]) const {
    decode_offset(k, w);
    const V::F eight = V::set1(8.f);
    for (int c = 0; c < kVecs; ++c) w[c] = V::sub(w[c], eight);  // exact: small integers
  }
  inline const char* address(int64_t k) const { return reinterpret_cast<const char*>(p + k / 2); }
  inline float at(int64_t k) const {
    const int64_t j = k % kBlock;
    const uint8_t b = p[(k - j) / 2 + (j & 15)];
    return static_cast<float>((j < 16 ? (b & 15) : (b >> 4)) - 8);
  }
};

// e4m3 -> fp16 bits: sign-extend the byte to 16 bits and shift left by 7: sign lands on bit 15, exponent and mantissa
// on bits 7..13 (fp16 exponent bias 15 vs 7: the half value is the e4m3 value * 2^-8, exactly, subnormals included);
// bit 14 then holds a copy of the sign and is cleared. The 2^8 goes into the scale (a power of two: exact).
struct Fp8Row {
  using T = uint8_t;
  const uint8_t* p;
  static constexpr float kUnit = 256.0f;
  static constexpr int64_t kBlockBytes = 32;  // bytes of one 32-value block
  static constexpr bool kOffset = false;
  static constexpr bool kPrefetchToL2 = false;  // its decode, not its stream, is the slower part
  inline void decode(int64_t k, V::F w[kVecs]) const {
    for (int c = 0; c < kVecs; ++c) w[c] = V::fp8_values(p + k + V::kLanes * c);
  }
  inline const char* address(int64_t k) const { return reinterpret_cast<const char*>(p + k); }
  inline float at(int64_t k) const {
    return static_cast<float>(c10::Float8_e4m3fn(p[k], c10::Float8_e4m3fn::from_bits())) / kUnit;
  }
};

// Float32 weights (format 3, scale 1): the same streaming loop as a plain GEMV, for measurement against oneDNN.
struct F32Row {
  using T = float;
  const float* p;
  static constexpr float kUnit = 1.0f;
  static constexpr int64_t kBlockBytes = 128;  // bytes of one 32-value block
  static constexpr bool kOffset = false;
  static constexpr bool kPrefetchToL2 = true;
  inline void decode(int64_t k, V::F w[kVecs]) const {
    for (int c = 0; c < kVecs; ++c) w[c] = V::load(p + k + V::kLanes * c);
  }
  inline float at(int64_t k) const { return p[k]; }
  inline const char* address(int64_t k) const { return reinterpret_cast<const char*>(p + k); }
};

// 16-bit float weights (formats 4 IEEE half, 5 bfloat16; scale 1) of a 16-bit engine's float linears: each weight
// widened to float32 exactly as it is read, so the product is float32 activations times the stored values,
// accumulated in float32 (the engine rounds the output to its dtype once), at half the bytes of float32.
template <bool kBfloat16>
struct Float16Row {
  using T = uint16_t;
  const uint16_t* p;
  static constexpr float kUnit = 1.0f;
  static constexpr int64_t kBlockBytes = 64;  // bytes of one 32-value block
  static constexpr bool kOffset = false;
  static constexpr bool kPrefetchToL2 = true;
  inline void decode(int64_t k, V::F w[kVecs]) const {
    for (int c = 0; c < kVecs; ++c) {
      w[c] = kBfloat16 ? V::bf16_values(p + k + V::kLanes * c) : V::half_values(p + k + V::kLanes * c);
    }
  }
  inline float at(int64_t k) const {
    if constexpr (kBfloat16) return static_cast<float>(c10::BFloat16(p[k], c10::BFloat16::from_bits()));
    else return static_cast<float>(c10::Half(p[k], c10::Half::from_bits()));
  }
  inline const char* address(int64_t k) const { return reinterpret_cast<const char*>(p + k); }
};
using F16Row = Float16Row<false>;
using Bf16Row = Float16Row<true>;

// The block of 32 values at k of `row`, dequantized (times the group's scale vs, plus its zero vz where the problem
// has zeros), times each activation row's values at k, into that row's chains (vector c into chain c % kChains):
// rows_kernel's inner step, shared with rows_kernel_k_chunks so that both compute the same float operations.
template <int B, int kChains, class Row>
inline void dequantized_block_into(const Problem& P, const Row& row, int64_t k, V::F vs, V::F vz, const float* x,
                                   V::F (&acc)[B][kChains]) {
  V::F w[kVecs];
  row.decode(k, w);
  _Pragma("GCC unroll 8")
  for (int c = 0; c < kVecs; ++c) {
    w[c] = V::mul(w[c], vs);
    if (P.zero) w[c] = V::add(w[c], vz);
    _Pragma("GCC unroll 8")
    for (int b = 0; b < B; ++b)
      acc[b][c % kChains] = V::fmadd(w[c], V::load(x + b * P.k + k + V::kLanes * c), acc[b][c % kChains]);
  }
}

// Independent accumulators per activation row of rows_kernel (FMA latency), as many as AVX2's 16 vector registers
// allow; a block has kVecs vectors, and AVX-512's two serve at most two chains. (AVX-512's 32 registers would allow
// two chains from five rows on: 0.96-1.02x the time at eight rows on a 2-core AMD EPYC, not worth a second rule.)
template <int B>
constexpr int kRowChains = std::min(B <= 2 ? 4 : B <= 4 ? 2 : 1, kVecs);

// Rows [n0, n1) of the output for activation rows [m0, m0 + B).
// The loops over activation rows and vectors are unrolled by pragma: GCC otherwise unrolls them after its scalar
// replacement of the accumulator arrays, leaves the arrays on the stack and stores every accumulator on every block
// (a store-to-load round trip in each FMA chain: half the speed at one row). `kWholeBlocks` (every group a whole
// number of 32-value blocks, as for groups of 64 or 128) compiles the kernel without the scalar tail: with the tail's
// code in the group loop GCC moved all eight rows' accumulators to the stack and back at every group.
template <int B, class Row, bool kWholeBlocks>
void rows_kernel(const Problem& P, const typename Row::T* base, int64_t stride, int64_t m0, int64_t n0, int64_t n1) {
  constexpr int kChains = kRowChains<B>;
  const float* x = P.x + m0 * P.k;
  for (int64_t n = n0; n < n1; ++n) {
    const Row row{base + n * stride};
    V::F acc[B][kChains];
    float tail[B];
    _Pragma("GCC unroll 8")
    for (int b = 0; b < B; ++b) {
      tail[b] = 0.f;
      _Pragma("GCC unroll 8")
      for (int c = 0; c < kChains; ++c) acc[b][c] = V::zero();
    }
    for (int64_t g = 0; g < P.groups; ++g) {
      const int64_t k0 = g * P.group, k1 = k0 + P.group;
      const float s = P.scale[n * P.groups + g];
      const float z = P.zero ? P.zero[n * P.groups + g] : 0.f;
      const V::F vs = V::set1(s * Row::kUnit), vz = V::set1(z);
      int64_t k = k0;
      if (kWholeBlocks || k0 % kBlock == 0) {
        for (; k + kBlock <= k1; k += kBlock) {
          prefetch_ahead(row, k);
          dequantized_block_into<B>(P, row, k, vs, vz, x, acc);
        }
      }
      if constexpr (!kWholeBlocks) {
        for (; k < k1; ++k) {
          float w = row.at(k) * (s * Row::kUnit);
          if (P.zero) w = w + z;
          _Pragma("GCC unroll 8")
          for (int b = 0; b < B; ++b) tail[b] += w * x[b * P.k + k];
        }
      }
    }
    _Pragma("GCC unroll 8")
    for (int b = 0; b < B; ++b) {
      V::F a = acc[b][0];
      _Pragma("GCC unroll 8")
      for (int c = 1; c < kChains; ++c) a = V::add(a, acc[b][c]);
      P.y[(m0 + b) * P.n + n] = V::sum(a) + tail[b] + (P.bias ? P.bias[n] : 0.f);
    }
  }
}

// rows_kernel for groups of whole blocks, the inputs in chunks of kChunkValues: each tile of kTile output rows runs
// its rows over one chunk, keeps their chains (kTile x B x kChains vectors, 4 KB at eight rows), then the next chunk.
// A pass's activation rows are read once per output row; where they exceed the 32 KB L1 data cache (eight rows of
// the default model's 1536 MLP inputs: 48 KB) they came from L2 every time, and a chunk of them (16 KB) stays in L1.
// Each (output, activation) row pair takes its blocks in rows_kernel's order into chains kept as they are between
// chunks, so the same bits. Each block's hint prefetches the same block of the row a tile further on: this tile's
// reads jump from row to row a chunk at a time, so a hint ahead in the same row would fetch what the next chunk reads.
// 30 layers of the default model's shapes at eight rows, 2-core AMD EPYC (AVX2), two runs: the (576, 1536) projection
// 0.78-0.92x the time in int4, 0.64-0.69x in int8, 0.80-0.82x in FP8, 0.89-0.91x in float32; at four rows 1.01-1.17x,
// so not used there.
template <int B, class Row>
void rows_kernel_k_chunks(const Problem& P, const typename Row::T* base, int64_t stride, int64_t m0, int64_t n0,
                          int64_t n1) {
  constexpr int kChains = kRowChains<B>;
  constexpr int64_t kChunkValues = kChunkBytes / (B * sizeof(float)) / kBlock * kBlock;
  constexpr int kTile = 16;
  const float* x = P.x + m0 * P.k;
  alignas(64) float kept[kTile][B][kChains][V::kLanes];
  for (int64_t t0 = n0; t0 < n1; t0 += kTile) {
    const int64_t t1 = std::min<int64_t>(t0 + kTile, n1);
    for (int64_t c0 = 0; c0 < P.k; c0 += kChunkValues) {
      const int64_t c1 = std::min(c0 + kChunkValues, P.k);
      for (int64_t n = t0; n < t1; ++n) {
        const Row row{base + n * stride}, next_tile{base + std::min(n + kTile, n1 - 1) * stride};
        V::F acc[B][kChains];
        _Pragma("GCC unroll 8")
        for (int b = 0; b < B; ++b) {
          _Pragma("GCC unroll 8")
          for (int c = 0; c < kChains; ++c) acc[b][c] = c0 == 0 ? V::zero() : V::load(kept[n - t0][b][c]);
        }
        for (int64_t g = c0 / P.group; g * P.group < c1; ++g) {  // the groups this chunk overlaps
          const float s = P.scale[n * P.groups + g];
          const V::F vs = V::set1(s * Row::kUnit), vz = V::set1(P.zero ? P.zero[n * P.groups + g] : 0.f);
          const int64_t k1 = std::min((g + 1) * P.group, c1);
          for (int64_t k = std::max(g * P.group, c0); k < k1; k += kBlock) {
            prefetch_at(next_tile, k);
            dequantized_block_into<B>(P, row, k, vs, vz, x, acc);
          }
        }
        _Pragma("GCC unroll 8")
        for (int b = 0; b < B; ++b) {
          if (c1 < P.k) {
            _Pragma("GCC unroll 8")
            for (int c = 0; c < kChains; ++c) V::store(kept[n - t0][b][c], acc[b][c]);
          } else {
            V::F a = acc[b][0];
            _Pragma("GCC unroll 8")
            for (int c = 1; c < kChains; ++c) a = V::add(a, acc[b][c]);
            P.y[(m0 + b) * P.n + n] = V::sum(a) + 0.f + (P.bias ? P.bias[n] : 0.f);  // rows_kernel's, tail 0
          }
        }
      }
    }
  }
}

// Vector c of a decoded block (step s of its group's steps) times each activation row's values at k, into that row's
// chain (s * kVecs + c) % kChains: the inner loop of rows_kernel_factored and rows_kernel_int4_lookup.
template <int B, int kChains>
inline void fma_into_chains(V::F (&chains)[B][kChains], const V::F (&w)[kVecs], const float* x, int64_t x_stride,
                            int64_t k, int s) {
  _Pragma("GCC unroll 8")
  for (int c = 0; c < kVecs; ++c) {
    _Pragma("GCC unroll 8")
    for (int b = 0; b < B; ++b) {
      V::F& chain = chains[b][(s * kVecs + c) % kChains];
      chain = V::fmadd(w[c], V::load(x + b * x_stride + k + V::kLanes * c), chain);
    }
  }
}

// block(k, s) for each block of group g (k: its first value), kStep blocks a step, then one at a time for the last
// ones; s is the block's place in its step, so that its vector c goes into chain (s * kVecs + c) % kChains (a step
// gives every chain a vector). Each block's weights are prefetched ahead of it.
template <int kStep, class Row, class Block>
inline void over_group_blocks(const Problem& P, const Row& row, int64_t g, int64_t blocks, Block&& block) {
  auto step = [&](int64_t i, auto steps) {
    constexpr int kSteps = decltype(steps)::value;
    _Pragma("GCC unroll 8")
    for (int s = 0; s < kSteps; ++s) {
      const int64_t k = g * P.group + (i + s) * kBlock;
      prefetch_ahead(row, k);
      block(k, s);
    }
  };
  int64_t i = 0;
  _Pragma("GCC unroll 4")
  for (; i + kStep <= blocks; i += kStep) step(i, std::integral_constant<int, kStep>());
  if constexpr (kStep > 1) {
    for (; i < blocks; ++i) step(i, std::integral_constant<int, 1>());
  }
}

// One or two activation rows (decode steps), groups of whole blocks: each group's scale multiplies the group's sum of
// q * x once, and its zero multiplies the group's sum of x (precomputed per call): s * sum(q x) + z * sum(x) is the
// reference's sum((q s + z) x) in exact arithmetic, rounded in another order like any change of summation order. At
// one row the per-weight multiply of rows_kernel is a third of the work of a weight, which is what bounds it there;
// from three rows on a decoded block serves enough rows that rows_kernel's dequantization costs little.
// int4 (Row::kOffset) multiplies the stored values q + 8 and starts each group's sum at -8 * sum(x): one integer
// subtraction fewer per weight, at one row a fifth of the instructions of a weight; the sum is s * (sum((q + 8) x) -
// 8 sum(x)), again the same in exact arithmetic (its rounding error is bounded by a few units of float32 in
// sum(|x|) s, as before).
// `kGroupBlocks` (2 or 4: groups of 64 or 128) fixes the blocks per group at compile time, so that the block loop
// is unrolled into the group's; 0 reads it from the problem.
template <int B, class Row, int kGroupBlocks>
void rows_kernel_factored(const Problem& P, const typename Row::T* base, int64_t stride, int64_t m0, int64_t n0,
                          int64_t n1) {
  // Two independent sums per row: each group starts new ones, so consecutive groups overlap in the core and two
  // chains hide the FMA latency; more would cost vector adds per group. Groups of other sizes (kGroupBlocks 0) are
  // mostly one group per row (per-channel scales: W4A16, W8A16, FP8), a chain as long as the row: at one row four
  // sums keep the FMA units busy (30 layers of the default model's shapes, 2-core AMD EPYC: 0.79x the time with
  // two in int4, 0.89x in int8, 0.94x in FP8; groups of 64 and two rows unchanged).
  constexpr int kChains = (kGroupBlocks == 0 && B == 1) ? 4 : 2;
  // Blocks per step of the block loop, so that each chain gets a vector of every step: 1 where a block has a vector
  // per chain (AVX2's four), 2 at four chains of AVX-512's two vectors a block (an odd last block takes one step).
  constexpr int kStep = kChains > kVecs ? kChains / kVecs : 1;
  const float* x = P.x + m0 * P.k;
  for (int64_t n = n0; n < n1; ++n) {
    const Row row{base + n * stride};
    const float* scale = P.scale + n * P.groups;
    V::F acc[B];
    float zero_term[B];
    _Pragma("GCC unroll 8")
    for (int b = 0; b < B; ++b) {
      acc[b] = V::zero();
      zero_term[b] = 0.f;
    }
    for (int64_t g = 0; g < P.groups; ++g) {
      V::F part[B][kChains];
      _Pragma("GCC unroll 8")
      for (int b = 0; b < B; ++b) {
        _Pragma("GCC unroll 8")
        for (int c = 0; c < kChains; ++c) part[b][c] = V::zero();
        if constexpr (Row::kOffset)  // lane 0 of the first chain starts at -8 * sum(x)
          part[b][0] = V::first_lane(-8.f * P.xsum[(m0 + b) * P.groups + g]);
      }
      over_group_blocks<kStep>(P, row, g, kGroupBlocks ? kGroupBlocks : P.group / kBlock, [&](int64_t k, int s) {
        V::F w[kVecs];
        if constexpr (Row::kOffset) row.decode_offset(k, w);
        else row.decode(k, w);
        fma_into_chains<B, kChains>(part, w, x, P.k, k, s);
      });
      const V::F vs = V::set1(scale[g] * Row::kUnit);
      _Pragma("GCC unroll 8")
      for (int b = 0; b < B; ++b) {
        V::F sum = part[b][0];
        _Pragma("GCC unroll 8")
        for (int c = 1; c < kChains; ++c) sum = V::add(sum, part[b][c]);
        acc[b] = V::fmadd(sum, vs, acc[b]);
      }
      if (P.zero) {
        const float z = P.zero[n * P.groups + g];
        _Pragma("GCC unroll 8")
        for (int b = 0; b < B; ++b) zero_term[b] += z * P.xsum[(m0 + b) * P.groups + g];
      }
    }
    _Pragma("GCC unroll 8")
    for (int b = 0; b < B; ++b) P.y[(m0 + b) * P.n + n] = V::sum(acc[b]) + zero_term[b] + (P.bias ? P.bias[n] : 0.f);
  }
}

// prefetch_ahead for a tile of kTile consecutive rows, which lie in one contiguous stretch of the matrix read kTile
// blocks' bytes per block step (a block from each row): the hints follow that stretch kPrefetchBytes ahead as one
// stream, a hint per line, rather than each row's own stream, whose hints would each cover a quarter of a line.
template <class Row, int kTile>
inline void prefetch_tile_ahead(const typename Row::T* tile, int64_t k) {
  if constexpr (kPrefetchBytes > 0) {
    const char* a = reinterpret_cast<const char*>(tile) + kPrefetchBytes + (k / kBlock) * kTile * Row::kBlockBytes;
    for (int64_t o = 0; o < kTile * Row::kBlockBytes; o += 64) _mm_prefetch(a + o, _MM_HINT_T0);
  }
}

// rows_kernel_factored for int4, kTile output rows at a time (one chain per output row and activation row): each block
// of activations serves the tile's rows, and the tile's independent chains hide the FMA latency where
// rows_kernel_factored gives each row four chains and adds them up per group. Rows past the last whole tile take
// rows_kernel_factored. int4 only (see factored): at one row it is bound by its instructions, not by memory.
template <int B, int kGroupBlocks>
void rows_kernel_int4_factored_tiled(const Problem& P, const uint8_t* base, int64_t stride, int64_t m0, int64_t n0,
                                     int64_t n1) {
  using Row = Int4Row;
  constexpr int kTile = 4;
  const int64_t blocks = kGroupBlocks ? kGroupBlocks : P.group / kBlock;
  const float* x = P.x + m0 * P.k;
  int64_t n = n0;
  for (; n + kTile <= n1; n += kTile) {
    V::F acc[kTile][B];
    float zero_term[kTile][B];
    _Pragma("GCC unroll 8")
    for (int r = 0; r < kTile; ++r) {
      _Pragma("GCC unroll 8")
      for (int b = 0; b < B; ++b) {
        acc[r][b] = V::zero();
        zero_term[r][b] = 0.f;
      }
    }
    for (int64_t g = 0; g < P.groups; ++g) {
      V::F part[kTile][B];
      _Pragma("GCC unroll 8")
      for (int r = 0; r < kTile; ++r) {
        _Pragma("GCC unroll 8")
        for (int b = 0; b < B; ++b) part[r][b] = V::first_lane(-8.f * P.xsum[(m0 + b) * P.groups + g]);  // the offset
      }
      _Pragma("GCC unroll 4")
      for (int64_t i = 0; i < blocks; ++i) {
        const int64_t k = g * P.group + i * kBlock;
        prefetch_tile_ahead<Row, kTile>(base + n * stride, k);
        _Pragma("GCC unroll 8")
        for (int r = 0; r < kTile; ++r) {
          const Row row{base + (n + r) * stride};
          V::F w[kVecs];
          row.decode_offset(k, w);
          _Pragma("GCC unroll 8")
          for (int c = 0; c < kVecs; ++c) {
            _Pragma("GCC unroll 8")
            for (int b = 0; b < B; ++b) part[r][b] = V::fmadd(w[c], V::load(x + b * P.k + k + V::kLanes * c), part[r][b]);
          }
        }
      }
      _Pragma("GCC unroll 8")
      for (int r = 0; r < kTile; ++r) {
        const V::F vs = V::set1(P.scale[(n + r) * P.groups + g] * Row::kUnit);
        _Pragma("GCC unroll 8")
        for (int b = 0; b < B; ++b) acc[r][b] = V::fmadd(part[r][b], vs, acc[r][b]);
        if (P.zero) {
          const float z = P.zero[(n + r) * P.groups + g];
          _Pragma("GCC unroll 8")
          for (int b = 0; b < B; ++b) zero_term[r][b] += z * P.xsum[(m0 + b) * P.groups + g];
        }
      }
    }
    _Pragma("GCC unroll 8")
    for (int r = 0; r < kTile; ++r) {
      _Pragma("GCC unroll 8")
      for (int b = 0; b < B; ++b)
        P.y[(m0 + b) * P.n + n + r] = V::sum(acc[r][b]) + zero_term[r][b] + (P.bias ? P.bias[n + r] : 0.f);
    }
  }
  if (n < n1) rows_kernel_factored<B, Row, kGroupBlocks>(P, base, stride, m0, n, n1);
}

#if QG_LANES == 16
// Output row n's group g as its 16 dequantized values, (u - 8) * s (+ z) for u = 0..15: rows_kernel's operations
// (a multiply, then maybe an add), so each looked-up weight is the float rows_kernel computes.
inline V::F int4_group_table(const Problem& P, int64_t n, int64_t g) {
  const V::F levels = _mm512_setr_ps(-8.f, -7.f, -6.f, -5.f, -4.f, -3.f, -2.f, -1.f, 0.f, 1.f, 2.f, 3.f, 4.f, 5.f,
                                     6.f, 7.f);
  V::F table = V::mul(levels, V::set1(P.scale[n * P.groups + g] * Int4Row::kUnit));
  if (P.zero) table = V::add(table, V::set1(P.zero[n * P.groups + g]));
  return table;
}

// The 32 weights of the int4 block at `bytes` (16 bytes; see quant_gemm.cpp: format 1) looked up in `table`:
// vpermps reads the low 4 bits of each widened byte, so the low nibbles (values 0-15) need no mask and the high ones
// (16-31) a shift.
inline void int4_lookup_block(const uint8_t* bytes, V::F table, V::F (&w)[kVecs]) {
  const V::I u = _mm512_cvtepu8_epi32(V::bytes(bytes));
  w[0] = _mm512_permutexvar_ps(u, table);
  w[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(u, 4), table);
}

// int4 in the AVX-512 instance, groups of whole blocks, any number of rows: a group's weights take only 16 values,
// (u - 8) * s (+ z) for the stored u = q + 8 in 0..15. rows_kernel computes that per weight (a conversion, a
// multiply and maybe an add); here the group's 16 values are computed once into one vector, by the same operations
// in the same order (so each weight is the same float as rows_kernel's), and each weight is looked up in it by its
// nibble (int4_group_table, int4_lookup_block). At one or two rows this also replaces rows_kernel_factored (whose
// per-group sums and offset cost a third of its instructions at groups of 64); from three rows on its chains are
// rows_kernel's, and so are its bits.
template <int B, int kGroupBlocks>
void rows_kernel_int4_lookup(const Problem& P, const uint8_t* base, int64_t stride, int64_t m0, int64_t n0,
                             int64_t n1) {
  // Independent sums per activation row: four at one or two rows (two blocks a step; the FMA latency would bound
  // fewer), rows_kernel's count from three rows on.
  constexpr int kChains = B <= 2 ? 4 : B <= 4 ? 2 : 1;
  constexpr int kStep = kChains > kVecs ? kChains / kVecs : 1;  // blocks per step: a vector for every chain
  const int64_t blocks = kGroupBlocks ? kGroupBlocks : P.group / kBlock;
  const float* x = P.x + m0 * P.k;
  for (int64_t n = n0; n < n1; ++n) {
    const Int4Row row{base + n * stride};
    V::F acc[B][kChains];
    _Pragma("GCC unroll 8")
    for (int b = 0; b < B; ++b) {
      _Pragma("GCC unroll 8")
      for (int c = 0; c < kChains; ++c) acc[b][c] = V::zero();
    }
    for (int64_t g = 0; g < P.groups; ++g) {
      const V::F table = int4_group_table(P, n, g);
      over_group_blocks<kStep>(P, row, g, blocks, [&](int64_t k, int s) {
        V::F w[kVecs];
        int4_lookup_block(row.p + k / 2, table, w);
        fma_into_chains<B, kChains>(acc, w, x, P.k, k, s);
      });
    }
    _Pragma("GCC unroll 8")
    for (int b = 0; b < B; ++b) {
      V::F a = acc[b][0];
      _Pragma("GCC unroll 8")
      for (int c = 1; c < kChains; ++c) a = V::add(a, acc[b][c]);
      P.y[(m0 + b) * P.n + n] = V::sum(a) + 0.f + (P.bias ? P.bias[n] : 0.f);  // rows_kernel's expression, tail 0
    }
  }
}

// rows_kernel_int4_lookup at one or two activation rows, kTile output rows at a time: each block of activations is
// loaded once for the tile's rows, and each output row has its own chains (two at one row, one at two), so the
// tile's rows overlap in the core where one row's chains wait on the FMA latency. Rows past the last whole tile take
// rows_kernel_int4_lookup. 30 layers of the default model's shapes at one row, 2-core AMD EPYC, three runs: 0.72-0.97x
// the time of rows_kernel_int4_lookup (groups of 64 with and without zeros, per-channel scales).
template <int B, int kGroupBlocks>
void rows_kernel_int4_lookup_tiled(const Problem& P, const uint8_t* base, int64_t stride, int64_t m0, int64_t n0,
                                   int64_t n1) {
  constexpr int kTile = 4;
  constexpr int kChains = B == 1 ? 2 : 1;
  const int64_t blocks = kGroupBlocks ? kGroupBlocks : P.group / kBlock;
  const float* x = P.x + m0 * P.k;
  int64_t n = n0;
  for (; n + kTile <= n1; n += kTile) {
    V::F acc[kTile][B][kChains];
    _Pragma("GCC unroll 8")
    for (int r = 0; r < kTile; ++r) {
      _Pragma("GCC unroll 8")
      for (int b = 0; b < B; ++b) {
        _Pragma("GCC unroll 8")
        for (int c = 0; c < kChains; ++c) acc[r][b][c] = V::zero();
      }
    }
    for (int64_t g = 0; g < P.groups; ++g) {
      V::F table[kTile];
      _Pragma("GCC unroll 8")
      for (int r = 0; r < kTile; ++r) table[r] = int4_group_table(P, n + r, g);
      _Pragma("GCC unroll 4")
      for (int64_t i = 0; i < blocks; ++i) {
        const int64_t k = g * P.group + i * kBlock;
        prefetch_tile_ahead<Int4Row, kTile>(base + n * stride, k);
        V::F xv[B][kVecs];
        _Pragma("GCC unroll 8")
        for (int b = 0; b < B; ++b) {
          _Pragma("GCC unroll 8")
          for (int c = 0; c < kVecs; ++c) xv[b][c] = V::load(x + b * P.k + k + V::kLanes * c);
        }
        _Pragma("GCC unroll 8")
        for (int r = 0; r < kTile; ++r) {
          V::F w[kVecs];
          int4_lookup_block(base + (n + r) * stride + k / 2, table[r], w);
          _Pragma("GCC unroll 8")
          for (int b = 0; b < B; ++b) {
            _Pragma("GCC unroll 8")
            for (int c = 0; c < kVecs; ++c) acc[r][b][c % kChains] = V::fmadd(w[c], xv[b][c], acc[r][b][c % kChains]);
          }
        }
      }
    }
    _Pragma("GCC unroll 8")
    for (int r = 0; r < kTile; ++r) {
      _Pragma("GCC unroll 8")
      for (int b = 0; b < B; ++b) {
        V::F a = acc[r][b][0];
        _Pragma("GCC unroll 8")
        for (int c = 1; c < kChains; ++c) a = V::add(a, acc[r][b][c]);
        P.y[(m0 + b) * P.n + n + r] = V::sum(a) + (P.bias ? P.bias[n + r] : 0.f);
      }
    }
  }
  if (n < n1) rows_kernel_int4_lookup<B, kGroupBlocks>(P, base, stride, m0, n, n1);
}
constexpr bool kInt4Lookup = true;
#else
constexpr bool kInt4Lookup = false;
#endif

// f(std::integral_constant<int, G>()) with G the blocks per group of `group` values where that is 2 or 4 (groups of
// 64 or 128: the kernels' group loops unrolled at compile time), else 0 (the kernels read it from the problem).
template <class F>
void with_group_blocks(int64_t group, F&& f) {
  switch (group) {
    case 2 * kBlock: f(std::integral_constant<int, 2>()); break;
    case 4 * kBlock: f(std::integral_constant<int, 4>()); break;
    default: f(std::integral_constant<int, 0>()); break;
  }
}

// rows_kernel_factored for this problem's group size, in tiles of output rows for int4. int8, FP8 and float32 weights
// stream at one row about as fast as memory delivers them, and tiles made float32 1.15-1.33x slower, int8 and FP8
// 0.97-1.15x; int4's decode costs more instructions per byte (30 layers of the default model's shapes at one row,
// 2-core AMD EPYC, AVX2 instance, three runs: 0.79-0.96x the time).
template <int B, class Row>
void factored(const Problem& P, const typename Row::T* w, int64_t stride, int64_t m0, int64_t n0, int64_t n1) {
  with_group_blocks(P.group, [&](auto group_blocks) {
    constexpr int G = decltype(group_blocks)::value;
    if constexpr (std::is_same_v<Row, Int4Row>) rows_kernel_int4_factored_tiled<B, G>(P, w, stride, m0, n0, n1);
    else rows_kernel_factored<B, Row, G>(P, w, stride, m0, n0, n1);
  });
}

// rows_kernel_int4_lookup for this problem's group size, in tiles of output rows at one or two rows (the AVX-512
// instance only: see kInt4Lookup).
template <int B>
void int4_lookup(const Problem& P, const uint8_t* w, int64_t stride, int64_t m0, int64_t n0, int64_t n1) {
#if QG_LANES == 16
  with_group_blocks(P.group, [&](auto group_blocks) {
    constexpr int G = decltype(group_blocks)::value;
    if constexpr (B <= 2) rows_kernel_int4_lookup_tiled<B, G>(P, w, stride, m0, n0, n1);
    else rows_kernel_int4_lookup<B, G>(P, w, stride, m0, n0, n1);
  });
#endif
}

// The kernel for `mb` (1 to 8) activation rows: int4 by lookup where this instance has it and groups are whole
// blocks (in tiles of output rows at one or two rows), else rows_kernel_factored at one or two rows where groups are
// whole blocks (int4 in tiles), rows_kernel_k_chunks from five rows on where the pass's activations outgrow the L1
// cache and groups are whole blocks, rows_kernel otherwise.
template <class Row, bool kWholeBlocks>
void rows(const Problem& P, const typename Row::T* w, int64_t stride, int64_t m0, int64_t n0, int64_t n1, int64_t mb) {
  with_rows(mb, [&](auto rows) {
    constexpr int B = decltype(rows)::value;
    if constexpr (kWholeBlocks && kInt4Lookup && std::is_same_v<Row, Int4Row>) int4_lookup<B>(P, w, stride, m0, n0, n1);
    else if constexpr (kWholeBlocks && B <= 2) factored<B, Row>(P, w, stride, m0, n0, n1);
    else if constexpr (kWholeBlocks && B > 4) {
      if (B * P.k * static_cast<int64_t>(sizeof(float)) > kL1Bytes) rows_kernel_k_chunks<B, Row>(P, w, stride, m0, n0, n1);
      else rows_kernel<B, Row, true>(P, w, stride, m0, n0, n1);
    } else rows_kernel<B, Row, kWholeBlocks>(P, w, stride, m0, n0, n1);
  });
}

// Whether `rows` reads Problem::xsum in a pass of `mb` rows of weights of `format`: rows_kernel_factored does (its
// zero term, and int4's offset); rows_kernel and the int4 lookup do not.
inline bool reads_group_sums(int64_t format, bool has_zero, int64_t mb, int64_t group) {
  if (mb > 2 || group % kBlock != 0) return false;
  return format == 1 ? !kInt4Lookup : has_zero;
}

template <class Row>
void run(const Problem& P, const typename Row::T* w, int64_t stride) {
  const bool whole_blocks = P.group % kBlock == 0;
  over_passes(P, [&](int64_t m0, int64_t mb, int64_t n0, int64_t n1) {
    if (whole_blocks) rows<Row, true>(P, w, stride, m0, n0, n1, mb);
    else rows<Row, false>(P, w, stride, m0, n0, n1, mb);
  });
}

// y = x W^T for weights of `format` (0 int8, 1 int4, 2 fp8, 3 float32, 4 half, 5 bfloat16; see quant_gemm.cpp),
// layouts checked by the caller.
void run_format(int64_t format, const Problem& P, const void* w, int64_t stride) {
  switch (format) {
    case 0: run<Int8Row>(P, static_cast<const int8_t*>(w), stride); break;
    case 1: run<Int4Row>(P, static_cast<const uint8_t*>(w), stride); break;
    case 2: run<Fp8Row>(P, static_cast<const uint8_t*>(w), stride); break;
    case 4: run<F16Row>(P, static_cast<const uint16_t*>(w), stride); break;
    case 5: run<Bf16Row>(P, static_cast<const uint16_t*>(w), stride); break;
    default: run<F32Row>(P, static_cast<const float*>(w), stride); break;
  }
}

// Output rows [n0, n1) for activation rows [m0, m0 + B) of SmoothQuant's integer product (xq: the rows' r, k per
// row; groups of whole 32-value blocks; see quant_gemm.cpp: quantize_int8_activations). One 32-bit sum per row: each
// block adds its vpmaddwd results to it, so its chain is one integer add long per step. The sums are exact, so both
// instances give the same bits.
template <int B>
void int8_activation_rows(const Problem& P, const int16_t* xq, const int8_t* base, float act_scale, int64_t m0,
                          int64_t n0, int64_t n1) {
  constexpr int kPer = kBlock / V::kIntRegs;  // int16 values per register
  const int64_t blocks = P.group / kBlock;
  const int16_t* x = xq + m0 * P.k;
  for (int64_t n = n0; n < n1; ++n) {
    const Int8Row row{base + n * P.k};
    float sum[B];
    _Pragma("GCC unroll 8")
    for (int b = 0; b < B; ++b) sum[b] = 0.f;
    for (int64_t g = 0; g < P.groups; ++g) {
      V::I acc[B];
      _Pragma("GCC unroll 8")
      for (int b = 0; b < B; ++b) acc[b] = V::izero();
      for (int64_t i = 0; i < blocks; ++i) {
        const int64_t k = (g * blocks + i) * kBlock;
        prefetch_ahead(row, k);
        V::I w[V::kIntRegs];
        _Pragma("GCC unroll 2")
        for (int r = 0; r < V::kIntRegs; ++r) w[r] = V::int8_as_int16(row.p + k + kPer * r);
        _Pragma("GCC unroll 8")
        for (int b = 0; b < B; ++b) {
          const int16_t* xb = x + b * P.k + k;
          V::I p = V::madd(w[0], V::load_int16(xb));
          _Pragma("GCC unroll 2")
          for (int r = 1; r < V::kIntRegs; ++r) p = V::iadd(p, V::madd(w[r], V::load_int16(xb + kPer * r)));
          acc[b] = V::iadd(acc[b], p);
        }
      }
      const float s = P.scale[n * P.groups + g];
      _Pragma("GCC unroll 8")
      for (int b = 0; b < B; ++b) sum[b] += static_cast<float>(V::isum(acc[b])) * s;
    }
    _Pragma("GCC unroll 8")
    for (int b = 0; b < B; ++b) P.y[(m0 + b) * P.n + n] = sum[b] * act_scale + (P.bias ? P.bias[n] : 0.f);
  }
}

void run_int8_activations(const Problem& P, const int16_t* xq, const int8_t* w, float act_scale) {
  over_passes(P, [&](int64_t m0, int64_t mb, int64_t n0, int64_t n1) {
    with_rows(mb, [&](auto rows) { int8_activation_rows<decltype(rows)::value>(P, xq, w, act_scale, m0, n0, n1); });
  });
}
