/* Gather and pool kernels over a tiered table, and row writes.
 *
 * Instruction sets: the loop in kernel_loop.h is compiled three times, for
 * AVX-512 (16 floats a vector), for AVX2 + F16C + FMA (8 floats), and for
 * plain C, and one of them is chosen once per process from CPUID.
 * A runtime choice rather than target_clones because the fp16 and int8
 * paths are written with F16C / AVX-512 intrinsics that a default clone
 * could not contain, and because tests can force each lower path
 * (et_force_isa) and check all three on one machine.
 *
 * Every call checks its pointers, the sizes of its buffers, its ids and
 * lengths before it touches a row, takes the table's read lock (writes take
 * the write lock, so no reader sees a row half-written) and splits the bags
 * across the kernel thread pool.  The placement map adds one lookup per id
 * that a plain embedding table does not have, and every entry is checked
 * (et_loc_valid: one compare-and-branch) before anything is indexed by it;
 * two paths keep the map off the critical path:
 *  - a table with no SCM chunks resolves ids inside the row loop
 *    ("fused"), in a pipeline: placement entry prefetched, then checked and
 *    resolved, then the row prefetched, each stage one prefetch distance
 *    apart;
 *  - a table with SCM chunks resolves all ids first, reads the request's
 *    SCM rows in one batch (scm_io.c), then pools.
 * Row prefetches go to L2 (prefetcht1): measured faster than prefetcht0 on
 * random rows, because more rows can be in flight.  Access counting runs as
 * a separate strided pass over the sampled positions. */
#include "et_internal.h"

#include <immintrin.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define ET_ALWAYS_INLINE static inline __attribute__((always_inline))
#define ET_MAX_PARTS 64
#define ET_MIN_ROWS_PER_PART 8192
#define ET_RESOLVE_AHEAD 32   /* positions ahead in the resolve and counting passes */
#define ET_ROW_LOCALITY 2     /* __builtin_prefetch locality of rows: 2 = prefetcht1 (into L2) */
#define ET_CXL_DELAY_CAP_NS 10000000000ull /* the longest injected wait of one part of a call: 10 s */

enum { ET_OP_ADD, ET_OP_MAX };
enum { ET_PHASE_RESOLVE = 1, ET_PHASE_POOL = 2, ET_PHASE_FUSED = 4 };

typedef struct {
    et_table *t;
    const int64_t *ids;
    int64_t n;
    const int32_t *lengths;
    const float *weights;
    float *out;
    int32_t mode;
    int32_t gather;
    uint32_t salt;
    int phase;             /* ET_PHASE_*: what run_part does */
    int count_heat;        /* lookups count accesses; raw reads do not */
    const int64_t *keys;   /* a keyed lookup of a HASHED or MANAGED table: the keys, which each part
                              translates into ids (the rows) before it resolves them; NULL otherwise */
    int64_t unknown[ET_MAX_PARTS]; /* per part: keys with no row (MANAGED), read from the default row */
    const uint8_t **rows;  /* [n]: bytes of the row at each position, set by the resolve phase */
    int64_t scm_rows[ET_MAX_PARTS]; /* per part: positions left for the SCM batch (rows[p] == NULL) */
    int64_t tier_rows[ET_MAX_PARTS][ET_NUM_TIERS]; /* per part: rows served from each tier */
    int64_t *part_rows;    /* NULL, or [parts][t->nparts]: per part, rows served from each fabric part */
    int dram_only;         /* a fused call on a table whose only rows are in DRAM chunks of one fabric part
                              (dram_part): the rows are counted per part once, not one by one */
    int direct;            /* dram_only, and the map is the identity (t->displaced == 0): a row's entry is
                              its id, so the loop does not read the map */
    int dram_part;
    int64_t bag_start[ET_MAX_PARTS + 1];
    int64_t pos_start[ET_MAX_PARTS + 1];
    int err[ET_MAX_PARTS];
    int64_t err_pos[ET_MAX_PARTS];
} et_call;

static atomic_uint call_salt;

/* ---- helpers shared by every instruction set ---------------------------- */

/* A saturating access counter; concurrent bumps may be lost, which only
 * makes the count approximate. */
ET_ALWAYS_INLINE void et_count(const et_table *t, int64_t id) {
    uint8_t h = t->heat[id];
    if (h != 255) t->heat[id] = (uint8_t)(h + 1);
}

/* Resolves positions [p0, p1) to row addresses: memory rows directly, SCM
 * rows left NULL for the batch read.  The placement entries of one request
 * are independent loads, prefetched ET_RESOLVE_AHEAD positions ahead, so
 * this pass runs at memory-level parallelism instead of putting one more
 * dependent miss in front of every row.  Accesses are counted in a second,
 * strided pass over the sampled positions only. */
