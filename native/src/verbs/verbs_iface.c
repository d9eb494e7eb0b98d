/* verbs_iface.c - a context's verbs interface: one completion queue shared by
 * every queue pair, whose channel and the device's async-event fd sit in the
 * progress engine's epoll; the QP-number table that routes completions; and
 * the transport's table. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <time.h>

#include "verbs.h"

/* ---- the QP table ----------------------------------------------------------- */

static lm_verbs_ep_t **bucket_of(lm_verbs_iface_t *iface, uint32_t qp_num)
{
    return &iface->table[qp_num % LM_VERBS_TABLE_BUCKETS];
}

static lm_verbs_ep_t *table_find(lm_verbs_iface_t *iface, uint32_t qp_num)
{
    lm_verbs_ep_t *ep = *bucket_of(iface, qp_num);
    while (ep && ep->qp_num != qp_num)
        ep = ep->table_next;
    return ep;
}

/* Every WR of every live QP may complete at once, and a closed QP's flushed
 * WRs may still sit in the CQ: keep room for twice what live QPs can post
 * (an overrun CQ would break every endpoint of the context). */
static int reserve_cq(lm_verbs_iface_t *iface, int entries)
{
    int want = 2 * (iface->cq_reserved + entries);
    if (want > iface->cq_size) {
        int size = iface->cq_size;
        while (size < want && size <= iface->dev_attr.max_cqe / 2)
            size *= 2;
        if (size < want && iface->dev_attr.max_cqe >= want)
            size = iface->dev_attr.max_cqe;
        if (size < want)
            return lm_fail(LM_ERR_NO_MEMORY,
                           "verbs: %s's completion queue cannot hold another queue pair (device max %d "
                           "entries, %d reserved); close endpoints first",
                           iface->dev_name, iface->dev_attr.max_cqe, iface->cq_reserved);
        if (ibv_resize_cq(iface->cq, size) != 0)
            return lm_fail(LM_ERR_IO, "verbs: ibv_resize_cq(%d) on %s: %s", size, iface->dev_name,
                           strerror(errno));
        iface->cq_size = iface->cq->cqe;
    }
    iface->cq_reserved += entries;
    return LM_OK;
}

int lm_verbs_table_add(lm_verbs_iface_t *iface, lm_verbs_ep_t *ep)
{
    pthread_mutex_lock(&iface->table_lock);
    int rc = reserve_cq(iface, (int)(ep->sq_depth + ep->rq_depth));
    if (rc == LM_OK) {
        ep->serial = iface->next_serial++;
        lm_verbs_ep_t **head = bucket_of(iface, ep->qp_num);
        ep->table_next = *head;
        *head = ep;
    }
    pthread_mutex_unlock(&iface->table_lock);
    return rc;
}

void lm_verbs_table_remove(lm_verbs_iface_t *iface, lm_verbs_ep_t *ep)
{
    pthread_mutex_lock(&iface->table_lock);
    lm_verbs_ep_t **pp = bucket_of(iface, ep->qp_num);
    while (*pp && *pp != ep)
        pp = &(*pp)->table_next;
    if (*pp) {
        *pp = ep->table_next;
        iface->cq_reserved -= (int)(ep->sq_depth + ep->rq_depth);
    }
    pthread_mutex_unlock(&iface->table_lock);
}

static void fail_all(lm_verbs_iface_t *iface, int status, const char *reason)
{
    pthread_mutex_lock(&iface->table_lock);
    for (int b = 0; b < LM_VERBS_TABLE_BUCKETS; b++)
        for (lm_verbs_ep_t *ep = iface->table[b]; ep; ep = ep->table_next)
            lm_verbs_ep_fail(ep, status, reason);
    pthread_mutex_unlock(&iface->table_lock);
}

/* ---- completions ------------------------------------------------------------------
 * Callbacks run in the core's dispatch: on the progress thread, or on an
 * application thread waiting in lm_cq_wait; one dispatcher at a time. */

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Route a work completion; true when it became a lamina completion. */
static bool dispatch(lm_verbs_iface_t *iface, const struct ibv_wc *wc)
{
    bool delivered = false;
    pthread_mutex_lock(&iface->table_lock);
    lm_verbs_ep_t *ep = table_find(iface, wc->qp_num);
    /* No endpoint, or another one under a reused QP number: the completion
     * belongs to a closed endpoint, which already completed its operations. */
    if (ep && (uint32_t)(wc->wr_id >> 32) == ep->serial)
        delivered = lm_verbs_ep_on_wc(ep, wc);
    pthread_mutex_unlock(&iface->table_lock);
    return delivered;
}

