/* verbs_ep.c - verbs endpoints: one RC queue pair each. Bring-up
 * (RESET -> INIT -> RTR -> RTS), posting writes and reads with a host FIFO
 * behind the send queue, turning work completions into lamina completions,
 * failure and close. */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <unistd.h>

#include "verbs.h"

static uint32_t min_u32(uint32_t a, uint32_t b) { return a < b ? a : b; }

static uint64_t wr_id_of(const lm_verbs_ep_t *ep, uint32_t low)
{
    return ((uint64_t)ep->serial << 32) | low;
}

/* ---- address blob ------------------------------------------------------------ */

static void put_le16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}

static void put_le32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static uint16_t get_le16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }

static uint32_t get_le32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

void lm_verbs_addr_encode(const lm_verbs_addr_t *a, uint8_t out[LM_VERBS_ADDR_SIZE])
{
    memset(out, 0, LM_VERBS_ADDR_SIZE);
    out[0] = LM_VERBS_ADDR_MAGIC0;
    out[1] = LM_VERBS_ADDR_MAGIC1;
    out[2] = LM_VERBS_ADDR_VERSION;
    out[3] = a->link_layer;
    out[4] = a->mtu;
    out[5] = a->rd_atomic;
    put_le16(out + 6, a->lid);
    put_le32(out + 8, a->qpn);
    put_le32(out + 12, a->psn);
    memcpy(out + 16, a->gid, sizeof(a->gid));
}

int lm_verbs_addr_decode(const void *buf, size_t len, lm_verbs_addr_t *out)
{
    const uint8_t *p = buf;
    if (!p || len != LM_VERBS_ADDR_SIZE)
        return lm_fail(LM_ERR_PROTOCOL, "verbs: peer address is %zu bytes, expected %d", len,
                       LM_VERBS_ADDR_SIZE);
    if (p[0] != LM_VERBS_ADDR_MAGIC0 || p[1] != LM_VERBS_ADDR_MAGIC1)
        return lm_fail(LM_ERR_PROTOCOL, "verbs: peer address is not a lamina verbs address");
    if (p[2] != LM_VERBS_ADDR_VERSION)
        return lm_fail(LM_ERR_PROTOCOL, "verbs: peer address version %u (this side speaks %u)", p[2],
                       LM_VERBS_ADDR_VERSION);
    *out = (lm_verbs_addr_t){.link_layer = p[3], .mtu = p[4], .rd_atomic = p[5], .lid = get_le16(p + 6),
                             .qpn = get_le32(p + 8), .psn = get_le32(p + 12)};
    memcpy(out->gid, p + 16, sizeof(out->gid));
    if (out->mtu < IBV_MTU_256 || out->mtu > IBV_MTU_4096 || out->qpn >> 24 || out->psn >> 24)
        return lm_fail(LM_ERR_PROTOCOL, "verbs: peer address has a bad MTU, QPN or PSN");
    return LM_OK;
}

/* RDMA reads this side serves at once, as a responder (fits the blob's byte). */
static uint8_t offered_rd_atomic(const lm_verbs_iface_t *iface)
{
    return (uint8_t)min_u32((uint32_t)iface->dev_attr.max_qp_rd_atom, 16);
}

int lm_verbs_ep_address(lm_ep_t *base, void *buf, size_t *len)
{
    lm_verbs_ep_t *ep = (lm_verbs_ep_t *)base;
    const lm_verbs_iface_t *iface = ep->iface;
    if (!buf || *len < LM_VERBS_ADDR_SIZE) {
        *len = LM_VERBS_ADDR_SIZE;
        return lm_fail(LM_ERR_INVALID, "lm_ep_address: a verbs address needs %d bytes", LM_VERBS_ADDR_SIZE);
    }
    lm_verbs_addr_t a = {.link_layer = iface->link_layer, .mtu = (uint8_t)iface->active_mtu,
                         .rd_atomic = offered_rd_atomic(iface), .lid = iface->lid, .qpn = ep->qp_num,
                         .psn = ep->psn};
    memcpy(a.gid, iface->gid.raw, sizeof(a.gid));
    lm_verbs_addr_encode(&a, buf);
    *len = LM_VERBS_ADDR_SIZE;
    return LM_OK;
}

/* ---- completion bookkeeping (ep->lock held) -------------------------------------- */

