/* tcp_rx.c - the receive side, run on the progress thread: parse a header,
 * check it against the registry, then receive the payload straight into the
 * target region (or discard it when the target refuses). */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>

#include "tcp.h"

#define RX_WOULD_BLOCK 1

static uint64_t min_u64(uint64_t a, uint64_t b) { return a < b ? a : b; }

/* ---- acknowledgements (caller holds ep->lock) ------------------------- */

/* An answer (NACK / READ_RESP) is about to be queued for the peer: count it,
 * and stop receiving once LM_TCP_MAX_QUEUED_REPLIES wait unsent, so a peer
 * that never reads cannot grow our send queue (tcp_tx.c resumes). */
static void count_reply_locked(lm_tcp_ep_t *ep)
{
    if (++ep->replies_queued < LM_TCP_MAX_QUEUED_REPLIES || atomic_load(&ep->rx_backlogged))
        return;
    atomic_store(&ep->rx_backlogged, true);
    ep->in_armed = false;
    lm_tcp_update_interest(ep);
}

static lm_tcp_tx_t *new_control(lm_tcp_ep_t *ep, uint8_t type, uint64_t seq, int32_t status)
{
    lm_tcp_tx_t *tx = lm_tcp_tx_alloc(ep);
    if (!tx) {
        lm_tcp_fail_locked(ep, LM_ERR_NO_MEMORY);
        return NULL;
    }
    tx->hdr.type = type;
    tx->hdr.seq = seq;
    tx->hdr.status = status;
    return tx;
}

static void queue_nack(lm_tcp_ep_t *ep, uint64_t seq, int32_t status)
{
    lm_tcp_tx_t *tx = new_control(ep, LM_TCP_NACK, seq, status);
    if (!tx)
        return;
    count_reply_locked(ep);
    if (ep->nacks_unsent++ == 0)
        ep->nack_floor = seq; /* acknowledgements stay below it until it left */
    lm_tcp_tx_queue(ep, tx);
}

/* Send a bare ACK if reverse traffic has not carried the acknowledgement. One
 * that waits unsent is stamped when it leaves, so it is never doubled: a peer
 * that does not read gets at most one bare ACK queued. */
void lm_tcp_ack_now_locked(lm_tcp_ep_t *ep)
{
    bool waiting = ep->bare_ack && ep->bare_ack->sent == 0;
    if (ep->rx_accepted > ep->rx_acked && !waiting) {
        lm_tcp_tx_t *tx = new_control(ep, LM_TCP_ACK, 0, LM_OK);
        if (tx) {
            ep->bare_ack = tx; /* before queueing: a send may release it at once */
            lm_tcp_tx_queue(ep, tx);
        }
    }
    ep->rx_unacked_bytes = 0;
}

static void ack_timer_fired(void *arg)
{
    lm_tcp_ep_t *ep = arg;
    pthread_mutex_lock(&ep->lock);
    if (!ep->closed)
        lm_tcp_ack_now_locked(ep);
    pthread_mutex_unlock(&ep->lock);
}

void lm_tcp_ack_timer_init(lm_tcp_ep_t *ep)
{
    ep->ack_timer.cb = ack_timer_fired;
    ep->ack_timer.arg = ep;
    atomic_init(&ep->ack_timer.armed, false);
}

/* After a receive batch: acknowledge now if the sender's window needs it,
 * else give reverse traffic a moment to carry the acknowledgement. */
static void schedule_ack_locked(lm_tcp_ep_t *ep)
{
    if (ep->rx_accepted <= ep->rx_acked)
        return;
    if (ep->rx_accepted - ep->rx_acked >= LM_TCP_ACK_FRAMES || ep->rx_unacked_bytes >= LM_TCP_ACK_BYTES)
        lm_tcp_ack_now_locked(ep);
    else
        lm_timer_arm(ep->base.ctx, &ep->ack_timer, LM_TCP_ACK_DELAY_NS);
}

static void push_target_completion(lm_tcp_ep_t *ep, uint32_t opcode, int status, const lm_tcp_hdr_t *h)
{
    bool imm = h->type == LM_TCP_WRITE && (h->flags & LM_TCP_FLAG_IMM);
    lm_completion_t c = {.ep_id = ep->base.id, .status = status, .opcode = opcode,
                         .byte_len = status == LM_OK ? h->length : 0,
                         .imm = imm ? h->imm : 0, .flags = imm ? LM_CF_IMM : 0};
    lm_ep_push(&ep->base, &c);
}