/* One ibv_poll_cq batch, routed; adds what became lamina completions to
 * *delivered. Returns the work completions polled, -1 when the CQ is broken
 * (every endpoint then fails). */
static int poll_batch(lm_verbs_iface_t *iface, int *delivered)
{
    struct ibv_wc wc[LM_VERBS_POLL_BATCH];
    int n = ibv_poll_cq(iface->cq, LM_VERBS_POLL_BATCH, wc);
    if (n < 0) {
        fail_all(iface, LM_ERR_IO, "verbs: ibv_poll_cq failed; the completion queue is broken");
        return -1;
    }
    for (int i = 0; i < n; i++)
        *delivered += dispatch(iface, &wc[i]);
    return n;
}

/* Poll while completions keep coming. Once the CQ is empty, return at once if
 * something was delivered (the dispatcher may be the application thread
 * waiting for it), or if the event found the CQ empty (a driver's spin,
 * iface_poll, already took what raised it); with work completions but
 * nothing to show yet (e.g. only a large transfer's intermediate chunks),
 * spin up to LM_VERBS_SPIN_NS for the next completion, which is cheaper than
 * another event and wake-up. */
static void drain_cq(lm_verbs_iface_t *iface)
{
    uint64_t last = now_ns();
    int delivered = 0;
    bool polled = false;
    for (;;) {
        int n = poll_batch(iface, &delivered);
        if (n < 0)
            return;
        if (n > 0) {
            polled = true;
            last = now_ns();
        } else if (delivered || !polled || now_ns() - last > LM_VERBS_SPIN_NS) {
            return;
        }
    }
}

/* The transport's iface_poll: drain the CQ without waiting and without
 * touching the channel. The CQ stays armed, or its event stays pending, so
 * the epoll sleep that may follow is still woken by the next completion; an
 * event whose completions were taken here finds the CQ empty later (cheap). */
static int iface_poll(void *arg)
{
    lm_verbs_iface_t *iface = arg;
    int delivered = 0;
    while (poll_batch(iface, &delivered) == LM_VERBS_POLL_BATCH)
        ;
    return delivered;
}

static void on_cq_event(void *arg, uint32_t events)
{
    (void)events;
    lm_verbs_iface_t *iface = arg;
    struct ibv_cq *cq;
    void *cq_context;
    if (ibv_get_cq_event(iface->channel, &cq, &cq_context) != 0)
        return; /* nonblocking channel: nothing pending */
    ibv_ack_cq_events(cq, 1);
    /* Re-arm before polling, so a completion that lands after the last poll
     * raises a new event instead of waiting for the next one. */
    ibv_req_notify_cq(cq, 0);
    drain_cq(iface);
}

static void fail_qp(lm_verbs_iface_t *iface, uint32_t qp_num, const char *reason)
{
    pthread_mutex_lock(&iface->table_lock);
    lm_verbs_ep_t *ep = table_find(iface, qp_num);
    if (ep)
        lm_verbs_ep_fail(ep, LM_ERR_IO, reason);
    pthread_mutex_unlock(&iface->table_lock);
}

static void on_async_event(void *arg, uint32_t events)
{
    (void)events;
    lm_verbs_iface_t *iface = arg;
    struct ibv_async_event ev;
    if (ibv_get_async_event(iface->dev, &ev) != 0)
        return;
    char reason[128];
    snprintf(reason, sizeof(reason), "verbs: async event on %s: %s", iface->dev_name,
             ibv_event_type_str(ev.event_type));
    switch (ev.event_type) {
    case IBV_EVENT_QP_FATAL:
    case IBV_EVENT_QP_REQ_ERR:
    case IBV_EVENT_QP_ACCESS_ERR:
        fail_qp(iface, ev.element.qp->qp_num, reason);
        break;
    case IBV_EVENT_CQ_ERR:
    case IBV_EVENT_DEVICE_FATAL:
        fail_all(iface, LM_ERR_IO, reason);
        break;
    default: /* port changes, COMM_EST ...: RC retries ride out transient ones */
        break;
    }
    /* Acked after the table lookup: ibv_destroy_qp waits for this ack. */
    ibv_ack_async_event(&ev);
}

/* ---- open / close ------------------------------------------------------------ */

static int set_nonblocking(int fd)
{
    int flags = fcntl(fd, F_GETFL);
    return flags < 0 ? -1 : fcntl(fd, F_SETFL, flags | O_NONBLOCK);
}

