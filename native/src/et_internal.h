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

struct et_table {
    int64_t num_rows;
    int32_t dim;
    int32_t dtype;
    int32_t stride;        /* bytes per stored row */
    int32_t chunk_shift;   /* slots per chunk = 1 << chunk_shift */
    int32_t tier_shift;    /* placement entry = (tier << tier_shift) | slot */
    uint32_t chunk_mask;   /* (1 << chunk_shift) - 1 */
    uint32_t slot_mask;    /* (1 << tier_shift) - 1 */
    int64_t max_chunks;    /* per tier */
    uint32_t *loc;         /* caller-owned placement map, num_rows entries */
    uint8_t *heat;         /* caller-owned access counters, num_rows entries */
    uint64_t *dirty;       /* caller-owned bitmap of rows written since it was last taken, or NULL */
    uint8_t **mem_base;    /* [ET_NUM_TIERS << (tier_shift - chunk_shift)], indexed by entry >> chunk_shift:
                              chunk bases of DRAM, then CXL; NULL for SCM and unallocated chunks */
    uint64_t *scm_off;     /* [max_chunks]: file offset of each SCM chunk, UINT64_MAX if none */
    uint8_t *chunk_part;   /* like mem_base: the fabric part of every chunk (< nparts), or NULL */
    int32_t nparts;        /* fabric parts (et_table_set_parts); 0 before */
    int scm_fd;
    int32_t scm_align;
    int32_t heat_mask;     /* count an access when ((position + salt) & heat_mask) == 0 */
    int32_t prefetch;
    uint32_t cxl_delay_ns; /* injected latency per CXL row served by a lookup (0 = off) */
    atomic_int dropped;
    pthread_rwlock_t lock; /* readers: lookups, raw reads, et_partition; writers: row writes, publish,
                              chunk and chunk-part setters, dirty take, drop */
};

/* Rows per 4 KiB SCM block (0 when a row spans several blocks). */
static inline int64_t et_scm_rows_per_block(int32_t stride) {
    return stride <= ET_SCM_BLOCK ? ET_SCM_BLOCK / stride : 0;
}

static inline uint32_t et_loc_tier(const et_table *t, uint32_t l) { return l >> t->tier_shift; }
static inline uint32_t et_loc_slot(const et_table *t, uint32_t l) { return l & t->slot_mask; }

/* Memory address of the row at placement entry l; NULL for SCM rows and chunks without storage. */
static inline uint8_t *et_loc_row(const et_table *t, uint32_t l) {
    uint8_t *base = t->mem_base[l >> t->chunk_shift];
    return base ? base + (uint64_t)(l & t->chunk_mask) * t->stride : NULL;
}

/* The fabric part of the row at placement entry l (et_table_set_parts must have run). */
static inline uint8_t et_loc_part(const et_table *t, uint32_t l) { return t->chunk_part[l >> t->chunk_shift]; }

/* Byte offset in the SCM file of a slot, or UINT64_MAX when its chunk has no file space. */
static inline uint64_t et_scm_offset(const et_table *t, uint32_t slot) {
    uint64_t base = t->scm_off[slot >> t->chunk_shift];
    if (base == UINT64_MAX) return UINT64_MAX;
    uint64_t in_chunk = slot & ((1u << t->chunk_shift) - 1);
    int64_t rpb = et_scm_rows_per_block(t->stride);
    if (rpb > 0)
        return base + (in_chunk / rpb) * ET_SCM_BLOCK + (in_chunk % rpb) * (uint64_t)t->stride;
    uint64_t blocks_per_row = ((uint64_t)t->stride + ET_SCM_BLOCK - 1) / ET_SCM_BLOCK;
    return base + in_chunk * blocks_per_row * ET_SCM_BLOCK;
}

/* Reads the SCM rows at request positions pos[0..count) (ascending) in one
 * batch, each distinct row once, into an aligned staging buffer that the
 * caller frees; rows[pos[i]] is set to the row's bytes inside it. */
int et_scm_fetch(et_table *t, const int64_t *ids, const int64_t *pos, int64_t count, const uint8_t **rows,
                 void **staging, int64_t *err_pos);
/* Writes rows to the SCM homes of ids, or of the placement entries locs when locs is not NULL. */
int et_scm_write(et_table *t, const int64_t *ids, const uint32_t *locs, int64_t n, const uint8_t *rows,
                 int64_t *err_pos);

/* Runs fn(arg, part, parts) for part in [0, parts) on the pool and the
 * calling thread; returns when all parts have finished. */
void et_pool_run(void (*fn)(void *arg, int part, int parts), void *arg, int parts);

#endif
