/* Key spaces: how a table's ids become rows.  HASHED tables hash; MANAGED
 * tables keep a map that gives each distinct id a row of its own and, once
 * every row is taken, evicts the coldest id that is not protected; MAPPED
 * tables keep a table, made once, of listed ids to the rows a mapping gives
 * them (et_mapping: 16-byte slots of id and row), and hash the others into
 * the rows from hash_from on.
 *
 * The map of a MANAGED table (et_keymap), in one mapping with huge pages
 * requested (lookups probe it at random):
 *  - key[capacity], the id of each live row: what a probe compares, and
 *    what checkpoints save;
 *  - index[buckets], buckets = 15/8 capacity + 1: an open-addressing table
 *    of uint32, each the row of a live id with the bits of the id's hash
 *    that the home bucket does not use above it (a tag: a probe reads the
 *    key of a bucket only when its tag matches, so a miss costs no key read
 *    and a hit one); linear probing from the multiply-shift of the hash onto
 *    the buckets, deletion by backward shift, so no tombstones;
 *  - touched[2][words]: one bit a row, for the current epoch and the
 *    previous one (an id touched in either is protected from eviction);
 *  - chosen[words]: the rows a plan in progress has given to new ids;
 *  - pool[capacity / 64 + 1]: eviction candidates, the coldest unprotected
 *    live rows when it was filled, by heat, re-checked when taken.
 * Ids take rows in et_keys_apply only, under the table's write lock, so a
 * lookup (under the read lock) never sees a half-made entry.  Epochs
 * advance under the write lock too: a lookup sets bits in the current
 * epoch's bitmap, which no advance clears while it runs. */
#include "et_internal.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

#define ET_KEYS_AHEAD 16      /* positions ahead in a lookup's translation: the bucket, then the key */
#define ET_HEAT_LEVELS 256
#define ET_KEYS_POOL_LOST -2  /* a plan's first candidate is in a pool filled over since */

static int64_t now_ns(void) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (int64_t)now.tv_sec * 1000000000 + now.tv_nsec;
}

static uint64_t align8(uint64_t bytes) { return (bytes + 7) & ~(uint64_t)7; }

/* ---- the map's memory ------------------------------------------------------ */

void et_keys_free(et_keymap *m) {
    if (!m) return;
    if (m->key) et_mem_unmap(m->key, m->mapped);
    pthread_mutex_destroy(&m->plan_lock);
    free(m);
}

static et_keymap *new_map(int64_t capacity, int64_t epoch_ns) {
    et_keymap *m = calloc(1, sizeof *m);
    if (!m) return NULL;
    if (pthread_mutex_init(&m->plan_lock, NULL)) {
        free(m);
        return NULL;
    }
    m->capacity = capacity;
    m->buckets = (uint64_t)capacity + (uint64_t)capacity * 7 / 8 + 1;
    uint32_t row_bits = 64 - (uint32_t)__builtin_clzll((uint64_t)capacity); /* rows < capacity < 2^row_bits - 1 */
    m->row_mask = row_bits >= 32 ? UINT32_MAX : (1u << row_bits) - 1;
    m->words = (capacity + 63) / 64;
    m->pool_cap = capacity / 64 + 1;
    const uint64_t key_bytes = 8 * (uint64_t)capacity, index_bytes = align8(4 * m->buckets);
    const uint64_t bits_bytes = 8 * (uint64_t)m->words, pool_bytes = 4 * (uint64_t)m->pool_cap;
    m->bytes = key_bytes + index_bytes + 3 * bits_bytes + pool_bytes;
    int err, huge_err;
    uint8_t *base = et_mem_map(m->bytes, 1, &err, &huge_err);
    if (!base) {
        et_keys_free(m);
        return NULL;
    }
    m->mapped = m->bytes;
    m->key = (int64_t *)base;
    m->index = (uint32_t *)(base + key_bytes);
    m->touched[0] = (_Atomic uint64_t *)(base + key_bytes + index_bytes);
    m->touched[1] = m->touched[0] + m->words;
    m->chosen = (uint64_t *)(m->touched[1] + m->words);
    m->pool = (uint32_t *)(m->chosen + m->words);
    memset(m->index, 0xff, 4 * m->buckets);
    m->epoch_ns = epoch_ns;
    atomic_store(&m->epoch_start_ns, now_ns());
    return m;
}

