/* cq.c - the context's completion queue: a growable ring and an eventfd for
 * poll/epoll/asyncio. A blocking wait drives the progress engine itself
 * (progress.c) instead of sleeping on a condition variable. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "core.h"

#define CQ_INITIAL_CAPACITY 4096

int lm_cq_init(lm_cq_t *cq)
{
    memset(cq, 0, sizeof(*cq));
    cq->ring = calloc(CQ_INITIAL_CAPACITY, sizeof(*cq->ring));
    if (!cq->ring)
        return lm_fail(LM_ERR_NO_MEMORY, "completion queue allocation failed");
    cq->capacity = CQ_INITIAL_CAPACITY;
    cq->event_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (cq->event_fd < 0) {
        free(cq->ring);
        return lm_fail(LM_ERR_IO, "eventfd: %s", strerror(errno));
    }
    pthread_mutex_init(&cq->lock, NULL);
    return LM_OK;
}

void lm_cq_fini(lm_cq_t *cq)
{
    close(cq->event_fd);
    pthread_mutex_destroy(&cq->lock);
    free(cq->ring);
}

/* Doubling keeps pushes O(1) amortised; a completion is never dropped. */
static int cq_grow(lm_cq_t *cq)
{
    size_t cap = cq->capacity * 2;
    lm_completion_t *ring = malloc(cap * sizeof(*ring));
    if (!ring)
        return -1;
    for (size_t i = 0; i < cq->count; i++)
        ring[i] = cq->ring[(cq->head + i) % cq->capacity];
    free(cq->ring);
    cq->ring = ring;
    cq->capacity = cap;
    cq->head = 0;
    return 0;
}

void lm_cq_push(lm_context_t *ctx, const lm_completion_t *c)
{
    lm_cq_t *cq = &ctx->cq;
    pthread_mutex_lock(&cq->lock);
    if (cq->count == cq->capacity && cq_grow(cq) != 0) {
        /* Out of memory: overwrite nothing; the operation's owner will see
         * the endpoint outstanding count never drop. Logged by errno only. */
        pthread_mutex_unlock(&cq->lock);
        return;
    }
    cq->ring[(cq->head + cq->count) % cq->capacity] = *c;
    bool was_empty = cq->count++ == 0;
    if (was_empty && atomic_load(&cq->fd_wanted)) {
        uint64_t one = 1;
        ssize_t n = write(cq->event_fd, &one, sizeof(one));
        (void)n; /* EAGAIN only when the counter is already non-zero */
    }
    pthread_mutex_unlock(&cq->lock);
    if (was_empty)
        lm_progress_kick(ctx);
}

static int cq_take_locked(lm_cq_t *cq, lm_completion_t *out, int max)
{
    int n = 0;
    while (n < max && cq->count > 0) {
        out[n++] = cq->ring[cq->head];
        cq->head = (cq->head + 1) % cq->capacity;
        cq->count--;
    }
    if (n > 0 && cq->count == 0 && atomic_load(&cq->fd_wanted)) {
        uint64_t drained;
        ssize_t r = read(cq->event_fd, &drained, sizeof(drained));
        (void)r;
    }
    return n;
}

int lm_cq_poll(lm_context_t *ctx, lm_completion_t *out, int max)
{
    if (!ctx || !out || max <= 0)
        return lm_fail(LM_ERR_INVALID, "lm_cq_poll: bad arguments");
    lm_cq_t *cq = &ctx->cq;
    pthread_mutex_lock(&cq->lock);
    int n = cq_take_locked(cq, out, max);
    pthread_mutex_unlock(&cq->lock);
    return n;
}

int lm_cq_wait(lm_context_t *ctx, lm_completion_t *out, int max, int timeout_ms)
{
    if (!ctx || !out || max <= 0)
        return lm_fail(LM_ERR_INVALID, "lm_cq_wait: bad arguments");
    uint64_t deadline = timeout_ms < 0 ? UINT64_MAX : lm_now_ns() + (uint64_t)timeout_ms * 1000000ull;
    for (;;) {
        int n = lm_cq_poll(ctx, out, max);
        if (n != 0)
            return n;
        uint64_t now = lm_now_ns();
        if (now >= deadline)
            return timeout_ms == 0 ? lm_cq_poll(ctx, out, max) : 0;
        uint64_t left_ms = deadline == UINT64_MAX ? 100 : (deadline - now + 999999) / 1000000;
        /* Bounded rounds so a deadline is never overshot by much. */
        lm_progress_drive(ctx, timeout_ms == 0 ? 0 : (int)(left_ms < 100 ? left_ms : 100));
        if (timeout_ms == 0)
            return lm_cq_poll(ctx, out, max);
    }
}
