/* staged.c - the data plane of staged links (lamina.h "staged links";
 * protocol in docs/gpu.md, "Staging").
 *
 * Locks: s->lock guards the link's state; s->inbox_lock only the completions
 * the sink hands over. The sink runs on whichever thread dispatches the
 * endpoint (with transport locks held), so it only queues and wakes: the
 * link's thread takes the completions and acts on them under s->lock, never
 * inside the transport. Copy-engine calls are made under s->lock: a host
 * function the engine runs at once (the host stand-in without a stream) may
 * post, and a post's synchronous completion only takes s->inbox_lock. */
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../core/core.h"

#define KIND_DATA 1u
#define KIND_CREDIT 2u
#define IMM_LAST (1u << 29)
#define IMM_LEN_MASK ((1u << 29) - 1)
#define MAX_CHUNK (1u << 28)
#define MAX_SLOTS 4096u
#define CU_NOT_READY 600
#define CU_EVENT_DISABLE_TIMING 2u
/* wr_id tags: a data write names its transmit slot, a credit its sequence. */
#define WR_DATA (1ull << 62)
#define WR_CREDIT (1ull << 61)
#define WR_VALUE_MASK ((1ull << 48) - 1)
#define CHECK_NS 50000000ull  /* how often the thread looks for failures that send no completion */
#define DRIVE_MS 50
#define TEXT_LEN 200

struct lm_transfer {
    atomic_int refs;           /* the caller's, and the link's until done */
    lm_staged_t *link;         /* held (link_ref) until the transfer is freed */
    bool send;
    bool done;                 /* under link->lock */
    int status;
    uint64_t moved;
    char message[TEXT_LEN];
    /* the job */
    uint64_t address, nbytes;  /* nbytes: a send's length, a receive's capacity */
    uint64_t received;
    uint32_t chunks, next_chunk, acked;
    void *event;               /* the stream order to wait for before the first copy; NULL once queued */
    bool gated;
    uint32_t gate_value;
    uint64_t credit_wr;        /* a receive: its last credit, whose POSTED notice says it is in place */
    struct lm_transfer *next;  /* in the send queue, the receive queue or the landing queue */
};

typedef struct {
    uint32_t slot, length;
    bool last;
} arrival_t;

typedef struct {
    lm_transfer_t *head, *tail;
} queue_t;

struct lm_staged {
    atomic_int refs; /* the owner's, the thread's and one per live transfer */
    lm_context_t *ctx;
    lm_ep_t *ep;
    lm_poster_t *poster;
    lm_copy_fns_t fns;
    lm_staged_params_t p;
    uint8_t *tx_base, *rx_base;
    uint32_t send_chunk; /* min(ours, the peer's) */

    pthread_mutex_t lock;
    pthread_cond_t cond; /* a transfer finished */
    int error;
    char text[TEXT_LEN];
    bool shut; /* lm_staged_shutdown ran: the thread stopped, the sink is off */
    /* sending */
    uint32_t *tx_free;
    uint32_t tx_free_count;
    lm_transfer_t **slot_job; /* per transmit slot: the send whose chunk is in it */
    uint32_t credits, peer_next;
    queue_t sends;
    uint64_t sending; /* sends not done */
    /* receiving */
    arrival_t *arrivals; /* ring of our slots' arrivals, not yet copied out */
    uint32_t arr_head, arr_count, rx_next;
    queue_t recvs;    /* waiting for chunks */
    queue_t landing;  /* all chunks queued to the device: waiting for the last credit's POSTED notice */
    uint64_t credit_seq;
    bool gate_used;
    uint32_t gate_last;
    /* pooled events */
    void **events;
    uint32_t nevents, events_cap;
    lm_staged_stats_t stats;

    pthread_mutex_t inbox_lock;
    lm_completion_t *inbox;
    uint32_t inbox_len, inbox_cap;
    bool inbox_lost; /* the sink had no memory for one */

    atomic_bool ready; /* the inbox has work: the thread does not sleep (lm_progress_drive_until) */
    atomic_bool stop;
    pthread_t thread;
    bool stopped; /* the thread was joined and the sink is off (under lock; cond says when) */
};

static void link_ref(lm_staged_t *s)
{
    atomic_fetch_add(&s->refs, 1);
}

static void link_unref(lm_staged_t *s)
{
    if (atomic_fetch_sub(&s->refs, 1) != 1)
        return;
    lm_poster_destroy(s->poster);
    free(s->tx_free);
    free(s->slot_job);
    free(s->arrivals);
    free(s->events);
    free(s->inbox);
    pthread_cond_destroy(&s->cond);
    pthread_mutex_destroy(&s->lock);
    pthread_mutex_destroy(&s->inbox_lock);
    free(s);
}

