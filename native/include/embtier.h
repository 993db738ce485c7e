/* embtier native kernels: the declarations cffi reads (cdef) and the C
 * sources include.  Plain declarations and integer #defines only: cffi's
 * parser takes no other preprocessor lines, so the sources include
 * <stdint.h> before this file.
 *
 * Arrays are contiguous little-endian buffers: ids int64, lengths int32,
 * weights and outputs float32, rows in their storage encoding.
 * Every function returns ET_OK (0) or a negative ET_E_* code; where a
 * position is meaningful it is stored in *err_pos.
 *
 * The boundary checks itself.  Every caller buffer comes with its size:
 * ids with their count n, lengths with bags, and every other buffer with a
 * *_len (in its elements) or *_bytes argument, the size the caller really
 * has.  A call checks, in this order: pointers and counts (ET_E_ARG),
 * buffer sizes (ET_E_SIZE), ids (ET_E_ID_RANGE), lengths (ET_E_LENGTHS) -
 * all before it touches anything -, the table (ET_E_DROPPED), then every
 * placement entry it uses, before anything is indexed by it (ET_E_LOCATION;
 * lookups and et_partition check an entry as they reach it, so their
 * outputs are then unspecified; the calls that store rows or entries check
 * them all first).
 * Single-value out-parameters (err_pos, err, entries, evicted; unknown when
 * not NULL) must point at one value.
 */

#define ET_OK 0
#define ET_E_ID_RANGE -1   /* an id < 0 or >= num_rows; *err_pos = its position */
#define ET_E_LENGTHS -2    /* a negative length (*err_pos = bag) or a sum != n (*err_pos = -1) */
#define ET_E_IO -3         /* an SCM write, a log append or fdatasync failed, or a batch of SCM reads could not be
                              issued (a row's read that fails is ET_E_SCM_READ); *err_pos = errno */
#define ET_E_NOMEM -4      /* allocation failed */
#define ET_E_ARG -5        /* bad argument: NULL pointer, negative count, dtype, mode, dim, tier or chunk index */
#define ET_E_DROPPED -6    /* the table was dropped */
#define ET_E_LOCATION -7   /* a placement entry names no slot with storage (a tier >= ET_NUM_TIERS, a chunk
                              >= max_chunks or without storage, a slot past its chunk's storage);
                              *err_pos = the position of the id (or of the entry in locs) */
#define ET_E_SIZE -8       /* a buffer is smaller than the call needs (or, for weights, locs and et_keys_apply's
                              rows, does not hold one entry per id); *err_pos, in calls that have it, = the
                              buffer's ET_BUF_* */
#define ET_E_FULL -9       /* a MANAGED table has no row for a new id: every live id is protected (written or read
                              within the current or the previous epoch); *err_pos = the position of that id */
#define ET_E_SCM_READ -10  /* reading a row from the SCM file failed (a device error or a short read): *err_pos =
                              the position of the id of such a row (et_scm_read_errors counts them) */

/* The buffers an ET_E_SIZE names (by their parameter names). */
#define ET_BUF_OUT 1
#define ET_BUF_TIER_ROWS 2
#define ET_BUF_PART_ROWS 3
#define ET_BUF_WEIGHTS 4
#define ET_BUF_OUT_IDS 5
#define ET_BUF_OUT_LENGTHS 6
#define ET_BUF_OUT_WEIGHTS 7
#define ET_BUF_ROWS 8
#define ET_BUF_LOCS 9
#define ET_BUF_CODES 10
#define ET_BUF_LO 11
#define ET_BUF_SCALE 12
#define ET_BUF_FRESH 13

#define ET_DTYPE_F32 0
#define ET_DTYPE_F16 1
#define ET_DTYPE_I8 2     /* uint8 row-wise quantized: value = q * scale + bias; scale, bias float32 at the row's end */

#define ET_TIER_DRAM 0
#define ET_TIER_CXL 1
#define ET_TIER_SCM 2
#define ET_NUM_TIERS 3

#define ET_POOL_SUM 0
#define ET_POOL_MEAN 1
#define ET_POOL_MAX 2

