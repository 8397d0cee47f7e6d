/* X^T X of bfloat16 rows on AMX tiles, summed into float64, for brainsurgeon's layer-wise statistics
 * (see ../gram_kernel.py).
 *
 * torch has no CPU product of bfloat16 matrices with a float32 result: its bfloat16 matmul rounds the
 * result to bfloat16 (8 bits), far too coarse for a Hessian, so the rows had to be converted to float32
 * and multiplied by SGEMM. AMX's TDPBF16PS multiplies bfloat16 pairs exactly and accumulates in float32
 * tiles: the same products as the float32 path, at several times its speed.
 *
 * X is n x d, row-major (n tokens, d features). The tokens are taken in chunks of CHUNK; per chunk
 *   - B: pairs of consecutive tokens interleaved, B[r][j] = (X[2r][j], X[2r+1][j]) (the VNNI layout
 *     TDPBF16PS wants of its second operand), built once per chunk by all threads;
 *   - per 32-feature panel i (one thread each, dynamic schedule): A = the panel transposed (32 x chunk),
 *     then for every panel j >= i the 32 x 32 block of X_i^T X_j: four C tiles, two A tiles, two B tiles.
 * The float32 blocks are carried in `work` across chunks and added to acc (float64) at the end, the
 * blocks above the diagonal mirrored below it, so acc stays exactly symmetric.
 * Tails (n or d not multiples of 32) are zero-padded in the chunk buffers; X itself is only read. */
#include <stdint.h>
#include <string.h>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#define GRAM_AMX 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#define CHUNK 512 /* tokens per chunk: B (CHUNK/2 x d x 4 bytes, 1.5 MB at d = 1536) stays in L2 */

/* 1 when the AMX path was compiled and the kernel granted this process the tile state, else 0. */
int gram_amx_available(void) {
#ifdef GRAM_AMX
    /* Linux hands out the AMX tile data state on request only (ARCH_REQ_XCOMP_PERM, XTILEDATA) */
    return syscall(SYS_arch_prctl, 0x1023, 18) == 0 ? 1 : 0;
#else
    return 0;
#endif
}

/* Bytes of the scratch buffers gram_amx needs for d features: the float32 blocks, then B. */
int64_t gram_amx_work_bytes(int64_t d) {
    int64_t dp = (d + 31) / 32 * 32;
    return dp * dp * 4 + (CHUNK / 2) * dp * 4;
}

#ifdef GRAM_AMX
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

static void configure_tiles(void) {
    tile_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; t++) { c.colsb[t] = 64; c.rows[t] = 16; } /* 16 x 64 bytes each */
    _tile_loadconfig(&c);
}

static void build_pairs(uint32_t *b, const uint16_t *x, int64_t n, int64_t d, int64_t dp, int64_t t0, int64_t tcp) {
#pragma omp for schedule(static)
    for (int64_t r = 0; r < tcp / 2; r++) {
        int64_t t = t0 + 2 * r;
        const uint16_t *lo = t < n ? x + t * d : NULL, *hi = t + 1 < n ? x + (t + 1) * d : NULL;
        uint32_t *row = b + r * dp;
        int64_t j = 0;
        if (lo && hi)
            for (; j < d; j++) row[j] = (uint32_t)lo[j] | ((uint32_t)hi[j] << 16);
        else if (lo)
            for (; j < d; j++) row[j] = (uint32_t)lo[j];
        for (; j < dp; j++) row[j] = 0;
    }
}

static void transpose_panel(uint16_t *a, const uint16_t *x, int64_t n, int64_t d, int64_t c0, int64_t t0,
                            int64_t tcp) {
    int64_t w = d - c0 < 32 ? d - c0 : 32;
    for (int64_t t = 0; t < tcp; t++) {
        const uint16_t *src = t0 + t < n ? x + (t0 + t) * d + c0 : NULL;
        for (int64_t m = 0; m < 32; m++) a[m * tcp + t] = src && m < w ? src[m] : 0;
    }
}

/* c (32 x 32 float32, row-major) += A^T-panel x B-panel over one chunk of tcp tokens */
static void block_product(float *c, int first, const uint16_t *a, const uint32_t *b, int64_t tcp, int64_t dp) {
    if (first) {
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    } else {
        _tile_loadd(0, c, 128); _tile_loadd(1, c + 16, 128);
        _tile_loadd(2, c + 512, 128); _tile_loadd(3, c + 528, 128);
    }
    for (int64_t t = 0; t < tcp; t += 32) {
        _tile_loadd(4, a + t, tcp * 2);
        _tile_loadd(5, a + 16 * tcp + t, tcp * 2);
        _tile_loadd(6, b + (t / 2) * dp, dp * 4);
        _tile_loadd(7, b + (t / 2) * dp + 16, dp * 4);
        _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, c, 128); _tile_stored(1, c + 16, 128);
    _tile_stored(2, c + 512, 128); _tile_stored(3, c + 528, 128);
}

static void add_blocks(double *acc, const float *blocks, int64_t d, int64_t np) {
#pragma omp for schedule(dynamic, 1)
    for (int64_t pi = 0; pi < np; pi++)
        for (int64_t pj = pi; pj < np; pj++) {
            const float *c = blocks + (pi * np + pj) * 1024;
            for (int64_t r = 0; r < 32 && pi * 32 + r < d; r++)
                for (int64_t s = 0; s < 32 && pj * 32 + s < d; s++) {
                    int64_t i = pi * 32 + r, j = pj * 32 + s;
                    acc[i * d + j] += c[r * 32 + s];
                    if (pi != pj) acc[j * d + i] += c[r * 32 + s]; /* no race: column i is this thread's */
                }
        }
}
#endif

/* acc (d x d float64, row-major) += X^T X for X (n x d bfloat16 as uint16, row-major).
 * work: gram_amx_work_bytes(d) bytes, 64-byte aligned. Returns 0, or -1 when AMX is not compiled in. */
int gram_amx(double *acc, const uint16_t *x, int64_t n, int64_t d, void *work, int nthreads) {
#ifdef GRAM_AMX
    if (n <= 0 || d <= 0) return 0;
    int64_t dp = (d + 31) / 32 * 32, np = dp / 32;
    float *blocks = (float *)work;
    uint32_t *b = (uint32_t *)((char *)work + dp * dp * 4);
#pragma omp parallel num_threads(nthreads)
    {
        configure_tiles(); /* the tile configuration is per thread */
        uint16_t a[32 * CHUNK] __attribute__((aligned(64)));
        for (int64_t t0 = 0; t0 < n; t0 += CHUNK) {
            int64_t tc = n - t0 < CHUNK ? n - t0 : CHUNK, tcp = (tc + 31) / 32 * 32;
            build_pairs(b, x, n, d, dp, t0, tcp); /* its omp for ends with a barrier */
#pragma omp for schedule(dynamic, 1)
            for (int64_t pi = 0; pi < np; pi++) {
                transpose_panel(a, x, n, d, pi * 32, t0, tcp);
                for (int64_t pj = pi; pj < np; pj++)
                    block_product(blocks + (pi * np + pj) * 1024, t0 == 0, a, b + pj * 32, tcp, dp);
            }
        }
        _tile_release();
        add_blocks(acc, blocks, d, np);
    }
    return 0;
#else
    (void)acc; (void)x; (void)n; (void)d; (void)work; (void)nthreads;
    return -1;
#endif
}
