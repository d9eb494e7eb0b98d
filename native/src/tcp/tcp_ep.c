/* tcp_ep.c - tcp endpoints: socket set-up, posting writes and reads, close;
 * and the transport's table. */
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include "tcp.h"

static int iface_open(lm_context_t *ctx, const lm_context_params_t *params, void **out, char *why,
                      size_t why_len)
{
    (void)params;
    lm_tcp_iface_t *iface = calloc(1, sizeof(*iface));
    if (!iface) {
        snprintf(why, why_len, "tcp: out of memory");
        return LM_ERR_NO_MEMORY;
    }
    iface->ctx = ctx;
    iface->keepalive_ms = ctx->keepalive_ms;
    *out = iface;
    return LM_OK;
}

static void iface_close(void *iface)
{
    free(iface);
}

/* Kernel keepalive bounds how long a vanished host goes unnoticed; a peer
 * process that dies is seen at once (FIN/RST). */
static void tune_socket(int fd, uint32_t keepalive_ms)
{
    int one = 1;
    int secs = (int)(keepalive_ms / 3000) > 0 ? (int)(keepalive_ms / 3000) : 1;
    int probes = 3;
    unsigned int user_timeout = keepalive_ms;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one));
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &secs, sizeof(secs));
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &secs, sizeof(secs));
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &probes, sizeof(probes));
    setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &user_timeout, sizeof(user_timeout));
}

static ssize_t socket_send(lm_tcp_ep_t *ep, const struct iovec *iov, int n)
{
    struct msghdr msg = {.msg_iov = (struct iovec *)iov, .msg_iovlen = (size_t)n};
    return sendmsg(ep->fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
}

static ssize_t socket_recv(lm_tcp_ep_t *ep, void *buf, size_t len, bool *drained)
{
    ssize_t n = recv(ep->fd, buf, len, MSG_DONTWAIT);
    /* A short read emptied the socket; level-triggered epoll reports anything newer. */
    *drained = n >= 0 && (size_t)n < len;
    return n;
}

static void socket_shutdown(lm_tcp_ep_t *ep)
{
    shutdown(ep->fd, SHUT_RDWR);
}

static void socket_release(lm_tcp_ep_t *ep)
{
    (void)ep;
}

const lm_tcp_io_t lm_tcp_socket_io = {
    .send = socket_send, .recv = socket_recv, .shutdown = socket_shutdown, .release = socket_release,
    .out_event = EPOLLOUT,
    .transport = &lm_tcp_transport,
};

int lm_tcp_ep_init(lm_tcp_iface_t *iface, uint64_t ep_id, int fd, const lm_tcp_io_t *io, void *io_priv,
                   lm_io_cb cb, bool watch, lm_tcp_ep_t **out)
{
    lm_tcp_ep_t *ep = calloc(1, sizeof(*ep));
    if (!ep) {
        close(fd);
        return lm_fail(LM_ERR_NO_MEMORY, "endpoint allocation failed");
    }
    ep->iface = iface;
    ep->fd = fd;
    ep->io = io;
    ep->io_priv = io_priv;
    ep->base.ctx = iface->ctx;
    ep->base.id = ep_id;
    ep->base.ops = io->transport;
    pthread_mutex_init(&ep->lock, NULL);
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    tune_socket(fd, iface->keepalive_ms);
    ep->in_armed = true;
    ep->handler = (lm_io_handler_t){.fd = fd, .cb = cb, .arg = ep};
    lm_tcp_ack_timer_init(ep);
    int rc = watch ? lm_tcp_ep_watch(ep) : LM_OK;
    if (rc != LM_OK) {
        pthread_mutex_destroy(&ep->lock);
        close(fd);
        free(ep);
        return rc;
    }
    *out = ep;
    return LM_OK;
}

int lm_tcp_ep_watch(lm_tcp_ep_t *ep)
{
    return lm_progress_add(ep->base.ctx, &ep->handler, EPOLLIN);
}

int lm_tcp_ep_create(void *iface_ptr, uint64_t ep_id, int fd, lm_ep_t **out)
{
    int type = 0;
    socklen_t len = sizeof(type);
    if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) != 0 || type != SOCK_STREAM) {
        close(fd);
        return lm_fail(LM_ERR_INVALID, "lm_ep_create_tcp: fd %d is not a stream socket", fd);
    }
    lm_tcp_ep_t *ep = NULL;
    int rc = lm_tcp_ep_init(iface_ptr, ep_id, fd, &lm_tcp_socket_io, NULL, lm_tcp_on_io, true, &ep);
    if (rc == LM_OK)
        *out = &ep->base;
    return rc;
}