static int resolve_range(et_call *c, int part, int64_t p0, int64_t p1) {
    const et_table *t = c->t;
    const et_map map = t->map;
    const int64_t *restrict ids = c->ids;
    const uint32_t *restrict loc = t->loc;
    const uint8_t **restrict rows = c->rows;
    int64_t scm = 0;
    for (int64_t p = p0; p < p1; p++) {
        if (p + ET_RESOLVE_AHEAD < p1) __builtin_prefetch(&loc[ids[p + ET_RESOLVE_AHEAD]], 0, 3);
        const uint32_t l = loc[ids[p]];
        if (!et_loc_valid(&map, l)) {
            c->err_pos[part] = p;
            return ET_E_LOCATION;
        }
        const uint8_t *row = et_loc_row(&map, l);
        c->tier_rows[part][et_loc_tier(t, l)]++;
        if (c->part_rows) c->part_rows[(int64_t)part * t->nparts + et_loc_part(t, l)]++;
        scm += !row;
        rows[p] = row;
    }
    c->scm_rows[part] = scm;
    return ET_OK;
}

/* Counts the sampled accesses of positions [p0, p1): a strided pass over
 * 1 in 2^heat_sample_shift positions, with the counters prefetched for writing. */
static void count_range(const et_call *c, int64_t p0, int64_t p1) {
    const et_table *t = c->t;
    const int64_t *restrict ids = c->ids;
    const uint32_t step = (uint32_t)t->heat_mask + 1;
    int64_t first = p0 + (int64_t)((step - (((uint32_t)p0 + c->salt) & (step - 1))) & (step - 1));
    for (int64_t p = first; p < p1; p += step) {
        if (p + ET_RESOLVE_AHEAD * step < p1) __builtin_prefetch(&t->heat[ids[p + ET_RESOLVE_AHEAD * step]], 1, 3);
        et_count(t, ids[p]);
    }
}

/* What the row loop needs to resolve and prefetch positions ahead, copied
 * out of the call and table so that the compiler keeps it in registers
 * (stores to rows[] could otherwise alias every field and force reloads). */
typedef struct {
    const int64_t *ids;
    const uint32_t *loc;
    const uint8_t **rows;
    int64_t *tier_rows;  /* this part's [ET_NUM_TIERS] */
    int64_t *part_rows;  /* this part's [nparts], or NULL */
    const uint8_t *chunk_part;
    et_map map;
    uint32_t tier_shift;
    uint32_t lines;  /* cache lines a row can touch */
    int pf;
    int fused;
    int direct;      /* the call's direct: entry = id */
} et_ahead;

static et_ahead et_ahead_of(et_call *c, int part) {
    const et_table *t = c->t;
    et_ahead a = {.ids = c->ids, .loc = t->loc, .rows = c->rows, .tier_rows = c->dram_only ? NULL : c->tier_rows[part],
                  .part_rows = c->part_rows ? c->part_rows + (int64_t)part * t->nparts : NULL,
                  .chunk_part = t->chunk_part, .map = t->map, .tier_shift = (uint32_t)t->tier_shift,
                  .lines = ((uint32_t)t->stride + 63) / 64 + (t->stride % 64 != 0), .pf = t->prefetch,
                  .fused = (c->phase & ET_PHASE_FUSED) != 0, .direct = c->direct};
    return a;
}

/* Prefetches the cache lines of a row (into L2: a row a few positions ahead
 * needs no L1 fill buffer yet, so more rows can be in flight). */
ET_ALWAYS_INLINE void et_prefetch_row(const et_ahead *a, const uint8_t *r) {
    const uint8_t *line = (const uint8_t *)((uintptr_t)r & ~(uintptr_t)63);
#define ET_PF(i) __builtin_prefetch(line + 64 * (i), 0, ET_ROW_LOCALITY)
    switch (a->lines) { /* unrolled for rows of up to 512 bytes */
    default:
        for (uint32_t i = 8; i < a->lines; i++) ET_PF(i);
        /* fall through */
    case 8: ET_PF(7); /* fall through */
    case 7: ET_PF(6); /* fall through */
    case 6: ET_PF(5); /* fall through */
    case 5: ET_PF(4); /* fall through */
    case 4: ET_PF(3); /* fall through */
    case 3: ET_PF(2); /* fall through */
    case 2: ET_PF(1); /* fall through */
    case 1: ET_PF(0);
    }
#undef ET_PF
}

/* Resolves position q (< end) of a fused call: stores its row address;
 * 0 when q's placement entry names no slot with storage.  Fused calls run
 * while no SCM chunk has slots, so a valid entry is a memory row. */
ET_ALWAYS_INLINE int et_resolve_one(const et_ahead *a, int64_t q) {
    const uint32_t l = a->direct ? (uint32_t)a->ids[q] : a->loc[a->ids[q]];
    if (!et_loc_valid(&a->map, l)) return 0;
    if (a->tier_rows) { /* (NULL: a DRAM-only call, counted at the end) */
        a->tier_rows[l >> a->tier_shift]++;
        if (a->part_rows) a->part_rows[a->chunk_part[l >> a->map.chunk_shift]]++;
    }
    a->rows[q] = et_loc_chunk(&a->map, l)->base + (uint64_t)(l & a->map.chunk_mask) * a->map.stride;
    return 1;
}

/* The pipeline ahead of row j of a part ending at end.  Fused calls (tables
 * without SCM rows) resolve ids as they go, three stages apart so that no
 * load waits on a miss: the placement entry of j + 3pf is prefetched, j + 2pf
 * is resolved to a row address, and the row of j + pf is prefetched.  Calls
 * resolved beforehand only prefetch the row.  Returns -1, or the position
 * whose home has no storage. */
