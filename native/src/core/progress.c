/* progress.c - one thread per context that waits on epoll and runs the
 * transports' callbacks; it never holds the GIL and never calls user code. */
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "core.h"

#define MAX_EVENTS 64

static void drain_wake(void *arg, uint32_t events)
{
    (void)events;
    lm_progress_t *p = arg;
    uint64_t v;
    ssize_t r = read(p->wake_fd, &v, sizeof(v));
    (void)r;
}

static void *progress_main(void *arg)
{
    lm_context_t *ctx = arg;
    lm_progress_t *p = &ctx->progress;
    struct epoll_event events[MAX_EVENTS];
    while (!atomic_load(&p->stop)) {
        int n = epoll_wait(p->epoll_fd, events, MAX_EVENTS, -1);
        for (int i = 0; i < n; i++) {
            lm_io_handler_t *h = events[i].data.ptr;
            h->cb(h->arg, events[i].events);
        }
        pthread_mutex_lock(&p->lock);
        p->rounds++;
        pthread_cond_broadcast(&p->cond);
        pthread_mutex_unlock(&p->lock);
    }
    return NULL;
}

static void wake(lm_progress_t *p)
{
    uint64_t one = 1;
    ssize_t r = write(p->wake_fd, &one, sizeof(one));
    (void)r;
}

int lm_progress_start(lm_context_t *ctx)
{
    lm_progress_t *p = &ctx->progress;
    memset(p, 0, sizeof(*p));
    p->epoll_fd = epoll_create1(EPOLL_CLOEXEC);
    if (p->epoll_fd < 0)
        return lm_fail(LM_ERR_IO, "epoll_create1: %s", strerror(errno));
    p->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (p->wake_fd < 0) {
        close(p->epoll_fd);
        return lm_fail(LM_ERR_IO, "eventfd: %s", strerror(errno));
    }
    pthread_mutex_init(&p->lock, NULL);
    pthread_cond_init(&p->cond, NULL);
    p->wake_handler = (lm_io_handler_t){.fd = p->wake_fd, .cb = drain_wake, .arg = p};
    int rc = lm_progress_add(ctx, &p->wake_handler, EPOLLIN);
    if (rc == LM_OK && pthread_create(&p->thread, NULL, progress_main, ctx) != 0)
        rc = lm_fail(LM_ERR_NO_MEMORY, "cannot start the progress thread");
    if (rc != LM_OK) {
        close(p->wake_fd);
        close(p->epoll_fd);
    }
    return rc;
}

void lm_progress_stop(lm_context_t *ctx)
{
    lm_progress_t *p = &ctx->progress;
    atomic_store(&p->stop, true);
    wake(p);
    pthread_join(p->thread, NULL);
    close(p->wake_fd);
    close(p->epoll_fd);
    pthread_cond_destroy(&p->cond);
    pthread_mutex_destroy(&p->lock);
}

int lm_progress_add(lm_context_t *ctx, lm_io_handler_t *h, uint32_t events)
{
    struct epoll_event ev = {.events = events, .data.ptr = h};
    if (epoll_ctl(ctx->progress.epoll_fd, EPOLL_CTL_ADD, h->fd, &ev) != 0)
        return lm_fail(LM_ERR_IO, "epoll_ctl(ADD): %s", strerror(errno));
    return LM_OK;
}

int lm_progress_mod(lm_context_t *ctx, lm_io_handler_t *h, uint32_t events)
{
    struct epoll_event ev = {.events = events, .data.ptr = h};
    if (epoll_ctl(ctx->progress.epoll_fd, EPOLL_CTL_MOD, h->fd, &ev) != 0)
        return lm_fail(LM_ERR_IO, "epoll_ctl(MOD): %s", strerror(errno));
    return LM_OK;
}

void lm_progress_del(lm_context_t *ctx, lm_io_handler_t *h)
{
    /* ENOENT/EBADF are fine: removal is idempotent. */
    epoll_ctl(ctx->progress.epoll_fd, EPOLL_CTL_DEL, h->fd, NULL);
}

bool lm_progress_on_thread(lm_context_t *ctx)
{
    return pthread_equal(pthread_self(), ctx->progress.thread);
}

void lm_progress_barrier(lm_context_t *ctx)
{
    lm_progress_t *p = &ctx->progress;
    if (lm_progress_on_thread(ctx) || atomic_load(&p->stop))
        return;
    pthread_mutex_lock(&p->lock);
    /* The round in progress may have fetched events before the caller's
     * lm_progress_del; the one after it cannot have. */
    uint64_t target = p->rounds + 2;
    while (p->rounds < target && !atomic_load(&p->stop)) {
        wake(p);
        pthread_cond_wait(&p->cond, &p->lock);
    }
    pthread_mutex_unlock(&p->lock);
}