static int open_cq(lm_verbs_iface_t *iface, char *why, size_t why_len)
{
    iface->channel = ibv_create_comp_channel(iface->dev);
    if (!iface->channel || set_nonblocking(iface->channel->fd) != 0 ||
        set_nonblocking(iface->dev->async_fd) != 0) {
        snprintf(why, why_len, "verbs: completion channel on %s: %s", iface->dev_name, strerror(errno));
        return LM_ERR_IO;
    }
    int size = LM_VERBS_CQ_INITIAL < iface->dev_attr.max_cqe ? LM_VERBS_CQ_INITIAL : iface->dev_attr.max_cqe;
    iface->cq = ibv_create_cq(iface->dev, size, iface, iface->channel, 0);
    if (!iface->cq) {
        snprintf(why, why_len, "verbs: ibv_create_cq(%d) on %s: %s", size, iface->dev_name, strerror(errno));
        return LM_ERR_IO;
    }
    iface->cq_size = iface->cq->cqe;
    if (ibv_req_notify_cq(iface->cq, 0) != 0) {
        snprintf(why, why_len, "verbs: ibv_req_notify_cq on %s failed", iface->dev_name);
        return LM_ERR_IO;
    }
    return LM_OK;
}

static int watch_device(lm_verbs_iface_t *iface, char *why, size_t why_len)
{
    iface->cq_handler = (lm_io_handler_t){.fd = iface->channel->fd, .cb = on_cq_event, .arg = iface};
    iface->async_handler = (lm_io_handler_t){.fd = iface->dev->async_fd, .cb = on_async_event, .arg = iface};
    int rc = lm_progress_add(iface->ctx, &iface->cq_handler, EPOLLIN);
    if (rc == LM_OK) {
        rc = lm_progress_add(iface->ctx, &iface->async_handler, EPOLLIN);
        if (rc != LM_OK)
            lm_progress_del(iface->ctx, &iface->cq_handler);
    }
    if (rc != LM_OK)
        snprintf(why, why_len, "verbs: %s", lm_last_error());
    return rc;
}

/* Release what open made; no dispatch looks at it any more. */
static void iface_free(lm_verbs_iface_t *iface)
{
    if (iface->cq)
        ibv_destroy_cq(iface->cq);
    if (iface->channel)
        ibv_destroy_comp_channel(iface->channel);
    lm_verbs_md_close(iface);
    pthread_cond_destroy(&iface->mr_idle);
    pthread_mutex_destroy(&iface->mr_lock);
    pthread_mutex_destroy(&iface->table_lock);
    free(iface);
}

static int iface_open(lm_context_t *ctx, const lm_context_params_t *params, void **out, char *why,
                      size_t why_len)
{
    lm_verbs_iface_t *iface = calloc(1, sizeof(*iface));
    if (!iface) {
        snprintf(why, why_len, "verbs: out of memory");
        return LM_ERR_NO_MEMORY;
    }
    iface->ctx = ctx;
    iface->next_serial = 1;
    pthread_mutex_init(&iface->table_lock, NULL);
    pthread_mutex_init(&iface->mr_lock, NULL);
    pthread_cond_init(&iface->mr_idle, NULL);
    int rc = lm_verbs_md_open(iface, params, why, why_len);
    if (rc == LM_OK)
        rc = open_cq(iface, why, why_len);
    if (rc == LM_OK)
        rc = watch_device(iface, why, why_len);
    if (rc != LM_OK) {
        iface_free(iface);
        return rc;
    }
    *out = iface;
    return LM_OK;
}

/* Called after every endpoint and region is gone and the progress engine
 * has stopped (its epoll set is closed, so nothing is removed from it). */
static void iface_close(void *iface)
{
    iface_free(iface);
}

const lm_transport_ops_t lm_verbs_transport = {
    .name = "verbs",
    .id = LM_TRANSPORT_VERBS,
    .caps = LM_CAP_ZERO_COPY_SEND | LM_CAP_ZERO_COPY_RECV | LM_CAP_REMOTE_ACK | LM_CAP_HW_OFFLOAD,
    .iface_open = iface_open,
    .iface_close = iface_close,
    .iface_poll = iface_poll,
    .mr_register = lm_verbs_mr_register,
    .mr_deregister = lm_verbs_mr_deregister,
    .mr_register_device = lm_verbs_mr_register_device,
    .ep_create = lm_verbs_ep_create,
    .ep_address = lm_verbs_ep_address,
    .ep_connect = lm_verbs_ep_connect,
    .ep_write = lm_verbs_ep_write,
    .ep_writev = lm_verbs_ep_writev,
    .ep_read = lm_verbs_ep_read,
    .ep_destroy = lm_verbs_ep_destroy,
};