ET_ALWAYS_INLINE int64_t et_ahead_at(const et_ahead *a, int64_t j, int64_t end) {
    const int64_t pf = a->pf;
    if (a->fused && j + 2 * pf < end) {
        const int64_t q = j + 2 * pf;
        if (q + pf < end && !a->direct) __builtin_prefetch(&a->loc[a->ids[q + pf]], 0, 3);
        if (!et_resolve_one(a, q)) return q;
    }
    if (j + pf < end && a->rows[j + pf]) et_prefetch_row(a, a->rows[j + pf]);
    return -1;
}

static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu, bits;
    if (exp == 0 && mant == 0) {
        bits = sign;
    } else if (exp == 0) { /* subnormal: normalise */
        exp = 127 - 15 + 1;
        while (!(mant & 0x400u)) {
            mant <<= 1;
            exp--;
        }
        bits = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Scale and bias of an int8 row, already multiplied by the weight. */
ET_ALWAYS_INLINE void et_i8_params(const uint8_t *row, int dim, float w, float *ws, float *wb) {
    const float *sb = (const float *)(row + ((dim + 3) & ~3));
    *ws = w * sb[0];
    *wb = w * sb[1];
}

/* ---- plain C ------------------------------------------------------------ */
#define ET_ISA(name) name##_generic
#define ET_VEC float
#define ET_W 1
#define ET_MAXV 8

ET_ALWAYS_INLINE float sload_generic(const uint8_t *row, int j, int dtype, float w, float ws, float wb) {
    return dtype == ET_DTYPE_F32   ? w * ((const float *)row)[j]
           : dtype == ET_DTYPE_F16 ? w * half_to_float(((const uint16_t *)row)[j])
                                   : ws * (float)row[j] + wb;
}
ET_ALWAYS_INLINE float vset_generic(float x) { return x; }
ET_ALWAYS_INLINE float vadd_generic(float a, float b) { return a + b; }
ET_ALWAYS_INLINE float vmax_generic(float a, float b) { return fmaxf(a, b); }
ET_ALWAYS_INLINE void vstore_generic(float *out, float v) { *out = v; }
ET_ALWAYS_INLINE float vload_generic(const uint8_t *row, int j, int dtype, float w, float ws, float wb) {
    return sload_generic(row, j, dtype, w, ws, wb);
}
#include "kernel_loop.h"
#undef ET_ISA
#undef ET_VEC
#undef ET_W
#undef ET_MAXV

/* ---- AVX2 + F16C + FMA -------------------------------------------------- */
#pragma GCC push_options
#pragma GCC target("avx2,f16c,fma")
#define ET_ISA(name) name##_avx2
#define ET_VEC __m256
#define ET_W 8
#define ET_MAXV 8

ET_ALWAYS_INLINE float sload_avx2(const uint8_t *row, int j, int dtype, float w, float ws, float wb) {
    return dtype == ET_DTYPE_F32   ? w * ((const float *)row)[j]
           : dtype == ET_DTYPE_F16 ? w * _cvtsh_ss(((const uint16_t *)row)[j])
                                   : ws * (float)row[j] + wb;
}
ET_ALWAYS_INLINE __m256 vset_avx2(float x) { return _mm256_set1_ps(x); }
ET_ALWAYS_INLINE __m256 vadd_avx2(__m256 a, __m256 b) { return _mm256_add_ps(a, b); }
ET_ALWAYS_INLINE __m256 vmax_avx2(__m256 a, __m256 b) { return _mm256_max_ps(a, b); }
ET_ALWAYS_INLINE void vstore_avx2(float *out, __m256 v) { _mm256_storeu_ps(out, v); }
ET_ALWAYS_INLINE __m256 vload_avx2(const uint8_t *row, int j, int dtype, __m256 vw, __m256 vs, __m256 vb) {
    if (dtype == ET_DTYPE_F32) return _mm256_mul_ps(vw, _mm256_loadu_ps((const float *)row + j));
    if (dtype == ET_DTYPE_F16)
        return _mm256_mul_ps(vw, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)row + j))));
    __m128i q = _mm_loadl_epi64((const __m128i *)(row + j));
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q)), vs, vb);
}
#include "kernel_loop.h"
#undef ET_ISA
#undef ET_VEC
#undef ET_W
#undef ET_MAXV
#pragma GCC pop_options

/* ---- AVX-512 F/BW/VL ---------------------------------------------------- */
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,f16c,fma")
#define ET_ISA(name) name##_avx512
#define ET_VEC __m512
#define ET_W 16
#define ET_MAXV 8

