/* The table handle: geometry, the placement map and heat counters it owns,
 * the chunks of every tier with the slots each has storage for, and the
 * lock that keeps readers off rows that are being written. */
#include "et_internal.h"

#include <stdlib.h>
#include <string.h>

int32_t et_row_stride(int32_t dim, int32_t dtype) {
    if (dim < 1 || dim > (INT32_MAX - 16) / 4) return -1;
    switch (dtype) {
    case ET_DTYPE_F32: return dim * 4;
    case ET_DTYPE_F16: return (dim * 2 + 3) & ~3;
    case ET_DTYPE_I8: return ((dim + 3) & ~3) + 8;
    default: return -1;
    }
}

/* A zeroed mapping of n elements of `size` bytes with transparent huge pages requested; NULL when it fails. */
static void *map_array(int64_t n, size_t size) {
    int err, huge_err;
    return et_mem_map((uint64_t)n * size, 1, &err, &huge_err);
}

static void free_table(et_table *t) {
    if (t->loc) et_mem_unmap(t->loc, (uint64_t)t->num_rows * sizeof *t->loc);
    if (t->heat) et_mem_unmap(t->heat, (uint64_t)t->num_rows * sizeof *t->heat);
    free(t->map.chunks);
    free(t->scm_off);
    free(t->chunk_part);
    et_keys_free(t->keys);
    et_mapping_free(t->mapping);
    free(t);
}

et_table *et_table_new(int64_t num_rows, int32_t dim, int32_t dtype, int32_t chunk_shift,
                       int64_t max_chunks, int *err) {
    int32_t chunk_bits = 0;
    while (max_chunks > 0 && ((int64_t)1 << chunk_bits) < max_chunks) chunk_bits++;
    *err = ET_E_ARG;
    if (num_rows <= 0 || num_rows > ET_MAX_ROWS || et_row_stride(dim, dtype) <= 0 || chunk_shift < 0 ||
        max_chunks <= 0 || chunk_shift + chunk_bits > 30)
        return NULL;
    *err = ET_E_NOMEM;
    et_table *t = calloc(1, sizeof *t);
    if (!t) return NULL;
    t->num_rows = num_rows;
    t->dim = dim;
    t->dtype = dtype;
    t->stride = et_row_stride(dim, dtype);
    t->chunk_shift = chunk_shift;
    t->tier_shift = chunk_shift + chunk_bits;
    t->slot_mask = (1u << t->tier_shift) - 1;
    t->max_chunks = max_chunks;
    t->map.entries = (uint32_t)ET_NUM_TIERS << chunk_bits;
    t->map.chunk_shift = (uint32_t)chunk_shift;
    t->map.chunk_mask = (1u << chunk_shift) - 1;
    t->map.stride = (uint32_t)t->stride;
    t->scm_fd = -1;
    t->scm_align = 4096;
    t->prefetch = 16;
    t->map.chunks = calloc((size_t)t->map.entries + 1, sizeof *t->map.chunks);
    t->scm_off = calloc((size_t)max_chunks, sizeof *t->scm_off);
    t->loc = map_array(num_rows, sizeof *t->loc);
    t->displaced = num_rows - 1; /* a new map is all zeros: only row 0's entry is its id */
    t->heat = map_array(num_rows, sizeof *t->heat);
    pthread_rwlockattr_t attr;
    pthread_rwlockattr_init(&attr);
    /* Writers must not starve behind a steady stream of lookups. */
    pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    int lock_err = pthread_rwlock_init(&t->lock, &attr);
    pthread_rwlockattr_destroy(&attr);
    if (lock_err) {
        free_table(t);
        return NULL;
    }
    if (!t->map.chunks || !t->scm_off || !t->loc || !t->heat) {
        pthread_rwlock_destroy(&t->lock);
        free_table(t);
        return NULL;
    }
    *err = ET_OK;
    return t;
}

void et_table_free(et_table *t) {
    if (!t) return;
    pthread_rwlock_destroy(&t->lock);
    free_table(t);
}

int32_t et_table_tier_shift(et_table *t) { return t->tier_shift; }

int64_t et_table_displaced(et_table *t) {
    pthread_rwlock_rdlock(&t->lock);
    const int64_t n = t->displaced;
    pthread_rwlock_unlock(&t->lock);
    return n;
}

const uint32_t *et_table_loc(et_table *t, int64_t *entries) {
    *entries = t->num_rows;
    return t->loc;
}

uint8_t *et_table_heat(et_table *t, int64_t *entries) {
    *entries = t->num_rows;
    return t->heat;
}

/* The index of a tier's chunk in the per-chunk arrays (tier and chunk checked by the caller). */
static int64_t chunk_index(const et_table *t, int32_t tier, int64_t chunk) {
    return ((int64_t)tier << (t->tier_shift - t->chunk_shift)) + chunk;
}

static int bad_chunk(const et_table *t, int32_t tier, int64_t chunk) {
    return tier < 0 || tier >= ET_NUM_TIERS || chunk < 0 || chunk >= t->max_chunks;
}

int et_table_set_parts(et_table *t, int32_t nparts) {
    if (nparts < 1 || nparts > ET_MAX_FABRIC_PARTS || t->chunk_part) return ET_E_ARG;
    t->chunk_part = calloc(t->map.entries, 1);
    if (!t->chunk_part) return ET_E_NOMEM;
    t->nparts = nparts;
    return ET_OK;
}