#define ET_ISA_GENERIC 0
#define ET_ISA_AVX2 1
#define ET_ISA_AVX512 2

typedef struct et_table et_table;

/* ---- memory tiers ---------------------------------------------------- */
/* Anonymous mapping of `bytes`, 2 MiB aligned (bound to NUMA nodes, range by
 * range, with et_mem_bind); huge != 0 asks for transparent huge pages.  On
 * failure returns NULL and sets *err to errno; a failed madvise leaves the
 * mapping usable and reports its errno in *huge_err (0 when it worked). */
void *et_mem_map(uint64_t bytes, int huge, int *err, int *huge_err);
int et_mem_unmap(void *addr, uint64_t bytes);
/* Binds [addr, addr + bytes rounded up to 4 KiB pages) to the nodes of
 * nodemask (nodemask_words unsigned longs; maxnode as for mbind, so the
 * kernel reads maxnode - 1 bits of it) with MPOL_BIND; pages already placed
 * stay where they are.  Returns 0 or an errno: EINVAL when addr is not
 * 4 KiB aligned, bytes is 0 or the mask is shorter than maxnode - 1 bits,
 * else mbind's (EINVAL for a node that does not exist). */
int et_mem_bind(void *addr, uint64_t bytes, const unsigned long *nodemask, int64_t nodemask_words,
                uint64_t maxnode);

/* ---- tables ------------------------------------------------------------ */
/* Bytes one row takes in storage (4-byte aligned; int8 rows carry scale and
 * bias); -1 for an unknown dtype or a dim < 1 or too large for an int32 stride. */
int32_t et_row_stride(int32_t dim, int32_t dtype);

/* A table of num_rows rows (1 to 2^32).  It owns its placement map (one
 * entry per row, zeroed) and its heat counters (saturating access counts,
 * zeroed), both in mappings with transparent huge pages requested (the
 * lookups read them at random).  Slots of tier t live in chunks of
 * 2^chunk_shift rows, at most max_chunks per tier.  A placement entry is
 * (tier << tier_shift) | slot with tier_shift = chunk_shift +
 * ceil(log2(max_chunks)), so that entry >> chunk_shift indexes the table of
 * chunks directly; tier_shift must stay <= 30.  NULL on failure, with *err
 * = ET_E_ARG (bad geometry or dtype) or ET_E_NOMEM. */
et_table *et_table_new(int64_t num_rows, int32_t dim, int32_t dtype, int32_t chunk_shift,
                       int64_t max_chunks, int *err);
void et_table_free(et_table *t);
int32_t et_table_tier_shift(et_table *t);
/* Placement entries that are not their own id (0: the map is the identity, as a table is made). */
int64_t et_table_displaced(et_table *t);
/* The placement map, *entries (= num_rows) of them: read-only for the
 * caller (only et_publish changes it), valid until et_table_free. */
const uint32_t *et_table_loc(et_table *t, int64_t *entries);
/* The heat counters, *entries (= num_rows) of them: the caller may age them
 * in place; valid until et_table_free. */
uint8_t *et_table_heat(et_table *t, int64_t *entries);
/* Memory chunk (DRAM / CXL): the rows of slots [chunk << shift, ...) start at
 * base, which holds `bytes` (the chunk's slots are the rows that fit, at most
 * 2^chunk_shift); base NULL with bytes 0 takes the chunk's storage away.
 * ET_E_ARG for a tier or chunk out of range or base NULL with bytes != 0 (or
 * the reverse), ET_E_SIZE when bytes holds no row. */
int et_table_set_chunk(et_table *t, int32_t tier, int64_t chunk, void *base, uint64_t bytes);
/* SCM: the O_DIRECT file descriptor, the read alignment (512 or 4096); then
 * the byte offset and size of each chunk's file space (offset on a 4 KiB
 * boundary; the chunk's slots are the rows that fit, at most 2^chunk_shift;
 * bytes 0 takes the space away).  ET_E_ARG for a chunk out of range, an
 * unaligned offset, a range past 2^63 or no file yet, ET_E_SIZE when bytes
 * holds no row. */
