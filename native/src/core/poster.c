/* Deferred writes on an endpoint (lamina.h "posters"): the GPU tier's staged
 * links prepare a write when they queue a copy and let the CUDA driver's
 * host-function thread post it once the copy is done, so no Python thread
 * sits between the copy engine and the network.
 *
 * The poster stands between the ops and the endpoint: an op posts only while
 * the poster is open, under its lock, so once lm_poster_close returned no op
 * touches the endpoint again and the owner may destroy it. The poster itself
 * lives until its owner and every op still to run have let go of it. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>

#include "core.h"

struct lm_poster {
    pthread_mutex_t lock;
    lm_ep_t *ep;     /* NULL once closed */
    int error;       /* the first post that failed (0: none), under lock */
    atomic_int refs; /* the owner's plus one per op not yet run */
    atomic_ullong pending;
    /* Completion-queue places held for the ops' POSTED notices, one per op
     * not yet run (under lock): a notice is never lost for want of room, and
     * close gives back those of ops that will run only after the endpoint
     * (and maybe its context) is gone. */
    uint64_t reserved;
};

struct lm_poster_op {
    lm_poster_t *poster;
    lm_mr_t *local;
    uint64_t local_off, length, remote_off, wr_id;
    lm_rdesc_t remote;
    uint32_t imm, flags;
    bool notify; /* LM_POSTER_NOTIFY: say when it was posted */
};

int lm_poster_create(lm_ep_t *ep, lm_poster_t **out)
{
    if (!ep || !out)
        return lm_fail(LM_ERR_INVALID, "lm_poster_create: NULL argument");
    lm_poster_t *p = calloc(1, sizeof(*p));
    if (!p)
        return lm_fail(LM_ERR_NO_MEMORY, "no memory for a poster");
    pthread_mutex_init(&p->lock, NULL);
    p->ep = ep;
    atomic_init(&p->refs, 1);
    atomic_init(&p->pending, 0);
    *out = p;
    return LM_OK;
}

static void poster_unref(lm_poster_t *p)
{
    if (atomic_fetch_sub(&p->refs, 1) == 1) {
        pthread_mutex_destroy(&p->lock);
        free(p);
    }
}

void lm_poster_close(lm_poster_t *p)
{
    if (!p)
        return;
    pthread_mutex_lock(&p->lock); /* waits out a post in progress */
    if (p->ep) { /* the ops still to run post nothing now: their notice places go back */
        for (; p->reserved; p->reserved--)
            lm_cq_unreserve(p->ep->ctx);
        p->ep = NULL;
    }
    pthread_mutex_unlock(&p->lock);
}

void lm_poster_destroy(lm_poster_t *p)
{
    if (!p)
        return;
    lm_poster_close(p);
    poster_unref(p); /* freed now, or by the last op still to run */
}

int lm_poster_error(lm_poster_t *p)
{
    if (!p)
        return LM_ERR_INVALID;
    pthread_mutex_lock(&p->lock);
    int error = p->error;
    pthread_mutex_unlock(&p->lock);
    return error;
}

uint64_t lm_poster_pending(lm_poster_t *p)
{
    return p ? atomic_load(&p->pending) : 0;
}

