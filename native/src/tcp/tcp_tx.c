/* tcp_tx.c - the send side: a FIFO of frames written with sendmsg straight
 * from registered memory (header and payload in one scatter/gather call). */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>

#include "tcp.h"

lm_tcp_tx_t *lm_tcp_tx_alloc(lm_tcp_ep_t *ep)
{
    lm_tcp_tx_t *tx = ep->tx_free;
    if (tx)
        ep->tx_free = tx->next;
    else if (!(tx = malloc(sizeof(*tx))))
        return NULL;
    memset(tx, 0, sizeof(*tx));
    tx->hdr.magic = LM_TCP_MAGIC;
    return tx;
}

/* The sequence number of the first NACK still queued (the frame being
 * released was unlinked already; answers keep their order in the queue). */
static uint64_t oldest_unsent_nack(const lm_tcp_ep_t *ep)
{
    for (const lm_tcp_tx_t *tx = ep->tx_head; tx; tx = tx->next)
        if (tx->hdr.type == LM_TCP_NACK)
            return tx->hdr.seq;
    return UINT64_MAX;
}

/* Drop a frame that left (or is flushed) and the per-peer counts it held. */
static void tx_release(lm_tcp_ep_t *ep, lm_tcp_tx_t *tx)
{
    if (tx->src)
        lm_mr_unref(tx->src);
    if (tx->snap) {
        ep->snap_bytes -= tx->hdr.length - tx->snap_from;
        free(tx->snap);
    }
    free(tx->segs);
    if (tx->map)
        tx->map->queued--;
    if (tx->hdr.type == LM_TCP_READ_RESP)
        ep->reads_in--;
    if (tx->hdr.type == LM_TCP_READ_RESP || tx->hdr.type == LM_TCP_NACK || tx->hdr.type == LM_TCP_MAP_RESP)
        ep->replies_queued--;
    if (tx->hdr.type == LM_TCP_NACK && --ep->nacks_unsent > 0)
        ep->nack_floor = oldest_unsent_nack(ep);
    if (ep->bare_ack == tx)
        ep->bare_ack = NULL;
    tx->next = ep->tx_free;
    ep->tx_free = tx;
}

lm_tcp_pending_t *lm_tcp_pending_alloc(lm_tcp_ep_t *ep)
{
    lm_tcp_pending_t *op = ep->pend_free;
    if (op)
        ep->pend_free = op->next;
    else if (!(op = malloc(sizeof(*op))))
        return NULL;
    memset(op, 0, sizeof(*op));
    return op;
}

void lm_tcp_pending_free(lm_tcp_ep_t *ep, lm_tcp_pending_t *op)
{
    if (op->dest)
        lm_mr_unref(op->dest);
    op->next = ep->pend_free;
    ep->pend_free = op;
}

void lm_tcp_update_interest(lm_tcp_ep_t *ep)
{
    if (ep->closed)
        return;
    /* A stream without its own "send again" event (shm) is woken through
     * EPOLLIN: watched while sending waits, even with receiving paused. */
    uint32_t out = ep->out_armed ? (ep->io->out_event ? ep->io->out_event : (uint32_t)EPOLLIN) : 0u;
    lm_progress_mod(ep->base.ctx, &ep->handler, (ep->in_armed ? EPOLLIN : 0u) | out);
}

static void set_out_interest(lm_tcp_ep_t *ep, bool want)
{
    if (ep->out_armed == want || ep->closed)
        return;
    ep->out_armed = want;
    lm_tcp_update_interest(ep);
}

/* The backlog of answers for the peer halved: receive from it again. */
static void resume_after_backlog(lm_tcp_ep_t *ep)
{
    if (!ep->rx_backlogged || ep->closed || ep->replies_queued > LM_TCP_MAX_QUEUED_REPLIES / 2)
        return;
    ep->rx_backlogged = false;
    ep->in_armed = true;
    lm_tcp_update_interest(ep);
    lm_progress_rerun(ep->base.ctx, &ep->handler); /* frames may wait in rxbuf */
}

static bool carries_sequence(uint8_t type)
{
    return type == LM_TCP_WRITE || type == LM_TCP_READ_REQ || type == LM_TCP_NOP;
}

/* The head is a read that the ORD limit holds back until our earlier reads
 * are answered. */
static bool head_held_by_ord(const lm_tcp_ep_t *ep)
{
    const lm_tcp_tx_t *h = ep->tx_head;
    return h && h->hdr.type == LM_TCP_READ_REQ && h->sent == 0 && ep->reads_out >= LM_TCP_MAX_READS;
}

/* The head waits, having sent nothing: for the ORD limit, or for answers
 * before it goes mapped (tx_held, set only while the head waits). */