int et_table_set_keys(et_table *t, int32_t key_space, uint64_t seed, int64_t epoch_ns) {
    if (key_space < ET_KEYS_DENSE || key_space > ET_KEYS_MANAGED || epoch_ns < 0 || t->keys_set ||  /* (MAPPED:
                                                                                      et_table_set_mapping) */
        (key_space == ET_KEYS_MANAGED && t->num_rows < 2))
        return ET_E_ARG;
    if (atomic_load(&t->dropped)) return ET_E_DROPPED;
    if (key_space == ET_KEYS_MANAGED) {
        t->keys = new_map(t->num_rows - 1, epoch_ns);
        if (!t->keys) return ET_E_NOMEM;
    }
    t->key_space = key_space;
    t->key_mix = seed * 0x9E3779B97F4A7C15ull;
    t->keys_set = 1;
    return ET_OK;
}

/* ---- the index ------------------------------------------------------------- */

static uint64_t next_bucket(const et_keymap *m, uint64_t i) { return i + 1 == m->buckets ? 0 : i + 1; }

static void index_insert(et_keymap *m, int64_t id, uint32_t row) {
    const uint64_t h = et_keys_hash(id);
    uint64_t i = et_keys_home(m, h);
    while (m->index[i] != ET_KEYS_EMPTY) i = next_bucket(m, i);
    m->index[i] = et_keys_tag(m, h) | row;
}

/* Takes the bucket of live row `row` out of the index, shifting back the entries of its cluster that
 * may move (an entry stays after its home: it moves into the hole unless its home lies cyclically in
 * (hole, its bucket]). */
static void index_remove(et_keymap *m, uint32_t row) {
    uint64_t hole = et_keys_home(m, et_keys_hash(m->key[row]));
    while ((m->index[hole] & m->row_mask) != row) hole = next_bucket(m, hole); /* (an empty bucket's row field is
                                                                                  all ones, no row's) */
    for (uint64_t j = next_bucket(m, hole);; j = next_bucket(m, j)) {
        const uint32_t b = m->index[j];
        if (b == ET_KEYS_EMPTY) break;
        const uint64_t home = et_keys_home(m, et_keys_hash(m->key[b & m->row_mask]));
        if (hole <= j ? (home <= hole || home > j) : (home <= hole && home > j)) {
            m->index[hole] = b;
            hole = j;
        }
    }
    m->index[hole] = ET_KEYS_EMPTY;
}

/* index (buckets of m, all empty) = keys[0, n) at entries 0..n-1; ET_E_ARG with *err_pos = the second
 * position of a key given twice (the index is then partly built). */
static int build_index(const et_keymap *m, uint32_t *index, const int64_t *keys, int64_t n, int64_t *err_pos) {
    for (int64_t i = 0; i < n; i++) {
        const uint64_t h = et_keys_hash(keys[i]);
        const uint32_t tag = et_keys_tag(m, h);
        uint64_t b = et_keys_home(m, h);
        for (; index[b] != ET_KEYS_EMPTY; b = next_bucket(m, b))
            if ((index[b] & ~m->row_mask) == tag && keys[index[b] & m->row_mask] == keys[i]) {
                *err_pos = i;
                return ET_E_ARG;
            }
        index[b] = tag | (uint32_t)i;
    }
    return ET_OK;
}

/* ---- mappings (MAPPED) ------------------------------------------------------- */

#define ET_MAPPING_MAX ((int64_t)UINT32_MAX - 1) /* listed ids, at most */

void et_mapping_free(et_mapping *m) {
    if (!m) return;
    if (m->slot) et_mem_unmap(m->slot, m->slots * sizeof *m->slot);
    free(m->ids);
    free(m->rows);
    free(m);
}

static uint64_t mapping_home(const et_mapping *m, uint64_t h) { return et_mulhi(h, m->slots); }

/* A mapping of ids[n] -> rows[n] (checked: rows in range), or NULL with *rc = ET_E_NOMEM, or ET_E_ARG
 * with *err_pos = the second position of an id listed twice. */
