/* Internal structures of the embtier kernels: the table handle, the map of
 * a MANAGED table's ids, the SCM staging of one request, and the thread
 * pool interface. */
#ifndef ET_INTERNAL_H
#define ET_INTERNAL_H

#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "embtier.h"

#define ET_SCM_BLOCK 4096
#define ET_MAX_ROWS (1ll << 32) /* rows of a table, at most */

/* One chunk of a tier: where its rows are, and how many of its slots have storage. */
typedef struct {
    uint8_t *base;  /* DRAM / CXL: the rows of its slots; NULL for SCM chunks and chunks without storage */
    uint32_t slots; /* slots [0, slots) of the chunk have storage (memory or SCM file space); 0: none */
} et_chunk;

/* What checking and resolving a placement entry takes (the lookup loops keep a copy in registers). */
typedef struct {
    et_chunk *chunks;     /* [entries + 1], indexed by entry >> chunk_shift = (tier << chunk_bits) | chunk;
                             chunks[entries] is a sentinel without slots, and so is every chunk >= max_chunks */
    uint32_t entries;     /* ET_NUM_TIERS << chunk_bits */
    uint32_t chunk_shift; /* slots per chunk = 1 << chunk_shift */
    uint32_t chunk_mask;  /* (1 << chunk_shift) - 1 */
    uint32_t stride;      /* bytes per stored row */
} et_map;

/* A MANAGED table's map of ids to rows (keys.c), in one mapping: keys, index, epoch bits, candidate pool.
 * Lookups read keys and index under the table's read lock and set bits in touched[epoch & 1];
 * et_keys_apply and et_keys_load change them under the write lock, the epoch advances under it too. */
typedef struct {
    int64_t *key;          /* [capacity]: the id of live row r (r < live) */
    uint32_t *index;       /* [buckets]: ET_KEYS_EMPTY, or the row of a live id with bits of its hash above it
                              (tag): linear probing from et_keys_home, no tombstones (backward-shift deletion) */
    _Atomic uint64_t *touched[2]; /* [words] each, bit r % 64 of word r / 64 for row r: touched[epoch & 1] holds
                                     the current epoch's rows, the other the previous epoch's */
    uint64_t *chosen;      /* [words]: rows the plan in progress gave to new ids (et_keys_plan's alone) */
    uint32_t *pool;        /* [pool_cap]: eviction candidates by heat, coldest first (et_keys_plan's alone) */
    uint64_t buckets;
    uint32_t row_mask;     /* a bucket's row: bucket & row_mask; its tag: the bits above */
    int64_t capacity;
    int64_t words;         /* of each touched bitmap: (capacity + 63) / 64 */
    int64_t live;          /* ids with a row: rows [0, live) */
    int64_t evictions;
    atomic_int_least64_t unknown; /* unknown ids counted by successful lookups */
    uint64_t epoch;        /* epochs begun (changed under the write lock) */
    int64_t epoch_ns;      /* length of an epoch (0: only et_keys_epoch starts one) */
    atomic_int_least64_t epoch_start_ns; /* when the current epoch began (CLOCK_MONOTONIC) */
    uint64_t bytes;        /* of the mapping: what et_keys_stats reports */
    uint64_t mapped;       /* the mapping's size as requested from et_mem_map */
    /* the candidate pool: unprotected live rows of the lowest heat when it was filled, pool[pos, len)
     * left, by heat: pool[level_start[h], level_start[h + 1]) had heat h */
    int64_t pool_cap, pool_pos, pool_len;
    uint64_t pool_epoch;   /* the epoch it was filled in: a new epoch makes it stale */
    uint32_t pool_level;   /* heat of pool[pool_pos] when filled */
    uint32_t level_start[257];
    pthread_mutex_t plan_lock; /* one plan at a time: the pool is the plans' */
} et_keymap;

/* A MAPPED table's listed ids (keys.c), set once and read-only after: an open-addressing table of
 * 16-byte slots, each a listed id and its row (a probe compares and reads one slot, most often within
 * one cache line: linear probing from the multiply-shift of the id's hash onto the slots, 3/2 slots an
 * id), and the mapping as it was given (ids[n], rows[n]: what exports and checkpoints read). */
typedef struct {
    int64_t key;
    uint32_t row;
    uint32_t full;         /* 0: an empty slot */
} et_mapslot;

typedef struct {
    et_mapslot *slot;      /* [slots] */
    uint64_t slots;
    int64_t *ids;          /* [n], as given */
    uint32_t *rows;        /* [n] */
    int64_t n;
    uint64_t bytes;        /* of the slots and the arrays: what et_keys_stats reports */
} et_mapping;

#define ET_KEYS_EMPTY UINT32_MAX /* an empty bucket: a row field of all ones, which no row has */

