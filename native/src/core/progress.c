/* progress.c - the progress engine: epoll over every transport fd, run either
 * by the context's progress thread or, while an application thread waits for
 * completions (lm_cq_wait), by that thread itself.
 *
 * Why both: the thread guarantees progress while the application computes
 * (one-sided reads are served, queued sends drain); letting the waiting
 * thread dispatch saves two thread hand-offs per message on the latency
 * path. While application threads drive, the progress thread parks on the
 * drivers' lease (below) and resumes within LM_LEASE_NS of the last driver
 * leaving, so a tight request/response loop never bounces between the two
 * and a stream of waits never wakes it.
 *
 * Dispatch runs under drive_lock, one dispatcher at a time. lm_progress_del
 * bumps an epoch; a dispatcher whose epoll batch predates the bump drops it
 * (level-triggered events come back), so a removed handler is never called
 * after lm_progress_barrier returns.
 *
 * Handlers can also ask to be called again without new readiness
 * (lm_progress_rerun): a tcp endpoint that spent its receive budget with
 * frames already pulled into its buffer has nothing left for epoll to report.
 * Every dispatch round runs the handlers queued when it started, after the
 * round's epoll events (so one busy endpoint cannot starve the others), and a
 * dispatcher never sleeps while the queue is non-empty.
 */
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#include "core.h"

#define MAX_EVENTS 64
/* The progress thread resumes at most this long (at least half of it) after
 * the last application thread stopped driving (the drivers' lease, below). */
#define LM_LEASE_NS 1000000ull
/* A driver spins this long on the transports' poll hooks (iface_poll) before
 * sleeping in epoll. A completion that lands within it skips the event path
 * (device interrupt -> completion channel -> epoll -> wake-up), which costs
 * tens of microseconds per message on rxe where perftest busy-polls; a peer
 * slower than that costs one bounded burst of CPU before the usual sleep. */
#define LM_DRIVE_SPIN_NS 50000ull
/* While spins keep delivering, a driver would never reach epoll (tcp sockets,
 * control sockets, async events): it looks there, without sleeping, at least
 * this often (the progress thread is parked meanwhile). */
#define LM_DRIVE_FAIR_NS 100000ull
/* Polling mode (LM_PROGRESS_POLL): a waiting thread spins on the poll hooks
 * for up to LM_DRIVE_FAIR_NS per round, then looks at epoll without sleeping,
 * round after round until lm_cq_wait's deadline: never a sleep, never a
 * wake-up to pay for, a core busy per waiting thread. */

static _Thread_local bool tls_dispatching;
static _Thread_local bool tls_driving; /* an application thread inside lm_progress_drive */

static void wake_others_if_notified(lm_progress_t *p);

void lm_cond_init_monotonic(pthread_cond_t *cond)
{
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(cond, &attr);
    pthread_condattr_destroy(&attr);
}

uint64_t lm_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void wake(lm_progress_t *p)
{
    uint64_t one = 1;
    ssize_t r = write(p->wake_fd, &one, sizeof(one));
    (void)r;
}

static void drain_wake(void *arg, uint32_t events)
{
    (void)events;
    lm_progress_t *p = arg;
    uint64_t v;
    ssize_t r = read(p->wake_fd, &v, sizeof(v));
    (void)r;
}

/* ---- timers (touched only under drive_lock, i.e. from dispatch) -------- */

void lm_timer_arm(lm_context_t *ctx, lm_timer_t *t, uint64_t delay_ns)
{
    if (atomic_load(&t->armed))
        return;
    t->deadline_ns = lm_now_ns() + delay_ns;
    atomic_store(&t->armed, true);
    if (!t->linked) {
        t->linked = true;
        t->next = ctx->progress.timers;
        ctx->progress.timers = t;
    }
}

void lm_timer_disarm(lm_timer_t *t)
{
    atomic_store(&t->armed, false);
}

