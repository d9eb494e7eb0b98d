/* verbs.h - the verbs transport's private types, shared by its files.
 *
 *   verbs_md.c     device, port and GID choice, protection domain, regions
 *   verbs_iface.c  the context's interface: one CQ shared by every queue
 *                  pair, its progress callbacks, the QP-number table
 *   verbs_ep.c     RC queue pairs: bring-up, posting, completions, close
 *
 * See docs/verbs.md for the design and the address blob format. */
#ifndef LM_VERBS_H
#define LM_VERBS_H

#include <infiniband/verbs.h>

#include "../core/core.h"

#define LM_VERBS_SQ_DEPTH 128      /* send WRs per QP; more wait in host memory */
#define LM_VERBS_RQ_DEPTH 256      /* receive WRs per QP (write-with-imm targets) */
#define LM_VERBS_RQ_BATCH 32       /* receives are re-posted this many at once */
#define LM_VERBS_MAX_INLINE 128    /* inline size asked for; the device may grant less */
#define LM_VERBS_MAX_SGE 16        /* gather entries per send WR asked for (lm_ep_writev) */
#define LM_VERBS_POLL_BATCH 32
#define LM_VERBS_SPIN_NS 50000     /* poll this long for a first completion before sleeping */
#define LM_VERBS_CQ_INITIAL 4096
#define LM_VERBS_TABLE_BUCKETS 64
#define LM_VERBS_RECV_TAG 0xffffffffu /* low half of a receive WR's wr_id */

/* Queue-pair attributes (see docs/verbs.md). */
#define LM_VERBS_TIMEOUT 16        /* 4.096 us * 2^16 = 268 ms per transport retry */
#define LM_VERBS_RETRY_CNT 7
#define LM_VERBS_RNR_RETRY 7       /* 7 = retry forever: RNR means a live, busy peer */
#define LM_VERBS_MIN_RNR_TIMER 12  /* 0.64 ms */

/* Sent once on the control socket when a side's QP reached RTS. */
#define LM_VERBS_READY_BYTE 'R'

/* The address blob lm_ep_address hands out (all integers little-endian). */
#define LM_VERBS_ADDR_MAGIC0 'L'
#define LM_VERBS_ADDR_MAGIC1 'V'
#define LM_VERBS_ADDR_VERSION 1
#define LM_VERBS_ADDR_SIZE 32

typedef struct lm_verbs_addr {
    uint8_t link_layer;  /* IBV_LINK_LAYER_* */
    uint8_t mtu;         /* enum ibv_mtu: the port's active MTU */
    uint8_t rd_atomic;   /* RDMA reads this side accepts in flight */
    uint16_t lid;
    uint32_t qpn;
    uint32_t psn;
    uint8_t gid[16];
} lm_verbs_addr_t;

void lm_verbs_addr_encode(const lm_verbs_addr_t *a, uint8_t out[LM_VERBS_ADDR_SIZE]);
/* LM_OK, or LM_ERR_PROTOCOL with lm_fail's message for a malformed blob. */
int lm_verbs_addr_decode(const void *buf, size_t len, lm_verbs_addr_t *out);

/* What mr->tr_priv[] holds for this transport. */
typedef struct lm_verbs_mr {
    struct ibv_mr *ibv;
    atomic_uint posted; /* posted WRs the device may still read or write */
} lm_verbs_mr_t;

typedef struct lm_verbs_ep lm_verbs_ep_t;

typedef struct lm_verbs_iface {
    lm_context_t *ctx;

    /* Device, fixed after open (verbs_md.c). */
    struct ibv_context *dev;
    struct ibv_pd *pd;
    struct ibv_device_attr dev_attr;
    uint8_t port;
    uint8_t link_layer;
    uint16_t lid;
    enum ibv_mtu active_mtu;
    uint32_t max_chunk; /* largest single WR: the port's max message size */
    int gid_index;
    union ibv_gid gid;
    char dev_name[IBV_SYSFS_NAME_MAX];

    /* Completions (verbs_iface.c). */
    struct ibv_comp_channel *channel;
    struct ibv_cq *cq;
    lm_io_handler_t cq_handler;
    lm_io_handler_t async_handler;

    /* QP number -> endpoint; also guards the CQ reservation. Held while a
     * completion is handled, so a removed endpoint sees no more of them. */
    pthread_mutex_t table_lock;
    lm_verbs_ep_t *table[LM_VERBS_TABLE_BUCKETS];
    uint32_t next_serial;
    int cq_size;
    int cq_reserved;

    /* Deregistration waits here for a region's posted WRs to finish. */
    pthread_mutex_t mr_lock;
    pthread_cond_t mr_idle;
} lm_verbs_iface_t;

/* One lm_ep_write / lm_ep_read. Larger than max_chunk, it is posted as
 * several WRs (chunks); it completes once, after its last chunk. */