int et_table_set_chunk_part(et_table *t, int32_t tier, int64_t chunk, int32_t part) {
    if (!t->chunk_part || bad_chunk(t, tier, chunk) || part < 0 || part >= t->nparts) return ET_E_ARG;
    pthread_rwlock_wrlock(&t->lock);
    t->chunk_part[chunk_index(t, tier, chunk)] = (uint8_t)part;
    pthread_rwlock_unlock(&t->lock);
    return ET_OK;
}

const uint8_t *et_table_chunk_parts(et_table *t, int64_t *entries) {
    *entries = t->chunk_part ? t->map.entries : 0;
    return t->chunk_part;
}

/* Slots of a chunk whose storage holds `rows` rows: at most a whole chunk. */
static uint32_t chunk_slots(const et_table *t, uint64_t rows) {
    return rows < ((uint64_t)1 << t->chunk_shift) ? (uint32_t)rows : (uint32_t)1 << t->chunk_shift;
}

int et_table_set_chunk(et_table *t, int32_t tier, int64_t chunk, void *base, uint64_t bytes) {
    if (bad_chunk(t, tier, chunk) || tier == ET_TIER_SCM || !base != !bytes) return ET_E_ARG;
    if (base && bytes < (uint64_t)t->stride) return ET_E_SIZE;
    pthread_rwlock_wrlock(&t->lock);
    et_chunk *c = &t->map.chunks[chunk_index(t, tier, chunk)];
    const uint32_t slots = chunk_slots(t, bytes / (uint64_t)t->stride);
    if (tier == ET_TIER_CXL) t->cxl_chunks += (slots != 0) - (c->slots != 0);
    c->base = base;
    c->slots = slots;
    pthread_rwlock_unlock(&t->lock);
    return ET_OK;
}

int et_table_set_scm(et_table *t, int fd, int32_t align_bytes) {
    if (fd < 0 || align_bytes < 512 || align_bytes > ET_SCM_BLOCK || (align_bytes & (align_bytes - 1)))
        return ET_E_ARG;
    pthread_rwlock_wrlock(&t->lock);
    t->scm_fd = fd;
    t->scm_align = align_bytes;
    pthread_rwlock_unlock(&t->lock);
    return ET_OK;
}

/* Rows that fit in `bytes` of SCM file space (rows never straddle a 4 KiB block). */
static uint64_t scm_rows(const et_table *t, uint64_t bytes) {
    const int64_t rpb = et_scm_rows_per_block(t->stride);
    return rpb > 0 ? bytes / ET_SCM_BLOCK * (uint64_t)rpb : bytes / et_scm_chunk_bytes(t->stride, 1);
}

int et_table_set_scm_chunk(et_table *t, int64_t chunk, uint64_t file_offset, uint64_t bytes) {
    if (bad_chunk(t, ET_TIER_SCM, chunk) || file_offset % ET_SCM_BLOCK || file_offset > INT64_MAX ||
        bytes > (uint64_t)INT64_MAX - file_offset)
        return ET_E_ARG;
    if (bytes && scm_rows(t, bytes) == 0) return ET_E_SIZE;
    pthread_rwlock_wrlock(&t->lock);
    int rc = t->scm_fd < 0 && bytes ? ET_E_ARG : ET_OK; /* no SCM row without a file to read it from */
    if (rc == ET_OK) {
        et_chunk *c = &t->map.chunks[chunk_index(t, ET_TIER_SCM, chunk)];
        t->scm_chunks += (bytes != 0) - (c->slots != 0);
        t->scm_off[chunk] = file_offset;
        c->slots = chunk_slots(t, scm_rows(t, bytes));
    }
    pthread_rwlock_unlock(&t->lock);
    return rc;
}

uint64_t et_scm_chunk_bytes(int32_t stride, int64_t rows) {
    if (stride <= 0 || rows <= 0) return 0;
    const uint64_t limit = (uint64_t)INT64_MAX;
    int64_t rpb = et_scm_rows_per_block(stride);
    if (rpb > 0) {
        uint64_t blocks = ((uint64_t)rows + (uint64_t)rpb - 1) / (uint64_t)rpb;
        return blocks > limit / ET_SCM_BLOCK ? 0 : blocks * ET_SCM_BLOCK;
    }
    uint64_t row_bytes = ((uint64_t)stride + ET_SCM_BLOCK - 1) / ET_SCM_BLOCK * ET_SCM_BLOCK;
    return (uint64_t)rows > limit / row_bytes ? 0 : (uint64_t)rows * row_bytes;
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

static int64_t dirty_words(const et_table *t) { return (t->num_rows + 63) / 64; }

int et_table_set_dirty(et_table *t, uint64_t *bits, int64_t words) {
    if (bits && words < dirty_words(t)) return ET_E_SIZE;
    pthread_rwlock_wrlock(&t->lock);
    t->dirty = bits;
    pthread_rwlock_unlock(&t->lock);
    return ET_OK;
}

int et_table_take_dirty(et_table *t, uint64_t *out, int64_t words) {
    if (!out) return ET_E_ARG;
    if (words < dirty_words(t)) return ET_E_SIZE;
    size_t bytes = (size_t)dirty_words(t) * sizeof *out;
    pthread_rwlock_wrlock(&t->lock);
    int rc = t->dirty ? ET_OK : ET_E_ARG;
    if (rc == ET_OK) {
        memcpy(out, t->dirty, bytes);
        memset(t->dirty, 0, bytes);
    }
    pthread_rwlock_unlock(&t->lock);
    return rc;
}