static bool head_is_held(const lm_tcp_ep_t *ep)
{
    return head_held_by_ord(ep) || (ep->tx_held && ep->tx_head && ep->tx_head->sent == 0);
}

void lm_tcp_tx_queue(lm_tcp_ep_t *ep, lm_tcp_tx_t *tx)
{
    if (ep->closed) { /* answers to frames still buffered after a failure: nobody sends them */
        tx_release(ep, tx);
        return;
    }
    tx->next = NULL;
    if (ep->tx_tail)
        ep->tx_tail->next = tx;
    else
        ep->tx_head = tx;
    ep->tx_tail = tx;
    /* Only the head can be partly sent, so a frame queued behind others
     * waits for EPOLLOUT; an idle queue is sent from the caller's thread.
     * (Handing large frames to the progress thread instead was measured:
     * 4 MiB writes fell from 34-36 to 30-32 Gb/s, and the pipeline benchmark
     * gained nothing.) */
    if (ep->tx_head == tx || (!carries_sequence(tx->hdr.type) && head_is_held(ep)))
        lm_tcp_tx_flush(ep); /* (an answer overtakes a held head: no EPOLLOUT is armed) */
}

static bool has_payload(const lm_tcp_tx_t *tx)
{
    return tx->src || tx->snap;
}

/* (A mapped write has no payload left: copy_into_mapping dropped its source.) */
static uint64_t frame_size(const lm_tcp_tx_t *tx)
{
    return sizeof(tx->hdr) + (has_payload(tx) ? tx->hdr.length : 0);
}

/* ---- writes through the peer's mapping (shm) -------------------------------
 * A write whose target region the peer granted (MAP_READY) goes as a bare
 * header, its bytes copied into the mapping when the frame is sent. Data must
 * land in posting order, so the first mapped write to a region waits (the
 * queue's head is held) until every earlier write to it that went through
 * the stream was answered, and a mapped write never overtakes an earlier read
 * of ours (reads see the memory as it was when they were asked). */
enum { GO_STREAM, GO_MAPPED, GO_HOLD };

static int way_to_send(const lm_tcp_ep_t *ep, const lm_tcp_tx_t *tx)
{
    const lm_tcp_map_t *m = tx->map;
    if (!m || m->state != MAP_READY || tx->hdr.offset > m->length || tx->hdr.length > m->length - tx->hdr.offset ||
        tx->hdr.length > LM_TCP_MAX_MAPPED_WRITE)
        return GO_STREAM; /* (out of bounds: the target refuses it, nothing lands) */
    if (ep->rx_op)
        return GO_HOLD; /* a read of ours is landing: taken off the pending list meanwhile */
    for (const lm_tcp_pending_t *op = ep->pend_head; op && op->seq < tx->hdr.seq; op = op->next)
        if (op->type == LM_TCP_READ_REQ || op->seq < m->stream_seq_end)
            return GO_HOLD;
    return GO_MAPPED;
}

/* Copy the frame's payload into the peer's memory (caller holds the registry
 * read lock; the source is alive). */
static void copy_into_mapping(lm_tcp_ep_t *ep, lm_tcp_tx_t *tx)
{
    uint8_t *dst = tx->map->addr + tx->hdr.offset;
    if (tx->segs) {
        for (uint32_t k = 0; k < tx->nsegs; k++) {
            memcpy(dst, tx->src->addr + tx->segs[k].offset, tx->segs[k].length);
            dst += tx->segs[k].length;
        }
    } else {
        memcpy(dst, tx->src->addr + tx->src_off, tx->hdr.length);
    }
    tx->hdr.flags |= LM_TCP_FLAG_MAPPED;
    atomic_fetch_add(&ep->base.mapped_writes, 1);
    /* The bytes left: the frame needs its source no more (a deregistration
     * from now on must not withdraw it). */
    lm_mr_unref(tx->src);
    tx->src = NULL;
    free(tx->segs);
    tx->segs = NULL;
}

void lm_tcp_release_held_locked(lm_tcp_ep_t *ep)
{
    if (ep->tx_held)
        lm_tcp_tx_flush(ep); /* which clears tx_held, or sets it again */
}


static const uint8_t *payload_at(const lm_tcp_tx_t *tx, uint64_t off)
{
    if (tx->snap && off >= tx->snap_from)
        return tx->snap + (off - tx->snap_from);
    return tx->src->addr + tx->src_off + off;
}

/* Append iovecs for a gather frame's payload from offset off on; false if
 * the iovec array filled up before the frame's end. */