typedef struct lm_verbs_op {
    struct lm_verbs_op *next; /* waiting FIFO, or the free list */
    uint64_t wr_id;
    uint32_t opcode;          /* LM_OP_WRITE or LM_OP_READ */
    bool with_imm;
    bool queued;              /* still in the waiting FIFO (not fully posted) */
    uint32_t imm;
    lm_mr_t *local;           /* reference held until completion */
    lm_verbs_mr_t *vmr;       /* local->tr_priv, taken at the first post */
    uint64_t local_off;
    uint64_t length;
    uint64_t remote_addr;
    uint32_t rkey;
    uint64_t posted_bytes;    /* bytes already handed to the device */
    /* A gather write: pieces of local (owned copy, freed at completion);
     * seg_at / seg_skip: where the next chunk starts. NULL otherwise. */
    lm_seg_t *segs;
    uint32_t nsegs, seg_at;
    uint64_t seg_skip;
    uint32_t chunks_in_flight;
    int32_t status;           /* first failure among its chunks */
} lm_verbs_op_t;

struct lm_verbs_ep {
    struct lm_ep base;
    lm_verbs_iface_t *iface;
    struct ibv_qp *qp;
    uint32_t qp_num;
    uint32_t serial;          /* high half of every wr_id: tells a reused QP number apart */
    uint32_t psn;
    uint32_t max_inline;
    uint32_t max_sge;         /* gather entries per send WR the device granted */
    uint32_t sq_depth, rq_depth;
    lm_verbs_ep_t *table_next;
    int ctrl_fd;
    lm_io_handler_t ctrl_handler;
    bool ctrl_watched;

    pthread_mutex_t lock;     /* guards everything below */
    bool connected;
    bool peer_ready;          /* the peer's QP can receive: its ready byte arrived */
    bool dead;                /* QP in error or closing: nothing more is posted */
    lm_verbs_op_t **slots;    /* send-queue slot -> the op whose chunk holds it */
    uint32_t *free_slots;
    uint32_t nfree;
    lm_verbs_op_t *wait_head, *wait_tail;
    lm_verbs_op_t *op_free;
    uint32_t rq_posted;
    char reason[192];         /* why the endpoint failed, with the verbs text */
};

/* verbs_md.c */
int lm_verbs_md_open(lm_verbs_iface_t *iface, const lm_context_params_t *params, char *why,
                     size_t why_len);
void lm_verbs_md_close(lm_verbs_iface_t *iface);
int lm_verbs_mr_register(void *iface, lm_mr_t *mr);
int lm_verbs_mr_register_device(void *iface, lm_mr_t *mr, int dmabuf_fd, uint64_t dmabuf_offset);
void lm_verbs_mr_deregister(void *iface, lm_mr_t *mr);
/* The region's verbs handle (NULL for an empty region); registry lock held. */
lm_verbs_mr_t *lm_verbs_region(const lm_verbs_iface_t *iface, const lm_mr_t *mr);
/* A posted WR that used vmr is finished: wake a waiting deregistration. */
void lm_verbs_region_release(lm_verbs_iface_t *iface, lm_verbs_mr_t *vmr);

/* verbs_iface.c: the QP table. add also reserves CQ room for the QP. */
int lm_verbs_table_add(lm_verbs_iface_t *iface, lm_verbs_ep_t *ep);
void lm_verbs_table_remove(lm_verbs_iface_t *iface, lm_verbs_ep_t *ep);

/* verbs_ep.c */
int lm_verbs_ep_create(void *iface, uint64_t ep_id, int fd, lm_ep_t **out);
int lm_verbs_ep_address(lm_ep_t *ep, void *buf, size_t *len);
int lm_verbs_ep_connect(lm_ep_t *ep, const void *peer, size_t len, int ctrl_fd);
int lm_verbs_ep_write(lm_ep_t *ep, lm_mr_t *local, uint64_t local_off, uint64_t length,
                      const lm_rdesc_t *remote, uint64_t remote_off, uint32_t imm, uint32_t flags,
                      uint64_t wr_id);
int lm_verbs_ep_writev(lm_ep_t *ep, lm_mr_t *local, lm_seg_t *segs, uint32_t nsegs, uint64_t length,
                       const lm_rdesc_t *remote, uint64_t remote_off, uint32_t imm, uint32_t flags,
                       uint64_t wr_id);
int lm_verbs_ep_read(lm_ep_t *ep, lm_mr_t *local, uint64_t local_off, uint64_t length,
                     const lm_rdesc_t *remote, uint64_t remote_off, uint64_t wr_id);
void lm_verbs_ep_destroy(lm_ep_t *ep);
/* A work completion for this endpoint (iface table lock held); true when it
 * pushed a lamina completion. */
bool lm_verbs_ep_on_wc(lm_verbs_ep_t *ep, const struct ibv_wc *wc);
/* Fail the endpoint from outside (async event, CQ error). */
void lm_verbs_ep_fail(lm_verbs_ep_t *ep, int status, const char *reason);

#endif /* LM_VERBS_H */
