/* k-quant quantizers (q4_k, q5_k, q6_k): the search of loraq.quant.kquants, one block at a time.
 *
 * The PyTorch module is the specification: it states the fitting procedure and why each step
 * is ordered as it is (llama.cpp's reference quantizer writes the same bytes). Here every
 * float32 operation happens in that same order, built without FMA contraction or reassociation
 * (loraq.native.build passes -ffp-contract=off -fno-fast-math), so sums accumulate element by
 * element and every result equals the PyTorch path bit for bit (tests compare the two).
 *
 * Each call quantizes the super-blocks [first, last) of a float32 array into `out`. Built with
 * -fopenmp (only where the process already runs PyTorch's libgomp) it splits them across that
 * pool itself; otherwise the caller splits a tensor across threads.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define QK 256
#define GROUP_MAX_EPS 1e-15f

#ifdef _OPENMP
int loraq_openmp(void) { return 1; }
#else
int loraq_openmp(void) { return 0; }
#endif

/* Round to nearest, ties to even, by adding 1.5 * 2^23 and reading the mantissa. */
static inline int nearest(float v) {
    float s = v + 12582912.f;
    int32_t bits;
    memcpy(&bits, &s, 4);
    return (bits & 0x007fffff) - 0x00400000;
}

static inline int clampi(int v, int lo, int hi) { return v < lo ? lo : (v > hi ? hi : v); }

/* float32 -> IEEE half, round to nearest even (subnormals and overflow included). */
static uint16_t to_half(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) return (uint16_t)(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0u));
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* rounds past 65504 */
    if (ax < 0x38800000u) { /* half subnormal: let the float adder round at 2^-24 */
        float a, r;
        memcpy(&a, &ax, 4);
        r = a + 0.5f;
        uint32_t rb;
        memcpy(&rb, &r, 4);
        return (uint16_t)(sign | (rb - 0x3f000000u));
    }
    ax += 0xc8000fffu + ((ax >> 13) & 1u); /* rebias the exponent, round the mantissa */
    return (uint16_t)(sign | (ax >> 13));
}

static float from_half(uint16_t h) {
    uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    float v;
    if (e == 0) {
        v = ldexpf((float)m, -24);
    } else if (e == 31) {
        v = m ? NAN : INFINITY;
    } else {
        uint32_t b = ((e + 112u) << 23) | (m << 13);
        memcpy(&v, &b, 4);
    }
    return (h & 0x8000u) ? -v : v;
}

static inline void put_half(uint8_t* p, float f) {
    uint16_t h = to_half(f);
    p[0] = (uint8_t)(h & 0xff);
    p[1] = (uint8_t)(h >> 8);
}

/* ------------------------------------------------------------------------ q4_k / q5_k */

/* Weighted affine fit of 32 values: x ~ scale * L - min, L in 0..nmax. Returns scale and
 * writes the (non-negative) min. */
