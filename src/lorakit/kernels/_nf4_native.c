/* NF4 dequantization on the CPU: a small native kernel for lorakit.quant.nf4.dequantize_nf4.
 *
 * Plain C (no Python or torch headers), loaded with ctypes by lorakit/kernels/nf4_native.py. Built as a
 * setuptools extension (setup.py) only to get it compiled and installed next to the Python files;
 * it is not a Python module.
 *
 * Layout, as lorakit (and bitsandbytes) store NF4: weight i has the 4-bit code of byte i / 2, the
 * HIGH nibble for an even i; block b (`blocksize` weights, even) has the fp32 scale absmax[b].
 * Output i = code[nibble] * absmax[b], multiplied in fp32 and rounded once to the output dtype:
 *   - bf16: round to nearest even; every NaN becomes 0xffff (as torch's CPU conversion);
 *   - fp16: round to nearest even, overflow to inf, subnormals kept, a NaN keeps its sign and the
 *     top of its payload and is made quiet (the F16C instruction, which torch uses on x86).
 *
 * Each block's 16 products code[k] * absmax[b] (the same fp32 multiplications, so the same bits) are
 * formed once and rounded to the output dtype once, and the weights are then table lookups:
 *   AVX-512: the 16 fp32 products fill one zmm (vpermps: 16 lookups per instruction); the 16-bit
 *            products, twice, fill one zmm of 32 words (vpermw: 32 lookups); the nibbles become
 *            indices by shifts, or with VBMI by one vpmultishiftqb;
 *   AVX2:    vpermps on two halves of 8 and a blend on bit 3 (fp32); pshufb on the low and high
 *            bytes of the 16-bit products (bf16/fp16);
 *   scalar:  a 16-entry array.
 * The vector variants are compiled with function target attributes and chosen at run time
 * (__builtin_cpu_supports), so the library is built with portable flags and runs on any x86-64;
 * elsewhere only the scalar code is compiled.
 */

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(_WIN32)
#define LK_EXPORT __declspec(dllexport)
#else
#define LK_EXPORT __attribute__((visibility("default")))
#endif

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define LK_X86 1
#include <immintrin.h>
#define LK_AVX2 __attribute__((target("avx2,fma,f16c")))
#define LK_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))
#define LK_AVX512_VBMI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,avx2,fma,f16c")))
#define LK_INLINE static inline __attribute__((always_inline))
#else
#define LK_X86 0
#endif

enum { LK_F32 = 0, LK_BF16 = 1, LK_F16 = 2 };
enum { LK_SCALAR = 0, LK_ISA_AVX2 = 1, LK_ISA_AVX512 = 2, LK_ISA_AVX512_VBMI = 3 };

/* --- scalar rounding, bit for bit as torch on x86 ---------------------------------------------- */

static uint32_t f32_bits(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    return u;
}

static float bits_f32(uint32_t u) {
    float x;
    memcpy(&x, &u, 4);
    return x;
}