struct et_table {
    int64_t num_rows;
    int32_t dim;
    int32_t dtype;
    int32_t stride;        /* bytes per stored row */
    int32_t chunk_shift;   /* slots per chunk = 1 << chunk_shift */
    int32_t tier_shift;    /* placement entry = (tier << tier_shift) | slot */
    uint32_t slot_mask;    /* (1 << tier_shift) - 1 */
    int64_t max_chunks;    /* per tier */
    et_map map;            /* the chunks of every tier */
    uint32_t *loc;         /* placement map, num_rows entries (et_mem_map; et_publish alone writes it) */
    int64_t displaced;     /* entries that are not their own id (et_publish keeps the count): while 0, the
                              map is the identity, and a lookup of a DRAM-only table need not read it */
    uint8_t *heat;         /* access counters, num_rows entries (et_mem_map) */
    uint64_t *dirty;       /* caller-owned bitmap of rows written since it was last taken, or NULL */
    uint64_t *scm_off;     /* [max_chunks]: file offset of each SCM chunk (meaningful where it has slots) */
    int64_t scm_chunks;    /* SCM chunks with slots: while 0, no placement entry can name an SCM row */
    int64_t cxl_chunks;    /* CXL chunks with slots: while it and scm_chunks are 0, every valid entry is DRAM */
    uint8_t *chunk_part;   /* [map.entries]: the fabric part of every chunk (< nparts), or NULL */
    int32_t nparts;        /* fabric parts (et_table_set_parts); 0 before */
    int scm_fd;
    int32_t scm_align;
    atomic_llong scm_read_errors; /* row reads from the SCM file that failed (et_scm_read_errors) */
    atomic_int scm_read_errno;    /* the errno of the latest */
    int32_t heat_mask;     /* count an access when ((position + salt) & heat_mask) == 0 */
    int32_t prefetch;
    uint32_t cxl_delay_ns; /* injected latency per CXL row served by a lookup (0 = off) */
    int32_t key_space;     /* ET_KEYS_*: how lookups by key and plans translate ids */
    int32_t keys_set;      /* et_table_set_keys ran */
    uint64_t key_mix;      /* HASHED and MAPPED: seed * 0x9E3779B97F4A7C15 */
    int64_t hash_from;     /* MAPPED: ids not listed hash into rows [hash_from, num_rows) */
    et_keymap *keys;       /* MANAGED: the map; NULL otherwise */
    et_mapping *mapping;   /* MAPPED: its listed ids (NULL when none are listed); NULL otherwise */
    atomic_int dropped;
    pthread_rwlock_t lock; /* readers: lookups, raw reads, et_partition, plans; writers: row writes, publish,
                              chunk and chunk-part setters, SCM file, dirty take, drop, key applies and loads,
                              epoch changes */
};

/* ---- keys (keys.c) ---- */

/* MurmurHash3's 64-bit finalizer. */
static inline uint64_t et_fmix64(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ull;
    return x ^ (x >> 33);
}

/* (x * n) >> 64: x mapped onto [0, n) by a multiply-shift. */
static inline uint64_t et_mulhi(uint64_t x, uint64_t n) { return (uint64_t)(((unsigned __int128)x * n) >> 64); }

/* The HASHED row of id (clients/embtier/keys.py). */
static inline int64_t et_hash_row(int64_t id, uint64_t mix, int64_t num_rows) {
    return (int64_t)et_mulhi(et_fmix64((uint64_t)id + mix), (uint64_t)num_rows);
}

/* The index's hash of id, its home bucket and its tag (the hash bits a bucket keeps above the row:
 * bits the home bucket does not depend on, as buckets < 2^33 take the top bits of h). */
static inline uint64_t et_keys_hash(int64_t id) { return et_fmix64((uint64_t)id); }
static inline uint64_t et_keys_home(const et_keymap *m, uint64_t h) { return et_mulhi(h, m->buckets); }
static inline uint32_t et_keys_tag(const et_keymap *m, uint64_t h) { return (uint32_t)h & ~m->row_mask; }

/* The row of id (hash h) in the map, or -1 when it has none. */
static inline int64_t et_keys_find(const et_keymap *m, int64_t id, uint64_t h) {
    const uint32_t tag = et_keys_tag(m, h);
    for (uint64_t i = et_keys_home(m, h);;) {
        const uint32_t b = m->index[i];
        if (b == ET_KEYS_EMPTY) return -1;
        if ((b & ~m->row_mask) == tag && m->key[b & m->row_mask] == id) return b & m->row_mask;
        if (++i == m->buckets) i = 0;
    }
}

/* Marks row r touched in bitmap bits (tested first: a row read again leaves its line clean). */
static inline void et_keys_touch(_Atomic uint64_t *bits, int64_t r) {
    const uint64_t bit = (uint64_t)1 << (r & 63);
    if (!(atomic_load_explicit(&bits[r >> 6], memory_order_relaxed) & bit))
        atomic_fetch_or_explicit(&bits[r >> 6], bit, memory_order_relaxed);
}

/* Before a plan or a keyed lookup of a MANAGED table takes its lock: starts a new epoch when the
 * current one is over (reads the clock once). */