static void transfer_unref(lm_transfer_t *t)
{
    if (atomic_fetch_sub(&t->refs, 1) != 1)
        return;
    lm_staged_t *s = t->link;
    free(t);
    link_unref(s);
}

/* ---- events (s->lock held) ---------------------------------------------------------- */

static void event_put_locked(lm_staged_t *s, void *ev)
{
    if (!ev)
        return;
    if (s->nevents == s->events_cap) {
        uint32_t cap = s->events_cap ? 2 * s->events_cap : 8;
        void **grown = realloc(s->events, cap * sizeof(*grown));
        if (!grown) { /* leaked rather than destroyed off the engine's context */
            return;
        }
        s->events = grown;
        s->events_cap = cap;
    }
    s->events[s->nevents++] = ev;
}

/* ---- finishing and failing (s->lock held) ------------------------------------------- */

static void finish_locked(lm_staged_t *s, lm_transfer_t *t, int status, const char *text)
{
    if (t->done)
        return;
    t->done = true;
    t->status = status;
    if (status != LM_OK) {
        if (text != t->message) /* (a receive's own error is in place already) */
            snprintf(t->message, sizeof(t->message), "%s", text ? text : lm_status_str(status));
    } else if (t->send) {
        t->moved = t->nbytes;
        s->stats.sent++;
    } else {
        t->moved = t->received;
        s->stats.received++;
    }
    if (t->send)
        s->sending--;
    event_put_locked(s, t->event);
    t->event = NULL;
    pthread_cond_broadcast(&s->cond);
    transfer_unref(t); /* the link's reference (the caller still holds its own) */
}

static void fail_queue_locked(lm_staged_t *s, queue_t *q)
{
    lm_transfer_t *t = q->head;
    q->head = q->tail = NULL;
    while (t) {
        lm_transfer_t *next = t->next;
        finish_locked(s, t, s->error, s->text);
        t = next;
    }
}

/* No stream waits forever on a receive that will not come: the gate goes to
 * the last value asked for, from the host at once and again behind what the
 * copy stream still holds (so no older value lands last). */
static void open_gate_locked(lm_staged_t *s)
{
    if (!s->gate_used || !s->p.gate_host)
        return;
    atomic_store_explicit((_Atomic uint32_t *)s->p.gate_host, s->gate_last, memory_order_release);
    (void)s->fns.stream_write_value32(s->fns.h2d, s->p.gate_device, s->gate_last, 0);
}