static uint16_t to_bf16(float x) {
    uint32_t u = f32_bits(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0xffff;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static uint16_t to_f16(float x) {
    uint32_t u = f32_bits(x);
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t a = u & 0x7fffffffu;
    uint32_t h;
    if (a >= 0x47800000u) {                       /* >= 65536: inf, NaN (or overflow) */
        h = a > 0x7f800000u ? 0x7e00u | ((a >> 13) & 0x3ffu) : 0x7c00u;
    } else if (a < 0x38800000u) {                 /* below 2^-14: subnormal or zero */
        /* adding 0.5 leaves the fp16 subnormal's bits in the low mantissa, rounded to nearest even
           by the fp32 addition itself */
        float f = bits_f32(a) + 0.5f;
        h = f32_bits(f) - 0x3f000000u;
    } else {                                      /* normal: rebias, round to nearest even */
        uint32_t odd = (a >> 13) & 1u;
        h = (a + 0xc8000fffu + odd) >> 13;        /* 65520 and above carry into 0x7c00 (inf) */
    }
    return (uint16_t)(sign | h);
}

/* --- scalar kernel ------------------------------------------------------------------------------- */

static void dequantize_scalar(int dtype, const uint8_t *packed, const float *absmax, const float *code,
                              int64_t bs, int64_t n, int64_t b0, int64_t b1, void *out) {
    for (int64_t b = b0; b < b1; b++) {
        int64_t start = b * bs;
        int64_t m = n - start < bs ? n - start : bs;
        const uint8_t *p = packed + start / 2;
        float t[16];
        for (int k = 0; k < 16; k++) t[k] = code[k] * absmax[b];
        if (dtype == LK_F32) {
            float *o = (float *)out + start;
            for (int64_t i = 0; i < m / 2; i++) {
                o[2 * i] = t[p[i] >> 4];
                o[2 * i + 1] = t[p[i] & 15];
            }
            if (m & 1) o[m - 1] = t[p[m / 2] >> 4];
        } else {
            uint16_t h[16];
            for (int k = 0; k < 16; k++) h[k] = dtype == LK_BF16 ? to_bf16(t[k]) : to_f16(t[k]);
            uint16_t *o = (uint16_t *)out + start;
            for (int64_t i = 0; i < m / 2; i++) {
                o[2 * i] = h[p[i] >> 4];
                o[2 * i + 1] = h[p[i] & 15];
            }
            if (m & 1) o[m - 1] = h[p[m / 2] >> 4];
        }
    }
}

#if LK_X86

/* --- AVX-512 ------------------------------------------------------------------------------------- */

/* Weight-order indices from packed bytes. vpermps reads bits 0..3 of each dword index and vpermw bits
   0..4 of each word index; the 16-bit tables are stored twice (32 words) so that bit 4 may be anything.
   Plain AVX-512 (F, BW, VL): shifts; with VBMI: one vpmultishiftqb picks each nibble's bits. */

/* 8 bytes -> 16 dword indices: qword j = byte j; its low dword gets byte >> 4 (the high nibble comes
   first), its high dword the byte itself (bits 0..3: the low nibble) */
LK_AVX512 LK_INLINE __m512i idx16_avx512(__m128i bytes) {
    __m512i q = _mm512_cvtepu8_epi64(bytes);
    return _mm512_or_si512(_mm512_srli_epi64(q, 4), _mm512_slli_epi64(q, 32));
}

/* 16 bytes -> 32 word indices: dword j = byte j; its low word byte >> 4, its high word the byte */
LK_AVX512 LK_INLINE __m512i idx32_avx512(__m128i bytes) {
    __m512i d = _mm512_cvtepu8_epi32(bytes);
    return _mm512_or_si512(_mm512_srli_epi32(d, 4), _mm512_slli_epi32(d, 16));
}

/* the same with VBMI: qword j of the broadcast 8 bytes -> dwords 2j, 2j+1 read bits 8j+4 and 8j */
LK_AVX512_VBMI LK_INLINE __m512i idx16_vbmi(__m128i bytes) {
    const __m512i ctl = _mm512_setr_epi64(4 | (0ll << 32), 12 | (8ll << 32), 20 | (16ll << 32), 28 | (24ll << 32),
                                          36 | (32ll << 32), 44 | (40ll << 32), 52 | (48ll << 32), 60 | (56ll << 32));
    return _mm512_multishift_epi64_epi8(ctl, _mm512_broadcastq_epi64(bytes));
}

/* qword j of the zero-extended dwords holds bytes 2j (bits 0..7) and 2j+1 (bits 32..39): its four
   words read bits 4, 0, 36, 32 */
LK_AVX512_VBMI LK_INLINE __m512i idx32_vbmi(__m128i bytes) {
    return _mm512_multishift_epi64_epi8(_mm512_set1_epi64(0x0020002400000004ll), _mm512_cvtepu8_epi32(bytes));
}

/* 16 fp32 products -> 16 bf16 (round to nearest even, NaN -> 0xffff) or fp16 (F16C), twice */
LK_AVX512 LK_INLINE __m512i table16_avx512(__m512 prod, int dtype) {
    __m256i w;
    if (dtype == LK_BF16) {
        __m512i u = _mm512_castps_si512(prod);
        __m512i bias = _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)));
        __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
        r = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(prod, prod, _CMP_ORD_Q), _mm512_set1_epi32(0xffff), r);
        w = _mm512_cvtepi32_epi16(r);
    } else {
        w = _mm512_cvtps_ph(prod, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    }
    return _mm512_inserti64x4(_mm512_castsi256_si512(w), w, 1);
}

