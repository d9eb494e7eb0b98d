/*
 * core.h - services the core offers to transports: the region registry,
 * the completion queue, the progress engine, errors.
 */
#ifndef LM_CORE_H
#define LM_CORE_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <time.h>

#include "lamina.h"
#include "../transport.h"

#define LM_MAX_TRANSPORTS 3
#define LM_MAX_MESSAGE (1ull << 32) /* largest single write or read: 4 GiB */

/* ---- errors ---------------------------------------------------------- */
/* Record a message for lm_last_error and return status (for `return lm_fail(...)`). */
int lm_fail(int status, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* ---- regions ---------------------------------------------------------- */
struct lm_mr {
    lm_context_t *ctx;
    uint8_t *addr;
    uint64_t length;
    uint32_t access;
    uint64_t key;
    uint32_t rkey;               /* set by the verbs transport */
    void *tr_priv[LM_MAX_TRANSPORTS]; /* per-transport handle (ibv_mr *) */
    bool alive;                  /* guarded by the registry lock */
    atomic_int refs;             /* registry + queued operations */
    struct lm_mr *hash_next;
    struct lm_shmem *shmem;      /* set when registered over an lm_shmem allocation */
    bool device;                 /* device (GPU) memory: the CPU must never touch it */
    uint32_t reach;              /* LM_TRANSPORT_* that can move its bytes (host memory: every open one) */
};

/* Whether transport (an LM_TRANSPORT_* bit) may move the region's bytes. */
static inline bool lm_mr_reachable(const lm_mr_t *mr, uint32_t transport) { return (mr->reach & transport) != 0; }

/* lm_mr_register, for memory of an lm_shmem allocation (or NULL). */
int lm_mr_register_over(lm_context_t *ctx, void *addr, uint64_t length, uint32_t access, struct lm_shmem *shmem,
                        lm_mr_t **out);

/* ---- shareable memory (shmem.c) --------------------------------------------- */
struct lm_shmem {
    pthread_mutex_t lock;
    int fd;                      /* the sealed memfd behind addr while registered, else -1 */
    uint64_t ino;                /* its inode: a peer checks it is the file it was told of */
    uint8_t *addr;
    uint64_t length;             /* whole pages */
    lm_mr_t *mr;                 /* the live region over it, or NULL (guarded by lock) */
    atomic_bool granted;         /* a peer was given a mapping since registration */
    bool unrevoked;              /* a revocation failed: never registered again */
};
/* Hand an shm peer the region's memory (fd, inode, length); LM_ERR_ACCESS
 * when it is not shmem. Call with the registry read lock held, mr alive. */
int lm_shmem_grant(lm_mr_t *mr, int32_t *fd, uint64_t *ino, uint64_t *length);
/* At deregistration (mr no longer alive): revoke every grant; LM_OK or why not. */
int lm_shmem_release(lm_mr_t *mr);

/* Registry lock: held for reading while a transport moves bytes into or out
 * of a region, so that deregistration (which takes it for writing) returns
 * only once no transport touches the memory. Hold it across nonblocking
 * syscalls only. */
void lm_registry_rdlock(lm_context_t *ctx);
void lm_registry_unlock(lm_context_t *ctx);
/* Look a live region up by key; call with the read lock held. */
lm_mr_t *lm_registry_find(lm_context_t *ctx, uint64_t key);
void lm_mr_ref(lm_mr_t *mr);
void lm_mr_unref(lm_mr_t *mr);
/* Validate [off, off+len) against the region and an access flag; LM_OK or
 * LM_ERR_OUT_OF_BOUNDS / LM_ERR_ACCESS. */
int lm_mr_check(const lm_mr_t *mr, uint64_t off, uint64_t len, uint32_t access);
/* Whether a region whose record is held (lm_mr_ref) is still registered: a
 * deferred write from one deregistered since would read memory that may be
 * gone. Takes the registry read lock. */
bool lm_mr_registered(const lm_mr_t *mr);

/* ---- completion queue ------------------------------------------------- */
/* Receive-side back-pressure (like RDMA's receiver-not-ready): once this many
 * completions wait unpolled, transports stop reading new frames from their
 * peers (lm_cq_park_if_congested) until the application polls the queue below
 * LM_CQ_RESUME_DEPTH. Completions of the application's own operations are
 * still queued past it (they are bounded by what the application posted). */
#define LM_CQ_PAUSE_DEPTH 65536u
#define LM_CQ_RESUME_DEPTH (LM_CQ_PAUSE_DEPTH / 2)

/* Room kept free beyond the reservations, for arrivals (write-imm) that a
 * transport pushes after its last lm_cq_park_if_congested check: the ring
 * grows before it is used, and when it cannot grow the queue counts as
 * congested, so receiving pauses instead of a completion being lost. */
#define LM_CQ_HEADROOM 1024u

/* Reserve the queue place of one operation's completion before it is posted
 * (growing the ring if needed): LM_OK, or LM_ERR_NO_MEMORY and the operation
 * must not be posted. The completion's delivery uses it up (lm_ep_complete);
 * lm_cq_unreserve gives it back when the post failed. */
int lm_cq_reserve(lm_context_t *ctx);
void lm_cq_unreserve(lm_context_t *ctx);
struct lm_io_handler;
/* If the queue is at LM_CQ_PAUSE_DEPTH, park h (true): the progress engine
 * re-runs it with LM_EV_RERUN once the application has polled the queue
 * below LM_CQ_RESUME_DEPTH. Cheap when not congested (one atomic load). */
bool lm_cq_park_if_congested(lm_context_t *ctx, struct lm_io_handler *h);
struct lm_ep;
/* Queue a completion of an endpoint that had no sink when the caller looked
 * (re-checked under the queue lock: lm_ep_push). A posted operation's
 * completion (reserved) takes the place lm_cq_reserve held for it; an arrival
 * uses the headroom. Only if a transport overran the headroom would one be
 * lost, and then loudly: the loss is counted and every later
 * lm_cq_poll/lm_cq_wait fails with LM_ERR_NO_MEMORY once the queue is empty. */
void lm_cq_push_unsunk(struct lm_ep *ep, const lm_completion_t *c, bool reserved);
/* Install ep's sink under the queue lock, and hand it every completion of ep
 * already queued, in order (lm_ep_set_sink); a NULL sink uninstalls. */
void lm_cq_take_endpoint(lm_context_t *ctx, struct lm_ep *ep, void (*sink)(void *, const lm_completion_t *),
                         void *arg);
/* Forget a parked handler (lm_progress_del calls it). */
void lm_cq_unpark(lm_context_t *ctx, struct lm_io_handler *h);

/* ---- progress engine --------------------------------------------------- */
/* Callbacks run on whichever thread dispatches: the progress thread or an
 * application thread waiting in lm_cq_wait; one dispatcher at a time. */
typedef void (*lm_io_cb)(void *arg, uint32_t events);
/* Event bit (never reported by epoll) for a handler called again because it
 * asked for it (lm_progress_rerun) or was unparked (lm_cq_park_if_congested). */
#define LM_EV_RERUN (1u << 27)
typedef struct lm_io_handler {
    int fd;
    lm_io_cb cb;
    void *arg;
    /* Re-run and park lists (progress.c, cq.c); zero-initialised. */
    struct lm_io_handler *rerun_next;
    bool rerun_queued;
    struct lm_io_handler *park_next;
    bool parked;
} lm_io_handler_t;

int lm_progress_add(lm_context_t *ctx, lm_io_handler_t *h, uint32_t events);
int lm_progress_mod(lm_context_t *ctx, lm_io_handler_t *h, uint32_t events);
void lm_progress_del(lm_context_t *ctx, lm_io_handler_t *h);
/* Return once no dispatch can still call a handler removed before the call
 * (so it can be freed). */
void lm_progress_barrier(lm_context_t *ctx);
/* Run one epoll round in the calling thread (waiting up to timeout_ms). */
void lm_progress_drive(lm_context_t *ctx, int timeout_ms);
/* lm_progress_drive, but no sleep in epoll once *ready is set: a sink sets it
 * for this driver, then calls lm_progress_notify. Either the sink's round
 * ended before the check (the flag is seen) or this thread already counted as
 * a driver (the round's end wakes it): no wake-up is missed. */
void lm_progress_drive_until(lm_context_t *ctx, int timeout_ms, const atomic_bool *ready);
/* A waiting thread found completions without driving: it will be back (and
 * drive once the queue is empty), so the progress thread stays parked. Only
 * for waits, never for a bare poll: a thread spinning on lm_cq_poll would
 * otherwise hold the lease without ever making progress. */
void lm_progress_touch(lm_context_t *ctx);
/* An application thread posted an operation. A thread that keeps posting is
 * as good as a driver: at most once per half lease it runs one dispatch round
 * without sleeping (which renews the lease), so a send stream keeps the
 * progress thread parked (no lock contention with it on the endpoint) and
 * still serves its receive side (acknowledgements, reads) meanwhile. */
void lm_progress_posted(lm_context_t *ctx);
/* Lease extensions (timerfd_settime calls by drivers) and progress-thread
 * resumptions so far: how often the hand-off cost was paid (tests, benches). */
void lm_progress_stats(lm_context_t *ctx, uint64_t *lease_extensions, uint64_t *thread_resumes);
/* A sink changed state some waiting thread looks at (a channel arrival or
 * credit): wake waiters, including other drivers, when the round ends. */
void lm_progress_notify(lm_context_t *ctx);
/* Wake drivers blocked in epoll_wait (no-op inside dispatch). */
void lm_progress_kick(lm_context_t *ctx);
/* Call h again with LM_EV_RERUN before any dispatcher sleeps, whatever its
 * fd's readiness: for a handler that stopped with work left (a receive budget
 * spent with frames already buffered) or that resumes after a pause. Any
 * thread; a queued handler is queued once. lm_progress_del drops it. */
void lm_progress_rerun(lm_context_t *ctx, lm_io_handler_t *h);
uint64_t lm_now_ns(void);
/* An lm_now_ns time (CLOCK_MONOTONIC) as a timespec, for absolute deadlines. */
static inline struct timespec lm_timespec_of_ns(uint64_t ns)
{
    return (struct timespec){.tv_sec = (time_t)(ns / 1000000000ull), .tv_nsec = (long)(ns % 1000000000ull)};
}
/* A condition variable whose timed waits take lm_now_ns deadlines (lm_timespec_of_ns): a wall-clock
 * jump does not stretch them. */
void lm_cond_init_monotonic(pthread_cond_t *cond);

/* One-shot timers: armed from dispatch (callbacks) only; disarmed from any
 * thread (lazily unlinked); cancelled (unlinked now) before freeing. */
typedef struct lm_timer {
    uint64_t deadline_ns;
    void (*cb)(void *arg);
    void *arg;
    atomic_bool armed;
    bool linked;
    struct lm_timer *next;
} lm_timer_t;
void lm_timer_arm(lm_context_t *ctx, lm_timer_t *t, uint64_t delay_ns);
void lm_timer_disarm(lm_timer_t *t);
void lm_timer_cancel(lm_context_t *ctx, lm_timer_t *t);

/* ---- endpoints ---------------------------------------------------------- */
typedef void (*lm_sink_fn)(void *arg, const lm_completion_t *c);
struct lm_ep {
    lm_context_t *ctx;
    const lm_transport_ops_t *ops;
    void *iface;
    uint64_t id;
    atomic_int error;        /* 0 or the LM_ERR_* that failed the endpoint */
    atomic_ullong outstanding;
    struct lm_ep *ctx_next;  /* context's list, guarded by ctx->ep_lock */
    /* When set, the endpoint's completions go here instead of the context's
     * completion queue (a channel owns them). Called from dispatch or from the
     * posting thread, with transport locks held: it must not call back into
     * the endpoint. */
    _Atomic(lm_sink_fn) sink;
    void *sink_arg;          /* written before sink (release), read after it */
    atomic_ullong mapped_writes; /* writes sent through the peer's mapping (shm) */
};

/* Push a completion for an initiator operation and drop it from outstanding. */
void lm_ep_complete(lm_ep_t *ep, uint32_t opcode, uint64_t wr_id, int status, uint64_t bytes);
/* Deliver one completion of ep: to its sink, else to the context's queue. */
void lm_ep_push(lm_ep_t *ep, const lm_completion_t *c);
/* The same, into a place lm_cq_reserve held for it. */
void lm_ep_push_reserved(lm_ep_t *ep, const lm_completion_t *c);
/* Route ep's completions to sink from now on; those of ep already queued in
 * the context's completion queue are taken out and passed to it first (under
 * the queue lock, so none is lost or reordered). NULL routes them back. */
void lm_ep_set_sink(lm_ep_t *ep, lm_sink_fn sink, void *arg);

/* ---- context ---------------------------------------------------------- */
typedef struct lm_cq {
    pthread_mutex_t lock;
    lm_completion_t *ring;
    size_t capacity, head, count;
    atomic_bool congested;  /* count >= LM_CQ_PAUSE_DEPTH, or starved (read without the lock) */
    bool starved;           /* the ring could not grow to keep LM_CQ_HEADROOM free */
    atomic_size_t reserved; /* places held for posted operations' completions */
    size_t max_capacity;    /* growth limit (SIZE_MAX; tests lower it to act out of memory) */
    lm_io_handler_t *parked; /* handlers waiting for the queue to drain */
    uint64_t lost;          /* completions dropped: a transport overran the headroom (sticky error) */
    int event_fd;          /* readable while count > 0, once fd_wanted */
    atomic_bool fd_wanted; /* set by lm_context_fd: saves two syscalls per batch otherwise */
} lm_cq_t;

typedef struct lm_progress {
    int epoll_fd;
    int wake_fd;
    pthread_t thread;
    atomic_bool stop;
    pthread_mutex_t lock;       /* guards drivers, thread_in_epoll, the lease */
    int drivers;                /* application threads inside lm_progress_drive */
    bool thread_in_epoll;
    /* The drivers' lease (progress.c): the progress thread stays parked until
     * lease_until_ns while no driver is inside; timer_fd fires then. */
    int timer_fd;
    uint64_t lease_until_ns;
    uint64_t lease_extensions; /* timerfd_settime calls made by drivers (stats) */
    uint64_t thread_resumes;   /* times the thread left its park (stats) */
    pthread_mutex_t drive_lock; /* held while dispatching */
    atomic_ullong del_epoch;
    lm_timer_t *timers;         /* guarded by drive_lock */
    pthread_mutex_t rerun_lock; /* guards the re-run list */
    lm_io_handler_t *rerun_head, *rerun_tail;
    atomic_bool rerun_pending;  /* the list is non-empty: do not sleep */
    uint64_t driver_epoll_ns;   /* a driver last looked at epoll (drive_lock) */
    uint32_t mode;              /* LM_PROGRESS_* (set before the thread starts) */
    atomic_bool notified;       /* a sink changed a waiter's state in this round */
    atomic_int sleepers;        /* threads inside a sleeping epoll wait (transports that wake only
                                 * sleepers keep their wake-ups armed while there are any) */
    lm_io_handler_t wake_handler;
} lm_progress_t;

struct lm_context {
    lm_cq_t cq;
    lm_progress_t progress;
    pthread_rwlock_t registry_lock;
    lm_mr_t **buckets;
    size_t nbuckets;
    size_t nregions;
    pthread_mutex_t ep_lock;
    lm_ep_t *eps;
    uint32_t keepalive_ms;
    const lm_transport_ops_t *transports[LM_MAX_TRANSPORTS];
    void *ifaces[LM_MAX_TRANSPORTS];
    char transport_why[LM_MAX_TRANSPORTS][256];
};

int lm_cq_init(lm_cq_t *cq);
void lm_cq_fini(lm_cq_t *cq);
int lm_progress_start(lm_context_t *ctx, uint32_t mode);
void lm_progress_stop(lm_context_t *ctx);
int lm_registry_init(lm_context_t *ctx);
void lm_registry_fini(lm_context_t *ctx);

#endif /* LM_CORE_H */