static int status_of(enum ibv_wc_status s)
{
    switch (s) {
    case IBV_WC_SUCCESS:
        return LM_OK;
    /* The target's device refused the access: unknown rkey, a range outside
     * the region or a missing access right. Verbs does not say which. */
    case IBV_WC_REM_ACCESS_ERR:
    case IBV_WC_REM_INV_REQ_ERR:
    case IBV_WC_REM_OP_ERR:
        return LM_ERR_REMOTE;
    case IBV_WC_RETRY_EXC_ERR:
    case IBV_WC_RNR_RETRY_EXC_ERR:
        return LM_ERR_PEER_LOST;
    case IBV_WC_LOC_LEN_ERR:
    case IBV_WC_LOC_PROT_ERR:
    case IBV_WC_LOC_ACCESS_ERR:
        return LM_ERR_LOCAL;
    case IBV_WC_WR_FLUSH_ERR:
        return LM_ERR_CANCELED;
    default:
        return LM_ERR_IO;
    }
}

/* A receive WR fails when the device refused what the peer sent into it.
 * The refusal itself shows up only when the refused write consumed a receive
 * (a single-packet write with immediate); either way the QP is broken. */
static int recv_status_of(enum ibv_wc_status s)
{
    return s == IBV_WC_LOC_LEN_ERR ? LM_ERR_PROTOCOL   /* a SEND with a payload: not lamina's protocol */
                                   : LM_ERR_PEER_LOST; /* e.g. the peer's access was refused */
}

/* Operations caught by a failure they did not cause. */
static int flush_status(const lm_verbs_ep_t *ep)
{
    return atomic_load(&ep->base.error) == LM_ERR_PEER_LOST ? LM_ERR_PEER_LOST : LM_ERR_CANCELED;
}

static lm_verbs_op_t *dequeue_head(lm_verbs_ep_t *ep)
{
    lm_verbs_op_t *op = ep->wait_head;
    ep->wait_head = op->next;
    if (!ep->wait_head)
        ep->wait_tail = NULL;
    op->next = NULL;
    op->queued = false;
    return op;
}

/* Complete the op once it is neither waiting nor in flight; true if it did. */
static bool finish_if_done(lm_verbs_ep_t *ep, lm_verbs_op_t *op)
{
    if (op->queued || op->chunks_in_flight > 0)
        return false;
    lm_ep_complete(&ep->base, op->opcode, op->wr_id, op->status, op->length);
    lm_mr_unref(op->local);
    free(op->segs);
    op->segs = NULL;
    op->next = ep->op_free;
    ep->op_free = op;
    return true;
}

static bool chunk_done(lm_verbs_ep_t *ep, uint32_t slot, int status)
{
    lm_verbs_op_t *op = ep->slots[slot];
    ep->slots[slot] = NULL;
    ep->free_slots[ep->nfree++] = slot;
    lm_verbs_region_release(ep->iface, op->vmr);
    op->chunks_in_flight--;
    if (status != LM_OK && op->status == LM_OK)
        op->status = status;
    return finish_if_done(ep, op);
}

static void flush_waiting(lm_verbs_ep_t *ep)
{
    int status = flush_status(ep);
    while (ep->wait_head) {
        lm_verbs_op_t *op = dequeue_head(ep);
        if (op->status == LM_OK)
            op->status = status;
        finish_if_done(ep, op);
    }
}

/* Fail the endpoint once: record why, put the QP in the error state (the
 * device then flushes every posted WR back through the CQ), complete the
 * operations that never reached the device, and tell the peer by closing
 * our half of the control socket: an RC connection breaks for both sides
 * (a refused access also puts the target's QP in error, silently). */
static void fail_locked(lm_verbs_ep_t *ep, int status, const char *reason)
{
    if (ep->dead)
        return;
    ep->dead = true;
    int expected = 0;
    atomic_compare_exchange_strong(&ep->base.error, &expected, status);
    snprintf(ep->reason, sizeof(ep->reason), "%s", reason);
    struct ibv_qp_attr attr = {.qp_state = IBV_QPS_ERR};
    ibv_modify_qp(ep->qp, &attr, IBV_QP_STATE);
    if (ep->ctrl_fd >= 0)
        shutdown(ep->ctrl_fd, SHUT_WR);
    flush_waiting(ep);
}