static et_mapping *new_mapping(const int64_t *ids, const int64_t *rows, int64_t n, int *rc, int64_t *err_pos) {
    *rc = ET_E_NOMEM;
    et_mapping *m = calloc(1, sizeof *m);
    if (!m) return NULL;
    m->n = n;
    m->slots = (uint64_t)n + (uint64_t)n / 2 + 1;
    int err, huge_err;
    m->slot = et_mem_map(m->slots * sizeof *m->slot, 1, &err, &huge_err); /* (zeroed: every slot empty) */
    m->ids = malloc((size_t)n * sizeof *m->ids);
    m->rows = malloc((size_t)n * sizeof *m->rows);
    if (!m->slot || !m->ids || !m->rows) {
        et_mapping_free(m);
        return NULL;
    }
    m->bytes = m->slots * sizeof *m->slot + (uint64_t)n * (sizeof *m->ids + sizeof *m->rows);
    for (int64_t i = 0; i < n; i++) {
        uint64_t s = mapping_home(m, et_keys_hash(ids[i]));
        for (; m->slot[s].full; s = s + 1 == m->slots ? 0 : s + 1)
            if (m->slot[s].key == ids[i]) {
                *err_pos = i;
                *rc = ET_E_ARG;
                et_mapping_free(m);
                return NULL;
            }
        m->slot[s] = (et_mapslot){ids[i], (uint32_t)rows[i], 1};
        m->ids[i] = ids[i];
        m->rows[i] = (uint32_t)rows[i];
    }
    *rc = ET_OK;
    return m;
}

int et_table_set_mapping(et_table *t, uint64_t seed, const int64_t *ids, const int64_t *rows, int64_t n,
                         int64_t hash_from, int64_t *err_pos) {
    if (!err_pos) return ET_E_ARG;
    *err_pos = -1;
    if (n < 0 || n > ET_MAPPING_MAX || (n > 0 && (!ids || !rows)) || t->keys_set || hash_from < 0 ||
        hash_from >= t->num_rows)
        return ET_E_ARG;
    for (int64_t i = 0; i < n; i++)
        if ((uint64_t)rows[i] >= (uint64_t)t->num_rows) {
            *err_pos = i;
            return ET_E_ID_RANGE;
        }
    if (atomic_load(&t->dropped)) return ET_E_DROPPED;
    int rc = ET_OK;
    et_mapping *m = n > 0 ? new_mapping(ids, rows, n, &rc, err_pos) : NULL;
    if (rc) return rc;
    t->mapping = m;
    t->key_space = ET_KEYS_MAPPED;
    t->key_mix = seed * 0x9E3779B97F4A7C15ull;
    t->hash_from = hash_from;
    t->keys_set = 1;
    return ET_OK;
}

void et_mapping_of(et_table *t, const int64_t **ids, const uint32_t **rows, int64_t *entries) {
    const et_mapping *m = t->key_space == ET_KEYS_MAPPED ? t->mapping : NULL;
    *ids = m ? m->ids : NULL;
    *rows = m ? m->rows : NULL;
    *entries = m ? m->n : 0;
}

/* rows[p] for p in [p0, p1) of a MAPPED table with listed ids: a pipeline, the home slot of p + AHEAD
 * prefetched while p is probed; an id not listed hashes into [hash_from, num_rows). */
static void probe_mapping(const et_table *t, const int64_t *keys, int64_t *rows, int64_t p0, int64_t p1) {
    const et_mapping *m = t->mapping;
    const uint64_t mix = t->key_mix;
    const int64_t base = t->hash_from, span = t->num_rows - t->hash_from;
    uint64_t homes[2 * ET_KEYS_AHEAD];
    const int64_t mask = 2 * ET_KEYS_AHEAD - 1;
    for (int64_t q = p0; q < p1 && q < p0 + ET_KEYS_AHEAD; q++) {
        homes[q & mask] = mapping_home(m, et_keys_hash(keys[q]));
        __builtin_prefetch(&m->slot[homes[q & mask]], 0, 3);
    }
    for (int64_t p = p0; p < p1; p++) {
        const int64_t a = p + ET_KEYS_AHEAD;
        if (a < p1) {
            homes[a & mask] = mapping_home(m, et_keys_hash(keys[a]));
            __builtin_prefetch(&m->slot[homes[a & mask]], 0, 3);
        }
        const int64_t id = keys[p];
        int64_t row = -1;
        for (uint64_t s = homes[p & mask]; m->slot[s].full; s = s + 1 == m->slots ? 0 : s + 1)
            if (m->slot[s].key == id) {
                row = m->slot[s].row;
                break;
            }
        rows[p] = row >= 0 ? row : base + et_hash_row(id, mix, span);
    }
}

/* ---- epochs ---------------------------------------------------------------- */

/* Starts a new epoch (under the write lock): the previous epoch's bits are cleared and become the
 * current one's; the candidate pool goes stale (rows protected until now may be candidates). */
