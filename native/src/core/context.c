/* context.c - context life cycle and the public endpoint calls, which check
 * their arguments once here and dispatch through the transport table. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core.h"

/* Order matters: "auto" prefers the first transport both peers have. */
static const lm_transport_ops_t *const all_transports[LM_MAX_TRANSPORTS] = {
#ifdef LM_HAVE_VERBS
    &lm_verbs_transport,
#else
    NULL,
#endif
    &lm_shm_transport,
    &lm_tcp_transport,
};

static int slot_of(uint32_t transport)
{
    for (int t = 0; t < LM_MAX_TRANSPORTS; t++)
        if (all_transports[t] && all_transports[t]->id == transport)
            return t;
    return -1;
}

/* LM_CTX_PARAM_PROGRESS, else $LAMINA_PROGRESS ("poll" or "event"), else event. */
static int progress_mode(const lm_context_params_t *p, uint32_t *mode)
{
    if (p->field_mask & LM_CTX_PARAM_PROGRESS) {
        if (p->progress != LM_PROGRESS_EVENT && p->progress != LM_PROGRESS_POLL)
            return lm_fail(LM_ERR_INVALID, "lm_context_create: unknown progress mode %u", p->progress);
        *mode = p->progress;
        return LM_OK;
    }
    const char *env = getenv("LAMINA_PROGRESS");
    if (!env || !*env || strcmp(env, "event") == 0)
        *mode = LM_PROGRESS_EVENT;
    else if (strcmp(env, "poll") == 0)
        *mode = LM_PROGRESS_POLL;
    else
        return lm_fail(LM_ERR_INVALID, "LAMINA_PROGRESS=%s: expected 'poll' or 'event'", env);
    return LM_OK;
}

int lm_context_create(const lm_context_params_t *params, lm_context_t **out)
{
    if (!out)
        return lm_fail(LM_ERR_INVALID, "lm_context_create: out is NULL");
    lm_context_params_t p = {0};
    if (params)
        p = *params;
    uint32_t wanted = (p.field_mask & LM_CTX_PARAM_TRANSPORTS) ? p.transports
                                                               : (LM_TRANSPORT_TCP | LM_TRANSPORT_VERBS |
                                                                  LM_TRANSPORT_SHM);
    uint32_t mode = LM_PROGRESS_EVENT;
    int mode_rc = progress_mode(&p, &mode);
    if (mode_rc != LM_OK)
        return mode_rc;
    lm_context_t *ctx = calloc(1, sizeof(*ctx));
    if (!ctx)
        return lm_fail(LM_ERR_NO_MEMORY, "context allocation failed");
    ctx->keepalive_ms = (p.field_mask & LM_CTX_PARAM_KEEPALIVE_MS) && p.keepalive_ms ? p.keepalive_ms : 10000;
    pthread_mutex_init(&ctx->ep_lock, NULL);
    int rc = lm_cq_init(&ctx->cq);
    if (rc != LM_OK)
        goto fail_cq;
    rc = lm_registry_init(ctx);
    if (rc != LM_OK)
        goto fail_registry;
    rc = lm_progress_start(ctx, mode);
    if (rc != LM_OK)
        goto fail_progress;

#ifndef LM_HAVE_VERBS
    strcpy(ctx->transport_why[0],
           "verbs: built without rdma-core headers (install libibverbs-dev and rebuild)");
#endif
    for (int t = 0; t < LM_MAX_TRANSPORTS; t++) {
        const lm_transport_ops_t *ops = all_transports[t];
        if (!ops)
            continue;
        if (!(wanted & ops->id)) {
            snprintf(ctx->transport_why[t], sizeof(ctx->transport_why[t]), "%s: not requested", ops->name);
            continue;
        }
        if (ops->iface_open(ctx, &p, &ctx->ifaces[t], ctx->transport_why[t],
                            sizeof(ctx->transport_why[t])) == LM_OK) {
            ctx->transports[t] = ops;
            ctx->transport_why[t][0] = '\0';
        }
    }
    if (lm_context_transports(ctx) == 0) {
        char why[2 * sizeof(ctx->transport_why[0])] = "";
        for (int t = 0; t < LM_MAX_TRANSPORTS; t++) {
            const char *w = ctx->transport_why[t];
            if (w[0] && (wanted & (all_transports[t] ? all_transports[t]->id : LM_TRANSPORT_VERBS)))
                snprintf(why + strlen(why), sizeof(why) - strlen(why), "%s%s", why[0] ? "; " : "", w);
        }
        lm_context_destroy(ctx);
        return lm_fail(LM_ERR_UNSUPPORTED, "no requested transport could be opened: %s", why);
    }
    *out = ctx;
    return LM_OK;

fail_progress:
    lm_registry_fini(ctx);
fail_registry:
    lm_cq_fini(&ctx->cq);
fail_cq:
    free(ctx);
    return rc;
}