/* ---- initiator: answers to our operations ------------------------------ */

static void complete_writes_before(lm_tcp_ep_t *ep, uint64_t seq_limit)
{
    while (ep->pend_head && ep->pend_head->type == LM_TCP_WRITE && ep->pend_head->seq < seq_limit) {
        lm_tcp_pending_t *op = ep->pend_head;
        ep->pend_head = op->next;
        if (!ep->pend_head)
            ep->pend_tail = NULL;
        lm_ep_complete(&ep->base, LM_OP_WRITE, op->wr_id, op->forced_status ? op->forced_status : LM_OK,
                       op->length);
        lm_tcp_pending_free(ep, op);
    }
}

/* The target's status arrives over the wire: only accept the refusals it may
 * legitimately send, so a hostile peer cannot fake "success" or odd codes. */
static int32_t remote_status(int32_t s)
{
    switch (s) {
    case LM_ERR_NO_KEY:
    case LM_ERR_OUT_OF_BOUNDS:
    case LM_ERR_ACCESS:
        return s;
    default:
        return LM_ERR_REMOTE;
    }
}

static lm_tcp_pending_t *pop_expected(lm_tcp_ep_t *ep, uint8_t type, uint64_t seq)
{
    lm_tcp_pending_t *op = ep->pend_head;
    if (!op || op->type != type || op->seq != seq)
        return NULL;
    ep->pend_head = op->next;
    if (!ep->pend_head)
        ep->pend_tail = NULL;
    return op;
}

/* An answer may only name a frame that left us whole: a buggy or hostile peer
 * acknowledging data still in our send queue would complete a write whose
 * buffer the application then reuses (caller holds ep->lock). */
static int check_answered_sent_locked(const lm_tcp_ep_t *ep, uint64_t seq_end, const char *what)
{
    if (seq_end <= ep->sent_below)
        return LM_OK;
    return lm_fail(LM_ERR_PROTOCOL, "%s for sequence %llu, but only frames below %llu were sent", what,
                   (unsigned long long)(seq_end - 1), (unsigned long long)ep->sent_below);
}

/* Writes complete in posting order: an acknowledgement that reaches past a
 * read still in flight is remembered and applied once the read finishes. */
static int take_ack(lm_tcp_ep_t *ep, uint64_t ack)
{
    pthread_mutex_lock(&ep->lock);
    int rc = check_answered_sent_locked(ep, ack, "acknowledgement");
    if (rc == LM_OK && ack > ep->peer_ack)
        ep->peer_ack = ack;
    /* A read whose answer is landing (rx_op) was taken off the pending list:
     * writes behind it complete when it does (finish_read_piece_locked). */
    if (rc == LM_OK && !ep->rx_op) {
        complete_writes_before(ep, ep->peer_ack);
        lm_tcp_release_held_locked(ep);
    }
    pthread_mutex_unlock(&ep->lock);
    return rc;
}

static int on_nack(lm_tcp_ep_t *ep, const lm_tcp_hdr_t *h)
{
    pthread_mutex_lock(&ep->lock);
    int rc = check_answered_sent_locked(ep, h->seq + 1, "NACK");
    if (rc != LM_OK) {
        pthread_mutex_unlock(&ep->lock);
        return rc;
    }
    complete_writes_before(ep, h->seq);
    lm_tcp_pending_t *op = pop_expected(ep, LM_TCP_WRITE, h->seq);
    if (op) {
        lm_ep_complete(&ep->base, LM_OP_WRITE, op->wr_id, op->forced_status ? op->forced_status : remote_status(h->status), 0);
        lm_tcp_pending_free(ep, op);
        lm_tcp_release_held_locked(ep);
    }
    pthread_mutex_unlock(&ep->lock);
    return op ? LM_OK : lm_fail(LM_ERR_PROTOCOL, "NACK for an unknown operation");
}

/* Piece k of a read covers [k * LM_TCP_READ_CHUNK, +LM_TCP_READ_CHUNK). */
static uint64_t piece_offset(const lm_tcp_pending_t *op)
{
    return (uint64_t)op->pieces_done * LM_TCP_READ_CHUNK;
}

static uint64_t piece_length(const lm_tcp_pending_t *op)
{
    return min_u64(op->length - piece_offset(op), LM_TCP_READ_CHUNK);
}