static void advance_epoch(et_keymap *m, int64_t now) {
    memset((void *)m->touched[(m->epoch + 1) & 1], 0, 8 * (size_t)m->words);
    m->epoch++;
    atomic_store(&m->epoch_start_ns, now);
}

void et_keys_tick(et_table *t) {
    et_keymap *m = t->keys;
    if (!m || m->epoch_ns == 0) return;
    int64_t now = now_ns();
    if (now - atomic_load_explicit(&m->epoch_start_ns, memory_order_relaxed) < m->epoch_ns) return;
    pthread_rwlock_wrlock(&t->lock);
    const int64_t elapsed = now - atomic_load(&m->epoch_start_ns); /* (again: racing calls advance once) */
    if (elapsed >= m->epoch_ns) advance_epoch(m, now);
    /* A call at or after start + epoch_ns advances first, so the current epoch's rows were touched
     * before then: once two epochs have passed, all of them are an epoch old, so no longer protected. */
    if (elapsed >= 2 * m->epoch_ns) advance_epoch(m, now);
    pthread_rwlock_unlock(&t->lock);
}

int et_keys_epoch(et_table *t) {
    if (atomic_load(&t->dropped)) return ET_E_DROPPED;
    if (t->key_space != ET_KEYS_MANAGED) return ET_OK;
    pthread_rwlock_wrlock(&t->lock);
    int rc = atomic_load(&t->dropped) ? ET_E_DROPPED : ET_OK;
    if (rc == ET_OK) advance_epoch(t->keys, now_ns());
    pthread_rwlock_unlock(&t->lock);
    return rc;
}

static int is_protected(const et_keymap *m, int64_t r) {
    const uint64_t bit = (uint64_t)1 << (r & 63);
    return ((atomic_load_explicit(&m->touched[0][r >> 6], memory_order_relaxed) |
             atomic_load_explicit(&m->touched[1][r >> 6], memory_order_relaxed)) & bit) != 0;
}

/* ---- lookups --------------------------------------------------------------- */

/* rows[p] = the row of keys[p] in the map for p in [p0, p1), missing for an id it does not hold;
 * with touched, the rows found are marked in it.  Returns how many were missing.  A pipeline: the
 * home bucket of p + 2 * AHEAD is prefetched, the key (and touched bits) of the row that p + AHEAD's
 * home bucket names, and p is probed. */
static int64_t probe(const et_keymap *m, const int64_t *keys, int64_t *rows, int64_t p0, int64_t p1,
                     _Atomic uint64_t *touched, int64_t missing) {
    int64_t misses = 0;
    uint64_t hashes[4 * ET_KEYS_AHEAD];
    const int64_t mask = 4 * ET_KEYS_AHEAD - 1;
    for (int64_t q = p0; q < p1 && q < p0 + 2 * ET_KEYS_AHEAD; q++) {
        hashes[q & mask] = et_keys_hash(keys[q]);
        __builtin_prefetch(&m->index[et_keys_home(m, hashes[q & mask])], 0, 3);
    }
    for (int64_t p = p0; p < p1; p++) {
        const int64_t a = p + 2 * ET_KEYS_AHEAD, b = p + ET_KEYS_AHEAD;
        if (a < p1) {
            hashes[a & mask] = et_keys_hash(keys[a]);
            __builtin_prefetch(&m->index[et_keys_home(m, hashes[a & mask])], 0, 3);
        }
        if (b < p1) {
            const uint32_t bucket = m->index[et_keys_home(m, hashes[b & mask])];
            if (bucket != ET_KEYS_EMPTY) { /* (a lookup reads the placement entry in a later pass: not here) */
                __builtin_prefetch(&m->key[bucket & m->row_mask], 0, 3);
                if (touched) __builtin_prefetch(&touched[(bucket & m->row_mask) >> 6], 1, 3);
            }
        }
        const int64_t r = et_keys_find(m, keys[p], hashes[p & mask]);
        if (r >= 0) {
            if (touched) et_keys_touch(touched, r);
            rows[p] = r;
        } else {
            misses++;
            rows[p] = missing;
        }
    }
    return misses;
}

