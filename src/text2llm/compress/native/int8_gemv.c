/* int8 matrix-vector products for CPU decoding (text2llm.compress.native).
 *
 * y[m, n] = sx[m] * scale[n] * sum_k xq[m, k] * w[n, k]  (+ bias[n]) (+ res[m, n])
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

int t2l_abi_version(void) { return 2; }

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

/* Writes y (M, N) = x (M, K) times the matrix (+ res, which may be NULL). Each row's quantized
 * activations live on the stack. */
void t2l_gemv_i8(const t2l_mat *mat, const float *x, int64_t M, const float *res, float *y) {
    const int64_t K = mat->K, N = mat->N, G = (K + 3) / 4, NB = (N + 63) / 64;
    const int8_t *wp = mat->wp;
    const int32_t *colsum = mat->colsum;
    const float *scale = mat->scale, *bias = mat->bias;
    uint8_t xu[4 * G] __attribute__((aligned(64)));
    for (int64_t m = 0; m < M; m++) {
        const float *xm = x + m * K;
        float amax = 0.f;
        for (int64_t k = 0; k < K; k++) amax = fmaxf(amax, fabsf(xm[k]));
        const float sx = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
        for (int64_t k = 0; k < K; k++) xu[k] = (uint8_t)(lrintf(xm[k] * inv) + 128);
        for (int64_t k = K; k < 4 * G; k++) xu[k] = 128;
        const int32_t *xg = (const int32_t *)xu;
        float *ym = y + m * N;
        const float *rm = res ? res + m * N : 0;
        for (int64_t b = 0; b < NB; b++) {
            const int8_t *blk = wp + b * G * 256;
            __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
            for (int64_t g = 0; g < G; g++) {
                const __m512i xb = _mm512_set1_epi32(xg[g]);
                const int8_t *p = blk + g * 256;
                a0 = _mm512_dpbusd_epi32(a0, xb, _mm512_loadu_si512((const void *)p));
                a1 = _mm512_dpbusd_epi32(a1, xb, _mm512_loadu_si512((const void *)(p + 64)));
                a2 = _mm512_dpbusd_epi32(a2, xb, _mm512_loadu_si512((const void *)(p + 128)));
                a3 = _mm512_dpbusd_epi32(a3, xb, _mm512_loadu_si512((const void *)(p + 192)));
            }
            __m512i acc[4] = {a0, a1, a2, a3};
            for (int q = 0; q < 4; q++) {
                const int64_t n0 = b * 64 + q * 16;
                if (n0 >= N) break;
                const int64_t left = N - n0;
                const __mmask16 mk = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
                const __m512i cs = _mm512_loadu_si512((const void *)(colsum + n0));
                const __m512i v = _mm512_sub_epi32(acc[q], _mm512_slli_epi32(cs, 7));
                __m512 out = _mm512_mul_ps(_mm512_cvtepi32_ps(v),
                                           _mm512_mul_ps(_mm512_set1_ps(sx), _mm512_maskz_loadu_ps(mk, scale + n0)));
                if (bias) out = _mm512_add_ps(out, _mm512_maskz_loadu_ps(mk, bias + n0));
                if (rm) out = _mm512_add_ps(out, _mm512_maskz_loadu_ps(mk, rm + n0));
                _mm512_mask_storeu_ps(ym + n0, mk, out);
            }
        }
    }
}