int et_table_set_scm(et_table *t, int fd, int32_t align_bytes);
int et_table_set_scm_chunk(et_table *t, int64_t chunk, uint64_t file_offset, uint64_t bytes);
/* Bytes of SCM file space a chunk of n rows needs (rows never straddle a 4
 * KiB block); 0 for a stride or n < 1 or a size past 2^63. */
uint64_t et_scm_chunk_bytes(int32_t stride, int64_t rows);
/* After this every call on the table returns ET_E_DROPPED; waits for calls in flight. */
void et_table_mark_dropped(et_table *t);
/* Count only 1 in 2^shift accesses in heat (0 = every access). */
void et_table_set_heat_sampling(et_table *t, int32_t shift);
/* Rows ahead to prefetch in the lookup loops (0 = off). */
void et_table_set_prefetch(et_table *t, int32_t distance);
/* Injected latency per CXL row, in ns (0 = off, at most ET_CXL_DELAY_MAX_NS;
 * ET_E_ARG above): for a CXL tier emulated in DRAM, so that placement shows
 * in lookup times.  After a part of a lookup (et_gather, et_pool) has pooled
 * its bags it busy-waits rows_from_cxl * ns; parts run in parallel on the
 * kernel threads, so their waits overlap like independent devices.  Within
 * a part the delay is serialised per row (each CXL row adds the full
 * latency, where real memory overlaps its misses), so it is an upper bound
 * of the latency effect, and is reported as "injected".  One part waits at
 * most 10 s.  Raw reads (et_read_rows) are not delayed. */
#define ET_CXL_DELAY_MAX_NS 1000000
int et_table_set_cxl_delay(et_table *t, uint32_t ns);

/* Dirty tracking for incremental checkpoints: bits (caller-owned, `words`
 * uint64 of them, at least (num_rows + 63) / 64, else ET_E_SIZE; row r is bit
 * r % 64 of word r / 64) gets the bit of every row that et_write_rows stores;
 * NULL turns tracking off.  Moves between tiers (et_write_slots) change no
 * value and set nothing. */
int et_table_set_dirty(et_table *t, uint64_t *bits, int64_t words);
/* Copies the dirty bits into out (`words` uint64, at least (num_rows + 63) /
 * 64, else ET_E_SIZE) and clears them, as one step with respect to writes
 * (no write falls between copy and clear); ET_E_ARG when tracking is off. */
int et_table_take_dirty(et_table *t, uint64_t *out, int64_t words);

/* Fabric parts (the CXL fabric's devices: DRAM, each CXL port, SCM): every
 * chunk of the table belongs to one part, named when the chunk gets its
 * storage, so a row's part is its chunk's.  et_table_set_parts(nparts) once,
 * before the table is shared with other threads (it takes no lock), then
 * et_table_set_chunk_part per chunk (part < nparts; 0 until set).
 * et_table_chunk_parts: the array (indexed by placement entry >> chunk_shift,
 * *entries of them), read-only for the caller, NULL before set_parts. */
#define ET_MAX_FABRIC_PARTS 255
int et_table_set_parts(et_table *t, int32_t nparts);
int et_table_set_chunk_part(et_table *t, int32_t tier, int64_t chunk, int32_t part);
const uint8_t *et_table_chunk_parts(et_table *t, int64_t *entries);

/* ---- kernels ------------------------------------------------------------ */
/* The lookups take by_key (0 or 1, else ET_E_ARG): with 1, ids are the
 * table's keys, translated to rows by its key space (et_table_set_keys:
 * DENSE ids are rows and are checked as such, HASHED and MANAGED take any
 * int64); with 0 they are rows, checked against num_rows.  unknown (NULL,
 * or one value) receives, on success, how many ids were unknown: MANAGED
 * ids never written or evicted, which read the default row (num_rows - 1)
 * and are counted, never inserted (0 for other key spaces and by_key 0).
 * Heat is counted for the rows read, the default row's too; a keyed lookup
 * of a MANAGED table marks the rows of the known ids it read as touched. */

