/* The write-ahead log's hot path: appending a record (header, CRC-32 and
 * payload parts in one writev) and group commit, with the GIL released
 * around both (cffi drops it for every call).  The files, segments, reading
 * and recovery stay in daemon/embtierd/durability/wal.py, which documents the
 * record format this file writes. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "et_internal.h"

#define WAL_MAGIC 0x4C415745u
#define WAL_HEADER_BYTES 21 /* <IIIQB: magic, payload length, crc32, lsn, kind */
#define WAL_MAX_PARTS 16

/* CRC-32 (the zlib / IEEE 802.3 polynomial, reflected), eight bytes per step. */
static uint32_t crc_table[8][256];
static pthread_once_t crc_once = PTHREAD_ONCE_INIT;

static void crc_init(void) {
    for (uint32_t b = 0; b < 256; b++) {
        uint32_t c = b;
        for (int k = 0; k < 8; k++)
            c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1u)));
        crc_table[0][b] = c;
    }
    for (uint32_t b = 0; b < 256; b++)
        for (int t = 1; t < 8; t++)
            crc_table[t][b] = (crc_table[t - 1][b] >> 8) ^ crc_table[0][crc_table[t - 1][b] & 0xFF];
}

static uint32_t crc_update(uint32_t crc, const uint8_t *p, size_t n) {
    uint32_t c = ~crc;
    while (n && ((uintptr_t)p & 7)) {
        c = (c >> 8) ^ crc_table[0][(c ^ *p++) & 0xFF];
        n--;
    }
    for (; n >= 8; n -= 8, p += 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        w ^= c; /* little-endian: the low four bytes take the running CRC */
        c = crc_table[7][w & 0xFF] ^ crc_table[6][(w >> 8) & 0xFF] ^ crc_table[5][(w >> 16) & 0xFF] ^
            crc_table[4][(w >> 24) & 0xFF] ^ crc_table[3][(w >> 32) & 0xFF] ^ crc_table[2][(w >> 40) & 0xFF] ^
            crc_table[1][(w >> 48) & 0xFF] ^ crc_table[0][w >> 56];
    }
    while (n--)
        c = (c >> 8) ^ crc_table[0][(c ^ *p++) & 0xFF];
    return ~c;
}

uint32_t et_crc32(uint32_t crc, const uint8_t *data, int64_t bytes) {
    if (!data || bytes < 0)
        return crc;
    pthread_once(&crc_once, crc_init);
    return crc_update(crc, data, (size_t)bytes);
}

struct et_commit {
    pthread_mutex_t mu;
    pthread_cond_t done; /* a leader's fsync ended */
    int fd;              /* the segment appended to (not owned) */
    int syncing;         /* a leader is in fdatasync */
    int failed;          /* the errno of a failed fdatasync: nothing is appended or made durable again */
    int64_t appended;    /* the last record written */
    int64_t durable;     /* the last record known durable */
};

et_commit *et_commit_new(int64_t durable_lsn) {
    et_commit *c = calloc(1, sizeof *c);
    if (!c)
        return NULL;
    pthread_mutex_init(&c->mu, NULL);
    pthread_cond_init(&c->done, NULL);
    c->fd = -1;
    c->appended = c->durable = durable_lsn;
    return c;
}

void et_commit_free(et_commit *c) {
    if (!c)
        return;
    pthread_cond_destroy(&c->done);
    pthread_mutex_destroy(&c->mu);
    free(c);
}

int et_commit_switch(et_commit *c, int32_t fd, int64_t appended_lsn, int64_t durable_lsn) {
    if (!c || fd < -1 || appended_lsn < 0 || durable_lsn < 0 || durable_lsn > appended_lsn)
        return ET_E_ARG;
    pthread_mutex_lock(&c->mu);
    c->fd = fd;
    c->appended = appended_lsn;
    if (durable_lsn > c->durable) {
        c->durable = durable_lsn;
        pthread_cond_broadcast(&c->done);
    }
    pthread_mutex_unlock(&c->mu);
    return ET_OK;
}

int64_t et_commit_durable(et_commit *c) {
    if (!c)
        return ET_E_ARG;
    pthread_mutex_lock(&c->mu);
    int64_t d = c->durable;
    pthread_mutex_unlock(&c->mu);
    return d;
}

int32_t et_commit_failed(et_commit *c) {
    if (!c)
        return ET_E_ARG;
    pthread_mutex_lock(&c->mu);
    int32_t e = c->failed;
    pthread_mutex_unlock(&c->mu);
    return e;
}