/* The read whose next piece this answers; taken off the pending list while
 * its payload lands (back on it if more pieces follow: finish_read_piece). */
static lm_tcp_pending_t *pop_read_piece(lm_tcp_ep_t *ep, uint64_t seq)
{
    lm_tcp_pending_t *op = ep->pend_head;
    if (!op || op->type != LM_TCP_READ_REQ || op->seq + op->pieces_done != seq)
        return NULL;
    return pop_expected(ep, LM_TCP_READ_REQ, op->seq);
}

static int on_read_resp(lm_tcp_ep_t *ep, const lm_tcp_hdr_t *h)
{
    pthread_mutex_lock(&ep->lock);
    int rc = check_answered_sent_locked(ep, h->seq + 1, "read response");
    lm_tcp_pending_t *op = NULL;
    if (rc == LM_OK) {
        complete_writes_before(ep, h->seq);
        op = pop_read_piece(ep, h->seq);
        /* Under the lock: the send side holds mapped writes while a read of ours lands (tcp_tx.c). */
        ep->rx_op = op;
    }
    pthread_mutex_unlock(&ep->lock);
    if (rc != LM_OK)
        return rc;
    if (!op)
        return lm_fail(LM_ERR_PROTOCOL, "read response for an unknown operation");
    if (h->status != LM_OK) {
        ep->rx_status = remote_status(h->status);
        if (h->length != 0)
            return lm_fail(LM_ERR_PROTOCOL, "refused read response carries a payload");
    } else if (h->length != piece_length(op)) {
        return lm_fail(LM_ERR_PROTOCOL, "read response of %llu bytes for a %llu-byte read",
                       (unsigned long long)h->length, (unsigned long long)piece_length(op));
    } else {
        ep->rx_status = LM_OK;
        lm_mr_ref(op->dest);
        ep->rx_mr = op->dest;
        ep->rx_off = op->dest_off + piece_offset(op);
    }
    ep->rx_left = h->length;
    ep->rx_state = RX_PAYLOAD;
    return LM_OK;
}

/* ---- target: operations the peer aims at our memory --------------------- */

static int check_sequence(lm_tcp_ep_t *ep, const lm_tcp_hdr_t *h)
{
    if (h->seq != ep->rx_expect_seq)
        return lm_fail(LM_ERR_PROTOCOL, "sequence %llu where %llu was due",
                       (unsigned long long)h->seq, (unsigned long long)ep->rx_expect_seq);
    if (h->length > LM_MAX_MESSAGE)
        return lm_fail(LM_ERR_PROTOCOL, "frame claims %llu bytes", (unsigned long long)h->length);
    ep->rx_expect_seq++;
    return LM_OK;
}

/* Look the target region up; on success a reference is taken for the caller. */
static int lookup_target(lm_tcp_ep_t *ep, const lm_tcp_hdr_t *h, uint32_t access, lm_mr_t **out)
{
    lm_context_t *ctx = ep->base.ctx;
    lm_registry_rdlock(ctx);
    lm_mr_t *mr = lm_registry_find(ctx, h->key);
    /* Device memory is not ours to copy into: to this transport the key does not exist. */
    int st = mr && lm_mr_reachable(mr, ep->base.ops->id) ? lm_mr_check(mr, h->offset, h->length, access)
                                                          : LM_ERR_NO_KEY;
    if (st == LM_OK)
        lm_mr_ref(mr);
    lm_registry_unlock(ctx);
    *out = st == LM_OK ? mr : NULL;
    return st;
}

static bool ranges_overlap(const uint8_t *a, uint64_t alen, const uint8_t *b, uint64_t blen)
{
    return alen > 0 && blen > 0 && a < b + blen && b < a + alen;
}

/* Copy a READ_RESP's unsent payload out of the region (caller holds ep->lock
 * and the registry read lock, and checked the region is alive). */
static int snapshot_read_resp(lm_tcp_ep_t *ep, lm_tcp_tx_t *tx, uint64_t unsent_from)
{
    uint64_t n = tx->hdr.length - unsent_from;
    uint8_t *copy = malloc(n);
    if (!copy)
        return lm_fail(LM_ERR_NO_MEMORY, "no memory to snapshot a %llu-byte read answer",
                       (unsigned long long)n);
    memcpy(copy, tx->src->addr + tx->src_off + unsent_from, n);
    tx->snap = copy;
    tx->snap_from = unsent_from;
    ep->snap_bytes += n;
    lm_mr_unref(tx->src);
    tx->src = NULL;
    return LM_OK;
}

