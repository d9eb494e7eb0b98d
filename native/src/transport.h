/*
 * transport.h - the table every transport fills in.
 *
 * The core (context, registry, completion queue, progress engine) never looks
 * at a transport's name: it calls through this table and reads the caps bits.
 * A transport lives in its own folder (tcp/, verbs/) and exports one
 * `const lm_transport_ops_t lm_<name>_transport`.
 */
#ifndef LM_TRANSPORT_H
#define LM_TRANSPORT_H

#include "lamina.h"

typedef struct lm_transport_ops {
    const char *name;
    uint32_t id;   /* LM_TRANSPORT_* */
    uint32_t caps; /* LM_CAP_* (lamina.h) */

    /* Open the transport's interface for a context. On failure return an
     * LM_ERR_* and write a reason a user can act on into why. */
    int (*iface_open)(lm_context_t *ctx, const lm_context_params_t *params,
                      void **iface, char *why, size_t why_len);
    void (*iface_close)(void *iface);
    /* Optional (may be NULL): a nonblocking drain of the interface's
     * completion sources, without touching its fds' readiness (a verbs CQ
     * stays armed, or its channel event pending, so a later epoll sleep is
     * still woken). Returns how many completions it delivered (lm_ep_push /
     * lm_ep_complete), or -1 when it has nothing to poll (no endpoint: the
     * waiter then does not spin on it). Called with the dispatch lock held,
     * like handlers: a thread waiting in lm_cq_wait spins on it briefly
     * before sleeping. */
    int (*iface_poll)(void *iface);
    /* Optional: the calling thread is about to sleep in epoll (called with
     * the dispatch lock held, right before). Arm the wake-ups a peer raises
     * only for sleepers (shm doorbells); nonzero if work arrived meanwhile:
     * the caller then only looks at epoll, without sleeping. */
    int (*iface_arm)(void *iface);

    /* Called for every region on every open transport (may be NULL). */
    int (*mr_register)(void *iface, lm_mr_t *mr);
    void (*mr_deregister)(void *iface, lm_mr_t *mr);
    /* Device memory (mr->device; may be NULL: the transport cannot reach
     * it, e.g. one that copies with the CPU). dmabuf_fd >= 0: the region is
     * [dmabuf_offset, +length) of that dma-buf, addressed as mr->addr;
     * -1: mr->addr is a device pointer the NIC reaches directly. Undone by
     * mr_deregister. */
    int (*mr_register_device)(void *iface, lm_mr_t *mr, int dmabuf_fd, uint64_t dmabuf_offset);

    /* Endpoint life cycle; create returns an object whose first member is a
     * struct lm_ep (see core.h). fd is the bootstrap socket (-1 if none). */
    int (*ep_create)(void *iface, uint64_t ep_id, int fd, lm_ep_t **out);
    int (*ep_address)(lm_ep_t *ep, void *buf, size_t *len);
    int (*ep_connect)(lm_ep_t *ep, const void *peer, size_t len, int ctrl_fd);
    int (*ep_write)(lm_ep_t *ep, lm_mr_t *local, uint64_t local_off, uint64_t length,
                    const lm_rdesc_t *remote, uint64_t remote_off, uint32_t imm,
                    uint32_t flags, uint64_t wr_id);
    /* A gather write (lm_ep_writev): segs already checked against local's
     * bounds, 2..LM_MAX_SEGS of them, their total in length. The list is a
     * heap copy the transport owns from the call on: it frees it when the
     * operation is done, and also when it refuses the post. */
    int (*ep_writev)(lm_ep_t *ep, lm_mr_t *local, lm_seg_t *segs, uint32_t nsegs, uint64_t length,
                     const lm_rdesc_t *remote, uint64_t remote_off, uint32_t imm, uint32_t flags,
                     uint64_t wr_id);
    int (*ep_read)(lm_ep_t *ep, lm_mr_t *local, uint64_t local_off, uint64_t length,
                   const lm_rdesc_t *remote, uint64_t remote_off, uint64_t wr_id);
    /* Flush outstanding operations with LM_ERR_CANCELED and free. */
    void (*ep_destroy)(lm_ep_t *ep);
} lm_transport_ops_t;

extern const lm_transport_ops_t lm_tcp_transport;
extern const lm_transport_ops_t lm_shm_transport;
#ifdef LM_HAVE_VERBS
extern const lm_transport_ops_t lm_verbs_transport;
#endif

#endif /* LM_TRANSPORT_H */
