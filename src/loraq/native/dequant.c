/* Blockwise dequantization, one pass: out[i] = code[q_i] * absmax[i / blocksize].
 *
 * The product is one IEEE float32 multiply and the bfloat16 output rounds it to nearest even,
 * so every result equals the pure-PyTorch reference in loraq.quant.blockwise bit for bit.
 * Each call covers the whole blocks [first_block, last_block). Built with -fopenmp (only where
 * the process already runs PyTorch's libgomp, so these loops share PyTorch's thread pool) a call
 * splits its blocks across that pool itself; otherwise the caller splits a tensor across threads.
 * 4-bit codes are packed two per byte, the even element in the high nibble.
 */
#include <stdint.h>
#include <string.h>

/* Below this many elements a call runs on one thread: waking the pool costs more. */
#define PARALLEL_MIN_ELEMENTS 65536
#ifdef _OPENMP
int loraq_openmp(void) { return 1; }
#else
int loraq_openmp(void) { return 0; }
#endif

#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

static inline uint16_t to_bf16(float x) {
    uint32_t bits;
    memcpy(&bits, &x, 4);
    return (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

#ifdef __AVX2__
/* 8 float32 code values for the 8 nibbles of 4 bytes (high nibble first). */
static inline __m256 lookup8(const uint8_t* p, __m256 lo_tab, __m256 hi_tab) {
    uint32_t four;
    memcpy(&four, p, 4);
    const __m128i dup = _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, -1, -1, -1, -1, -1, -1, -1, -1);
    __m256i v = _mm256_cvtepu8_epi32(_mm_shuffle_epi8(_mm_cvtsi32_si128((int)four), dup));
    const __m256i shifts = _mm256_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0);
    __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(v, shifts), _mm256_set1_epi32(15));
    __m256 lo = _mm256_permutevar8x32_ps(lo_tab, idx);
    __m256 hi = _mm256_permutevar8x32_ps(hi_tab, idx);
    return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

static inline void store_bf16(uint16_t* out, __m256 val) {
    __m256i bits = _mm256_castps_si256(val);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    bits = _mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF)));
    bits = _mm256_srli_epi32(bits, 16);
    __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1));
    _mm_storeu_si128((__m128i*)out, packed);
}

/* A block's 16 code values times its scale, rounded to bfloat16 once, as two 16-byte tables
 * (low bytes, high bytes) for byte shuffles: the same bits as rounding each product. */
static inline void bf16_tables(__m256 lo_tab, __m256 hi_tab, float s, __m128i* low, __m128i* high) {
    __m256 scale = _mm256_set1_ps(s);
    __m256i a = _mm256_castps_si256(_mm256_mul_ps(lo_tab, scale));
    __m256i b = _mm256_castps_si256(_mm256_mul_ps(hi_tab, scale));
    const __m256i one = _mm256_set1_epi32(1), half = _mm256_set1_epi32(0x7FFF);
    a = _mm256_srli_epi32(_mm256_add_epi32(a, _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(a, 16), one), half)), 16);
    b = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(b, 16), one), half)), 16);
    /* packus per lane gives [a0-3 b0-3 | a4-7 b4-7]; reorder the quads to codes 0..15 */
    __m256i p = _mm256_permute4x64_epi64(_mm256_packus_epi32(a, b), _MM_SHUFFLE(3, 1, 2, 0));
    const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                           0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    p = _mm256_shuffle_epi8(p, split);
    __m128i c0 = _mm256_castsi256_si128(p), c1 = _mm256_extracti128_si256(p, 1);
    *low = _mm_unpacklo_epi64(c0, c1);
    *high = _mm_unpackhi_epi64(c0, c1);
}

/* 16 bfloat16 values for the 16 nibbles of 8 bytes (high nibble first). */
static inline void store16_bf16(uint16_t* out, const uint8_t* p, __m128i low, __m128i high) {
    const __m128i m = _mm_set1_epi8(15);
    __m128i bytes = _mm_loadl_epi64((const __m128i*)p);
    __m128i idx = _mm_unpacklo_epi8(_mm_and_si128(_mm_srli_epi16(bytes, 4), m), _mm_and_si128(bytes, m));
    __m128i lo = _mm_shuffle_epi8(low, idx), hi = _mm_shuffle_epi8(high, idx);
    _mm_storeu_si128((__m128i*)out, _mm_unpacklo_epi8(lo, hi));
    _mm_storeu_si128((__m128i*)(out + 8), _mm_unpackhi_epi8(lo, hi));
}
#endif

