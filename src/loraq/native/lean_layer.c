/* One Llama-family decoder layer of a decode step (one new token per row), float32, in one call.
 *
 * The pure-PyTorch lean decode step (loraq.generation.lean_step) stays the reference: this is
 * the same arithmetic (RMSNorm, q/k/v projections, Qwen3's per-head norms, RoPE as transformers
 * applies it, grouped-query attention over the cached keys and values, the output projection,
 * the SiLU-gated MLP, both residual adds) without the few hundred small tensor operations a
 * layer costs from Python. Projections read their GGUF blocks packed, through the packed matmul
 * of dequant.c, whose address the spec carries, or float32 weights; each projection adds its bias and, per row, the
 * row's LoRA adapter from the stacked weights of loraq.batching.stacks (A: slots x rank x in,
 * B: slots x rank x out with the scale folded in; optionally each slot's own rank, below which
 * its rows hold the adapter and past which zeros). Sums run in another order than PyTorch's:
 * results equal the reference within float32 rounding.
 *
 * The spec is an int64 array laid out by the L_* and P_* indices below, which
 * loraq.native.lean_layer mirrors (it checks loraq_lean_spec_size at load). Pointers are
 * addresses; doubles are stored as their bits.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

typedef void (*matmul_fn)(const uint8_t*, int, int64_t, int64_t, const float*, int64_t, float*);

/* One projection's record. */
enum {
    P_BLOCKS,
    P_KIND,
    P_OUT,
    P_IN,
    P_BIAS,
    P_LORA_A,
    P_LORA_B,
    P_RANK,
    P_ROW_SLOTS,
    P_SLOT_RANKS,
    P_SIZE
};
enum { Q, K, V, O, GATE, UP, DOWN, PROJECTIONS };
/* The layer's record; the projections' records follow at L_PROJ, in the order above. */
enum {
    L_MATMUL,
    L_HIDDEN,
    L_HEADS,
    L_KV_HEADS,
    L_HEAD_DIM,
    L_INTERMEDIATE,
    L_EPS,
    L_SCALING,
    L_NORM_IN,
    L_NORM_POST,
    L_Q_NORM,
    L_K_NORM,
    L_QK_EPS,
    L_KEYS,
    L_VALUES,
    L_CACHE_ROW_STRIDE,
    L_CACHE_HEAD_STRIDE,
    L_PROJ
};

int64_t loraq_lean_spec_size(void) { return L_PROJ + PROJECTIONS * P_SIZE; }

/* A projection's P_KIND for float32 weights (P_BLOCKS then points at them); any other kind is the
 * packed matmul's (dequant.c). */
#define DENSE_KIND -1

/* Below this many multiply-adds a loop over rows runs on one thread: waking the pool costs more. */
#define PARALLEL_MIN_WORK 262144

static double as_double(int64_t bits) {
    double value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

#if defined(__AVX2__) && defined(__FMA__)
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

static inline float dot(const float* a, const float* b, int64_t n) {
    int64_t i = 0;
    float sum;
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps();
    for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
    sum = _mm512_reduce_add_ps(acc);
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    sum = hsum8(acc);
#else
    sum = 0.0f;
#endif
    for (; i < n; i++) sum += a[i] * b[i];
    return sum;
}

static inline void add_scaled(float* y, float a, const float* x, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] += a * x[i];
}

/* transformers' RMSNorm: weight * (x * rsqrt(mean(x^2) + eps)). */
static void rms_norm(const float* x, const float* weight, double eps, int64_t n, float* out) {
    float scale = 1.0f / sqrtf(dot(x, x, n) / (float)n + (float)eps);
    for (int64_t i = 0; i < n; i++) out[i] = weight[i] * (x[i] * scale);
}

/* y = x @ W^T for float32 weights W (n_out x n_in, row-major): a projection of kind DENSE_KIND.
 * Rows go in groups of DENSE_GROUP, each weight vector loaded once per group (as the packed
 * matmul decodes each block once per group of rows). */