void lm_verbs_ep_fail(lm_verbs_ep_t *ep, int status, const char *reason)
{
    pthread_mutex_lock(&ep->lock);
    fail_locked(ep, status, reason);
    pthread_mutex_unlock(&ep->lock);
}

static void fail_from_wc(lm_verbs_ep_t *ep, const struct ibv_wc *wc, int status, const char *side)
{
    char reason[sizeof(ep->reason)];
    snprintf(reason, sizeof(reason), "verbs: %s completion error on %s: %s (vendor error 0x%x)", side,
             ep->iface->dev_name, ibv_wc_status_str(wc->status), wc->vendor_err);
    /* A flush with no failure before it: the QP left RTS behind our back. */
    fail_locked(ep, wc->status == IBV_WC_WR_FLUSH_ERR ? LM_ERR_IO : status, reason);
}

/* ---- posting (ep->lock held) ----------------------------------------------------- */

static int post_receives(lm_verbs_ep_t *ep, uint32_t count)
{
    struct ibv_recv_wr wrs[LM_VERBS_RQ_BATCH];
    while (count > 0) {
        uint32_t n = min_u32(count, LM_VERBS_RQ_BATCH);
        /* No scatter list: a write with immediate only consumes the WR. */
        for (uint32_t i = 0; i < n; i++)
            wrs[i] = (struct ibv_recv_wr){.wr_id = wr_id_of(ep, LM_VERBS_RECV_TAG),
                                          .next = i + 1 < n ? &wrs[i + 1] : NULL};
        struct ibv_recv_wr *bad = NULL;
        int err = ibv_post_recv(ep->qp, wrs, &bad);
        if (err) {
            ep->rq_posted += bad ? (uint32_t)(bad - wrs) : 0;
            return lm_fail(LM_ERR_IO, "verbs: ibv_post_recv: %s", strerror(err));
        }
        ep->rq_posted += n;
        count -= n;
    }
    return LM_OK;
}

/* Take a reference the deregistration waits for, unless the region is
 * already being deregistered. */
static bool claim_region(lm_verbs_ep_t *ep, lm_verbs_op_t *op)
{
    lm_context_t *ctx = ep->base.ctx;
    lm_registry_rdlock(ctx);
    bool alive = op->local->alive;
    if (alive) {
        op->vmr = lm_verbs_region(ep->iface, op->local);
        if (op->vmr)
            atomic_fetch_add(&op->vmr->posted, 1);
    }
    lm_registry_unlock(ctx);
    return alive;
}

/* Fill a scatter-gather list with a gather op's next pieces, up to max_len
 * bytes and ep->max_sge entries; returns the bytes it covers and, in
 * *at / *skip, where the chunk after it would start. */
static uint32_t gather_sges(const lm_verbs_ep_t *ep, const lm_verbs_op_t *op, uint32_t max_len,
                            struct ibv_sge *sges, int *nsge, uint32_t *at, uint64_t *skip)
{
    uint32_t lkey = op->vmr ? op->vmr->ibv->lkey : 0, len = 0;
    *at = op->seg_at;
    *skip = op->seg_skip;
    *nsge = 0;
    while (*at < op->nsegs && len < max_len && (uint32_t)*nsge < ep->max_sge) {
        uint64_t piece = op->segs[*at].length - *skip;
        if (piece > max_len - len)
            piece = max_len - len;
        if (piece > 0)
            sges[(*nsge)++] = (struct ibv_sge){.addr = (uintptr_t)(op->local->addr + op->segs[*at].offset + *skip),
                                               .length = (uint32_t)piece, .lkey = lkey};
        len += (uint32_t)piece;
        *skip += piece;
        if (*skip == op->segs[*at].length) {
            (*at)++;
            *skip = 0;
        }
    }
    return len;
}