int lm_poster_write_prepare(lm_poster_t *p, lm_mr_t *local, uint64_t local_off, uint64_t length,
                            const lm_rdesc_t *remote, uint64_t remote_off, uint32_t imm, uint32_t flags,
                            uint64_t wr_id, lm_poster_op_t **out)
{
    if (!p || !local || !remote || !out)
        return lm_fail(LM_ERR_INVALID, "lm_poster_write_prepare: NULL argument");
    if (flags & ~(uint32_t)(LM_WRITE_IMM | LM_POSTER_NOTIFY))
        return lm_fail(LM_ERR_INVALID, "lm_poster_write_prepare: unknown flags 0x%x", flags);
    /* What the post would refuse is refused now, where the caller can take
     * the error (on the driver's thread it would only poison the poster). */
    if (lm_mr_check(local, local_off, length, 0) != LM_OK || length > LM_MAX_MESSAGE)
        return lm_fail(LM_ERR_INVALID, "lm_poster_write_prepare: local range [%llu, +%llu) outside the %llu-byte "
                       "region or over the message limit", (unsigned long long)local_off,
                       (unsigned long long)length, (unsigned long long)local->length);
    lm_poster_op_t *op = malloc(sizeof(*op));
    if (!op)
        return lm_fail(LM_ERR_NO_MEMORY, "no memory for a deferred write");
    *op = (lm_poster_op_t){.poster = p, .local = local, .local_off = local_off, .length = length,
                           .remote_off = remote_off, .wr_id = wr_id, .remote = *remote, .imm = imm,
                           .flags = flags & ~LM_POSTER_NOTIFY, .notify = (flags & LM_POSTER_NOTIFY) != 0};
    int rc = LM_OK;
    pthread_mutex_lock(&p->lock);
    if (!p->ep)
        rc = lm_fail(LM_ERR_CLOSED, "lm_poster_write_prepare: the poster is closed");
    else if (local->ctx != p->ep->ctx)
        rc = lm_fail(LM_ERR_INVALID, "lm_poster_write_prepare: the region belongs to another context");
    else if (!lm_mr_reachable(local, p->ep->ops->id))
        rc = lm_fail(LM_ERR_UNSUPPORTED, "lm_poster_write_prepare: the region is device memory, which %s cannot "
                     "reach", p->ep->ops->name);
    if (rc == LM_OK)
        rc = lm_cq_reserve(p->ep->ctx); /* its notice's place (a failure's, or the one asked for) */
    if (rc == LM_OK) { /* counted in while open: a destroy cannot free the poster under us */
        p->reserved++;
        atomic_fetch_add(&p->refs, 1);
        atomic_fetch_add(&p->pending, 1);
        lm_mr_ref(local); /* the record outlives a deregistration; run checks it is still registered */
    }
    pthread_mutex_unlock(&p->lock);
    if (rc != LM_OK) {
        free(op);
        return rc;
    }
    *out = op;
    return LM_OK;
}

static void op_free(lm_poster_op_t *op)
{
    lm_poster_t *p = op->poster;
    atomic_fetch_sub(&p->pending, 1);
    lm_mr_unref(op->local);
    free(op);
    poster_unref(p);
}

/* The op's notice place goes back unused (lock held; none left once closed). */
static void unreserve_locked(lm_poster_t *p)
{
    if (p->ep) {
        p->reserved--;
        lm_cq_unreserve(p->ep->ctx);
    }
}

/* Runs on the driver's thread: no Python, no allocation, one post. */
void lm_poster_run(void *arg)
{
    lm_poster_op_t *op = arg;
    lm_poster_t *p = op->poster;
    pthread_mutex_lock(&p->lock);
    if (p->ep && !p->error) {
        int rc = lm_mr_registered(op->local)
                     ? lm_ep_write(p->ep, op->local, op->local_off, op->length, &op->remote, op->remote_off, op->imm,
                                   op->flags, op->wr_id)
                     : lm_fail(LM_ERR_LOCAL, "a deferred write's region was deregistered before it was posted");
        if (rc != LM_OK)
            p->error = rc; /* its completion never comes: the owner sees this instead */
        /* The notice goes to whoever waits on the endpoint, into its reserved place. */
        if (rc != LM_OK || op->notify) {
            lm_completion_t c = {.wr_id = op->wr_id, .ep_id = p->ep->id, .status = rc, .opcode = LM_OP_POSTED};
            p->reserved--;
            lm_ep_push_reserved(p->ep, &c);
        } else {
            unreserve_locked(p);
        }
    } else {
        unreserve_locked(p);
    }
    pthread_mutex_unlock(&p->lock);
    op_free(op);
}

void lm_poster_cancel(void *arg)
{
    lm_poster_op_t *op = arg;
    lm_poster_t *p = op->poster;
    pthread_mutex_lock(&p->lock);
    unreserve_locked(p);
    pthread_mutex_unlock(&p->lock);
    op_free(op);
}