void lm_timer_cancel(lm_context_t *ctx, lm_timer_t *t)
{
    bool outside = !tls_dispatching;
    if (outside)
        pthread_mutex_lock(&ctx->progress.drive_lock);
    for (lm_timer_t **pp = &ctx->progress.timers; *pp; pp = &(*pp)->next) {
        if (*pp == t) {
            *pp = t->next;
            break;
        }
    }
    t->linked = false;
    atomic_store(&t->armed, false);
    if (outside)
        pthread_mutex_unlock(&ctx->progress.drive_lock);
}

/* Walk the timers (under drive_lock): unlink disarmed ones, fire due ones if
 * asked, and return nanoseconds until the next (-1: none). */
static int64_t timers_sweep(lm_progress_t *p, bool fire)
{
    if (!p->timers)
        return -1; /* no clock read: where it is no vDSO read (an emulated guest's hpet) it is dear */
    uint64_t now = lm_now_ns(), first = UINT64_MAX;
    lm_timer_t **pp = &p->timers;
    while (*pp) {
        lm_timer_t *t = *pp;
        bool armed = atomic_load(&t->armed);
        if (!armed || (fire && t->deadline_ns <= now)) {
            *pp = t->next;
            t->linked = false;
            if (armed) {
                atomic_store(&t->armed, false);
                t->cb(t->arg);
            }
            continue;
        }
        if (t->deadline_ns < first)
            first = t->deadline_ns;
        pp = &t->next;
    }
    if (first == UINT64_MAX)
        return -1;
    return first <= now ? 0 : (int64_t)(first - now);
}

/* ---- re-run queue ------------------------------------------------------- */

void lm_progress_rerun(lm_context_t *ctx, lm_io_handler_t *h)
{
    lm_progress_t *p = &ctx->progress;
    pthread_mutex_lock(&p->rerun_lock);
    if (!h->rerun_queued) {
        h->rerun_queued = true;
        h->rerun_next = NULL;
        if (p->rerun_tail)
            p->rerun_tail->rerun_next = h;
        else
            p->rerun_head = h;
        p->rerun_tail = h;
        atomic_store(&p->rerun_pending, true);
    }
    pthread_mutex_unlock(&p->rerun_lock);
    if (!tls_dispatching)
        wake(p); /* a dispatcher may sleep in epoll with nothing to report */
}

static lm_io_handler_t *rerun_pop(lm_progress_t *p)
{
    pthread_mutex_lock(&p->rerun_lock);
    lm_io_handler_t *h = p->rerun_head;
    if (h) {
        p->rerun_head = h->rerun_next;
        if (!p->rerun_head)
            p->rerun_tail = NULL;
        h->rerun_queued = false;
    }
    atomic_store(&p->rerun_pending, p->rerun_head != NULL);
    pthread_mutex_unlock(&p->rerun_lock);
    return h;
}

static void rerun_unlink(lm_progress_t *p, lm_io_handler_t *h)
{
    pthread_mutex_lock(&p->rerun_lock);
    if (h->rerun_queued) {
        lm_io_handler_t *prev = NULL;
        for (lm_io_handler_t *it = p->rerun_head; it; prev = it, it = it->rerun_next) {
            if (it != h)
                continue;
            if (prev)
                prev->rerun_next = h->rerun_next;
            else
                p->rerun_head = h->rerun_next;
            if (p->rerun_tail == h)
                p->rerun_tail = prev;
            break;
        }
        h->rerun_queued = false;
        atomic_store(&p->rerun_pending, p->rerun_head != NULL);
    }
    pthread_mutex_unlock(&p->rerun_lock);
}

static size_t rerun_length(lm_progress_t *p)
{
    size_t n = 0;
    pthread_mutex_lock(&p->rerun_lock);
    for (lm_io_handler_t *it = p->rerun_head; it; it = it->rerun_next)
        n++;
    pthread_mutex_unlock(&p->rerun_lock);
    return n;
}

/* Run the handlers queued so far (under drive_lock, as dispatch); those that
 * queue themselves again wait for the next round. */
static void rerun_dispatch(lm_progress_t *p)
{
    if (!atomic_load(&p->rerun_pending))
        return;
    for (size_t n = rerun_length(p); n > 0; n--) {
        lm_io_handler_t *h = rerun_pop(p);
        if (!h)
            break;
        h->cb(h->arg, LM_EV_RERUN);
    }
}