void lm_context_destroy(lm_context_t *ctx)
{
    if (!ctx)
        return;
    for (;;) {
        pthread_mutex_lock(&ctx->ep_lock);
        lm_ep_t *ep = ctx->eps;
        pthread_mutex_unlock(&ctx->ep_lock);
        if (!ep)
            break;
        lm_ep_destroy(ep);
    }
    /* Regions the user did not deregister: drop them (memory is the user's). */
    for (size_t b = 0; b < ctx->nbuckets; b++)
        while (ctx->buckets[b])
            lm_mr_deregister(ctx->buckets[b]);
    lm_progress_stop(ctx);
    for (int t = 0; t < LM_MAX_TRANSPORTS; t++)
        if (ctx->transports[t])
            ctx->transports[t]->iface_close(ctx->ifaces[t]);
    lm_registry_fini(ctx);
    lm_cq_fini(&ctx->cq);
    pthread_mutex_destroy(&ctx->ep_lock);
    free(ctx);
}

uint32_t lm_context_progress(lm_context_t *ctx)
{
    return ctx ? ctx->progress.mode : LM_PROGRESS_EVENT;
}

uint32_t lm_context_transports(lm_context_t *ctx)
{
    uint32_t set = 0;
    for (int t = 0; ctx && t < LM_MAX_TRANSPORTS; t++)
        if (ctx->transports[t])
            set |= ctx->transports[t]->id;
    return set;
}

int lm_context_fd(lm_context_t *ctx)
{
    if (!ctx)
        return -1;
    lm_cq_t *cq = &ctx->cq;
    pthread_mutex_lock(&cq->lock);
    if (!atomic_exchange(&cq->fd_wanted, true) && cq->count > 0) {
        uint64_t one = 1;
        ssize_t n = write(cq->event_fd, &one, sizeof(one));
        (void)n;
    }
    pthread_mutex_unlock(&cq->lock);
    return cq->event_fd;
}

const char *lm_context_transport_status(lm_context_t *ctx, uint32_t transport)
{
    if (!ctx)
        return "no context";
    int t = slot_of(transport);
    if (t < 0)
        return transport == LM_TRANSPORT_VERBS
                   ? "verbs: built without rdma-core headers (install libibverbs-dev and rebuild)"
                   : "unknown transport";
    return ctx->transport_why[t];
}

/* ---- endpoints ------------------------------------------------------- */

static int ep_create(lm_context_t *ctx, uint32_t transport, int fd, uint64_t ep_id, lm_ep_t **out)
{
    int t = slot_of(transport);
    if (!ctx || !out || t < 0 || !ctx->transports[t]) {
        if (fd >= 0)
            close(fd);
        return lm_fail(LM_ERR_UNSUPPORTED, "transport not open in this context: %s",
                       ctx ? lm_context_transport_status(ctx, transport) : "no context");
    }
    lm_ep_t *ep = NULL;
    int rc = ctx->transports[t]->ep_create(ctx->ifaces[t], ep_id, fd, &ep);
    if (rc != LM_OK)
        return rc;
    ep->ctx = ctx;
    ep->ops = ctx->transports[t];
    ep->iface = ctx->ifaces[t];
    ep->id = ep_id;
    pthread_mutex_lock(&ctx->ep_lock);
    ep->ctx_next = ctx->eps;
    ctx->eps = ep;
    pthread_mutex_unlock(&ctx->ep_lock);
    *out = ep;
    return LM_OK;
}

int lm_ep_create_tcp(lm_context_t *ctx, int fd, uint64_t ep_id, lm_ep_t **out)
{
    if (fd < 0)
        return lm_fail(LM_ERR_INVALID, "lm_ep_create_tcp: bad socket");
    return ep_create(ctx, LM_TRANSPORT_TCP, fd, ep_id, out);
}

int lm_ep_create_shm(lm_context_t *ctx, int fd, uint64_t ep_id, lm_ep_t **out)
{
    if (fd < 0)
        return lm_fail(LM_ERR_INVALID, "lm_ep_create_shm: bad socket");
    return ep_create(ctx, LM_TRANSPORT_SHM, fd, ep_id, out);
}

