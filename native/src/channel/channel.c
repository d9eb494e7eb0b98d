/* channel.c - activation channels in native code: slot rings, headers,
 * sequence numbers, credits and arrival demultiplexing (lamina.h, "channels";
 * wire format in docs/channel.md).
 *
 * The channel takes its endpoint's completions through the endpoint's sink
 * (lm_ep_set_sink), so an arrival is decoded where it is dispatched, without
 * the context's completion queue and without Python. State is guarded by
 * ch->lock; the sink runs on whichever thread dispatches (or on the posting
 * thread when a post fails synchronously), so nothing here calls into the
 * endpoint while holding ch->lock.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "../core/core.h"

#define CHAN_MAGIC 0x48434D4Cu /* "LMCH" little-endian */
#define CHAN_ALIGN 64u
#define CREDIT_BYTES 8u
#define KIND_DATA 1u
#define KIND_CREDIT 2u
#define MAX_MICROBATCHES (1u << 12)
#define MAX_SLOTS (1u << 16)
/* Completions that arrive between lm_chan_create and the first call that
 * starts the channel (a peer may send as soon as it has our descriptor). */
#define HELD_MAX 4096u
/* Waits are sliced so a failed endpoint is noticed without an event. */
#define WAIT_SLICE_MS 100

typedef struct {
    uint32_t magic;
    uint16_t version;
    uint8_t ntensors;
    uint8_t ncredits;
    uint64_t seq;
    uint32_t layer;
    uint16_t microbatch;
    uint16_t slot;
    uint64_t payload_bytes;
} chan_hdr_t;

typedef struct {
    uint8_t dtype;
    uint8_t ndim;
    uint16_t reserved0;
    uint32_t reserved1;
    uint64_t offset;
    uint32_t shape[LM_CHAN_MAX_NDIM];
} chan_entry_t;

typedef struct {
    uint16_t microbatch;
    uint16_t slot;
    uint32_t seq; /* low 32 bits of the released message's seq */
} chan_credit_t;

_Static_assert(sizeof(chan_hdr_t) == 32, "header layout");
_Static_assert(sizeof(chan_entry_t) == 32, "entry layout");
_Static_assert(sizeof(chan_credit_t) == 8, "credit layout");
#define ENTRIES_AT sizeof(chan_hdr_t)
#define CREDITS_AT (ENTRIES_AT + LM_CHAN_MAX_TENSORS * sizeof(chan_entry_t))
_Static_assert(CREDITS_AT + LM_CHAN_MAX_PIGGYBACK * sizeof(chan_credit_t) <= LM_CHAN_HEADER_BYTES, "fits");

/* A posted stream-ordered send whose sent word waits for its writes. */
typedef struct {
    uint64_t wr_id; /* its header write: the last of its writes */
    uint64_t seq;
} sent_mark_t;
/* Marks kept per micro-batch: a fuller FIFO drops its oldest (the word then
 * advances at a later send's completion, which covers it: writes complete in
 * posting order). A pipeline has one or two sends of a micro-batch in flight. */
#define SENT_MARKS 8

struct lm_chan {
    lm_context_t *ctx;
    lm_ep_t *ep;
    lm_mr_t *mr;
    uint8_t *base;
    lm_rdesc_t peer;
    /* Split payloads (lm_chan_split_payloads): those of our first
     * split_in_mbs micro-batches land in a region of their own (device
     * memory the NIC writes), the headers in our region; the peer's first
     * split_out_mbs micro-batches' in peer_payloads. 0: none split. */
    lm_rdesc_t peer_payloads;
    uint32_t split_in_mbs, split_out_mbs;
    uint32_t mbs, slots, ring;
    uint64_t recv_cap, send_cap;
    uint64_t recv_stride, send_stride, send_base, credit_in_base, credit_out_base;
    uint64_t peer_recv_stride, peer_credit_in_base;
    bool piggyback;

    pthread_mutex_t lock;
    uint64_t *send_seq; /* [mbs] next seq to send */
    uint8_t *busy;      /* [ring] send slot in use until its credit comes back */
    uint64_t *slot_seq; /* [ring] seq last sent from the slot */
    uint64_t *recv_seq; /* [mbs] next seq expected */
    uint32_t *arrived;  /* ring of (mb << 16 | slot), arrival order */
    uint64_t *arrived_ns; /* the same ring: when each arrival was dispatched */
    size_t arr_head, arr_count;
    uint32_t *credit_idx; /* held credits (piggyback), FIFO */
    uint64_t *credit_seq;
    size_t cr_head, cr_count;
    lm_completion_t *held; /* completions before start */
    size_t held_count;
    bool started;
    uint64_t outstanding;
    uint64_t wr_ids;
    uint64_t writes_done;   /* highest completed write id (writes complete in posting order) */
    uint64_t last_send_wr;  /* the header write of the last message sent */
    int error;
    char why[256];
    lm_chan_stats_t st;
    int event_fd;
    atomic_bool fd_wanted;
    /* Closing while another thread is inside a call: calls count themselves
     * in (users); lm_chan_close fails the channel, wakes them and waits until
     * they are out. The memory stays until lm_chan_destroy. */
    atomic_int users;
    atomic_bool closed;
    /* Gather sends: the message's pieces (LM_MAX_SEGS, allocated at the first
     * one; one application thread per channel, so one list suffices). */
    lm_seg_t *segs;
    /* Held from taking write ids to posting the writes: ids then follow the
     * posting order, which is the completion order writes_done relies on, also
     * when a deferred send posts from another thread (the CUDA driver's). */
    pthread_mutex_t post_lock;
    /* Deferred (stream-ordered) work, one op per slot: prepared by the
     * application thread, run later from any thread (lm_chan_run_deferred).
     * unposted[mb]: prepared sends of mb not yet posted (an immediate send on
     * mb waits for them: it would overtake them). refs: the owner's (dropped
     * by lm_chan_destroy) plus one per prepared op not yet run: the last one
     * frees the channel, so an op the driver never runs (a CUDA context
     * error) leaks the channel instead of hanging its destruction. */
    lm_chan_deferred_t *send_ops;    /* [ring] */
    lm_chan_deferred_t *release_ops; /* [ring] */
    uint32_t *unposted;              /* [mbs], under lock */
    pthread_cond_t posted;           /* an unposted count dropped, or the channel failed */
    atomic_int refs;
    /* Sent words (lm_chan_set_sent_words), under lock: the caller's words
     * and, per micro-batch, a FIFO of its posted stream-ordered sends whose
     * writes are not known complete (header write id, seq). */
    uint32_t *sent_words;
    sent_mark_t *sent_marks; /* [mbs * SENT_MARKS] */
    uint8_t *sent_first, *sent_count; /* [mbs] */
};

enum { DEFERRED_SEND = 1, DEFERRED_RELEASE = 2 };

/* A gather message's pieces, as runs of remote-contiguous bytes: each run is
 * one gather write from one region into contiguous payload (plan_gather). */
typedef struct {
    uint32_t first, count;
    uint64_t remote_off; /* in the payload */
    lm_mr_t *mr;         /* the run's pieces are offsets in this region */
} gather_run_t;

struct lm_chan_deferred {
    lm_chan_t *ch;
    uint32_t kind, mb, slot;
    uint64_t seq, hdr_at, length;
    uint32_t imm;
    /* A send from registered regions (lm_chan_send_prepare_from: device
     * memory the NIC reads): its payload goes as these gather writes before
     * the header (length is then the header's alone). Each run's region is
     * referenced until the op has run; segs is the op's own copy. */
    uint32_t nruns;
    gather_run_t runs[LM_CHAN_MAX_TENSORS];
    lm_seg_t *segs;
};

static const uint8_t itemsize_of[] = { /* by wire dtype code; 0: not a code */
    [LM_DTYPE_FLOAT16] = 2, [LM_DTYPE_BFLOAT16] = 2, [LM_DTYPE_FLOAT32] = 4, [LM_DTYPE_INT32] = 4,
    [LM_DTYPE_INT64] = 8,   [LM_DTYPE_UINT8] = 1,    [LM_DTYPE_INT8] = 1,    [LM_DTYPE_FLOAT64] = 8,
};

static uint64_t align_up(uint64_t n)
{
    return (n + CHAN_ALIGN - 1) / CHAN_ALIGN * CHAN_ALIGN;
}

/* ---- layout ------------------------------------------------------------- */

static uint64_t recv_slot_off(const lm_chan_t *ch, uint32_t mb, uint32_t slot)
{
    return ((uint64_t)mb * ch->slots + slot) * ch->recv_stride;
}

static uint64_t send_slot_off(const lm_chan_t *ch, uint32_t mb, uint32_t slot)
{
    return ch->send_base + ((uint64_t)mb * ch->slots + slot) * ch->send_stride;
}

static uint64_t peer_recv_slot_off(const lm_chan_t *ch, uint32_t mb, uint32_t slot)
{
    return ((uint64_t)mb * ch->slots + slot) * ch->peer_recv_stride;
}

/* Where a message's payload goes at the peer: after the header in its slot,
 * or into the peer's payload region. */
static const lm_rdesc_t *payload_dest(const lm_chan_t *ch, uint32_t mb, uint32_t slot, uint64_t *off)
{
    if (mb < ch->split_out_mbs) {
        *off = ((uint64_t)mb * ch->slots + slot) * ch->send_cap;
        return &ch->peer_payloads;
    }
    *off = peer_recv_slot_off(ch, mb, slot) + LM_CHAN_HEADER_BYTES;
    return &ch->peer;
}

static int check_params(const lm_chan_params_t *p)
{
    if (!p || p->microbatches < 1 || p->microbatches > MAX_MICROBATCHES || p->slots < 1 || p->slots > MAX_SLOTS)
        return lm_fail(LM_ERR_INVALID, "channel: 1..%u micro-batches and 1..%u slots each", MAX_MICROBATCHES,
                       MAX_SLOTS);
    if (p->recv_capacity % CHAN_ALIGN || p->send_capacity % CHAN_ALIGN || p->recv_capacity >= (1ull << 32) ||
        p->send_capacity >= (1ull << 32))
        return lm_fail(LM_ERR_INVALID, "channel: slot capacities must be multiples of %u below 4 GiB", CHAN_ALIGN);
    return LM_OK;
}

uint64_t lm_chan_region_bytes(const lm_chan_params_t *p)
{
    if (check_params(p) != LM_OK)
        return 0;
    uint64_t ring = (uint64_t)p->microbatches * p->slots;
    return ring * (2 * LM_CHAN_HEADER_BYTES + p->recv_capacity + p->send_capacity + 2 * CREDIT_BYTES);
}

/* ---- failure and wake-ups ------------------------------------------------ */

/* Words only move forward (a cyclic compare, as the stream's): a late mark
 * after a release must not take a waiter's go-ahead back. */
static void set_sent_word(lm_chan_t *ch, uint32_t mb, uint64_t value)
{
    uint32_t now = __atomic_load_n(&ch->sent_words[mb], __ATOMIC_RELAXED);
    if ((int32_t)((uint32_t)value - now) > 0)
        __atomic_store_n(&ch->sent_words[mb], (uint32_t)value, __ATOMIC_RELEASE); /* low 32 bits */
}

/* Writes up to ch->writes_done completed: the sends they finish are sent. */
static void advance_sent_words_locked(lm_chan_t *ch)
{
    for (uint32_t mb = 0; ch->sent_words && mb < ch->mbs; mb++) {
        sent_mark_t *marks = ch->sent_marks + (size_t)mb * SENT_MARKS;
        while (ch->sent_count[mb] && marks[ch->sent_first[mb]].wr_id <= ch->writes_done) {
            set_sent_word(ch, mb, marks[ch->sent_first[mb]].seq + 1);
            ch->sent_first[mb] = (uint8_t)((ch->sent_first[mb] + 1) % SENT_MARKS);
            ch->sent_count[mb]--;
        }
    }
}

/* A stream-ordered send was posted: its word advances once its header write completed. */
static void release_sent_words_locked(lm_chan_t *ch);
static void mark_sent_locked(lm_chan_t *ch, uint32_t mb, uint64_t wr_id, uint64_t seq)
{
    if (!ch->sent_words)
        return;
    if (ch->error) { /* failed since it posted: released, as every send prepared so far */
        release_sent_words_locked(ch);
        return;
    }
    uint8_t *first = &ch->sent_first[mb], *count = &ch->sent_count[mb];
    if (*count == SENT_MARKS) { /* the oldest goes: a later one covers it */
        *first = (uint8_t)((*first + 1) % SENT_MARKS);
        (*count)--;
    }
    ch->sent_marks[(size_t)mb * SENT_MARKS + (*first + *count) % SENT_MARKS] = (sent_mark_t){wr_id, seq};
    (*count)++;
    advance_sent_words_locked(ch); /* it may have completed before we got the lock */
}