static bool add_gather_iovs(lm_tcp_tx_t *tx, uint64_t off, struct iovec *iov, int *n)
{
    while (tx->seg_at < tx->nsegs && tx->seg_base + tx->segs[tx->seg_at].length <= off) {
        tx->seg_base += tx->segs[tx->seg_at].length;
        tx->seg_at++;
    }
    uint64_t base = tx->seg_base;
    for (uint32_t k = tx->seg_at; k < tx->nsegs; base += tx->segs[k].length, k++) {
        if (*n == LM_TCP_MAX_IOV)
            return false;
        uint64_t skip = off > base ? off - base : 0;
        iov[*n].iov_base = tx->src->addr + tx->segs[k].offset + skip;
        iov[(*n)++].iov_len = tx->segs[k].length - skip;
    }
    return true;
}

/* A READ_REQ piece left: count it in flight, and turn the frame into the next
 * piece of the same read if there is one (true: the frame stays queued). */
static bool next_read_piece(lm_tcp_ep_t *ep, lm_tcp_tx_t *tx)
{
    ep->reads_out++;
    if (tx->pieces_left == 0)
        return false;
    tx->pieces_left--;
    tx->hdr.seq++;
    tx->hdr.offset += tx->hdr.length;
    tx->hdr.length = tx->read_left < LM_TCP_READ_CHUNK ? tx->read_left : LM_TCP_READ_CHUNK;
    tx->read_left -= tx->hdr.length;
    tx->hdr.flags |= LM_TCP_FLAG_READ_CONT;
    tx->sent = 0;
    return true;
}

/* Account for a frame that left whole; false if it stays queued. */
static bool frame_left(lm_tcp_ep_t *ep, lm_tcp_tx_t *tx)
{
    if (carries_sequence(tx->hdr.type))
        ep->sent_below = tx->hdr.seq + 1;
    return !(tx->hdr.type == LM_TCP_READ_REQ && next_read_piece(ep, tx));
}

/* A region deregistered while its frame waited: withdraw the frame if no
 * byte of it left yet (keeping the sequence number in use), else the stream
 * cannot be repaired and the endpoint fails. */
static bool withdraw_dead_source(lm_tcp_ep_t *ep, lm_tcp_tx_t *tx)
{
    if (tx->sent > 0) {
        lm_tcp_fail_locked(ep, LM_ERR_LOCAL);
        return false;
    }
    if (tx->hdr.type == LM_TCP_WRITE) {
        tx->hdr.type = LM_TCP_NOP;
        if (tx->op)
            tx->op->forced_status = LM_ERR_LOCAL;
    } else { /* READ_RESP: answer "no such region" instead */
        tx->hdr.status = LM_ERR_NO_KEY;
    }
    tx->hdr.length = 0;
    lm_mr_unref(tx->src);
    tx->src = NULL;
    free(tx->segs);
    tx->segs = NULL;
    return true;
}

/* Answers to the peer (READ_RESP, NACK, ACK) carry no sequence number of
 * ours, so they may overtake our own held requests. They must: if both peers
 * read from each other past the ORD limit, each one's answers queued behind
 * its held read would wait for the other's, a deadlock. Moves them, in
 * order, in front of the held head (which has sent nothing yet). */
static void promote_answers_past_held_read(lm_tcp_ep_t *ep)
{
    lm_tcp_tx_t *held = ep->tx_head, *answers = NULL, *answers_last = NULL;
    if (held->sent != 0)
        return; /* nothing may go in front of a frame partly sent */
    lm_tcp_tx_t *kept_last = held; /* last frame left in place after held */
    for (lm_tcp_tx_t *tx = held->next, *next; tx; tx = next) {
        next = tx->next;
        if (carries_sequence(tx->hdr.type)) {
            kept_last->next = tx;
            kept_last = tx;
            continue;
        }
        tx->next = NULL;
        if (answers_last)
            answers_last->next = tx;
        else
            answers = tx;
        answers_last = tx;
    }
    kept_last->next = NULL;
    ep->tx_tail = kept_last;
    if (answers) {
        answers_last->next = held;
        ep->tx_head = answers;
    }
}