/* How many READ_REQs (and sequence numbers) a read of length bytes takes. */
static uint32_t read_pieces(uint64_t length)
{
    return length <= LM_TCP_READ_CHUNK ? 1u : (uint32_t)((length + LM_TCP_READ_CHUNK - 1) / LM_TCP_READ_CHUNK);
}

/* Assign sequence numbers and remember the operation (caller holds lock). */
static lm_tcp_pending_t *track(lm_tcp_ep_t *ep, uint8_t type, uint64_t wr_id, uint64_t length)
{
    lm_tcp_pending_t *op = lm_tcp_pending_alloc(ep);
    if (!op)
        return NULL;
    op->type = type;
    op->pieces = type == LM_TCP_READ_REQ ? read_pieces(length) : 1;
    op->seq = ep->next_seq;
    ep->next_seq += op->pieces;
    op->wr_id = wr_id;
    op->length = length;
    if (ep->pend_tail)
        ep->pend_tail->next = op;
    else
        ep->pend_head = op;
    ep->pend_tail = op;
    return op;
}

lm_tcp_map_t *lm_tcp_map_find(lm_tcp_ep_t *ep, uint64_t key)
{
    for (uint32_t i = 0; i < ep->nmaps; i++)
        if (ep->maps[i].key == key)
            return &ep->maps[i];
    return NULL;
}

/* A write into a region of the peer, over a stream that can map it: the
 * region's mapping entry, asking the peer for it (MAP_REQ) the first time.
 * Until it is granted, writes go through the stream (caller holds lock). */
static lm_tcp_map_t *map_for_write(lm_tcp_ep_t *ep, const lm_rdesc_t *remote)
{
    if (!ep->io->map_peer)
        return NULL;
    lm_tcp_map_t *m = lm_tcp_map_find(ep, remote->key);
    /* (A descriptor without REMOTE_WRITE asks for nothing, but a known entry
     * still learns of the write: it goes through the stream, in order.) */
    if (m || !(remote->access & LM_ACCESS_REMOTE_WRITE))
        return m;
    if (ep->nmaps < LM_TCP_MAX_MAPS) {
        m = &ep->maps[ep->nmaps];
    } else { /* reuse an entry of a region that was refused and that no queued frame points at */
        for (uint32_t i = 0; i < ep->nmaps && !m; i++)
            if (ep->maps[i].state == MAP_REFUSED && ep->maps[i].queued == 0)
                m = &ep->maps[i];
        if (!m)
            return NULL;
    }
    lm_tcp_tx_t *req = lm_tcp_tx_alloc(ep);
    if (!req)
        return NULL;
    if (m == &ep->maps[ep->nmaps])
        ep->nmaps++;
    *m = (lm_tcp_map_t){.key = remote->key, .state = MAP_PENDING};
    req->hdr.type = LM_TCP_MAP_REQ;
    req->hdr.key = remote->key;
    lm_tcp_tx_queue(ep, req);
    return m;
}

static int post(lm_tcp_ep_t *ep, uint8_t type, lm_mr_t *local, uint64_t local_off, uint64_t length,
                const lm_rdesc_t *remote, uint64_t remote_off, uint32_t imm, uint8_t flags,
                uint64_t wr_id, lm_seg_t *segs, uint32_t nsegs)
{
    pthread_mutex_lock(&ep->lock);
    if (ep->closed) {
        int err = atomic_load(&ep->base.error);
        pthread_mutex_unlock(&ep->lock);
        free(segs);
        return lm_fail(err ? err : LM_ERR_CLOSED, "endpoint is closed: %s", lm_status_str(err));
    }
    lm_tcp_tx_t *tx = lm_tcp_tx_alloc(ep);
    lm_tcp_pending_t *op = tx ? track(ep, type, wr_id, length) : NULL;
    if (!op) {
        if (tx) {
            tx->next = ep->tx_free;
            ep->tx_free = tx;
        }
        pthread_mutex_unlock(&ep->lock);
        free(segs);
        return lm_fail(LM_ERR_NO_MEMORY, "no memory for another queued operation");
    }
    tx->hdr.type = type;
    tx->hdr.flags = flags;
    tx->hdr.imm = imm;
    tx->hdr.seq = op->seq;
    tx->hdr.key = remote->key;
    tx->hdr.offset = remote_off;
    tx->hdr.length = length;
    lm_mr_ref(local);
    if (type == LM_TCP_WRITE) {
        tx->src = local;
        tx->src_off = local_off;
        tx->segs = segs; /* the frame owns the list now */
        tx->nsegs = nsegs;
        tx->op = op;
        tx->map = map_for_write(ep, remote);
        if (tx->map)
            tx->map->queued++;
    } else { /* sent in pieces of LM_TCP_READ_CHUNK (tcp_tx.c: next_read_piece) */
        op->dest = local;
        op->dest_off = local_off;
        tx->hdr.length = length < LM_TCP_READ_CHUNK ? length : LM_TCP_READ_CHUNK;
        tx->read_left = length - tx->hdr.length;
        tx->pieces_left = op->pieces - 1;
    }
    lm_tcp_tx_queue(ep, tx);
    pthread_mutex_unlock(&ep->lock);
    return LM_OK;
}

