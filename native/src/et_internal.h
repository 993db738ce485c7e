/* Internal structures of the embtier kernels: the table handle, the SCM
 * staging of one request, and the thread pool interface. */
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
    uint8_t *heat;         /* access counters, num_rows entries (et_mem_map) */
    uint64_t *dirty;       /* caller-owned bitmap of rows written since it was last taken, or NULL */
    uint64_t *scm_off;     /* [max_chunks]: file offset of each SCM chunk (meaningful where it has slots) */
    int64_t scm_chunks;    /* SCM chunks with slots: while 0, no placement entry can name an SCM row */
    uint8_t *chunk_part;   /* [map.entries]: the fabric part of every chunk (< nparts), or NULL */
    int32_t nparts;        /* fabric parts (et_table_set_parts); 0 before */
    int scm_fd;
    int32_t scm_align;
    int32_t heat_mask;     /* count an access when ((position + salt) & heat_mask) == 0 */
    int32_t prefetch;
    uint32_t cxl_delay_ns; /* injected latency per CXL row served by a lookup (0 = off) */
    atomic_int dropped;
    pthread_rwlock_t lock; /* readers: lookups, raw reads, et_partition; writers: row writes, publish,
                              chunk and chunk-part setters, SCM file, dirty take, drop */
};

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
 * not a valid SCM entry). */
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