/* Elements [start, stop) of one block with scale s. dtype: 0 = float32, 1 = bfloat16 */
static inline void dequant4_block(const uint8_t* packed, const float* code, float s,
                                  int64_t start, int64_t stop, void* out, int dtype) {
    float* out32 = (float*)out;
    uint16_t* out16 = (uint16_t*)out;
    int64_t i = start;
#ifdef __AVX2__
    __m256 lo_tab = _mm256_loadu_ps(code), hi_tab = _mm256_loadu_ps(code + 8);
    if (dtype == 1 && stop - start >= 32) {
        __m128i low, high;
        bf16_tables(lo_tab, hi_tab, s, &low, &high);
        for (; i + 16 <= stop; i += 16)
            store16_bf16(out16 + i, packed + i / 2, low, high);
    }
    __m256 scale = _mm256_set1_ps(s);
    for (; i + 8 <= stop; i += 8) {
        __m256 val = _mm256_mul_ps(lookup8(packed + i / 2, lo_tab, hi_tab), scale);
        if (dtype == 0)
            _mm256_storeu_ps(out32 + i, val);
        else
            store_bf16(out16 + i, val);
    }
#endif
    for (; i < stop; i++) {
        uint8_t byte = packed[i >> 1];
        float v = code[(i & 1) ? (byte & 15) : (byte >> 4)] * s;
        if (dtype == 0)
            out32[i] = v;
        else
            out16[i] = to_bf16(v);
    }
}

void loraq_dequant4(const uint8_t* packed, const float* absmax, const float* code,
                    int64_t blocksize, int64_t n, int64_t first_block, int64_t last_block,
                    void* out, int dtype) {
    #pragma omp parallel for schedule(static) if ((last_block - first_block) * blocksize >= PARALLEL_MIN_ELEMENTS)
    for (int64_t b = first_block; b < last_block; b++) {
        int64_t start = b * blocksize;
        int64_t stop = start + blocksize < n ? start + blocksize : n;
        dequant4_block(packed, code, absmax[b], start, stop, out, dtype);
    }
}

/* Double quantization: block b's scale is nested_code[absmax_codes[b]] * nested_absmax[b / nb]
 * + offset, a product and a sum rounded separately (built with -ffp-contract=off: no FMA),
 * computed on the fly instead of in a separate pass over a float32 scale array. */
void loraq_dequant4_nested(const uint8_t* packed, const uint8_t* absmax_codes,
                           const float* nested_code, const float* nested_absmax,
                           int64_t nested_blocksize, float offset, const float* code,
                           int64_t blocksize, int64_t n, int64_t first_block, int64_t last_block,
                           void* out, int dtype) {
    #pragma omp parallel for schedule(static) if ((last_block - first_block) * blocksize >= PARALLEL_MIN_ELEMENTS)
    for (int64_t b = first_block; b < last_block; b++) {
        int64_t start = b * blocksize;
        int64_t stop = start + blocksize < n ? start + blocksize : n;
        float scaled = nested_code[absmax_codes[b]] * nested_absmax[b / nested_blocksize];
        dequant4_block(packed, code, scaled + offset, start, stop, out, dtype);
    }
}

void loraq_dequant8(const uint8_t* codes, const float* absmax, const float* code,
                    int64_t blocksize, int64_t n, int64_t first_block, int64_t last_block,
                    void* out, int dtype) {
    float* out32 = (float*)out;
    uint16_t* out16 = (uint16_t*)out;
    #pragma omp parallel for schedule(static) if ((last_block - first_block) * blocksize >= PARALLEL_MIN_ELEMENTS)
    for (int64_t b = first_block; b < last_block; b++) {
        int64_t start = b * blocksize;
        int64_t stop = start + blocksize < n ? start + blocksize : n;
        float s = absmax[b];
        int64_t i = start;
#ifdef __AVX2__
        __m256 scale = _mm256_set1_ps(s);
        for (; i + 8 <= stop; i += 8) {
            uint64_t eight;
            memcpy(&eight, codes + i, 8);
            __m256i idx = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)eight));
            __m256 val = _mm256_mul_ps(_mm256_i32gather_ps(code, idx, 4), scale);
            if (dtype == 0)
                _mm256_storeu_ps(out32 + i, val);
            else
                store_bf16(out16 + i, val);
        }