int et_commit_append(et_commit *c, int64_t lsn, int32_t kind, const uint8_t *const *parts, const int64_t *part_bytes,
                     int32_t nparts, int64_t used_bytes, uint32_t *crc_out, int64_t *err_pos) {
    if (!c || !err_pos || lsn < 0 || kind < 0 || kind > 255 || nparts < 0 || nparts > WAL_MAX_PARTS ||
        used_bytes < 0 || (nparts && (!parts || !part_bytes)))
        return ET_E_ARG;
    uint64_t payload = 0;
    for (int32_t i = 0; i < nparts; i++) {
        if (part_bytes[i] < 0 || (part_bytes[i] && !parts[i]))
            return ET_E_ARG;
        payload += (uint64_t)part_bytes[i] > 0xFFFFFFFFull ? 0x100000000ull : (uint64_t)part_bytes[i]; /* no overflow */
    }
    pthread_mutex_lock(&c->mu);
    int fd = c->fd, failed = c->failed;
    pthread_mutex_unlock(&c->mu);
    if (failed) {
        *err_pos = failed;
        return ET_E_IO;
    }
    if (fd < 0) /* closed */
        return ET_E_ARG;
    if (payload > 0xFFFFFFFFull)
        return ET_E_SIZE;
    pthread_once(&crc_once, crc_init);
    uint8_t lsn_kind[9];
    uint64_t ulsn = (uint64_t)lsn;
    memcpy(lsn_kind, &ulsn, 8); /* little-endian, as every buffer of this interface */
    lsn_kind[8] = (uint8_t)kind;
    uint32_t crc = crc_update(0, lsn_kind, sizeof lsn_kind);
    for (int32_t i = 0; i < nparts; i++)
        crc = crc_update(crc, parts[i], (size_t)part_bytes[i]);
    uint8_t header[WAL_HEADER_BYTES];
    uint32_t magic = WAL_MAGIC, length = (uint32_t)payload;
    memcpy(header, &magic, 4);
    memcpy(header + 4, &length, 4);
    memcpy(header + 8, &crc, 4);
    memcpy(header + 12, lsn_kind, 9);
    struct iovec iov[WAL_MAX_PARTS + 1];
    int count = 0;
    iov[count++] = (struct iovec){header, sizeof header};
    for (int32_t i = 0; i < nparts; i++)
        if (part_bytes[i])
            iov[count++] = (struct iovec){(void *)parts[i], (size_t)part_bytes[i]};
    uint64_t total = sizeof header + payload, written = 0;
    struct iovec *at = iov;
    while (written < total) {
        ssize_t got = writev(fd, at, count);
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0) {
            int e = got < 0 ? errno : EIO;
            if (written) /* no torn record stays behind (the file is appended to only under the caller's lock) */
                while (ftruncate(fd, used_bytes) < 0 && errno == EINTR)
                    ;
            *err_pos = e;
            return ET_E_IO;
        }
        written += (uint64_t)got;
        while (count && (size_t)got >= at->iov_len) {
            got -= (ssize_t)at->iov_len;
            at++;
            count--;
        }
        if (count) {
            at->iov_base = (uint8_t *)at->iov_base + got;
            at->iov_len -= (size_t)got;
        }
    }
    pthread_mutex_lock(&c->mu);
    if (lsn > c->appended)
        c->appended = lsn;
    pthread_mutex_unlock(&c->mu);
    if (crc_out)
        *crc_out = crc;
    return ET_OK;
}

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

int et_commit_wait(et_commit *c, int64_t lsn, double *fsync_seconds, int64_t *err_pos) {
    if (!c || !fsync_seconds || !err_pos)
        return ET_E_ARG;
    *fsync_seconds = 0;
    int rc = ET_OK;
    pthread_mutex_lock(&c->mu);
    if (lsn > c->appended) { /* never appended: waiting would never end */
        pthread_mutex_unlock(&c->mu);
        return ET_E_ARG;
    }
    while (c->durable < lsn) {
        if (c->failed) {
            *err_pos = c->failed;
            rc = ET_E_IO;
            break;
        }
        if (c->syncing) {
            pthread_cond_wait(&c->done, &c->mu);
            continue;
        }
        if (c->fd < 0) { /* closed */
            rc = ET_E_ARG;
            break;
        }
        /* lead: fdatasync everything appended so far, without the mutex, on a dup of the fd so that
         * a segment switch that closes it meanwhile does no harm */
        c->syncing = 1;
        int64_t target = c->appended;
        int fd = dup(c->fd);
        pthread_mutex_unlock(&c->mu);
        int e = 0, synced = 1;
        if (fd < 0) {
            e = errno;
            synced = 0; /* no fd to sync with (EMFILE): nothing was lost, a later call tries again */
        } else {
            double started = now_seconds();
            int r;
            while ((r = fdatasync(fd)) < 0 && errno == EINTR)
                ;
            if (r < 0)
                e = errno;
            *fsync_seconds += now_seconds() - started;
            close(fd);
        }
        pthread_mutex_lock(&c->mu);
        c->syncing = 0;
        if (!e && target > c->durable)
            c->durable = target;
        if (e && synced)
            c->failed = e;
        pthread_cond_broadcast(&c->done);
        if (e) { /* this caller reports it; waiters still waiting see failed, or lead the next attempt */
            *err_pos = e;
            rc = ET_E_IO;
            break;
        }
    }
    pthread_mutex_unlock(&c->mu);
    return rc;
}