/* Reads are executed in order (RDMA responder semantics): an answer shows
 * the memory as it was when its READ_REQ was processed, so before a later
 * write lands where an answer still waits unsent, that answer's unsent part
 * is copied. At most LM_TCP_MAX_READS answers of LM_TCP_READ_CHUNK bytes are
 * queued per endpoint, which bounds the copies; nothing waits for the peer
 * to read, so two peers doing this to each other cannot deadlock. */
static int snapshot_conflicting_reads(lm_tcp_ep_t *ep, const lm_mr_t *dest, const lm_tcp_hdr_t *h)
{
    if (atomic_load_explicit(&ep->reads_in, memory_order_relaxed) == 0)
        return LM_OK; /* the common case: no answer queued */
    const uint8_t *target = dest->addr + h->offset;
    int rc = LM_OK;
    pthread_mutex_lock(&ep->lock);
    lm_registry_rdlock(ep->base.ctx);
    for (lm_tcp_tx_t *tx = ep->tx_head; tx && rc == LM_OK; tx = tx->next) {
        if (tx->hdr.type != LM_TCP_READ_RESP || !tx->src || !tx->src->alive)
            continue;
        uint64_t unsent_from = tx->sent > sizeof(tx->hdr) ? tx->sent - sizeof(tx->hdr) : 0;
        const uint8_t *unsent = tx->src->addr + tx->src_off + unsent_from;
        if (ranges_overlap(unsent, tx->hdr.length - unsent_from, target, h->length))
            rc = snapshot_read_resp(ep, tx, unsent_from);
    }
    lm_registry_unlock(ep->base.ctx);
    pthread_mutex_unlock(&ep->lock);
    return rc;
}

static bool granted_to_peer(const lm_tcp_ep_t *ep, uint64_t key)
{
    for (uint32_t i = 0; i < ep->ngranted; i++)
        if (ep->granted[i] == key)
            return true;
    return false;
}

/* A mapped write's bytes are in place already: it is accepted only into a
 * region we granted this peer (else refused ACCESS, like any write we would
 * not take). */
static int check_mapped_write(lm_tcp_ep_t *ep, uint64_t key)
{
    lm_shmem_t *shared = ep->rx_mr->shmem;
    if (shared && atomic_load(&shared->granted) && granted_to_peer(ep, key))
        return LM_OK;
    lm_mr_unref(ep->rx_mr);
    ep->rx_mr = NULL;
    return LM_ERR_ACCESS;
}

static int on_write(lm_tcp_ep_t *ep, const lm_tcp_hdr_t *h)
{
    int rc = check_sequence(ep, h);
    if (rc != LM_OK)
        return rc;
    if (h->flags & ~(LM_TCP_FLAG_IMM | LM_TCP_FLAG_MAPPED))
        return lm_fail(LM_ERR_PROTOCOL, "unknown write flags 0x%x", h->flags);
    bool mapped = h->flags & LM_TCP_FLAG_MAPPED;
    ep->rx_status = lookup_target(ep, h, LM_ACCESS_REMOTE_WRITE, &ep->rx_mr);
    if (mapped && ep->rx_status == LM_OK)
        ep->rx_status = check_mapped_write(ep, h->key);
    ep->rx_off = h->offset;
    ep->rx_left = mapped ? 0 : h->length;
    ep->rx_state = RX_PAYLOAD;
    if (ep->rx_status == LM_OK && !mapped)
        return snapshot_conflicting_reads(ep, ep->rx_mr, h);
    return LM_OK;
}

/* The peer asks to map one of our regions (shm): granted for a region over an
 * lm_shmem allocation that takes remote writes. */
