/* Row-wise asymmetric quantization of checkpoint rows (Check-N-Run style).
 *
 * A row keeps lo and scale; each value becomes a code q in [0, L],
 * L = 2^bits - 1, standing for lo + q * scale.  Min-max covers the row's
 * [min, max]; the adaptive method searches a narrower range that loses less
 * (search_params).  Parameters are rounded outwards to float or to half
 * precision (lo down, scale up, so the stored range covers the chosen one)
 * and the codes are computed with the rounded parameters.
 *
 * Each row is first copied scaled by a power of two, 2^-e, that brings its
 * largest magnitude near 1: the search and the codes work on the copy, so no
 * difference, product or squared error overflows or underflows whatever the
 * row's magnitude (the scaling is exact; only values far below the row's
 * quantization step can lose bits).  The parameters are computed in double
 * in the row's own units.  The inner loops keep ET_QUANT_LANES independent
 * sums, which the compiler vectorises without reordering a float sum.
 *
 * Codes of a row are packed in groups of 8: 8 codes of b bits fill exactly
 * b bytes, little-endian, LSB first; the last group of a row is cut to the
 * bytes it uses.
 *
 * Rows are split across the kernel thread pool.  The row loops are compiled
 * twice, for plain x86-64 and for AVX2 (eight floats a vector), chosen by
 * et_isa().  AVX2 without FMA: both paths run the same IEEE operations, so
 * a checkpoint's bytes do not depend on the host that wrote it. */
#include "et_internal.h"

#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define ET_QUANT_LANES 8              /* floats a step of the inner loops: one AVX2 vector, two SSE ones */
#define ET_QUANT_CANDIDATES 3         /* ranges the search evaluates in one pass, at most */
#define ET_QUANT_GROUP 8              /* codes packed together: 8 codes of b bits = b bytes */
#define ET_QUANT_MAX_PARTS 64
#define ET_QUANT_MIN_ROWS_PER_PART 1024
#define ET_QUANT_MIN_BITS 2
#define ET_QUANT_MAX_BITS 8
#define ET_QUANT_MAX_MOVES ET_QUANT_ADAPTIVE_MAX_SHRINK_BINS
#define ET_QUANT_MIN_EXP (-100)       /* rows below 2^-100 are scaled up by 2^100 only */
#define ET_QUANT_MAX_EXP 126          /* keeps the factor 2^-e a normal float */
#define ET_ROUND_MAGIC 0x1p23f        /* adding and taking away 2^23 rounds a float in [0, 2^22] */
#define ET_HALF_MAX 65504.0
#define ET_QUANT_INLINE static inline __attribute__((always_inline)) /* into both instruction-set paths */

/* ---- rounding to float and half precision ------------------------------ */

static inline double pow2(int e) { /* e in [-1022, 1023] */
    uint64_t bits = (uint64_t)(e + 1023) << 52;
    double d;
    memcpy(&d, &bits, sizeof d);
    return d;
}