/* Post the op's next chunk (at most max_len bytes) into a free send-queue slot. */
static int post_chunk(lm_verbs_ep_t *ep, lm_verbs_op_t *op, uint32_t max_len)
{
    uint32_t slot = ep->free_slots[ep->nfree - 1];
    uint64_t off = op->posted_bytes;
    struct ibv_sge sges[LM_VERBS_MAX_SGE];
    int nsge = 0;
    uint32_t len = max_len, next_at = 0;
    uint64_t next_skip = 0;
    if (op->segs) {
        len = gather_sges(ep, op, max_len, sges, &nsge, &next_at, &next_skip);
    } else {
        sges[0] = (struct ibv_sge){.addr = (uintptr_t)(op->local->addr + op->local_off + off), .length = len,
                                   .lkey = op->vmr ? op->vmr->ibv->lkey : 0};
        nsge = len > 0;
    }
    bool last = off + len == op->length;
    struct ibv_send_wr wr = {.wr_id = wr_id_of(ep, slot), .sg_list = sges, .num_sge = nsge,
                             .send_flags = IBV_SEND_SIGNALED};
    wr.wr.rdma.remote_addr = op->remote_addr + off;
    wr.wr.rdma.rkey = op->rkey;
    if (op->opcode == LM_OP_READ) {
        wr.opcode = IBV_WR_RDMA_READ;
    } else {
        /* Only the last chunk carries the immediate: RC places every earlier
         * byte before the target sees it. */
        wr.opcode = op->with_imm && last ? IBV_WR_RDMA_WRITE_WITH_IMM : IBV_WR_RDMA_WRITE;
        wr.imm_data = htonl(op->imm);
        /* Inline data is copied by the CPU: never from device memory. */
        if (len > 0 && len <= ep->max_inline && !op->local->device)
            wr.send_flags |= IBV_SEND_INLINE;
    }
    struct ibv_send_wr *bad = NULL;
    int err = ibv_post_send(ep->qp, &wr, &bad);
    if (err)
        return err;
    ep->nfree--;
    ep->slots[slot] = op;
    op->chunks_in_flight++;
    op->posted_bytes += len;
    op->seg_at = next_at;
    op->seg_skip = next_skip;
    return 0;
}

/* Move waiting operations to the send queue while it has room. */
static void issue_waiting(lm_verbs_ep_t *ep)
{
    while (ep->wait_head && ep->nfree > 0 && ep->peer_ready && !ep->dead) {
        lm_verbs_op_t *op = ep->wait_head;
        if (!claim_region(ep, op)) { /* deregistered while it waited */
            dequeue_head(ep);
            op->status = LM_ERR_LOCAL;
            finish_if_done(ep, op);
            continue;
        }
        uint64_t left = op->length - op->posted_bytes;
        int err = post_chunk(ep, op, left < ep->iface->max_chunk ? (uint32_t)left : ep->iface->max_chunk);
        if (err) {
            lm_verbs_region_release(ep->iface, op->vmr);
            op->status = LM_ERR_IO;
            char reason[96];
            snprintf(reason, sizeof(reason), "verbs: ibv_post_send: %s", strerror(err));
            fail_locked(ep, LM_ERR_IO, reason);
            return;
        }
        if (op->posted_bytes == op->length)
            dequeue_head(ep);
    }
}

static lm_verbs_op_t *op_alloc(lm_verbs_ep_t *ep)
{
    lm_verbs_op_t *op = ep->op_free;
    if (op)
        ep->op_free = op->next;
    else
        op = malloc(sizeof(*op));
    return op;
}

static int submit(lm_verbs_ep_t *ep, const lm_verbs_op_t *proto)
{
    int rc = LM_OK;
    pthread_mutex_lock(&ep->lock);
    lm_verbs_op_t *op = NULL;
    if (ep->dead) {
        int err = atomic_load(&ep->base.error);
        rc = lm_fail(err ? err : LM_ERR_CLOSED, "verbs endpoint failed: %s", ep->reason);
    } else if (!ep->connected) {
        rc = lm_fail(LM_ERR_INVALID, "verbs endpoint is not connected yet (lm_ep_connect)");
    } else if (!(op = op_alloc(ep))) {
        rc = lm_fail(LM_ERR_NO_MEMORY, "no memory for another queued operation");
    } else {
        *op = *proto;
        op->queued = true;
        lm_mr_ref(op->local);
        if (ep->wait_tail)
            ep->wait_tail->next = op;
        else
            ep->wait_head = op;
        ep->wait_tail = op;
        issue_waiting(ep);
    }
    pthread_mutex_unlock(&ep->lock);
    return rc;
}