static int on_map_req(lm_tcp_ep_t *ep, const lm_tcp_hdr_t *h)
{
    int32_t fd = -1;
    uint64_t ino = 0, length = 0;
    lm_context_t *ctx = ep->base.ctx;
    lm_registry_rdlock(ctx);
    lm_mr_t *mr = lm_registry_find(ctx, h->key);
    bool known = granted_to_peer(ep, h->key);
    int st = !mr ? LM_ERR_NO_KEY
             : !(mr->access & LM_ACCESS_REMOTE_WRITE) ? LM_ERR_ACCESS
             : !known && ep->ngranted == LM_TCP_MAX_GRANTS ? LM_ERR_ACCESS /* bounded per peer */
             : lm_shmem_grant(mr, &fd, &ino, &length);
    lm_registry_unlock(ctx);
    if (st == LM_OK && !known)
        ep->granted[ep->ngranted++] = h->key; /* rx path only: no lock */
    pthread_mutex_lock(&ep->lock);
    lm_tcp_tx_t *tx = new_control(ep, LM_TCP_MAP_RESP, 0, st);
    if (tx) {
        tx->hdr.key = h->key;
        if (st == LM_OK) {
            tx->hdr.imm = (uint32_t)fd;
            tx->hdr.offset = ino;
            tx->hdr.length = length;
        }
        count_reply_locked(ep);
        lm_tcp_tx_queue(ep, tx);
    }
    pthread_mutex_unlock(&ep->lock);
    return LM_OK;
}

/* Our map request answered: map the region, or remember that it is not to be mapped. */
static int on_map_resp(lm_tcp_ep_t *ep, const lm_tcp_hdr_t *h)
{
    pthread_mutex_lock(&ep->lock);
    lm_tcp_map_t *m = lm_tcp_map_find(ep, h->key);
    bool expected = m && m->state == MAP_PENDING;
    pthread_mutex_unlock(&ep->lock);
    if (!expected)
        return lm_fail(LM_ERR_PROTOCOL, "a map response nobody asked for");
    uint8_t *addr = NULL;
    int st = h->status == LM_OK ? ep->io->map_peer(ep, (int32_t)h->imm, h->offset, h->length, &addr) : h->status;
    pthread_mutex_lock(&ep->lock);
    if (st == LM_OK) {
        m->addr = addr;
        m->length = h->length;
    }
    m->state = st == LM_OK ? MAP_READY : MAP_REFUSED;
    pthread_mutex_unlock(&ep->lock);
    return LM_OK;
}

/* The responder's side of LM_TCP_MAX_READS and LM_TCP_READ_CHUNK. */
static int check_read_limits(lm_tcp_ep_t *ep, const lm_tcp_hdr_t *h)
{
    if (h->flags & ~LM_TCP_FLAG_READ_CONT)
        return lm_fail(LM_ERR_PROTOCOL, "unknown read flags 0x%x", h->flags);
    if (h->length > LM_TCP_READ_CHUNK)
        return lm_fail(LM_ERR_PROTOCOL, "read request for %llu bytes exceeds the %u-byte piece limit",
                       (unsigned long long)h->length, LM_TCP_READ_CHUNK);
    if (atomic_load(&ep->reads_in) >= LM_TCP_MAX_READS)
        return lm_fail(LM_ERR_PROTOCOL, "peer exceeded %u reads in flight (it does not read our answers)",
                       LM_TCP_MAX_READS);
    return LM_OK;
}

static void queue_read_resp_locked(lm_tcp_ep_t *ep, const lm_tcp_hdr_t *h, int st, lm_mr_t *mr)
{
    lm_tcp_tx_t *tx = lm_tcp_tx_alloc(ep);
    if (!tx) {
        if (mr)
            lm_mr_unref(mr);
        lm_tcp_fail_locked(ep, LM_ERR_NO_MEMORY);
        return;
    }
    tx->hdr.type = LM_TCP_READ_RESP;
    tx->hdr.seq = h->seq;
    tx->hdr.status = st;
    tx->hdr.length = st == LM_OK ? h->length : 0;
    tx->src = mr; /* reference moves to the frame */
    tx->src_off = h->offset;
    atomic_fetch_add(&ep->reads_in, 1);
    count_reply_locked(ep);
    lm_tcp_tx_queue(ep, tx);
}

/* One REFUSED completion per read, not per piece: later pieces of a read
 * already refused stay quiet. */
static bool first_refusal_of_read(lm_tcp_ep_t *ep, const lm_tcp_hdr_t *h, int st)
{
    bool continued = (h->flags & LM_TCP_FLAG_READ_CONT) && ep->rx_read_refused;
    if (!(h->flags & LM_TCP_FLAG_READ_CONT))
        ep->rx_read_refused = false;
    if (st != LM_OK)
        ep->rx_read_refused = true;
    return st != LM_OK && !continued;
}