#endif
        for (; i < stop; i++) {
            float v = code[codes[i]] * s;
            if (dtype == 0)
                out32[i] = v;
            else
                out16[i] = to_bf16(v);
        }
    }
}

/* GGUF blocks of 32 elements (see loraq.quant.gguf): kind 0 = q8_0 (d, 32 x int8),
 * 1 = q4_0 (d, 16 bytes: element j low nibble of byte j, j + 16 its high nibble; (q - 8) * d),
 * 2 = q4_1 (d, m, nibbles as q4_0; q * d + m, a multiply then an add: never fused, the build
 * passes -ffp-contract=off). d and m are little-endian float16. Blocks [first, last) of
 * `blocks` go to out[32 * b ...]; every value equals gguf.quants' float32 result. */
static inline float half_to_float(const uint8_t* p) {
    uint16_t h = (uint16_t)(p[0] | (p[1] << 8));
#ifdef __F16C__
    /* the hardware conversion: exact, as the branches below (a signalling NaN comes back quiet) */
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu;
    uint32_t bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            exp = 113;
            while ((mant & 0x400u) == 0) {
                mant <<= 1;
                exp--;
            }
            bits = sign | (exp << 23) | ((mant & 0x3FFu) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7F800000u | (mant << 13);
    } else {
        bits = sign | ((exp + 112) << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

void loraq_dequant_gguf(const uint8_t* blocks, int kind, int64_t first_block, int64_t last_block,
                        void* out, int dtype) {
    static const int64_t sizes[3] = {34, 18, 20};
    #pragma omp parallel for schedule(static) if ((last_block - first_block) * 32 >= PARALLEL_MIN_ELEMENTS)
    for (int64_t b = first_block; b < last_block; b++) {
        float vals[32];
        const uint8_t* p = blocks + b * sizes[kind];
        float d = half_to_float(p);
        if (kind == 0) {
            const int8_t* q = (const int8_t*)(p + 2);
            for (int j = 0; j < 32; j++) vals[j] = (float)q[j] * d;
        } else if (kind == 1) {
            for (int j = 0; j < 16; j++) {
                vals[j] = ((float)(p[2 + j] & 15) - 8.0f) * d;
                vals[j + 16] = ((float)(p[2 + j] >> 4) - 8.0f) * d;
            }
        } else {
            float m = half_to_float(p + 2);
            for (int j = 0; j < 16; j++) {
                float lo = (float)(p[4 + j] & 15) * d, hi = (float)(p[4 + j] >> 4) * d;
                vals[j] = lo + m;
                vals[j + 16] = hi + m;
            }
        }
        if (dtype == 0) {
            memcpy((float*)out + b * 32, vals, sizeof vals);
        } else {
            uint16_t* o = (uint16_t*)out + b * 32;
            for (int j = 0; j < 32; j++) o[j] = to_bf16(vals[j]);
        }
    }
}

/* y = x W^T for a few rows of x, W given as GGUF blocks (kinds as loraq_dequant_gguf), read
 * packed inside the dot products: each block is decoded into registers (the same float32 values
 * loraq_dequant_gguf writes), never to memory, so a decode step moves the blocks' bytes once
 * instead of writing and re-reading a dense copy. x: float32 (rows, in_features), contiguous;
 * y: float32 (rows, out_features). in_features is a multiple of 32. Output row o is computed by
 * one thread; rows of x go in groups of MATMUL_GROUP, each block decoded once per group.
 * The sums are in a different order than a BLAS matmul's: equal within float32 rounding. */
#define MATMUL_GROUP 8

static inline void decode_block(const uint8_t* p, int kind, float* w) {
    float d = half_to_float(p);
    if (kind == 0) {
        const int8_t* q = (const int8_t*)(p + 2);
        for (int j = 0; j < 32; j++) w[j] = (float)q[j] * d;
    } else if (kind == 1) {
        for (int j = 0; j < 16; j++) {
            w[j] = ((float)(p[2 + j] & 15) - 8.0f) * d;
            w[j + 16] = ((float)(p[2 + j] >> 4) - 8.0f) * d;
        }
    } else {
        float m = half_to_float(p + 2);
        for (int j = 0; j < 16; j++) {
            float lo = (float)(p[4 + j] & 15) * d, hi = (float)(p[4 + j] >> 4) * d;
            w[j] = lo + m;
            w[j + 16] = hi + m;
        }
    }
}

#if defined(__AVX512F__)
/* The block's 32 values as two vectors of 16 (elements 0-15, 16-31): the same products and sums
 * as decode_block, so the same float32 values. */
static inline void decode_block16(const uint8_t* p, int kind, __m512* w) {
    __m512 d = _mm512_set1_ps(half_to_float(p));
    if (kind == 0) {
        for (int k = 0; k < 2; k++) {
            __m128i q = _mm_loadu_si128((const __m128i*)(p + 2 + 16 * k));
            w[k] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)), d);
        }
        return;
    }
    const uint8_t* q = p + (kind == 1 ? 2 : 4);
    __m128i bytes = _mm_loadu_si128((const __m128i*)q), m15 = _mm_set1_epi8(15);
    __m128i lo = _mm_and_si128(bytes, m15), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), m15);
    __m512 v[2] = {
        _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)),
        _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)),
    };
    if (kind == 1) {
        __m512 eight = _mm512_set1_ps(8.0f);
        for (int k = 0; k < 2; k++) w[k] = _mm512_mul_ps(_mm512_sub_ps(v[k], eight), d);
    } else {
        __m512 m = _mm512_set1_ps(half_to_float(p + 2));
        for (int k = 0; k < 2; k++) w[k] = _mm512_add_ps(_mm512_mul_ps(v[k], d), m);
    }
}
#endif

