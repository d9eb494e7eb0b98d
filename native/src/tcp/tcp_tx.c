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

static void tx_release(lm_tcp_ep_t *ep, lm_tcp_tx_t *tx)
{
    if (tx->src)
        lm_mr_unref(tx->src);
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

static void set_out_interest(lm_tcp_ep_t *ep, bool want)
{
    if (ep->out_armed == want || ep->closed)
        return;
    ep->out_armed = want;
    lm_progress_mod(ep->base.ctx, &ep->handler, EPOLLIN | (want ? EPOLLOUT : 0));
}

void lm_tcp_tx_queue(lm_tcp_ep_t *ep, lm_tcp_tx_t *tx)
{
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
    if (ep->tx_head == tx)
        lm_tcp_tx_flush(ep);
}

static uint64_t frame_size(const lm_tcp_tx_t *tx)
{
    return sizeof(tx->hdr) + (tx->src ? tx->hdr.length : 0);
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
    return true;
}

void lm_tcp_tx_flush(lm_tcp_ep_t *ep)
{
    lm_context_t *ctx = ep->base.ctx;
    while (ep->tx_head && !ep->closed) {
        struct iovec iov[LM_TCP_MAX_IOV];
        int n = 0;
        lm_registry_rdlock(ctx);
        for (lm_tcp_tx_t *tx = ep->tx_head; tx && n + 2 <= LM_TCP_MAX_IOV; tx = tx->next) {
            if (tx->src && !tx->src->alive && !withdraw_dead_source(ep, tx))
                break;
            uint64_t done = tx->sent;
            if (done == 0) { /* every frame carries the newest acknowledgement */
                tx->hdr.ack = ep->rx_accepted;
                ep->rx_acked = ep->rx_accepted;
                ep->rx_unacked_bytes = 0;
                lm_timer_disarm(&ep->ack_timer);
            }
            if (done < sizeof(tx->hdr)) {
                iov[n].iov_base = (uint8_t *)&tx->hdr + done;
                iov[n++].iov_len = sizeof(tx->hdr) - done;
                done = sizeof(tx->hdr);
            }
            if (tx->src) {
                uint64_t off = done - sizeof(tx->hdr);
                iov[n].iov_base = tx->src->addr + tx->src_off + off;
                iov[n++].iov_len = tx->hdr.length - off;
            }
        }
        ssize_t sent = -1;
        if (!ep->closed && n > 0) {
            struct msghdr msg = {.msg_iov = iov, .msg_iovlen = (size_t)n};
            sent = sendmsg(ep->fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
        }
        int err = errno;
        lm_registry_unlock(ctx);
        if (ep->closed)
            return;
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
            ep->tx_head = tx->next;
            if (!ep->tx_head)
                ep->tx_tail = NULL;
            tx_release(ep, tx);
        }
    }
    set_out_interest(ep, ep->tx_head != NULL);
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
    shutdown(ep->fd, SHUT_RDWR);
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