/* ---- dispatch ----------------------------------------------------------- */

/* Call every open transport's poll hook until one delivers or budget_ns has
 * passed (0: one pass); returns completions delivered. Runs as dispatch: under
 * drive_lock, tls_dispatching set. The hooks leave the fds' readiness alone
 * (a verbs CQ stays armed or its event pending), so the epoll sleep that may
 * follow is still woken by anything that arrives after the last pass. */
/* Spin passes between two clock reads (a power of two), per thread: tuned so
 * that reads come every SPIN_CLOCK_MIN_NS..2x apart. A pass on a NIC's CQ is
 * tens of nanoseconds; where the clock is no vDSO read (an emulated guest's
 * hpet: a syscall and an emulated device read, over a microsecond) a read
 * every few passes would cost more than the polling, and slow the loop that
 * should notice the next completion. */
#define SPIN_CLOCK_MIN_NS 8000u
static _Thread_local uint32_t tls_spin_stride = 16;

static void adapt_spin_stride(uint64_t since_last_read_ns)
{
    if (since_last_read_ns < SPIN_CLOCK_MIN_NS && tls_spin_stride < (1u << 16))
        tls_spin_stride <<= 1;
    else if (since_last_read_ns > 4 * SPIN_CLOCK_MIN_NS && tls_spin_stride > 1)
        tls_spin_stride >>= 1;
}

static int drive_spin(lm_context_t *ctx, uint64_t budget_ns, uint64_t *now)
{
    bool any = false;
    for (int t = 0; t < LM_MAX_TRANSPORTS; t++)
        any |= ctx->transports[t] && ctx->transports[t]->iface_poll;
    if (!any)
        return 0;
    uint64_t start = *now; /* *now: the latest clock read, kept current for the caller */
    int got = 0;
    for (uint32_t pass = 1;; pass++) {
        bool pollable = false;
        for (int t = 0; t < LM_MAX_TRANSPORTS; t++) {
            const lm_transport_ops_t *ops = ctx->transports[t];
            int n = ops && ops->iface_poll ? ops->iface_poll(ctx->ifaces[t]) : -1;
            got += n > 0 ? n : 0;
            pollable |= n >= 0;
        }
        if (got > 0 || budget_ns == 0 || !pollable)
            return got; /* (nothing to poll: no spin, e.g. shm open but no shm endpoint) */
        if ((pass & (tls_spin_stride - 1)) == 0) {
            uint64_t t = lm_now_ns();
            adapt_spin_stride(t - *now);
            *now = t;
            if (t - start >= budget_ns)
                return got;
        }
    }
}

/* Before any sleep in epoll: transports whose peers wake only sleepers
 * (shm) arm those wake-ups; nonzero if one of them has work already. */
static int arm_before_sleep(lm_context_t *ctx)
{
    int pending = 0;
    for (int t = 0; t < LM_MAX_TRANSPORTS; t++) {
        const lm_transport_ops_t *ops = ctx->transports[t];
        if (ops && ops->iface_arm)
            pending |= ops->iface_arm(ctx->ifaces[t]);
    }
    return pending;
}

/* One dispatch round. *now: the clock at entry, read once by a driver and
 * kept current (within one clock stride of the spin) for the caller's lease. */