#define sload_avx512 sload_avx2 /* scalar tails: F16C is all they need, and AVX-512 hosts have it */
ET_ALWAYS_INLINE __m512 vset_avx512(float x) { return _mm512_set1_ps(x); }
ET_ALWAYS_INLINE __m512 vadd_avx512(__m512 a, __m512 b) { return _mm512_add_ps(a, b); }
ET_ALWAYS_INLINE __m512 vmax_avx512(__m512 a, __m512 b) { return _mm512_max_ps(a, b); }
ET_ALWAYS_INLINE void vstore_avx512(float *out, __m512 v) { _mm512_storeu_ps(out, v); }
ET_ALWAYS_INLINE __m512 vload_avx512(const uint8_t *row, int j, int dtype, __m512 vw, __m512 vs, __m512 vb) {
    if (dtype == ET_DTYPE_F32) return _mm512_mul_ps(vw, _mm512_loadu_ps((const float *)row + j));
    if (dtype == ET_DTYPE_F16)
        return _mm512_mul_ps(vw, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)row + j))));
    __m128i q = _mm_loadu_si128((const __m128i *)(row + j));
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q)), vs, vb);
}
#include "kernel_loop.h"
#undef ET_ISA
#undef ET_VEC
#undef ET_W
#undef ET_MAXV
#undef sload_avx512
#pragma GCC pop_options

/* ---- dispatch ----------------------------------------------------------- */

static int detect_isa(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma"))
        return ET_ISA_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma"))
        return ET_ISA_AVX2;
    return ET_ISA_GENERIC;
}

static atomic_int active_isa = -1;

int32_t et_isa(void) {
    int isa = atomic_load(&active_isa);
    if (isa < 0) {
        isa = detect_isa();
        atomic_store(&active_isa, isa);
    }
    return isa;
}

int et_force_isa(int32_t isa) {
    if (isa < ET_ISA_GENERIC || isa > detect_isa()) return ET_E_ARG;
    atomic_store(&active_isa, isa);
    return ET_OK;
}

static uint64_t monotonic_ns(void) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (uint64_t)now.tv_sec * 1000000000u + (uint64_t)now.tv_nsec;
}

/* The injected latency of the CXL rows a part served (et_table_set_cxl_delay):
 * a busy wait, as a core stalled on memory stays busy; a sleep would give
 * the core away and wake late by more than a row's latency. */
static void inject_cxl_delay(const et_call *c, int part) {
    const uint64_t per_row = c->t->cxl_delay_ns;
    const uint64_t rows = (uint64_t)c->tier_rows[part][ET_TIER_CXL];
    if (per_row == 0 || rows == 0) return;
    const uint64_t wait = rows > ET_CXL_DELAY_CAP_NS / per_row ? ET_CXL_DELAY_CAP_NS : rows * per_row;
    const uint64_t until = monotonic_ns() + wait;
    while (monotonic_ns() < until) _mm_pause();
}

static void run_part(void *arg, int part, int parts) {
    (void)parts;
    et_call *c = arg;
    if (c->keys && (c->phase & (ET_PHASE_RESOLVE | ET_PHASE_FUSED))) /* a part reads only its own positions */
        c->unknown[part] = et_keys_translate(c->t, c->keys, (int64_t *)c->ids, c->pos_start[part],
                                             c->pos_start[part + 1]);
    if (c->count_heat && (c->phase & (ET_PHASE_RESOLVE | ET_PHASE_FUSED)))
        count_range(c, c->pos_start[part], c->pos_start[part + 1]);
    if (c->phase & ET_PHASE_RESOLVE) {
        c->err[part] = resolve_range(c, part, c->pos_start[part], c->pos_start[part + 1]);
        if (c->err[part] || !(c->phase & ET_PHASE_POOL)) return;
    }
    switch (et_isa()) {
    case ET_ISA_AVX512: part_avx512(c, part); break;
    case ET_ISA_AVX2: part_avx2(c, part); break;
    default: part_generic(c, part); break;
    }
    if (c->dram_only && !c->err[part]) { /* every position of the part was a DRAM row */
        const int64_t rows = c->pos_start[part + 1] - c->pos_start[part];
        c->tier_rows[part][ET_TIER_DRAM] = rows;
        if (c->part_rows) c->part_rows[(int64_t)part * c->t->nparts + c->dram_part] = rows;
    }
    if (!c->err[part]) inject_cxl_delay(c, part);
}

/* ---- validation and partitioning ---------------------------------------- */

/* ET_E_SIZE naming buffer `which` (ET_BUF_*). */
static int size_error(int which, int64_t *err_pos) {
    *err_pos = which;
    return ET_E_SIZE;
}

/* Checks that every placement entry a call will use names a slot with storage: locs[0..n), or the
 * homes of ids[0..n) (checked ids) when locs is NULL. */
static int check_entries(const et_table *t, const int64_t *ids, const uint32_t *locs, int64_t n,
                         int64_t *err_pos) {
    for (int64_t p = 0; p < n; p++)
        if (!et_loc_valid(&t->map, locs ? locs[p] : t->loc[ids[p]])) {
            *err_pos = p;
            return ET_E_LOCATION;
        }
    return ET_OK;
}

static int check_ids(const int64_t *ids, int64_t n, int64_t num_rows, int64_t *err_pos) {
    for (int64_t s = 0; s < n; s += 4096) {
        int64_t e = s + 4096 < n ? s + 4096 : n;
        /* An id is bad when it or num_rows - 1 - id has the top bit set: an OR that vectorises. */
        uint64_t signs = 0;
        for (int64_t p = s; p < e; p++) signs |= (uint64_t)ids[p] | ((uint64_t)num_rows - 1 - (uint64_t)ids[p]);
        if (!(signs >> 63)) continue;
        for (int64_t p = s; p < e; p++)
            if ((uint64_t)ids[p] >= (uint64_t)num_rows) {
                *err_pos = p;
                return ET_E_ID_RANGE;
            }
    }
    return ET_OK;
}