static float fit_affine(const float* x, const float* w, int nmax, float rmin, float rdelta,
                        int nstep, uint8_t* L, float* out_min) {
    float lo = x[0], hi = x[0], sum_w = w[0], sum_x = w[0] * x[0];
    for (int i = 1; i < 32; ++i) {
        if (x[i] < lo) lo = x[i];
        if (x[i] > hi) hi = x[i];
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if (lo > 0) lo = 0;
    if (hi == lo) {
        memset(L, 0, 32);
        *out_min = -lo;
        return 0.f;
    }
    float iscale = nmax / (hi - lo), scale = 1 / iscale, best = 0;
    for (int i = 0; i < 32; ++i) {
        L[i] = (uint8_t)clampi(nearest(iscale * (x[i] - lo)), 0, nmax);
        float diff = scale * L[i] + lo - x[i];
        best += w[i] * (diff * diff);
    }
    uint8_t trial[32];
    for (int step = 0; nstep >= 1 && step <= nstep; ++step) {
        iscale = (rmin + rdelta * step + nmax) / (hi - lo);
        float sum_l = 0, sum_l2 = 0, sum_xl = 0;
        for (int i = 0; i < 32; ++i) {
            int l = clampi(nearest(iscale * (x[i] - lo)), 0, nmax);
            trial[i] = (uint8_t)l;
            float wl = w[i] * l;
            sum_l += wl;
            sum_l2 += wl * l;
            sum_xl += wl * x[i];
        }
        float det = sum_w * sum_l2 - sum_l * sum_l;
        if (!(det > 0)) continue;
        float this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
        float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
        if (this_min > 0) {
            this_min = 0;
            this_scale = sum_xl / sum_l2;
        }
        float err = 0;
        for (int i = 0; i < 32; ++i) {
            float diff = this_scale * trial[i] + this_min - x[i];
            err += w[i] * (diff * diff);
        }
        if (err < best) {
            memcpy(L, trial, 32);
            best = err;
            scale = this_scale;
            lo = this_min;
        }
    }
    *out_min = -lo;
    return scale;
}

/* One q4_k / q5_k super-block: codes L[256] and the 16-byte header (d, dmin, 12 scale bytes). */
static void affine_block(const float* x, int nmax, float rmin, int nstep, uint8_t* L,
                         uint8_t* header) {
    float scales[8], mins[8], w[32], max_scale = 0, max_min = 0;
    for (int j = 0; j < 8; ++j) {
        const float* xs = x + 32 * j;
        float sum_x2 = 0;
        for (int i = 0; i < 32; ++i) sum_x2 += xs[i] * xs[i];
        float av_x = sqrtf(sum_x2 / 32);
        for (int i = 0; i < 32; ++i) w[i] = av_x + fabsf(xs[i]);
        scales[j] = fit_affine(xs, w, nmax, rmin, 0.1f, nstep, L + 32 * j, &mins[j]);
        if (scales[j] > max_scale) max_scale = scales[j];
        if (mins[j] > max_min) max_min = mins[j];
    }
    float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
    float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
    uint8_t ls[8], lm[8];
    for (int j = 0; j < 8; ++j) {
        uint8_t a = (uint8_t)nearest(inv_scale * scales[j]), b = (uint8_t)nearest(inv_min * mins[j]);
        ls[j] = a > 63 ? 63 : a;
        lm[j] = b > 63 ? 63 : b;
    }
    put_half(header, max_scale / 63.f);
    put_half(header + 2, max_min / 63.f);
    uint8_t* sc = header + 4;
    for (int j = 0; j < 4; ++j) {
        sc[j] = (uint8_t)(ls[j] | ((ls[j + 4] >> 4) << 6));
        sc[j + 4] = (uint8_t)(lm[j] | ((lm[j + 4] >> 4) << 6));
        sc[j + 8] = (uint8_t)((ls[j + 4] & 15) | ((lm[j + 4] & 15) << 4));
    }
    float d = from_half((uint16_t)(header[0] | (header[1] << 8)));
    float dmin = from_half((uint16_t)(header[2] | (header[3] << 8)));
    for (int j = 0; j < 8; ++j) { /* re-fit against the scales as they read back */
        float dj = d * ls[j];
        if (!dj) continue;
        float mj = dmin * lm[j];
        for (int i = 0; i < 32; ++i) L[32 * j + i] = (uint8_t)clampi(nearest((x[32 * j + i] + mj) / dj), 0, nmax);
    }
}

void loraq_quantize_q4_k(const float* x, uint8_t* out, int64_t first, int64_t last) {
    #pragma omp parallel for schedule(static)
    for (int64_t b = first; b < last; ++b) {
        uint8_t L[QK], *y = out + b * 144;
        affine_block(x + b * QK, 15, -1.f, 20, L, y);
        for (int g = 0; g < 4; ++g)
            for (int i = 0; i < 32; ++i) y[16 + 32 * g + i] = (uint8_t)(L[64 * g + i] | (L[64 * g + 32 + i] << 4));
    }
}

void loraq_quantize_q5_k(const float* x, uint8_t* out, int64_t first, int64_t last) {
    #pragma omp parallel for schedule(static)
    for (int64_t b = first; b < last; ++b) {
        uint8_t L[QK], *y = out + b * 176;
        affine_block(x + b * QK, 31, -0.5f, 15, L, y);
        uint8_t *qh = y + 16, *ql = y + 48;
        memset(qh, 0, 32);
        for (int g = 0; g < 4; ++g) {
            for (int i = 0; i < 32; ++i) {
                uint8_t a = L[64 * g + i], c = L[64 * g + 32 + i];
                ql[32 * g + i] = (uint8_t)((a & 15) | ((c & 15) << 4));
                qh[i] |= (uint8_t)(((a >> 4) << (2 * g)) | ((c >> 4) << (2 * g + 1)));
            }
        }
    }
}

/* ---------------------------------------------------------------------------------- q6_k */

/* Symmetric fit of 16 values weighted by x^2: x ~ scale * (L - nmax), L in 0..2*nmax-1. */
static float fit_symmetric(const float* x, int nmax, uint8_t* L) {
    float peak = 0, amax = 0;
    for (int i = 0; i < 16; ++i) {
        float a = fabsf(x[i]);
        if (a > amax) {
            amax = a;
            peak = x[i];
        }
    }
    if (amax < GROUP_MAX_EPS) {
        memset(L, 0, 16);
        return 0.f;
    }
    float scale = 0, best = 0;
    for (int step = 0; step <= 18; ++step) { /* step 0: the plain scale; then -9..9 without 0 */
        int is = step == 0 ? 0 : (step <= 9 ? step - 10 : step - 9);
        float iscale = step == 0 ? -nmax / peak : -(nmax + 0.1f * is) / peak;
        uint8_t trial[16];
        float sumlx = 0, suml2 = 0;
        for (int i = 0; i < 16; ++i) {
            int l = clampi(nearest(iscale * x[i]), -nmax, nmax - 1);
            trial[i] = (uint8_t)(l + nmax);
            float w = x[i] * x[i];
            sumlx += w * x[i] * l;
            suml2 += w * l * l;
        }
        if (step == 0) {
            memcpy(L, trial, 16);
            scale = suml2 ? sumlx / suml2 : 0.f;
            best = scale * sumlx;
        } else if (suml2 > 0 && sumlx * sumlx > best * suml2) {
            memcpy(L, trial, 16);
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    return scale;
}

void loraq_quantize_q6_k(const float* x, uint8_t* out, int64_t first, int64_t last) {
    #pragma omp parallel for schedule(static)
    for (int64_t b = first; b < last; ++b) {
        const float* xb = x + b * QK;
        uint8_t L[QK], *y = out + b * 210;
        float scales[16], max_scale = 0, max_abs = 0;
        for (int j = 0; j < 16; ++j) {
            scales[j] = fit_symmetric(xb + 16 * j, 32, L + 16 * j);
            if (fabsf(scales[j]) > max_abs) {
                max_abs = fabsf(scales[j]);
                max_scale = scales[j];
            }
        }
        if (max_abs < GROUP_MAX_EPS) {
            memset(y, 0, 210);
            continue;
        }
        float iscale = -128.f / max_scale;
        int8_t* sc = (int8_t*)(y + 192);
        for (int j = 0; j < 16; ++j) {
            int v = nearest(iscale * scales[j]);
            sc[j] = (int8_t)(v > 127 ? 127 : v);
        }
        put_half(y + 208, 1 / iscale);
        float d = from_half((uint16_t)(y[208] | (y[209] << 8)));
        for (int j = 0; j < 16; ++j) {
            float dj = d * sc[j];
            if (!dj) continue;
            for (int i = 0; i < 16; ++i) L[16 * j + i] = (uint8_t)(clampi(nearest(xb[16 * j + i] / dj), -32, 31) + 32);
        }
        uint8_t *ql = y, *qh = y + 128;
        for (int h = 0; h < 2; ++h) {
            const uint8_t* Lh = L + 128 * h;
            for (int i = 0; i < 32; ++i) {
                ql[64 * h + i] = (uint8_t)((Lh[i] & 15) | ((Lh[64 + i] & 15) << 4));
                ql[64 * h + 32 + i] = (uint8_t)((Lh[32 + i] & 15) | ((Lh[96 + i] & 15) << 4));
                qh[32 * h + i] = (uint8_t)((Lh[i] >> 4) | ((Lh[32 + i] >> 4) << 2) | ((Lh[64 + i] >> 4) << 4) | ((Lh[96 + i] >> 4) << 6));
            }
        }
    }
}