static int on_read_req(lm_tcp_ep_t *ep, const lm_tcp_hdr_t *h)
{
    int rc = check_sequence(ep, h);
    if (rc == LM_OK)
        rc = check_read_limits(ep, h);
    if (rc != LM_OK)
        return rc;
    lm_mr_t *mr;
    int st = lookup_target(ep, h, LM_ACCESS_REMOTE_READ, &mr);
    pthread_mutex_lock(&ep->lock);
    queue_read_resp_locked(ep, h, st, mr);
    pthread_mutex_unlock(&ep->lock);
    if (first_refusal_of_read(ep, h, st))
        push_target_completion(ep, LM_OP_REFUSED, st, h);
    return LM_OK;
}

static void accept_seq(lm_tcp_ep_t *ep, uint64_t seq, uint64_t bytes)
{
    pthread_mutex_lock(&ep->lock);
    ep->rx_accepted = seq + 1;
    ep->rx_unacked_bytes += bytes;
    pthread_mutex_unlock(&ep->lock);
}

static int on_nop(lm_tcp_ep_t *ep, const lm_tcp_hdr_t *h)
{
    int rc = check_sequence(ep, h);
    if (rc == LM_OK)
        accept_seq(ep, h->seq, 0);
    return rc;
}

static int on_header(lm_tcp_ep_t *ep)
{
    const lm_tcp_hdr_t *h = &ep->rx_hdr;
    if (h->magic != LM_TCP_MAGIC)
        return lm_fail(LM_ERR_PROTOCOL, "bad frame magic 0x%04x", h->magic);
    bool maps = h->type == LM_TCP_MAP_REQ || h->type == LM_TCP_MAP_RESP ||
                (h->type == LM_TCP_WRITE && (h->flags & LM_TCP_FLAG_MAPPED));
    if (maps && !ep->io->map_peer)
        return lm_fail(LM_ERR_PROTOCOL, "frame type %u (flags 0x%x) over a stream that maps nothing", h->type,
                       h->flags);
    int rc;
    switch (h->type) {
    case LM_TCP_WRITE: rc = on_write(ep, h); break;
    case LM_TCP_READ_REQ: rc = on_read_req(ep, h); break;
    case LM_TCP_NOP: rc = on_nop(ep, h); break;
    case LM_TCP_ACK: rc = LM_OK; break;
    case LM_TCP_NACK: rc = on_nack(ep, h); break; /* before the ack it carries */
    case LM_TCP_READ_RESP: rc = on_read_resp(ep, h); break;
    case LM_TCP_MAP_REQ: rc = on_map_req(ep, h); break;
    case LM_TCP_MAP_RESP: rc = on_map_resp(ep, h); break;
    default: return lm_fail(LM_ERR_PROTOCOL, "unknown frame type %u", h->type);
    }
    if (rc == LM_OK && h->ack)
        rc = take_ack(ep, h->ack);
    return rc;
}

/* ---- payload ----------------------------------------------------------- */

/* A read's piece was answered: the read completes with its last piece (with
 * the first refusal among them), else it goes back to the head of the
 * pending list; a read held by the ORD limit may go now (caller holds lock). */
static void finish_read_piece_locked(lm_tcp_ep_t *ep, lm_tcp_pending_t *op, int status)
{
    if (status != LM_OK && op->read_status == LM_OK)
        op->read_status = status;
    op->pieces_done++;
    ep->reads_out--;
    if (op->pieces_done < op->pieces && !ep->closed) {
        op->next = ep->pend_head;
        ep->pend_head = op;
        if (!ep->pend_tail)
            ep->pend_tail = op;
    } else {
        int err = atomic_load(&ep->base.error);
        int final = ep->closed ? (err ? err : LM_ERR_CANCELED) : op->read_status;
        lm_ep_complete(&ep->base, LM_OP_READ, op->wr_id, final, op->length);
        lm_tcp_pending_free(ep, op);
        complete_writes_before(ep, ep->peer_ack);
        lm_tcp_release_held_locked(ep);
    }
    if (ep->tx_head && ep->tx_head->hdr.type == LM_TCP_READ_REQ && ep->reads_out + 1 == LM_TCP_MAX_READS)
        lm_tcp_tx_flush(ep);
}

