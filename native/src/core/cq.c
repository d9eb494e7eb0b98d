/* cq.c - the context's completion queue: a growable ring and an eventfd for
 * poll/epoll/asyncio. A blocking wait drives the progress engine itself
 * (progress.c) instead of sleeping on a condition variable.
 *
 * Growth is bounded by back-pressure, not by dropping: at LM_CQ_PAUSE_DEPTH
 * unpolled completions the transports park their receive sides here
 * (lm_cq_park_if_congested) and stop reading their peers' frames; polling
 * below LM_CQ_RESUME_DEPTH queues them for a re-run.
 *
 * Memory running out loses nothing either: every posted operation reserves
 * its completion's place before it is posted (a post that cannot fails with
 * LM_ERR_NO_MEMORY), and arrivals find LM_CQ_HEADROOM places kept free; when
 * the ring cannot grow to keep them, the queue counts as congested ("starved")
 * and receiving pauses until polling makes room. */
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
    cq->max_capacity = SIZE_MAX;
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

/* Doubling keeps pushes O(1) amortised. */
static int cq_grow(lm_cq_t *cq)
{
    size_t cap = cq->capacity * 2;
    if (cap > cq->max_capacity || cap > SIZE_MAX / sizeof(lm_completion_t))
        return -1;
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

/* Grow until `want` places are free beyond the queued, the reserved and the
 * headroom; false when the ring cannot grow (cq lock held). */
static bool cq_make_room_locked(lm_cq_t *cq, size_t want)
{
    while (cq->capacity < cq->count + atomic_load(&cq->reserved) + want + LM_CQ_HEADROOM)
        if (cq_grow(cq) != 0)
            return false;
    return true;
}

int lm_cq_reserve(lm_context_t *ctx)
{
    lm_cq_t *cq = &ctx->cq;
    pthread_mutex_lock(&cq->lock);
    /* Reservations stop short of the arrivals' headroom twice over: a queue
     * starved of it (arrivals paused, acknowledgements unread with them) then
     * always recovers once the application polls what is queued, without
     * waiting for reserved completions that cannot arrive meanwhile. */
    bool room = cq_make_room_locked(cq, 1 + LM_CQ_HEADROOM);
    if (room)
        atomic_fetch_add(&cq->reserved, 1);
    size_t capacity = cq->capacity;
    pthread_mutex_unlock(&cq->lock);
    if (!room)
        return lm_fail(LM_ERR_NO_MEMORY, "completion queue cannot grow past %zu entries (out of memory): "
                       "operation not posted; poll completions and retry", capacity);
    return LM_OK;
}

void lm_cq_unreserve(lm_context_t *ctx)
{
    atomic_fetch_sub(&ctx->cq.reserved, 1);
}

static void cq_push_locked(lm_context_t *ctx, const lm_completion_t *c, bool reserved);

void lm_cq_push_unsunk(lm_ep_t *ep, const lm_completion_t *c, bool reserved)
{
    lm_cq_t *cq = &ep->ctx->cq;
    pthread_mutex_lock(&cq->lock);
    /* A sink installed since the caller looked (lm_cq_take_endpoint holds this
     * lock while installing) gets it: nothing slips into the queue behind it. */
    lm_sink_fn sink = atomic_load_explicit(&ep->sink, memory_order_acquire);
    if (sink) {
        pthread_mutex_unlock(&cq->lock);
        sink(ep->sink_arg, c);
        if (reserved)
            lm_cq_unreserve(ep->ctx);
        return;
    }
    cq_push_locked(ep->ctx, c, reserved);
}

/* Called with the queue lock held; releases it. A reserved completion takes
 * the place held for it (the reservation becomes the entry, never counted
 * twice). */
static void cq_push_locked(lm_context_t *ctx, const lm_completion_t *c, bool reserved)
{
    lm_cq_t *cq = &ctx->cq;
    if (cq->count == cq->capacity && cq_grow(cq) != 0) {
        /* Unreachable while transports honour congestion (the headroom and
         * the reservations cover every push); if not, overwrite nothing and
         * make the loss loud: polls fail with LM_ERR_NO_MEMORY from now on. */
        bool first = cq->lost++ == 0;
        if (reserved)
            atomic_fetch_sub(&cq->reserved, 1);
        pthread_mutex_unlock(&cq->lock);
        if (first)
            lm_progress_kick(ctx);
        return;
    }
    cq->ring[(cq->head + cq->count) % cq->capacity] = *c;
    bool was_empty = cq->count++ == 0;
    if (reserved)
        atomic_fetch_sub(&cq->reserved, 1);
    if (cq->count == LM_CQ_PAUSE_DEPTH)
        atomic_store(&cq->congested, true);
    /* Grow ahead of need; when that fails, pause arrivals while the headroom
     * still holds what transports may push before they see it. */
    if (!cq->starved && !cq_make_room_locked(cq, 0)) {
        cq->starved = true;
        atomic_store(&cq->congested, true);
    }
    if (was_empty && atomic_load(&cq->fd_wanted)) {
        uint64_t one = 1;
        ssize_t n = write(cq->event_fd, &one, sizeof(one));
        (void)n; /* EAGAIN only when the counter is already non-zero */
    }
    pthread_mutex_unlock(&cq->lock);
    if (was_empty)
        lm_progress_kick(ctx);
}

bool lm_cq_park_if_congested(lm_context_t *ctx, lm_io_handler_t *h)
{
    lm_cq_t *cq = &ctx->cq;
    if (!atomic_load_explicit(&cq->congested, memory_order_relaxed))
        return false;
    pthread_mutex_lock(&cq->lock); /* decided under the lock a poll drains with */
    bool park = atomic_load(&cq->congested);
    if (park && !h->parked) {
        h->parked = true;
        h->park_next = cq->parked;
        cq->parked = h;
    }
    pthread_mutex_unlock(&cq->lock);
    return park;
}

void lm_cq_unpark(lm_context_t *ctx, lm_io_handler_t *h)
{
    lm_cq_t *cq = &ctx->cq;
    pthread_mutex_lock(&cq->lock);
    for (lm_io_handler_t **pp = &cq->parked; *pp; pp = &(*pp)->park_next) {
        if (*pp == h) {
            *pp = h->park_next;
            break;
        }
    }
    h->parked = false;
    pthread_mutex_unlock(&cq->lock);
}

/* The queue drained below the resume depth: hand every parked receive side
 * back to the progress engine (cq lock held; it nests the re-run lock). */
static void cq_resume_parked_locked(lm_context_t *ctx)
{
    lm_cq_t *cq = &ctx->cq;
    atomic_store(&cq->congested, false);
    while (cq->parked) {
        lm_io_handler_t *h = cq->parked;
        cq->parked = h->park_next;
        h->parked = false;
        lm_progress_rerun(ctx, h);
    }
}

/* After the queue shrank: end a congestion once it is below the resume depth
 * and, if it was starved, the headroom (twice over, so that it does not
 * flap) is free again (cq lock held). */
static void cq_settle_locked(lm_context_t *ctx)
{
    lm_cq_t *cq = &ctx->cq;
    if (!atomic_load(&cq->congested) || cq->count >= LM_CQ_RESUME_DEPTH)
        return;
    if (cq->starved) {
        if (!cq_make_room_locked(cq, LM_CQ_HEADROOM))
            return;
        cq->starved = false;
    }
    cq_resume_parked_locked(ctx);
}

static int cq_take_locked(lm_context_t *ctx, lm_completion_t *out, int max)
{
    lm_cq_t *cq = &ctx->cq;
    int n = 0;
    while (n < max && cq->count > 0) {
        out[n++] = cq->ring[cq->head];
        cq->head = (cq->head + 1) % cq->capacity;
        cq->count--;
    }
    cq_settle_locked(ctx);
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
    int n = cq_take_locked(ctx, out, max);
    uint64_t lost = n == 0 ? cq->lost : 0;
    pthread_mutex_unlock(&cq->lock);
    if (lost)
        return lm_fail(LM_ERR_NO_MEMORY, "completion queue out of memory: %llu completion(s) lost",
                       (unsigned long long)lost);
    return n;
}

int lm_cq_wait(lm_context_t *ctx, lm_completion_t *out, int max, int timeout_ms)
{
    if (!ctx || !out || max <= 0)
        return lm_fail(LM_ERR_INVALID, "lm_cq_wait: bad arguments");
    uint64_t deadline = UINT64_MAX;
    for (bool first = true;; first = false) {
        int n = lm_cq_poll(ctx, out, max);
        if (n > 0 && first)
            lm_progress_touch(ctx);
        if (n != 0)
            return n; /* completions, or the sticky out-of-memory error */
        if (timeout_ms == 0)
            return lm_cq_poll(ctx, out, max);
        /* The clock only once there is something to wait for (where it is no
         * vDSO read, as in an emulated guest, each read is a syscall). */
        uint64_t now = lm_now_ns();
        if (first && timeout_ms > 0)
            deadline = now + (uint64_t)timeout_ms * 1000000ull;
        if (now >= deadline)
            return 0;
        uint64_t left_ms = deadline == UINT64_MAX ? 100 : (deadline - now + 999999) / 1000000;
        /* Bounded rounds so a deadline is never overshot by much. */
        lm_progress_drive(ctx, (int)(left_ms < 100 ? left_ms : 100));
    }
}

void lm_cq_take_endpoint(lm_context_t *ctx, lm_ep_t *ep, void (*sink)(void *, const lm_completion_t *),
                         void *arg)
{
    lm_cq_t *cq = &ctx->cq;
    pthread_mutex_lock(&cq->lock);
    /* Installed under the queue lock: a push either queued before (taken out
     * below, in order) or sees the sink. */
    if (sink) /* (left as it was when uninstalling: a deliverer that loaded the old sink reads its arg) */
        ep->sink_arg = arg;
    atomic_store_explicit(&ep->sink, sink, memory_order_release);
    if (!sink) { /* uninstalled: what comes next is queued here again */
        pthread_mutex_unlock(&cq->lock);
        return;
    }
    size_t kept = 0;
    for (size_t i = 0; i < cq->count; i++) {
        lm_completion_t c = cq->ring[(cq->head + i) % cq->capacity];
        if (c.ep_id == ep->id)
            sink(arg, &c);
        else
            cq->ring[(cq->head + kept++) % cq->capacity] = c;
    }
    if (kept == 0 && cq->count > 0 && atomic_load(&cq->fd_wanted)) {
        uint64_t drained;
        ssize_t r = read(cq->event_fd, &drained, sizeof(drained));
        (void)r;
    }
    cq->count = kept;
    cq_settle_locked(ctx);
    pthread_mutex_unlock(&cq->lock);
}
