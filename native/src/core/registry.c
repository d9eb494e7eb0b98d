/* registry.c - the table of registered memory regions, keyed by random 64-bit
 * keys so that a peer cannot guess its way into memory it was not given. */
#include <errno.h>
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

int lm_mr_register_over(lm_context_t *ctx, void *addr, uint64_t length, uint32_t access, lm_shmem_t *shmem,
                        lm_mr_t **out)
{
    const uint32_t known = LM_ACCESS_LOCAL_WRITE | LM_ACCESS_REMOTE_WRITE | LM_ACCESS_REMOTE_READ;
    if (!ctx || !out || (!addr && length) || (access & ~known))
        return lm_fail(LM_ERR_INVALID, "lm_mr_register: bad arguments (access=0x%x)", access);
    lm_mr_t *mr = calloc(1, sizeof(*mr));
    if (!mr)
        return lm_fail(LM_ERR_NO_MEMORY, "region allocation failed");
    /* shmem set before the region is published: a grant can only follow. */
    *mr = (lm_mr_t){.ctx = ctx, .addr = addr, .length = length, .access = access, .alive = true, .shmem = shmem};
    atomic_init(&mr->refs, 1);
    for (int t = 0; t < LM_MAX_TRANSPORTS; t++) {
        const lm_transport_ops_t *ops = ctx->transports[t];
        if (!ops || !ops->mr_register)
            continue;
        int rc = ops->mr_register(ctx->ifaces[t], mr);
        if (rc != LM_OK) {
            for (int u = 0; u < t; u++)
                if (ctx->transports[u] && ctx->transports[u]->mr_deregister)
                    ctx->transports[u]->mr_deregister(ctx->ifaces[u], mr);
            free(mr);
            return rc;
        }
    }
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
    *out = mr;
    return LM_OK;
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
    for (int t = 0; t < LM_MAX_TRANSPORTS; t++)
        if (ctx->transports[t] && ctx->transports[t]->mr_deregister)
            ctx->transports[t]->mr_deregister(ctx->ifaces[t], mr);
    /* Peers that mapped the memory lose it now; under the write lock, so that
     * none of our transports copies into these pages while they move. */
    pthread_rwlock_wrlock(&ctx->registry_lock);
    int rc = lm_shmem_release(mr);
    pthread_rwlock_unlock(&ctx->registry_lock);
    lm_mr_unref(mr);
    return rc;
}
