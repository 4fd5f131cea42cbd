/* A serving pool's per-load work in one call each (loraq.batching.pool, loraq.io.adapter_check):
 * writing an adapter's factors into its slot of every layer's stacks, and checking that a set of
 * float32 arrays holds no NaN or Inf. In Python each is a few tensor operations per layer or per
 * tensor, which for a small adapter cost more than the copies themselves.
 *
 * loraq.native.slots mirrors the record layout below and checks every tensor it takes.
 */
#include <stdint.h>
#include <string.h>

/* One layer's record: the adapter's A (rank x n_in) and B (n_out x rank), the slot's first row of
 * the stacked A (rank rows of n_in follow) and of the stacked B (rank rows of n_out), the slot's
 * entry of the stack's int64 ranks, the rank, n_in, n_out and the scale (a float32's bits). */
enum { S_A, S_B, S_DST_A, S_DST_B, S_DST_RANK, S_RANK, S_IN, S_OUT, S_SCALE, S_SIZE };

int64_t loraq_slot_record_size(void) { return S_SIZE; }

/* dst_a[j] = A[j]; dst_b[j][o] = B[o][j] * scale (rounded as float32, as torch multiplies);
 * the slot's rank entry = rank. */
void loraq_write_slots(const int64_t* records, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        const int64_t* t = records + i * S_SIZE;
        const float* a = (const float*)t[S_A];
        const float* b = (const float*)t[S_B];
        float* dst_a = (float*)t[S_DST_A];
        float* dst_b = (float*)t[S_DST_B];
        const int64_t rank = t[S_RANK], n_in = t[S_IN], n_out = t[S_OUT];
        float scale;
        int32_t bits = (int32_t)t[S_SCALE];
        memcpy(&scale, &bits, sizeof scale);
        *(int64_t*)t[S_DST_RANK] = rank;
        memcpy(dst_a, a, (size_t)(rank * n_in) * sizeof(float));
        for (int64_t o = 0; o < n_out; o++) {
            const float* row = b + o * rank;
            for (int64_t j = 0; j < rank; j++) dst_b[j * n_out + o] = row[j] * scale;
        }
    }
}

/* The index of the first of the n float32 arrays (addresses and lengths) holding a NaN or an Inf,
 * or -1 when none does. */
int64_t loraq_first_nonfinite(const int64_t* addresses, const int64_t* lengths, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        const uint32_t* v = (const uint32_t*)addresses[i];
        uint32_t seen = 0;
        for (int64_t k = 0; k < lengths[i]; k++) {
            /* all exponent bits set: Inf or NaN */
            seen |= (uint32_t)((v[k] & 0x7F800000u) == 0x7F800000u);
        }
        if (seen) return i;
    }
    return -1;
}