#if defined(__AVX2__) && defined(__FMA__)
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* The block's 32 values as four vectors of 8 (elements 0-7, 8-15, 16-23, 24-31). */
static inline void decode_block8(const uint8_t* p, int kind, __m256* w) {
    __m256 d = _mm256_set1_ps(half_to_float(p));
    if (kind == 0) {
        for (int k = 0; k < 4; k++) {
            __m128i q = _mm_loadl_epi64((const __m128i*)(p + 2 + 8 * k));
            w[k] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), d);
        }
        return;
    }
    const uint8_t* q = p + (kind == 1 ? 2 : 4);
    __m128i bytes = _mm_loadu_si128((const __m128i*)q), m15 = _mm_set1_epi8(15);
    __m128i lo = _mm_and_si128(bytes, m15), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), m15);
    __m256 v[4] = {
        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)),
        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))),
        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)),
        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))),
    };
    if (kind == 1) {
        __m256 eight = _mm256_set1_ps(8.0f);
        for (int k = 0; k < 4; k++) w[k] = _mm256_mul_ps(_mm256_sub_ps(v[k], eight), d);
    } else {
        __m256 m = _mm256_set1_ps(half_to_float(p + 2));
        for (int k = 0; k < 4; k++) w[k] = _mm256_add_ps(_mm256_mul_ps(v[k], d), m);
    }
}
#endif

void loraq_gguf_matmul(const uint8_t* blocks, int kind, int64_t out_features, int64_t in_features,
                       const float* x, int64_t rows, float* y) {
    static const int64_t sizes[3] = {34, 18, 20};
    const int64_t n_blocks = in_features / 32, row_bytes = n_blocks * sizes[kind];
    #pragma omp parallel for schedule(static) if (out_features * in_features * rows >= PARALLEL_MIN_ELEMENTS)
    for (int64_t o = 0; o < out_features; o++) {
        const uint8_t* wrow = blocks + o * row_bytes;
        for (int64_t r0 = 0; r0 < rows; r0 += MATMUL_GROUP) {
            int64_t group = rows - r0 < MATMUL_GROUP ? rows - r0 : MATMUL_GROUP;
#if defined(__AVX512F__)
            __m512 acc[MATMUL_GROUP];
            for (int g = 0; g < MATMUL_GROUP; g++) acc[g] = _mm512_setzero_ps();
            for (int64_t b = 0; b < n_blocks; b++) {
                __m512 w[2];
                decode_block16(wrow + b * sizes[kind], kind, w);
                for (int64_t g = 0; g < group; g++) {
                    const float* xb = x + (r0 + g) * in_features + b * 32;
                    __m512 a = _mm512_fmadd_ps(w[0], _mm512_loadu_ps(xb), acc[g]);
                    acc[g] = _mm512_fmadd_ps(w[1], _mm512_loadu_ps(xb + 16), a);
                }
            }
            for (int64_t g = 0; g < group; g++) y[(r0 + g) * out_features + o] = _mm512_reduce_add_ps(acc[g]);
#elif defined(__AVX2__) && defined(__FMA__)
            __m256 acc[MATMUL_GROUP];
            for (int g = 0; g < MATMUL_GROUP; g++) acc[g] = _mm256_setzero_ps();
            for (int64_t b = 0; b < n_blocks; b++) {
                __m256 w[4];
                decode_block8(wrow + b * sizes[kind], kind, w);
                for (int64_t g = 0; g < group; g++) {
                    const float* xb = x + (r0 + g) * in_features + b * 32;
                    __m256 a = acc[g];
                    for (int k = 0; k < 4; k++) a = _mm256_fmadd_ps(w[k], _mm256_loadu_ps(xb + 8 * k), a);
                    acc[g] = a;
                }
            }
            for (int64_t g = 0; g < group; g++) y[(r0 + g) * out_features + o] = hsum8(acc[g]);
#else
            float acc[MATMUL_GROUP] = {0};
            for (int64_t b = 0; b < n_blocks; b++) {
                float w[32];
                decode_block(wrow + b * sizes[kind], kind, w);
                for (int64_t g = 0; g < group; g++) {
                    const float* xb = x + (r0 + g) * in_features + b * 32;
                    float s = 0.0f;
                    for (int j = 0; j < 32; j++) s += w[j] * xb[j];
                    acc[g] += s;
                }
            }
            for (int64_t g = 0; g < group; g++) y[(r0 + g) * out_features + o] = acc[g];
#endif
        }
    }
}