int lm_ep_create_verbs(lm_context_t *ctx, uint64_t ep_id, lm_ep_t **out)
{
    return ep_create(ctx, LM_TRANSPORT_VERBS, -1, ep_id, out);
}

int lm_ep_address(lm_ep_t *ep, void *buf, size_t *len)
{
    if (!ep || !len)
        return lm_fail(LM_ERR_INVALID, "lm_ep_address: bad arguments");
    if (!ep->ops->ep_address) {
        *len = 0;
        return LM_OK;
    }
    return ep->ops->ep_address(ep, buf, len);
}

int lm_ep_connect(lm_ep_t *ep, const void *peer, size_t len, int ctrl_fd)
{
    if (!ep)
        return lm_fail(LM_ERR_INVALID, "lm_ep_connect: NULL endpoint");
    if (!ep->ops->ep_connect)
        return LM_OK; /* tcp endpoints are connected at creation */
    return ep->ops->ep_connect(ep, peer, len, ctrl_fd);
}

uint32_t lm_ep_transport(lm_ep_t *ep)
{
    return ep ? ep->ops->id : 0;
}

uint32_t lm_ep_caps(lm_ep_t *ep)
{
    return ep ? ep->ops->caps : 0;
}

uint64_t lm_ep_mapped_writes(lm_ep_t *ep)
{
    return ep ? atomic_load(&ep->mapped_writes) : 0;
}

static int check_op(lm_ep_t *ep, lm_mr_t *local, uint64_t local_off, uint64_t length,
                    const lm_rdesc_t *remote, uint32_t local_access, const char *what)
{
    if (!ep || !local || !remote)
        return lm_fail(LM_ERR_INVALID, "%s: NULL argument", what);
    if (local->ctx != ep->ctx)
        return lm_fail(LM_ERR_INVALID, "%s: region belongs to another context", what);
    if (length > LM_MAX_MESSAGE)
        return lm_fail(LM_ERR_INVALID, "%s: %llu bytes exceeds the %llu-byte message limit", what,
                       (unsigned long long)length, (unsigned long long)LM_MAX_MESSAGE);
    int rc = lm_mr_check(local, local_off, length, local_access);
    if (rc != LM_OK)
        return lm_fail(LM_ERR_INVALID, "%s: local range [%llu, +%llu) %s (region is %llu bytes)", what,
                       (unsigned long long)local_off, (unsigned long long)length, lm_status_str(rc),
                       (unsigned long long)local->length);
    if (!lm_mr_reachable(local, ep->ops->id))
        return lm_fail(LM_ERR_UNSUPPORTED, "%s: the region is device memory, which %s cannot reach (it moves "
                       "bytes with the CPU): stage it through host memory", what, ep->ops->name);
    int err = atomic_load(&ep->error);
    if (err)
        return lm_fail(err, "%s: endpoint failed earlier: %s", what, lm_status_str(err));
    return LM_OK;
}

/* Every post reserves its completion first (so it is never lost to OOM) and
 * undoes the reservation if the transport refused it. */
static int begin_post(lm_ep_t *ep)
{
    int rc = lm_cq_reserve(ep->ctx);
    if (rc == LM_OK)
        atomic_fetch_add(&ep->outstanding, 1);
    return rc;
}

static int end_post(lm_ep_t *ep, int rc)
{
    if (rc != LM_OK) {
        atomic_fetch_sub(&ep->outstanding, 1);
        lm_cq_unreserve(ep->ctx);
    } else
        lm_progress_posted(ep->ctx);
    return rc;
}

int lm_ep_write(lm_ep_t *ep, lm_mr_t *local, uint64_t local_off, uint64_t length,
                const lm_rdesc_t *remote, uint64_t remote_off, uint32_t imm, uint32_t flags,
                uint64_t wr_id)
{
    int rc = check_op(ep, local, local_off, length, remote, 0, "lm_ep_write");
    if (rc != LM_OK)
        return rc;
    if (flags & ~(uint32_t)LM_WRITE_IMM)
        return lm_fail(LM_ERR_INVALID, "lm_ep_write: unknown flags 0x%x", flags);
    if ((rc = begin_post(ep)) != LM_OK)
        return rc;
    return end_post(ep, ep->ops->ep_write(ep, local, local_off, length, remote, remote_off, imm, flags, wr_id));
}