/* One block of m weights (m == 64 gets its own, unrolled, copy); the tail of a block through masks. */
#define LK_DEFINE_AVX512(NAME, TARGET, IDX16, IDX32)                                                          \
    TARGET LK_INLINE void NAME##_block_f32(const uint8_t *p, float *o, __m512 t, int64_t m) {                  \
        int64_t i = 0;                                                                                         \
        for (; i + 16 <= m; i += 16)                                                                           \
            _mm512_storeu_ps(o + i, _mm512_permutexvar_ps(IDX16(_mm_loadl_epi64((const __m128i *)(p + i / 2))), t)); \
        if (i < m) {                                                                                           \
            int r = (int)(m - i);                                                                              \
            __m128i bytes = _mm_maskz_loadu_epi8((__mmask16)((1u << ((r + 1) / 2)) - 1), p + i / 2);           \
            _mm512_mask_storeu_ps(o + i, (__mmask16)((1u << r) - 1), _mm512_permutexvar_ps(IDX16(bytes), t));  \
        }                                                                                                      \
    }                                                                                                          \
    TARGET LK_INLINE void NAME##_block_16(const uint8_t *p, uint16_t *o, __m512i t, int64_t m) {               \
        int64_t i = 0;                                                                                         \
        for (; i + 32 <= m; i += 32)                                                                           \
            _mm512_storeu_si512(o + i, _mm512_permutexvar_epi16(IDX32(_mm_loadu_si128((const __m128i *)(p + i / 2))), t)); \
        if (i < m) {                                                                                           \
            int r = (int)(m - i);                                                                              \
            __m128i bytes = _mm_maskz_loadu_epi8((__mmask16)((1u << ((r + 1) / 2)) - 1), p + i / 2);           \
            _mm512_mask_storeu_epi16(o + i, (__mmask32)((1ull << r) - 1), _mm512_permutexvar_epi16(IDX32(bytes), t)); \
        }                                                                                                      \
    }                                                                                                          \
    TARGET static void NAME(int dtype, const uint8_t *packed, const float *absmax, const float *code,          \
                            int64_t bs, int64_t n, int64_t b0, int64_t b1, void *out) {                        \
        __m512 c = _mm512_loadu_ps(code);                                                                      \
        for (int64_t b = b0; b < b1; b++) {                                                                    \
            int64_t start = b * bs;                                                                            \
            int64_t m = n - start < bs ? n - start : bs;                                                       \
            __m512 prod = _mm512_mul_ps(c, _mm512_set1_ps(absmax[b]));                                         \
            if (dtype == LK_F32) {                                                                             \
                if (m == 64)                                                                                   \
                    NAME##_block_f32(packed + start / 2, (float *)out + start, prod, 64);                      \
                else                                                                                           \
                    NAME##_block_f32(packed + start / 2, (float *)out + start, prod, m);                       \
            } else {                                                                                           \
                __m512i t = table16_avx512(prod, dtype);                                                       \
                if (m == 64)                                                                                   \
                    NAME##_block_16(packed + start / 2, (uint16_t *)out + start, t, 64);                       \
                else                                                                                           \
                    NAME##_block_16(packed + start / 2, (uint16_t *)out + start, t, m);                        \
            }                                                                                                  \
        }                                                                                                      \
    }

LK_DEFINE_AVX512(dequantize_avx512, LK_AVX512, idx16_avx512, idx32_avx512)
LK_DEFINE_AVX512(dequantize_avx512_vbmi, LK_AVX512_VBMI, idx16_vbmi, idx32_vbmi)

/* --- AVX2 ---------------------------------------------------------------------------------------- */

/* 4 bytes -> 8 dword indices in weight order (as idx16_avx512) */
LK_AVX2 LK_INLINE __m256i idx8_avx2(const uint8_t *p) {
    int32_t four;
    memcpy(&four, p, 4);
    __m256i q = _mm256_cvtepu8_epi64(_mm_cvtsi32_si128(four));
    return _mm256_or_si256(_mm256_srli_epi64(q, 4), _mm256_slli_epi64(q, 32));
}

LK_AVX2 LK_INLINE __m256 lookup8_avx2(__m256i idx, __m256 lo, __m256 hi) {
    __m256 from_lo = _mm256_permutevar8x32_ps(lo, idx), from_hi = _mm256_permutevar8x32_ps(hi, idx);
    return _mm256_blendv_ps(from_lo, from_hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));  /* bit 3 */
}