int64_t et_keys_translate(const et_table *t, const int64_t *keys, int64_t *rows, int64_t p0, int64_t p1) {
    if (t->key_space == ET_KEYS_MAPPED) {
        if (t->mapping) {
            probe_mapping(t, keys, rows, p0, p1);
        } else {
            const uint64_t mix = t->key_mix;
            const int64_t base = t->hash_from, span = t->num_rows - t->hash_from;
            for (int64_t p = p0; p < p1; p++) rows[p] = base + et_hash_row(keys[p], mix, span);
        }
        return 0;
    }
    if (t->key_space == ET_KEYS_HASHED) {
        const uint64_t mix = t->key_mix;
        const int64_t num_rows = t->num_rows;
        for (int64_t p = p0; p < p1; p++) rows[p] = et_hash_row(keys[p], mix, num_rows);
        return 0;
    }
    const et_keymap *m = t->keys;
    return probe(m, keys, rows, p0, p1, m->touched[m->epoch & 1], t->num_rows - 1);
}

/* ---- batches: small hash maps of one call's ids or rows ---------------------- */

typedef struct {
    int64_t *k, *v;
    uint8_t *used;
    uint64_t mask;
} et_batch;

static int batch_init(et_batch *b, int64_t count) {
    uint64_t size = 16;
    while (size < 2 * (uint64_t)count) size *= 2;
    b->mask = size - 1;
    b->k = malloc(size * sizeof *b->k);
    b->v = malloc(size * sizeof *b->v);
    b->used = calloc(size, 1);
    return b->k && b->v && b->used ? ET_OK : ET_E_NOMEM;
}

static void batch_free(et_batch *b) {
    free(b->k);
    free(b->v);
    free(b->used);
}

/* Whether k is in the batch; *v points at its value, or (for a new k, now added) at the value to set. */
static int batch_find(et_batch *b, int64_t k, int64_t **v) {
    uint64_t i = et_fmix64((uint64_t)k) & b->mask;
    for (; b->used[i]; i = (i + 1) & b->mask)
        if (b->k[i] == k) {
            *v = &b->v[i];
            return 1;
        }
    b->used[i] = 1;
    b->k[i] = k;
    *v = &b->v[i];
    return 0;
}

/* ---- eviction candidates --------------------------------------------------- */

/* Calls fn(ctx, row) for every live row that is neither protected nor chosen by the plan in progress. */
#define ET_FOR_EACH_FREE_ROW(m, r, body)                                                                \
    for (int64_t w_ = 0; w_ < ((m)->live + 63) / 64; w_++) {                                             \
        uint64_t free_ = ~(atomic_load_explicit(&(m)->touched[0][w_], memory_order_relaxed) |           \
                           atomic_load_explicit(&(m)->touched[1][w_], memory_order_relaxed) | (m)->chosen[w_]); \
        if (w_ == (m)->live / 64) free_ &= ((uint64_t)1 << ((m)->live & 63)) - 1;                      \
        for (; free_; free_ &= free_ - 1) {                                                             \
            const int64_t r = w_ * 64 + __builtin_ctzll(free_);                                         \
            body                                                                                        \
        }                                                                                               \
    }

/* Fills the pool with the coldest free rows (a histogram of their heat, then the rows of the lowest
 * levels, up to pool_cap), grouped by heat, coldest first. */
static void fill_pool(const et_table *t, et_keymap *m) {
    int64_t hist[ET_HEAT_LEVELS] = {0};
    ET_FOR_EACH_FREE_ROW(m, r, { hist[t->heat[r]]++; })
    int64_t next[ET_HEAT_LEVELS], total = 0;
    uint32_t top = ET_HEAT_LEVELS - 1; /* the hottest level taken, perhaps in part */
    for (uint32_t h = 0; h < ET_HEAT_LEVELS; h++) {
        m->level_start[h] = (uint32_t)total;
        next[h] = total;
        const int64_t take = hist[h] < m->pool_cap - total ? hist[h] : m->pool_cap - total;
        total += take;
        if (total == m->pool_cap && top == ET_HEAT_LEVELS - 1) top = h;
    }
    m->level_start[ET_HEAT_LEVELS] = (uint32_t)total;
    /* Second pass: a level whose rows changed heat since the first may have room left; the rows that
     * went in are packed below. */
    ET_FOR_EACH_FREE_ROW(m, r, {
        const uint32_t h = t->heat[r];
        if (h <= top && next[h] < (int64_t)m->level_start[h + 1]) m->pool[next[h]++] = (uint32_t)r;
    })
    int64_t len = 0;
    for (uint32_t h = 0; h < ET_HEAT_LEVELS; h++) {
        const int64_t start = m->level_start[h];
        m->level_start[h] = (uint32_t)len;
        memmove(&m->pool[len], &m->pool[start], (size_t)(next[h] - start) * sizeof *m->pool);
        len += next[h] - start;
    }
    if (len == 0 && total > 0) {
        /* Every free row of the first pass changed heat (or became protected) before the second: the
         * rows lookups read meanwhile go up, others sit above the levels taken.  Any free rows then,
         * as one level above all (a later plan that finds one of another heat fills the pool again). */
        ET_FOR_EACH_FREE_ROW(m, r, {
            if (len < m->pool_cap) m->pool[len++] = (uint32_t)r;
        })
        for (uint32_t h = 0; h < ET_HEAT_LEVELS; h++) m->level_start[h] = 0;
    }
    m->level_start[ET_HEAT_LEVELS] = (uint32_t)len;
    m->pool_len = len;
    m->pool_pos = 0;
    m->pool_level = 0;
    m->pool_epoch = m->epoch;
}

