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
 * One source, one instruction set per build (the Python side picks it from the CPU's flags and
 * compiles with that path's flags; T2L_PATH_* names it):
 *   T2L_PATH_AVX512VNNI  vpdpbusd on zmm: 64 u8 x s8 multiply-adds into 16 int32 lanes per instruction
 *   T2L_PATH_AVXVNNI     vpdpbusd on ymm (AVX-VNNI, Alder Lake / Zen 5 and later): 32 per instruction
 *   T2L_PATH_AVX2        vpmaddubsw + vpmaddwd (every x86-64 with AVX2): exact, see below
 *   T2L_PATH_NEON        sdot (ARMv8.2 dot product): 16 s8 x s8 multiply-adds into 4 int32 lanes
 * The integer sums are exact on every path, so every path gives the same numbers.
 *
 * The VNNI paths want unsigned activations: xq + 128 is used and 128 * sum_k w[n, k] (colsum,
 * computed once when packing) is subtracted. The AVX2 path multiplies |w| (u8, up to 128) by
 * xq * sign(w) (s8, |xq| <= 127): a pair of products is at most 2 * 128 * 127 = 32512, so
 * vpmaddubsw's int16 saturation never triggers. NEON's sdot takes signed activations directly.
 *
 * Packed layout (t2l_pack_i8): columns in blocks of BW (64 for zmm, 32 for ymm, 16 for NEON; N
 * padded to a multiple of BW), and in each block, for each group g of 4 consecutive k (K padded to
 * a multiple of 4), BW columns x 4 bytes:
 *     wp[((b * G + g) * BW + j) * 4 + r] = w[BW b + j, 4 g + r]
 * so one block streams through memory in order, 4 vector registers per group.
 */
#include <stdint.h>
#include <string.h>
#include <math.h>

#if defined(T2L_PATH_AVX512VNNI)
#  if !defined(__AVX512F__) || !defined(__AVX512VNNI__) || !defined(__AVX512BW__)
#    error "T2L_PATH_AVX512VNNI needs AVX-512 F, BW and VNNI (-mavx512f -mavx512bw -mavx512vnni)"
#  endif
#  include <immintrin.h>
#  define BW 64
#  define XOFF 128
#  define PATH_ID 1
#elif defined(T2L_PATH_AVXVNNI)
#  if !defined(__AVX2__) || !defined(__AVXVNNI__)
#    error "T2L_PATH_AVXVNNI needs AVX2 and AVX-VNNI (-mavx2 -mavxvnni)"
#  endif
#  include <immintrin.h>
#  define BW 32
#  define XOFF 128
#  define PATH_ID 2
#elif defined(T2L_PATH_AVX2)
#  if !defined(__AVX2__)
#    error "T2L_PATH_AVX2 needs AVX2 (-mavx2)"
#  endif
#  include <immintrin.h>
#  define BW 32
#  define XOFF 0
#  define PATH_ID 3
#elif defined(T2L_PATH_NEON)
#  if !defined(__ARM_NEON) || !defined(__ARM_FEATURE_DOTPROD)
#    error "T2L_PATH_NEON needs NEON with the dot-product extension (-march=armv8.2-a+dotprod)"
#  endif
#  include <arm_neon.h>
#  define BW 16
#  define XOFF 0
#  define PATH_ID 4
#else
#  error "define one of T2L_PATH_AVX512VNNI, T2L_PATH_AVXVNNI, T2L_PATH_AVX2, T2L_PATH_NEON"
#endif

int t2l_abi_version(void) { return 5; }
int t2l_path(void) { return PATH_ID; }   /* which of the paths above this build is */
int t2l_block_cols(void) { return BW; }  /* BW: the packed layout's column block */

/* wp: (N_pad / BW) * (K_pad / 4) * 4 * BW bytes; colsum: N_pad int32. */
void t2l_pack_i8(const int8_t *w, int64_t N, int64_t K, int8_t *wp, int32_t *colsum) {
    const int64_t NP = (N + BW - 1) / BW * BW, G = (K + 3) / 4;
    memset(wp, 0, (size_t)(NP / BW) * G * 4 * BW);
    for (int64_t n = 0; n < NP; n++) colsum[n] = 0;
    for (int64_t n = 0; n < N; n++) {
        const int64_t b = n / BW, j = n % BW;
        int32_t s = 0;
        for (int64_t k = 0; k < K; k++) {
            wp[((b * G + k / 4) * BW + j) * 4 + k % 4] = w[n * K + k];
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
 * h * 127 / max|h| rounded, + XOFF, padded with XOFF); returns the row's scale max|h| / 127. */
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
    for (int64_t k = 0; k < K; k++) xu[k] = (uint8_t)(lrintf(h[k] * inv) + XOFF);
    for (int64_t k = K; k < 4 * G; k++) xu[k] = XOFF;
    return amax / 127.f;
}

/* Scalar epilogue for the columns of a partial vector (n0 .. N): v holds the integer sums. */
static inline void store_tail(const int32_t *v, int lanes, const t2l_mat *mat, int64_t n0, float sxr,
                              const float *resr, float *yr) {
    for (int i = 0; i < lanes; i++) {
        const int64_t n = n0 + i;
        float out = (float)v[i] * (sxr * mat->scale[n]) + (mat->bias ? mat->bias[n] : 0.f);
        if (resr) out += resr[n];
        yr[n] = out;
    }
}

#if defined(T2L_PATH_AVX512VNNI)
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

#elif defined(T2L_PATH_AVXVNNI) || defined(T2L_PATH_AVX2)
#  if defined(T2L_PATH_AVXVNNI)
/* u8 activations (xq + 128) x s8 weights, 4 products per int32 lane, in one instruction. */
#    define DOT(acc, xb, w) _mm256_dpbusd_avx_epi32((acc), (xb), (w))
#  else
/* |w| (u8) x sign(w) * xq (s8) pairwise into int16 (never saturates: see the top), then pairs of
 * int16 into int32 lanes: the same 4-product sums as vpdpbusd. */
#    define DOT(acc, xb, w) _mm256_add_epi32((acc), _mm256_madd_epi16( \
         _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8((xb), (w))), _mm256_set1_epi16(1)))
