/* pingpong.c - the latency and bandwidth loops of lamina-bench, in C (see lamina_bench.h). */
#include <stdbool.h>
#include <stdint.h>
#include <time.h>

#include "lamina_bench.h"

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Wait for the peer's next write with immediate; fail on any error completion. */
static int await_imm(lm_context_t *ctx, int timeout_ms)
{
    lm_completion_t c[16];
    for (;;) {
        int n = lm_cq_wait(ctx, c, 16, timeout_ms);
        if (n < 0)
            return n;
        if (n == 0)
            return LM_ERR_TIMEOUT;
        int got = 0;
        for (int i = 0; i < n; i++) {
            if (c[i].status != LM_OK)
                return c[i].status;
            got |= c[i].opcode == LM_OP_RECV_IMM;
        }
        if (got)
            return LM_OK;
    }
}

int lm_bench_pingpong(lm_context_t *ctx, lm_ep_t *ep, lm_mr_t *mr, const lm_rdesc_t *remote,
                      uint64_t size, uint32_t iters, int initiator, int timeout_ms, uint64_t *rtt_ns)
{
    if (!ctx || !ep || !mr || !remote || (initiator && !rtt_ns))
        return LM_ERR_INVALID;
    for (uint32_t i = 0; i < iters; i++) {
        uint64_t t0 = now_ns();
        int rc = LM_OK;
        if (initiator)
            rc = lm_ep_write(ep, mr, 0, size, remote, 0, i, LM_WRITE_IMM, i);
        if (rc == LM_OK)
            rc = await_imm(ctx, timeout_ms);
        if (rc == LM_OK && !initiator)
            rc = lm_ep_write(ep, mr, 0, size, remote, 0, i, LM_WRITE_IMM, i);
        if (rc != LM_OK)
            return rc;
        if (initiator)
            rtt_ns[i] = now_ns() - t0;
    }
    return LM_OK;
}

static int chan_send(lm_chan_t *ch, uint8_t *region, uint64_t size, uint32_t layer, int timeout_ms)
{
    uint64_t offset, seq;
    int rc = lm_chan_send_slot(ch, 0, timeout_ms, &offset);
    if (rc != LM_OK)
        return rc;
    lm_chan_tensor_t t = {.addr = (uint64_t)(uintptr_t)(region + offset), .nbytes = size,
                          .shape = {(uint32_t)size}, .dtype = LM_DTYPE_UINT8, .ndim = 1};
    return lm_chan_send(ch, layer, 0, &t, 1, NULL, 0, timeout_ms, &seq);
}

static int chan_take(lm_chan_t *ch, int timeout_ms, uint32_t *layer)
{
    lm_chan_msg_t msg;
    int rc = lm_chan_recv(ch, 0, &msg, timeout_ms);
    if (rc == 0)
        return LM_ERR_TIMEOUT;
    if (rc < 0)
        return rc;
    *layer = msg.layer;
    return lm_chan_release(ch, msg.microbatch, msg.slot, msg.seq);
}

int lm_bench_chan_pingpong(lm_chan_t *ch, void *region, uint64_t size, uint32_t iters, int initiator,
                           int timeout_ms, uint64_t *rtt_ns)
{
    if (!ch || !region || (initiator && !rtt_ns) || size > UINT32_MAX)
        return LM_ERR_INVALID;
    for (uint32_t i = 0; i < iters; i++) {
        uint64_t t0 = now_ns();
        uint32_t layer = i & 0xFFFF;
        int rc = LM_OK;
        if (initiator)
            rc = chan_send(ch, region, size, layer, timeout_ms);
        if (rc == LM_OK)
            rc = chan_take(ch, timeout_ms, &layer);
        if (rc == LM_OK && !initiator)
            rc = chan_send(ch, region, size, layer, timeout_ms);
        if (rc != LM_OK)
            return rc;
        if (initiator)
            rtt_ns[i] = now_ns() - t0;
    }
    return LM_OK;
}

#define STREAM_MAX_EPS 64

int lm_bench_stream(lm_context_t *ctx, lm_ep_t **eps, const uint64_t *ep_ids, const lm_rdesc_t *remotes,
                    uint32_t neps, lm_mr_t *mr, uint64_t size, uint32_t depth, uint32_t slots, uint64_t count,
                    uint64_t duration_ns, int timeout_ms, uint64_t *sent)
{
    if (!ctx || !eps || !ep_ids || !remotes || !mr || !sent || neps == 0 || neps > STREAM_MAX_EPS || depth == 0 ||
        slots == 0)
        return LM_ERR_INVALID;
    uint64_t inflight[STREAM_MAX_EPS] = {0};
    uint64_t target = duration_ns ? UINT64_MAX : count;
    uint64_t end = duration_ns ? now_ns() + duration_ns : 0;
    for (uint32_t e = 0; e < neps; e++)
        sent[e] = 0;
    lm_completion_t c[64];
    for (;;) {
        bool busy = false;
        for (uint32_t e = 0; e < neps; e++) {
            while (inflight[e] < depth && sent[e] < target) {
                uint64_t at = (sent[e] % slots) * size;
                int rc = lm_ep_write(eps[e], mr, at, size, &remotes[e], at, (uint32_t)(sent[e] & 0xFFFFFF),
                                     LM_WRITE_IMM, sent[e]);
                if (rc != LM_OK)
                    return rc;
                inflight[e]++;
                sent[e]++;
            }
            busy |= inflight[e] > 0;
        }
        if (end && now_ns() >= end)
            target = 0; /* time is up: post nothing more, wait for what is in flight */
        if (!busy)
            return LM_OK;
        int n = lm_cq_wait(ctx, c, 64, timeout_ms);
        if (n < 0)
            return n;
        if (n == 0)
            return LM_ERR_TIMEOUT;
        for (int i = 0; i < n; i++) {
            if (c[i].status != LM_OK)
                return c[i].status;
            if (c[i].opcode != LM_OP_WRITE)
                continue;
            for (uint32_t e = 0; e < neps; e++)
                if (ep_ids[e] == c[i].ep_id && inflight[e] > 0) {
                    inflight[e]--;
                    break;
                }
        }
    }
}