static int plan_parts(int64_t n) {
    int64_t parts = n / ET_MIN_ROWS_PER_PART;
    int64_t threads = et_kernel_threads();
    if (parts > threads) parts = threads;
    if (parts > ET_MAX_PARTS) parts = ET_MAX_PARTS;
    return parts < 1 ? 1 : (int)parts;
}

/* Checks the lengths and cuts the bags into parts of about n / parts ids each. */
static int split_bags(et_call *c, int64_t bags, int parts, int64_t *err_pos) {
    int64_t total = 0;
    int part = 1;
    c->bag_start[0] = 0;
    c->pos_start[0] = 0;
    for (int64_t b = 0; b < bags; b++) {
        int32_t len = c->gather ? 1 : c->lengths[b];
        if (len < 0) {
            *err_pos = b;
            return ET_E_LENGTHS;
        }
        if (part < parts && total >= c->n * part / parts) {
            c->bag_start[part] = b;
            c->pos_start[part] = total;
            part++;
        }
        total += len;
    }
    if (total != c->n) {
        *err_pos = -1;
        return ET_E_LENGTHS;
    }
    for (; part <= parts; part++) {
        c->bag_start[part] = bags;
        c->pos_start[part] = total;
    }
    return ET_OK;
}

/* First error of any part, lowest part first. */
static int part_error(const et_call *c, int parts, int64_t *err_pos) {
    for (int i = 0; i < parts; i++)
        if (c->err[i]) {
            *err_pos = c->err_pos[i];
            return c->err[i];
        }
    return ET_OK;
}

/* Resolves every position, then reads the request's SCM rows in one batch. */
static int resolve_all(et_call *c, int parts, void **staging, int64_t *err_pos) {
    c->phase = ET_PHASE_RESOLVE;
    et_pool_run(run_part, c, parts);
    int rc = part_error(c, parts, err_pos);
    int64_t count = 0;
    for (int i = 0; i < parts; i++) count += c->scm_rows[i];
    if (rc || count == 0) return rc;
    int64_t *pos = malloc((size_t)count * sizeof *pos);
    if (!pos) return ET_E_NOMEM;
    for (int64_t p = 0, k = 0; p < c->n; p++)
        if (!c->rows[p]) pos[k++] = p;
    rc = et_scm_fetch(c->t, c->ids, pos, count, c->rows, staging, err_pos);
    free(pos);
    return rc;
}

/* Checks a lookup's arguments (by_key 0 or 1) and buffer sizes: out holds bags x dim floats, weights
 * one per id, tier_rows and part_rows a count per tier and per fabric part. */
static int check_lookup(const et_call *c, int64_t bags, int64_t weights_len, int64_t out_len,
                        const int64_t *tier_rows, int64_t tier_rows_len, const int64_t *part_rows,
                        int64_t part_rows_len, int32_t by_key, int64_t *err_pos) {
    const et_table *t = c->t;
    if (bags < 0 || c->n < 0 || (c->n > 0 && !c->ids) || (bags > 0 && !c->out) || (part_rows && !t->chunk_part) ||
        (uint32_t)by_key > 1)
        return ET_E_ARG;
    if (c->weights && weights_len != c->n) return size_error(ET_BUF_WEIGHTS, err_pos);
    if (!et_holds(out_len, bags, t->dim)) return size_error(ET_BUF_OUT, err_pos);
    if (tier_rows && tier_rows_len < ET_NUM_TIERS) return size_error(ET_BUF_TIER_ROWS, err_pos);
    if (part_rows && part_rows_len < t->nparts) return size_error(ET_BUF_PART_ROWS, err_pos);
    return ET_OK;
}

/* Whether a lookup with by_key (0 or 1, checked with the other arguments) translates its ids: a
 * HASHED, MANAGED or MAPPED table's keys. */
static int translates(const et_table *t, int32_t by_key) { return by_key && t->key_space != ET_KEYS_DENSE; }

/* Whether every valid placement entry of a table names a DRAM row of one fabric part (*part; 0
 * without parts): no CXL or SCM chunk has slots, and the DRAM chunks with slots share a part.  Read
 * under the table's lock, which the setters of chunks and parts take for writing. */
static int dram_only(const et_table *t, int *part) {
    *part = -1;
    if (t->cxl_chunks || t->scm_chunks) return 0;
    if (!t->chunk_part) return (*part = 0, 1);
    for (int64_t k = 0; k < t->max_chunks; k++) {
        const uint32_t e = (uint32_t)((ET_TIER_DRAM << (t->tier_shift - t->chunk_shift)) | k);
        if (!t->map.chunks[e].slots) continue;
        if (*part >= 0 && t->chunk_part[e] != *part) return 0;
        *part = t->chunk_part[e];
    }
    if (*part < 0) *part = 0;
    return 1;
}

