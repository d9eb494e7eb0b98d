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
/* CDEF END */

#ifdef __cplusplus
}
#endif
#endif /* LAMINA_BENCH_H */
