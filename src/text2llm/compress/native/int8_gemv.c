/* int8 matrix-vector products for CPU decoding (text2llm.compress.native).
 *
 * y[m, n] = sx[m] * scale[n] * sum_k xq[m, k] * w[n, k]  (+ bias[n]) (+ res[m, n])
 *
 * optionally with an RMSNorm applied to each row x first (the row is read to be quantized anyway,
 * so the norm costs no extra pass or call).
 *
 * w: int8 weights, symmetric, one scale per output channel n (the quantized checkpoint's own).
 * x: fp32 activations, quantized here per row m to int8 (symmetric, sx = max|x| / 127): the same
 *    "dynamic int8" scheme as torch's quantized::linear_dynamic, without its fixed cost per call.
 *
 * The inner product uses AVX-512 VNNI (vpdpbusd: 64 multiply-adds of u8 x s8 into 16 int32 lanes
 * per instruction). vpdpbusd wants unsigned activations, so xq + 128 is used and 128 * sum_k w[n, k]
 * (colsum, computed once when packing) is subtracted.
 *
 * Packed layout (t2l_pack_i8): columns in blocks of 64 (N padded to a multiple of 64), and in each
 * block, for each group g of 4 consecutive k (K padded to a multiple of 4), 64 columns x 4 bytes:
 *     wp[((b * G + g) * 64 + j) * 4 + r] = w[64 b + j, 4 g + r]
 * so one block streams through memory in order, 256 bytes (4 zmm registers) per group.
 */
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <immintrin.h>

#if !defined(__AVX512F__) || !defined(__AVX512VNNI__) || !defined(__AVX512BW__)
#error "int8_gemv.c needs AVX-512 F, BW and VNNI (compiled with -march=native on such a CPU)"
#endif

int t2l_abi_version(void) { return 4; }

/* wp: (N_pad / 64) * (K_pad / 4) * 256 bytes; colsum: N_pad int32. */
void t2l_pack_i8(const int8_t *w, int64_t N, int64_t K, int8_t *wp, int32_t *colsum) {
    const int64_t NP = (N + 63) / 64 * 64, G = (K + 3) / 4;
    memset(wp, 0, (size_t)(NP / 64) * G * 256);
    for (int64_t n = 0; n < NP; n++) colsum[n] = 0;
    for (int64_t n = 0; n < N; n++) {
        const int64_t b = n / 64, j = n % 64;
        int32_t s = 0;
        for (int64_t k = 0; k < K; k++) {
            wp[((b * G + k / 4) * 64 + j) * 4 + k % 4] = w[n * K + k];
            s += w[n * K + k];
        }
        colsum[n] = s;
    }
}

/* One packed matrix, described once (Python passes its address: fewer arguments per call, and
 * ctypes' cost grows with each). bias may be NULL. */
typedef struct {
    int64_t K, N;
    const int8_t *wp;
    const int32_t *colsum;
    const float *scale, *bias;
} t2l_mat;

/* An RMSNorm to apply to each row before quantizing it (fused: the row is read once anyway). */
typedef struct {
    const float *w;
    float eps;
} t2l_norm;

/* Quantizes row x (K values; RMS-normalised first when nrm is not NULL) into xu (4 * G bytes:
 * h * 127 / max|h| rounded, + 128, padded with 128); returns the row's scale max|h| / 127. */
static float quantize_row(const float *x, int64_t K, int64_t G, const t2l_norm *nrm, uint8_t *xu) {
    float h[K];
    if (nrm) {
        float ss = 0.f;
        for (int64_t k = 0; k < K; k++) ss += x[k] * x[k];
        const float r = 1.f / sqrtf(ss / (float)K + nrm->eps);
        for (int64_t k = 0; k < K; k++) h[k] = x[k] * r * nrm->w[k];
    } else {
        for (int64_t k = 0; k < K; k++) h[k] = x[k];
    }
    float amax = 0.f;
    for (int64_t k = 0; k < K; k++) amax = fmaxf(amax, fabsf(h[k]));
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    for (int64_t k = 0; k < K; k++) xu[k] = (uint8_t)(lrintf(h[k] * inv) + 128);
    for (int64_t k = K; k < 4 * G; k++) xu[k] = 128;
    return amax / 127.f;
}

