/* registry.c - the table of registered memory regions, keyed by random 64-bit
 * keys so that a peer cannot guess its way into memory it was not given. */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#include "core.h"

#define INITIAL_BUCKETS 256

int lm_registry_init(lm_context_t *ctx)
{
    ctx->nbuckets = INITIAL_BUCKETS;
    ctx->buckets = calloc(ctx->nbuckets, sizeof(*ctx->buckets));
    if (!ctx->buckets)
        return lm_fail(LM_ERR_NO_MEMORY, "registry allocation failed");
    pthread_rwlock_init(&ctx->registry_lock, NULL);
    return LM_OK;
}

void lm_registry_fini(lm_context_t *ctx)
{
    pthread_rwlock_destroy(&ctx->registry_lock);
    free(ctx->buckets);
}

void lm_registry_rdlock(lm_context_t *ctx) { pthread_rwlock_rdlock(&ctx->registry_lock); }
void lm_registry_unlock(lm_context_t *ctx) { pthread_rwlock_unlock(&ctx->registry_lock); }

static size_t bucket_of(const lm_context_t *ctx, uint64_t key)
{
    return (size_t)(key ^ (key >> 29)) & (ctx->nbuckets - 1);
}

lm_mr_t *lm_registry_find(lm_context_t *ctx, uint64_t key)
{
    for (lm_mr_t *mr = ctx->buckets[bucket_of(ctx, key)]; mr; mr = mr->hash_next)
        if (mr->key == key)
            return mr;
    return NULL;
}

void lm_mr_ref(lm_mr_t *mr) { atomic_fetch_add(&mr->refs, 1); }

void lm_mr_unref(lm_mr_t *mr)
{
    if (atomic_fetch_sub(&mr->refs, 1) == 1)
        free(mr);
}

bool lm_mr_registered(const lm_mr_t *mr)
{
    lm_registry_rdlock(mr->ctx);
    bool alive = mr->alive;
    lm_registry_unlock(mr->ctx);
    return alive;
}

int lm_mr_check(const lm_mr_t *mr, uint64_t off, uint64_t len, uint32_t access)
{
    if ((mr->access & access) != access)
        return LM_ERR_ACCESS;
    if (off > mr->length || len > mr->length - off)
        return LM_ERR_OUT_OF_BOUNDS;
    return LM_OK;
}

static void registry_grow_locked(lm_context_t *ctx)
{
    size_t n = ctx->nbuckets * 2;
    lm_mr_t **b = calloc(n, sizeof(*b));
    if (!b)
        return; /* chains just get longer */
    lm_mr_t **old = ctx->buckets;
    size_t oldn = ctx->nbuckets;
    ctx->buckets = b;
    ctx->nbuckets = n;
    for (size_t i = 0; i < oldn; i++) {
        while (old[i]) {
            lm_mr_t *mr = old[i];
            old[i] = mr->hash_next;
            size_t j = bucket_of(ctx, mr->key);
            mr->hash_next = b[j];
            b[j] = mr;
        }
    }
    free(old);
}

static uint64_t random_key(void)
{
    uint64_t key = 0;
    while (key == 0)
        if (getrandom(&key, sizeof(key), 0) != (ssize_t)sizeof(key))
            key = 0;
    return key;
}

int lm_mr_register(lm_context_t *ctx, void *addr, uint64_t length, uint32_t access, lm_mr_t **out)
{
    return lm_mr_register_over(ctx, addr, length, access, NULL, out);
}

/* Publish a region every transport that reaches it has registered. */
static void publish(lm_context_t *ctx, lm_mr_t *mr)
{
    pthread_rwlock_wrlock(&ctx->registry_lock);
    do
        mr->key = random_key();
    while (lm_registry_find(ctx, mr->key));
    if (++ctx->nregions > ctx->nbuckets)
        registry_grow_locked(ctx);
    size_t b = bucket_of(ctx, mr->key);
    mr->hash_next = ctx->buckets[b];
    ctx->buckets[b] = mr;
    pthread_rwlock_unlock(&ctx->registry_lock);
}

/* Deregister mr from every transport that registered it (those in mr->reach). */
static void unregister_reached(lm_context_t *ctx, lm_mr_t *mr)
{
    for (int t = 0; t < LM_MAX_TRANSPORTS; t++) {
        const lm_transport_ops_t *ops = ctx->transports[t];
        if (ops && lm_mr_reachable(mr, ops->id) && ops->mr_deregister)
            ops->mr_deregister(ctx->ifaces[t], mr);
    }
}

static lm_mr_t *new_region(lm_context_t *ctx, void *addr, uint64_t length, uint32_t access, bool device,
                           lm_shmem_t *shmem)
{
    lm_mr_t *mr = calloc(1, sizeof(*mr));
    if (!mr)
        return NULL;
    /* shmem set before the region is published: a grant can only follow. */
    *mr = (lm_mr_t){.ctx = ctx, .addr = addr, .length = length, .access = access, .alive = true,
                    .shmem = shmem, .device = device};
    atomic_init(&mr->refs, 1);
    return mr;
}

static const uint32_t known_access = LM_ACCESS_LOCAL_WRITE | LM_ACCESS_REMOTE_WRITE | LM_ACCESS_REMOTE_READ;