static int run_lookup(et_call *c, int64_t bags, int32_t by_key, int64_t *unknown, int64_t *part_rows,
                      int64_t *err_pos) {
    et_table *t = c->t;
    const int translate = translates(t, by_key);
    int rc = translate ? ET_OK : check_ids(c->ids, c->n, t->num_rows, err_pos);
    if (rc) return rc;
    int parts = plan_parts(c->n);
    rc = split_bags(c, bags, parts, err_pos);
    if (rc) return rc;
    int64_t *translated = NULL;
    if (translate) {
        translated = malloc((size_t)(c->n > 0 ? c->n : 1) * sizeof *translated);
        if (!translated) return ET_E_NOMEM;
        c->keys = c->ids;
        c->ids = translated;
        if (t->keys) et_keys_tick(t);
    }
    c->rows = malloc((size_t)(c->n > 0 ? c->n : 1) * sizeof *c->rows);
    if (part_rows) c->part_rows = calloc((size_t)parts * (size_t)t->nparts, sizeof *c->part_rows);
    if (!c->rows || (part_rows && !c->part_rows)) {
        free(c->rows);
        free(c->part_rows);
        free(translated);
        return ET_E_NOMEM;
    }
    c->salt = atomic_fetch_add(&call_salt, 0x9e3779b9u);
    c->count_heat = 1;
    for (int i = 0; i < parts; i++) c->err[i] = ET_OK;

    pthread_rwlock_rdlock(&t->lock);
    void *staging = NULL;
    if (atomic_load(&t->dropped)) {
        rc = ET_E_DROPPED;
    } else if (t->scm_chunks == 0) {
        /* No SCM rows possible: each part resolves and pools its own range in one pass. */
        c->phase = ET_PHASE_FUSED;
        c->dram_only = dram_only(t, &c->dram_part);
        c->direct = c->dram_only && t->displaced == 0;
        et_pool_run(run_part, c, parts);
        rc = part_error(c, parts, err_pos);
    } else {
        rc = resolve_all(c, parts, &staging, err_pos);
        if (rc == ET_OK) {
            c->phase = ET_PHASE_POOL;
            et_pool_run(run_part, c, parts);
            rc = part_error(c, parts, err_pos);
        }
    }
    pthread_rwlock_unlock(&t->lock);
    int64_t missed = 0;
    for (int i = 0; i < parts; i++) missed += c->unknown[i];
    if (rc == ET_OK && t->keys && missed) atomic_fetch_add(&t->keys->unknown, missed);
    if (unknown) *unknown = rc == ET_OK ? missed : 0;
    free(translated);
    free(staging);
    free(c->rows);
    if (part_rows) {
        for (int32_t k = 0; k < t->nparts; k++) {
            part_rows[k] = 0;
            for (int i = 0; i < parts; i++) part_rows[k] += c->part_rows[(int64_t)i * t->nparts + k];
        }
        free(c->part_rows);
    }
    return rc;
}

/* Sums the parts' tier counts into tier_rows (when asked for). */
static void report_tiers(const et_call *c, int64_t *tier_rows) {
    if (!tier_rows) return;
    for (int k = 0; k < ET_NUM_TIERS; k++) {
        tier_rows[k] = 0;
        for (int i = 0; i < ET_MAX_PARTS; i++) tier_rows[k] += c->tier_rows[i][k];
    }
}

int et_gather(et_table *t, const int64_t *ids, int64_t n, float *out, int64_t out_len, int64_t *tier_rows,
              int64_t tier_rows_len, int64_t *part_rows, int64_t part_rows_len, int32_t by_key, int64_t *unknown,
              int64_t *err_pos) {
    et_call c = {.t = t, .ids = ids, .n = n, .out = out, .mode = ET_POOL_SUM, .gather = 1};
    int rc = check_lookup(&c, n, 0, out_len, tier_rows, tier_rows_len, part_rows, part_rows_len, by_key, err_pos);
    if (rc) return rc;
    rc = run_lookup(&c, n, by_key, unknown, part_rows, err_pos);
    report_tiers(&c, tier_rows);
    return rc;
}

int et_pool(et_table *t, const int64_t *ids, int64_t n, const int32_t *lengths, int64_t bags,
            const float *weights, int64_t weights_len, int32_t mode, float *out, int64_t out_len,
            int64_t *tier_rows, int64_t tier_rows_len, int64_t *part_rows, int64_t part_rows_len, int32_t by_key,
            int64_t *unknown, int64_t *err_pos) {
    if (mode < ET_POOL_SUM || mode > ET_POOL_MAX || (bags > 0 && !lengths)) return ET_E_ARG;
    et_call c = {.t = t, .ids = ids, .n = n, .lengths = lengths, .weights = weights, .out = out, .mode = mode};
    int rc = check_lookup(&c, bags, weights_len, out_len, tier_rows, tier_rows_len, part_rows, part_rows_len,
                          by_key, err_pos);
    if (rc) return rc;
    rc = run_lookup(&c, bags, by_key, unknown, part_rows, err_pos);
    report_tiers(&c, tier_rows);
    return rc;
}

/* The counting pass of et_partition (lengths checked, under the read lock): each position's part,
 * rows per (part, bag) and per part; ET_E_LOCATION for an entry that names no slot with storage. */