static inline float pow2f(int e) { /* e in [-126, 127] */
    uint32_t bits = (uint32_t)(e + 127) << 23;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* floor(log2(a)) of a normal double a > 0; -1023 for 0. */
static inline int exponent_of(double a) {
    uint64_t bits;
    memcpy(&bits, &a, sizeof bits);
    return (int)((bits >> 52) & 0x7ff) - 1023;
}

/* floor(log2(a)) of a normal float a > 0; -127 for 0 and subnormals. */
static inline int exponent_of_float(float a) {
    uint32_t bits;
    memcpy(&bits, &a, sizeof bits);
    return (int)((bits >> 23) & 0xff) - 127;
}

/* v rounded down (up == 0) or up to a float; +-inf beyond the float range.
 * Rounded to nearest, then moved one float (one unit of the bit pattern)
 * when that went the wrong way; without a branch, as it does half the time. */
static inline float float_round(double v, int up) {
    float f = (float)v;
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    const uint32_t wrong = up ? (double)f < v : (double)f > v;
    const uint32_t away = (bits >> 31) != (uint32_t)up; /* the move is away from zero: the pattern grows */
    bits += wrong & away;
    bits -= wrong & !away;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* v rounded down (up == 0) or up to a value of IEEE half precision, as a
 * float; +-inf beyond the largest half.  Halves are spaced 2^(e - 10) in
 * [2^e, 2^(e + 1)) and 2^-24 below 2^-14 (subnormals), so v is rounded to
 * an integer in units of that spacing, all exact in double. */
static inline float half_round(double v, int up) {
    int e = exponent_of(fabs(v));
    if (e < -14) e = -14;
    const double k = v * pow2(10 - e); /* |k| < 2048 */
    double r = (double)(int64_t)k;     /* towards zero */
    r += up ? (double)(k > r) : -(double)(k < r);
    r *= pow2(e - 10);
    return fabs(r) > ET_HALF_MAX ? (float)copysign(INFINITY, v) : (float)r;
}

static inline float round_to(double v, int up, int fp16) { return fp16 ? half_round(v, up) : float_round(v, up); }

/* ---- one row ------------------------------------------------------------ */

typedef struct {
    float lo, scale;            /* as stored */
    float lo_n, scale_n, inv_n; /* the same in units of the scaled copy; inv_n = 1 / scale_n, 0 for scale 0 */
} et_qparams;

typedef struct {
    float *x;       /* [blocks * ET_QUANT_LANES]: the row times 2^-e, then zeros */
    float *weight;  /* [blocks * ET_QUANT_LANES]: 1 for the row's values, 0 for the padding */
    uint8_t *q;     /* [dim]: codes, one a byte, before packing */
    int32_t dim;
    int32_t blocks; /* ceil(dim / ET_QUANT_LANES) */
    int32_t bits;
    float levels;   /* L = 2^bits - 1 */
    double inv_levels;
    float down;     /* 2^-e */
    int fp16;
} et_qrow;

/* Parameters covering [lo, hi] (in the row's units), lo already rounded
 * down: scale rounded up; ET_E_ARG when a half-precision one is infinite. */
ET_QUANT_INLINE int params_for(const et_qrow *r, float lo, double hi, et_qparams *p) {
    if (isinf(lo)) return ET_E_ARG;
    const double levels = r->levels;
    float scale = round_to((hi - lo) * r->inv_levels, 1, r->fp16);
    /* The quotient rounded down onto the grid: one step up covers hi (exact for halves). */
    if (lo + levels * scale < hi) scale = round_to(nextafter(scale, INFINITY), 1, r->fp16);
    if (isinf(scale)) return ET_E_ARG;
    /* Float parameters of a row reaching FLT_MAX: keep lo + L * scale finite (a step or two). */
    while (lo + levels * scale > FLT_MAX) scale = nextafterf(scale, 0.0f);
    p->lo = lo;
    p->scale = scale;
    p->lo_n = lo * r->down;
    p->scale_n = scale * r->down;
    p->inv_n = p->scale_n > 0.0f ? 1.0f / p->scale_n : 0.0f;
    if (p->inv_n > FLT_MAX) p->inv_n = FLT_MAX;
    return ET_OK;
}

/* t = (x - lo) / scale rounded to the nearest code in [0, L], ties to even. */
ET_QUANT_INLINE float nearest_code(float t, float levels) {
    t = t > 0.0f ? t : 0.0f;
    t = t < levels ? t : levels;
    return (t + ET_ROUND_MAGIC) - ET_ROUND_MAGIC;
}

/* Sum of the lanes of acc, pairwise (acc is overwritten). */
ET_QUANT_INLINE float lane_sum(float *acc) {
    for (int width = ET_QUANT_LANES / 2; width > 0; width /= 2)
        for (int k = 0; k < width; k++) acc[k] += acc[k + width];
    return acc[0];
}

/* Sums of squared reconstruction errors of the scaled row under p[0 .. count),
 * count <= ET_QUANT_CANDIDATES, in one pass.  Errors are summed in units of
 * each candidate's scale, (x - lo) / scale less the code, and scaled once;
 * the padding after the row has weight 0. */
ET_QUANT_INLINE void squared_errors(const et_qrow *r, const et_qparams *p, const int count, float *err) {
    const float *x = r->x, *weight = r->weight;
    const float levels = r->levels;
    float lo[ET_QUANT_CANDIDATES], inv[ET_QUANT_CANDIDATES];
    float acc[ET_QUANT_CANDIDATES][ET_QUANT_LANES];
    for (int c = 0; c < count; c++) {
        lo[c] = p[c].lo_n;
        inv[c] = p[c].inv_n;
        for (int k = 0; k < ET_QUANT_LANES; k++) acc[c][k] = 0.0f;
    }
    for (int32_t block = 0; block < r->blocks; block++, x += ET_QUANT_LANES, weight += ET_QUANT_LANES)
#pragma GCC unroll 4 /* >= ET_QUANT_CANDIDATES: each candidate its own vectors */
        for (int c = 0; c < count; c++)
            for (int k = 0; k < ET_QUANT_LANES; k++) {
                const float t = (x[k] - lo[c]) * inv[c];
                const float u = t - nearest_code(t, levels);
                acc[c][k] += weight[k] * (u * u);
            }
    for (int c = 0; c < count; c++) err[c] = lane_sum(acc[c]) * (p[c].scale_n * p[c].scale_n);
}

/* The parameters of the three ranges two moves on from (raised, lowered)
 * steps taken off (lo, hi): the moves that can follow either next move.
 * lo[i] is mn + i * step rounded down. */
ET_QUANT_INLINE int params_ahead(const et_qrow *r, const float *lo, double mx, double step, int raised, int lowered,
                                 et_qparams *ahead) {
    if (raised + lowered + 2 > ET_QUANT_MAX_MOVES) return ET_OK;
    return params_for(r, lo[raised + 2], mx - lowered * step, &ahead[0]) ||
                   params_for(r, lo[raised + 1], mx - (lowered + 1) * step, &ahead[1]) ||
                   params_for(r, lo[raised], mx - (lowered + 2) * step, &ahead[2])
               ? ET_E_ARG
               : ET_OK;
}

/* The adaptive range: starting from min-max, moves lo up or hi down by
 * (mx - mn) / ET_QUANT_ADAPTIVE_BINS, whichever move leaves the lower
 * squared error, ET_QUANT_ADAPTIVE_MAX_SHRINK_BINS times at most, and keeps
 * the best parameters seen (min-max included, so never worse than it).
 * Both moves of a step are evaluated in one pass over the row (the first
 * pass also evaluates min-max).  The parameters of the moves that can
 * follow are computed before that pass: they do not depend on it, so their
 * chain of roundings runs in its shadow instead of between passes. */
ET_QUANT_INLINE int search_params(const et_qrow *r, float mn, float mx, et_qparams *best) {
    const double step = ((double)mx - mn) / ET_QUANT_ADAPTIVE_BINS;
    float lo[ET_QUANT_MAX_MOVES + 1]; /* lo raised i steps, rounded down */
    for (int i = 0; i <= ET_QUANT_MAX_MOVES; i++) lo[i] = round_to(mn + i * step, 0, r->fp16);
    et_qparams cand[3]; /* min-max, lo raised a step, hi lowered a step */
    if (params_for(r, lo[0], mx, &cand[0])) return ET_E_ARG;
    *best = cand[0];
    if (mn == mx) return ET_OK;
    et_qparams ahead[3];
    if (params_for(r, lo[1], mx, &cand[1]) || params_for(r, lo[0], mx - step, &cand[2]) ||
        params_ahead(r, lo, mx, step, 0, 0, ahead))
        return ET_E_ARG;
    float err[3];
    squared_errors(r, cand, 3, err);
    float best_err = err[0];
    for (int raised = 0, lowered = 0;;) {
        const int pick = err[2] < err[1];
        if (err[1 + pick] < best_err) {
            best_err = err[1 + pick];
            *best = cand[1 + pick];
        }
        raised += !pick;
        lowered += pick;
        if (raised + lowered == ET_QUANT_MAX_MOVES || best_err == 0.0f) return ET_OK;
        cand[1] = ahead[pick];
        cand[2] = ahead[pick + 1];
        if (params_ahead(r, lo, mx, step, raised, lowered, ahead)) return ET_E_ARG;
        squared_errors(r, cand + 1, 2, err + 1);
    }
}

/* Min and max of a row; 0 when a value is not finite (x * 0 is NaN only for inf and NaN). */
ET_QUANT_INLINE int scan_row(const float *x, int32_t dim, float *mn, float *mx) {
    float lo[ET_QUANT_LANES], hi[ET_QUANT_LANES], nan[ET_QUANT_LANES] = {0};
    for (int k = 0; k < ET_QUANT_LANES; k++) lo[k] = hi[k] = x[0];
    const int32_t blocks = dim / ET_QUANT_LANES;
    for (int32_t block = 0; block < blocks; block++)
        for (int k = 0; k < ET_QUANT_LANES; k++) {
            const float v = x[block * ET_QUANT_LANES + k];
            lo[k] = v < lo[k] ? v : lo[k];
            hi[k] = v > hi[k] ? v : hi[k];
            nan[k] += v * 0.0f;
        }
    for (int32_t j = blocks * ET_QUANT_LANES; j < dim; j++) {
        lo[0] = x[j] < lo[0] ? x[j] : lo[0];
        hi[0] = x[j] > hi[0] ? x[j] : hi[0];
        nan[0] += x[j] * 0.0f;
    }
    for (int k = 1; k < ET_QUANT_LANES; k++) {
        lo[0] = lo[k] < lo[0] ? lo[k] : lo[0];
        hi[0] = hi[k] > hi[0] ? hi[k] : hi[0];
    }
    *mn = lo[0];
    *mx = hi[0];
    return lane_sum(nan) == 0.0f;
}

/* Packs count <= 8 codes of `bits` bits into ceil(count * bits / 8) bytes. */
ET_QUANT_INLINE void pack_group(const uint8_t *q, const int count, const int bits, uint8_t *out) {
    uint64_t word = 0;
    for (int k = 0; k < count; k++) word |= (uint64_t)q[k] << (k * bits);
    for (int b = 0; b < (count * bits + 7) / 8; b++) out[b] = (uint8_t)(word >> (8 * b));
}

/* Packs dim codes of `bits` bits into ceil(dim * bits / 8) bytes: whole groups, then the rest. */
ET_QUANT_INLINE void pack_codes(const uint8_t *q, int32_t dim, const int bits, uint8_t *out) {
    const int32_t groups = dim / ET_QUANT_GROUP;
    for (int32_t g = 0; g < groups; g++) pack_group(q + g * ET_QUANT_GROUP, ET_QUANT_GROUP, bits, out + g * bits);
    if (dim % ET_QUANT_GROUP)
        pack_group(q + groups * ET_QUANT_GROUP, dim % ET_QUANT_GROUP, bits, out + groups * bits);
}

/* pack_codes with the width a constant: the group loops unroll and the byte stores merge. */
ET_QUANT_INLINE void pack_row(const uint8_t *q, int32_t dim, int32_t bits, uint8_t *out) {
    switch (bits) {
    case 2: pack_codes(q, dim, 2, out); break;
    case 3: pack_codes(q, dim, 3, out); break;
    case 4: pack_codes(q, dim, 4, out); break;
    case 5: pack_codes(q, dim, 5, out); break;
    case 6: pack_codes(q, dim, 6, out); break;
    case 7: pack_codes(q, dim, 7, out); break;
    default: pack_codes(q, dim, 8, out); break;
    }
}

ET_QUANT_INLINE int quantize_row(et_qrow *r, const float *src, int32_t method, uint8_t *codes, float *lo,
                                 float *scale) {
    float mn, mx;
    if (!scan_row(src, r->dim, &mn, &mx)) return ET_E_ARG;
    const float largest = fabsf(mn) > fabsf(mx) ? fabsf(mn) : fabsf(mx);
    int e = exponent_of_float(largest);
    e = e < ET_QUANT_MIN_EXP ? ET_QUANT_MIN_EXP : e > ET_QUANT_MAX_EXP ? ET_QUANT_MAX_EXP : e;
    r->down = pow2f(-e);
    float *x = r->x;
    uint8_t *q = r->q;
    const int32_t dim = r->dim;
    const float down = r->down, levels = r->levels;
    for (int32_t j = 0; j < dim; j++) x[j] = src[j] * down;
    et_qparams p;
    int rc = method == ET_QUANT_ADAPTIVE ? search_params(r, mn, mx, &p)
                                         : params_for(r, round_to(mn, 0, r->fp16), mx, &p);
    if (rc) return rc;
    for (int32_t j = 0; j < dim; j++) q[j] = (uint8_t)(int32_t)nearest_code((x[j] - p.lo_n) * p.inv_n, levels);
    pack_row(q, dim, r->bits, codes);
    *lo = p.lo;
    *scale = p.scale;
    return ET_OK;
}

/* Unpacks count <= 8 codes and writes lo + q * scale, computed in double (q * scale
 * is exact there, and cannot overflow). */
ET_QUANT_INLINE void dequantize_group(const uint8_t *in, const int count, const int bits, float lo, float scale,
                                      float *out) {
    uint64_t word = 0;
    for (int b = 0; b < (count * bits + 7) / 8; b++) word |= (uint64_t)in[b] << (8 * b);
    for (int k = 0; k < count; k++)
        out[k] = (float)((double)lo + (int32_t)((word >> (k * bits)) & ((1u << bits) - 1)) * (double)scale);
}

ET_QUANT_INLINE void dequantize_codes(const uint8_t *in, float lo, float scale, int32_t dim, const int bits,
                                      float *out) {
    const int32_t groups = dim / ET_QUANT_GROUP;
    for (int32_t g = 0; g < groups; g++)
        dequantize_group(in + g * bits, ET_QUANT_GROUP, bits, lo, scale, out + g * ET_QUANT_GROUP);
    if (dim % ET_QUANT_GROUP)
        dequantize_group(in + groups * bits, dim % ET_QUANT_GROUP, bits, lo, scale, out + groups * ET_QUANT_GROUP);
}

/* dequantize_codes with the width a constant, as pack_row. */
ET_QUANT_INLINE void dequantize_row(const uint8_t *in, float lo, float scale, int32_t dim, int32_t bits,
                                    float *out) {
    switch (bits) {
    case 2: dequantize_codes(in, lo, scale, dim, 2, out); break;
    case 3: dequantize_codes(in, lo, scale, dim, 3, out); break;
    case 4: dequantize_codes(in, lo, scale, dim, 4, out); break;
    case 5: dequantize_codes(in, lo, scale, dim, 5, out); break;
    case 6: dequantize_codes(in, lo, scale, dim, 6, out); break;
    case 7: dequantize_codes(in, lo, scale, dim, 7, out); break;
    default: dequantize_codes(in, lo, scale, dim, 8, out); break;
    }
}

/* ---- calls split across the pool ---------------------------------------- */

typedef struct {
    int64_t n;
    int32_t dim;
    int32_t bits;
    int64_t row_bytes;
    int err[ET_QUANT_MAX_PARTS];
    int64_t err_pos[ET_QUANT_MAX_PARTS]; /* the row, -1 when the error has none */
} et_qcall;

typedef struct {
    et_qcall c; /* first: the part functions get the call through it */
    const float *rows;
    int32_t method;
    int32_t fp16;
    uint8_t *codes;
    float *lo;
    float *scale;
} et_quantize_call;

typedef struct {
    et_qcall c;
    const uint8_t *codes;
    const float *lo;
    const float *scale;
    float *rows;
} et_dequantize_call;

/* Parameters dequantize accepts: finite, scale >= 0, and lo + L * scale within the float range. */
static int valid_params(float lo, float scale, int32_t bits) {
    return scale >= 0.0f && lo >= -FLT_MAX && (double)lo + (double)((1 << bits) - 1) * scale <= FLT_MAX;
}

/* Rows [r0, r1) of a call: r1 when all went well, else the first row that
 * failed, with its error in *rc. */
ET_QUANT_INLINE int64_t quantize_rows(const et_quantize_call *q, et_qrow *r, int64_t r0, int64_t r1, int *rc) {
    const et_qcall *c = &q->c;
    for (int64_t row = r0; row < r1; row++) {
        *rc = quantize_row(r, q->rows + row * c->dim, q->method, q->codes + row * c->row_bytes, &q->lo[row],
                           &q->scale[row]);
        if (*rc) return row;
    }
    return r1;
}

ET_QUANT_INLINE int64_t dequantize_rows(const et_dequantize_call *d, int64_t r0, int64_t r1, int *rc) {
    const et_qcall *c = &d->c;
    for (int64_t row = r0; row < r1; row++) {
        if (!valid_params(d->lo[row], d->scale[row], c->bits)) {
            *rc = ET_E_ARG;
            return row;
        }
        dequantize_row(d->codes + row * c->row_bytes, d->lo[row], d->scale[row], c->dim, c->bits,
                       d->rows + row * c->dim);
    }
    return r1;
}

static int64_t quantize_rows_generic(const et_quantize_call *q, et_qrow *r, int64_t r0, int64_t r1, int *rc) {
    return quantize_rows(q, r, r0, r1, rc);
}

static int64_t dequantize_rows_generic(const et_dequantize_call *d, int64_t r0, int64_t r1, int *rc) {
    return dequantize_rows(d, r0, r1, rc);
}

#pragma GCC push_options
#pragma GCC target("avx2")
static int64_t quantize_rows_avx2(const et_quantize_call *q, et_qrow *r, int64_t r0, int64_t r1, int *rc) {
    return quantize_rows(q, r, r0, r1, rc);
}

static int64_t dequantize_rows_avx2(const et_dequantize_call *d, int64_t r0, int64_t r1, int *rc) {
    return dequantize_rows(d, r0, r1, rc);
}
#pragma GCC pop_options

static int check_shape(int64_t n, int32_t dim, int32_t bits) {
    return n < 0 || dim <= 0 || bits < ET_QUANT_MIN_BITS || bits > ET_QUANT_MAX_BITS ? ET_E_ARG : ET_OK;
}

int64_t et_quant_row_bytes(int32_t dim, int32_t bits) {
    return check_shape(0, dim, bits) ? ET_E_ARG : ((int64_t)dim * bits + 7) / 8;
}

static void part_rows(const et_qcall *c, int part, int parts, int64_t *r0, int64_t *r1) {
    *r0 = c->n * part / parts;
    *r1 = c->n * (part + 1) / parts;
}

/* Notes the error of a part whose rows ended at row before r1. */
static void record(et_qcall *c, int part, int rc, int64_t row, int64_t r1) {
    if (row == r1) return;
    c->err[part] = rc;
    c->err_pos[part] = row;
}

/* Runs fn over parts of the rows; the first error of the lowest part wins (the lowest bad row). */
static int run_parts(et_qcall *c, void (*fn)(void *, int, int), int64_t *err_pos) {
    int64_t parts = c->n / ET_QUANT_MIN_ROWS_PER_PART;
    if (parts > et_kernel_threads()) parts = et_kernel_threads();
    if (parts > ET_QUANT_MAX_PARTS) parts = ET_QUANT_MAX_PARTS;
    if (parts < 1) parts = 1;
    for (int i = 0; i < parts; i++) {
        c->err[i] = ET_OK;
        c->err_pos[i] = -1;
    }
    et_pool_run(fn, c, (int)parts);
    for (int i = 0; i < parts; i++)
        if (c->err[i]) {
            if (c->err_pos[i] >= 0) *err_pos = c->err_pos[i];
            return c->err[i];
        }
    return ET_OK;
}

static void quantize_part(void *arg, int part, int parts) {
    et_quantize_call *q = arg;
    et_qcall *c = &q->c;
    int64_t r0, r1;
    part_rows(c, part, parts, &r0, &r1);
    const int32_t blocks = (int32_t)(((int64_t)c->dim + ET_QUANT_LANES - 1) / ET_QUANT_LANES);
    const size_t padded = (size_t)blocks * ET_QUANT_LANES;
    float *x = calloc(padded, 2 * sizeof *x + 1);
    if (!x) {
        c->err[part] = ET_E_NOMEM;
        return;
    }
    et_qrow r = {.x = x, .weight = x + padded, .q = (uint8_t *)(x + 2 * padded), .dim = c->dim, .blocks = blocks,
                 .bits = c->bits, .levels = (float)((1 << c->bits) - 1), .inv_levels = 1.0 / ((1 << c->bits) - 1),
                 .down = 1.0f, .fp16 = q->fp16 != 0};
    for (int32_t j = 0; j < c->dim; j++) r.weight[j] = 1.0f;
    int rc = ET_OK;
    int64_t row = et_isa() >= ET_ISA_AVX2 ? quantize_rows_avx2(q, &r, r0, r1, &rc)
                                          : quantize_rows_generic(q, &r, r0, r1, &rc);
    record(c, part, rc, row, r1);
    free(x);
}

/* ET_E_SIZE naming the first of a call's buffers that is too small: the rows (n x dim floats), the
 * codes (n x row_bytes), lo or scale (n each). */
static int check_sizes(int64_t n, int32_t dim, int64_t row_bytes, int64_t rows_len, int64_t codes_bytes,
                       int64_t lo_len, int64_t scale_len, int64_t *err_pos) {
    const int which = !et_holds(rows_len, n, dim)           ? ET_BUF_ROWS
                      : !et_holds(codes_bytes, n, row_bytes) ? ET_BUF_CODES
                      : !et_holds(lo_len, n, 1)              ? ET_BUF_LO
                      : !et_holds(scale_len, n, 1)           ? ET_BUF_SCALE
                                                             : 0;
    if (!which) return ET_OK;
    *err_pos = which;
    return ET_E_SIZE;
}

int et_quantize(const float *rows, int64_t rows_len, int64_t n, int32_t dim, int32_t bits, int32_t method,
                int32_t params_fp16, uint8_t *codes, int64_t codes_bytes, float *lo, int64_t lo_len, float *scale,
                int64_t scale_len, int64_t *err_pos) {
    if (check_shape(n, dim, bits) || (method != ET_QUANT_MINMAX && method != ET_QUANT_ADAPTIVE) ||
        (n > 0 && (!rows || !codes || !lo || !scale || !err_pos)))
        return ET_E_ARG;
    const int64_t row_bytes = et_quant_row_bytes(dim, bits);
    int rc = check_sizes(n, dim, row_bytes, rows_len, codes_bytes, lo_len, scale_len, err_pos);
    if (rc || n == 0) return rc;
    et_quantize_call q = {.c = {.n = n, .dim = dim, .bits = bits, .row_bytes = row_bytes},
                          .rows = rows, .method = method, .fp16 = params_fp16, .codes = codes, .lo = lo,
                          .scale = scale};
    return run_parts(&q.c, quantize_part, err_pos);
}

static void dequantize_part(void *arg, int part, int parts) {
    et_dequantize_call *d = arg;
    int64_t r0, r1;
    part_rows(&d->c, part, parts, &r0, &r1);
    int rc = ET_OK;
    int64_t row = et_isa() >= ET_ISA_AVX2 ? dequantize_rows_avx2(d, r0, r1, &rc)
                                          : dequantize_rows_generic(d, r0, r1, &rc);
    record(&d->c, part, rc, row, r1);
}

int et_dequantize(const uint8_t *codes, int64_t codes_bytes, const float *lo, int64_t lo_len, const float *scale,
                  int64_t scale_len, int64_t n, int32_t dim, int32_t bits, float *rows, int64_t rows_len,
                  int64_t *err_pos) {
    if (check_shape(n, dim, bits) || (n > 0 && (!codes || !lo || !scale || !rows || !err_pos))) return ET_E_ARG;
    const int64_t row_bytes = et_quant_row_bytes(dim, bits);
    int rc = check_sizes(n, dim, row_bytes, rows_len, codes_bytes, lo_len, scale_len, err_pos);
    if (rc || n == 0) return rc;
    et_dequantize_call d = {.c = {.n = n, .dim = dim, .bits = bits, .row_bytes = row_bytes},
                            .codes = codes, .lo = lo, .scale = scale, .rows = rows};
    return run_parts(&d.c, dequantize_part, err_pos);
}