int lm_mr_register_over(lm_context_t *ctx, void *addr, uint64_t length, uint32_t access, lm_shmem_t *shmem,
                        lm_mr_t **out)
{
    if (!ctx || !out || (!addr && length) || (access & ~known_access))
        return lm_fail(LM_ERR_INVALID, "lm_mr_register: bad arguments (access=0x%x)", access);
    lm_mr_t *mr = new_region(ctx, addr, length, access, false, shmem);
    if (!mr)
        return lm_fail(LM_ERR_NO_MEMORY, "region allocation failed");
    for (int t = 0; t < LM_MAX_TRANSPORTS; t++) {
        const lm_transport_ops_t *ops = ctx->transports[t];
        if (!ops)
            continue;
        int rc = ops->mr_register ? ops->mr_register(ctx->ifaces[t], mr) : LM_OK;
        if (rc != LM_OK) {
            unregister_reached(ctx, mr);
            free(mr);
            return rc;
        }
        mr->reach |= ops->id; /* host memory: every transport moves it */
    }
    publish(ctx, mr);
    *out = mr;
    return LM_OK;
}

/* Device memory goes only to the transports whose NIC reaches it; the others
 * refuse operations on it (check_op, and the tcp receiver's key lookup). */
static int register_device(lm_context_t *ctx, void *addr, uint64_t length, uint32_t access, int dmabuf_fd,
                           uint64_t dmabuf_offset, const char *what, lm_mr_t **out)
{
    if (!ctx || !out || !addr || length == 0 || (access & ~known_access))
        return lm_fail(LM_ERR_INVALID, "%s: bad arguments (address %p, %llu bytes, access=0x%x)", what, addr,
                       (unsigned long long)length, access);
    lm_mr_t *mr = new_region(ctx, addr, length, access, true, NULL);
    if (!mr)
        return lm_fail(LM_ERR_NO_MEMORY, "region allocation failed");
    char cannot[96] = "";
    for (int t = 0; t < LM_MAX_TRANSPORTS; t++) {
        const lm_transport_ops_t *ops = ctx->transports[t];
        if (!ops)
            continue;
        if (!ops->mr_register_device) {
            size_t used = strlen(cannot);
            snprintf(cannot + used, sizeof(cannot) - used, "%s%s", used ? ", " : "", ops->name);
            continue;
        }
        int rc = ops->mr_register_device(ctx->ifaces[t], mr, dmabuf_fd, dmabuf_offset);
        if (rc != LM_OK) {
            unregister_reached(ctx, mr);
            free(mr);
            return rc; /* the transport said why */
        }
        mr->reach |= ops->id;
    }
    if (!mr->reach) {
        free(mr);
        return lm_fail(LM_ERR_UNSUPPORTED, "%s: no transport of this context reaches device memory (open: %s, "
                       "which copy with the CPU; it takes verbs with GPUDirect RDMA)", what, cannot[0] ? cannot : "none");
    }
    publish(ctx, mr);
    *out = mr;
    return LM_OK;
}

int lm_mr_register_dmabuf(lm_context_t *ctx, int fd, uint64_t offset, uint64_t length, uint64_t iova,
                          uint32_t access, lm_mr_t **out)
{
    if (fd < 0)
        return lm_fail(LM_ERR_INVALID, "lm_mr_register_dmabuf: no dma-buf descriptor (fd %d)", fd);
    return register_device(ctx, (void *)(uintptr_t)iova, length, access, fd, offset, "lm_mr_register_dmabuf",
                           out);
}

int lm_mr_register_device(lm_context_t *ctx, void *addr, uint64_t length, uint32_t access, lm_mr_t **out)
{
    return register_device(ctx, addr, length, access, -1, 0, "lm_mr_register_device", out);
}

int lm_mr_descriptor(lm_mr_t *mr, lm_rdesc_t *out)
{
    if (!mr || !out)
        return lm_fail(LM_ERR_INVALID, "lm_mr_descriptor: bad arguments");
    *out = (lm_rdesc_t){.key = mr->key, .addr = (uint64_t)(uintptr_t)mr->addr,
                        .length = mr->length, .rkey = mr->rkey, .access = mr->access};
    return LM_OK;
}

int lm_mr_deregister(lm_mr_t *mr)
{
    if (!mr)
        return lm_fail(LM_ERR_INVALID, "lm_mr_deregister: NULL region");
    lm_context_t *ctx = mr->ctx;
    /* Taking the lock for writing waits out any transport mid-copy; after
     * alive=false no transport starts touching the memory again. */
    pthread_rwlock_wrlock(&ctx->registry_lock);
    lm_mr_t **pp = &ctx->buckets[bucket_of(ctx, mr->key)];
    while (*pp && *pp != mr)
        pp = &(*pp)->hash_next;
    if (*pp)
        *pp = mr->hash_next;
    mr->alive = false;
    ctx->nregions--;
    pthread_rwlock_unlock(&ctx->registry_lock);
    unregister_reached(ctx, mr); /* every transport that registered it */
    /* Peers that mapped the memory lose it now; under the write lock, so that
     * none of our transports copies into these pages while they move. */
    pthread_rwlock_wrlock(&ctx->registry_lock);
    int rc = lm_shmem_release(mr);
    pthread_rwlock_unlock(&ctx->registry_lock);
    lm_mr_unref(mr);
    return rc;
}