static int poll_and_dispatch(lm_context_t *ctx, int timeout_ms, uint64_t *now, const atomic_bool *ready)
{
    lm_progress_t *p = &ctx->progress;
    struct epoll_event events[MAX_EVENTS];
    pthread_mutex_lock(&p->drive_lock);
    int64_t timer_ns = timers_sweep(p, false);
    if (tls_driving) {
        /* An application thread waiting for completions: spin on the
         * transports first (not longer than the next timer), then sleep. */
        bool polling = p->mode == LM_PROGRESS_POLL;
        uint64_t budget = timeout_ms == 0 ? 0 : polling ? LM_DRIVE_FAIR_NS : LM_DRIVE_SPIN_NS;
        if (timer_ns >= 0 && (uint64_t)timer_ns < budget)
            budget = (uint64_t)timer_ns;
        tls_dispatching = true;
        *now = lm_now_ns();
        int got = drive_spin(ctx, budget, now);
        if (got > 0) {
            if (*now - p->driver_epoll_ns < LM_DRIVE_FAIR_NS) {
                timers_sweep(p, true);
                wake_others_if_notified(p);
                tls_dispatching = false;
                pthread_mutex_unlock(&p->drive_lock);
                return got;
            }
            timeout_ms = 0; /* delivered: look at the other fds, do not sleep */
        }
        tls_dispatching = false;
        timer_ns = timers_sweep(p, false);
    }
    int64_t timeout_ns = timeout_ms < 0 ? -1 : (int64_t)timeout_ms * 1000000;
    if (tls_driving && p->mode == LM_PROGRESS_POLL)
        timeout_ns = 0; /* polling mode: look at epoll, never sleep in it */
    if (atomic_load(&p->rerun_pending))
        timeout_ns = 0; /* queued work: look at epoll, do not sleep */
    if (timer_ns >= 0 && (timeout_ns < 0 || timer_ns < timeout_ns))
        timeout_ns = timer_ns;
    if (ready && atomic_load(ready))
        timeout_ns = 0; /* a sink set it (under drive_lock, or before we took it): no sleep */
    if (timeout_ns != 0 && arm_before_sleep(ctx)) {
        /* Work arrived that no fd reports (a frame in a shared ring whose
         * producer saw no sleeper): take it now, then look at epoll. */
        timeout_ns = 0;
        tls_dispatching = true;
        uint64_t t = lm_now_ns();
        drive_spin(ctx, 0, &t);
        tls_dispatching = false;
    }
    pthread_mutex_unlock(&p->drive_lock);
    uint64_t epoch = atomic_load(&p->del_epoch);
    /* epoll_pwait2: timers (delayed acknowledgements) need sub-ms resolution. */
    struct timespec ts = {.tv_sec = timeout_ns / 1000000000, .tv_nsec = timeout_ns % 1000000000};
    bool sleeping = timeout_ns != 0;
    if (sleeping)
        atomic_fetch_add(&p->sleepers, 1);
    int n = epoll_pwait2(p->epoll_fd, events, MAX_EVENTS, timeout_ns < 0 ? NULL : &ts, NULL);
    if (sleeping)
        atomic_fetch_sub(&p->sleepers, 1);
    pthread_mutex_lock(&p->drive_lock);
    if (tls_driving)
        p->driver_epoll_ns = *now = lm_now_ns();
    tls_dispatching = true;
    if (n > 0 && atomic_load(&p->del_epoch) == epoch) {
        for (int i = 0; i < n; i++) {
            lm_io_handler_t *h = events[i].data.ptr;
            h->cb(h->arg, events[i].events);
        }
    }
    rerun_dispatch(p);
    timers_sweep(p, true);
    wake_others_if_notified(p);
    tls_dispatching = false;
    pthread_mutex_unlock(&p->drive_lock);
    return n;
}

/* ---- the drivers' lease ----------------------------------------------
 *
 * The progress thread parks while application threads drive, so that it never
 * competes with them for events (a completion it dispatched would have to be
 * handed to the waiting thread: a wake-up and a context switch per message).
 * It must come back when the application stops waiting (to compute), within a
 * bound, without drivers paying for it on every wait:
 *
 * - each driver leaving lm_progress_drive extends a lease to now + LM_LEASE_NS,
 *   but only when less than half of it is left, so a stream of waits costs one
 *   timerfd_settime per LM_LEASE_NS / 2, never a wake-up or a lock hand-off;
 * - the parked thread sleeps on that timerfd: while waits keep coming it never
 *   fires, so nothing rechecks periodically while traffic flows;
 * - when it fires with no driver inside, the thread resumes the epoll loop:
 *   at most LM_LEASE_NS (at least half of it) after the last driver left.
 *   If a driver is inside (a long blocking wait), the thread sleeps again and
 *   that driver's exit arms the next lease.
 * - a driver entering while the thread is in epoll wakes it once, to park it.
 */
