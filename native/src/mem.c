/* Anonymous memory for the DRAM and CXL tiers (and for the tables' placement
 * maps and heat counters): 2 MiB aligned mappings, bound to NUMA nodes with
 * mbind and marked for transparent huge pages. */
#include "et_internal.h"

#include <errno.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ET_HUGE_PAGE (2ull << 20)
#define ET_PAGE 4096ull
#define ET_MPOL_BIND 2
#define ET_MAX_MAP (1ull << 56) /* larger requests fail (ENOMEM) before their rounding could wrap */

void *et_mem_map(uint64_t bytes, int huge, int *err, int *huge_err) {
    *err = 0;
    *huge_err = 0;
    if (bytes == 0 || bytes > ET_MAX_MAP) {
        *err = bytes ? ENOMEM : EINVAL;
        return NULL;
    }
    uint64_t len = (bytes + ET_HUGE_PAGE - 1) & ~(ET_HUGE_PAGE - 1);
    /* Over-map by one huge page and trim, so the range starts 2 MiB aligned. */
    uint8_t *raw = mmap(NULL, len + ET_HUGE_PAGE, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (raw == MAP_FAILED) {
        *err = errno;
        return NULL;
    }
    uint8_t *start = (uint8_t *)(((uintptr_t)raw + ET_HUGE_PAGE - 1) & ~(uintptr_t)(ET_HUGE_PAGE - 1));
    if (start > raw) munmap(raw, start - raw);
    uint8_t *end = start + len;
    uint8_t *raw_end = raw + len + ET_HUGE_PAGE;
    if (raw_end > end) munmap(end, raw_end - end);

    if (huge && madvise(start, len, MADV_HUGEPAGE) != 0) *huge_err = errno;
    return start;
}

int et_mem_bind(void *addr, uint64_t bytes, const unsigned long *nodemask, int64_t nodemask_words,
                uint64_t maxnode) {
    if (((uintptr_t)addr & (ET_PAGE - 1)) != 0 || bytes == 0 || bytes > UINT64_MAX - (ET_PAGE - 1))
        return EINVAL;
    /* mbind reads maxnode - 1 bits of the mask (get_nodes() in mm/mempolicy.c starts with --maxnode). */
    const uint64_t bits = maxnode > 0 ? maxnode - 1 : 0;
    const uint64_t words = bits / 64 + (bits % 64 != 0);
    if (nodemask && (nodemask_words < 0 || words > (uint64_t)nodemask_words)) return EINVAL;
    uint64_t len = (bytes + ET_PAGE - 1) & ~(ET_PAGE - 1);
    return syscall(SYS_mbind, addr, len, ET_MPOL_BIND, nodemask, maxnode, 0) == 0 ? 0 : errno;
}

int et_mem_unmap(void *addr, uint64_t bytes) {
    if (bytes == 0 || bytes > ET_MAX_MAP) return ET_E_ARG;
    uint64_t len = (bytes + ET_HUGE_PAGE - 1) & ~(ET_HUGE_PAGE - 1);
    return munmap(addr, len) == 0 ? ET_OK : ET_E_ARG;
}