/* out (out_len floats, at least n * dim) = rows of ids[n].  tier_rows (NULL,
 * or tier_rows_len >= ET_NUM_TIERS) receives how many of the rows were
 * served from each tier, part_rows (NULL, or part_rows_len >= nparts once
 * et_table_set_parts ran) how many from each fabric part. */
int et_gather(et_table *t, const int64_t *ids, int64_t n, float *out, int64_t out_len, int64_t *tier_rows,
              int64_t tier_rows_len, int64_t *part_rows, int64_t part_rows_len, int32_t by_key, int64_t *unknown,
              int64_t *err_pos);
/* out (out_len floats, at least bags * dim) = pooled rows; lengths[bags] sum
 * to n; weights NULL or weights_len == n.  mode ET_POOL_*: sum (of w*x),
 * mean (sum / length), max (of w*x).  Empty bags are zeros.  tier_rows and
 * part_rows as for et_gather. */
int et_pool(et_table *t, const int64_t *ids, int64_t n, const int32_t *lengths, int64_t bags,
            const float *weights, int64_t weights_len, int32_t mode, float *out, int64_t out_len,
            int64_t *tier_rows, int64_t tier_rows_len, int64_t *part_rows, int64_t part_rows_len, int32_t by_key,
            int64_t *unknown, int64_t *err_pos);
/* Orders a request's positions by (fabric part, bag) for pooling per part, on
 * the calling thread (a counting sort: two passes over the ids):
 * out_ids (>= n) and, when weights is given (weights_len == n), out_weights
 * (>= n) hold the rows (never keys: pool them with by_key 0) of part 0 bag
 * by bag, then part 1's, ...;
 * out_lengths (>= nparts * bags) how many of bag b's ids are on part p, at
 * [p * bags + b]; part_rows (>= nparts) how many ids each part got.
 * Pooling out_ids over the nparts * bags lengths gives every part's partial
 * of every bag.  Checks ids, lengths and placement entries like et_pool, but
 * counts no heat (the pooling call that follows does); it counts unknown
 * ids and marks touched rows as a keyed lookup does. */
int et_partition(et_table *t, const int64_t *ids, int64_t n, const int32_t *lengths, int64_t bags,
                 const float *weights, int64_t weights_len, int64_t *out_ids, int64_t out_ids_len,
                 int32_t *out_lengths, int64_t out_lengths_len, float *out_weights, int64_t out_weights_len,
                 int64_t *part_rows, int64_t part_rows_len, int32_t by_key, int64_t *unknown, int64_t *err_pos);
/* Stores n already-encoded rows (rows_bytes >= n * stride) at the homes of
 * ids; a later duplicate id wins.  Readers never see a half-written row. */
int et_write_rows(et_table *t, const int64_t *ids, int64_t n, const uint8_t *rows, int64_t rows_bytes,
                  int64_t *err_pos);
/* Copies the encoded rows of ids into rows (rows_bytes >= n * stride). */
int et_read_rows(et_table *t, const int64_t *ids, int64_t n, uint8_t *rows, int64_t rows_bytes, int64_t *err_pos);

/* Moving rows (the mover's two steps).  et_write_slots stores encoded rows
 * (rows_bytes >= n * stride) in the slots named by placement entries that no
 * row points at yet: it takes no lock, so the caller must keep other writers
 * of the table out.  et_publish then points ids at their new slots (locs_len
 * == ids_len) under the table's write lock: a lookup sees the old home or
 * the new one, both whole, and once it returns no lookup still holds an old
 * slot, so the old slots can be reused.  Both refuse an entry that names no
 * slot with storage (ET_E_LOCATION, *err_pos = its position in locs). */
int et_write_slots(et_table *t, const uint32_t *locs, int64_t n, const uint8_t *rows, int64_t rows_bytes,
                   int64_t *err_pos);
int et_publish(et_table *t, const int64_t *ids, int64_t ids_len, const uint32_t *locs, int64_t locs_len,
               int64_t *err_pos);