/* R rows (1..4, a constant where it is inlined) against every column block: each 256-byte group of
 * weights is loaded once and used for all R rows (4 x R accumulators, at most 16 zmm registers). */
static inline __attribute__((always_inline)) void rows_tile(
        const t2l_mat *mat, int R, const uint8_t *xu, int64_t xstride, const float *sx,
        const float *res, float *y) {
    const int64_t K = mat->K, N = mat->N, G = (K + 3) / 4, NB = (N + 63) / 64;
    for (int64_t b = 0; b < NB; b++) {
        const int8_t *blk = mat->wp + b * G * 256;
        __m512i acc[4][4];
        for (int r = 0; r < R; r++)
            for (int q = 0; q < 4; q++) acc[r][q] = _mm512_setzero_si512();
        for (int64_t g = 0; g < G; g++) {
            const int8_t *p = blk + g * 256;
            const __m512i w0 = _mm512_loadu_si512((const void *)p), w1 = _mm512_loadu_si512((const void *)(p + 64)),
                          w2 = _mm512_loadu_si512((const void *)(p + 128)), w3 = _mm512_loadu_si512((const void *)(p + 192));
            for (int r = 0; r < R; r++) {
                const __m512i xb = _mm512_set1_epi32(((const int32_t *)(xu + r * xstride))[g]);
                acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], xb, w0);
                acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], xb, w1);
                acc[r][2] = _mm512_dpbusd_epi32(acc[r][2], xb, w2);
                acc[r][3] = _mm512_dpbusd_epi32(acc[r][3], xb, w3);
            }
        }
        for (int q = 0; q < 4; q++) {
            const int64_t n0 = b * 64 + q * 16;
            if (n0 >= N) break;
            const int64_t left = N - n0;
            const __mmask16 mk = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
            const __m512i cs128 = _mm512_slli_epi32(_mm512_loadu_si512((const void *)(mat->colsum + n0)), 7);
            const __m512 sc = _mm512_maskz_loadu_ps(mk, mat->scale + n0);
            const __m512 bias = mat->bias ? _mm512_maskz_loadu_ps(mk, mat->bias + n0) : _mm512_setzero_ps();
            for (int r = 0; r < R; r++) {
                const __m512i v = _mm512_sub_epi32(acc[r][q], cs128);
                __m512 out = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(v), _mm512_mul_ps(_mm512_set1_ps(sx[r]), sc)), bias);
                if (res) out = _mm512_add_ps(out, _mm512_maskz_loadu_ps(mk, res + r * N + n0));
                _mm512_mask_storeu_ps(y + r * N + n0, mk, out);
            }
        }
    }
}

/* Writes y (M, N) = rmsnorm?(x) (M, K) times the matrix (+ res); res and nrm may be NULL. Rows go
 * in tiles of 4; a tile's quantized activations live on the stack. */
void t2l_gemv_i8(const t2l_mat *mat, const float *x, int64_t M, const float *res, float *y, const t2l_norm *nrm) {
    const int64_t K = mat->K, N = mat->N, G = (K + 3) / 4;
    uint8_t xu[4][4 * G] __attribute__((aligned(64)));
    float sx[4];
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int R = M - m0 < 4 ? (int)(M - m0) : 4;
        for (int r = 0; r < R; r++) sx[r] = quantize_row(x + (m0 + r) * K, K, G, nrm, xu[r]);
        const float *rm = res ? res + m0 * N : 0;
        float *ym = y + m0 * N;
        switch (R) {  /* one specialised copy of the tile per row count */
            case 1: rows_tile(mat, 1, xu[0], 4 * G, sx, rm, ym); break;
            case 2: rows_tile(mat, 2, xu[0], 4 * G, sx, rm, ym); break;
            case 3: rows_tile(mat, 3, xu[0], 4 * G, sx, rm, ym); break;
            default: rows_tile(mat, 4, xu[0], 4 * G, sx, rm, ym); break;
        }
    }
}