/* The coldest free live row (marked chosen), or -1 when there is none.  A candidate that became
 * protected or was chosen is skipped.  A pool filled by an earlier plan whose candidate's heat changed
 * since may no longer hold the coldest rows: it is filled again (within one plan a change is a
 * concurrent lookup's, and the candidate is taken).  Each fill holds only free rows, so the loop ends:
 * with a row, or with a fill that found none.  *first: the pool position of the plan's first
 * candidate (-1 before it), ET_KEYS_POOL_LOST once a fill replaced a pool the plan took rows from. */
static int64_t take_victim(const et_table *t, et_keymap *m, int *fills, int64_t *first) {
    for (;;) {
        if (m->pool_epoch != m->epoch || m->pool_pos >= m->pool_len) {
            fill_pool(t, m);
            ++*fills;
            if (*first != -1) *first = ET_KEYS_POOL_LOST;
            if (m->pool_len == 0) return -1;
        }
        const int64_t r = m->pool[m->pool_pos++];
        while (m->level_start[m->pool_level + 1] < m->pool_pos) m->pool_level++;
        if (is_protected(m, r) || (m->chosen[r >> 6] >> (r & 63) & 1)) continue;
        if (t->heat[r] != m->pool_level && *fills == 0) {
            m->pool_len = 0; /* stale: refill */
            continue;
        }
        m->chosen[r >> 6] |= (uint64_t)1 << (r & 63);
        if (*first == -1) *first = m->pool_pos - 1;
        return r;
    }
}

/* ---- plans ----------------------------------------------------------------- */

static int plan_managed(et_table *t, const int64_t *ids, int64_t n, int64_t *rows, uint8_t *fresh,
                        int64_t *err_pos) {
    et_keymap *m = t->keys;
    /* the live ids' rows (touched), by the lookups' pipelined probe; new ids get the default row */
    const int64_t news = et_keys_translate(t, ids, rows, 0, n);
    for (int64_t i = 0; i < n; i++) fresh[i] = rows[i] == t->num_rows - 1;
    if (news == 0) return ET_OK;
    et_batch taken; /* new id -> the row it takes */
    int rc = batch_init(&taken, news);
    int64_t unused = m->live;
    int fills = 0;
    int64_t first = -1;
    for (int64_t i = 0; i < n && rc == ET_OK; i++) {
        int64_t *row;
        if (!fresh[i]) continue;
        if (batch_find(&taken, ids[i], &row)) {
            rows[i] = *row;
            continue;
        }
        *row = unused < m->capacity ? unused++ : take_victim(t, m, &fills, &first);
        if (*row < 0) {
            *err_pos = i;
            rc = ET_E_FULL;
        }
        rows[i] = *row;
    }
    batch_free(&taken);
    for (int64_t i = 0; i < n; i++) /* the chosen marks are this plan's alone */
        if (fresh[i] && rows[i] >= 0 && rows[i] < m->live) m->chosen[rows[i] >> 6] &= ~((uint64_t)1 << (rows[i] & 63));
    /* Nor are its candidates: the plan may never be applied, and then the rows it took are still the
     * coldest.  The next plan starts again from the first (the candidates before it stay protected
     * until the epoch ends), or fills the pool again when the rows taken are no longer in it. */
    if (first == ET_KEYS_POOL_LOST) {
        m->pool_len = 0;
    } else if (first >= 0) {
        m->pool_pos = first;
        m->pool_level = 0;
    }
    return rc;
}