int lm_verbs_ep_write(lm_ep_t *base, lm_mr_t *local, uint64_t local_off, uint64_t length,
                      const lm_rdesc_t *remote, uint64_t remote_off, uint32_t imm, uint32_t flags,
                      uint64_t wr_id)
{
    lm_verbs_op_t op = {.wr_id = wr_id, .opcode = LM_OP_WRITE, .with_imm = (flags & LM_WRITE_IMM) != 0,
                        .imm = imm, .local = local, .local_off = local_off, .length = length,
                        .remote_addr = remote->addr + remote_off, .rkey = remote->rkey};
    return submit((lm_verbs_ep_t *)base, &op);
}

/* Posted as WRs of up to max_send_sge pieces each; only the last carries
 * the immediate. */
int lm_verbs_ep_writev(lm_ep_t *base, lm_mr_t *local, lm_seg_t *segs, uint32_t nsegs, uint64_t length,
                       const lm_rdesc_t *remote, uint64_t remote_off, uint32_t imm, uint32_t flags,
                       uint64_t wr_id)
{
    lm_verbs_op_t op = {.wr_id = wr_id, .opcode = LM_OP_WRITE, .with_imm = (flags & LM_WRITE_IMM) != 0,
                        .imm = imm, .local = local, .length = length, .segs = segs, .nsegs = nsegs,
                        .remote_addr = remote->addr + remote_off, .rkey = remote->rkey};
    int rc = submit((lm_verbs_ep_t *)base, &op);
    if (rc != LM_OK)
        free(segs); /* never queued: the list is still ours (transport.h) */
    return rc;
}

int lm_verbs_ep_read(lm_ep_t *base, lm_mr_t *local, uint64_t local_off, uint64_t length,
                     const lm_rdesc_t *remote, uint64_t remote_off, uint64_t wr_id)
{
    lm_verbs_op_t op = {.wr_id = wr_id, .opcode = LM_OP_READ, .local = local, .local_off = local_off,
                        .length = length, .remote_addr = remote->addr + remote_off, .rkey = remote->rkey};
    return submit((lm_verbs_ep_t *)base, &op);
}

/* ---- work completions (dispatch, iface table lock held) ---------------------------- */

static bool on_recv(lm_verbs_ep_t *ep, const struct ibv_wc *wc)
{
    ep->rq_posted--;
    if (wc->status != IBV_WC_SUCCESS) {
        if (wc->status != IBV_WC_WR_FLUSH_ERR)
            fail_from_wc(ep, wc, recv_status_of(wc->status), "receive");
        return false;
    }
    /* A plain SEND carries nothing lamina uses; its receive is just replaced. */
    bool imm = wc->opcode == IBV_WC_RECV_RDMA_WITH_IMM;
    if (imm) {
        lm_completion_t c = {.ep_id = ep->base.id, .byte_len = wc->byte_len, .status = LM_OK,
                             .opcode = LM_OP_RECV_IMM, .imm = ntohl(wc->imm_data), .flags = LM_CF_IMM};
        lm_ep_push(&ep->base, &c);
    }
    if (!ep->dead && ep->rq_depth - ep->rq_posted >= LM_VERBS_RQ_BATCH &&
        post_receives(ep, ep->rq_depth - ep->rq_posted) != LM_OK)
        fail_locked(ep, LM_ERR_IO, lm_last_error());
    return imm;
}

static bool on_send(lm_verbs_ep_t *ep, const struct ibv_wc *wc)
{
    uint32_t slot = (uint32_t)wc->wr_id;
    if (slot >= ep->sq_depth || !ep->slots[slot])
        return false;
    const char *what = ep->slots[slot]->opcode == LM_OP_READ ? "RDMA read" : "RDMA write";
    int status = status_of(wc->status);
    /* The op that failed completes first, with the cause; the rest flush. */
    bool completed = chunk_done(ep, slot, wc->status == IBV_WC_WR_FLUSH_ERR ? flush_status(ep) : status);
    if (wc->status != IBV_WC_SUCCESS)
        fail_from_wc(ep, wc, status, what);
    else
        issue_waiting(ep);
    return completed;
}

bool lm_verbs_ep_on_wc(lm_verbs_ep_t *ep, const struct ibv_wc *wc)
{
    pthread_mutex_lock(&ep->lock);
    bool delivered = (uint32_t)wc->wr_id == LM_VERBS_RECV_TAG ? on_recv(ep, wc) : on_send(ep, wc);
    pthread_mutex_unlock(&ep->lock);
    return delivered;
}

