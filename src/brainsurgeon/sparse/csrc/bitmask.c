/* Bitmask-compressed sparse matrix products for brainsurgeon (see ../native.py for the format).
 *
 * A pruned weight W (rows x cols) is stored as
 *   masks  uint16 [rows][nchunks]   bit b of masks[i][c] set <=> W[i][16c + b] != 0 (nchunks = ceil(cols/16))
 *   vals   float  [nnz]             the non-zeros, row by row, columns ascending (CSR's order)
 *   rowptr int64  [rows + 1]        where row i's values start in vals
 * 4 bytes per kept weight plus 2 bits per position: 5.7 bytes per non-zero at 70% sparsity, 4.4 at 50%,
 * against CSR's 6 (uint16 columns) or 8 (int32), and no per-value index to gather by.
 *
 * Matrix-vector (decode): per 16 columns, AVX-512's expand-load places the chunk's packed values at
 * their mask positions, one FMA with x's 16 entries adds them. No gather: the cost is the bytes
 * read, which is what bounds a batch-1 product whose weights come from memory.
 * Matrix-matrix (prefill): per non-zero, one broadcast and FMAs along a row of X^T (contiguous over
 * the tokens), in tiles of 128 tokens held in registers: the work is the non-zeros', not the dense one.
 * With AVX2 and no AVX-512 (e.g. AMD Zen 1-3), decode emulates the expand-load per 8 columns: a masked
 * load of the byte's popcount values, then a lane permutation from a 256-entry table.
 * Otherwise the same loops run on scalars (compiler-vectorised where it can).
 * Threads: OpenMP over rows, in torch's OpenMP runtime (native.py links against the one torch loaded). */
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
#define BM_AVX2 1
#endif

int bm_isa(void) {
#if defined(__AVX512F__)
    return 512;
#elif defined(BM_AVX2)
    return 256;
#else
    return 0;
#endif
}

#if defined(BM_AVX2)
/* EXPAND[k]: lane j of 8 takes the packed value of rank (set bits of k below j) when bit j is set, else
 * lane 7, which the masked load zeroed (a byte with an unset bit has at most 7 values). FIRST[n]: the
 * first n lanes, the values a byte with n set bits owns. Filled when the library is loaded. */
static int32_t EXPAND[256][8] __attribute__((aligned(32)));
static int32_t FIRST[9][8] __attribute__((aligned(32)));

__attribute__((constructor)) static void fill_tables(void) {
    for (int k = 0; k < 256; k++)
        for (int j = 0, rank = 0; j < 8; j++)
            EXPAND[k][j] = (k >> j & 1) ? rank++ : 7;
    for (int n = 0; n <= 8; n++)
        for (int j = 0; j < 8; j++)
            FIRST[n][j] = j < n ? -1 : 0;
}

/* the 8 weights of one mask byte at their columns, zeros elsewhere; never reads past the byte's values */
static inline __m256 expand8(unsigned k, const float *p) {
    __m256 v = _mm256_maskload_ps(p, _mm256_load_si256((const __m256i *)FIRST[__builtin_popcount(k)]));
    return _mm256_permutevar8x32_ps(v, _mm256_load_si256((const __m256i *)EXPAND[k]));
}
#endif

/* Software prefetch distances (decode): the values 4 KiB ahead, the masks 512 B ahead. A decoded token
 * reads every weight once from memory; with these the 210 SmolLM2 layers at 70% took 13-16 ms instead of
 * 20-23 ms at 1 thread (measured, interleaved; 2 KiB and 8 KiB ahead were within 5% of 4 KiB). */
#define PREFETCH_VALUES 1024
#define PREFETCH_MASKS 256

