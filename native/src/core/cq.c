/* cq.c - the context's completion queue: a growable ring, a condition
 * variable for blocking waits and an eventfd for poll/epoll/asyncio. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
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
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&cq->cond, &attr);
    pthread_condattr_destroy(&attr);
    return LM_OK;
}

void lm_cq_fini(lm_cq_t *cq)
{
    close(cq->event_fd);
    pthread_cond_destroy(&cq->cond);
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
    if (cq->count++ == 0) {
        uint64_t one = 1;
        ssize_t n = write(cq->event_fd, &one, sizeof(one));
        (void)n; /* EAGAIN only when the counter is already non-zero */
        pthread_cond_broadcast(&cq->cond);
    }
    pthread_mutex_unlock(&cq->lock);
}

static int cq_take_locked(lm_cq_t *cq, lm_completion_t *out, int max)
{
    int n = 0;
    while (n < max && cq->count > 0) {
        out[n++] = cq->ring[cq->head];
        cq->head = (cq->head + 1) % cq->capacity;
        cq->count--;
    }
    if (n > 0 && cq->count == 0) {
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
    lm_cq_t *cq = &ctx->cq;
    struct timespec deadline;
    clock_gettime(CLOCK_MONOTONIC, &deadline);
    if (timeout_ms > 0) {
        deadline.tv_sec += timeout_ms / 1000;
        deadline.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
        if (deadline.tv_nsec >= 1000000000L) {
            deadline.tv_sec++;
            deadline.tv_nsec -= 1000000000L;
        }
    }
    pthread_mutex_lock(&cq->lock);
    while (cq->count == 0 && timeout_ms != 0) {
        int rc = timeout_ms < 0 ? pthread_cond_wait(&cq->cond, &cq->lock)
                                : pthread_cond_timedwait(&cq->cond, &cq->lock, &deadline);
        if (rc == ETIMEDOUT)
            break;
    }
    int n = cq_take_locked(cq, out, max);
    pthread_mutex_unlock(&cq->lock);
    return n;
}