/* GGUF k-quant super-blocks of 256 elements (see loraq.quant.gguf): kind 0 = q4_k, 1 = q5_k
 * (d, dmin, 12 bytes of 6-bit scale/min codes, [q5_k: 32 bytes of fifth bits], 128 bytes of
 * nibbles; q * (d * sc) - dmin * m), 2 = q6_k (128 bytes low nibbles, 64 bytes high two bits,
 * 16 int8 scales, d; (q - 32) * (d * sc)). Every value equals gguf.quants' float32 result. */
static inline void kquant_scale_min(const uint8_t* s, int j, int* sc, int* m) {
    if (j < 4) {
        *sc = s[j] & 63;
        *m = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4);
        *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

void loraq_dequant_kquant(const uint8_t* blocks, int kind, int64_t first_block, int64_t last_block,
                          void* out, int dtype) {
    static const int64_t sizes[3] = {144, 176, 210};
    #pragma omp parallel for schedule(static) if ((last_block - first_block) * 256 >= PARALLEL_MIN_ELEMENTS)
    for (int64_t b = first_block; b < last_block; b++) {
        float vals[256];
        const uint8_t* p = blocks + b * sizes[kind];
        if (kind < 2) {
            float d = half_to_float(p), dmin = half_to_float(p + 2);
            const uint8_t* qs = p + (kind == 0 ? 16 : 48);
            const uint8_t* qh = p + 16;
            for (int j = 0; j < 8; j++) {
                int sc, m;
                kquant_scale_min(p + 4, j, &sc, &m);
                float dj = d * (float)sc, mj = dmin * (float)m;
                const uint8_t* q = qs + 32 * (j / 2);
                int shift = 4 * (j % 2);
                for (int l = 0; l < 32; l++) {
                    int v = (q[l] >> shift) & 15;
                    if (kind == 1) v |= ((qh[l] >> j) & 1) << 4;
                    vals[32 * j + l] = (float)v * dj - mj;
                }
            }
        } else {
            float d = half_to_float(p + 208);
            const int8_t* sc = (const int8_t*)(p + 192);
            for (int h = 0; h < 2; h++) {
                const uint8_t *ql = p + 64 * h, *qh = p + 128 + 32 * h;
                for (int k = 0; k < 4; k++) {
                    for (int l = 0; l < 32; l++) {
                        int idx = 128 * h + 32 * k + l;
                        int low = (ql[l + 32 * (k & 1)] >> (4 * (k >> 1))) & 15;
                        int v = (low | (((qh[l] >> (2 * k)) & 3) << 4)) - 32;
                        vals[idx] = (float)v * (d * (float)sc[idx / 16]);
                    }
                }
            }
        }
        if (dtype == 0) {
            memcpy((float*)out + b * 256, vals, sizeof vals);
        } else {
            uint16_t* o = (uint16_t*)out + b * 256;
            for (int j = 0; j < 256; j++) o[j] = to_bf16(vals[j]);
        }
    }
}