static float row_dot(const uint16_t *m, const float *p, const float *x, int64_t nchunks) {
#if defined(__AVX512F__)
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int64_t c = 0;
    /* The last chunk may be partial: it is left to the masked tail below, so the pairs can read x with
     * plain loads (a masked load costs more; about 5% of a token's products, measured). A lane whose
     * weight is pruned multiplies x by the 0 that expand-load put there, as the dense product does. */
    for (; c + 2 < nchunks; c += 2) {  /* two accumulators: the FMA latency is not on the critical path */
        __mmask16 k0 = m[c], k1 = m[c + 1];
        __m512 v0 = _mm512_maskz_expandloadu_ps(k0, p);
        p += __builtin_popcount(k0);
        __m512 v1 = _mm512_maskz_expandloadu_ps(k1, p);
        p += __builtin_popcount(k1);
        a0 = _mm512_fmadd_ps(v0, _mm512_loadu_ps(x + 16 * c), a0);
        a1 = _mm512_fmadd_ps(v1, _mm512_loadu_ps(x + 16 * c + 16), a1);
        _mm_prefetch((const char *)(p + PREFETCH_VALUES), _MM_HINT_T0);  /* never faults, even past the end */
        _mm_prefetch((const char *)(m + c + PREFETCH_MASKS), _MM_HINT_T0);
    }
    for (; c < nchunks; c++) {  /* one or two chunks; masked loads of x: never past its end */
        __mmask16 k0 = m[c];
        a0 = _mm512_fmadd_ps(_mm512_maskz_expandloadu_ps(k0, p), _mm512_maskz_loadu_ps(k0, x + 16 * c), a0);
        p += __builtin_popcount(k0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#elif defined(BM_AVX2)
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c + 1 < nchunks; c++) {  /* full chunks; the last one, maybe partial, by scalars below */
        unsigned lo = m[c] & 0xFFu, hi = m[c] >> 8;
        __m256 v0 = expand8(lo, p);
        p += __builtin_popcount(lo);
        __m256 v1 = expand8(hi, p);
        p += __builtin_popcount(hi);
        a0 = _mm256_fmadd_ps(v0, _mm256_loadu_ps(x + 16 * c), a0);
        a1 = _mm256_fmadd_ps(v1, _mm256_loadu_ps(x + 16 * c + 8), a1);
        _mm_prefetch((const char *)(p + PREFETCH_VALUES), _MM_HINT_T0);
        _mm_prefetch((const char *)(m + c + PREFETCH_MASKS), _MM_HINT_T0);
    }
    __m256 a = _mm256_add_ps(a0, a1);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    float acc = _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
    for (unsigned k = m[c]; k; k &= k - 1)
        acc += *p++ * x[16 * c + __builtin_ctz(k)];
    return acc;
#else
    float acc = 0.0f;
    for (int64_t c = 0; c < nchunks; c++) {
        for (unsigned k = m[c]; k; k &= k - 1)
            acc += *p++ * x[16 * c + __builtin_ctz(k)];
    }
    return acc;
#endif
}

void bm_spmv(const int64_t *rowptr, const uint16_t *masks, const float *vals, const float *x, float *y,
             int64_t rows, int64_t nchunks, int nthreads) {
    #pragma omp parallel for schedule(static) num_threads(nthreads) if(nthreads > 1)
    for (int64_t i = 0; i < rows; i++)
        y[i] = row_dot(masks + i * nchunks, vals + rowptr[i], x, nchunks);
}

#define TILE 128 /* tokens per register tile: 8 AVX-512 accumulators */
/* Columns per float32 partial sum: each block of 64 columns is summed in float32, the blocks in float64.
 * One float32 chain over a whole row (a few hundred non-zeros) put SmolLM2's logits 8.6e-4 from float64
 * after 30 layers at 70%, four times dense torch's 2.2e-4; blocked, the products are closer to float64
 * than dense BLAS's (measured), for about 10% more time. */
#define BLOCK_CHUNKS 4

static void row_times_xt(const uint16_t *m, const float *vals, const float *xt, float *yrow, int64_t nchunks,
                         int64_t n) {
    for (int64_t t0 = 0; t0 < n; t0 += TILE) {
        int64_t width = n - t0 < TILE ? n - t0 : TILE;
        const float *p = vals;
#if defined(__AVX512F__)
        __mmask16 lane[TILE / 16];
        __m512 acc[TILE / 16];
        __m512d lo[TILE / 16], hi[TILE / 16];
        for (int j = 0; j < TILE / 16; j++) {
            int64_t left = width - 16 * j;
            lane[j] = left >= 16 ? (__mmask16)0xFFFF : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1);
            acc[j] = _mm512_setzero_ps();
            lo[j] = hi[j] = _mm512_setzero_pd();
        }
        for (int64_t c = 0; c < nchunks; c++) {
            for (unsigned k = m[c]; k; k &= k - 1) {
                const float *xr = xt + (16 * c + __builtin_ctz(k)) * n + t0;
                __m512 v = _mm512_set1_ps(*p++);
                for (int j = 0; j < TILE / 16; j++)
                    acc[j] = _mm512_fmadd_ps(v, _mm512_maskz_loadu_ps(lane[j], xr + 16 * j), acc[j]);
            }
            if (c % BLOCK_CHUNKS == BLOCK_CHUNKS - 1 || c == nchunks - 1) {  /* the block's sums into float64 */
                for (int j = 0; j < TILE / 16; j++) {
                    lo[j] = _mm512_add_pd(lo[j], _mm512_cvtps_pd(_mm512_castps512_ps256(acc[j])));
                    hi[j] = _mm512_add_pd(hi[j], _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(
                        _mm512_castps_pd(acc[j]), 1))));
                    acc[j] = _mm512_setzero_ps();
                }
            }
        }
        for (int j = 0; j < TILE / 16; j++) {
            __m512d y2 = _mm512_insertf64x4(_mm512_castps_pd(_mm512_castps256_ps512(_mm512_cvtpd_ps(lo[j]))),
                                            _mm256_castps_pd(_mm512_cvtpd_ps(hi[j])), 1);  /* AVX-512F only */
            __m512 y = _mm512_castpd_ps(y2);
            _mm512_mask_storeu_ps(yrow + t0 + 16 * j, lane[j], y);
        }
#else
        float acc[TILE];
        double sum[TILE];
        memset(acc, 0, sizeof acc);
        memset(sum, 0, sizeof sum);
        for (int64_t c = 0; c < nchunks; c++) {
            for (unsigned k = m[c]; k; k &= k - 1) {
                const float *xr = xt + (16 * c + __builtin_ctz(k)) * n + t0;
                float v = *p++;
                for (int64_t j = 0; j < width; j++)
                    acc[j] += v * xr[j];
            }
            if (c % BLOCK_CHUNKS == BLOCK_CHUNKS - 1 || c == nchunks - 1) {
                for (int64_t j = 0; j < width; j++) {
                    sum[j] += acc[j];
                    acc[j] = 0.0f;
                }
            }
        }
        for (int64_t j = 0; j < width; j++)
            yrow[t0 + j] = (float)sum[j];
#endif
    }
}

/* yt (rows x n) = W @ xt, xt (cols x n) row-major */
void bm_spmm(const int64_t *rowptr, const uint16_t *masks, const float *vals, const float *xt, float *yt,
             int64_t rows, int64_t nchunks, int64_t n, int nthreads) {
    #pragma omp parallel for schedule(static) num_threads(nthreads) if(nthreads > 1)
    for (int64_t i = 0; i < rows; i++)
        row_times_xt(masks + i * nchunks, vals + rowptr[i], xt, yt + i * n, nchunks, n);
}
