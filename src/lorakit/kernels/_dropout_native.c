/* Dropout masks drawn from a seed, on the CPU: a small native kernel for lorakit/kernels/dropout.py.
 *
 * Plain C (no Python or torch headers), loaded with ctypes, built as an optional setuptools extension
 * (setup.py) like _nf4_native.c. The Python side computes the same bits with PyTorch where this
 * library is absent (dropout.py: `_words_torch`), so a run does not depend on how lorakit was built.
 *
 * The mask is a counter-based stream, so backward draws it again from the seed instead of keeping
 * it: 32-bit word i of the stream is half of SplitMix64's output number i / 2,
 *
 *     h_j = mix64(seed + (j + 1) * 0x9E3779B97F4A7C15),   word 2j = low 32 bits of h_j,  word 2j + 1 = high 32 bits
 *
 * (mix64: Stafford's variant 13 finalizer, SplitMix64's output function; the stream passes BigCrush),
 * and element i is kept when word i < threshold, threshold = round((1 - p) * 2^32): a keep rate of
 * 1 - p to within 2^-33. The element index is the position in the row-major (tokens, features)
 * tensor, so the mask does not depend on how the work is split over threads.
 *
 * Three loops over [start, stop) of a flat buffer, a block of keep flags at a time (the Python side splits a tensor over threads):
 *   mask:        out[i] = keep(i)                                      (uint8 / bool)
 *   apply:       out[i] = x[i] * (keep(i) ? scale : 0)                 (fp32)
 *   accumulate:  acc[i] = acc[i] + g[i] * (keep(i) ? scale : 0)        (fp32, in place)
 * each product one fp32 multiplication rounded once, as `x * (keep * scale)` in PyTorch and as
 * nn.Dropout on the CPU (a dropped element is x * 0: a zero, or NaN where x is not finite).
 */

#include <stdint.h>

#if defined(_WIN32)
#define LK_EXPORT __declspec(dllexport)
#else
#define LK_EXPORT __attribute__((visibility("default")))
#endif

/* Vector builds of the loops (the 64-bit multiplies vectorize with AVX-512DQ / AVX2), chosen at load
 * time by the dynamic loader; portable code elsewhere. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define LK_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define LK_CLONES
#endif

#define LK_GOLDEN 0x9E3779B97F4A7C15ULL

static inline __attribute__((always_inline)) uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

/* keep[k] = (word first + k < threshold) for k in [0, count), count <= LK_BLOCK: the 64-bit outputs
 * covering the range first (a loop the compiler vectorizes), then their halves in stream order. */
#define LK_BLOCK 512

static inline __attribute__((always_inline)) void keep_block(uint8_t *keep, int64_t first, int64_t count, uint64_t seed, uint64_t threshold) {
    uint64_t h[LK_BLOCK / 2 + 1];
    uint32_t words[LK_BLOCK + 2];
    int64_t j0 = first / 2, pairs = (first + count + 1) / 2 - j0;
    for (int64_t j = 0; j < pairs; j++) h[j] = mix64(seed + (uint64_t)(j0 + j + 1) * LK_GOLDEN);
    for (int64_t j = 0; j < pairs; j++) {
        words[2 * j] = (uint32_t)h[j];
        words[2 * j + 1] = (uint32_t)(h[j] >> 32);
    }
    const uint32_t *w = words + (first - 2 * j0);
    if (threshold > 0xFFFFFFFFULL) {
        for (int64_t k = 0; k < count; k++) keep[k] = 1;
        return;
    }
    uint32_t t = (uint32_t)threshold;
    for (int64_t k = 0; k < count; k++) keep[k] = w[k] < t;
}

LK_EXPORT LK_CLONES void lorakit_dropout_mask(uint8_t *out, int64_t start, int64_t stop, uint64_t seed,
                                              uint64_t threshold) {
    for (int64_t i = start; i < stop; i += LK_BLOCK) {
        int64_t count = stop - i < LK_BLOCK ? stop - i : LK_BLOCK;
        keep_block(out + i, i, count, seed, threshold);
    }
}

LK_EXPORT LK_CLONES void lorakit_dropout_apply_f32(const float *x, float *out, int64_t start, int64_t stop,
                                                   uint64_t seed, uint64_t threshold, float scale) {
    uint8_t keep[LK_BLOCK];
    for (int64_t i = start; i < stop; i += LK_BLOCK) {
        int64_t count = stop - i < LK_BLOCK ? stop - i : LK_BLOCK;
        keep_block(keep, i, count, seed, threshold);
        for (int64_t k = 0; k < count; k++) out[i + k] = x[i + k] * (keep[k] ? scale : 0.0f);
    }
}

LK_EXPORT LK_CLONES void lorakit_dropout_accumulate_f32(const float *g, float *acc, int64_t start, int64_t stop,
                                                        uint64_t seed, uint64_t threshold, float scale) {
    uint8_t keep[LK_BLOCK];
    for (int64_t i = start; i < stop; i += LK_BLOCK) {
        int64_t count = stop - i < LK_BLOCK ? stop - i : LK_BLOCK;
        keep_block(keep, i, count, seed, threshold);
        for (int64_t k = 0; k < count; k++) acc[i + k] = acc[i + k] + g[i + k] * (keep[k] ? scale : 0.0f);
    }
}

/* A version stamp: the Python side refuses a library whose stream could differ from its own. */
LK_EXPORT int lorakit_dropout_version(void) { return 1; }
