/* The table handle: geometry, caller-owned placement map and heat counters,
 * chunk addresses per tier, and the lock that keeps readers off rows that
 * are being written. */
#include "et_internal.h"

#include <stdlib.h>
#include <string.h>

int32_t et_row_stride(int32_t dim, int32_t dtype) {
    switch (dtype) {
    case ET_DTYPE_F32: return dim * 4;
    case ET_DTYPE_F16: return (dim * 2 + 3) & ~3;
    case ET_DTYPE_I8: return ((dim + 3) & ~3) + 8;
    default: return -1;
    }
}

et_table *et_table_new(int64_t num_rows, int32_t dim, int32_t dtype, int32_t chunk_shift,
                       int64_t max_chunks, uint32_t *loc, uint8_t *heat) {
    int32_t chunk_bits = 0;
    while (max_chunks > 0 && ((int64_t)1 << chunk_bits) < max_chunks) chunk_bits++;
    if (num_rows <= 0 || dim <= 0 || et_row_stride(dim, dtype) <= 0 || chunk_shift < 0 || max_chunks <= 0 ||
        chunk_shift + chunk_bits > 30 || !loc || !heat)
        return NULL;
    et_table *t = calloc(1, sizeof *t);
    if (!t) return NULL;
    t->num_rows = num_rows;
    t->dim = dim;
    t->dtype = dtype;
    t->stride = et_row_stride(dim, dtype);
    t->chunk_shift = chunk_shift;
    t->tier_shift = chunk_shift + chunk_bits;
    t->chunk_mask = (1u << chunk_shift) - 1;
    t->slot_mask = (1u << t->tier_shift) - 1;
    t->max_chunks = max_chunks;
    t->loc = loc;
    t->heat = heat;
    t->scm_fd = -1;
    t->scm_align = 4096;
    t->prefetch = 16;
    t->mem_base = calloc((size_t)ET_NUM_TIERS << chunk_bits, sizeof *t->mem_base);
    t->scm_off = malloc((size_t)max_chunks * sizeof *t->scm_off);
    pthread_rwlockattr_t attr;
    pthread_rwlockattr_init(&attr);
    /* Writers must not starve behind a steady stream of lookups. */
    pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    int lock_err = pthread_rwlock_init(&t->lock, &attr);
    pthread_rwlockattr_destroy(&attr);
    if (!t->mem_base || !t->scm_off || lock_err) {
        free(t->mem_base);
        free(t->scm_off);
        free(t);
        return NULL;
    }
    for (int64_t c = 0; c < max_chunks; c++) t->scm_off[c] = UINT64_MAX;
    return t;
}

int32_t et_table_tier_shift(et_table *t) { return t->tier_shift; }

static int64_t chunk_entries(const et_table *t) {
    return (int64_t)ET_NUM_TIERS << (t->tier_shift - t->chunk_shift);
}

int et_table_set_parts(et_table *t, int32_t nparts) {
    if (nparts < 1 || nparts > ET_MAX_FABRIC_PARTS || t->chunk_part) return ET_E_ARG;
    t->chunk_part = calloc((size_t)chunk_entries(t), 1);
    if (!t->chunk_part) return ET_E_NOMEM;
    t->nparts = nparts;
    return ET_OK;
}

int et_table_set_chunk_part(et_table *t, int32_t tier, int64_t chunk, int32_t part) {
    if (!t->chunk_part || tier < 0 || tier >= ET_NUM_TIERS || chunk < 0 || chunk >= t->max_chunks || part < 0 ||
        part >= t->nparts)
        return ET_E_ARG;
    pthread_rwlock_wrlock(&t->lock);
    t->chunk_part[((int64_t)tier << (t->tier_shift - t->chunk_shift)) + chunk] = (uint8_t)part;
    pthread_rwlock_unlock(&t->lock);
    return ET_OK;
}