static void lease_arm_locked(lm_progress_t *p, uint64_t until_ns)
{
    p->lease_until_ns = until_ns;
    struct itimerspec its = {.it_value = lm_timespec_of_ns(until_ns)};
    timerfd_settime(p->timer_fd, TFD_TIMER_ABSTIME, &its, NULL);
}

static void lease_extend_locked(lm_progress_t *p, uint64_t now)
{
    if (p->lease_until_ns < now + LM_LEASE_NS / 2) {
        p->lease_extensions++;
        lease_arm_locked(p, now + LM_LEASE_NS);
    }
}

/* Sleep until the lease timer fires (or stop pokes it). */
static void lease_sleep(lm_progress_t *p)
{
    struct pollfd pfd = {.fd = p->timer_fd, .events = POLLIN};
    if (poll(&pfd, 1, -1) > 0) {
        uint64_t ticks;
        ssize_t r = read(p->timer_fd, &ticks, sizeof(ticks)); /* EAGAIN if re-armed meanwhile */
        (void)r;
    }
}

static void park_while_driven(lm_progress_t *p)
{
    pthread_mutex_lock(&p->lock);
    while (!atomic_load(&p->stop) && (p->drivers > 0 || lm_now_ns() < p->lease_until_ns)) {
        pthread_mutex_unlock(&p->lock);
        lease_sleep(p);
        pthread_mutex_lock(&p->lock);
    }
    p->thread_in_epoll = true;
    p->thread_resumes++;
    pthread_mutex_unlock(&p->lock);
}

static void *progress_main(void *arg)
{
    lm_context_t *ctx = arg;
    lm_progress_t *p = &ctx->progress;
    while (!atomic_load(&p->stop)) {
        park_while_driven(p);
        if (atomic_load(&p->stop))
            break;
        uint64_t unused;
        poll_and_dispatch(ctx, -1, &unused, NULL);
        pthread_mutex_lock(&p->lock);
        p->thread_in_epoll = false;
        pthread_mutex_unlock(&p->lock);
    }
    return NULL;
}

void lm_progress_drive(lm_context_t *ctx, int timeout_ms)
{
    lm_progress_drive_until(ctx, timeout_ms, NULL);
}

void lm_progress_drive_until(lm_context_t *ctx, int timeout_ms, const atomic_bool *ready)
{
    lm_progress_t *p = &ctx->progress;
    pthread_mutex_lock(&p->lock);
    p->drivers++;
    if (p->thread_in_epoll)
        wake(p); /* move the thread out of epoll_wait and into its park */
    pthread_mutex_unlock(&p->lock);
    tls_driving = true;
    uint64_t now = 0;
    poll_and_dispatch(ctx, timeout_ms, &now, ready);
    tls_driving = false;
    pthread_mutex_lock(&p->lock);
    p->drivers--;
    lease_extend_locked(p, now ? now : lm_now_ns());
    /* epoll wakes one waiter per event, so a thread that had not parked yet
     * may sit in epoll_wait with a stale timeout while we drove: look again. */
    if (p->drivers == 0 && p->thread_in_epoll)
        wake(p);
    pthread_mutex_unlock(&p->lock);
}

void lm_progress_touch(lm_context_t *ctx)
{
    lm_progress_t *p = &ctx->progress;
    pthread_mutex_lock(&p->lock);
    lease_extend_locked(p, lm_now_ns());
    pthread_mutex_unlock(&p->lock);
}

void lm_progress_posted(lm_context_t *ctx)
{
    lm_progress_t *p = &ctx->progress;
    if (tls_dispatching || tls_driving)
        return;
    /* The lease may move once the lock is dropped: at worst one extra or one late round. */
    pthread_mutex_lock(&p->lock);
    bool due = p->lease_until_ns < lm_now_ns() + LM_LEASE_NS / 2;
    pthread_mutex_unlock(&p->lock);
    if (due)
        lm_progress_drive(ctx, 0); /* one round without sleeping; renews the lease */
}