#define DENSE_GROUP 8
static void dense_matmul(const float* w, int64_t n_out, int64_t n_in, const float* x, int64_t rows, float* y) {
    #pragma omp parallel for schedule(static) if (n_out * n_in * rows >= PARALLEL_MIN_WORK)
    for (int64_t o = 0; o < n_out; o++) {
        const float* wrow = w + o * n_in;
        for (int64_t r0 = 0; r0 < rows; r0 += DENSE_GROUP) {
            const int64_t group = rows - r0 < DENSE_GROUP ? rows - r0 : DENSE_GROUP;
            float sums[DENSE_GROUP];
            int64_t i = 0;
#if defined(__AVX512F__)
            __m512 acc[DENSE_GROUP];
            for (int g = 0; g < DENSE_GROUP; g++) acc[g] = _mm512_setzero_ps();
            for (; i + 16 <= n_in; i += 16) {
                __m512 wv = _mm512_loadu_ps(wrow + i);
                for (int64_t g = 0; g < group; g++)
                    acc[g] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + (r0 + g) * n_in + i), acc[g]);
            }
            for (int64_t g = 0; g < group; g++) sums[g] = _mm512_reduce_add_ps(acc[g]);
#elif defined(__AVX2__) && defined(__FMA__)
            __m256 acc[DENSE_GROUP];
            for (int g = 0; g < DENSE_GROUP; g++) acc[g] = _mm256_setzero_ps();
            for (; i + 8 <= n_in; i += 8) {
                __m256 wv = _mm256_loadu_ps(wrow + i);
                for (int64_t g = 0; g < group; g++)
                    acc[g] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + (r0 + g) * n_in + i), acc[g]);
            }
            for (int64_t g = 0; g < group; g++) sums[g] = hsum8(acc[g]);
#else
            for (int64_t g = 0; g < group; g++) sums[g] = 0.0f;
#endif
            for (int64_t g = 0; g < group; g++) {
                const float* xr = x + (r0 + g) * n_in;
                float sum = sums[g];
                for (int64_t k = i; k < n_in; k++) sum += wrow[k] * xr[k];
                y[(r0 + g) * n_out + o] = sum;
            }
        }
    }
}

/* out[r, t] += B_s^T (A_s x[r, t]) for each row r's slot s = slots[r] and each of its tokens t:
 * x is rows x tokens x n_in, out rows x tokens x n_out, A slots x rank x n_in, B slots x rank x
 * n_out (B transposed, its scale folded in). slot_ranks (or NULL) gives each slot's own rank: its
 * rows of A and B past it are zeros, so no dot is spent on them. */
static void lora_rows(const float* x, int64_t rows, int64_t tokens, int64_t n_in, float* out,
                      int64_t n_out, const float* lora_a, const float* lora_b, int64_t rank,
                      const int64_t* slots, const int64_t* slot_ranks) {
    const int64_t items = rows * tokens;
    #pragma omp parallel for schedule(static) if (items * rank * (n_in + n_out) >= PARALLEL_MIN_WORK)
    for (int64_t i = 0; i < items; i++) {
        const int64_t r = i / tokens, slot = slots[r];
        const float* a = lora_a + slot * rank * n_in;
        const float* b = lora_b + slot * rank * n_out;
        const int64_t own = slot_ranks && slot_ranks[slot] < rank ? slot_ranks[slot] : rank;
        for (int64_t j = 0; j < own; j++) {
            float hidden = dot(a + j * n_in, x + i * n_in, n_in);
            if (hidden != 0.0f) add_scaled(out + i * n_out, hidden, b + j * n_out, n_out);
        }
    }
}

/* The entry for lora_rows (loraq.native.lean_layer.lora_rows checks the shapes); -1, with nothing
 * done, when a row's slot is not one of the n_slots stacked. */