static int count_parts(const et_table *t, const int64_t *ids, int64_t n, const int32_t *lengths, int64_t bags,
                       uint8_t *part, int32_t *out_lengths, int64_t *part_rows, int64_t *err_pos) {
    for (int64_t b = 0, p = 0; b < bags; b++)
        for (int32_t k = 0; k < lengths[b]; k++, p++) {
            if (p + ET_RESOLVE_AHEAD < n) __builtin_prefetch(&t->loc[ids[p + ET_RESOLVE_AHEAD]], 0, 3);
            const uint32_t l = t->loc[ids[p]];
            if (!et_loc_valid(&t->map, l)) {
                *err_pos = p;
                return ET_E_LOCATION;
            }
            const uint8_t pt = et_loc_part(t, l);
            part[p] = pt;
            out_lengths[(int64_t)pt * bags + b]++;
            part_rows[pt]++;
        }
    return ET_OK;
}

int et_partition(et_table *t, const int64_t *ids, int64_t n, const int32_t *lengths, int64_t bags,
                 const float *weights, int64_t weights_len, int64_t *out_ids, int64_t out_ids_len,
                 int32_t *out_lengths, int64_t out_lengths_len, float *out_weights, int64_t out_weights_len,
                 int64_t *part_rows, int64_t part_rows_len, int32_t by_key, int64_t *unknown, int64_t *err_pos) {
    if (n < 0 || bags < 0 || (n > 0 && (!ids || !out_ids)) || (bags > 0 && (!lengths || !out_lengths)) ||
        !part_rows || (weights && !out_weights) || !t->chunk_part || (uint32_t)by_key > 1)
        return ET_E_ARG;
    if (weights && weights_len != n) return size_error(ET_BUF_WEIGHTS, err_pos);
    if (!et_holds(out_ids_len, n, 1)) return size_error(ET_BUF_OUT_IDS, err_pos);
    if (!et_holds(out_lengths_len, bags, t->nparts)) return size_error(ET_BUF_OUT_LENGTHS, err_pos);
    if (weights && !et_holds(out_weights_len, n, 1)) return size_error(ET_BUF_OUT_WEIGHTS, err_pos);
    if (part_rows_len < t->nparts) return size_error(ET_BUF_PART_ROWS, err_pos);
    const int translate = translates(t, by_key);
    int rc = translate ? ET_OK : check_ids(ids, n, t->num_rows, err_pos);
    if (rc) return rc;
    int64_t total = 0;
    for (int64_t b = 0; b < bags; b++) {
        if (lengths[b] < 0) {
            *err_pos = b;
            return ET_E_LENGTHS;
        }
        total += lengths[b];
    }
    if (total != n) {
        *err_pos = -1;
        return ET_E_LENGTHS;
    }
    const int64_t cells = (int64_t)t->nparts * bags;
    uint8_t *part = malloc((size_t)(n > 0 ? n : 1));
    int64_t *next = malloc((size_t)(cells > 0 ? cells : 1) * sizeof *next);
    int64_t *rows = translate ? malloc((size_t)(n > 0 ? n : 1) * sizeof *rows) : NULL;
    if (!part || !next || (translate && !rows)) {
        free(part);
        free(next);
        free(rows);
        return ET_E_NOMEM;
    }
    memset(part_rows, 0, (size_t)t->nparts * sizeof *part_rows);
    if (cells > 0) memset(out_lengths, 0, (size_t)cells * sizeof *out_lengths);
    if (translate && t->keys) et_keys_tick(t);
    int64_t missed = 0;
    pthread_rwlock_rdlock(&t->lock); /* the parts of one consistent placement (and map) */
    if (atomic_load(&t->dropped)) {
        rc = ET_E_DROPPED;
    } else {
        if (translate) {
            missed = et_keys_translate(t, ids, rows, 0, n);
            ids = rows;
        }
        rc = count_parts(t, ids, n, lengths, bags, part, out_lengths, part_rows, err_pos);
    }
    pthread_rwlock_unlock(&t->lock);
    if (rc == ET_OK && t->keys && missed) atomic_fetch_add(&t->keys->unknown, missed);
    if (unknown) *unknown = rc == ET_OK ? missed : 0;
    if (rc == ET_OK) {
        int64_t offset = 0;
        for (int64_t k = 0; k < cells; k++) {
            next[k] = offset;
            offset += out_lengths[k];
        }
        for (int64_t b = 0, p = 0; b < bags; b++)
            for (int32_t k = 0; k < lengths[b]; k++, p++) {
                const int64_t to = next[(int64_t)part[p] * bags + b]++;
                out_ids[to] = ids[p];
                if (weights) out_weights[to] = weights[p];
            }
    }
    free(part);
    free(next);
    free(rows);
    return rc;
}

/* ---- raw row access ----------------------------------------------------- */

/* Checks the pointers and the rows buffer of a call that moves n rows (rows_bytes >= n * stride). */
static int check_rows(const et_table *t, const void *index, int64_t n, const uint8_t *rows, int64_t rows_bytes,
                      int64_t *err_pos) {
    if (n < 0 || (n > 0 && (!index || !rows))) return ET_E_ARG;
    return et_holds(rows_bytes, n, t->stride) ? ET_OK : size_error(ET_BUF_ROWS, err_pos);
}