void lm_progress_stats(lm_context_t *ctx, uint64_t *lease_extensions, uint64_t *thread_resumes)
{
    lm_progress_t *p = &ctx->progress;
    pthread_mutex_lock(&p->lock);
    *lease_extensions = p->lease_extensions;
    *thread_resumes = p->thread_resumes;
    pthread_mutex_unlock(&p->lock);
}

void lm_progress_notify(lm_context_t *ctx)
{
    lm_progress_t *p = &ctx->progress;
    if (tls_dispatching)
        atomic_store(&p->notified, true); /* the round's end wakes the other waiters */
    else
        wake(p);
}

/* End of a dispatch round (drive_lock held): a sink changed some waiter's
 * state in it. That waiter may be another thread, asleep in epoll or queued
 * on drive_lock, and the round may have drained the wake fd (drain_wake), so
 * wake them now, after the drain. */
static void wake_others_if_notified(lm_progress_t *p)
{
    if (!atomic_exchange(&p->notified, false))
        return;
    pthread_mutex_lock(&p->lock);
    int others = p->drivers - (tls_driving ? 1 : 0);
    pthread_mutex_unlock(&p->lock);
    if (others > 0)
        wake(p);
}

void lm_progress_kick(lm_context_t *ctx)
{
    /* A driver checks the queue after its own dispatch; a completion pushed by
     * anyone else (the progress thread, a closing endpoint) must wake it. */
    if (!tls_driving)
        wake(&ctx->progress);
}

/* ---- life cycle ---------------------------------------------------------- */

int lm_progress_start(lm_context_t *ctx, uint32_t mode)
{
    lm_progress_t *p = &ctx->progress;
    memset(p, 0, sizeof(*p));
    p->mode = mode;
    p->epoll_fd = epoll_create1(EPOLL_CLOEXEC);
    if (p->epoll_fd < 0)
        return lm_fail(LM_ERR_IO, "epoll_create1: %s", strerror(errno));
    p->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (p->wake_fd < 0) {
        close(p->epoll_fd);
        return lm_fail(LM_ERR_IO, "eventfd: %s", strerror(errno));
    }
    p->timer_fd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    if (p->timer_fd < 0) {
        close(p->wake_fd);
        close(p->epoll_fd);
        return lm_fail(LM_ERR_IO, "timerfd_create: %s", strerror(errno));
    }
    pthread_mutex_init(&p->lock, NULL);
    pthread_mutex_init(&p->drive_lock, NULL);
    pthread_mutex_init(&p->rerun_lock, NULL);
    p->wake_handler = (lm_io_handler_t){.fd = p->wake_fd, .cb = drain_wake, .arg = p};
    int rc = lm_progress_add(ctx, &p->wake_handler, EPOLLIN);
    if (rc == LM_OK && pthread_create(&p->thread, NULL, progress_main, ctx) != 0)
        rc = lm_fail(LM_ERR_NO_MEMORY, "cannot start the progress thread");
    if (rc != LM_OK) {
        close(p->timer_fd);
        close(p->wake_fd);
        close(p->epoll_fd);
    }
    return rc;
}

void lm_progress_stop(lm_context_t *ctx)
{
    lm_progress_t *p = &ctx->progress;
    pthread_mutex_lock(&p->lock);
    atomic_store(&p->stop, true);
    lease_arm_locked(p, 1); /* already past: a parked thread wakes */
    pthread_mutex_unlock(&p->lock);
    wake(p);
    pthread_join(p->thread, NULL);
    close(p->timer_fd);
    close(p->wake_fd);
    close(p->epoll_fd);
    pthread_mutex_destroy(&p->lock);
    pthread_mutex_destroy(&p->drive_lock);
    pthread_mutex_destroy(&p->rerun_lock);
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
    lm_cq_unpark(ctx, h);
    rerun_unlink(&ctx->progress, h);
    atomic_fetch_add(&ctx->progress.del_epoch, 1);
}

void lm_progress_barrier(lm_context_t *ctx)
{
    /* Any dispatch that could still see a removed handler holds drive_lock;
     * later ones drop their batch because the epoch moved. */
    if (tls_dispatching)
        return;
    pthread_mutex_lock(&ctx->progress.drive_lock);
    pthread_mutex_unlock(&ctx->progress.drive_lock);
}
