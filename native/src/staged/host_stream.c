/* host_stream.c - the host stand-in for a copy engine (lamina.h "staged
 * links"): host memory as "device", each stream a worker thread that runs its
 * work in order, as a CUDA stream does. For the staging protocol's tests
 * where no GPU exists, and for the host-to-host baseline of the benchmarks. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../core/core.h"

#define CU_NOT_READY 600 /* CUDA_ERROR_NOT_READY: work still queued */
#define REFUSED 999      /* what a refused copy returns (any non-zero CUresult) */

typedef enum { WORK_COPY, WORK_FN, WORK_STORE } work_kind_t;

typedef struct work {
    work_kind_t kind;
    void *dst;
    const void *src;
    size_t n;
    void (*fn)(void *);
    void *arg;
    uint32_t value;
    struct work *next;
} work_t;

struct lm_host_stream {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    work_t *head, *tail;
    bool running; /* a piece taken off the queue and not finished */
    bool stop;
    bool fail_next_copy;
    uint32_t delay_us;
    pthread_t thread;
};

static void run_work(const work_t *w)
{
    switch (w->kind) {
    case WORK_COPY:
        memmove(w->dst, w->src, w->n);
        break;
    case WORK_FN:
        w->fn(w->arg);
        break;
    case WORK_STORE:
        atomic_store_explicit((_Atomic uint32_t *)w->dst, w->value, memory_order_release);
        break;
    }
}

static void *stream_thread(void *arg)
{
    lm_host_stream_t *hs = arg;
    pthread_mutex_lock(&hs->lock);
    for (;;) {
        while (!hs->head && !hs->stop)
            pthread_cond_wait(&hs->cond, &hs->lock);
        work_t *w = hs->head;
        if (!w)
            break; /* stopped, and nothing left */
        hs->head = w->next;
        if (!hs->head)
            hs->tail = NULL;
        hs->running = true;
        pthread_mutex_unlock(&hs->lock);
        if (hs->delay_us) {
            struct timespec ts = {.tv_sec = hs->delay_us / 1000000u, .tv_nsec = (long)(hs->delay_us % 1000000u) * 1000};
            nanosleep(&ts, NULL);
        }
        run_work(w);
        free(w);
        pthread_mutex_lock(&hs->lock);
        hs->running = false;
    }
    pthread_mutex_unlock(&hs->lock);
    return NULL;
}

int lm_host_stream_create(uint32_t delay_us, lm_host_stream_t **out)
{
    if (!out)
        return lm_fail(LM_ERR_INVALID, "lm_host_stream_create: NULL argument");
    lm_host_stream_t *hs = calloc(1, sizeof(*hs));
    if (!hs)
        return lm_fail(LM_ERR_NO_MEMORY, "no memory for a host stream");
    pthread_mutex_init(&hs->lock, NULL);
    pthread_cond_init(&hs->cond, NULL);
    hs->delay_us = delay_us;
    if (pthread_create(&hs->thread, NULL, stream_thread, hs) != 0) {
        pthread_cond_destroy(&hs->cond);
        pthread_mutex_destroy(&hs->lock);
        free(hs);
        return lm_fail(LM_ERR_NO_MEMORY, "could not start a host stream's thread");
    }
    pthread_setname_np(hs->thread, "lamina-hoststrm");
    *out = hs;
    return LM_OK;
}

void lm_host_stream_destroy(lm_host_stream_t *hs)
{
    if (!hs)
        return;
    pthread_mutex_lock(&hs->lock);
    hs->stop = true;
    pthread_cond_broadcast(&hs->cond);
    pthread_mutex_unlock(&hs->lock);
    pthread_join(hs->thread, NULL);
    pthread_cond_destroy(&hs->cond);
    pthread_mutex_destroy(&hs->lock);
    free(hs);
}

int lm_host_stream_idle(lm_host_stream_t *hs)
{
    if (!hs)
        return 1;
    pthread_mutex_lock(&hs->lock);
    int idle = !hs->head && !hs->running;
    pthread_mutex_unlock(&hs->lock);
    return idle;
}

void lm_host_stream_fail_next_copy(lm_host_stream_t *hs)
{
    if (!hs)
        return;
    pthread_mutex_lock(&hs->lock);
    hs->fail_next_copy = true;
    pthread_mutex_unlock(&hs->lock);
}

/* Queue w on hs, or run it now without a stream; a CUresult. */
static int submit(lm_host_stream_t *hs, const work_t *w)
{
    if (!hs) {
        run_work(w);
        return 0;
    }
    work_t *copy = malloc(sizeof(*copy));
    if (!copy)
        return 2; /* CUDA_ERROR_OUT_OF_MEMORY */
    *copy = *w;
    copy->next = NULL;
    pthread_mutex_lock(&hs->lock);
    if (w->kind == WORK_COPY && hs->fail_next_copy) {
        hs->fail_next_copy = false;
        pthread_mutex_unlock(&hs->lock);
        free(copy);
        return REFUSED;
    }
    if (hs->tail)
        hs->tail->next = copy;
    else
        hs->head = copy;
    hs->tail = copy;
    pthread_cond_signal(&hs->cond);
    pthread_mutex_unlock(&hs->lock);
    return 0;
}

static int host_dtoh(void *dst, uint64_t src, size_t n, void *stream)
{
    return submit(stream, &(work_t){.kind = WORK_COPY, .dst = dst, .src = (const void *)(uintptr_t)src, .n = n});
}

static int host_htod(uint64_t dst, const void *src, size_t n, void *stream)
{
    return submit(stream, &(work_t){.kind = WORK_COPY, .dst = (void *)(uintptr_t)dst, .src = src, .n = n});
}

static int host_launch(void *stream, void (*fn)(void *), void *arg)
{
    return submit(stream, &(work_t){.kind = WORK_FN, .fn = fn, .arg = arg});
}

static int host_write_value32(void *stream, uint64_t address, uint32_t value, unsigned int flags)
{
    (void)flags;
    return submit(stream, &(work_t){.kind = WORK_STORE, .dst = (void *)(uintptr_t)address, .value = value});
}

static int host_query(void *stream)
{
    return lm_host_stream_idle(stream) ? 0 : CU_NOT_READY;
}

void lm_host_copy_fns(lm_copy_fns_t *fns)
{
    if (!fns)
        return;
    *fns = (lm_copy_fns_t){.memcpy_dtoh = host_dtoh, .memcpy_htod = host_htod, .launch_host_func = host_launch,
                           .stream_write_value32 = host_write_value32, .stream_query = host_query};
}