int et_write_rows(et_table *t, const int64_t *ids, int64_t n, const uint8_t *rows, int64_t rows_bytes,
                  int64_t *err_pos) {
    int rc = check_rows(t, ids, n, rows, rows_bytes, err_pos);
    if (rc == ET_OK) rc = check_ids(ids, n, t->num_rows, err_pos);
    if (rc) return rc;
    pthread_rwlock_wrlock(&t->lock);
    rc = atomic_load(&t->dropped) ? ET_E_DROPPED : check_entries(t, ids, NULL, n, err_pos);
    /* Marked first: a write that fails part-way (an SCM run after another) may still have changed
     * some rows, and a checkpoint must not miss them (marking an unchanged row costs nothing). */
    if (rc == ET_OK && t->dirty)
        for (int64_t p = 0; p < n; p++) t->dirty[ids[p] >> 6] |= (uint64_t)1 << (ids[p] & 63);
    /* SCM first: it is the only part that can fail, so a failed write
     * leaves the memory tiers untouched. */
    if (rc == ET_OK) rc = et_scm_write(t, ids, NULL, n, rows, err_pos);
    if (rc == ET_OK)
        for (int64_t p = 0; p < n; p++) {
            uint8_t *row = et_loc_row(&t->map, t->loc[ids[p]]);
            if (row) memcpy(row, rows + (uint64_t)p * t->stride, (size_t)t->stride);
        }
    pthread_rwlock_unlock(&t->lock);
    return rc;
}

int et_write_rows_logged(et_table *t, const int64_t *ids, int64_t n, const uint8_t *rows, int64_t rows_bytes,
                         et_commit *c, int64_t lsn, int32_t kind, const uint8_t *const *parts,
                         const int64_t *part_bytes, int32_t nparts, int64_t used_bytes, int32_t *logged,
                         int64_t *err_pos) {
    if (!logged) return ET_E_ARG;
    *logged = 0;
    int rc = check_rows(t, ids, n, rows, rows_bytes, err_pos);
    if (rc == ET_OK) rc = check_ids(ids, n, t->num_rows, err_pos);
    if (rc == ET_OK) rc = et_commit_append(c, lsn, kind, parts, part_bytes, nparts, used_bytes, NULL, err_pos);
    if (rc) return rc;
    *logged = 1;
    return et_write_rows(t, ids, n, rows, rows_bytes, err_pos);
}

int et_read_rows(et_table *t, const int64_t *ids, int64_t n, uint8_t *rows, int64_t rows_bytes, int64_t *err_pos) {
    int rc = check_rows(t, ids, n, rows, rows_bytes, err_pos);
    if (rc == ET_OK) rc = check_ids(ids, n, t->num_rows, err_pos);
    if (rc) return rc;
    et_call c = {.t = t, .ids = ids, .n = n, .pos_start = {0, n}};
    c.rows = malloc((size_t)(n > 0 ? n : 1) * sizeof *c.rows);
    if (!c.rows) return ET_E_NOMEM;
    pthread_rwlock_rdlock(&t->lock);
    void *staging = NULL;
    rc = atomic_load(&t->dropped) ? ET_E_DROPPED : resolve_all(&c, 1, &staging, err_pos);
    if (rc == ET_OK)
        for (int64_t p = 0; p < n; p++) memcpy(rows + (uint64_t)p * t->stride, c.rows[p], (size_t)t->stride);
    pthread_rwlock_unlock(&t->lock);
    free(staging);
    free(c.rows);
    return rc;
}

/* ---- moving rows between tiers ----------------------------------------- */

int et_write_slots(et_table *t, const uint32_t *locs, int64_t n, const uint8_t *rows, int64_t rows_bytes,
                   int64_t *err_pos) {
    int rc = check_rows(t, locs, n, rows, rows_bytes, err_pos);
    if (rc) return rc;
    if (atomic_load(&t->dropped)) return ET_E_DROPPED;
    rc = check_entries(t, NULL, locs, n, err_pos);
    if (rc == ET_OK) rc = et_scm_write(t, NULL, locs, n, rows, err_pos);
    if (rc == ET_OK)
        for (int64_t i = 0; i < n; i++) {
            uint8_t *row = et_loc_row(&t->map, locs[i]);
            if (row) memcpy(row, rows + (uint64_t)i * t->stride, (size_t)t->stride);
        }
    return rc;
}

int et_publish(et_table *t, const int64_t *ids, int64_t ids_len, const uint32_t *locs, int64_t locs_len,
               int64_t *err_pos) {
    if (ids_len < 0 || (ids_len > 0 && (!ids || !locs))) return ET_E_ARG;
    if (locs_len != ids_len) return size_error(ET_BUF_LOCS, err_pos);
    int rc = check_ids(ids, ids_len, t->num_rows, err_pos);
    if (rc) return rc;
    pthread_rwlock_wrlock(&t->lock);
    rc = atomic_load(&t->dropped) ? ET_E_DROPPED : check_entries(t, NULL, locs, ids_len, err_pos);
    if (rc == ET_OK)
        for (int64_t i = 0; i < ids_len; i++) {
            const uint32_t id = (uint32_t)ids[i];
            t->displaced += (locs[i] != id) - (t->loc[ids[i]] != id);
            t->loc[ids[i]] = locs[i];
        }
    pthread_rwlock_unlock(&t->lock);
    return rc;
}