static int check_rows_of(const int64_t *ids, int64_t n, int64_t num_rows, int64_t *err_pos) {
    for (int64_t p = 0; p < n; p++)
        if ((uint64_t)ids[p] >= (uint64_t)num_rows) {
            *err_pos = p;
            return ET_E_ID_RANGE;
        }
    return ET_OK;
}

int et_keys_plan(et_table *t, const int64_t *ids, int64_t n, int64_t *rows, int64_t rows_len, uint8_t *fresh,
                 int64_t fresh_len, int64_t *err_pos) {
    if (n < 0 || (n > 0 && (!ids || !rows || !fresh))) return ET_E_ARG;
    if (!et_holds(rows_len, n, 1)) {
        *err_pos = ET_BUF_ROWS;
        return ET_E_SIZE;
    }
    if (!et_holds(fresh_len, n, 1)) {
        *err_pos = ET_BUF_FRESH;
        return ET_E_SIZE;
    }
    if (t->key_space == ET_KEYS_DENSE) {
        int rc = check_rows_of(ids, n, t->num_rows, err_pos);
        if (rc) return rc;
    }
    if (atomic_load(&t->dropped)) return ET_E_DROPPED;
    if (n > 0) memset(fresh, 0, (size_t)n);
    if (t->key_space == ET_KEYS_DENSE) {
        memcpy(rows, ids, (size_t)n * sizeof *rows);
        return ET_OK;
    }
    if (t->key_space == ET_KEYS_HASHED || t->key_space == ET_KEYS_MAPPED) { /* (a MAPPED map never changes) */
        et_keys_translate(t, ids, rows, 0, n);
        return ET_OK;
    }
    et_keys_tick(t);
    pthread_mutex_lock(&t->keys->plan_lock);
    pthread_rwlock_rdlock(&t->lock);
    int rc = atomic_load(&t->dropped) ? ET_E_DROPPED : plan_managed(t, ids, n, rows, fresh, err_pos);
    pthread_rwlock_unlock(&t->lock);
    pthread_mutex_unlock(&t->keys->plan_lock);
    return rc;
}

/* ---- applies and loads ----------------------------------------------------- */

/* The checks of et_keys_apply, position by position, on the map before the call. */
static int check_apply(const et_keymap *m, const int64_t *ids, const int64_t *rows, int64_t n, int64_t *err_pos) {
    et_batch row_of, id_of;
    int64_t *owns = malloc((size_t)(n > 0 ? n : 1) * sizeof *owns); /* each id's row before the call, or -1 */
    int rc = batch_init(&row_of, n);
    if (batch_init(&id_of, n) != ET_OK || !owns) rc = ET_E_NOMEM;
    if (rc == ET_OK) probe(m, ids, owns, 0, n, NULL, -1);
    int64_t extended = m->live; /* the live rows, once the positions so far are applied */
    for (int64_t i = 0; i < n && rc == ET_OK; i++) {
        const int64_t r = rows[i];
        int64_t *row, *id;
        if (r < 0 || r >= m->capacity || r > extended) {
            rc = ET_E_ID_RANGE;
        } else {
            const int64_t own = owns[i];
            if ((batch_find(&row_of, ids[i], &row) && *row != r) | (batch_find(&id_of, r, &id) && *id != ids[i]) ||
                (own >= 0 && own != r))
                rc = ET_E_ARG;
            *row = r;
            *id = ids[i];
            extended += r == extended;
        }
        if (rc) *err_pos = i;
    }
    batch_free(&row_of);
    batch_free(&id_of);
    free(owns);
    return rc;
}

int et_keys_apply(et_table *t, const int64_t *ids, const int64_t *rows, int64_t n, int64_t rows_len,
                  int64_t *evicted, int64_t *err_pos) {
    if (n < 0 || (n > 0 && (!ids || !rows)) || !evicted || t->key_space != ET_KEYS_MANAGED) return ET_E_ARG;
    if (rows_len != n) {
        *err_pos = ET_BUF_ROWS;
        return ET_E_SIZE;
    }
    et_keymap *m = t->keys;
    pthread_rwlock_wrlock(&t->lock);
    int rc = atomic_load(&t->dropped) ? ET_E_DROPPED : check_apply(m, ids, rows, n, err_pos);
    if (rc == ET_OK) {
        _Atomic uint64_t *touched = m->touched[m->epoch & 1];
        int64_t gone = 0;
        for (int64_t i = 0; i < n; i++) {
            const int64_t r = rows[i];
            if (r == m->live) {
                m->live++;
            } else if (m->key[r] != ids[i]) {
                index_remove(m, (uint32_t)r); /* its id is forgotten; the row starts cold */
                t->heat[r] = 0;
                gone++;
            } else {
                et_keys_touch(touched, r); /* already its row */
                continue;
            }
            m->key[r] = ids[i];
            index_insert(m, ids[i], (uint32_t)r);
            et_keys_touch(touched, r);
        }
        m->evictions += gone;
        *evicted = gone;
    }
    pthread_rwlock_unlock(&t->lock);
    return rc;
}