/* ---- control socket (dispatch) --------------------------------------------------- */

static void on_peer_ready(lm_verbs_ep_t *ep)
{
    pthread_mutex_lock(&ep->lock);
    ep->peer_ready = true;
    issue_waiting(ep);
    pthread_mutex_unlock(&ep->lock);
}

/* The bootstrap socket stays open for the endpoint's life. The peer writes
 * one ready byte on it once its QP is in RTS, nothing else: EOF or an error
 * means its process or endpoint is gone. */
static void on_ctrl(void *arg, uint32_t events)
{
    lm_verbs_ep_t *ep = arg;
    char scratch[64];
    ssize_t n = recv(ep->ctrl_fd, scratch, sizeof(scratch), MSG_DONTWAIT);
    if (n > 0) {
        if (memchr(scratch, LM_VERBS_READY_BYTE, (size_t)n))
            on_peer_ready(ep);
        return;
    }
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) &&
        !(events & (EPOLLHUP | EPOLLERR | EPOLLRDHUP)))
        return;
    lm_progress_del(ep->base.ctx, &ep->ctrl_handler);
    lm_verbs_ep_fail(ep, LM_ERR_PEER_LOST,
                     n == 0 ? "verbs: the peer closed the control connection (process exited or endpoint closed)"
                            : "verbs: the control connection to the peer failed");
}

/* Watch the control socket and tell the peer our QP is ready. Until the
 * peer's ready byte arrives, operations wait in the FIFO: a packet reaching
 * a QP not yet in RTR is dropped and costs a transport retry timeout. */
static int watch_ctrl(lm_verbs_ep_t *ep)
{
    if (ep->ctrl_fd < 0) { /* the caller synchronises the two sides itself */
        ep->peer_ready = true;
        return LM_OK;
    }
    int flags = fcntl(ep->ctrl_fd, F_GETFL);
    if (flags >= 0)
        fcntl(ep->ctrl_fd, F_SETFL, flags | O_NONBLOCK);
    ep->ctrl_handler = (lm_io_handler_t){.fd = ep->ctrl_fd, .cb = on_ctrl, .arg = ep};
    int rc = lm_progress_add(ep->base.ctx, &ep->ctrl_handler, EPOLLIN | EPOLLRDHUP);
    ep->ctrl_watched = rc == LM_OK;
    const char ready = LM_VERBS_READY_BYTE;
    if (rc == LM_OK && send(ep->ctrl_fd, &ready, 1, MSG_DONTWAIT | MSG_NOSIGNAL) != 1)
        rc = lm_fail(LM_ERR_PEER_LOST, "verbs: sending the ready byte to the peer: %s", strerror(errno));
    return rc;
}

/* ---- queue pair bring-up ------------------------------------------------------- */

static int modify_qp(lm_verbs_ep_t *ep, struct ibv_qp_attr *attr, int mask, const char *state)
{
    int err = ibv_modify_qp(ep->qp, attr, mask);
    if (err)
        return lm_fail(LM_ERR_IO, "verbs: moving QP 0x%x on %s to %s: %s", ep->qp_num, ep->iface->dev_name,
                       state, strerror(err));
    return LM_OK;
}