void lm_tcp_tx_flush(lm_tcp_ep_t *ep)
{
    lm_context_t *ctx = ep->base.ctx;
    while (ep->tx_head && !ep->closed) {
        /* Answers overtake a head held for reads (ORD) or for a mapped write's
         * acknowledgement: the peer may be waiting for them to let its own go. */
        if (head_is_held(ep))
            promote_answers_past_held_read(ep);
        ep->tx_held = false; /* set again below if the head still has to wait */
        struct iovec iov[LM_TCP_MAX_IOV];
        int n = 0;
        uint32_t reads_batched = 0;
        lm_registry_rdlock(ctx);
        for (lm_tcp_tx_t *tx = ep->tx_head; tx && n + 2 <= LM_TCP_MAX_IOV; tx = tx->next) {
            if (tx->src && !tx->src->alive && !withdraw_dead_source(ep, tx))
                break;
            /* (Decided once: a mapped frame waiting for room in the stream is not copied again.) */
            if (tx->hdr.type == LM_TCP_WRITE && tx->map && tx->sent == 0 && !(tx->hdr.flags & LM_TCP_FLAG_MAPPED)) {
                int way = way_to_send(ep, tx);
                if (way == GO_HOLD) {
                    ep->tx_held = n == 0; /* at the head: an answer releases it */
                    break;
                }
                if (way == GO_MAPPED)
                    copy_into_mapping(ep, tx);
                else
                    tx->map->stream_seq_end = tx->hdr.seq + 1;
            }
            if (tx->hdr.type == LM_TCP_READ_REQ) {
                /* ORD: later frames wait behind a read that may not go yet. */
                if (tx->sent == 0 && ep->reads_out + reads_batched >= LM_TCP_MAX_READS)
                    break;
                reads_batched++;
            }
            uint64_t done = tx->sent;
            if (done == 0) { /* every frame carries the newest acknowledgement */
                /* ...but never one past a refused write whose NACK has not
                 * left: the peer would complete that write as accepted. */
                uint64_t ack = ep->rx_accepted;
                if (ep->nacks_unsent > 0 && ep->nack_floor < ack)
                    ack = ep->nack_floor;
                tx->hdr.ack = ack;
                ep->rx_acked = ack;
                ep->rx_unacked_bytes = 0;
                lm_timer_disarm(&ep->ack_timer);
            }
            if (done < sizeof(tx->hdr)) {
                iov[n].iov_base = (uint8_t *)&tx->hdr + done;
                iov[n++].iov_len = sizeof(tx->hdr) - done;
                done = sizeof(tx->hdr);
            }
            if (tx->segs) {
                if (!add_gather_iovs(tx, done - sizeof(tx->hdr), iov, &n))
                    break; /* the rest goes in the next sendmsg */
            } else if (has_payload(tx)) {
                uint64_t off = done - sizeof(tx->hdr);
                uint64_t end = tx->snap && off < tx->snap_from ? tx->snap_from : tx->hdr.length;
                iov[n].iov_base = (uint8_t *)payload_at(tx, off);
                iov[n++].iov_len = end - off;
                if (end < tx->hdr.length) /* the rest comes from the snapshot */
                    break;
            }
            if (tx->hdr.type == LM_TCP_READ_REQ && tx->pieces_left > 0)
                break; /* its next piece (a new header) goes in a later call */
        }
        ssize_t sent = -1;
        if (!ep->closed && n > 0) {
            sent = ep->io->send(ep, iov, n);
        }
        int err = errno;
        lm_registry_unlock(ctx);
        if (ep->closed)
            return;
        if (n == 0)
            break; /* the head waits (reads in flight at the ORD limit) */
        if (sent < 0) {
            if (err == EAGAIN || err == EWOULDBLOCK || err == EINTR)
                break;
            lm_tcp_fail_locked(ep, LM_ERR_PEER_LOST);
            return;
        }
        uint64_t left = (uint64_t)sent;
        while (ep->tx_head && left > 0) {
            lm_tcp_tx_t *tx = ep->tx_head;
            uint64_t need = frame_size(tx) - tx->sent;
            if (left < need) {
                tx->sent += left;
                break;
            }
            left -= need;
            tx->sent += need;
            if (!frame_left(ep, tx))
                break; /* the same frame, as the read's next piece */
            ep->tx_head = tx->next;
            if (!ep->tx_head)
                ep->tx_tail = NULL;
            tx_release(ep, tx);
        }
    }
    resume_after_backlog(ep);
    /* A head held by the ORD limit needs no EPOLLOUT: the read's answer
     * flushes again (tcp_rx.c). */
    set_out_interest(ep, ep->tx_head != NULL && !head_held_by_ord(ep) && !ep->tx_held);
}

void lm_tcp_fail_locked(lm_tcp_ep_t *ep, int status)
{
    if (ep->closed)
        return;
    ep->closed = true;
    int expected = 0;
    atomic_compare_exchange_strong(&ep->base.error, &expected, status);
    status = atomic_load(&ep->base.error);
    /* The progress thread sees EOF and releases the receive side. */
    ep->io->shutdown(ep);
    while (ep->tx_head) {
        lm_tcp_tx_t *tx = ep->tx_head;
        ep->tx_head = tx->next;
        tx_release(ep, tx);
    }
    ep->tx_tail = NULL;
    while (ep->pend_head) {
        lm_tcp_pending_t *op = ep->pend_head;
        ep->pend_head = op->next;
        lm_ep_complete(&ep->base, op->type == LM_TCP_WRITE ? LM_OP_WRITE : LM_OP_READ, op->wr_id,
                       status, 0);
        lm_tcp_pending_free(ep, op);
    }
    ep->pend_tail = NULL;
}