LK_AVX2 LK_INLINE void block_f32_avx2(const uint8_t *p, float *o, __m256 lo, __m256 hi, const float *t, int64_t m) {
    int64_t i = 0;
    for (; i + 8 <= m; i += 8) _mm256_storeu_ps(o + i, lookup8_avx2(idx8_avx2(p + i / 2), lo, hi));
    for (; i + 2 <= m; i += 2) {
        o[i] = t[p[i / 2] >> 4];
        o[i + 1] = t[p[i / 2] & 15];
    }
    if (i < m) o[i] = t[p[i / 2] >> 4];
}

/* 16 bytes -> 32 words: nibbles in weight order, then one pshufb on the low and one on the high
   bytes of the 16-entry table */
LK_AVX2 LK_INLINE void lookup32_avx2(const uint8_t *p, uint16_t *o, __m256i tl, __m256i th) {
    const __m128i m0f = _mm_set1_epi8(0x0f);
    __m128i b = _mm_loadu_si128((const __m128i *)p);
    __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), m0f), lo = _mm_and_si128(b, m0f);
    __m256i nib = _mm256_set_m128i(_mm_unpackhi_epi8(hi, lo), _mm_unpacklo_epi8(hi, lo));
    __m256i l = _mm256_shuffle_epi8(tl, nib), h = _mm256_shuffle_epi8(th, nib);
    __m256i w0 = _mm256_unpacklo_epi8(l, h), w1 = _mm256_unpackhi_epi8(l, h); /* lanes: 0-7 16-23 | 8-15 24-31 */
    _mm256_storeu_si256((__m256i *)o, _mm256_permute2x128_si256(w0, w1, 0x20));
    _mm256_storeu_si256((__m256i *)(o + 16), _mm256_permute2x128_si256(w0, w1, 0x31));
}

LK_AVX2 LK_INLINE void block_16_avx2(const uint8_t *p, uint16_t *o, __m256i tl, __m256i th, const uint16_t *t, int64_t m) {
    int64_t i = 0;
    for (; i + 32 <= m; i += 32) lookup32_avx2(p + i / 2, o + i, tl, th);
    for (; i + 2 <= m; i += 2) {
        o[i] = t[p[i / 2] >> 4];
        o[i + 1] = t[p[i / 2] & 15];
    }
    if (i < m) o[i] = t[p[i / 2] >> 4];
}

/* 8 + 8 fp32 products -> 16 words (bf16 or fp16), in order */
LK_AVX2 LK_INLINE __m256i round16_avx2(__m256 a, __m256 b, int dtype) {
    if (dtype == LK_BF16) {
        const __m256i one = _mm256_set1_epi32(1), r7fff = _mm256_set1_epi32(0x7fff), nan = _mm256_set1_epi32(0xffff);
        __m256i ua = _mm256_castps_si256(a), ub = _mm256_castps_si256(b);
        ua = _mm256_srli_epi32(_mm256_add_epi32(ua, _mm256_add_epi32(r7fff, _mm256_and_si256(_mm256_srli_epi32(ua, 16), one))), 16);
        ub = _mm256_srli_epi32(_mm256_add_epi32(ub, _mm256_add_epi32(r7fff, _mm256_and_si256(_mm256_srli_epi32(ub, 16), one))), 16);
        ua = _mm256_blendv_epi8(ua, nan, _mm256_castps_si256(_mm256_cmp_ps(a, a, _CMP_UNORD_Q)));
        ub = _mm256_blendv_epi8(ub, nan, _mm256_castps_si256(_mm256_cmp_ps(b, b, _CMP_UNORD_Q)));
        return _mm256_permute4x64_epi64(_mm256_packus_epi32(ua, ub), 0xd8);
    }
    __m128i ha = _mm256_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m128i hb = _mm256_cvtps_ph(b, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm256_set_m128i(hb, ha);
}

LK_AVX2 static void dequantize_avx2(int dtype, const uint8_t *packed, const float *absmax, const float *code,
                                    int64_t bs, int64_t n, int64_t b0, int64_t b1, void *out) {
    __m256 c_lo = _mm256_loadu_ps(code), c_hi = _mm256_loadu_ps(code + 8);
    /* per 128-bit lane: the low bytes of the 8 words, then their high bytes */
    const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                           0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    for (int64_t b = b0; b < b1; b++) {
        int64_t start = b * bs;
        int64_t m = n - start < bs ? n - start : bs;
        __m256 s = _mm256_set1_ps(absmax[b]);
        __m256 lo = _mm256_mul_ps(c_lo, s), hi = _mm256_mul_ps(c_hi, s);
        if (dtype == LK_F32) {
            float t[16];
            if (m & 7) {  /* the scalar tail's table */
                _mm256_storeu_ps(t, lo);
                _mm256_storeu_ps(t + 8, hi);
            }
            if (m == 64)
                block_f32_avx2(packed + start / 2, (float *)out + start, lo, hi, t, 64);
            else
                block_f32_avx2(packed + start / 2, (float *)out + start, lo, hi, t, m);
        } else {
            __m256i w = round16_avx2(lo, hi, dtype);  /* words 0..15 */
            uint16_t t[16];
            if (m & 31) _mm256_storeu_si256((__m256i *)t, w);
            /* [low bytes 0-7, high bytes 0-7 | low bytes 8-15, high bytes 8-15] -> low 0-15 | high 0-15 */
            __m256i bytes = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(w, split), 0xd8);
            __m256i tl = _mm256_permute2x128_si256(bytes, bytes, 0x00), th = _mm256_permute2x128_si256(bytes, bytes, 0x11);
            if (m == 64)
                block_16_avx2(packed + start / 2, (uint16_t *)out + start, tl, th, t, 64);
            else
                block_16_avx2(packed + start / 2, (uint16_t *)out + start, tl, th, t, m);
        }
    }
}