static int create_qp(lm_verbs_ep_t *ep)
{
    lm_verbs_iface_t *iface = ep->iface;
    uint32_t max_wr = (uint32_t)iface->dev_attr.max_qp_wr;
    ep->sq_depth = min_u32(LM_VERBS_SQ_DEPTH, max_wr);
    ep->rq_depth = min_u32(LM_VERBS_RQ_DEPTH, max_wr);
    struct ibv_qp_init_attr attr = {
        .send_cq = iface->cq, .recv_cq = iface->cq, .qp_type = IBV_QPT_RC,
        .cap = {.max_send_wr = ep->sq_depth, .max_recv_wr = ep->rq_depth,
                .max_send_sge = (uint32_t)(iface->dev_attr.max_sge < LM_VERBS_MAX_SGE ? iface->dev_attr.max_sge
                                                                                       : LM_VERBS_MAX_SGE),
                .max_recv_sge = 1, .max_inline_data = LM_VERBS_MAX_INLINE},
    };
    ep->qp = ibv_create_qp(iface->pd, &attr);
    if (!ep->qp) { /* some devices have no inline data at all */
        attr.cap.max_inline_data = 0;
        ep->qp = ibv_create_qp(iface->pd, &attr);
    }
    if (!ep->qp)
        return lm_fail(LM_ERR_IO, "verbs: ibv_create_qp on %s: %s", iface->dev_name, strerror(errno));
    ep->max_inline = attr.cap.max_inline_data; /* what the device granted */
    ep->max_sge = attr.cap.max_send_sge > 0 ? min_u32(attr.cap.max_send_sge, LM_VERBS_MAX_SGE) : 1;
    ep->qp_num = ep->qp->qp_num;
    struct ibv_qp_attr init = {.qp_state = IBV_QPS_INIT, .pkey_index = 0, .port_num = iface->port,
                               .qp_access_flags = IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE |
                                                  IBV_ACCESS_REMOTE_READ};
    return modify_qp(ep, &init, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS, "INIT");
}

static int qp_to_rtr(lm_verbs_ep_t *ep, const lm_verbs_addr_t *peer)
{
    const lm_verbs_iface_t *iface = ep->iface;
    struct ibv_qp_attr attr = {
        .qp_state = IBV_QPS_RTR,
        .path_mtu = peer->mtu < iface->active_mtu ? (enum ibv_mtu)peer->mtu : iface->active_mtu,
        .dest_qp_num = peer->qpn,
        .rq_psn = peer->psn,
        .max_dest_rd_atomic = offered_rd_atomic(iface),
        .min_rnr_timer = LM_VERBS_MIN_RNR_TIMER,
        .ah_attr = {.dlid = peer->lid, .port_num = iface->port},
    };
    /* RoCE routes by GID; InfiniBand inside a subnet by LID. */
    if (iface->link_layer == IBV_LINK_LAYER_ETHERNET) {
        attr.ah_attr.is_global = 1;
        memcpy(attr.ah_attr.grh.dgid.raw, peer->gid, sizeof(peer->gid));
        attr.ah_attr.grh.sgid_index = (uint8_t)iface->gid_index;
        attr.ah_attr.grh.hop_limit = 64;
    }
    return modify_qp(ep, &attr,
                     IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN | IBV_QP_RQ_PSN |
                         IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER,
                     "RTR");
}

static int qp_to_rts(lm_verbs_ep_t *ep, const lm_verbs_addr_t *peer)
{
    uint32_t reads = min_u32((uint32_t)ep->iface->dev_attr.max_qp_init_rd_atom, peer->rd_atomic);
    struct ibv_qp_attr attr = {.qp_state = IBV_QPS_RTS, .timeout = LM_VERBS_TIMEOUT,
                               .retry_cnt = LM_VERBS_RETRY_CNT, .rnr_retry = LM_VERBS_RNR_RETRY,
                               .sq_psn = ep->psn, .max_rd_atomic = (uint8_t)reads};
    return modify_qp(ep, &attr,
                     IBV_QP_STATE | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY | IBV_QP_SQ_PSN |
                         IBV_QP_MAX_QP_RD_ATOMIC,
                     "RTS");
}

int lm_verbs_ep_connect(lm_ep_t *base, const void *peer, size_t len, int ctrl_fd)
{
    lm_verbs_ep_t *ep = (lm_verbs_ep_t *)base;
    pthread_mutex_lock(&ep->lock);
    if (ep->connected || ep->ctrl_fd >= 0 || ep->dead) {
        pthread_mutex_unlock(&ep->lock);
        if (ctrl_fd >= 0)
            close(ctrl_fd);
        return lm_fail(LM_ERR_INVALID, "lm_ep_connect: verbs endpoint already connected or failed");
    }
    ep->ctrl_fd = ctrl_fd; /* ours from here on; closed with the endpoint */
    lm_verbs_addr_t pa;
    int rc = lm_verbs_addr_decode(peer, len, &pa);
    if (rc == LM_OK && pa.link_layer != ep->iface->link_layer)
        rc = lm_fail(LM_ERR_UNSUPPORTED, "verbs: the peer's link layer (%u) differs from %s's (%u)",
                     pa.link_layer, ep->iface->dev_name, ep->iface->link_layer);
    if (rc == LM_OK)
        rc = qp_to_rtr(ep, &pa);
    if (rc == LM_OK)
        rc = qp_to_rts(ep, &pa);
    if (rc == LM_OK)
        rc = watch_ctrl(ep);
    ep->connected = rc == LM_OK;
    pthread_mutex_unlock(&ep->lock);
    return rc;
}

