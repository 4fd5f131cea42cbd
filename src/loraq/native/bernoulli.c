/* Bernoulli masks drawn exactly as PyTorch's CPU ``Tensor.bernoulli_(p)`` draws them.
 *
 * PyTorch's default CPU generator is a Mersenne Twister (MT19937). Where PyTorch does not use
 * MKL for ``bernoulli_`` (non-Intel CPUs), every element takes two 32-bit outputs in a serial
 * loop: ``v = hi << 32 | lo``, ``u = (v & (2^53 - 1)) * 2^-53`` (a double), and the element is
 * ``u < p``. Since ``u < p`` holds exactly when ``v & (2^53 - 1) < ceil(p * 2^53)``, the test is
 * one integer compare against a threshold the caller computes.
 *
 * This kernel produces the same bits from the same generator state, but generates the twister
 * state a block at a time and tempers and compares whole runs of words, which the compiler
 * vectorizes. The generator state is read from and written back to PyTorch's serialized state
 * (``torch.Generator.get_state()``): seed u64 @0, left i32 @8, seeded i32 @12, next u64 @16,
 * state u64[624] @24 (each holding one 32-bit word). The Python side checks the result against
 * ``bernoulli_`` once before trusting it.
 */
#include <stdint.h>
#include <string.h>

#define MT_N 624
#define MT_M 397
#define STATE_OFFSET 24
#define CHUNK 1248 /* words tempered per pass: two elements need four words */
/* Below this many mask bytes the bit loops run on one thread (with OpenMP, see build.py). */
#define PARALLEL_MIN_BYTES 8192

static inline uint32_t twist(uint32_t u, uint32_t v) {
    uint32_t mixed = (u & 0x80000000u) | (v & 0x7fffffffu);
    return (mixed >> 1) ^ ((v & 1u) ? 0x9908b0dfu : 0u);
}

static void next_state(uint32_t *s) {
    int i = 0;
    for (; i < MT_N - MT_M; i++) s[i] = s[i + MT_M] ^ twist(s[i], s[i + 1]);
    for (; i < MT_N - 1; i++) s[i] = s[i + MT_M - MT_N] ^ twist(s[i], s[i + 1]);
    s[MT_N - 1] = s[MT_M - 1] ^ twist(s[MT_N - 1], s[0]);
}

static void temper(const uint32_t *restrict s, uint32_t *restrict out, int count) {
    for (int i = 0; i < count; i++) {
        uint32_t y = s[i];
        y ^= (y >> 11);
        y ^= (y << 7) & 0x9d2c5680u;
        y ^= (y << 15) & 0xefc60000u;
        y ^= (y >> 18);
        out[i] = y;
    }
}

static void compare(const uint32_t *restrict words, int64_t pairs, uint64_t threshold,
                    uint8_t *restrict out) {
    /* v < threshold on (hi 21 bits, lo 32 bits) pairs, without 64-bit lanes */
    const uint32_t t_hi = (uint32_t)(threshold >> 32), t_lo = (uint32_t)threshold;
    for (int64_t i = 0; i < pairs; i++) {
        uint32_t hi = words[2 * i] & 0x1fffffu, lo = words[2 * i + 1];
        out[i] = (hi < t_hi) | ((hi == t_hi) & (lo < t_lo));
    }
}

/* Eight 0/1 bytes as one byte, the first in the least significant bit. */
static inline uint8_t pack8(const uint8_t *m) {
    return (uint8_t)((m[0] & 1) | (m[1] & 1) << 1 | (m[2] & 1) << 2 | (m[3] & 1) << 3 |
                     (m[4] & 1) << 4 | (m[5] & 1) << 5 | (m[6] & 1) << 6 | (m[7] & 1) << 7);
}

static void pack_tail(const uint8_t *mask, int64_t n, uint8_t *bits) {
    uint8_t last = 0;
    for (int64_t j = 0; j < n % 8; j++) last |= (uint8_t)((mask[n - n % 8 + j] & 1) << j);
    bits[n / 8] = last;
}

/* ``n`` draws into ``out`` (0/1 bytes, or bits when ``packed``), advancing the serialized
 * generator ``state`` in place. */