static void finish_payload(lm_tcp_ep_t *ep)
{
    const lm_tcp_hdr_t *h = &ep->rx_hdr;
    if (ep->rx_mr) {
        lm_mr_unref(ep->rx_mr);
        ep->rx_mr = NULL;
    }
    ep->rx_state = RX_HEADER;
    if (ep->rx_op) { /* a piece of our read finished */
        lm_tcp_pending_t *op = ep->rx_op;
        pthread_mutex_lock(&ep->lock);
        ep->rx_op = NULL;
        finish_read_piece_locked(ep, op, ep->rx_status);
        pthread_mutex_unlock(&ep->lock);
        return;
    }
    if (ep->rx_status == LM_OK) {
        accept_seq(ep, h->seq, h->length);
        if (h->flags & LM_TCP_FLAG_IMM)
            push_target_completion(ep, LM_OP_RECV_IMM, LM_OK, h);
        return;
    }
    pthread_mutex_lock(&ep->lock);
    /* Stamped before the NACK's number is accepted: the NACK itself says
     * every write before it was accepted. */
    queue_nack(ep, h->seq, ep->rx_status);
    ep->rx_accepted = h->seq + 1;
    pthread_mutex_unlock(&ep->lock);
    push_target_completion(ep, LM_OP_REFUSED, ep->rx_status, h);
}

/* Move payload bytes to their destination (or drop them). Returns LM_OK on
 * progress, RX_WOULD_BLOCK, or an error status. */
static int rx_payload(lm_tcp_ep_t *ep, uint8_t *scratch, size_t scratch_len)
{
    lm_context_t *ctx = ep->base.ctx;
    size_t buffered = ep->rx_end - ep->rx_start;
    int rc = LM_OK;
    lm_registry_rdlock(ctx);
    if (ep->rx_mr && !ep->rx_mr->alive) {
        /* Deregistered mid-payload: nothing more lands; the rest is dropped. */
        ep->rx_status = ep->rx_op ? LM_ERR_LOCAL : LM_ERR_NO_KEY;
        lm_mr_unref(ep->rx_mr);
        ep->rx_mr = NULL;
    }
    uint8_t *dest = ep->rx_mr ? ep->rx_mr->addr + ep->rx_off : NULL;
    if (buffered > 0) {
        uint64_t n = min_u64(buffered, ep->rx_left);
        if (dest)
            memcpy(dest, ep->rxbuf + ep->rx_start, n);
        ep->rx_start += n;
        ep->rx_off += n;
        ep->rx_left -= n;
    } else if (ep->rx_left > 0) {
        uint64_t want = dest ? min_u64(ep->rx_left, 1u << 30) : min_u64(ep->rx_left, scratch_len);
        bool drained = false;
        ssize_t n = ep->io->recv(ep, dest ? dest : scratch, want, &drained);
        if (n > 0) {
            ep->rx_off += (uint64_t)n;
            ep->rx_left -= (uint64_t)n;
            ep->rx_drained = drained;
        } else if (n == 0) {
            rc = LM_ERR_PEER_LOST;
        } else if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) {
            rc = RX_WOULD_BLOCK;
        } else {
            rc = LM_ERR_PEER_LOST;
        }
    }
    lm_registry_unlock(ctx);
    if (rc == LM_OK && ep->rx_left == 0)
        finish_payload(ep);
    return rc;
}

static int rx_fill_header_buffer(lm_tcp_ep_t *ep)
{
    if (ep->rx_start > 0) {
        memmove(ep->rxbuf, ep->rxbuf + ep->rx_start, ep->rx_end - ep->rx_start);
        ep->rx_end -= ep->rx_start;
        ep->rx_start = 0;
    }
    size_t want = sizeof(ep->rxbuf) - ep->rx_end;
    bool drained = false;
    ssize_t n = ep->io->recv(ep, ep->rxbuf + ep->rx_end, want, &drained);
    if (n > 0) {
        ep->rx_end += (size_t)n;
        ep->rx_drained = drained;
        return LM_OK;
    }
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
        return RX_WOULD_BLOCK;
    return LM_ERR_PEER_LOST;
}

void lm_tcp_rx_cleanup(lm_tcp_ep_t *ep, int status)
{
    if (ep->rx_mr) {
        lm_mr_unref(ep->rx_mr);
        ep->rx_mr = NULL;
    }
    if (ep->rx_op) {
        pthread_mutex_lock(&ep->lock);
        lm_ep_complete(&ep->base, LM_OP_READ, ep->rx_op->wr_id, status, 0);
        lm_tcp_pending_free(ep, ep->rx_op);
        ep->rx_op = NULL;
        pthread_mutex_unlock(&ep->lock);
    }
    ep->rx_state = RX_HEADER;
}