int et_keys_load(et_table *t, const int64_t *keys, int64_t n, int64_t *err_pos) {
    if (n < 0 || (n > 0 && !keys) || t->key_space != ET_KEYS_MANAGED) return ET_E_ARG;
    et_keymap *m = t->keys;
    if (n > m->capacity) {
        *err_pos = m->capacity;
        return ET_E_ID_RANGE;
    }
    /* The index is built aside (a duplicate leaves the map as it was), probing the keys given. */
    const uint64_t index_bytes = 4 * m->buckets;
    int err, huge_err;
    uint32_t *index = et_mem_map(index_bytes, 1, &err, &huge_err);
    if (!index) return ET_E_NOMEM;
    memset(index, 0xff, index_bytes);
    int rc = build_index(m, index, keys, n, err_pos);
    pthread_rwlock_wrlock(&t->lock);
    if (rc == ET_OK && atomic_load(&t->dropped)) rc = ET_E_DROPPED;
    if (rc == ET_OK) {
        if (n > 0) memcpy(m->key, keys, (size_t)n * sizeof *keys);
        memcpy(m->index, index, index_bytes);
        memset((void *)m->touched[0], 0, 2 * 8 * (size_t)m->words);
        m->live = n;
        m->evictions = 0;
        atomic_store(&m->unknown, 0);
        m->epoch = 0;
        m->pool_len = m->pool_pos = 0;
        atomic_store(&m->epoch_start_ns, now_ns());
    }
    pthread_rwlock_unlock(&t->lock);
    et_mem_unmap(index, index_bytes);
    return rc;
}

/* ---- figures --------------------------------------------------------------- */

int et_keys_stats(et_table *t, int64_t *stats, int64_t stats_len) {
    if (!stats) return ET_E_ARG;
    if (stats_len < ET_KEYS_STATS) return ET_E_SIZE;
    if (atomic_load(&t->dropped)) return ET_E_DROPPED;
    memset(stats, 0, ET_KEYS_STATS * sizeof *stats);
    if (t->mapping) { /* (never changes) */
        stats[ET_KEYS_STAT_LIVE] = t->mapping->n;
        stats[ET_KEYS_STAT_BYTES] = (int64_t)t->mapping->bytes;
        return ET_OK;
    }
    et_keymap *m = t->keys;
    if (!m) return ET_OK;
    pthread_rwlock_rdlock(&t->lock);
    stats[ET_KEYS_STAT_LIVE] = m->live;
    stats[ET_KEYS_STAT_EVICTIONS] = m->evictions;
    stats[ET_KEYS_STAT_BYTES] = (int64_t)m->bytes;
    stats[ET_KEYS_STAT_CAPACITY] = m->capacity;
    stats[ET_KEYS_STAT_UNKNOWN] = atomic_load(&m->unknown);
    stats[ET_KEYS_STAT_EPOCH] = (int64_t)m->epoch;
    pthread_rwlock_unlock(&t->lock);
    return ET_OK;
}

const int64_t *et_keys_of_rows(et_table *t, int64_t *entries) {
    const int managed = t->key_space == ET_KEYS_MANAGED;
    *entries = managed ? t->keys->live : 0;
    return managed ? t->keys->key : NULL;
}

int et_hash_rows(const int64_t *ids, int64_t n, uint64_t seed, int64_t num_rows, int64_t *rows, int64_t rows_len) {
    if (n < 0 || (n > 0 && (!ids || !rows)) || num_rows < 1 || num_rows > ET_MAX_ROWS) return ET_E_ARG;
    if (!et_holds(rows_len, n, 1)) return ET_E_SIZE;
    const uint64_t mix = seed * 0x9E3779B97F4A7C15ull;
    for (int64_t p = 0; p < n; p++) rows[p] = et_hash_row(ids[p], mix, num_rows);
    return ET_OK;
}
