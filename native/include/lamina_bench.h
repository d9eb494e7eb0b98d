/*
 * lamina_bench.h - measurement loops that run in C, as perftest's do, so a
 * latency figure is the transport's and not the interpreter's. Used by
 * `lamina-bench latency` (its default loop; `--loop python` runs the same
 * exchange through the Python API).
 */
#ifndef LAMINA_BENCH_H
#define LAMINA_BENCH_H

#include "lamina.h"

#ifdef __cplusplus
extern "C" {
#endif

/* CDEF BEGIN */
/* Ping-pong of writes with immediate on one endpoint. The initiator writes
 * `size` bytes from mr into remote and waits for the peer's write back,
 * iters times, storing each round trip in rtt_ns[i] (nanoseconds); the
 * responder (initiator = 0) answers each write it receives with one of its
 * own, iters times (rtt_ns may be NULL). Other completions are consumed.
 * Returns LM_OK, LM_ERR_TIMEOUT when nothing arrives for timeout_ms, or the
 * status of a failed operation. */
int lm_bench_pingpong(lm_context_t *ctx, lm_ep_t *ep, lm_mr_t *mr, const lm_rdesc_t *remote,
                      uint64_t size, uint32_t iters, int initiator, int timeout_ms, uint64_t *rtt_ns);
/* The same exchange through a channel, as the Python loop of `lamina-bench
 * channel` does it but with no interpreter: the initiator sends one uint8
 * tensor of `size` bytes from its next send slot (region: the host address
 * of the channel's registered region) on micro-batch 0, waits for the reply
 * and releases it; the responder receives, releases, and replies the same
 * way. Returns as lm_bench_pingpong, or a channel error. */
int lm_bench_chan_pingpong(lm_chan_t *ch, void *region, uint64_t size, uint32_t iters, int initiator,
                           int timeout_ms, uint64_t *rtt_ns);
/* The bandwidth loop of `lamina-bench bandwidth` (perftest's ib_write_bw
 * shape): on each of neps endpoints (ep_ids[i]: the id eps[i] was created
 * with) keep `depth` writes with immediate of `size` bytes in flight, write n
 * going from slot n % slots of mr into the same slot of remotes[i] (slot k at
 * offset k * size on both sides; immediate n & 0xFFFFFF), until `count` writes
 * per endpoint were posted, or duration_ns passed when it is nonzero; then
 * waits for the writes still in flight. sent[i]: writes posted on eps[i].
 * Completions of other operations of the context are consumed. Returns
 * LM_OK, LM_ERR_TIMEOUT when no completion comes for timeout_ms, or the
 * status of a failed operation. */
int lm_bench_stream(lm_context_t *ctx, lm_ep_t **eps, const uint64_t *ep_ids, const lm_rdesc_t *remotes,
                    uint32_t neps, lm_mr_t *mr, uint64_t size, uint32_t depth, uint32_t slots, uint64_t count,
                    uint64_t duration_ns, int timeout_ms, uint64_t *sent);
/* CDEF END */

#ifdef __cplusplus
}
#endif
#endif /* LAMINA_BENCH_H */