/* Receiving pauses between frames while the peer's answers pile up unsent
 * (rx_backlogged, see count_reply_locked) or the completion queue is full
 * (parked there until the application polls). A hang-up is read regardless:
 * what is left is bounded by the socket buffer, and must reach EOF. */
static bool rx_should_pause(lm_tcp_ep_t *ep)
{
    if (atomic_load_explicit(&ep->rx_backlogged, memory_order_relaxed))
        return true;
    if (!atomic_load_explicit(&ep->base.ctx->cq.congested, memory_order_relaxed))
        return false; /* the common case: no lock */
    /* Parked only while open, decided under the lock destroy closes with: a
     * handler parked after lm_progress_del would outlive its endpoint. */
    pthread_mutex_lock(&ep->lock);
    bool parked = !ep->closed && lm_cq_park_if_congested(ep->base.ctx, &ep->handler);
    if (parked) {
        ep->in_armed = false;
        lm_tcp_update_interest(ep);
    }
    pthread_mutex_unlock(&ep->lock);
    return parked;
}

static void rx_run(lm_tcp_ep_t *ep, bool hangup)
{
    uint8_t *scratch = ep->iface->scratch;
    int rc = LM_OK;
    int frames = 0;
    ep->rx_drained = false;
    for (; frames < LM_TCP_RX_BUDGET;) {
        if (ep->rx_state == RX_PAYLOAD) {
            rc = rx_payload(ep, scratch, sizeof(ep->iface->scratch));
            frames += ep->rx_state == RX_HEADER;
        } else if (!hangup && rx_should_pause(ep)) {
            break;
        } else if (ep->rx_end - ep->rx_start >= sizeof(lm_tcp_hdr_t)) {
            memcpy(&ep->rx_hdr, ep->rxbuf + ep->rx_start, sizeof(lm_tcp_hdr_t));
            ep->rx_start += sizeof(lm_tcp_hdr_t);
            rc = on_header(ep);
            if (rc == LM_OK && ep->rx_state == RX_PAYLOAD && ep->rx_left == 0)
                finish_payload(ep); /* empty write, or a refused read */
            frames += ep->rx_state == RX_HEADER;
        } else if (ep->rx_drained) {
            /* A short read emptied the socket: skip the recv that would only
             * say EAGAIN; level-triggered epoll reports anything newer. */
            break;
        } else {
            rc = rx_fill_header_buffer(ep);
        }
        if (rc != LM_OK)
            break;
    }
    pthread_mutex_lock(&ep->lock);
    if (rc < 0)
        lm_tcp_fail_locked(ep, rc);
    else
        schedule_ack_locked(ep);
    /* Out of budget, maybe with frames already in rxbuf that epoll will never
     * report: run again after the other endpoints. Only while open, decided
     * under the lock (as for parking): destroy may be waiting to free ep. */
    if (rc >= 0 && frames >= LM_TCP_RX_BUDGET && !ep->closed)
        lm_progress_rerun(ep->base.ctx, &ep->handler);
    pthread_mutex_unlock(&ep->lock);
    if (rc < 0) {
        lm_progress_del(ep->base.ctx, &ep->handler);
        lm_tcp_rx_cleanup(ep, atomic_load(&ep->base.error));
    }
}

/* Called again after a pause (or a spent budget): listen to the socket
 * again unless the answers backlog still holds it. */
static void rx_resume(lm_tcp_ep_t *ep)
{
    pthread_mutex_lock(&ep->lock);
    if (!ep->in_armed && !atomic_load(&ep->rx_backlogged) && !ep->closed) {
        ep->in_armed = true;
        lm_tcp_update_interest(ep);
    }
    pthread_mutex_unlock(&ep->lock);
}

void lm_tcp_on_io(void *arg, uint32_t events)
{
    lm_tcp_ep_t *ep = arg;
    if (events & EPOLLOUT) {
        pthread_mutex_lock(&ep->lock);
        lm_tcp_tx_flush(ep);
        pthread_mutex_unlock(&ep->lock);
    }
    if (events & LM_EV_RERUN)
        rx_resume(ep);
    if (events & (EPOLLIN | EPOLLHUP | EPOLLERR | LM_EV_RERUN))
        rx_run(ep, (events & (EPOLLHUP | EPOLLERR)) != 0);
}