/* ---- key spaces ---------------------------------------------------------- */
/* How a table's ids (keys) become rows, set once per table before it is
 * shared (DENSE until then):
 *  DENSE    ids are rows, in [0, num_rows).
 *  HASHED   any int64 id; row = (fmix64(id + seed * 0x9E3779B97F4A7C15)
 *           * num_rows) >> 64 (a 128-bit product; fmix64 is MurmurHash3's
 *           finalizer, all arithmetic mod 2^64), as clients/embtier/keys.py.
 *  MANAGED  any int64 id (INT64_MIN and INT64_MAX too).  Row num_rows - 1
 *           is the default row, which unknown ids read and no id is given;
 *           rows [0, capacity), capacity = num_rows - 1, are given to ids:
 *           each distinct id gets its own row on its first write (plan,
 *           then apply), never-used rows in order 0, 1, 2, ... (so the live
 *           rows are always [0, live)), then, once capacity ids are live,
 *           the row of the coldest unprotected live id (lowest heat), which
 *           is forgotten (evicted).  An id is protected while it was written
 *           or read by a keyed lookup within the current or the previous
 *           epoch; the first plan or keyed lookup once epoch_ns have passed
 *           since the epoch began (the clock is read once per call; 0 =
 *           never by time) starts a new one (two, which protects no row,
 *           once 2 epoch_ns have passed), and so does et_keys_epoch.
 *           The map is keys[capacity] (the id of each live row), an index of
 *           uint32 buckets (linear probing, 15/8 capacity + 1 of them, each
 *           a row number with bits of the id's hash above it), one bit a row
 *           for each of the two epochs and for the rows a plan in progress
 *           chose, and a pool of eviction candidates (capacity / 64 + 1
 *           rows): 15.9375 bytes a row of capacity and at most 40 more, so
 *           under 16 from 1024 rows on (et_keys_stats
 *           reports them).  Ids take rows only in
 *           et_keys_apply, under the table's write lock; lookups read the
 *           map under the read lock. */
#define ET_KEYS_DENSE 0
#define ET_KEYS_HASHED 1
#define ET_KEYS_MANAGED 2
/*  MAPPED   any int64 id; a listed id's row is the one its mapping gives
 *           it (et_table_set_mapping; several ids may share a row), any
 *           other id's is hash_from + the HASHED row for seed and
 *           num_rows - hash_from, so rows [hash_from, num_rows).  The
 *           listed ids are kept in an open-addressing table of 16-byte
 *           slots (id, row; 3/2 slots an id, linear probing) that never
 *           changes, beside the mapping as given (12 bytes an id): 36 bytes
 *           a listed id. */
#define ET_KEYS_MAPPED 3
/* Once, before the table is shared: ET_E_ARG for an unknown key space, a
 * negative epoch_ns, a second call, or MANAGED with num_rows < 2; ET_E_NOMEM
 * when the map cannot be allocated. */
int et_table_set_keys(et_table *t, int32_t key_space, uint64_t seed, int64_t epoch_ns);
/* Once, before the table is shared, instead of et_table_set_keys: makes the
 * table MAPPED, ids[i] -> rows[i] for i < n, unlisted ids hashed by seed into
 * [hash_from, num_rows).  Checked before anything changes, in this order:
 * hash_from outside [0, num_rows), n < 0 or above 2^32 - 2, a NULL array, or
 * a second call: ET_E_ARG with *err_pos = -1; rows[i] outside [0, num_rows):
 * ET_E_ID_RANGE, *err_pos = i (the first); ET_E_DROPPED; ET_E_NOMEM; an id
 * listed twice: ET_E_ARG, *err_pos = its second position. */
int et_table_set_mapping(et_table *t, uint64_t seed, const int64_t *ids, const int64_t *rows, int64_t n,
                         int64_t hash_from, int64_t *err_pos);
/* A MAPPED table's listed ids (*ids) and their rows (*rows), *entries of
 * each, in the order they were given, read-only and valid while the table
 * is; *entries 0 (pointers NULL) for none or another key space. */