#  endif
/* As the zmm tile, on ymm registers: blocks of 32 columns, 4 x R accumulators (at most 16). */
static inline __attribute__((always_inline)) void rows_tile(
        const t2l_mat *mat, int R, const uint8_t *xu, int64_t xstride, const float *sx,
        const float *res, float *y) {
    const int64_t K = mat->K, N = mat->N, G = (K + 3) / 4, NB = (N + 31) / 32;
    for (int64_t b = 0; b < NB; b++) {
        const int8_t *blk = mat->wp + b * G * 128;
        __m256i acc[4][4];
        for (int r = 0; r < R; r++)
            for (int q = 0; q < 4; q++) acc[r][q] = _mm256_setzero_si256();
        for (int64_t g = 0; g < G; g++) {
            const int8_t *p = blk + g * 128;
            const __m256i w0 = _mm256_loadu_si256((const __m256i *)p), w1 = _mm256_loadu_si256((const __m256i *)(p + 32)),
                          w2 = _mm256_loadu_si256((const __m256i *)(p + 64)), w3 = _mm256_loadu_si256((const __m256i *)(p + 96));
            for (int r = 0; r < R; r++) {
                int32_t xw;
                memcpy(&xw, xu + r * xstride + 4 * g, 4);
                const __m256i xb = _mm256_set1_epi32(xw);
                acc[r][0] = DOT(acc[r][0], xb, w0);
                acc[r][1] = DOT(acc[r][1], xb, w1);
                acc[r][2] = DOT(acc[r][2], xb, w2);
                acc[r][3] = DOT(acc[r][3], xb, w3);
            }
        }
        for (int q = 0; q < 4; q++) {
            const int64_t n0 = b * 32 + q * 8;
            if (n0 >= N) break;
            const int64_t left = N - n0;
#  if XOFF
            const __m256i cs = _mm256_slli_epi32(_mm256_loadu_si256((const __m256i *)(mat->colsum + n0)), 7);
#  else
            const __m256i cs = _mm256_setzero_si256();
#  endif
            if (left < 8) {  /* the last columns: the scalar epilogue */
                for (int r = 0; r < R; r++) {
                    int32_t v[8];
                    _mm256_storeu_si256((__m256i *)v, _mm256_sub_epi32(acc[r][q], cs));
                    store_tail(v, (int)left, mat, n0, sx[r], res ? res + r * N : 0, y + r * N);
                }
                break;
            }
            const __m256 sc = _mm256_loadu_ps(mat->scale + n0);
            const __m256 bias = mat->bias ? _mm256_loadu_ps(mat->bias + n0) : _mm256_setzero_ps();
            for (int r = 0; r < R; r++) {
                const __m256i v = _mm256_sub_epi32(acc[r][q], cs);
                __m256 out = _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(v), _mm256_mul_ps(_mm256_set1_ps(sx[r]), sc)), bias);
                if (res) out = _mm256_add_ps(out, _mm256_loadu_ps(res + r * N + n0));
                _mm256_storeu_ps(y + r * N + n0, out);
            }
        }
    }
}