const uint8_t *et_table_chunk_parts(et_table *t, int64_t *entries) {
    *entries = t->chunk_part ? chunk_entries(t) : 0;
    return t->chunk_part;
}

void et_table_free(et_table *t) {
    if (!t) return;
    pthread_rwlock_destroy(&t->lock);
    free(t->mem_base);
    free(t->scm_off);
    free(t->chunk_part);
    free(t);
}

int et_table_set_chunk(et_table *t, int32_t tier, int64_t chunk, void *base) {
    if (tier < 0 || tier >= ET_TIER_SCM || chunk < 0 || chunk >= t->max_chunks) return ET_E_ARG;
    pthread_rwlock_wrlock(&t->lock);
    t->mem_base[((int64_t)tier << (t->tier_shift - t->chunk_shift)) + chunk] = base;
    pthread_rwlock_unlock(&t->lock);
    return ET_OK;
}

int et_table_set_scm(et_table *t, int fd, int32_t align_bytes) {
    if (fd < 0 || align_bytes < 512 || align_bytes > ET_SCM_BLOCK || (align_bytes & (align_bytes - 1)))
        return ET_E_ARG;
    t->scm_fd = fd;
    t->scm_align = align_bytes;
    return ET_OK;
}

int et_table_set_scm_chunk(et_table *t, int64_t chunk, uint64_t file_offset) {
    if (chunk < 0 || chunk >= t->max_chunks || (file_offset % ET_SCM_BLOCK)) return ET_E_ARG;
    pthread_rwlock_wrlock(&t->lock);
    t->scm_off[chunk] = file_offset;
    pthread_rwlock_unlock(&t->lock);
    return ET_OK;
}

uint64_t et_scm_chunk_bytes(int32_t stride, int64_t rows) {
    if (stride <= 0 || rows <= 0) return 0;
    int64_t rpb = et_scm_rows_per_block(stride);
    if (rpb > 0) return (uint64_t)((rows + rpb - 1) / rpb) * ET_SCM_BLOCK;
    uint64_t blocks_per_row = ((uint64_t)stride + ET_SCM_BLOCK - 1) / ET_SCM_BLOCK;
    return (uint64_t)rows * blocks_per_row * ET_SCM_BLOCK;
}

void et_table_mark_dropped(et_table *t) {
    pthread_rwlock_wrlock(&t->lock);
    atomic_store(&t->dropped, 1);
    pthread_rwlock_unlock(&t->lock);
}

void et_table_set_heat_sampling(et_table *t, int32_t shift) {
    if (shift < 0) shift = 0;
    if (shift > 16) shift = 16;
    t->heat_mask = (1 << shift) - 1;
}

void et_table_set_prefetch(et_table *t, int32_t distance) {
    t->prefetch = distance < 0 ? 0 : distance > 256 ? 256 : distance;
}

int et_table_set_cxl_delay(et_table *t, uint32_t ns) {
    if (ns > ET_CXL_DELAY_MAX_NS) return ET_E_ARG;
    pthread_rwlock_wrlock(&t->lock);
    t->cxl_delay_ns = ns;
    pthread_rwlock_unlock(&t->lock);
    return ET_OK;
}

int et_table_set_dirty(et_table *t, uint64_t *bits) {
    pthread_rwlock_wrlock(&t->lock);
    t->dirty = bits;
    pthread_rwlock_unlock(&t->lock);
    return ET_OK;
}

int et_table_take_dirty(et_table *t, uint64_t *out) {
    if (!out) return ET_E_ARG;
    size_t bytes = (size_t)((t->num_rows + 63) / 64) * sizeof *out;
    pthread_rwlock_wrlock(&t->lock);
    int rc = t->dirty ? ET_OK : ET_E_ARG;
    if (rc == ET_OK) {
        memcpy(out, t->dirty, bytes);
        memset(t->dirty, 0, bytes);
    }
    pthread_rwlock_unlock(&t->lock);
    return rc;
}