void et_mapping_of(et_table *t, const int64_t **ids, const uint32_t **rows, int64_t *entries);
/* For each of ids[n], the row it has after a write of the batch: rows
 * (rows_len >= n) and fresh (fresh_len >= n, 1 or 0).  MANAGED: a live id's
 * own row (fresh 0); a new id the row it would take (fresh 1, for each of
 * its duplicates too, which get the same row): the next never-used row,
 * else the coldest unprotected live row that is not the row of an id of
 * this batch nor already taken by another new id of it.  It changes
 * nothing a reader or a later plan sees, except that the live ids of the
 * batch count as touched (protected), even when it fails.  ET_E_FULL when a
 * new id finds no row: *err_pos = its position, and nothing is planned.
 * HASHED and MAPPED: rows = their rows, fresh all 0; DENSE: rows = ids (ET_E_ID_RANGE,
 * *err_pos = its position, for one outside [0, num_rows)), fresh all 0.
 * Two plans of one table never run at once (a mutex; the store also plans
 * under its own lock, as a plan is only meaningful until the next apply). */
int et_keys_plan(et_table *t, const int64_t *ids, int64_t n, int64_t *rows, int64_t rows_len, uint8_t *fresh,
                 int64_t fresh_len, int64_t *err_pos);
/* MANAGED only (ET_E_ARG otherwise): makes rows[i] (rows_len == n, else
 * ET_E_SIZE) the row of ids[i], in order, under the table's write lock; an
 * id that held the row before is forgotten (counted in *evicted and in the
 * table's evictions).  What a write-ahead log replay re-applies, so any
 * rows are taken that keep the live rows [0, live): a row < live replaces
 * its id, a row == live extends the live set.  Checked first, position by
 * position, before anything changes: a row < 0, >= capacity or > the live
 * rows so far ET_E_ID_RANGE; an id given two rows, a row given two ids, or
 * an id live (before the call) at another row ET_E_ARG; *err_pos = the
 * position.  Duplicates (the same id with the same row) are fine.  Marks
 * the rows touched. */
int et_keys_apply(et_table *t, const int64_t *ids, const int64_t *rows, int64_t n, int64_t rows_len,
                  int64_t *evicted, int64_t *err_pos);
/* stats (stats_len >= ET_KEYS_STATS, else ET_E_SIZE) = the map's figures, in
 * the order of ET_KEYS_STAT_* (counts since the table was made or its keys
 * loaded); all 0 for a table that is not MANAGED, but that a MAPPED
 * table's live = its listed ids and bytes = its map's. */
#define ET_KEYS_STAT_LIVE 0      /* ids with a row now */
#define ET_KEYS_STAT_EVICTIONS 1 /* ids forgotten for new ones */
#define ET_KEYS_STAT_BYTES 2     /* bytes the map allocated: keys, index, epoch bits, candidate pool */
#define ET_KEYS_STAT_CAPACITY 3  /* rows ids can have: num_rows - 1 */
#define ET_KEYS_STAT_UNKNOWN 4   /* unknown ids counted by successful lookups */
#define ET_KEYS_STAT_EPOCH 5     /* protection epochs begun */
#define ET_KEYS_STATS 6
int et_keys_stats(et_table *t, int64_t *stats, int64_t stats_len);
/* The id of each live row, *entries (= live) of them, read-only for the
 * caller (checkpoints), valid until the next et_keys_apply or et_keys_load
 * (the caller keeps them out while it reads); NULL (with *entries 0) for a
 * table that is not MANAGED. */
const int64_t *et_keys_of_rows(et_table *t, int64_t *entries);
/* Restore (MANAGED only, else ET_E_ARG): the live rows become [0, n) with
 * keys[i] the id of row i; evictions, unknown ids and epochs restart from 0
 * with no id protected.  n > capacity: ET_E_ID_RANGE (*err_pos = capacity);
 * a key given twice: ET_E_ARG (*err_pos = its second position); then
 * ET_E_DROPPED.  Nothing changes on an error. */
int et_keys_load(et_table *t, const int64_t *keys, int64_t n, int64_t *err_pos);
/* Starts a new protection epoch now (nothing to do for a table that is not MANAGED). */
int et_keys_epoch(et_table *t);
/* rows (rows_len >= n, else ET_E_SIZE) = the HASHED rows of any ids[n] for
 * seed and num_rows (1 to 2^32, else ET_E_ARG). */
int et_hash_rows(const int64_t *ids, int64_t n, uint64_t seed, int64_t num_rows, int64_t *rows, int64_t rows_len);