#else /* T2L_PATH_NEON */
/* blocks of 16 columns: 4 q registers of 4 int32 lanes, 4 x R accumulators (at most 16). */
static inline __attribute__((always_inline)) void rows_tile(
        const t2l_mat *mat, int R, const uint8_t *xu, int64_t xstride, const float *sx,
        const float *res, float *y) {
    const int64_t K = mat->K, N = mat->N, G = (K + 3) / 4, NB = (N + 15) / 16;
    for (int64_t b = 0; b < NB; b++) {
        const int8_t *blk = mat->wp + b * G * 64;
        int32x4_t acc[4][4];
        for (int r = 0; r < R; r++)
            for (int q = 0; q < 4; q++) acc[r][q] = vdupq_n_s32(0);
        for (int64_t g = 0; g < G; g++) {
            const int8_t *p = blk + g * 64;
            const int8x16_t w0 = vld1q_s8(p), w1 = vld1q_s8(p + 16), w2 = vld1q_s8(p + 32), w3 = vld1q_s8(p + 48);
            for (int r = 0; r < R; r++) {
                int32_t xw;
                memcpy(&xw, xu + r * xstride + 4 * g, 4);
                const int8x16_t xb = vreinterpretq_s8_s32(vdupq_n_s32(xw));
                acc[r][0] = vdotq_s32(acc[r][0], w0, xb);
                acc[r][1] = vdotq_s32(acc[r][1], w1, xb);
                acc[r][2] = vdotq_s32(acc[r][2], w2, xb);
                acc[r][3] = vdotq_s32(acc[r][3], w3, xb);
            }
        }
        for (int q = 0; q < 4; q++) {
            const int64_t n0 = b * 16 + q * 4;
            if (n0 >= N) break;
            const int64_t left = N - n0;
            if (left < 4) {
                for (int r = 0; r < R; r++) {
                    int32_t v[4];
                    vst1q_s32(v, acc[r][q]);
                    store_tail(v, (int)left, mat, n0, sx[r], res ? res + r * N : 0, y + r * N);
                }
                break;
            }
            const float32x4_t sc = vld1q_f32(mat->scale + n0);
            const float32x4_t bias = mat->bias ? vld1q_f32(mat->bias + n0) : vdupq_n_f32(0.f);
            for (int r = 0; r < R; r++) {
                float32x4_t out = vaddq_f32(vmulq_f32(vcvtq_f32_s32(acc[r][q]), vmulq_f32(vdupq_n_f32(sx[r]), sc)), bias);
                if (res) out = vaddq_f32(out, vld1q_f32(res + r * N + n0));
                vst1q_f32(y + r * N + n0, out);
            }
        }
    }
}
#endif

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