/* Failed or closed: nothing reads the sources any more, so every send
 * prepared so far counts as sent (a stream waiting on its word must not
 * wait forever). */
static void release_sent_words_locked(lm_chan_t *ch)
{
    for (uint32_t mb = 0; ch->sent_words && mb < ch->mbs; mb++) {
        set_sent_word(ch, mb, ch->send_seq[mb]);
        ch->sent_count[mb] = 0;
    }
}

static void fail_locked(lm_chan_t *ch, int status, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void fail_locked(lm_chan_t *ch, int status, const char *fmt, ...)
{
    if (ch->error)
        return; /* the first failure is the one reported */
    ch->error = status;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(ch->why, sizeof(ch->why), fmt, ap);
    va_end(ap);
    release_sent_words_locked(ch);
    pthread_cond_broadcast(&ch->posted); /* a send waiting in wait_posted gives up */
}

static int sticky_error_locked(const lm_chan_t *ch)
{
    return lm_fail(ch->error, "%s", ch->why);
}

/* Something changed: an asyncio waiter on lm_chan_fd looks again; a thread
 * asleep in epoll (another thread dispatched for it) wakes. */
static void notify(lm_chan_t *ch)
{
    if (atomic_load_explicit(&ch->fd_wanted, memory_order_relaxed)) {
        uint64_t one = 1;
        ssize_t r = write(ch->event_fd, &one, sizeof(one));
        (void)r;
    }
    lm_progress_notify(ch->ctx);
}

/* ---- arrivals and credits (ch->lock held) --------------------------------- */

static void credit_arrived_locked(lm_chan_t *ch, uint32_t mb, uint32_t slot, uint64_t released, uint64_t mask)
{
    if (mb >= ch->mbs || slot >= ch->slots) {
        fail_locked(ch, LM_ERR_PROTOCOL, "credit names micro-batch %u slot %u", mb, slot);
        return;
    }
    uint32_t idx = mb * ch->slots + slot;
    if (!ch->busy[idx]) {
        fail_locked(ch, LM_ERR_PROTOCOL, "credit for micro-batch %u slot %u, which is not in use", mb, slot);
        return;
    }
    if (released != (ch->slot_seq[idx] & mask)) {
        fail_locked(ch, LM_ERR_PROTOCOL, "credit names seq %llu, slot %u of micro-batch %u holds seq %llu",
                    (unsigned long long)released, slot, mb, (unsigned long long)ch->slot_seq[idx]);
        return;
    }
    ch->busy[idx] = 0;
}

/* Credits in a landed header count at once, even while the message waits. */
static void apply_piggybacked_locked(lm_chan_t *ch, uint32_t mb, uint32_t slot)
{
    const uint8_t *at = ch->base + recv_slot_off(ch, mb, slot);
    chan_hdr_t h;
    memcpy(&h, at, sizeof(h));
    if (h.magic != CHAN_MAGIC)
        return; /* reported when the message is opened */
    uint32_t n = h.ncredits < LM_CHAN_MAX_PIGGYBACK ? h.ncredits : LM_CHAN_MAX_PIGGYBACK;
    for (uint32_t i = 0; i < n && !ch->error; i++) {
        chan_credit_t c;
        memcpy(&c, at + CREDITS_AT + i * sizeof(c), sizeof(c));
        credit_arrived_locked(ch, c.microbatch, c.slot, c.seq, 0xFFFFFFFFull);
    }
}

static void on_imm_locked(lm_chan_t *ch, uint32_t imm)
{
    uint32_t kind = imm >> 28, mb = (imm >> 16) & 0xFFFu, slot = imm & 0xFFFFu;
    if (mb >= ch->mbs || slot >= ch->slots) {
        fail_locked(ch, LM_ERR_PROTOCOL, "immediate 0x%08x names no slot", imm);
        return;
    }
    if (kind == KIND_DATA) {
        apply_piggybacked_locked(ch, mb, slot);
        if (ch->error)
            return;
        if (ch->arr_count == ch->ring) {
            fail_locked(ch, LM_ERR_PROTOCOL, "more messages arrived than there are slots (%u)", ch->ring);
            return;
        }
        size_t at = (ch->arr_head + ch->arr_count++) % ch->ring;
        ch->arrived[at] = mb << 16 | slot;
        ch->arrived_ns[at] = lm_now_ns();
    } else if (kind == KIND_CREDIT) {
        uint64_t released;
        memcpy(&released, ch->base + ch->credit_in_base + ((uint64_t)mb * ch->slots + slot) * CREDIT_BYTES,
               sizeof(released));
        credit_arrived_locked(ch, mb, slot, released, UINT64_MAX);
    } else {
        fail_locked(ch, LM_ERR_PROTOCOL, "immediate of unknown kind %u", kind);
    }
}

static void on_completion_locked(lm_chan_t *ch, const lm_completion_t *c)
{
    switch (c->opcode) {
    case LM_OP_WRITE:
        ch->outstanding--;
        if (c->wr_id > ch->writes_done)
            ch->writes_done = c->wr_id;
        if (c->status != LM_OK)
            fail_locked(ch, c->status, "a write failed: %s", lm_status_str(c->status));
        else
            advance_sent_words_locked(ch);
        break;
    case LM_OP_RECV_IMM:
        if (!ch->error && (c->flags & LM_CF_IMM))
            on_imm_locked(ch, c->imm);
        break;
    case LM_OP_REFUSED:
        fail_locked(ch, LM_ERR_PROTOCOL, "the peer's write here was refused (status %d)", c->status);
        break;
    default:
        break;
    }
}

static void sink(void *arg, const lm_completion_t *c)
{
    lm_chan_t *ch = arg;
    pthread_mutex_lock(&ch->lock);
    if (ch->started) {
        on_completion_locked(ch, c);
    } else if (ch->held_count < HELD_MAX) {
        ch->held[ch->held_count++] = *c;
    } else {
        if (c->opcode == LM_OP_WRITE)
            ch->outstanding--;
        fail_locked(ch, LM_ERR_PROTOCOL, "more than %u completions before the channel started", HELD_MAX);
    }
    pthread_mutex_unlock(&ch->lock);
    notify(ch);
}

static void start_locked(lm_chan_t *ch)
{
    if (ch->started)
        return;
    ch->started = true;
    for (size_t i = 0; i < ch->held_count; i++)
        on_completion_locked(ch, &ch->held[i]);
    ch->held_count = 0;
}

/* ---- life cycle ------------------------------------------------------------ */

int lm_chan_create(lm_ep_t *ep, lm_mr_t *mr, const lm_rdesc_t *peer, const lm_chan_params_t *p, lm_chan_t **out)
{
    if (!ep || !mr || !peer || !out)
        return lm_fail(LM_ERR_INVALID, "lm_chan_create: NULL argument");
    int rc = check_params(p);
    if (rc != LM_OK)
        return rc;
    if (mr->ctx != ep->ctx)
        return lm_fail(LM_ERR_INVALID, "lm_chan_create: region and endpoint belong to different contexts");
    if (mr->length < lm_chan_region_bytes(p))
        return lm_fail(LM_ERR_INVALID, "lm_chan_create: region has %llu B, the layout needs %llu",
                       (unsigned long long)mr->length, (unsigned long long)lm_chan_region_bytes(p));
    lm_chan_params_t mirrored = *p;
    mirrored.recv_capacity = p->send_capacity;
    mirrored.send_capacity = p->recv_capacity;
    if (peer->length < lm_chan_region_bytes(&mirrored))
        return lm_fail(LM_ERR_PROTOCOL, "peer's channel region has %llu B, its layout needs %llu",
                       (unsigned long long)peer->length, (unsigned long long)lm_chan_region_bytes(&mirrored));
    lm_chan_t *ch = calloc(1, sizeof(*ch));
    if (!ch)
        return lm_fail(LM_ERR_NO_MEMORY, "channel allocation failed");
    atomic_init(&ch->refs, 1);
    ch->ctx = ep->ctx;
    ch->ep = ep;
    ch->mr = mr;
    ch->base = mr->addr;
    ch->peer = *peer;
    ch->mbs = p->microbatches;
    ch->slots = p->slots;
    ch->ring = p->microbatches * p->slots;
    ch->recv_cap = p->recv_capacity;
    ch->send_cap = p->send_capacity;
    ch->recv_stride = LM_CHAN_HEADER_BYTES + p->recv_capacity;
    ch->send_stride = LM_CHAN_HEADER_BYTES + p->send_capacity;
    ch->send_base = (uint64_t)ch->ring * ch->recv_stride;
    ch->credit_in_base = ch->send_base + (uint64_t)ch->ring * ch->send_stride;
    ch->credit_out_base = ch->credit_in_base + (uint64_t)ch->ring * CREDIT_BYTES;
    ch->peer_recv_stride = LM_CHAN_HEADER_BYTES + p->send_capacity;
    ch->peer_credit_in_base = (uint64_t)ch->ring * (2 * LM_CHAN_HEADER_BYTES + p->recv_capacity + p->send_capacity);
    ch->piggyback = p->piggyback != 0;
    ch->event_fd = -1;
    ch->send_seq = calloc(ch->mbs, sizeof(uint64_t));
    ch->recv_seq = calloc(ch->mbs, sizeof(uint64_t));
    ch->busy = calloc(ch->ring, 1);
    ch->slot_seq = calloc(ch->ring, sizeof(uint64_t));
    ch->arrived = calloc(ch->ring, sizeof(uint32_t));
    ch->arrived_ns = calloc(ch->ring, sizeof(uint64_t));
    ch->credit_idx = calloc(ch->ring, sizeof(uint32_t));
    ch->credit_seq = calloc(ch->ring, sizeof(uint64_t));
    ch->held = calloc(HELD_MAX, sizeof(lm_completion_t));
    ch->send_ops = calloc(ch->ring, sizeof(lm_chan_deferred_t));
    ch->release_ops = calloc(ch->ring, sizeof(lm_chan_deferred_t));
    ch->unposted = calloc(ch->mbs, sizeof(uint32_t));
    if (!ch->send_seq || !ch->recv_seq || !ch->busy || !ch->slot_seq || !ch->arrived || !ch->arrived_ns || !ch->credit_idx ||
        !ch->credit_seq || !ch->held || !ch->send_ops || !ch->release_ops || !ch->unposted) {
        ch->ep = NULL;
        lm_chan_destroy(ch);
        return lm_fail(LM_ERR_NO_MEMORY, "channel allocation failed");
    }
    pthread_mutex_init(&ch->lock, NULL);
    pthread_mutex_init(&ch->post_lock, NULL);
    lm_cond_init_monotonic(&ch->posted);
    /* Completions of ep already queued (a fast peer) come over in order. */
    lm_ep_set_sink(ep, sink, ch);
    *out = ch;
    return LM_OK;
}

static void chan_free(lm_chan_t *ch)
{
    if (ch->ep) {
        pthread_mutex_destroy(&ch->lock);
        pthread_mutex_destroy(&ch->post_lock);
        pthread_cond_destroy(&ch->posted);
    }
    free(ch->send_seq);
    free(ch->recv_seq);
    free(ch->busy);
    free(ch->slot_seq);
    free(ch->arrived);
    free(ch->arrived_ns);
    free(ch->credit_idx);
    free(ch->credit_seq);
    free(ch->held);
    free(ch->segs);
    free(ch->send_ops);
    free(ch->release_ops);
    free(ch->unposted);
    free(ch->sent_marks);
    free(ch->sent_first);
    free(ch->sent_count);
    free(ch);
}

static void chan_unref(lm_chan_t *ch)
{
    if (atomic_fetch_sub(&ch->refs, 1) == 1)
        chan_free(ch);
}

void lm_chan_destroy(lm_chan_t *ch)
{
    if (!ch)
        return;
    lm_chan_close(ch);
    chan_unref(ch); /* freed now, or by the last deferred op still to run */
}

/* ---- calls and closing ------------------------------------------------------ */

static bool chan_enter(lm_chan_t *ch)
{
    if (!ch)
        return true; /* the call itself reports the NULL channel */
    atomic_fetch_add(&ch->users, 1);
    if (!atomic_load(&ch->closed))
        return true;
    atomic_fetch_sub(&ch->users, 1);
    return false;
}

static void chan_leave(lm_chan_t *ch)
{
    if (ch)
        atomic_fetch_sub(&ch->users, 1);
}

static int closed_error(const char *call)
{
    return lm_fail(LM_ERR_CLOSED, "%s: channel closed", call);
}

void lm_chan_close(lm_chan_t *ch)
{
    if (!ch || atomic_exchange(&ch->closed, true))
        return;
    if (ch->ep) {
        pthread_mutex_lock(&ch->lock);
        fail_locked(ch, LM_ERR_CLOSED, "channel closed");
        pthread_mutex_unlock(&ch->lock);
        notify(ch); /* an asyncio waiter looks again */
        /* A thread inside a call sees the failure on its next look; one asleep
         * in epoll is woken to look. */
        struct timespec pause = {.tv_nsec = 50000};
        while (atomic_load(&ch->users) > 0) {
            lm_progress_kick(ch->ctx);
            nanosleep(&pause, NULL);
        }
        /* Later completions of the endpoint (its close cancels what is
         * outstanding) go to the context's queue; no dispatch still runs ours. */
        lm_ep_set_sink(ch->ep, NULL, NULL);
        lm_progress_barrier(ch->ctx);
        /* Nothing marks a send any more: the last word is written, and the
         * caller may free the words once this returns. */
        pthread_mutex_lock(&ch->lock);
        release_sent_words_locked(ch);
        ch->sent_words = NULL;
        pthread_mutex_unlock(&ch->lock);
    }
    if (ch->event_fd >= 0) {
        close(ch->event_fd);
        ch->event_fd = -1;
    }
}

/* ---- waiting ----------------------------------------------------------------- */

int lm_chan_split_payloads(lm_chan_t *ch, lm_mr_t *recv_payloads, uint32_t recv_microbatches,
                           const lm_rdesc_t *peer_payloads, uint32_t peer_microbatches)
{
    if (!chan_enter(ch))
        return closed_error("lm_chan_split_payloads");
    int rc = LM_OK;
    uint64_t in_slots = (uint64_t)recv_microbatches * ch->slots, out_slots = (uint64_t)peer_microbatches * ch->slots;
    pthread_mutex_lock(&ch->lock);
    /* Arrivals queued but not opened are fine: the peer placed them as our
     * hello said, and open_locked reads split_in_mbs only when it opens them. */
    if (ch->st.messages || ch->st.messages_received || ch->outstanding)
        rc = lm_fail(LM_ERR_INVALID, "lm_chan_split_payloads: the channel has sent or opened messages already");
    else if (recv_payloads && (recv_microbatches == 0 || recv_microbatches > ch->mbs))
        rc = lm_fail(LM_ERR_INVALID, "lm_chan_split_payloads: %u split micro-batches of %u", recv_microbatches,
                     ch->mbs);
    else if (recv_payloads && recv_payloads->ctx != ch->ctx)
        rc = lm_fail(LM_ERR_INVALID, "lm_chan_split_payloads: the payload region belongs to another context");
    else if (recv_payloads && recv_payloads->length < in_slots * ch->recv_cap)
        rc = lm_fail(LM_ERR_INVALID, "lm_chan_split_payloads: the payload region has %llu B, %llu slots of %llu B "
                     "need %llu", (unsigned long long)recv_payloads->length, (unsigned long long)in_slots,
                     (unsigned long long)ch->recv_cap, (unsigned long long)(in_slots * ch->recv_cap));
    else if (recv_payloads && !(recv_payloads->access & LM_ACCESS_REMOTE_WRITE))
        rc = lm_fail(LM_ERR_INVALID, "lm_chan_split_payloads: the payload region does not grant remote writes");
    else if (recv_payloads && !lm_mr_reachable(recv_payloads, ch->ep->ops->id))
        rc = lm_fail(LM_ERR_UNSUPPORTED, "lm_chan_split_payloads: the payload region is device memory, which %s "
                     "cannot write", ch->ep->ops->name);
    else if (peer_payloads && (peer_microbatches == 0 || peer_microbatches > ch->mbs))
        rc = lm_fail(LM_ERR_PROTOCOL, "the peer splits %u micro-batches of %u", peer_microbatches, ch->mbs);
    else if (peer_payloads && peer_payloads->length < out_slots * ch->send_cap)
        rc = lm_fail(LM_ERR_PROTOCOL, "the peer's payload region has %llu B, its slots need %llu",
                     (unsigned long long)peer_payloads->length, (unsigned long long)(out_slots * ch->send_cap));
    if (rc == LM_OK) {
        ch->split_in_mbs = recv_payloads ? recv_microbatches : 0;
        if (peer_payloads)
            ch->peer_payloads = *peer_payloads;
        ch->split_out_mbs = peer_payloads ? peer_microbatches : 0;
    }
    pthread_mutex_unlock(&ch->lock);
    chan_leave(ch);
    return rc;
}

static uint64_t deadline_of(int timeout_ms)
{
    return timeout_ms < 0 ? UINT64_MAX : lm_now_ns() + (uint64_t)timeout_ms * 1000000ull;
}

/* One slice of progress in this thread; LM_ERR_TIMEOUT once the deadline passed. */
static int wait_step(lm_chan_t *ch, uint64_t deadline)
{
    uint64_t now = lm_now_ns();
    if (now >= deadline)
        return LM_ERR_TIMEOUT;
    uint64_t left_ms = deadline == UINT64_MAX ? WAIT_SLICE_MS : (deadline - now + 999999) / 1000000;
    lm_progress_drive(ch->ctx, (int)(left_ms < WAIT_SLICE_MS ? left_ms : WAIT_SLICE_MS));
    return LM_OK;
}

/* The endpoint failed with nothing of ours outstanding to tell us: fail too. */
static void check_endpoint_locked(lm_chan_t *ch)
{
    int err = lm_ep_error(ch->ep);
    if (err && !ch->error)
        fail_locked(ch, err, "the endpoint failed: %s", lm_status_str(err));
}

/* ---- credits going out --------------------------------------------------------- */

static int write_credit(lm_chan_t *ch, uint32_t mb, uint32_t slot, uint64_t seq)
{
    if (lm_ep_error(ch->ep))
        return LM_OK; /* a peer that is gone needs no credit; releasing must not fail then */
    uint64_t idx = (uint64_t)mb * ch->slots + slot;
    memcpy(ch->base + ch->credit_out_base + idx * CREDIT_BYTES, &seq, sizeof(seq));
    pthread_mutex_lock(&ch->post_lock);
    pthread_mutex_lock(&ch->lock);
    ch->outstanding++;
    uint64_t wr_id = ++ch->wr_ids;
    pthread_mutex_unlock(&ch->lock);
    int rc = lm_ep_write(ch->ep, ch->mr, ch->credit_out_base + idx * CREDIT_BYTES, CREDIT_BYTES, &ch->peer,
                         ch->peer_credit_in_base + idx * CREDIT_BYTES, KIND_CREDIT << 28 | mb << 16 | slot,
                         LM_WRITE_IMM, wr_id);
    pthread_mutex_unlock(&ch->post_lock);
    pthread_mutex_lock(&ch->lock);
    if (rc != LM_OK)
        ch->outstanding--;
    else
        ch->st.credits_returned++;
    pthread_mutex_unlock(&ch->lock);
    return rc == LM_ERR_PEER_LOST || rc == LM_ERR_CLOSED || rc == LM_ERR_CANCELED ? LM_OK : rc;
}

/* Put credits taken off the queue back at its head (their write failed). */
static void requeue_credits_locked(lm_chan_t *ch, const uint32_t *idx, const uint64_t *seq, uint32_t n)
{
    for (uint32_t i = n; i-- > 0 && ch->cr_count < ch->ring;) {
        ch->cr_head = (ch->cr_head + ch->ring - 1) % ch->ring;
        ch->cr_count++;
        ch->credit_idx[ch->cr_head] = idx[i];
        ch->credit_seq[ch->cr_head] = seq[i];
    }
}

/* Before this thread waits: the peer may be waiting for the credits we hold. */
static int write_held_credits(lm_chan_t *ch)
{
    for (;;) {
        pthread_mutex_lock(&ch->lock);
        if (ch->cr_count == 0) {
            pthread_mutex_unlock(&ch->lock);
            return LM_OK;
        }
        uint32_t idx = ch->credit_idx[ch->cr_head];
        uint64_t seq = ch->credit_seq[ch->cr_head];
        ch->cr_head = (ch->cr_head + 1) % ch->ring;
        ch->cr_count--;
        pthread_mutex_unlock(&ch->lock);
        int rc = write_credit(ch, idx / ch->slots, idx % ch->slots, seq);
        if (rc != LM_OK) {
            pthread_mutex_lock(&ch->lock);
            requeue_credits_locked(ch, &idx, &seq, 1);
            pthread_mutex_unlock(&ch->lock);
            return rc;
        }
    }
}

static int chan_release(lm_chan_t *ch, uint32_t mb, uint32_t slot, uint64_t seq)
{
    if (!ch || mb >= ch->mbs || slot >= ch->slots)
        return lm_fail(LM_ERR_INVALID, "lm_chan_release: no such slot");
    if (!ch->piggyback)
        return write_credit(ch, mb, slot, seq);
    pthread_mutex_lock(&ch->lock);
    int rc = LM_OK;
    if (ch->cr_count == ch->ring) {
        rc = lm_fail(LM_ERR_INVALID, "lm_chan_release: more releases than slots");
    } else {
        size_t at = (ch->cr_head + ch->cr_count++) % ch->ring;
        ch->credit_idx[at] = mb * ch->slots + slot;
        ch->credit_seq[at] = seq;
    }
    pthread_mutex_unlock(&ch->lock);
    return rc;
}

/* ---- sending ----------------------------------------------------------------- */

/* One round of a wait whose condition was just found false (round counts
 * from 0): first a progress round without sleeping (it may already be in the
 * socket), then the held credits go out (the peer may be waiting for them),
 * then a failed endpoint fails the channel (the caller looks again and sees
 * it), else one slice of progress. LM_ERR_TIMEOUT past the deadline. */
static int wait_round(lm_chan_t *ch, int round, uint64_t deadline)
{
    if (round == 0) {
        lm_progress_drive(ch->ctx, 0);
        return LM_OK;
    }
    if (round == 1) {
        int rc = write_held_credits(ch);
        if (rc != LM_OK)
            return rc;
    }
    pthread_mutex_lock(&ch->lock);
    check_endpoint_locked(ch);
    bool failed = ch->error != 0;
    pthread_mutex_unlock(&ch->lock);
    return failed ? LM_OK : wait_step(ch, deadline);
}

static int wait_credit(lm_chan_t *ch, uint32_t mb, uint32_t slot, int timeout_ms)
{
    uint64_t deadline = deadline_of(timeout_ms), started = 0;
    uint32_t idx = mb * ch->slots + slot;
    for (int round = 0;; round++) {
        pthread_mutex_lock(&ch->lock);
        start_locked(ch);
        if (!ch->busy[idx] || ch->error) {
            int rc = ch->error ? sticky_error_locked(ch) : LM_OK;
            if (started)
                ch->st.credit_wait_ns += lm_now_ns() - started;
            pthread_mutex_unlock(&ch->lock);
            return rc;
        }
        if (round == 1) {
            started = lm_now_ns();
            ch->st.credit_waits++;
        }
        pthread_mutex_unlock(&ch->lock);
        int rc = wait_round(ch, round, deadline);
        if (rc == LM_ERR_TIMEOUT) {
            pthread_mutex_lock(&ch->lock);
            ch->st.credit_wait_ns += lm_now_ns() - started;
            pthread_mutex_unlock(&ch->lock);
            return lm_fail(LM_ERR_TIMEOUT, "no credit for micro-batch %u (slot %u) within %d ms; the receiver "
                           "still holds the slot", mb, slot, timeout_ms);
        }
        if (rc != LM_OK)
            return rc;
    }
}

static int chan_send_slot(lm_chan_t *ch, uint32_t mb, int timeout_ms, uint64_t *payload_offset)
{
    if (!ch || !payload_offset || mb >= ch->mbs)
        return lm_fail(LM_ERR_INVALID, "lm_chan_send_slot: bad micro-batch or NULL argument");
    uint32_t slot = (uint32_t)(ch->send_seq[mb] % ch->slots);
    int rc = wait_credit(ch, mb, slot, timeout_ms);
    if (rc == LM_OK)
        *payload_offset = send_slot_off(ch, mb, slot) + LM_CHAN_HEADER_BYTES;
    return rc;
}

typedef enum { FROM_SLOT, FROM_REGION, GATHER, STAGED } placement_t;
#define GATHER_MIN_ROW 64u /* bytes: shorter strided rows are copied into the slot */

static uint64_t row_bytes(const lm_chan_tensor_t *t)
{
    return t->rows > 1 ? t->nbytes / t->rows : t->nbytes;
}

/* Rows with gaps between them (a column block of a wider tensor). */
static bool is_strided(const lm_chan_tensor_t *t)
{
    return t->rows > 1 && t->row_stride != row_bytes(t);
}

/* One past the last byte the tensor's rows touch (checked not to overflow). */
static uint64_t extent_end(const lm_chan_tensor_t *t)
{
    return is_strided(t) ? t->addr + (t->rows - 1) * t->row_stride + row_bytes(t) : t->addr + t->nbytes;
}

static bool valid_rows(const lm_chan_tensor_t *t)
{
    if (t->rows <= 1)
        return t->addr + t->nbytes >= t->addr;
    uint64_t span;
    return t->nbytes % t->rows == 0 && t->row_stride >= row_bytes(t) &&
           !__builtin_mul_overflow(t->rows - 1, t->row_stride, &span) &&
           !__builtin_add_overflow(span, row_bytes(t), &span) && t->addr + span >= t->addr;
}

/* Our own region or source, whichever of this context holds [lo, hi); NULL if neither. */
static lm_mr_t *region_holding(const lm_chan_t *ch, lm_mr_t *source, uint64_t lo, uint64_t hi)
{
    lm_mr_t *candidates[2] = {ch->mr, source};
    for (int k = 0; k < 2; k++) {
        lm_mr_t *mr = candidates[k];
        uint64_t start = (uint64_t)(uintptr_t)(mr ? mr->addr : NULL);
        if (mr && mr->ctx == ch->ctx && lo >= start && hi <= start + mr->length)
            return mr;
    }
    return NULL;
}

/* Each tensor's region for a gather from several (sources[i], else our own
 * region); false if one lies in none of them. */
static bool regions_per_tensor(const lm_chan_t *ch, const lm_chan_tensor_t *t, uint32_t n, lm_mr_t *const *sources,
                               lm_mr_t **mrs)
{
    for (uint32_t i = 0; i < n; i++) {
        if (t[i].nbytes == 0) { /* nothing to read: any region will do (plan_gather skips it) */
            mrs[i] = sources[i] ? sources[i] : ch->mr;
            continue;
        }
        if (!(mrs[i] = region_holding(ch, sources[i], t[i].addr, extent_end(&t[i]))))
            return false;
    }
    return true;
}

/* Whether a message's source regions include device memory. */
static bool from_device(const lm_mr_t *source, lm_mr_t *const *sources, uint32_t n)
{
    bool device = source && source->device;
    for (uint32_t i = 0; sources && i < n && !device; i++)
        device = sources[i] && sources[i]->device;
    return device;
}

/* Where the payload comes from, and each tensor's offset in it. sources:
 * per-tensor regions (lm_chan_send_from) or NULL; mrs: for GATHER, the
 * region of each tensor. */
static placement_t place(lm_chan_t *ch, const lm_chan_tensor_t *t, uint32_t n, lm_mr_t *source,
                         lm_mr_t *const *sources, uint64_t slot_payload, uint64_t *offsets, uint64_t *payload_bytes,
                         lm_mr_t **region, uint64_t *region_off, lm_mr_t **mrs)
{
    uint64_t base = (uint64_t)(uintptr_t)ch->base;
    uint64_t lo = UINT64_MAX, hi = 0, padded = 0;
    bool strided = false, short_rows = false, device = from_device(source, sources, n);
    for (uint32_t i = 0; i < n; i++) {
        if (t[i].addr < lo)
            lo = t[i].addr;
        if (extent_end(&t[i]) > hi)
            hi = extent_end(&t[i]);
        padded += align_up(t[i].nbytes);
        strided |= is_strided(&t[i]);
        /* (Rows of device memory are gathered however short: the CPU cannot copy them.) */
        short_rows |= is_strided(&t[i]) && row_bytes(&t[i]) < GATHER_MIN_ROW && !device;
    }
    if (n > 0 && !strided && lo >= base + slot_payload && hi <= base + slot_payload + ch->send_cap) {
        for (uint32_t i = 0; i < n; i++)
            offsets[i] = t[i].addr - (base + slot_payload);
        *payload_bytes = hi - (base + slot_payload);
        return FROM_SLOT;
    }
    lm_mr_t *holder = n > 0 ? region_holding(ch, sources ? sources[0] : source, lo, hi) : NULL;
    /* "Packed": gaps no larger than alignment padding, so no dead memory ships. */
    if (holder && !strided && hi - lo <= ch->send_cap && hi - lo <= padded) {
        for (uint32_t i = 0; i < n; i++)
            offsets[i] = t[i].addr - lo;
        *payload_bytes = hi - lo;
        *region = holder;
        *region_off = lo - (uint64_t)(uintptr_t)holder->addr;
        return FROM_REGION;
    }
    uint64_t cursor = 0;
    for (uint32_t i = 0; i < n; i++) {
        offsets[i] = cursor;
        cursor = i + 1 < n ? align_up(cursor + t[i].nbytes) : cursor + t[i].nbytes;
    }
    *payload_bytes = cursor;
    /* Not packed but all in one registered region, or each tensor in one of
     * several: gathered from there, unless rows are so short that copying
     * them beats a list entry each. */
    if (short_rows || n == 0)
        return STAGED;
    if (holder) {
        for (uint32_t i = 0; i < n; i++)
            mrs[i] = holder;
        return GATHER;
    }
    return sources && regions_per_tensor(ch, t, n, sources, mrs) ? GATHER : STAGED;
}

/* With split payloads, a payload that lies in the slot (placed there, or
 * staged) goes apart, as a write from our region into the peer's payload
 * region; how stays as placed otherwise. */
static placement_t payload_apart(const lm_chan_t *ch, uint32_t mb, placement_t how, uint64_t payload,
                                 uint64_t slot_payload, lm_mr_t **region, uint64_t *region_off)
{
    if (mb >= ch->split_out_mbs || payload == 0 || (how != FROM_SLOT && how != STAGED))
        return how;
    *region = ch->mr;
    *region_off = slot_payload;
    return FROM_REGION;
}

/* Plan a gather message's runs: a run ends where alignment padding separates
 * two tensors (nothing of ours may fill it). Adjacent rows merge. False if
 * the pieces do not fit ch->segs. */
static bool plan_gather(lm_chan_t *ch, const lm_chan_tensor_t *t, uint32_t n, const uint64_t *offsets,
                        lm_mr_t *const *mrs, gather_run_t *runs, uint32_t *nruns)
{
    if (!ch->segs && !(ch->segs = malloc(LM_MAX_SEGS * sizeof(*ch->segs))))
        return false;
    uint32_t count = 0;
    uint64_t run_end = 0; /* payload offset just past the current run */
    *nruns = 0;
    for (uint32_t i = 0; i < n; i++) {
        if (t[i].nbytes == 0)
            continue;
        /* A run is one gather write: from one region, into contiguous payload. */
        if (*nruns == 0 || offsets[i] != run_end || mrs[i] != runs[*nruns - 1].mr)
            runs[(*nruns)++] = (gather_run_t){.first = count, .count = 0, .remote_off = offsets[i], .mr = mrs[i]};
        run_end = offsets[i] + t[i].nbytes;
        gather_run_t *run = &runs[*nruns - 1];
        uint32_t rows = t[i].rows > 1 ? t[i].rows : 1;
        uint64_t stride = t[i].rows > 1 ? t[i].row_stride : 0, len = row_bytes(&t[i]);
        for (uint32_t r = 0; r < rows; r++) {
            uint64_t off = t[i].addr - (uint64_t)(uintptr_t)mrs[i]->addr + r * stride;
            lm_seg_t *prev = run->count ? &ch->segs[count - 1] : NULL;
            if (prev && prev->offset + prev->length == off) {
                prev->length += len;
                continue;
            }
            if (count == LM_MAX_SEGS)
                return false;
            ch->segs[count++] = (lm_seg_t){.offset = off, .length = len};
            run->count++;
        }
    }
    return true;
}

static void copy_rows(uint8_t *dst, const lm_chan_tensor_t *t)
{
    if (!is_strided(t)) {
        memmove(dst, (const void *)(uintptr_t)t->addr, t->nbytes);
        return;
    }
    uint64_t len = row_bytes(t);
    for (uint32_t r = 0; r < t->rows; r++)
        memmove(dst + r * len, (const void *)(uintptr_t)(t->addr + r * t->row_stride), len);
}

/* The credits a header carries (its ncredits field and the list). */
static void put_credits(uint8_t *h, const chan_credit_t *credits, uint32_t n)
{
    h[offsetof(chan_hdr_t, ncredits)] = (uint8_t)n;
    if (n)
        memcpy(h + CREDITS_AT, credits, n * sizeof(*credits));
}

static void write_header(lm_chan_t *ch, uint64_t at, const lm_chan_tensor_t *t, uint32_t n, const uint64_t *offsets,
                         uint32_t layer, uint32_t mb, uint32_t slot, uint64_t seq, uint64_t payload_bytes,
                         const chan_credit_t *credits, uint32_t ncredits)
{
    uint8_t *h = ch->base + at;
    memset(h, 0, LM_CHAN_HEADER_BYTES);
    chan_hdr_t hdr = {.magic = CHAN_MAGIC, .version = LM_CHAN_WIRE_VERSION, .ntensors = (uint8_t)n,
                      .seq = seq, .layer = layer, .microbatch = (uint16_t)mb, .slot = (uint16_t)slot,
                      .payload_bytes = payload_bytes};
    memcpy(h, &hdr, sizeof(hdr));
    for (uint32_t i = 0; i < n; i++) {
        chan_entry_t e = {.dtype = t[i].dtype, .ndim = t[i].ndim, .offset = offsets[i]};
        memcpy(e.shape, t[i].shape, sizeof(e.shape));
        memcpy(h + ENTRIES_AT + i * sizeof(e), &e, sizeof(e));
    }
    put_credits(h, credits, ncredits);
}

/* Copy the tensors into the slot's payload. One that already lies in that
 * payload could be overwritten by another's copy before it is read: then
 * everything goes through a scratch buffer first. */
static int stage(lm_chan_t *ch, const lm_chan_tensor_t *t, uint32_t n, const uint64_t *offsets, uint64_t slot_payload,
                 uint64_t payload)
{
    uint64_t lo = (uint64_t)(uintptr_t)ch->base + slot_payload, hi = lo + ch->send_cap;
    bool inside = false;
    for (uint32_t i = 0; i < n && !inside; i++)
        inside = t[i].nbytes > 0 && t[i].addr < hi && extent_end(&t[i]) > lo;
    uint8_t *dst = ch->base + slot_payload, *scratch = inside ? malloc(payload ? payload : 1) : NULL;
    if (inside && !scratch)
        return lm_fail(LM_ERR_NO_MEMORY, "no memory to stage a message whose tensors lie in its own slot");
    for (uint32_t i = 0; i < n; i++)
        copy_rows((scratch ? scratch : dst) + offsets[i], &t[i]);
    if (scratch) {
        memcpy(dst, scratch, payload);
        free(scratch);
    }
    return LM_OK;
}

static int check_message(lm_chan_t *ch, uint32_t mb, const lm_chan_tensor_t *t, uint32_t n, const void *out)
{
    if (!ch || (n && !t) || !out)
        return lm_fail(LM_ERR_INVALID, "lm_chan_send: NULL argument");
    if (mb >= ch->mbs)
        return lm_fail(LM_ERR_INVALID, "micro-batch %u outside 0..%u", mb, ch->mbs - 1);
    if (n > LM_CHAN_MAX_TENSORS)
        return lm_fail(LM_ERR_INVALID, "a message carries at most %d tensors, got %u", LM_CHAN_MAX_TENSORS, n);
    for (uint32_t i = 0; i < n; i++) {
        if (t[i].ndim > LM_CHAN_MAX_NDIM || t[i].dtype == 0 || t[i].dtype >= sizeof(itemsize_of))
            return lm_fail(LM_ERR_INVALID, "tensor %u: dtype code %u, %u dimensions", i, t[i].dtype, t[i].ndim);
        if (!valid_rows(&t[i]))
            return lm_fail(LM_ERR_INVALID, "tensor %u: %llu B in %u rows %llu B apart do not describe memory", i,
                           (unsigned long long)t[i].nbytes, t[i].rows, (unsigned long long)t[i].row_stride);
    }
    return LM_OK;
}

/* Held credits that ride in the next header (at most LM_CHAN_MAX_PIGGYBACK). */
static uint32_t take_credits_locked(lm_chan_t *ch, chan_credit_t *credits, uint32_t *credit_idx, uint64_t *credit_seq)
{
    uint32_t n = 0;
    while (n < LM_CHAN_MAX_PIGGYBACK && ch->cr_count > 0) {
        uint32_t c = ch->credit_idx[ch->cr_head];
        credit_idx[n] = c;
        credit_seq[n] = ch->credit_seq[ch->cr_head];
        credits[n++] = (chan_credit_t){.microbatch = (uint16_t)(c / ch->slots), .slot = (uint16_t)(c % ch->slots),
                                       .seq = (uint32_t)ch->credit_seq[ch->cr_head]};
        ch->cr_head = (ch->cr_head + 1) % ch->ring;
        ch->cr_count--;
    }
    return n;
}

static void count_sent_locked(lm_chan_t *ch, placement_t how, const lm_chan_tensor_t *t, uint32_t n,
                              uint64_t payload, uint32_t ncredits)
{
    ch->st.messages++;
    ch->st.bytes_sent += LM_CHAN_HEADER_BYTES + payload;
    ch->st.credits_piggybacked += ncredits;
    ch->st.credits_returned += ncredits;
    if (how == FROM_SLOT)
        ch->st.slot_messages++;
    else if (how == FROM_REGION)
        ch->st.region_messages++;
    else if (how == GATHER)
        ch->st.gather_messages++;
    else {
        ch->st.staged_messages++;
        for (uint32_t i = 0; i < n; i++)
            ch->st.staged_bytes += t[i].nbytes;
    }
}

/* An immediate send on mb waits until the deferred sends prepared before it
 * are posted (it would overtake them: the receiver takes a micro-batch's
 * messages in sequence). They post when their stream's copies are done. */
static int wait_posted(lm_chan_t *ch, uint32_t mb, int timeout_ms)
{
    uint64_t deadline = deadline_of(timeout_ms);
    pthread_mutex_lock(&ch->lock);
    int rc = LM_OK;
    while (!ch->error && ch->unposted[mb]) {
        uint64_t now = lm_now_ns();
        if (now >= deadline) {
            rc = lm_fail(LM_ERR_TIMEOUT, "micro-batch %u: a stream-ordered send prepared earlier was not posted "
                         "within %d ms (its stream's copies have not finished)", mb, timeout_ms);
            break;
        }
        /* Woken when a deferred send posts (or is dropped) or the channel fails. */
        uint64_t until = deadline == UINT64_MAX ? now + (uint64_t)WAIT_SLICE_MS * 1000000ull : deadline;
        struct timespec ts = lm_timespec_of_ns(until);
        pthread_cond_timedwait(&ch->posted, &ch->lock, &ts);
    }
    if (rc == LM_OK && ch->error)
        rc = sticky_error_locked(ch);
    pthread_mutex_unlock(&ch->lock);
    return rc;
}

static int chan_send(lm_chan_t *ch, uint32_t layer, uint32_t mb, const lm_chan_tensor_t *t, uint32_t n,
                     lm_mr_t *source, lm_mr_t *const *sources, uint32_t flags, int timeout_ms, uint64_t *seq_inout)
{
    int rc = check_message(ch, mb, t, n, seq_inout);
    if (rc != LM_OK || (rc = wait_posted(ch, mb, timeout_ms)) != LM_OK)
        return rc;
    bool raw = flags & LM_CHAN_SEND_RAW_SEQ;
    uint64_t seq = raw ? *seq_inout : ch->send_seq[mb];
    uint32_t slot = (uint32_t)(seq % ch->slots), idx = mb * ch->slots + slot;
    rc = wait_credit(ch, mb, slot, timeout_ms);
    if (rc != LM_OK)
        return rc;

    uint64_t hdr_at = send_slot_off(ch, mb, slot), offsets[LM_CHAN_MAX_TENSORS], payload = 0, region_off = 0;
    lm_mr_t *region = NULL, *mrs[LM_CHAN_MAX_TENSORS];
    placement_t how = place(ch, t, n, source, sources, hdr_at + LM_CHAN_HEADER_BYTES, offsets, &payload, &region,
                            &region_off, mrs);
    if (payload > ch->send_cap)
        return lm_fail(LM_ERR_INVALID, "message of %llu B exceeds the %llu-byte slot",
                       (unsigned long long)payload, (unsigned long long)ch->send_cap);
    gather_run_t runs[LM_CHAN_MAX_TENSORS];
    uint32_t nruns = 0;
    if (how == GATHER && !plan_gather(ch, t, n, offsets, mrs, runs, &nruns))
        how = STAGED; /* more pieces than one list holds: copied instead (counted) */
    if (how == STAGED && from_device(source, sources, n))
        return lm_fail(LM_ERR_UNSUPPORTED, "a message from device memory must lie in its registered regions, "
                       "in at most %d pieces: the CPU cannot copy it into the slot", LM_MAX_SEGS);
    if (how == STAGED && (rc = stage(ch, t, n, offsets, hdr_at + LM_CHAN_HEADER_BYTES, payload)) != LM_OK)
        return rc;
    placement_t counted = how;
    how = payload_apart(ch, mb, how, payload, hdr_at + LM_CHAN_HEADER_BYTES, &region, &region_off);

    /* Marked in use before posting: the peer's credit may come back before
     * lm_ep_write returns (another thread dispatches it). */
    chan_credit_t credits[LM_CHAN_MAX_PIGGYBACK];
    uint32_t credit_idx[LM_CHAN_MAX_PIGGYBACK];
    uint64_t credit_seq[LM_CHAN_MAX_PIGGYBACK];
    uint32_t writes = how == FROM_REGION ? 2 : how == GATHER ? nruns + 1 : 1;
    pthread_mutex_lock(&ch->post_lock);
    pthread_mutex_lock(&ch->lock);
    uint32_t ncredits = take_credits_locked(ch, credits, credit_idx, credit_seq);
    ch->busy[idx] = 1;
    ch->slot_seq[idx] = seq;
    ch->outstanding += writes;
    uint64_t wr_id = (ch->wr_ids += writes);
    pthread_mutex_unlock(&ch->lock);
    write_header(ch, hdr_at, t, n, offsets, layer, mb, slot, seq, payload, credits, ncredits);

    uint64_t remote = peer_recv_slot_off(ch, mb, slot), at = 0;
    const lm_rdesc_t *dest = payload_dest(ch, mb, slot, &at);
    uint32_t imm = KIND_DATA << 28 | mb << 16 | slot;
    uint32_t posted = 0;
    if (how == FROM_REGION) {
        rc = lm_ep_write(ch->ep, region, region_off, payload, dest, at, 0, 0, wr_id - 1);
        posted += rc == LM_OK;
    }
    for (uint32_t k = 0; how == GATHER && k < nruns && rc == LM_OK; k++) {
        rc = lm_ep_writev(ch->ep, runs[k].mr, ch->segs + runs[k].first, runs[k].count, dest,
                          at + runs[k].remote_off, 0, 0, wr_id - nruns + k);
        posted += rc == LM_OK;
    }
    if (rc == LM_OK) {
        /* Payload first, header last: the immediate fires after the payload landed. */
        bool payload_apart = how == FROM_REGION || how == GATHER;
        uint64_t length = LM_CHAN_HEADER_BYTES + (payload_apart ? 0 : payload);
        rc = lm_ep_write(ch->ep, ch->mr, hdr_at, length, &ch->peer, remote, imm, LM_WRITE_IMM, wr_id);
        posted += rc == LM_OK;
    }
    pthread_mutex_unlock(&ch->post_lock);
    pthread_mutex_lock(&ch->lock);
    ch->outstanding -= writes - posted;
    if (rc != LM_OK) {
        ch->busy[idx] = 0; /* nothing reached the peer in this slot */
        /* The header (posted last) never left: its credits are still ours to send. */
        requeue_credits_locked(ch, credit_idx, credit_seq, ncredits);
    } else {
        if (!raw)
            ch->send_seq[mb]++;
        if (wr_id > ch->last_send_wr) /* a deferred send may have posted after us and set it */
            ch->last_send_wr = wr_id;
        count_sent_locked(ch, counted, t, n, payload, ncredits);
    }
    pthread_mutex_unlock(&ch->lock);
    if (rc == LM_OK && !raw)
        *seq_inout = seq;
    return rc;
}

/* ---- deferred (stream-ordered) sends and releases ------------------------- */

/* The regions of a stream-ordered send from registered memory: one per
 * tensor, of this context, within the channel's transport's reach, holding
 * the tensor; the message in at most LM_MAX_SEGS pieces. Checked before the
 * credit is waited for, so a bad call fails at once. */
static int check_sources(const lm_chan_t *ch, const lm_chan_tensor_t *t, uint32_t n, lm_mr_t *const *sources)
{
    uint64_t pieces = 0;
    for (uint32_t i = 0; i < n; i++) {
        if (!sources[i])
            return lm_fail(LM_ERR_INVALID, "lm_chan_send_prepare_from: tensor %u has no source region", i);
        if (sources[i]->ctx != ch->ctx)
            return lm_fail(LM_ERR_INVALID, "lm_chan_send_prepare_from: tensor %u's region belongs to another "
                           "context", i);
        if (!lm_mr_reachable(sources[i], ch->ep->ops->id))
            return lm_fail(LM_ERR_UNSUPPORTED, "tensor %u lies in device memory, which %s cannot reach (the CPU "
                           "moves its bytes): stage it through the send slot (lm_chan_send_prepare)", i,
                           ch->ep->ops->name);
        uint64_t start = (uint64_t)(uintptr_t)sources[i]->addr;
        if (t[i].nbytes && (t[i].addr < start || extent_end(&t[i]) > start + sources[i]->length))
            return lm_fail(LM_ERR_INVALID, "lm_chan_send_prepare_from: tensor %u does not lie in its source region", i);
        pieces += t[i].nbytes ? (t[i].rows > 1 ? t[i].rows : 1) : 0;
    }
    if (pieces > LM_MAX_SEGS)
        return lm_fail(LM_ERR_INVALID, "lm_chan_send_prepare_from: %llu pieces (rows) exceed the %d a gather "
                       "write takes: stage the message through the send slot", (unsigned long long)pieces,
                       LM_MAX_SEGS);
    return LM_OK;
}

/* A prepared send's payload writes: its runs and their own copy of the
 * pieces, each run's region referenced until the op has run. */
static int keep_runs(lm_chan_t *ch, lm_chan_deferred_t *op, placement_t how, const gather_run_t *runs,
                     uint32_t nruns, lm_mr_t *region, uint64_t region_off, uint64_t payload)
{
    uint32_t nsegs = how == FROM_REGION ? 1 : nruns ? runs[nruns - 1].first + runs[nruns - 1].count : 0;
    op->nruns = 0;
    op->segs = NULL;
    if (nsegs == 0)
        return LM_OK;
    if (!(op->segs = malloc(nsegs * sizeof(*op->segs))))
        return lm_fail(LM_ERR_NO_MEMORY, "no memory for a stream-ordered send's %u pieces", nsegs);
    op->nruns = how == FROM_REGION ? 1 : nruns;
    if (how == FROM_REGION) {
        op->runs[0] = (gather_run_t){.first = 0, .count = 1, .remote_off = 0, .mr = region};
        op->segs[0] = (lm_seg_t){.offset = region_off, .length = payload};
    } else {
        memcpy(op->runs, runs, nruns * sizeof(*runs));
        memcpy(op->segs, ch->segs, nsegs * sizeof(*op->segs));
    }
    for (uint32_t k = 0; k < op->nruns; k++)
        lm_mr_ref(op->runs[k].mr);
    return LM_OK;
}

/* After a prepared send ran, or was dropped: its runs' hold on their regions. */
static void drop_runs(lm_chan_deferred_t *op)
{
    for (uint32_t k = 0; k < op->nruns; k++)
        lm_mr_unref(op->runs[k].mr);
    op->nruns = 0;
    free(op->segs);
    op->segs = NULL;
}

/* sources NULL: the payload lies packed in the slot (the stream copies it
 * there); else in those regions, read by the NIC when the op posts. */
static int chan_send_prepare(lm_chan_t *ch, uint32_t layer, uint32_t mb, const lm_chan_tensor_t *t, uint32_t n,
                             lm_mr_t *const *sources, int timeout_ms, uint64_t *seq_out, lm_chan_deferred_t **op_out)
{
    const char *call = sources ? "lm_chan_send_prepare_from" : "lm_chan_send_prepare";
    int rc = check_message(ch, mb, t, n, seq_out);
    if (rc != LM_OK)
        return rc;
    if (!op_out)
        return lm_fail(LM_ERR_INVALID, "%s: NULL argument", call);
    if (sources && (rc = check_sources(ch, t, n, sources)) != LM_OK)
        return rc;
    uint64_t seq = ch->send_seq[mb];
    uint32_t slot = (uint32_t)(seq % ch->slots), idx = mb * ch->slots + slot;
    if ((rc = wait_credit(ch, mb, slot, timeout_ms)) != LM_OK)
        return rc;
    uint64_t hdr_at = send_slot_off(ch, mb, slot), offsets[LM_CHAN_MAX_TENSORS], payload = 0, region_off = 0;
    lm_mr_t *region = NULL, *mrs[LM_CHAN_MAX_TENSORS];
    placement_t how = place(ch, t, n, NULL, sources, hdr_at + LM_CHAN_HEADER_BYTES, offsets, &payload, &region,
                            &region_off, mrs);
    if (!sources && how != FROM_SLOT)
        return lm_fail(LM_ERR_INVALID, "lm_chan_send_prepare: the tensors must lie in micro-batch %u's send slot, "
                       "packed as lm_chan_send_slot's payload (where the stream's copies put them)", mb);
    if (sources && how == STAGED && n > 0 && regions_per_tensor(ch, t, n, sources, mrs))
        how = GATHER; /* short rows too: a copy now would read them before the stream wrote them */
    gather_run_t runs[LM_CHAN_MAX_TENSORS];
    uint32_t nruns = 0;
    if (sources && (how == STAGED || (how == GATHER && !plan_gather(ch, t, n, offsets, mrs, runs, &nruns))))
        return lm_fail(LM_ERR_NO_MEMORY, "lm_chan_send_prepare_from: no memory to plan the gather writes");
    if (payload > ch->send_cap)
        return lm_fail(LM_ERR_INVALID, "message of %llu B exceeds the %llu-byte slot",
                       (unsigned long long)payload, (unsigned long long)ch->send_cap);
    placement_t counted = how;
    how = payload_apart(ch, mb, how, payload, hdr_at + LM_CHAN_HEADER_BYTES, &region, &region_off);
    lm_chan_deferred_t *op = &ch->send_ops[idx];
    *op = (lm_chan_deferred_t){.ch = ch, .kind = DEFERRED_SEND, .mb = mb, .slot = slot, .seq = seq,
                               .hdr_at = hdr_at, .length = LM_CHAN_HEADER_BYTES + (how == FROM_SLOT ? payload : 0),
                               .imm = KIND_DATA << 28 | mb << 16 | slot};
    if (how != FROM_SLOT && (rc = keep_runs(ch, op, how, runs, nruns, region, region_off, payload)) != LM_OK)
        return rc;
    /* Credits are taken when it posts (run_send): held until the stream gets
     * there, they would keep the peer's sender waiting on our device. */
    write_header(ch, hdr_at, t, n, offsets, layer, mb, slot, seq, payload, NULL, 0);
    pthread_mutex_lock(&ch->lock);
    ch->busy[idx] = 1;
    ch->slot_seq[idx] = seq;
    ch->send_seq[mb]++; /* taken now: later sends queue behind this one */
    if (ch->error) /* failed since wait_credit looked: this one will never post */
        release_sent_words_locked(ch);
    ch->unposted[mb]++;
    count_sent_locked(ch, counted, t, n, payload, 0);
    atomic_fetch_add(&ch->refs, 1);
    pthread_mutex_unlock(&ch->lock);
    *seq_out = seq;
    *op_out = op;
    return LM_OK;
}

/* A source region deregistered before the op ran: its write would be
 * dropped, and the header then deliver a stale payload. */
static int runs_registered(const lm_chan_deferred_t *op)
{
    for (uint32_t k = 0; k < op->nruns; k++)
        if (!lm_mr_registered(op->runs[k].mr))
            return lm_fail(LM_ERR_LOCAL, "a source region was deregistered before the send ran");
    return LM_OK;
}

/* The post of a prepared send: the payload's gather writes (from registered
 * regions), then one write of the header (and the payload, from the slot),
 * with the credits held at that moment. Its sequence number is spent, so a
 * failure fails the channel (the peer would wait for it). */
static void run_send(lm_chan_t *ch, lm_chan_deferred_t *slot_op)
{
    /* Everything the post needs is taken out of the slot's op first: once the
     * header is out, the peer may hand the slot back and the application
     * thread prepare its next send into that same op. */
    lm_chan_deferred_t mine = *slot_op, *op = &mine;
    slot_op->nruns = 0;
    slot_op->segs = NULL;
    chan_credit_t credits[LM_CHAN_MAX_PIGGYBACK];
    uint32_t credit_idx[LM_CHAN_MAX_PIGGYBACK];
    uint64_t credit_seq[LM_CHAN_MAX_PIGGYBACK];
    uint32_t ncredits = 0, writes = 1 + op->nruns, posted = 0;
    uint64_t wr_id = 0, remote = peer_recv_slot_off(ch, op->mb, op->slot), at = 0;
    const lm_rdesc_t *dest = payload_dest(ch, op->mb, op->slot, &at);
    pthread_mutex_lock(&ch->post_lock);
    pthread_mutex_lock(&ch->lock);
    int rc = ch->error ? sticky_error_locked(ch) : LM_OK;
    pthread_mutex_unlock(&ch->lock);
    if (rc == LM_OK)
        rc = runs_registered(op);
    if (rc == LM_OK) {
        pthread_mutex_lock(&ch->lock);
        ncredits = take_credits_locked(ch, credits, credit_idx, credit_seq);
        ch->outstanding += writes;
        wr_id = (ch->wr_ids += writes);
        pthread_mutex_unlock(&ch->lock);
    }
    for (uint32_t k = 0; rc == LM_OK && k < op->nruns; k++) {
        const gather_run_t *run = &op->runs[k];
        rc = lm_ep_writev(ch->ep, run->mr, op->segs + run->first, run->count, dest, at + run->remote_off, 0, 0,
                          wr_id - op->nruns + k);
        posted += rc == LM_OK;
    }
    if (rc == LM_OK) { /* header last: its immediate fires after the payload landed */
        put_credits(ch->base + op->hdr_at, credits, ncredits);
        rc = lm_ep_write(ch->ep, ch->mr, op->hdr_at, op->length, &ch->peer, remote, op->imm, LM_WRITE_IMM, wr_id);
        posted += rc == LM_OK;
    }
    pthread_mutex_unlock(&ch->post_lock);
    drop_runs(op);
    pthread_mutex_lock(&ch->lock);
    if (rc == LM_OK) {
        if (wr_id > ch->last_send_wr) /* a send of another thread may have posted after us and set it */
            ch->last_send_wr = wr_id;
        mark_sent_locked(ch, op->mb, wr_id, op->seq);
        ch->st.credits_piggybacked += ncredits;
        ch->st.credits_returned += ncredits;
    } else {
        if (wr_id)
            ch->outstanding -= writes - posted;
        requeue_credits_locked(ch, credit_idx, credit_seq, ncredits);
        fail_locked(ch, rc, "a stream-ordered send (micro-batch %u, seq %llu) could not be posted: %s", op->mb,
                    (unsigned long long)op->seq, lm_status_str(rc));
    }
    ch->unposted[op->mb]--;
    pthread_cond_broadcast(&ch->posted);
    pthread_mutex_unlock(&ch->lock);
    if (rc != LM_OK)
        notify(ch);
}

/* A deferred release writes its credit at once, in either credit mode: held
 * for a piggyback, it would wait for a send that may not come while the
 * application thread sleeps in a receive. */
static void run_release(lm_chan_t *ch, lm_chan_deferred_t *op)
{
    int rc = write_credit(ch, op->mb, op->slot, op->seq);
    if (rc != LM_OK) {
        pthread_mutex_lock(&ch->lock);
        fail_locked(ch, rc, "a stream-ordered release (micro-batch %u, slot %u) could not return its credit: %s",
                    op->mb, op->slot, lm_status_str(rc));
        pthread_mutex_unlock(&ch->lock);
        notify(ch);
    }
}

int lm_chan_send_prepare(lm_chan_t *ch, uint32_t layer, uint32_t mb, const lm_chan_tensor_t *tensors, uint32_t n,
                         int timeout_ms, uint64_t *seq, lm_chan_deferred_t **op)
{
    if (!chan_enter(ch))
        return closed_error("lm_chan_send_prepare");
    int rc = chan_send_prepare(ch, layer, mb, tensors, n, NULL, timeout_ms, seq, op);
    chan_leave(ch);
    return rc;
}

int lm_chan_send_prepare_from(lm_chan_t *ch, uint32_t layer, uint32_t mb, const lm_chan_tensor_t *tensors,
                              uint32_t n, lm_mr_t *const *sources, int timeout_ms, uint64_t *seq,
                              lm_chan_deferred_t **op)
{
    if (!chan_enter(ch))
        return closed_error("lm_chan_send_prepare_from");
    int rc = sources ? chan_send_prepare(ch, layer, mb, tensors, n, sources, timeout_ms, seq, op)
                     : lm_fail(LM_ERR_INVALID, "lm_chan_send_prepare_from: no sources");
    chan_leave(ch);
    return rc;
}

int lm_chan_release_prepare(lm_chan_t *ch, uint32_t mb, uint32_t slot, uint64_t seq, lm_chan_deferred_t **op)
{
    if (!chan_enter(ch))
        return closed_error("lm_chan_release_prepare");
    int rc = LM_OK;
    if (!ch || mb >= ch->mbs || slot >= ch->slots || !op) {
        rc = lm_fail(LM_ERR_INVALID, "lm_chan_release_prepare: no such slot");
    } else {
        lm_chan_deferred_t *r = &ch->release_ops[mb * ch->slots + slot];
        *r = (lm_chan_deferred_t){.ch = ch, .kind = DEFERRED_RELEASE, .mb = mb, .slot = slot, .seq = seq};
        atomic_fetch_add(&ch->refs, 1);
        *op = r;
    }
    chan_leave(ch);
    return rc;
}

/* Closed: nothing goes out any more, but the micro-batch's count still drops. */
static void drop_send(lm_chan_t *ch, lm_chan_deferred_t *op)
{
    drop_runs(op);
    pthread_mutex_lock(&ch->lock);
    ch->unposted[op->mb]--;
    pthread_cond_broadcast(&ch->posted);
    pthread_mutex_unlock(&ch->lock);
}

void lm_chan_run_deferred(void *arg)
{
    lm_chan_deferred_t *op = arg;
    lm_chan_t *ch = op->ch;
    if (chan_enter(ch)) {
        if (op->kind == DEFERRED_SEND)
            run_send(ch, op);
        else
            run_release(ch, op);
        chan_leave(ch);
    } else if (op->kind == DEFERRED_SEND) {
        drop_send(ch, op);
    }
    chan_unref(ch); /* last: this may free the channel */
}

void lm_chan_cancel_deferred(void *arg, int status)
{
    lm_chan_deferred_t *op = arg;
    lm_chan_t *ch = op->ch;
    if (chan_enter(ch)) {
        pthread_mutex_lock(&ch->lock);
        fail_locked(ch, status < 0 ? status : LM_ERR_CANCELED,
                    "a stream-ordered %s (micro-batch %u) was canceled: its stream failed",
                    op->kind == DEFERRED_SEND ? "send" : "release", op->mb);
        pthread_mutex_unlock(&ch->lock);
        notify(ch);
        chan_leave(ch);
    }
    if (op->kind == DEFERRED_SEND)
        drop_send(ch, op);
    chan_unref(ch);
}

int lm_chan_set_sent_words(lm_chan_t *ch, uint32_t *words)
{
    if (!chan_enter(ch))
        return closed_error("lm_chan_set_sent_words");
    int rc = LM_OK;
    pthread_mutex_lock(&ch->lock);
    if (!ch->sent_marks)
        ch->sent_marks = calloc((size_t)ch->mbs * SENT_MARKS, sizeof(*ch->sent_marks));
    if (!ch->sent_first)
        ch->sent_first = calloc(ch->mbs, 1);
    if (!ch->sent_count)
        ch->sent_count = calloc(ch->mbs, 1);
    if (!ch->sent_marks || !ch->sent_first || !ch->sent_count) {
        rc = lm_fail(LM_ERR_NO_MEMORY, "lm_chan_set_sent_words: no memory for the marks");
    } else {
        ch->sent_words = words;
        for (uint32_t mb = 0; words && mb < ch->mbs; mb++) {
            /* What is already out is not waited for (a plain store: the memory held anything). */
            __atomic_store_n(&words[mb], (uint32_t)ch->send_seq[mb], __ATOMIC_RELEASE);
            ch->sent_count[mb] = 0;
        }
    }
    pthread_mutex_unlock(&ch->lock);
    chan_leave(ch);
    return rc;
}

uint32_t lm_chan_unposted(lm_chan_t *ch, uint32_t mb)
{
    if (!ch || mb >= ch->mbs)
        return 0;
    pthread_mutex_lock(&ch->lock);
    uint32_t n = ch->unposted[mb];
    pthread_mutex_unlock(&ch->lock);
    return n;
}

/* ---- receiving ------------------------------------------------------------- */

static int mul_ok(uint64_t a, uint64_t b, uint64_t *out)
{
    return !__builtin_mul_overflow(a, b, out);
}

/* Parse and check a landed slot; any error hands the slot back (the caller). */
static int open_locked(lm_chan_t *ch, uint32_t mb, uint32_t slot, lm_chan_msg_t *out, uint64_t *seq_seen)
{
    uint64_t at = recv_slot_off(ch, mb, slot);
    const uint8_t *h = ch->base + at;
    chan_hdr_t hdr;
    memcpy(&hdr, h, sizeof(hdr));
    *seq_seen = hdr.seq;
    if (hdr.magic != CHAN_MAGIC || hdr.version != LM_CHAN_WIRE_VERSION)
        return lm_fail(LM_ERR_PROTOCOL, "bad header in micro-batch %u slot %u (magic 0x%08x, version %u)", mb, slot,
                       hdr.magic, hdr.version);
    if (hdr.microbatch != mb || hdr.slot != slot)
        return lm_fail(LM_ERR_PROTOCOL, "header names micro-batch %u slot %u, the immediate micro-batch %u slot %u",
                       hdr.microbatch, hdr.slot, mb, slot);
    if (hdr.ntensors > LM_CHAN_MAX_TENSORS || hdr.payload_bytes > ch->recv_cap)
        return lm_fail(LM_ERR_PROTOCOL, "header claims %u tensors, %llu B", hdr.ntensors,
                       (unsigned long long)hdr.payload_bytes);
    uint64_t expected = ch->recv_seq[mb];
    if (hdr.seq != expected)
        return lm_fail(LM_ERR_SEQUENCE, "micro-batch %u got seq %llu, expected %llu: %s", mb,
                       (unsigned long long)hdr.seq, (unsigned long long)expected,
                       hdr.seq < expected ? "duplicate or reordered" : "gap (lost or reordered)");
    if (slot != hdr.seq % ch->slots)
        return lm_fail(LM_ERR_PROTOCOL, "seq %llu arrived in slot %u", (unsigned long long)hdr.seq, slot);
    for (uint32_t i = 0; i < hdr.ntensors; i++) {
        chan_entry_t e;
        memcpy(&e, h + ENTRIES_AT + i * sizeof(e), sizeof(e));
        if (e.dtype == 0 || e.dtype >= sizeof(itemsize_of) || e.ndim > LM_CHAN_MAX_NDIM)
            return lm_fail(LM_ERR_PROTOCOL, "tensor %u has dtype code %u, ndim %u", i, e.dtype, e.ndim);
        /* An empty tensor must still have a shape that fits: (0, 2^31, 2^31) is none. */
        uint64_t nbytes = itemsize_of[e.dtype], extent = itemsize_of[e.dtype];
        bool ok = true;
        for (uint32_t d = 0; d < e.ndim; d++) {
            ok = ok && mul_ok(nbytes, e.shape[d], &nbytes) && mul_ok(extent, e.shape[d] ? e.shape[d] : 1, &extent);
            out->tensors[i].shape[d] = e.shape[d];
        }
        if (!ok || e.offset > ch->recv_cap || nbytes > ch->recv_cap - e.offset || extent > ch->recv_cap)
            return lm_fail(LM_ERR_PROTOCOL, "tensor %u (%u dimensions, %llu B at %llu) overruns the slot", i, e.ndim,
                           (unsigned long long)nbytes, (unsigned long long)e.offset);
        for (uint32_t d = e.ndim; d < LM_CHAN_MAX_NDIM; d++)
            out->tensors[i].shape[d] = 0; /* the entry is a byte-exact layout key (Python's view cache) */
        /* An offset in our region, or in the payload region when split. */
        out->tensors[i].addr = (mb < ch->split_in_mbs ? ((uint64_t)mb * ch->slots + slot) * ch->recv_cap
                                             : at + LM_CHAN_HEADER_BYTES) + e.offset;
        out->tensors[i].nbytes = nbytes;
        out->tensors[i].dtype = e.dtype;
        out->tensors[i].ndim = e.ndim;
    }
    out->seq = hdr.seq;
    out->layer = hdr.layer;
    out->microbatch = mb;
    out->slot = slot;
    out->ntensors = hdr.ntensors;
    out->payload_bytes = hdr.payload_bytes;
    ch->recv_seq[mb]++;
    ch->st.messages_received++;
    ch->st.bytes_received += LM_CHAN_HEADER_BYTES + hdr.payload_bytes;
    return LM_OK;
}

/* Take the first arrival of mb (any when mb < 0) off the queue: 1, or 0. */
static int take_arrival_locked(lm_chan_t *ch, int32_t mb, uint32_t *taken, uint64_t *when)
{
    for (size_t i = 0; i < ch->arr_count; i++) {
        uint32_t a = ch->arrived[(ch->arr_head + i) % ch->ring];
        if (mb >= 0 && (a >> 16) != (uint32_t)mb)
            continue;
        *when = ch->arrived_ns[(ch->arr_head + i) % ch->ring];
        for (size_t j = i; j > 0; j--) { /* keep the others in arrival order */
            size_t to = (ch->arr_head + j) % ch->ring, from = (ch->arr_head + j - 1) % ch->ring;
            ch->arrived[to] = ch->arrived[from];
            ch->arrived_ns[to] = ch->arrived_ns[from];
        }
        ch->arr_head = (ch->arr_head + 1) % ch->ring;
        ch->arr_count--;
        *taken = a;
        return 1;
    }
    return 0;
}

static int chan_recv(lm_chan_t *ch, int32_t mb, lm_chan_msg_t *out, int timeout_ms)
{
    if (!ch || !out || mb >= (int32_t)ch->mbs)
        return lm_fail(LM_ERR_INVALID, "lm_chan_recv: bad micro-batch or NULL argument");
    uint64_t deadline = deadline_of(timeout_ms);
    for (int round = 0;; round++) {
        pthread_mutex_lock(&ch->lock);
        start_locked(ch);
        uint32_t a;
        uint64_t when = 0;
        if (take_arrival_locked(ch, mb, &a, &when)) {
            uint64_t seq = 0;
            int rc = open_locked(ch, a >> 16, a & 0xFFFF, out, &seq);
            out->arrived_ns = when;
            pthread_mutex_unlock(&ch->lock);
            if (rc != LM_OK) {
                char why[256];
                snprintf(why, sizeof(why), "%s", lm_last_error());
                lm_chan_release(ch, a >> 16, a & 0xFFFF, seq); /* the sender gets its slot back */
                return lm_fail(rc, "%s", why);
            }
            return 1;
        }
        if (ch->error) {
            int rc = sticky_error_locked(ch);
            pthread_mutex_unlock(&ch->lock);
            return rc;
        }
        pthread_mutex_unlock(&ch->lock);
        int rc = wait_round(ch, round, deadline);
        if (rc == LM_ERR_TIMEOUT)
            return 0;
        if (rc != LM_OK)
            return rc;
    }
}

static int chan_flush(lm_chan_t *ch, int timeout_ms)
{
    if (!ch)
        return lm_fail(LM_ERR_INVALID, "lm_chan_flush: NULL channel");
    int rc = write_held_credits(ch);
    if (rc != LM_OK)
        return rc;
    uint64_t deadline = deadline_of(timeout_ms);
    for (;;) {
        pthread_mutex_lock(&ch->lock);
        start_locked(ch);
        uint64_t left = ch->outstanding;
        /* A failed channel says so even with nothing left: a write that failed is not "flushed". */
        rc = ch->error ? sticky_error_locked(ch) : left == 0 ? LM_OK : 1;
        pthread_mutex_unlock(&ch->lock);
        if (rc <= 0)
            return rc;
        if (wait_step(ch, deadline) != LM_OK)
            return lm_fail(LM_ERR_TIMEOUT, "%llu writes still outstanding after %d ms", (unsigned long long)left,
                           timeout_ms);
    }
}

static int chan_wait_sent(lm_chan_t *ch, uint64_t token, int timeout_ms)
{
    if (!ch)
        return lm_fail(LM_ERR_INVALID, "lm_chan_wait_sent: NULL channel");
    uint64_t deadline = deadline_of(timeout_ms);
    for (;;) {
        lm_progress_drive(ch->ctx, 0);
        pthread_mutex_lock(&ch->lock);
        start_locked(ch);
        uint64_t done = ch->writes_done;
        /* An error first: a failed write also advances writes_done. */
        int rc = ch->error ? sticky_error_locked(ch) : done >= token ? LM_OK : 1;
        pthread_mutex_unlock(&ch->lock);
        if (rc <= 0)
            return rc;
        if (timeout_ms == 0 || wait_step(ch, deadline) != LM_OK)
            return lm_fail(LM_ERR_TIMEOUT, "writes up to %llu not completed (done: %llu) after %d ms",
                           (unsigned long long)token, (unsigned long long)done, timeout_ms);
    }
}

/* ---- small queries ----------------------------------------------------------- */

static int chan_progress(lm_chan_t *ch)
{
    if (!ch)
        return lm_fail(LM_ERR_INVALID, "lm_chan_progress: NULL channel");
    lm_progress_drive(ch->ctx, 0);
    pthread_mutex_lock(&ch->lock);
    start_locked(ch);
    pthread_mutex_unlock(&ch->lock);
    /* Its callers may sleep next (asyncio): the peer may wait for our credits. */
    return write_held_credits(ch);
}

static int chan_slot_free(lm_chan_t *ch, uint32_t mb)
{
    if (!ch || mb >= ch->mbs)
        return lm_fail(LM_ERR_INVALID, "lm_chan_slot_free: bad micro-batch");
    pthread_mutex_lock(&ch->lock);
    int free_ = !ch->busy[mb * ch->slots + ch->send_seq[mb] % ch->slots];
    pthread_mutex_unlock(&ch->lock);
    return free_;
}

static int chan_pending(lm_chan_t *ch, int32_t mb)
{
    if (!ch)
        return lm_fail(LM_ERR_INVALID, "lm_chan_pending: NULL channel");
    pthread_mutex_lock(&ch->lock);
    start_locked(ch);
    int n = 0;
    for (size_t i = 0; i < ch->arr_count; i++)
        n += mb < 0 || (ch->arrived[(ch->arr_head + i) % ch->ring] >> 16) == (uint32_t)mb;
    pthread_mutex_unlock(&ch->lock);
    return n;
}

int lm_chan_error(lm_chan_t *ch)
{
    if (!ch)
        return LM_ERR_INVALID;
    pthread_mutex_lock(&ch->lock);
    int rc = ch->error ? sticky_error_locked(ch) : LM_OK;
    pthread_mutex_unlock(&ch->lock);
    return rc;
}

void lm_chan_stats(lm_chan_t *ch, lm_chan_stats_t *out)
{
    if (!ch || !out)
        return;
    pthread_mutex_lock(&ch->lock);
    *out = ch->st;
    out->outstanding = ch->outstanding;
    pthread_mutex_unlock(&ch->lock);
}

static int chan_fd(lm_chan_t *ch)
{
    if (!ch)
        return lm_fail(LM_ERR_INVALID, "lm_chan_fd: NULL channel");
    pthread_mutex_lock(&ch->lock);
    if (ch->event_fd < 0)
        ch->event_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    int fd = ch->event_fd;
    pthread_mutex_unlock(&ch->lock);
    if (fd < 0)
        return lm_fail(LM_ERR_IO, "eventfd failed");
    atomic_store(&ch->fd_wanted, true);
    return fd;
}

static int chan_inject_imm(lm_chan_t *ch, uint32_t imm)
{
    if (!ch)
        return lm_fail(LM_ERR_INVALID, "lm_chan_inject_imm: NULL channel");
    /* Not started here: completions held since lm_chan_create are newer than
     * what a caller injects right after it (lm_chan_progress starts). */
    pthread_mutex_lock(&ch->lock);
    if (!ch->error)
        on_imm_locked(ch, imm);
    int rc = ch->error;
    pthread_mutex_unlock(&ch->lock);
    return rc;
}

static int chan_test_state(lm_chan_t *ch, uint64_t recv_seq, uint64_t slot_seq)
{
    if (!ch)
        return lm_fail(LM_ERR_INVALID, "lm_chan_test_state: NULL channel");
    pthread_mutex_lock(&ch->lock);
    for (uint32_t mb = 0; mb < ch->mbs; mb++)
        ch->recv_seq[mb] = recv_seq;
    for (uint32_t i = 0; i < ch->ring; i++) {
        ch->busy[i] = 1;
        ch->slot_seq[i] = slot_seq;
    }
    pthread_mutex_unlock(&ch->lock);
    return LM_OK;
}

/* ---- groups -------------------------------------------------------------------- */

static int chan_send_group(lm_chan_t **chans, uint32_t n, uint32_t layer, uint32_t mb, const lm_chan_tensor_t *tensors,
                       const uint32_t *counts, lm_mr_t *source, int timeout_ms, uint64_t *seqs, int32_t *failed)
{
    if (!chans || !counts || !seqs || !failed)
        return lm_fail(LM_ERR_INVALID, "lm_chan_send_group: NULL argument");
    *failed = -1;
    uint64_t deadline = deadline_of(timeout_ms);
    const lm_chan_tensor_t *next = tensors;
    for (uint32_t i = 0; i < n; i++) {
        uint64_t now = lm_now_ns();
        int left_ms = timeout_ms < 0 ? -1 : now >= deadline ? 0 : (int)((deadline - now) / 1000000);
        int rc = lm_chan_send(chans[i], layer, mb, next, counts[i], source, 0, left_ms, &seqs[i]);
        if (rc != LM_OK) {
            *failed = (int32_t)i;
            return rc;
        }
        next += counts[i];
    }
    return LM_OK;
}

static int chan_recv_group(lm_chan_t **chans, uint32_t n, int32_t mb, lm_chan_msg_t *out, int timeout_ms,
                       uint32_t *taken, int32_t *failed)
{
    if (!chans || !out || !taken || !failed || n == 0)
        return lm_fail(LM_ERR_INVALID, "lm_chan_recv_group: bad arguments");
    *taken = 0;
    *failed = -1;
    uint64_t deadline = deadline_of(timeout_ms);
    for (int round = 0;; round++) {
        /* Take only once every channel has one, so a timeout takes nothing. */
        uint32_t ready = 0;
        for (uint32_t i = 0; i < n; i++) {
            int pending = lm_chan_pending(chans[i], mb);
            int err = lm_chan_error(chans[i]);
            if (pending <= 0 && err != LM_OK) {
                *failed = (int32_t)i;
                return err;
            }
            ready += pending > 0;
        }
        if (ready == n) {
            for (uint32_t i = 0; i < n; i++) {
                int rc = lm_chan_recv(chans[i], mb, &out[i], 0);
                if (rc <= 0)
                    *failed = (int32_t)i;
                if (rc < 0)
                    return rc;
                if (rc == 0) /* taken meanwhile: impossible with one application thread */
                    return lm_fail(LM_ERR_INVALID, "lm_chan_recv_group: a channel lost its arrival");
                (*taken)++;
            }
            return (int)n;
        }
        if (round == 0) {
            lm_progress_drive(chans[0]->ctx, 0);
            continue;
        }
        if (round == 1)
            for (uint32_t i = 0; i < n; i++) {
                int rc = write_held_credits(chans[i]);
                if (rc != LM_OK) {
                    *failed = (int32_t)i;
                    return rc;
                }
            }
        for (uint32_t i = 0; i < n; i++) {
            pthread_mutex_lock(&chans[i]->lock);
            check_endpoint_locked(chans[i]);
            pthread_mutex_unlock(&chans[i]->lock);
        }
        /* Channels of one context share its progress engine; others are driven
         * without waiting so none starves while we sleep on the first. */
        bool mixed = false;
        for (uint32_t i = 1; i < n; i++)
            if (chans[i]->ctx != chans[0]->ctx) {
                mixed = true;
                lm_progress_drive(chans[i]->ctx, 0);
            }
        /* Asleep on the first context, we would not hear another's arrivals:
         * with several contexts, sleep 1 ms at a time. */
        uint64_t now = lm_now_ns();
        uint64_t until = mixed && deadline - now > 1000000ull ? now + 1000000ull : deadline;
        if (wait_step(chans[0], until) != LM_OK && until == deadline)
            return 0;
    }
}

/* When the oldest arrival of mb (any when mb < 0) was dispatched: 1, or 0 if none. */
static int oldest_arrival_locked(const lm_chan_t *ch, int32_t mb, uint64_t *when)
{
    for (size_t i = 0; i < ch->arr_count; i++) {
        size_t at = (ch->arr_head + i) % ch->ring;
        if (mb < 0 || (ch->arrived[at] >> 16) == (uint32_t)mb) {
            *when = ch->arrived_ns[at];
            return 1;
        }
    }
    return 0;
}

/* One attention worker serving several model nodes: the oldest arrival over
 * all channels, so requests are served in the order they came whichever
 * channel carried them (the schedule's no-deadlock argument needs it). */
static int chan_recv_any(lm_chan_t **chans, uint32_t n, int32_t mb, lm_chan_msg_t *out, int timeout_ms,
                         int32_t *index)
{
    if (!chans || !out || !index || n == 0)
        return lm_fail(LM_ERR_INVALID, "lm_chan_recv_any: bad arguments");
    *index = -1;
    for (uint32_t i = 0; i < n; i++)
        if (!chans[i] || mb >= (int32_t)chans[i]->mbs)
            return lm_fail(LM_ERR_INVALID, "lm_chan_recv_any: bad micro-batch or NULL channel");
    uint64_t deadline = deadline_of(timeout_ms);
    for (int round = 0;; round++) {
        int32_t best = -1;
        uint64_t best_ns = UINT64_MAX;
        for (uint32_t i = 0; i < n; i++) {
            lm_chan_t *ch = chans[i];
            uint64_t when;
            pthread_mutex_lock(&ch->lock);
            start_locked(ch);
            int pending = oldest_arrival_locked(ch, mb, &when);
            int err = ch->error ? sticky_error_locked(ch) : LM_OK;
            pthread_mutex_unlock(&ch->lock);
            if (pending && when < best_ns) {
                best = (int32_t)i;
                best_ns = when;
            } else if (!pending && err != LM_OK) {
                *index = (int32_t)i; /* a failed channel is reported, not skipped for ever */
                return err;
            }
        }
        if (best >= 0) {
            *index = best;
            int rc = chan_recv(chans[best], mb, out, 0);
            if (rc != 0)
                return rc;
            continue; /* taken meanwhile: impossible with one application thread */
        }
        if (round == 0) {
            lm_progress_drive(chans[0]->ctx, 0);
            continue;
        }
        if (round == 1)
            for (uint32_t i = 0; i < n; i++) {
                int rc = write_held_credits(chans[i]);
                if (rc != LM_OK) {
                    *index = (int32_t)i;
                    return rc;
                }
            }
        bool mixed = false;
        for (uint32_t i = 0; i < n; i++) {
            pthread_mutex_lock(&chans[i]->lock);
            check_endpoint_locked(chans[i]);
            pthread_mutex_unlock(&chans[i]->lock);
            if (chans[i]->ctx != chans[0]->ctx) {
                mixed = true;
                lm_progress_drive(chans[i]->ctx, 0);
            }
        }
        uint64_t now = lm_now_ns();
        uint64_t until = mixed && deadline - now > 1000000ull ? now + 1000000ull : deadline;
        if (wait_step(chans[0], until) != LM_OK && until == deadline)
            return 0;
    }
}

/* ---- the public calls: counted in, refused once closed ------------------------ */

int lm_chan_release(lm_chan_t *ch, uint32_t mb, uint32_t slot, uint64_t seq)
{
    if (!chan_enter(ch))
        return closed_error("lm_chan_release");
    int rc = chan_release(ch, mb, slot, seq);
    chan_leave(ch);
    return rc;
}

int lm_chan_send_slot(lm_chan_t *ch, uint32_t mb, int timeout_ms, uint64_t *payload_offset)
{
    if (!chan_enter(ch))
        return closed_error("lm_chan_send_slot");
    int rc = chan_send_slot(ch, mb, timeout_ms, payload_offset);
    chan_leave(ch);
    return rc;
}

int lm_chan_recv(lm_chan_t *ch, int32_t mb, lm_chan_msg_t *out, int timeout_ms)
{
    if (!chan_enter(ch))
        return closed_error("lm_chan_recv");
    int rc = chan_recv(ch, mb, out, timeout_ms);
    chan_leave(ch);
    return rc;
}

int lm_chan_flush(lm_chan_t *ch, int timeout_ms)
{
    if (!chan_enter(ch))
        return closed_error("lm_chan_flush");
    int rc = chan_flush(ch, timeout_ms);
    chan_leave(ch);
    return rc;
}

uint64_t lm_chan_send_token(lm_chan_t *ch)
{
    if (!ch || !chan_enter(ch))
        return 0;
    pthread_mutex_lock(&ch->lock);
    uint64_t token = ch->last_send_wr;
    pthread_mutex_unlock(&ch->lock);
    chan_leave(ch);
    return token;
}

int lm_chan_wait_sent(lm_chan_t *ch, uint64_t token, int timeout_ms)
{
    if (!chan_enter(ch))
        return closed_error("lm_chan_wait_sent");
    int rc = chan_wait_sent(ch, token, timeout_ms);
    chan_leave(ch);
    return rc;
}

int lm_chan_progress(lm_chan_t *ch)
{
    if (!chan_enter(ch))
        return closed_error("lm_chan_progress");
    int rc = chan_progress(ch);
    chan_leave(ch);
    return rc;
}

int lm_chan_slot_free(lm_chan_t *ch, uint32_t mb)
{
    if (!chan_enter(ch))
        return closed_error("lm_chan_slot_free");
    int rc = chan_slot_free(ch, mb);
    chan_leave(ch);
    return rc;
}

int lm_chan_pending(lm_chan_t *ch, int32_t mb)
{
    if (!chan_enter(ch))
        return closed_error("lm_chan_pending");
    int rc = chan_pending(ch, mb);
    chan_leave(ch);
    return rc;
}

int lm_chan_fd(lm_chan_t *ch)
{
    if (!chan_enter(ch))
        return closed_error("lm_chan_fd");
    int rc = chan_fd(ch);
    chan_leave(ch);
    return rc;
}

int lm_chan_inject_imm(lm_chan_t *ch, uint32_t imm)
{
    if (!chan_enter(ch))
        return closed_error("lm_chan_inject_imm");
    int rc = chan_inject_imm(ch, imm);
    chan_leave(ch);
    return rc;
}

int lm_chan_test_state(lm_chan_t *ch, uint64_t recv_seq, uint64_t slot_seq)
{
    if (!chan_enter(ch))
        return closed_error("lm_chan_test_state");
    int rc = chan_test_state(ch, recv_seq, slot_seq);
    chan_leave(ch);
    return rc;
}

int lm_chan_send(lm_chan_t *ch, uint32_t layer, uint32_t mb, const lm_chan_tensor_t *t, uint32_t n, lm_mr_t *source,
                 uint32_t flags, int timeout_ms, uint64_t *seq_inout)
{
    if (!chan_enter(ch))
        return closed_error("lm_chan_send");
    int rc = chan_send(ch, layer, mb, t, n, source, NULL, flags, timeout_ms, seq_inout);
    chan_leave(ch);
    return rc;
}

int lm_chan_send_from(lm_chan_t *ch, uint32_t layer, uint32_t mb, const lm_chan_tensor_t *t, uint32_t n,
                      lm_mr_t *const *sources, int timeout_ms, uint64_t *seq)
{
    if (!chan_enter(ch))
        return closed_error("lm_chan_send_from");
    int rc = sources ? chan_send(ch, layer, mb, t, n, NULL, sources, 0, timeout_ms, seq)
                     : lm_fail(LM_ERR_INVALID, "lm_chan_send_from: no sources");
    chan_leave(ch);
    return rc;
}

/* Every channel of a group is counted in for the whole call. */
static bool enter_all(lm_chan_t **chans, uint32_t n, int32_t *failed)
{
    for (uint32_t i = 0; i < n; i++)
        if (!chan_enter(chans[i])) {
            *failed = (int32_t)i;
            while (i-- > 0)
                chan_leave(chans[i]);
            return false;
        }
    return true;
}

static void leave_all(lm_chan_t **chans, uint32_t n)
{
    for (uint32_t i = 0; i < n; i++)
        chan_leave(chans[i]);
}

int lm_chan_send_group(lm_chan_t **chans, uint32_t n, uint32_t layer, uint32_t mb, const lm_chan_tensor_t *tensors,
                       const uint32_t *counts, lm_mr_t *source, int timeout_ms, uint64_t *seqs, int32_t *failed)
{
    if (!chans || !failed)
        return lm_fail(LM_ERR_INVALID, "lm_chan_send_group: NULL argument");
    if (!enter_all(chans, n, failed)) {
        /* Nothing was posted: *failed >= 0 would say channels [0, *failed) were. */
        *failed = -1;
        return closed_error("lm_chan_send_group");
    }
    int rc = chan_send_group(chans, n, layer, mb, tensors, counts, source, timeout_ms, seqs, failed);
    leave_all(chans, n);
    return rc;
}

int lm_chan_recv_group(lm_chan_t **chans, uint32_t n, int32_t mb, lm_chan_msg_t *out, int timeout_ms,
                       uint32_t *taken, int32_t *failed)
{
    if (!chans || !failed || !taken)
        return lm_fail(LM_ERR_INVALID, "lm_chan_recv_group: bad arguments");
    *taken = 0; /* the caller hands back what a failed call took: nothing, here */
    if (!enter_all(chans, n, failed))
        return closed_error("lm_chan_recv_group");
    int rc = chan_recv_group(chans, n, mb, out, timeout_ms, taken, failed);
    leave_all(chans, n);
    return rc;
}

int lm_chan_recv_any(lm_chan_t **chans, uint32_t n, int32_t mb, lm_chan_msg_t *out, int timeout_ms, int32_t *index)
{
    if (!chans || !index)
        return lm_fail(LM_ERR_INVALID, "lm_chan_recv_any: bad arguments");
    if (!enter_all(chans, n, index))
        return closed_error("lm_chan_recv_any");
    int rc = chan_recv_any(chans, n, mb, out, timeout_ms, index);
    leave_all(chans, n);
    return rc;
}