/* ---- life cycle ---------------------------------------------------------------- */

static int alloc_slots(lm_verbs_ep_t *ep)
{
    ep->slots = calloc(ep->sq_depth, sizeof(*ep->slots));
    ep->free_slots = calloc(ep->sq_depth, sizeof(*ep->free_slots));
    if (!ep->slots || !ep->free_slots)
        return lm_fail(LM_ERR_NO_MEMORY, "verbs: endpoint allocation failed");
    for (uint32_t i = 0; i < ep->sq_depth; i++)
        ep->free_slots[i] = ep->sq_depth - 1 - i;
    ep->nfree = ep->sq_depth;
    return LM_OK;
}

static void ep_free(lm_verbs_ep_t *ep, bool in_table)
{
    if (in_table)
        lm_verbs_table_remove(ep->iface, ep);
    if (ep->qp)
        ibv_destroy_qp(ep->qp);
    if (ep->ctrl_fd >= 0)
        close(ep->ctrl_fd);
    while (ep->op_free) {
        lm_verbs_op_t *next = ep->op_free->next;
        free(ep->op_free);
        ep->op_free = next;
    }
    free(ep->slots);
    free(ep->free_slots);
    pthread_mutex_destroy(&ep->lock);
    free(ep);
}

static uint32_t random_psn(void)
{
    uint32_t psn = 0;
    if (getrandom(&psn, sizeof(psn), 0) != (ssize_t)sizeof(psn))
        psn = (uint32_t)rand();
    return psn & 0xffffff;
}

int lm_verbs_ep_create(void *iface_ptr, uint64_t ep_id, int fd, lm_ep_t **out)
{
    (void)fd; /* the control socket comes with lm_ep_connect */
    lm_verbs_iface_t *iface = iface_ptr;
    lm_verbs_ep_t *ep = calloc(1, sizeof(*ep));
    if (!ep)
        return lm_fail(LM_ERR_NO_MEMORY, "verbs: endpoint allocation failed");
    ep->iface = iface;
    ep->base.ctx = iface->ctx;
    ep->base.id = ep_id;
    ep->ctrl_fd = -1;
    ep->psn = random_psn();
    pthread_mutex_init(&ep->lock, NULL);
    int rc = create_qp(ep);
    if (rc == LM_OK)
        rc = alloc_slots(ep);
    bool in_table = false;
    if (rc == LM_OK)
        in_table = (rc = lm_verbs_table_add(iface, ep)) == LM_OK;
    /* Receives may be posted from INIT on; the serial (table_add) is in their wr_id. */
    if (rc == LM_OK)
        rc = post_receives(ep, ep->rq_depth);
    if (rc != LM_OK) {
        ep_free(ep, in_table);
        return rc;
    }
    *out = &ep->base;
    return LM_OK;
}

void lm_verbs_ep_destroy(lm_ep_t *base)
{
    lm_verbs_ep_t *ep = (lm_verbs_ep_t *)base;
    lm_context_t *ctx = ep->base.ctx;
    lm_verbs_ep_fail(ep, LM_ERR_CANCELED, "verbs: endpoint closed");
    if (ep->ctrl_watched) {
        lm_progress_del(ctx, &ep->ctrl_handler);
        lm_progress_barrier(ctx);
    }
    /* Out of the table, no completion reaches the endpoint any more; once the
     * QP is destroyed the device no longer touches the memory of WRs still
     * posted, so they complete here. */
    lm_verbs_table_remove(ep->iface, ep);
    ibv_destroy_qp(ep->qp);
    ep->qp = NULL;
    pthread_mutex_lock(&ep->lock);
    for (uint32_t slot = 0; slot < ep->sq_depth; slot++)
        if (ep->slots[slot])
            chunk_done(ep, slot, flush_status(ep));
    pthread_mutex_unlock(&ep->lock);
    ep_free(ep, false);
}
