/* shmem.c - host memory a same-host peer may map (lm_shmem_*): the shm
 * transport's one-copy path for writes into it.
 *
 * An allocation is a sealed memfd (its size can never change, so a mapping of
 * it cannot fault) mapped shared. A region registered over it may be granted
 * to an shm peer (shm/: MAP_REQ), which then writes straight into the pages.
 * Deregistration revokes every grant at once without the peers' help: the
 * owner's range is moved onto a fresh memfd holding a copy of the bytes
 * (mremap over the same addresses), so the peers' mappings keep only the old
 * pages, which nobody reads any more. The owner's pointers stay valid.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core.h"

/* A sealed memfd of length bytes, mapped shared at *addr_out. */
static int mapped_memfd(uint64_t length, int *fd_out, uint64_t *ino_out, uint8_t **addr_out)
{
    int fd = memfd_create("lamina-region", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0)
        return lm_fail(LM_ERR_NO_MEMORY, "memfd_create: %s", strerror(errno));
    struct stat st;
    if (ftruncate(fd, (off_t)length) != 0 ||
        fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0 || fstat(fd, &st) != 0) {
        int err = errno;
        close(fd);
        return lm_fail(LM_ERR_NO_MEMORY, "sizing a %llu-byte memfd: %s", (unsigned long long)length,
                       strerror(err));
    }
    void *addr = mmap(NULL, length, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (addr == MAP_FAILED) {
        int err = errno;
        close(fd);
        return lm_fail(LM_ERR_NO_MEMORY, "mapping %llu bytes: %s", (unsigned long long)length, strerror(err));
    }
    *fd_out = fd;
    *ino_out = (uint64_t)st.st_ino;
    *addr_out = addr;
    return LM_OK;
}

static int move_to_fresh_memfd(lm_shmem_t *m, const char *why);

int lm_shmem_alloc(uint64_t length, lm_shmem_t **out)
{
    long page = sysconf(_SC_PAGESIZE);
    if (!out || length == 0 || length > (1ull << 40))
        return lm_fail(LM_ERR_INVALID, "lm_shmem_alloc: length must be 1 byte to 1 TiB");
    length = (length + (uint64_t)page - 1) & ~((uint64_t)page - 1);
    lm_shmem_t *m = calloc(1, sizeof(*m));
    if (!m)
        return lm_fail(LM_ERR_NO_MEMORY, "shmem allocation failed");
    int rc = mapped_memfd(length, &m->fd, &m->ino, &m->addr);
    if (rc != LM_OK) {
        free(m);
        return rc;
    }
    m->length = length;
    pthread_mutex_init(&m->lock, NULL);
    *out = m;
    return LM_OK;
}

void *lm_shmem_addr(const lm_shmem_t *m) { return m ? m->addr : NULL; }
uint64_t lm_shmem_length(const lm_shmem_t *m) { return m ? m->length : 0; }

int lm_shmem_free(lm_shmem_t *m)
{
    if (!m)
        return LM_OK;
    pthread_mutex_lock(&m->lock);
    bool busy = m->mr != NULL;
    pthread_mutex_unlock(&m->lock);
    if (busy)
        return lm_fail(LM_ERR_INVALID, "lm_shmem_free: a region is still registered over it");
    munmap(m->addr, m->length);
    if (m->fd >= 0)
        close(m->fd);
    pthread_mutex_destroy(&m->lock);
    free(m);
    return LM_OK;
}

int lm_mr_register_shmem(lm_context_t *ctx, lm_shmem_t *m, uint32_t access, lm_mr_t **out)
{
    if (!m || !out)
        return lm_fail(LM_ERR_INVALID, "lm_mr_register_shmem: bad arguments");
    pthread_mutex_lock(&m->lock);
    /* One live region at a time: a revocation moves the whole allocation. */
    if (m->mr || m->unrevoked) {
        pthread_mutex_unlock(&m->lock);
        return lm_fail(LM_ERR_INVALID, m->mr ? "lm_mr_register_shmem: the allocation is registered already"
                                              : "lm_mr_register_shmem: an earlier grant could not be revoked");
    }
    atomic_store(&m->granted, false);
    /* Registered before and released since: its file was closed; share a fresh one. */
    int rc = m->fd < 0 ? move_to_fresh_memfd(m, "sharing a region again") : LM_OK;
    if (rc == LM_OK)
        rc = lm_mr_register_over(ctx, m->addr, m->length, access, m, out);
    if (rc == LM_OK)
        m->mr = *out;
    pthread_mutex_unlock(&m->lock);
    return rc;
}

int lm_shmem_grant(lm_mr_t *mr, int32_t *fd, uint64_t *ino, uint64_t *length)
{
    lm_shmem_t *m = mr->shmem;
    if (!m)
        return LM_ERR_ACCESS;
    /* Called with the registry read lock held and mr alive: the deregistration
     * (and so the revocation, which changes fd) has not started yet. */
    atomic_store(&m->granted, true);
    *fd = m->fd;
    *ino = m->ino;
    *length = m->length;
    return LM_OK;
}

/* Move the owner's range onto a fresh memfd holding a copy of its bytes, at
 * the same addresses: mappings a peer holds of the old file no longer reach
 * it (see the top of the file). The old file's descriptor is closed. */
static int move_to_fresh_memfd(lm_shmem_t *m, const char *why)
{
    int fd;
    uint64_t ino;
    uint8_t *fresh;
    int rc = mapped_memfd(m->length, &fd, &ino, &fresh);
    if (rc != LM_OK)
        return rc;
    memcpy(fresh, m->addr, m->length);
    if (mremap(fresh, m->length, m->length, MREMAP_MAYMOVE | MREMAP_FIXED, m->addr) == MAP_FAILED) {
        int err = errno;
        munmap(fresh, m->length);
        close(fd);
        return lm_fail(LM_ERR_NO_MEMORY, "%s (mremap): %s", why, strerror(err));
    }
    if (m->fd >= 0)
        close(m->fd);
    m->fd = fd;
    m->ino = ino;
    return LM_OK;
}

int lm_shmem_release(lm_mr_t *mr)
{
    lm_shmem_t *m = mr->shmem;
    if (!m)
        return LM_OK;
    pthread_mutex_lock(&m->lock);
    int rc = atomic_load(&m->granted) ? move_to_fresh_memfd(m, "revoking a shared region") : LM_OK;
    if (rc == LM_OK) {
        atomic_store(&m->granted, false);
        /* Descriptors only while registered (a process may hold many
         * allocations); a later registration makes a new file (reshare). */
        close(m->fd);
        m->fd = -1;
    } else {
        m->unrevoked = true; /* a peer may still reach these pages: never registered again */
    }
    m->mr = NULL;
    pthread_mutex_unlock(&m->lock);
    return rc;
}