int lm_ep_writev(lm_ep_t *ep, lm_mr_t *local, const lm_seg_t *segs, uint32_t nsegs,
                 const lm_rdesc_t *remote, uint64_t remote_off, uint32_t imm, uint32_t flags, uint64_t wr_id)
{
    if (!segs || nsegs == 0 || nsegs > LM_MAX_SEGS)
        return lm_fail(LM_ERR_INVALID, "lm_ep_writev: %u segments (1..%d)", nsegs, LM_MAX_SEGS);
    uint64_t total = 0;
    for (uint32_t i = 0; i < nsegs; i++) {
        int rc = check_op(ep, local, segs[i].offset, segs[i].length, remote, 0, "lm_ep_writev");
        if (rc != LM_OK)
            return rc;
        total += segs[i].length; /* each <= LM_MAX_MESSAGE, so no overflow for LM_MAX_SEGS of them */
    }
    if (total > LM_MAX_MESSAGE)
        return lm_fail(LM_ERR_INVALID, "lm_ep_writev: %llu bytes exceeds the %llu-byte message limit",
                       (unsigned long long)total, (unsigned long long)LM_MAX_MESSAGE);
    if (flags & ~(uint32_t)LM_WRITE_IMM)
        return lm_fail(LM_ERR_INVALID, "lm_ep_writev: unknown flags 0x%x", flags);
    if (nsegs == 1)
        return lm_ep_write(ep, local, segs[0].offset, segs[0].length, remote, remote_off, imm, flags, wr_id);
    /* The caller may reuse its list at once: the transport gets its own copy. */
    lm_seg_t *copy = malloc(nsegs * sizeof(*copy));
    if (!copy)
        return lm_fail(LM_ERR_NO_MEMORY, "no memory for a %u-piece gather list", nsegs);
    memcpy(copy, segs, nsegs * sizeof(*copy));
    int rc = begin_post(ep);
    if (rc != LM_OK) {
        free(copy);
        return rc;
    }
    return end_post(ep, ep->ops->ep_writev(ep, local, copy, nsegs, total, remote, remote_off, imm, flags, wr_id));
}

int lm_ep_read(lm_ep_t *ep, lm_mr_t *local, uint64_t local_off, uint64_t length,
               const lm_rdesc_t *remote, uint64_t remote_off, uint64_t wr_id)
{
    int rc = check_op(ep, local, local_off, length, remote, LM_ACCESS_LOCAL_WRITE, "lm_ep_read");
    if (rc != LM_OK)
        return rc;
    if ((rc = begin_post(ep)) != LM_OK)
        return rc;
    return end_post(ep, ep->ops->ep_read(ep, local, local_off, length, remote, remote_off, wr_id));
}

uint64_t lm_ep_outstanding(lm_ep_t *ep)
{
    return ep ? atomic_load(&ep->outstanding) : 0;
}

int lm_ep_error(lm_ep_t *ep)
{
    return ep ? atomic_load(&ep->error) : LM_ERR_INVALID;
}

static void deliver(lm_ep_t *ep, const lm_completion_t *c, bool reserved)
{
    lm_sink_fn sink = atomic_load_explicit(&ep->sink, memory_order_acquire);
    if (!sink) {
        lm_cq_push_unsunk(ep, c, reserved);
        return;
    }
    sink(ep->sink_arg, c);
    if (reserved)
        lm_cq_unreserve(ep->ctx);
}

void lm_ep_complete(lm_ep_t *ep, uint32_t opcode, uint64_t wr_id, int status, uint64_t bytes)
{
    lm_completion_t c = {.wr_id = wr_id, .ep_id = ep->id, .byte_len = status == LM_OK ? bytes : 0,
                         .status = status, .opcode = opcode};
    atomic_fetch_sub(&ep->outstanding, 1);
    deliver(ep, &c, true); /* into the place lm_cq_reserve held for it */
}

void lm_ep_push(lm_ep_t *ep, const lm_completion_t *c)
{
    deliver(ep, c, false);
}

void lm_ep_push_reserved(lm_ep_t *ep, const lm_completion_t *c)
{
    deliver(ep, c, true);
}

void lm_ep_set_sink(lm_ep_t *ep, lm_sink_fn sink, void *arg)
{
    lm_cq_take_endpoint(ep->ctx, ep, sink, arg);
}

void lm_ep_destroy(lm_ep_t *ep)
{
    if (!ep)
        return;
    lm_context_t *ctx = ep->ctx;
    pthread_mutex_lock(&ctx->ep_lock);
    lm_ep_t **pp = &ctx->eps;
    while (*pp && *pp != ep)
        pp = &(*pp)->ctx_next;
    if (*pp)
        *pp = ep->ctx_next;
    pthread_mutex_unlock(&ctx->ep_lock);
    ep->ops->ep_destroy(ep);
}