/* ---- process-wide ------------------------------------------------------- */
/* Worker threads that split the bags of one call (1 = the caller alone). */
int et_set_kernel_threads(int32_t n);
int32_t et_kernel_threads(void);
/* The instruction set the kernels run with, and forcing a lower one (tests). */
int32_t et_isa(void);
int et_force_isa(int32_t isa);
/* How SCM reads are issued: 1 = Linux AIO batches, 0 = pread fallback. */
int32_t et_scm_async(void);
/* Queue depth of batched SCM reads. */
int et_set_scm_queue_depth(int32_t depth);
/* Reads of the table's rows from its SCM file that failed (each made its call return ET_E_SCM_READ), since the
 * table was made; *last_errno = the errno of the latest (EIO for a short read; 0 before any).  ET_E_ARG for a
 * NULL pointer. */
int64_t et_scm_read_errors(et_table *t, int32_t *last_errno);

/* ---- checkpoint quantization ---- */
/* Row-wise asymmetric quantization of checkpoint rows: a row keeps lo and
 * scale, a value a code q in [0, L], L = 2^bits - 1, standing for
 * lo + q * scale, with q = (x - lo) / scale rounded to nearest (ties to
 * even) and clipped (q = 0 when scale = 0).  A row's codes are packed
 * LSB-first into a little-endian bit stream; every row starts on a byte
 * boundary.
 * ET_QUANT_MINMAX covers the row's [min, max].  ET_QUANT_ADAPTIVE starts
 * from it and moves lo up or hi down by (max - min) / ET_QUANT_ADAPTIVE_BINS
 * at a time, whichever move gives the lower squared error (values outside
 * clip to the ends), ET_QUANT_ADAPTIVE_MAX_SHRINK_BINS moves at most, and
 * keeps the best range seen, so it is never worse than min-max.
 * Bounds for a value x and its reconstruction x' (plus a few float ulps):
 *   min-max   |x - x'| <= scale / 2
 *   adaptive  |x - x'| <= scale / 2 + (max - min) * MAX_SHRINK_BINS / BINS */
#define ET_QUANT_MINMAX 0
#define ET_QUANT_ADAPTIVE 1
#define ET_QUANT_ADAPTIVE_BINS 64
#define ET_QUANT_ADAPTIVE_MAX_SHRINK_BINS 10 /* the range shrinks by at most 10/64 = 15.6 % of max - min */
/* Bytes of one packed row, ceil(dim * bits / 8); ET_E_ARG for dim <= 0 or bits outside [2, 8]. */
int64_t et_quant_row_bytes(int32_t dim, int32_t bits);
/* rows (rows_len floats, at least n * dim) -> codes (codes_bytes, at least
 * n * et_quant_row_bytes), lo (lo_len >= n), scale (scale_len >= n); bits
 * 2 to 8 (checkpoints use 2, 3, 4 and 8).  lo is rounded down and scale up,
 * to float, or with params_fp16 != 0 to values exact in IEEE half
 * precision, so lo + L * scale still covers the range chosen (for float
 * parameters, up to FLT_MAX); the codes use the rounded values.  A constant
 * row gets scale 0 when lo is exactly its value, else the smallest scale
 * that covers it.  A non-finite value, or a half-precision parameter that
 * would be infinite: ET_E_ARG, *err_pos = the row (outputs then
 * unspecified).  Rows are split across the kernel threads; the output does
 * not depend on their number or on the instruction set. */
int et_quantize(const float *rows, int64_t rows_len, int64_t n, int32_t dim, int32_t bits, int32_t method,
                int32_t params_fp16, uint8_t *codes, int64_t codes_bytes, float *lo, int64_t lo_len, float *scale,
                int64_t scale_len, int64_t *err_pos);
/* codes (codes_bytes, at least n * et_quant_row_bytes), lo (lo_len >= n),
 * scale (scale_len >= n) -> rows (rows_len floats, at least n * dim) =
 * lo + q * scale (in double, then rounded to float).  A row whose lo or
 * scale is not finite, whose scale is negative or whose lo + L * scale
 * exceeds the float range: ET_E_ARG, *err_pos = the row. */