void et_keys_tick(et_table *t);
/* rows[p] = the row of keys[p] for p in [p0, p1) by the table's key space (HASHED, MANAGED or MAPPED;
 * under the read lock), unknown MANAGED ids the default row, the rows of known ones marked touched;
 * returns how many were unknown (MANAGED; 0 otherwise: every id has a row). */
int64_t et_keys_translate(const et_table *t, const int64_t *keys, int64_t *rows, int64_t p0, int64_t p1);
void et_keys_free(et_keymap *m);
void et_mapping_free(et_mapping *m);

/* Rows per 4 KiB SCM block (0 when a row spans several blocks). */
static inline int64_t et_scm_rows_per_block(int32_t stride) {
    return stride <= ET_SCM_BLOCK ? ET_SCM_BLOCK / stride : 0;
}

/* Whether a buffer of len elements holds count items of `each` elements (count >= 0, each >= 1),
 * without overflow. */
static inline int et_holds(int64_t len, int64_t count, int64_t each) {
    return count == 0 || (len >= 0 && count <= len / each);
}

/* The chunk of placement entry l: an index past the chunk table (a tier >= ET_NUM_TIERS) gives the
 * sentinel, which has no slots (a compare and a conditional move, no branch). */
static inline const et_chunk *et_loc_chunk(const et_map *m, uint32_t l) {
    const uint32_t i = l >> m->chunk_shift;
    return &m->chunks[i < m->entries ? i : m->entries];
}

/* Whether placement entry l names a slot with storage: its tier is < ET_NUM_TIERS, its chunk
 * < max_chunks and its slot within the rows its chunk holds.  The one check of an entry, made on
 * every path before anything is indexed by it (one compare-and-branch); once it holds, the tier
 * indexes per-tier arrays, entry >> chunk_shift the per-chunk ones, and for SCM entries the chunk
 * has file space (scm_off). */
static inline int et_loc_valid(const et_map *m, uint32_t l) {
    return (l & m->chunk_mask) < et_loc_chunk(m, l)->slots;
}

static inline uint32_t et_loc_tier(const et_table *t, uint32_t l) { return l >> t->tier_shift; }
static inline uint32_t et_loc_slot(const et_table *t, uint32_t l) { return l & t->slot_mask; }

/* Memory address of the row at valid placement entry l; NULL for SCM rows. */
static inline uint8_t *et_loc_row(const et_map *m, uint32_t l) {
    uint8_t *base = et_loc_chunk(m, l)->base;
    return base ? base + (uint64_t)(l & m->chunk_mask) * m->stride : NULL;
}

/* The fabric part of the row at valid placement entry l (et_table_set_parts must have run). */
static inline uint8_t et_loc_part(const et_table *t, uint32_t l) { return t->chunk_part[l >> t->chunk_shift]; }

/* Byte offset in the SCM file of the slot of valid SCM placement entry l. */
static inline uint64_t et_scm_offset(const et_table *t, uint32_t l) {
    const uint32_t slot = et_loc_slot(t, l);
    const uint64_t base = t->scm_off[slot >> t->chunk_shift];
    const uint64_t in_chunk = slot & t->map.chunk_mask;
    const int64_t rpb = et_scm_rows_per_block(t->stride);
    if (rpb > 0)
        return base + (in_chunk / rpb) * ET_SCM_BLOCK + (in_chunk % rpb) * (uint64_t)t->stride;
    const uint64_t blocks_per_row = ((uint64_t)t->stride + ET_SCM_BLOCK - 1) / ET_SCM_BLOCK;
    return base + in_chunk * blocks_per_row * ET_SCM_BLOCK;
}

/* Reads the SCM rows at request positions pos[0..count) (ascending) in one
 * batch, each distinct row once, into an aligned staging buffer that the
 * caller frees; rows[pos[i]] is set to the row's bytes inside it.  Every
 * entry is checked (ET_E_LOCATION, *err_pos = the position, for one that is
 * not a valid SCM entry).  A read that fails is counted (et_scm_read_errors):
 * ET_E_SCM_READ, *err_pos = the position of its row; failing to issue the
 * reads at all is ET_E_IO, *err_pos = errno. */
int et_scm_fetch(et_table *t, const int64_t *ids, const int64_t *pos, int64_t count, const uint8_t **rows,
                 void **staging, int64_t *err_pos);
/* Writes rows (n * stride bytes) to the SCM homes of ids, or of the placement entries locs when locs
 * is not NULL; every entry is checked first (ET_E_LOCATION, *err_pos = its position). */
int et_scm_write(et_table *t, const int64_t *ids, const uint32_t *locs, int64_t n, const uint8_t *rows,
                 int64_t *err_pos);

/* Runs fn(arg, part, parts) for part in [0, parts) on the pool and the
 * calling thread; returns when all parts have finished. */
void et_pool_run(void (*fn)(void *arg, int part, int parts), void *arg, int parts);

#endif