int loraq_lora_rows(const float* x, int64_t rows, int64_t tokens, int64_t n_in, float* out,
                    int64_t n_out, const float* lora_a, const float* lora_b, int64_t n_slots,
                    int64_t rank, const int64_t* slots, const int64_t* slot_ranks) {
    for (int64_t r = 0; r < rows; r++)
        if (slots[r] < 0 || slots[r] >= n_slots) return -1;
    lora_rows(x, rows, tokens, n_in, out, n_out, lora_a, lora_b, rank, slots, slot_ranks);
    return 0;
}

/* out = in @ W^T (+ bias) (+ each row's LoRA delta), in: rows x P_IN, out: rows x P_OUT. */
static void project(const int64_t* p, matmul_fn matmul, const float* in, int64_t rows, float* out) {
    const int64_t n_in = p[P_IN], n_out = p[P_OUT];
    if (p[P_KIND] == DENSE_KIND)
        dense_matmul((const float*)p[P_BLOCKS], n_out, n_in, in, rows, out);
    else
        matmul((const uint8_t*)p[P_BLOCKS], (int)p[P_KIND], n_out, n_in, in, rows, out);
    const float* bias = (const float*)p[P_BIAS];
    if (bias)
        for (int64_t r = 0; r < rows; r++) add_scaled(out + r * n_out, 1.0f, bias, n_out);
    const float *lora_a = (const float*)p[P_LORA_A], *lora_b = (const float*)p[P_LORA_B];
    if (!lora_a) return;
    lora_rows(in, rows, 1, n_in, out, n_out, lora_a, lora_b, p[P_RANK],
              (const int64_t*)p[P_ROW_SLOTS], (const int64_t*)p[P_SLOT_RANKS]);
}

/* RoPE as transformers applies it: x * cos + rotate_half(x) * sin, for each head of a row. */
static void rope(float* x, int64_t heads, int64_t dim, const float* cos, const float* sin) {
    const int64_t half = dim / 2;
    for (int64_t h = 0; h < heads; h++) {
        float* v = x + h * dim;
        for (int64_t i = 0; i < half; i++) {
            float a = v[i], b = v[i + half];
            v[i] = a * cos[i] - b * sin[i];
            v[i + half] = b * cos[i + half] + a * sin[i + half];
        }
    }
}

/* softmax(q k^T * scaling) v over the positions a row keeps, one query head. */
static void attend(const float* q, const float* keys, const float* values, const uint8_t* keep,
                   int64_t positions, int64_t dim, float scaling, float* scores, float* out) {
    float top = -INFINITY;
    for (int64_t t = 0; t < positions; t++) {
        scores[t] = keep[t] ? dot(q, keys + t * dim, dim) * scaling : -INFINITY;
        if (scores[t] > top) top = scores[t];
    }
    float total = 0.0f;
    for (int64_t t = 0; t < positions; t++) {
        scores[t] = keep[t] ? expf(scores[t] - top) : 0.0f;
        total += scores[t];
    }
    memset(out, 0, dim * sizeof(float));
    for (int64_t t = 0; t < positions; t++)
        if (scores[t] != 0.0f) add_scaled(out, scores[t] / total, values + t * dim, dim);
}

/* One decoder layer on x (rows x hidden, updated in place). The cache holds `length` positions
 * per row; this writes the new keys and values at position `length` (the buffers have room) and
 * attends over length + 1 positions where keep (rows x (length + 1), 1 = a real token) says.
 * cos, sin: rows x head_dim, the rows' RoPE tables. Returns 0, or -1 if scratch memory ran out. */