int lm_tcp_ep_write(lm_ep_t *base, lm_mr_t *local, uint64_t local_off, uint64_t length,
                    const lm_rdesc_t *remote, uint64_t remote_off, uint32_t imm, uint32_t flags,
                    uint64_t wr_id)
{
    return post((lm_tcp_ep_t *)base, LM_TCP_WRITE, local, local_off, length, remote, remote_off, imm,
                (flags & LM_WRITE_IMM) ? LM_TCP_FLAG_IMM : 0, wr_id, NULL, 0);
}

/* One WRITE frame whose payload is gathered from the pieces at send time:
 * the wire and the target see an ordinary write. */
int lm_tcp_ep_writev(lm_ep_t *base, lm_mr_t *local, lm_seg_t *segs, uint32_t nsegs, uint64_t length,
                     const lm_rdesc_t *remote, uint64_t remote_off, uint32_t imm, uint32_t flags,
                     uint64_t wr_id)
{
    return post((lm_tcp_ep_t *)base, LM_TCP_WRITE, local, 0, length, remote, remote_off, imm,
                (flags & LM_WRITE_IMM) ? LM_TCP_FLAG_IMM : 0, wr_id, segs, nsegs);
}

int lm_tcp_ep_read(lm_ep_t *base, lm_mr_t *local, uint64_t local_off, uint64_t length,
                   const lm_rdesc_t *remote, uint64_t remote_off, uint64_t wr_id)
{
    return post((lm_tcp_ep_t *)base, LM_TCP_READ_REQ, local, local_off, length, remote, remote_off, 0, 0,
                wr_id, NULL, 0);
}

static void free_list_tx(lm_tcp_tx_t *tx)
{
    while (tx) {
        lm_tcp_tx_t *next = tx->next;
        free(tx);
        tx = next;
    }
}

static void free_list_pending(lm_tcp_pending_t *op)
{
    while (op) {
        lm_tcp_pending_t *next = op->next;
        free(op);
        op = next;
    }
}

void lm_tcp_ep_destroy(lm_ep_t *base)
{
    lm_tcp_ep_t *ep = (lm_tcp_ep_t *)base;
    pthread_mutex_lock(&ep->lock);
    /* A graceful close still owes the peer its acknowledgement: writes that
     * landed here must not complete as lost over there. */
    if (!ep->closed)
        lm_tcp_ack_now_locked(ep);
    lm_tcp_fail_locked(ep, LM_ERR_CANCELED);
    pthread_mutex_unlock(&ep->lock);
    lm_progress_del(ep->base.ctx, &ep->handler);
    lm_timer_cancel(ep->base.ctx, &ep->ack_timer);
    lm_progress_barrier(ep->base.ctx);
    lm_tcp_rx_cleanup(ep, atomic_load(&ep->base.error));
    for (uint32_t i = 0; i < ep->nmaps; i++)
        if (ep->maps[i].state == MAP_READY)
            munmap(ep->maps[i].addr, ep->maps[i].length);
    ep->io->release(ep);
    close(ep->fd);
    free_list_tx(ep->tx_free);
    free_list_pending(ep->pend_free);
    pthread_mutex_destroy(&ep->lock);
    free(ep);
}

const lm_transport_ops_t lm_tcp_transport = {
    .name = "tcp",
    .id = LM_TRANSPORT_TCP,
    .caps = LM_CAP_ZERO_COPY_SEND | LM_CAP_ZERO_COPY_RECV | LM_CAP_REMOTE_ACK,
    .iface_open = iface_open,
    .iface_close = iface_close,
    .ep_create = lm_tcp_ep_create,
    .ep_write = lm_tcp_ep_write,
    .ep_writev = lm_tcp_ep_writev,
    .ep_read = lm_tcp_ep_read,
    .ep_destroy = lm_tcp_ep_destroy,
};