int et_dequantize(const uint8_t *codes, int64_t codes_bytes, const float *lo, int64_t lo_len, const float *scale,
                  int64_t scale_len, int64_t n, int32_t dim, int32_t bits, float *rows, int64_t rows_len,
                  int64_t *err_pos);

/* The write-ahead log's appends and group commit (daemon/embtierd/durability/wal.py keeps the
 * segment files and documents the record: a 21-byte header <IIIQB, magic 0x4C415745, payload
 * length, CRC-32, LSN, kind, then the payload; the CRC covers the packed LSN and kind, then the
 * payload).  An et_commit holds the fd appended to, the last LSN appended and the last known
 * durable; et_commit_new gives NULL when allocation fails. */
typedef struct et_commit et_commit;
et_commit *et_commit_new(int64_t durable_lsn);
void et_commit_free(et_commit *c);
/* Appends go to fd from now on (the caller keeps it open while it is current, and a segment it
 * switches away from has been fsynced: durable_lsn says how far that made the log durable);
 * fd -1: the log is closed, appends and waits that need an fdatasync get ET_E_ARG. */
int et_commit_switch(et_commit *c, int32_t fd, int64_t appended_lsn, int64_t durable_lsn);
/* Writes one record whose payload is the nparts (at most 16) buffers parts[i] of part_bytes[i]
 * bytes, in order, with writev (again after a short write); *crc_out (when not NULL) = its CRC.
 * The caller serializes appends and gives the LSNs in order.  A payload over 2^32 - 1 bytes:
 * ET_E_SIZE.  A failed write cuts the file back to used_bytes (its size before the call), so no
 * part of the record stays: ET_E_IO, *err_pos = errno.  Once an fdatasync has failed
 * (et_commit_failed), nothing is written: ET_E_IO, *err_pos = that fdatasync's errno. */
int et_commit_append(et_commit *c, int64_t lsn, int32_t kind, const uint8_t *const *parts, const int64_t *part_bytes,
                     int32_t nparts, int64_t used_bytes, uint32_t *crc_out, int64_t *err_pos);
/* Returns once every record up to lsn is durable: group commit.  The first caller that finds lsn
 * not durable fdatasyncs everything appended so far while later callers wait for it, and all of
 * them return together.  *fsync_seconds = how long the fdatasyncs this call led took (0 when it
 * led none).  ET_E_ARG for an LSN never appended or a closed log.  When an fdatasync fails,
 * nothing is marked durable, then or ever after: Linux may have dropped the pages it could not
 * write and report the next fdatasync clean, so the records appended since the last durable one
 * may be gone.  That call and every later one that waits for a record not yet durable get
 * ET_E_IO, *err_pos = its errno (et_commit_failed), and no record is appended again: the log
 * is rebuilt from its files by a restart. */
int et_commit_wait(et_commit *c, int64_t lsn, double *fsync_seconds, int64_t *err_pos);
/* The last LSN known durable. */
int64_t et_commit_durable(et_commit *c);
/* The errno of the fdatasync that failed (see et_commit_wait), 0 while none has. */
int32_t et_commit_failed(et_commit *c);
/* A logged row write in one call: checks the rows and ids as et_write_rows does, then appends
 * the record (et_commit_append), then stores the rows (et_write_rows).  *logged = 1 once the
 * record is written: a code returned after that is et_write_rows' (the record stays in the
 * log); before it, nothing was written anywhere (a bad argument, size or id, or
 * et_commit_append's code). */
int et_write_rows_logged(et_table *t, const int64_t *ids, int64_t n, const uint8_t *rows, int64_t rows_bytes,
                         et_commit *c, int64_t lsn, int32_t kind, const uint8_t *const *parts,
                         const int64_t *part_bytes, int32_t nparts, int64_t used_bytes, int32_t *logged,
                         int64_t *err_pos);
/* zlib's crc32(crc, data, bytes) (the IEEE polynomial), for checking et_commit_append's records. */
uint32_t et_crc32(uint32_t crc, const uint8_t *data, int64_t bytes);