int loraq_lean_layer(const int64_t* spec, float* x, int64_t rows, int64_t length, const float* cos,
                     const float* sin, const uint8_t* keep) {
    const matmul_fn matmul = (matmul_fn)spec[L_MATMUL];
    const int64_t hidden = spec[L_HIDDEN], heads = spec[L_HEADS], kv_heads = spec[L_KV_HEADS];
    const int64_t dim = spec[L_HEAD_DIM], inter = spec[L_INTERMEDIATE], positions = length + 1;
    const int64_t row_stride = spec[L_CACHE_ROW_STRIDE], head_stride = spec[L_CACHE_HEAD_STRIDE];
    const double eps = as_double(spec[L_EPS]);
    const float scaling = (float)as_double(spec[L_SCALING]);
    const int64_t* proj = spec + L_PROJ;
    const int64_t q_width = heads * dim, kv_width = kv_heads * dim, group = heads / kv_heads;
    const int64_t wide = inter > q_width ? inter : q_width;

    float* scratch = malloc(sizeof(float) * rows * (hidden + q_width + 2 * kv_width + q_width + 2 * wide) +
                            sizeof(float) * rows * heads * positions);
    if (!scratch) return -1;
    float *h = scratch, *q = h + rows * hidden, *k = q + rows * q_width, *v = k + rows * kv_width;
    float *mixed = v + rows * kv_width, *t1 = mixed + rows * q_width, *t2 = t1 + rows * wide;
    float* scores = t2 + rows * wide;

    for (int64_t r = 0; r < rows; r++) rms_norm(x + r * hidden, (const float*)spec[L_NORM_IN], eps, hidden, h + r * hidden);
    project(proj + Q * P_SIZE, matmul, h, rows, q);
    project(proj + K * P_SIZE, matmul, h, rows, k);
    project(proj + V * P_SIZE, matmul, h, rows, v);
    const float *q_norm = (const float*)spec[L_Q_NORM], *k_norm = (const float*)spec[L_K_NORM];
    const double qk_eps = as_double(spec[L_QK_EPS]);
    float *keys = (float*)spec[L_KEYS], *values = (float*)spec[L_VALUES];
    for (int64_t r = 0; r < rows; r++) {
        if (q_norm) {  /* Qwen3: a norm over each head (in place: each value is read before written) */
            for (int64_t i = 0; i < heads; i++) rms_norm(q + r * q_width + i * dim, q_norm, qk_eps, dim, q + r * q_width + i * dim);
            for (int64_t i = 0; i < kv_heads; i++) rms_norm(k + r * kv_width + i * dim, k_norm, qk_eps, dim, k + r * kv_width + i * dim);
        }
        rope(q + r * q_width, heads, dim, cos + r * dim, sin + r * dim);
        rope(k + r * kv_width, kv_heads, dim, cos + r * dim, sin + r * dim);
        for (int64_t g = 0; g < kv_heads; g++) {
            memcpy(keys + r * row_stride + g * head_stride + length * dim, k + r * kv_width + g * dim, dim * sizeof(float));
            memcpy(values + r * row_stride + g * head_stride + length * dim, v + r * kv_width + g * dim, dim * sizeof(float));
        }
    }
    #pragma omp parallel for schedule(static) if (rows * heads * positions * dim >= PARALLEL_MIN_WORK)
    for (int64_t rh = 0; rh < rows * heads; rh++) {
        const int64_t r = rh / heads, i = rh % heads, g = i / group;
        const int64_t at = r * row_stride + g * head_stride;
        attend(q + r * q_width + i * dim, keys + at, values + at, keep + r * positions, positions, dim,
               scaling, scores + rh * positions, mixed + r * q_width + i * dim);
    }
    project(proj + O * P_SIZE, matmul, mixed, rows, t1);
    for (int64_t i = 0; i < rows * hidden; i++) x[i] += t1[i];

    for (int64_t r = 0; r < rows; r++) rms_norm(x + r * hidden, (const float*)spec[L_NORM_POST], eps, hidden, h + r * hidden);
    project(proj + GATE * P_SIZE, matmul, h, rows, t1);
    project(proj + UP * P_SIZE, matmul, h, rows, t2);
    for (int64_t i = 0; i < rows * inter; i++) t1[i] = t1[i] / (1.0f + expf(-t1[i])) * t2[i];
    project(proj + DOWN * P_SIZE, matmul, t1, rows, t2);
    for (int64_t i = 0; i < rows * hidden; i++) x[i] += t2[i];
    free(scratch);
    return 0;
}