static void fail_locked(lm_staged_t *s, int status, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void fail_locked(lm_staged_t *s, int status, const char *fmt, ...)
{
    if (s->error)
        return;
    s->error = status;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(s->text, sizeof(s->text), fmt, ap);
    va_end(ap);
    lm_poster_close(s->poster); /* nothing more goes out, also what is queued behind copies */
    fail_queue_locked(s, &s->sends);
    for (uint32_t slot = 0; slot < s->p.slots; slot++) { /* sends whose chunks are on their way */
        lm_transfer_t *t = s->slot_job[slot];
        s->slot_job[slot] = NULL;
        if (t) {
            finish_locked(s, t, s->error, s->text);
            transfer_unref(t); /* the slot's reference */
        }
    }
    fail_queue_locked(s, &s->recvs);
    fail_queue_locked(s, &s->landing);
    s->arr_count = 0;
    open_gate_locked(s);
    pthread_cond_broadcast(&s->cond);
}

static void queue_push(queue_t *q, lm_transfer_t *t)
{
    t->next = NULL;
    if (q->tail)
        q->tail->next = t;
    else
        q->head = t;
    q->tail = t;
}

static lm_transfer_t *queue_pop(queue_t *q)
{
    lm_transfer_t *t = q->head;
    if (t) {
        q->head = t->next;
        if (!q->head)
            q->tail = NULL;
        t->next = NULL;
    }
    return t;
}

/* ---- sending (s->lock held) ----------------------------------------------------------- */

static uint32_t data_imm(uint32_t length, bool last)
{
    return (KIND_DATA << 30) | (last ? IMM_LAST : 0) | length;
}

/* Queue ev's wait on stream, then hand ev back to the pool (a wait takes the
 * event's state at the call, so it may be recorded again at once). */
static int wait_event_locked(lm_staged_t *s, void *stream, lm_transfer_t *t)
{
    if (!t->event)
        return 0;
    int rc = s->fns.stream_wait_event ? s->fns.stream_wait_event(stream, t->event, 0) : 0;
    event_put_locked(s, t->event);
    t->event = NULL;
    return rc;
}

/* Queue op's post behind the work on stream; a refused launch never runs op: freed here. */
static int launch_post(lm_staged_t *s, void *stream, lm_poster_op_t *op)
{
    int cu = s->fns.launch_host_func(stream, lm_poster_run, op);
    if (cu != 0)
        lm_poster_cancel(op);
    return cu;
}

static void pump_send_locked(lm_staged_t *s)
{
    while (!s->error && s->sends.head && s->tx_free_count && s->credits > 0) {
        lm_transfer_t *t = s->sends.head;
        uint64_t offset = (uint64_t)t->next_chunk * s->send_chunk;
        uint32_t n = (uint32_t)(t->nbytes - offset < s->send_chunk ? t->nbytes - offset : s->send_chunk);
        bool last = t->next_chunk + 1 == t->chunks;
        uint32_t slot = s->tx_free[--s->tx_free_count];
        uint32_t rslot = s->peer_next;
        lm_poster_op_t *op;
        int rc = lm_poster_write_prepare(s->poster, s->p.tx, (uint64_t)slot * s->p.chunk_bytes, n, &s->p.peer_rx,
                                         (uint64_t)rslot * s->p.peer_chunk_bytes, data_imm(n, last), LM_WRITE_IMM,
                                         WR_DATA | slot, &op);
        if (rc != LM_OK) {
            s->tx_free_count++;
            fail_locked(s, rc, "staged link: a chunk's write could not be prepared: %s", lm_last_error());
            return;
        }
        int cu = wait_event_locked(s, s->fns.d2h, t);
        if (cu == 0 && n)
            cu = s->fns.memcpy_dtoh(s->tx_base + (uint64_t)slot * s->p.chunk_bytes, t->address + offset, n,
                                    s->fns.d2h);
        if (cu == 0)
            cu = launch_post(s, s->fns.d2h, op);
        else
            lm_poster_cancel(op);
        if (cu != 0) {
            s->tx_free_count++;
            fail_locked(s, LM_ERR_IO, "staged link: the copy engine refused a chunk's copy out of the device "
                        "(CUDA error %d)", cu);
            return;
        }
        s->credits--;
        s->peer_next = (rslot + 1) % s->p.peer_slots;
        atomic_fetch_add(&t->refs, 1); /* the slot's: a send spans slots, each lets go on its own */
        s->slot_job[slot] = t;
        s->stats.chunks_sent++;
        if (++t->next_chunk == t->chunks)
            queue_pop(&s->sends); /* its chunks are all on their way: slot_job holds it */
    }
}

static void on_write_done_locked(lm_staged_t *s, const lm_completion_t *c)
{
    if (c->status != LM_OK) {
        fail_locked(s, c->status, "staged link: a write failed: %s", lm_status_str(c->status));
        return;
    }
    if (!(c->wr_id & WR_DATA))
        return; /* a credit we sent */
    uint64_t slot = c->wr_id & WR_VALUE_MASK;
    lm_transfer_t *t = slot < s->p.slots ? s->slot_job[slot] : NULL;
    if (!t) {
        fail_locked(s, LM_ERR_PROTOCOL, "staged link: a write completion for transmit slot %llu, which holds nothing",
                    (unsigned long long)slot);
        return;
    }
    s->slot_job[slot] = NULL;
    s->tx_free[s->tx_free_count++] = (uint32_t)slot;
    if (++t->acked == t->chunks)
        finish_locked(s, t, LM_OK, NULL);
    transfer_unref(t); /* the slot's reference */
    pump_send_locked(s);
}

/* ---- receiving (s->lock held) ----------------------------------------------------------- */

static void pump_recv_locked(lm_staged_t *s)
{
    while (!s->error && s->arr_count && s->recvs.head) {
        lm_transfer_t *t = s->recvs.head;
        arrival_t a = s->arrivals[s->arr_head];
        if (!t->status && t->received + a.length > t->nbytes) { /* kept until done: the link goes on */
            t->status = LM_ERR_INVALID;
            snprintf(t->message, sizeof(t->message), "message larger than the %llu-byte receive buffer (at least "
                     "%llu bytes)", (unsigned long long)t->nbytes, (unsigned long long)(t->received + a.length));
        }
        /* The slot's credit, posted behind its copy (in slot order; a dropped chunk's too). The post of a
         * message's last credit says its copies are done (LM_OP_POSTED, back on this thread). */
        uint64_t wr = WR_CREDIT | (++s->credit_seq & WR_VALUE_MASK);
        lm_poster_op_t *credit;
        int rc = lm_poster_write_prepare(s->poster, s->p.tx, (uint64_t)s->p.slots * s->p.chunk_bytes, 4,
                                         &s->p.peer_rx, (uint64_t)s->p.peer_slots * s->p.peer_chunk_bytes,
                                         (KIND_CREDIT << 30) | 1u, LM_WRITE_IMM | (a.last ? LM_POSTER_NOTIFY : 0), wr,
                                         &credit);
        if (rc != LM_OK) {
            fail_locked(s, rc, "staged link: a credit could not be prepared: %s", lm_last_error());
            return;
        }
        int cu = 0;
        if (!t->status) {
            cu = wait_event_locked(s, s->fns.h2d, t);
            if (cu == 0 && a.length)
                cu = s->fns.memcpy_htod(t->address + t->received, s->rx_base + (uint64_t)a.slot * s->p.chunk_bytes,
                                        a.length, s->fns.h2d);
            t->received += a.length;
        }
        if (cu == 0 && a.last && t->gated && s->fns.stream_write_value32) /* releases the user's stream first */
            cu = s->fns.stream_write_value32(s->fns.h2d, s->p.gate_device, t->gate_value, 0);
        if (cu == 0)
            cu = launch_post(s, s->fns.h2d, credit);
        else
            lm_poster_cancel(credit);
        if (cu != 0) {
            fail_locked(s, LM_ERR_IO, "staged link: the copy engine refused a chunk's copy into the device (CUDA "
                        "error %d)", cu);
            return;
        }
        s->arr_head = (s->arr_head + 1) % s->p.slots;
        s->arr_count--;
        s->stats.credits_sent++;
        if (a.last) {
            queue_pop(&s->recvs);
            event_put_locked(s, t->event); /* (a failed receive never queued its wait) */
            t->event = NULL;
            t->credit_wr = wr;
            queue_push(&s->landing, t);
        }
    }
}

static void on_imm_locked(lm_staged_t *s, uint32_t imm)
{
    uint32_t kind = imm >> 30, value = imm & IMM_LEN_MASK;
    if (kind == KIND_DATA) {
        if (value > s->p.chunk_bytes) {
            fail_locked(s, LM_ERR_PROTOCOL, "staged link: peer sent a %u-byte chunk into %u-byte slots", value,
                        s->p.chunk_bytes);
            return;
        }
        if (s->arr_count == s->p.slots) {
            fail_locked(s, LM_ERR_PROTOCOL, "staged link: peer sent a chunk with no credit for it");
            return;
        }
        s->arrivals[(s->arr_head + s->arr_count) % s->p.slots] = (arrival_t){s->rx_next, value, (imm & IMM_LAST) != 0};
        s->arr_count++;
        s->rx_next = (s->rx_next + 1) % s->p.slots;
        s->stats.chunks_received++;
        pump_recv_locked(s);
    } else if (kind == KIND_CREDIT) {
        if (value == 0 || (uint64_t)s->credits + value > s->p.peer_slots) {
            fail_locked(s, LM_ERR_PROTOCOL, "staged link: peer returned %u credits, %u more than its slots or none",
                        value, value ? s->credits + value - s->p.peer_slots : 0);
            return;
        }
        s->credits += value;
        pump_send_locked(s);
    } else {
        fail_locked(s, LM_ERR_PROTOCOL, "staged link: unknown immediate 0x%08x", imm);
    }
}

static void on_completion_locked(lm_staged_t *s, const lm_completion_t *c)
{
    switch (c->opcode) {
    case LM_OP_WRITE:
        on_write_done_locked(s, c);
        break;
    case LM_OP_POSTED: /* a post behind a copy: the last credit of a message, or a failure */
        if (c->status != LM_OK) {
            fail_locked(s, c->status, "staged link: a write queued behind a copy could not be posted: %s",
                        lm_status_str(c->status));
        } else if (s->landing.head && s->landing.head->credit_wr == c->wr_id) {
            lm_transfer_t *t = queue_pop(&s->landing); /* its copies are done: the message is in place */
            finish_locked(s, t, t->status, t->status ? t->message : NULL);
        } else {
            fail_locked(s, LM_ERR_PROTOCOL, "staged link: a notice for a credit no receive waits on");
        }
        break;
    case LM_OP_RECV_IMM:
        if (c->status != LM_OK)
            fail_locked(s, c->status, "staged link: a peer's write failed: %s", lm_status_str(c->status));
        else if (c->flags & LM_CF_IMM)
            on_imm_locked(s, c->imm);
        else
            fail_locked(s, LM_ERR_PROTOCOL, "staged link: a peer's write without an immediate");
        break;
    default:
        fail_locked(s, c->status ? c->status : LM_ERR_PROTOCOL, "staged link: unexpected completion (opcode %u, "
                    "status %s)", c->opcode, lm_status_str(c->status));
        break;
    }
}

/* ---- the sink and the link's thread --------------------------------------------------- */

static void sink(void *arg, const lm_completion_t *c)
{
    lm_staged_t *s = arg;
    pthread_mutex_lock(&s->inbox_lock);
    if (s->inbox_len == s->inbox_cap) {
        uint32_t cap = s->inbox_cap ? 2 * s->inbox_cap : 64;
        lm_completion_t *grown = realloc(s->inbox, cap * sizeof(*grown));
        if (grown) {
            s->inbox = grown;
            s->inbox_cap = cap;
        }
    }
    if (s->inbox_len < s->inbox_cap)
        s->inbox[s->inbox_len++] = *c;
    else
        s->inbox_lost = true;
    atomic_store(&s->ready, true);
    pthread_mutex_unlock(&s->inbox_lock);
    lm_progress_notify(s->ctx); /* the link's thread may sleep in epoll while another dispatched this */
}

/* Failures that send no completion: a failed copy stream never runs the
 * posts queued behind it, a post that had no room for its notice, a lost peer. */
static void check_locked(lm_staged_t *s)
{
    if (s->error)
        return;
    bool copying = s->landing.head || s->recvs.head || s->sending;
    if (copying && s->fns.stream_query) {
        void *streams[2] = {s->fns.d2h, s->fns.h2d};
        for (int i = 0; i < 2; i++) {
            int cu = s->fns.stream_query(streams[i]);
            if (cu != 0 && cu != CU_NOT_READY) {
                fail_locked(s, LM_ERR_IO, "staged link: its %s copy stream failed (CUDA error %d)",
                            i ? "host-to-device" : "device-to-host", cu);
                return;
            }
        }
    }
    int posted = lm_poster_error(s->poster);
    if (posted) {
        fail_locked(s, posted, "staged link: a write queued behind a copy could not be posted: %s",
                    lm_status_str(posted));
        return;
    }
    int lost = lm_ep_error(s->ep);
    if (lost)
        fail_locked(s, lost, "staged link: its endpoint failed: %s", lm_status_str(lost));
}

static void *link_thread(void *arg)
{
    lm_staged_t *s = arg;
    if (s->fns.ctx_set_current && s->fns.context) {
        int cu = s->fns.ctx_set_current(s->fns.context);
        if (cu != 0) {
            pthread_mutex_lock(&s->lock);
            fail_locked(s, LM_ERR_IO, "staged link: its thread could not make the device's context current "
                        "(CUDA error %d)", cu);
            pthread_mutex_unlock(&s->lock);
        }
    }
    lm_completion_t *batch = NULL;
    uint32_t batch_cap = 0;
    uint64_t next_check = lm_now_ns() + CHECK_NS;
    while (!atomic_load(&s->stop)) {
        pthread_mutex_lock(&s->inbox_lock);
        lm_completion_t *taken = s->inbox;
        uint32_t n = s->inbox_len, cap = s->inbox_cap;
        bool lost = s->inbox_lost;
        s->inbox = batch; /* swap buffers: the sink goes on filling the other */
        s->inbox_cap = batch_cap;
        s->inbox_len = 0;
        s->inbox_lost = false;
        atomic_store(&s->ready, false);
        pthread_mutex_unlock(&s->inbox_lock);
        batch = taken;
        batch_cap = cap;
        if (n || lost) {
            pthread_mutex_lock(&s->lock);
            for (uint32_t i = 0; i < n; i++)
                on_completion_locked(s, &batch[i]);
            if (lost)
                fail_locked(s, LM_ERR_NO_MEMORY, "staged link: no memory to keep a completion");
            pthread_mutex_unlock(&s->lock);
        } else {
            lm_progress_drive_until(s->ctx, DRIVE_MS, &s->ready); /* dispatches: the sink usually runs here */
        }
        uint64_t now = lm_now_ns();
        if (now >= next_check) {
            next_check = now + CHECK_NS;
            pthread_mutex_lock(&s->lock);
            check_locked(s);
            pthread_mutex_unlock(&s->lock);
        }
    }
    free(batch);
    link_unref(s);
    return NULL;
}

/* ---- the API ------------------------------------------------------------------------------ */

static int check_params(const lm_copy_fns_t *fns, const lm_staged_params_t *p)
{
    if (!fns->memcpy_dtoh || !fns->memcpy_htod || !fns->launch_host_func)
        return lm_fail(LM_ERR_INVALID, "lm_staged_create: the copy engine lacks a copy or host-function entry");
    if (!p->tx || !p->rx || p->tx->device || p->rx->device)
        return lm_fail(LM_ERR_INVALID, "lm_staged_create: the slots must be two registered host regions");
    if (p->slots < 1 || p->slots > MAX_SLOTS || p->peer_slots < 1 || p->peer_slots > MAX_SLOTS)
        return lm_fail(LM_ERR_INVALID, "lm_staged_create: slots must be in [1, %u]", MAX_SLOTS);
    if (p->chunk_bytes < 64 || p->chunk_bytes > MAX_CHUNK || p->chunk_bytes % 64 || p->peer_chunk_bytes < 64 ||
        p->peer_chunk_bytes > MAX_CHUNK)
        return lm_fail(LM_ERR_INVALID, "lm_staged_create: chunks must be multiples of 64 in [64, %u] bytes",
                       MAX_CHUNK);
    uint64_t side = (uint64_t)p->slots * p->chunk_bytes + LM_STAGED_SCRATCH;
    if (p->tx->length < side || p->rx->length < side)
        return lm_fail(LM_ERR_INVALID, "lm_staged_create: the slot regions hold fewer than %llu bytes",
                       (unsigned long long)side);
    if (p->peer_rx.length < (uint64_t)p->peer_slots * p->peer_chunk_bytes + LM_STAGED_SCRATCH)
        return lm_fail(LM_ERR_INVALID, "lm_staged_create: the peer's receive region is smaller than its slots");
    if (fns->event_record && (!fns->event_create || !fns->event_destroy || !fns->stream_wait_event))
        return lm_fail(LM_ERR_INVALID, "lm_staged_create: events need their create, destroy and wait entries too");
    if (p->gate_device && !fns->stream_write_value32)
        return lm_fail(LM_ERR_INVALID, "lm_staged_create: a gate needs the engine's stream_write_value32");
    if ((p->gate_device != 0) != (p->gate_host != NULL))
        return lm_fail(LM_ERR_INVALID, "lm_staged_create: a gate needs both its device and its host address");
    return LM_OK;
}

int lm_staged_create(lm_ep_t *ep, const lm_copy_fns_t *fns, const lm_staged_params_t *params, lm_staged_t **out)
{
    if (!ep || !fns || !params || !out)
        return lm_fail(LM_ERR_INVALID, "lm_staged_create: NULL argument");
    int rc = check_params(fns, params);
    if (rc != LM_OK)
        return rc;
    lm_staged_t *s = calloc(1, sizeof(*s));
    if (!s)
        return lm_fail(LM_ERR_NO_MEMORY, "no memory for a staged link");
    atomic_init(&s->refs, 1); /* the owner's; the thread's comes with it */
    atomic_init(&s->stop, false);
    atomic_init(&s->ready, false);
    pthread_mutex_init(&s->lock, NULL);
    pthread_mutex_init(&s->inbox_lock, NULL);
    lm_cond_init_monotonic(&s->cond);
    s->tx_free = calloc(params->slots, sizeof(*s->tx_free));
    s->slot_job = calloc(params->slots, sizeof(*s->slot_job));
    s->arrivals = calloc(params->slots, sizeof(*s->arrivals));
    rc = s->tx_free && s->slot_job && s->arrivals ? lm_poster_create(ep, &s->poster)
                                                  : lm_fail(LM_ERR_NO_MEMORY, "no memory for a staged link's slots");
    if (rc != LM_OK) {
        link_unref(s); /* (frees what was allocated) */
        return rc;
    }
    s->ctx = ep->ctx;
    s->ep = ep;
    s->fns = *fns;
    s->p = *params;
    s->tx_base = params->tx->addr;
    s->rx_base = params->rx->addr;
    s->send_chunk = params->chunk_bytes < params->peer_chunk_bytes ? params->chunk_bytes : params->peer_chunk_bytes;
    s->credits = params->peer_slots;
    for (uint32_t i = 0; i < params->slots; i++)
        s->tx_free[i] = params->slots - 1 - i; /* popped from the end: slot 0 first */
    s->tx_free_count = params->slots;
    lm_ep_set_sink(ep, sink, s);
    link_ref(s); /* the thread's */
    if (pthread_create(&s->thread, NULL, link_thread, s) != 0) {
        lm_ep_set_sink(ep, NULL, NULL);
        lm_progress_barrier(s->ctx);
        atomic_store(&s->refs, 1);
        link_unref(s);
        return lm_fail(LM_ERR_NO_MEMORY, "could not start a staged link's thread");
    }
    pthread_setname_np(s->thread, "lamina-staged");
    *out = s;
    return LM_OK;
}

/* A transfer with the caller's and the link's references, its event recorded on stream. */
static int new_transfer(lm_staged_t *s, bool send, uint64_t address, uint64_t nbytes, void *stream, int ordered,
                        lm_transfer_t **out)
{
    lm_transfer_t *t = calloc(1, sizeof(*t));
    if (!t)
        return lm_fail(LM_ERR_NO_MEMORY, "no memory for a staged transfer");
    atomic_init(&t->refs, 2);
    t->link = s;
    t->send = send;
    t->address = address;
    t->nbytes = nbytes;
    if (ordered && s->fns.event_record) {
        void *ev = NULL;
        if (s->nevents)
            ev = s->events[--s->nevents];
        int cu = 0;
        if (!ev) {
            cu = s->fns.event_create(&ev, CU_EVENT_DISABLE_TIMING);
            s->stats.events_created += cu == 0;
        }
        if (cu == 0)
            cu = s->fns.event_record(ev, stream);
        if (cu != 0) {
            event_put_locked(s, ev);
            free(t);
            return lm_fail(LM_ERR_IO, "staged link: could not record the stream's order (CUDA error %d)", cu);
        }
        t->event = ev;
    }
    link_ref(s);
    *out = t;
    return LM_OK;
}

static int usable_locked(lm_staged_t *s, const char *call)
{
    if (s->error)
        return lm_fail(s->error, "%s: %s", call, s->text);
    return LM_OK;
}

int lm_staged_send(lm_staged_t *s, uint64_t src, uint64_t nbytes, void *stream, int ordered, lm_transfer_t **out)
{
    if (!s || !out)
        return lm_fail(LM_ERR_INVALID, "lm_staged_send: NULL argument");
    if (nbytes > (uint64_t)UINT32_MAX * s->send_chunk)
        return lm_fail(LM_ERR_INVALID, "lm_staged_send: a %llu-byte message is too large",
                       (unsigned long long)nbytes);
    pthread_mutex_lock(&s->lock);
    int rc = usable_locked(s, "staged link send");
    lm_transfer_t *t = NULL;
    if (rc == LM_OK)
        rc = new_transfer(s, true, src, nbytes, stream, ordered, &t);
    if (rc == LM_OK) {
        t->chunks = nbytes ? (uint32_t)((nbytes + s->send_chunk - 1) / s->send_chunk) : 1; /* empty: one empty chunk */
        s->sending++;
        queue_push(&s->sends, t);
        pump_send_locked(s);
        *out = t;
    }
    pthread_mutex_unlock(&s->lock);
    return rc;
}

int lm_staged_recv(lm_staged_t *s, uint64_t dst, uint64_t capacity, void *stream, int ordered, int gated,
                   uint32_t gate_value, lm_transfer_t **out)
{
    if (!s || !out)
        return lm_fail(LM_ERR_INVALID, "lm_staged_recv: NULL argument");
    if (gated && !s->p.gate_host)
        return lm_fail(LM_ERR_INVALID, "lm_staged_recv: the link has no gate");
    pthread_mutex_lock(&s->lock);
    if (gated) { /* the caller queued the stream's wait: from now on a failure must open it */
        s->gate_used = true;
        s->gate_last = gate_value;
    }
    int rc = usable_locked(s, "staged link receive");
    lm_transfer_t *t = NULL;
    if (rc == LM_OK) {
        rc = new_transfer(s, false, dst, capacity, stream, ordered, &t);
        if (rc != LM_OK) /* a receive missing from the order would shift every later message: fail */
            fail_locked(s, rc, "staged link: a receive could not be queued: %s", lm_last_error());
    } else if (gated) {
        open_gate_locked(s); /* failed before: this receive's wait is let go too */
    }
    if (rc == LM_OK) {
        t->gated = gated != 0;
        t->gate_value = gate_value;
        queue_push(&s->recvs, t);
        pump_recv_locked(s);
        *out = t;
    }
    pthread_mutex_unlock(&s->lock);
    return rc;
}

int lm_transfer_wait(lm_transfer_t *t, int timeout_ms, uint64_t *moved)
{
    if (!t)
        return lm_fail(LM_ERR_INVALID, "lm_transfer_wait: NULL argument");
    lm_staged_t *s = t->link;
    uint64_t wait_ns = timeout_ms > 0 ? (uint64_t)timeout_ms * 1000000ull : 0;
    struct timespec deadline = lm_timespec_of_ns(lm_now_ns() + wait_ns);
    pthread_mutex_lock(&s->lock);
    int rc = 0;
    while (!t->done && rc == 0)
        rc = timeout_ms < 0 ? pthread_cond_wait(&s->cond, &s->lock) : pthread_cond_timedwait(&s->cond, &s->lock,
                                                                                             &deadline);
    bool done = t->done;
    int status = t->status;
    if (done && moved)
        *moved = t->moved;
    pthread_mutex_unlock(&s->lock);
    if (!done)
        return lm_fail(LM_ERR_TIMEOUT, "staged %s of %llu bytes not done within %d ms", t->send ? "send" : "receive",
                       (unsigned long long)t->nbytes, timeout_ms);
    if (status != LM_OK)
        return lm_fail(status, "%s", t->message);
    return LM_OK;
}

int lm_transfer_done(lm_transfer_t *t)
{
    if (!t)
        return 0;
    pthread_mutex_lock(&t->link->lock);
    int done = t->done;
    pthread_mutex_unlock(&t->link->lock);
    return done;
}

const char *lm_transfer_message(lm_transfer_t *t)
{
    if (!t)
        return "";
    pthread_mutex_lock(&t->link->lock);
    bool done = t->done; /* (the message is written before done, and never after) */
    pthread_mutex_unlock(&t->link->lock);
    return done ? t->message : "";
}

void lm_transfer_release(lm_transfer_t *t)
{
    if (t)
        transfer_unref(t);
}

int lm_staged_error(lm_staged_t *s, char *text, size_t len)
{
    if (!s)
        return LM_ERR_INVALID;
    pthread_mutex_lock(&s->lock);
    int error = s->error;
    if (text && len)
        snprintf(text, len, "%s", error ? s->text : "");
    pthread_mutex_unlock(&s->lock);
    return error;
}

uint64_t lm_staged_sending(lm_staged_t *s)
{
    if (!s)
        return 0;
    pthread_mutex_lock(&s->lock);
    uint64_t n = s->sending;
    pthread_mutex_unlock(&s->lock);
    return n;
}

void lm_staged_stats(lm_staged_t *s, lm_staged_stats_t *out)
{
    if (!s || !out)
        return;
    pthread_mutex_lock(&s->lock);
    *out = s->stats;
    pthread_mutex_unlock(&s->lock);
    out->posts_pending = lm_poster_pending(s->poster);
}

void lm_staged_shutdown(lm_staged_t *s, int status, const char *why)
{
    if (!s)
        return;
    pthread_mutex_lock(&s->lock);
    fail_locked(s, status ? status : LM_ERR_CLOSED, "%s", why ? why : "staged link closed");
    bool first = !s->shut;
    s->shut = true;
    if (!first) { /* another caller stops it: the endpoint may go only once that is done */
        while (!s->stopped)
            pthread_cond_wait(&s->cond, &s->lock);
        pthread_mutex_unlock(&s->lock);
        return;
    }
    pthread_mutex_unlock(&s->lock);
    atomic_store(&s->stop, true);
    lm_progress_notify(s->ctx);
    pthread_join(s->thread, NULL); /* (the caller's reference keeps s) */
    lm_ep_set_sink(s->ep, NULL, NULL); /* what comes next is the context's again */
    lm_progress_barrier(s->ctx);       /* and no dispatch is still inside the sink */
    pthread_mutex_lock(&s->lock);
    s->stopped = true;
    pthread_cond_broadcast(&s->cond);
    pthread_mutex_unlock(&s->lock);
}

void lm_staged_destroy(lm_staged_t *s)
{
    if (!s)
        return;
    lm_staged_shutdown(s, LM_ERR_CLOSED, "staged link closed");
    pthread_mutex_lock(&s->lock);
    for (uint32_t i = 0; i < s->nevents; i++)
        if (s->fns.event_destroy)
            s->fns.event_destroy(s->events[i]);
    s->nevents = 0;
    pthread_mutex_unlock(&s->lock);
    link_unref(s);
}
