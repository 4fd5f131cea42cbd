/* A serving pool's per-load work in one call each (loraq.batching.pool, loraq.io.adapter_check):
 * writing an adapter's factors into its slot of every layer's stacks (from per-layer records, or
 * from a staged adapter's source records and the pool's table of stacks), and checking that a
 * set of float32 arrays holds no NaN or Inf. In Python each is a few tensor operations per layer or per
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
        /* row by row of the destination: its writes are sequential, the reads strided */
        for (int64_t j = 0; j < rank; j++) {
            float* dst = dst_b + j * n_out;
            for (int64_t o = 0; o < n_out; o++) dst[o] = b[o * rank + j] * scale;
        }
    }
}

/* A staged adapter's factors, one record per layer: A (rank x n_in) and B (n_out x rank) as the
 * file holds them, the rank, n_in, n_out and the scale (a float32's bits). */
enum { F_A, F_B, F_RANK, F_IN, F_OUT, F_SCALE, F_SIZE };

/* The pool's stacks, one row per layer: the stacked A (slots x r_max x n_in), the stacked B
 * (slots x r_max x n_out), the int64 ranks (slots), the slot count, r_max, n_in, n_out. */
enum { T_A, T_B, T_RANKS, T_SLOTS, T_RMAX, T_IN, T_OUT, T_SIZE };

int64_t loraq_place_record_sizes(void) { return F_SIZE * 100 + T_SIZE; }

/* Write n staged factors into slot `slot` of the table rows rows[i]: each slot's A and B rows up
 * to the new rank as loraq_write_slots writes them, the rows the slot's previous adapter left
 * beyond it zeroed (its rank entry says how many, clamped to the stack's r_max), the rank entry
 * set. Everything is checked first: returns the index of the first record that does not fit its
 * table row (nothing written), or -1 once all are written. */
int64_t loraq_place_slot(const int64_t* table, int64_t table_rows, const int64_t* factors,
                         const int64_t* rows, int64_t n, int64_t slot) {
    for (int64_t i = 0; i < n; i++) {
        const int64_t* f = factors + i * F_SIZE;
        if (rows[i] < 0 || rows[i] >= table_rows) return i;
        const int64_t* t = table + rows[i] * T_SIZE;
        if (slot < 1 || slot >= t[T_SLOTS] || f[F_RANK] < 1 || f[F_RANK] > t[T_RMAX] ||
            f[F_IN] != t[T_IN] || f[F_OUT] != t[T_OUT])
            return i;
    }
    for (int64_t i = 0; i < n; i++) {
        const int64_t* f = factors + i * F_SIZE;
        const int64_t* t = table + rows[i] * T_SIZE;
        const int64_t r_max = t[T_RMAX], n_in = t[T_IN], n_out = t[T_OUT], rank = f[F_RANK];
        float* dst_a = (float*)t[T_A] + slot * r_max * n_in;
        float* dst_b = (float*)t[T_B] + slot * r_max * n_out;
        int64_t* slot_rank = (int64_t*)t[T_RANKS] + slot;
        int64_t left = *slot_rank < r_max ? *slot_rank : r_max;
        if (left > rank) {
            memset(dst_a + rank * n_in, 0, (size_t)((left - rank) * n_in) * sizeof(float));
            memset(dst_b + rank * n_out, 0, (size_t)((left - rank) * n_out) * sizeof(float));
        }
        const int64_t record[S_SIZE] = {f[F_A], f[F_B], (int64_t)dst_a, (int64_t)dst_b,
                                        (int64_t)slot_rank, rank, n_in, n_out, f[F_SCALE]};
        loraq_write_slots(record, 1);
    }
    return -1;
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
