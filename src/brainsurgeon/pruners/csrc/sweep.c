/* SparseGPT's column sweep inside one block (brainsurgeon.pruners.sparsegpt._sweep), compiled.
 *
 * Layout (all row-major, contiguous): the block's columns of W are the rows of W (n x R, R = the
 * layer's output rows), err (n x R) receives the errors, Ut (n x n) is U^T of the block's upper
 * Cholesky factor of H^-1, so that row j holds the coefficients U_ij (i < j) column j gathers.
 *
 * Column j is brought up to date left-looking, w_j -= sum_{i<j} U_ij err_i, then its error is
 * err_j = w_j * p_j / U_jj (p_j: the pruned mask of column j). The Python loop this replaces runs
 * two small torch kernels per column; here one pass over the stored errors per column.
 *
 * The N:M variant also chooses each group of M columns' mask (the M - N lowest (w / U_jj)^2 per
 * row, ties to the earlier column, as sparsegpt.nm_window_pruned) after bringing the group's
 * columns up to date with every column before the group.
 */
#include <stdint.h>

#define DEFINE_SWEEP(T, SUF)                                                                       \
    /* w_j -= sum_{i0 <= i < i1} Ut[j, i] err_i */                                                 \
    static inline void gather_##SUF(T *restrict wj, const T *restrict err, const T *restrict uj,   \
                                    int64_t i0, int64_t i1, int64_t R) {                           \
        for (int64_t i = i0; i < i1; i++) {                                                        \
            const T c = uj[i];                                                                     \
            const T *restrict ei = err + i * R;                                                    \
            for (int64_t r = 0; r < R; r++) wj[r] -= c * ei[r];                                    \
        }                                                                                          \
    }                                                                                              \
                                                                                                   \
    /* columns [w0, w1): each gathers the errors of columns [w0, j); scale (w1 - w0) x R */        \
    void sweep_columns_##SUF(T *restrict W, T *restrict err, const T *restrict Ut,                 \
                             const T *restrict scale, int64_t n, int64_t R, int64_t w0,            \
                             int64_t w1) {                                                         \
        for (int64_t j = w0; j < w1; j++) {                                                        \
            T *restrict wj = W + j * R;                                                            \
            gather_##SUF(wj, err, Ut + j * n, w0, j, R);                                           \
            const T *restrict sj = scale + (j - w0) * R;                                           \
            T *restrict ej = err + j * R;                                                          \
            for (int64_t r = 0; r < R; r++) ej[r] = wj[r] * sj[r];                                 \
        }                                                                                          \
    }                                                                                              \
                                                                                                   \
    /* the whole block at N:M (m <= 16, m divides n): P (n x R, 1 = pruned) is written */          \
    void sweep_nm_##SUF(T *restrict W, T *restrict err, const T *restrict Ut,                      \
                        const T *restrict dinv, uint8_t *restrict P, int64_t n, int64_t R,         \
                        int64_t keep, int64_t m) {                                                 \
        const int64_t drop = m - keep;                                                             \
        for (int64_t w0 = 0; w0 < n; w0 += m) {                                                    \
            for (int64_t j = w0; j < w0 + m; j++) /* every column before the group */              \
                gather_##SUF(W + j * R, err, Ut + j * n, 0, w0, R);                                \
            for (int64_t r = 0; r < R; r++) { /* the group's mask, per row */                      \
                T s[16];                                                                           \
                for (int64_t k = 0; k < m; k++) {                                                  \
                    const T t = W[(w0 + k) * R + r] * dinv[w0 + k];                                \
                    s[k] = t * t;                                                                  \
                }                                                                                  \
                for (int64_t k = 0; k < m; k++) {                                                  \
                    int64_t rank = 0;                                                              \
                    for (int64_t l = 0; l < m; l++)                                                \
                        rank += (s[l] < s[k]) || (l < k && s[l] == s[k]);                          \
                    P[(w0 + k) * R + r] = rank < drop;                                             \
                }                                                                                  \
            }                                                                                      \
            for (int64_t j = w0; j < w0 + m; j++) { /* within the group, as sweep_columns */       \
                T *restrict wj = W + j * R;                                                        \
                gather_##SUF(wj, err, Ut + j * n, w0, j, R);                                       \
                const uint8_t *restrict pj = P + j * R;                                            \
                const T d = dinv[j];                                                               \
                T *restrict ej = err + j * R;                                                      \
                for (int64_t r = 0; r < R; r++) ej[r] = wj[r] * (pj[r] ? d : (T)0);                \
            }                                                                                      \
        }                                                                                          \
    }

DEFINE_SWEEP(float, f32)
DEFINE_SWEEP(double, f64)