static void draw(uint8_t *state, uint64_t threshold, int64_t n, uint8_t *out, int packed) {
    int32_t left;
    uint64_t next, wide[MT_N];
    uint32_t s[MT_N], words[CHUNK];
    uint8_t bytes[CHUNK / 2]; /* a multiple of 8, so every chunk but the last fills whole bytes */
    memcpy(&left, state + 8, sizeof left);
    memcpy(&next, state + 16, sizeof next);
    memcpy(wide, state + STATE_OFFSET, sizeof wide);
    for (int i = 0; i < MT_N; i++) s[i] = (uint32_t)wide[i];

    int64_t avail = left - 1; /* words s[next .. next + avail) are ready before the next twist */
    int64_t need = 2 * n, filled = 0;
    while (need > 0) {
        filled = 0;
        while (filled < CHUNK && filled < need) {
            if (avail == 0) {
                next_state(s);
                next = 0;
                avail = MT_N;
            }
            int64_t take = avail;
            if (take > CHUNK - filled) take = CHUNK - filled;
            if (take > need - filled) take = need - filled;
            temper(s + next, words + filled, (int)take);
            next += take;
            avail -= take;
            filled += take;
        }
        if (packed) {
            int64_t count = filled / 2;
            compare(words, count, threshold, bytes);
            for (int64_t i = 0; i < count / 8; i++) out[i] = pack8(bytes + 8 * i);
            if (count % 8) pack_tail(bytes, count, out);
            out += (count + 7) / 8;
        } else {
            compare(words, filled / 2, threshold, out);
            out += filled / 2;
        }
        need -= filled;
    }
    left = (int32_t)(avail + 1);
    for (int i = 0; i < MT_N; i++) wide[i] = s[i];
    memcpy(state + 8, &left, sizeof left);
    memcpy(state + 16, &next, sizeof next);
    memcpy(state + STATE_OFFSET, wide, sizeof wide);
}

/* Write ``n`` 0/1 bytes to ``out`` and advance the serialized generator ``state`` in place. */
void loraq_bernoulli_u8(uint8_t *state, uint64_t threshold, int64_t n, uint8_t *out) {
    draw(state, threshold, n, out, 0);
}

/* The same draws, written as ``(n + 7) / 8`` bytes of bits (see loraq_pack_mask). */
void loraq_bernoulli_bits(uint8_t *state, uint64_t threshold, int64_t n, uint8_t *bits) {
    draw(state, threshold, n, bits, 1);
}

/* Masks kept for backward at one bit per element: bit i % 8 of byte i / 8 (least significant
 * first, numpy's bitorder="little"). ``n`` elements; the last byte's unused bits are zero. */
void loraq_pack_mask(const uint8_t *restrict mask, int64_t n, uint8_t *restrict bits) {
    int64_t whole = n / 8;
    #pragma omp parallel for schedule(static) if (whole >= PARALLEL_MIN_BYTES)
    for (int64_t i = 0; i < whole; i++) bits[i] = pack8(mask + 8 * i);
    if (n % 8) pack_tail(mask, n, bits);
}

void loraq_unpack_mask(const uint8_t *restrict bits, int64_t n, uint8_t *restrict mask) {
    int64_t whole = n / 8;
    #pragma omp parallel for schedule(static) if (whole >= PARALLEL_MIN_BYTES)
    for (int64_t i = 0; i < whole; i++) {
        /* spread the byte's 8 bits over 8 bytes, bit j to byte j (little-endian) */
        uint64_t v = bits[i];
        v = (v | v << 28) & 0x0000000F0000000FULL;
        v = (v | v << 14) & 0x0003000300030003ULL;
        v = (v | v << 7) & 0x0101010101010101ULL;
        memcpy(mask + 8 * i, &v, 8);
    }
    for (int64_t j = 8 * whole; j < n; j++) mask[j] = (bits[whole] >> (j % 8)) & 1;
}

/* out[i] = x[i] where bit i of ``bits`` is set, else +0.0 (``out`` may be ``x``). */
void loraq_keep_f32(const float *x, const uint8_t *bits, int64_t n, float *out) {
    int64_t whole = n / 8;
    #pragma omp parallel for schedule(static) if (whole >= PARALLEL_MIN_BYTES)
    for (int64_t i = 0; i < whole; i++) {
        uint8_t b = bits[i];
        for (int j = 0; j < 8; j++) out[8 * i + j] = ((b >> j) & 1) ? x[8 * i + j] : 0.0f;
    }
    for (int64_t j = 8 * whole; j < n; j++) out[j] = ((bits[whole] >> (j % 8)) & 1) ? x[j] : 0.0f;
}