#endif /* LK_X86 */

/* --- entry points -------------------------------------------------------------------------------- */

/* 1 when this build and this CPU (and its operating system) can run `isa`: 0 scalar, 1 AVX2 (+FMA, F16C),
   2 AVX-512 (F, BW, VL), 3 AVX-512 with VBMI. */
LK_EXPORT int lorakit_nf4_isa_supported(int isa) {
    if (isa == LK_SCALAR) return 1;
#if LK_X86
    __builtin_cpu_init();
    if (isa == LK_ISA_AVX2)
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    if (isa == LK_ISA_AVX512)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && lorakit_nf4_isa_supported(LK_ISA_AVX2);
    if (isa == LK_ISA_AVX512_VBMI)
        return __builtin_cpu_supports("avx512vbmi") && lorakit_nf4_isa_supported(LK_ISA_AVX512);
#endif
    return 0;
}

/* The fastest of those. */
LK_EXPORT int lorakit_nf4_best_isa(void) {
    for (int isa = LK_ISA_AVX512_VBMI; isa > LK_SCALAR; isa--)
        if (lorakit_nf4_isa_supported(isa)) return isa;
    return LK_SCALAR;
}

/* Dequantize blocks [b0, b1) of an n-weight tensor into out (the whole output: element i at out + i).
 * dtype 0 fp32, 1 bf16, 2 fp16; blocksize even and positive; block b covers weights
 * [b * blocksize, min((b + 1) * blocksize, n)); code: the 16 fp32 NF4 values. An `isa` this CPU cannot
 * run falls back to the best one it can (the caller checks lorakit_nf4_isa_supported first). */
LK_EXPORT void lorakit_nf4_dequantize(int isa, int dtype, const uint8_t *packed, const float *absmax,
                                      const float *code, int64_t blocksize, int64_t n, int64_t b0, int64_t b1,
                                      void *out) {
    if (!lorakit_nf4_isa_supported(isa)) isa = lorakit_nf4_best_isa();
#if LK_X86
    if (isa == LK_ISA_AVX512_VBMI) {
        dequantize_avx512_vbmi(dtype, packed, absmax, code, blocksize, n, b0, b1, out);
        return;
    }
    if (isa == LK_ISA_AVX512) {
        dequantize_avx512(dtype, packed, absmax, code, blocksize, n, b0, b1, out);
        return;
    }
    if (isa == LK_ISA_AVX2) {
        dequantize_avx2(dtype, packed, absmax, code, blocksize, n, b0, b1, out);
        return;
    }
#endif
    dequantize_scalar(dtype, packed, absmax, code, blocksize, n, b0, b1, out);
}

#if defined(_WIN32)
/* setuptools builds this as an "extension module" and, on Windows, exports its init symbol; never called */
LK_EXPORT void *PyInit__nf4_native(void) { return NULL; }
#endif
