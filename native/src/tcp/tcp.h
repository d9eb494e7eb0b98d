/* tcp.h - the tcp transport's private types, shared by its files. */
#ifndef LM_TCP_H
#define LM_TCP_H

#include "../core/core.h"
#include "tcp_wire.h"

/* Header reads pull at most this many bytes, so payload bytes that share a
 * read with their header (under 512 - 56 per frame) are copied once from
 * here; all other payload bytes are received straight into the region. */
#define LM_TCP_RX_BUF 512
/* Frames handled per wake-up before yielding to other endpoints; an endpoint
 * that stops on the budget with work left is re-run by the progress engine
 * in the same dispatch round (lm_progress_rerun), after the others. */
#define LM_TCP_RX_BUDGET 64
/* Reads in flight per endpoint and direction (like RDMA's ORD/IRD): the
 * initiator sends a READ_REQ only while fewer of its reads are unanswered (the
 * rest wait in order in its send queue); a peer that sends more READ_REQs
 * while this many answers are still unsent fails the endpoint (PROTOCOL). */
#define LM_TCP_MAX_READS 16u
/* A read is asked for in pieces of at most this many bytes (one READ_REQ and
 * one sequence number each), so a responder holds at most
 * LM_TCP_MAX_READS * LM_TCP_READ_CHUNK bytes of unsent answers per endpoint:
 * the bound on read snapshots (see snapshot_conflicting_reads). Larger
 * READ_REQs are a protocol error. */
#define LM_TCP_READ_CHUNK (1u << 20)
/* Answers (NACK, READ_RESP) queued for a peer that does not read them: at this
 * many the receive side stops reading that socket (TCP flow control pushes
 * back on the peer) and resumes when half have left. */
#define LM_TCP_MAX_QUEUED_REPLIES 1024u
#define LM_TCP_MAX_IOV 64
/* A bare ACK waits this long for reverse traffic to carry it, unless this
 * many frames or bytes are unacknowledged (the sender's window must move). */
#define LM_TCP_ACK_DELAY_NS 200000ull
#define LM_TCP_ACK_FRAMES 16
#define LM_TCP_ACK_BYTES (256u * 1024u)
/* READ_REQ flag: a later piece of the same read (see LM_TCP_READ_CHUNK). */
#define LM_TCP_FLAG_READ_CONT 2u

/* Regions of the peer this endpoint maps (shm): a small table; a queued frame
 * may point at an entry, so only refused entries no frame points at are reused. */
#define LM_TCP_MAX_MAPS 32
/* Target side: regions granted to one peer (refused past it). */
#define LM_TCP_MAX_GRANTS 64
/* Larger writes go through the stream: the mapped copy runs under the
 * endpoint's lock and the registry's read lock, so it is bounded. */
#define LM_TCP_MAX_MAPPED_WRITE (16ull << 20)
enum lm_tcp_map_state { MAP_PENDING, MAP_READY, MAP_REFUSED };
typedef struct lm_tcp_map {
    uint64_t key;
    uint8_t *addr;            /* our mapping (MAP_READY) */
    uint64_t length;
    uint64_t stream_seq_end;  /* writes to this key below it went through the stream */
    uint32_t queued;          /* frames in the send queue pointing at this entry */
    uint8_t state;
} lm_tcp_map_t;

typedef struct lm_tcp_iface {
    lm_context_t *ctx;
    uint32_t keepalive_ms;
    uint8_t scratch[64 * 1024]; /* refused payloads are drained here */
} lm_tcp_iface_t;

/* An operation waiting for the target's answer (ACK / NACK / READ_RESP). */
typedef struct lm_tcp_pending {
    struct lm_tcp_pending *next;
    uint64_t seq;
    uint64_t wr_id;
    uint8_t type;        /* LM_TCP_WRITE or LM_TCP_READ_REQ */
    int32_t forced_status; /* != 0: complete with this whatever the target says */
    lm_mr_t *dest;       /* reads: where the data lands (holds a reference) */
    uint64_t dest_off;
    uint64_t length;     /* the whole operation's bytes */
    /* Reads: pieces answered so far (piece k has sequence seq + k) and the
     * first refusal among them. */
    uint32_t pieces, pieces_done;
    int32_t read_status;
} lm_tcp_pending_t;

/* A frame queued for sending; payload is sent straight from `src`, or from
 * `snap` once a READ_RESP's unsent part was copied away (snap_from: the
 * payload offset snap[0] holds). */
typedef struct lm_tcp_tx {
    struct lm_tcp_tx *next;
    lm_tcp_hdr_t hdr;
    lm_mr_t *src;        /* NULL for header-only frames (holds a reference) */
    uint64_t src_off;
    uint8_t *snap;
    uint64_t snap_from;
    /* A gather WRITE (lm_ep_writev): the payload is these pieces of src, in
     * order (owned copy); seg_at / seg_base: the piece the send has reached
     * and its payload offset (the send only moves forward). */
    lm_seg_t *segs;
    uint32_t nsegs, seg_at;
    uint64_t seg_base;
    uint64_t sent;       /* bytes of header + payload already written */
    lm_tcp_pending_t *op; /* initiator op for WRITE (to withdraw it) */
    lm_tcp_map_t *map;   /* WRITE: the target region's mapping entry, if we asked for one */
    /* READ_REQ of a read in pieces: pieces still to send after this one. */
    uint32_t pieces_left;
    uint64_t read_left;  /* bytes of the read after this piece */
} lm_tcp_tx_t;

enum lm_tcp_rx_state { RX_HEADER, RX_PAYLOAD };

typedef struct lm_tcp_ep lm_tcp_ep_t;

/* The byte stream under the frame protocol: a socket (tcp), or a pair of
 * shared-memory rings with the socket as doorbell (shm/). */
typedef struct lm_tcp_io {
    /* As sendmsg(MSG_DONTWAIT): bytes taken, or -1 with errno (EAGAIN: full). */
    ssize_t (*send)(lm_tcp_ep_t *ep, const struct iovec *iov, int n);
    /* As recv(MSG_DONTWAIT): bytes read, 0 at the peer's end, -1 with errno.
     * *drained: nothing more waits and a wake-up (EPOLLIN) is armed for more. */
    ssize_t (*recv)(lm_tcp_ep_t *ep, void *buf, size_t len, bool *drained);
    void (*shutdown)(lm_tcp_ep_t *ep);
    /* Frees what the stream holds (after the endpoint left the progress engine). */
    void (*release)(lm_tcp_ep_t *ep);
    uint32_t out_event; /* epoll bit that says "send again" (0: the stream wakes EPOLLIN) */
    /* Map the peer's memfd number fd (checked: inode ino, length bytes, sealed)
     * for writing; NULL when the stream cannot map the peer's memory (tcp). */
    int (*map_peer)(lm_tcp_ep_t *ep, int32_t fd, uint64_t ino, uint64_t length, uint8_t **addr);
    /* The transport whose endpoints use this stream: set as the endpoint's ops
     * at creation, before the progress engine can run its receive path (which
     * reads it: which regions the transport may copy into). */
    const lm_transport_ops_t *transport;
} lm_tcp_io_t;

extern const lm_tcp_io_t lm_tcp_socket_io;

struct lm_tcp_ep {
    struct lm_ep base;
    lm_tcp_iface_t *iface;
    int fd;
    const lm_tcp_io_t *io;
    void *io_priv;           /* the stream's own state (shm: the rings) */
    lm_io_handler_t handler;

    /* Initiator side, guarded by lock. */
    pthread_mutex_t lock;
    uint64_t next_seq;
    uint64_t peer_ack;   /* the peer accepted our writes below this */
    lm_tcp_tx_t *tx_head, *tx_tail;
    lm_tcp_pending_t *pend_head, *pend_tail;
    lm_tcp_tx_t *tx_free;
    lm_tcp_pending_t *pend_free;
    bool out_armed;      /* EPOLLOUT requested */
    bool in_armed;       /* EPOLLIN requested (false while receiving is paused) */
    bool closed;         /* socket shut down, lists flushed */
    uint64_t sent_below; /* every frame with a sequence number below this left whole */
    uint32_t reads_out;  /* our READ_REQs sent and not yet answered (<= LM_TCP_MAX_READS) */
    atomic_uint reads_in; /* the peer's READ_REQs whose answer has not left (IRD) */
    uint32_t replies_queued; /* NACK / READ_RESP frames not yet sent */
    uint32_t nacks_unsent;   /* NACK frames queued and not sent whole */
    uint64_t nack_floor;     /* the first of them's sequence number: the highest ack we may send */
    atomic_bool rx_backlogged; /* receiving paused until replies_queued halves */
    lm_tcp_tx_t *bare_ack; /* a queued bare ACK not yet stamped, or NULL */
    lm_tcp_map_t maps[LM_TCP_MAX_MAPS]; /* guarded by lock */
    uint32_t nmaps;
    uint64_t granted[LM_TCP_MAX_GRANTS]; /* keys the peer may send MAPPED writes to (rx path only) */
    uint32_t ngranted;
    bool tx_held;        /* the head waits for an acknowledgement to go mapped (tcp_tx.c) */
    uint64_t snap_bytes; /* bytes held in READ_RESP snapshots (bounded, see tcp_rx.c) */

    /* Receive side: touched by the progress thread only. */
    uint8_t rxbuf[LM_TCP_RX_BUF];
    size_t rx_start, rx_end;
    enum lm_tcp_rx_state rx_state;
    lm_tcp_hdr_t rx_hdr;
    lm_mr_t *rx_mr;          /* region being written (reference held) */
    uint64_t rx_off;         /* where the next payload byte goes in rx_mr */
    uint64_t rx_left;        /* payload bytes still to receive */
    int32_t rx_status;       /* LM_OK, or why the payload is being discarded */
    lm_tcp_pending_t *rx_op; /* read being answered into local memory */
    uint64_t rx_expect_seq;  /* next sequence number the peer must use */
    bool rx_drained;         /* the last recv came back short */
    bool rx_read_refused;    /* a piece of the read being answered was refused */
    lm_timer_t ack_timer;

    /* Acknowledgement state: written by the receive path, read when any frame
     * is sent; guarded by lock. */
    uint64_t rx_accepted;    /* highest WRITE seq accepted + 1 (0: none) */
    uint64_t rx_acked;       /* what we last told the peer, same encoding */
    uint64_t rx_unacked_bytes; /* payload accepted since the last acknowledgement */
};

int lm_tcp_ep_create(void *iface, uint64_t ep_id, int fd, lm_ep_t **out);
/* An endpoint over any stream: watched by the progress engine at once, or
 * (watch false) once the stream is ready (lm_tcp_ep_watch). cb: the
 * progress callback (lm_tcp_on_io, or a stream's wrapper of it). */
int lm_tcp_ep_init(lm_tcp_iface_t *iface, uint64_t ep_id, int fd, const lm_tcp_io_t *io, void *io_priv,
                   lm_io_cb cb, bool watch, lm_tcp_ep_t **out);
int lm_tcp_ep_watch(lm_tcp_ep_t *ep);
int lm_tcp_ep_write(lm_ep_t *ep, lm_mr_t *local, uint64_t local_off, uint64_t length,
                    const lm_rdesc_t *remote, uint64_t remote_off, uint32_t imm, uint32_t flags,
                    uint64_t wr_id);
int lm_tcp_ep_writev(lm_ep_t *ep, lm_mr_t *local, lm_seg_t *segs, uint32_t nsegs, uint64_t length,
                     const lm_rdesc_t *remote, uint64_t remote_off, uint32_t imm, uint32_t flags,
                     uint64_t wr_id);
int lm_tcp_ep_read(lm_ep_t *ep, lm_mr_t *local, uint64_t local_off, uint64_t length,
                   const lm_rdesc_t *remote, uint64_t remote_off, uint64_t wr_id);
void lm_tcp_ep_destroy(lm_ep_t *ep);
/* The mapping entry of the peer's region key, or NULL (caller holds lock). */
lm_tcp_map_t *lm_tcp_map_find(lm_tcp_ep_t *ep, uint64_t key);
/* Operations the send queue's held head waited for were answered: send again (caller holds lock). */
void lm_tcp_release_held_locked(lm_tcp_ep_t *ep);

/* tcp_tx.c */
lm_tcp_tx_t *lm_tcp_tx_alloc(lm_tcp_ep_t *ep);
lm_tcp_pending_t *lm_tcp_pending_alloc(lm_tcp_ep_t *ep);
void lm_tcp_pending_free(lm_tcp_ep_t *ep, lm_tcp_pending_t *op);
/* Queue a frame and try to send right away (caller holds ep->lock). */
void lm_tcp_tx_queue(lm_tcp_ep_t *ep, lm_tcp_tx_t *tx);
/* Write as much queued data as the socket takes (caller holds ep->lock). */
void lm_tcp_tx_flush(lm_tcp_ep_t *ep);
/* Fail the endpoint once: shut the socket and complete every queued and
 * pending operation with status (caller holds ep->lock). */
void lm_tcp_fail_locked(lm_tcp_ep_t *ep, int status);
/* Recompute the epoll interest from out_armed / in_armed (caller holds lock). */
void lm_tcp_update_interest(lm_tcp_ep_t *ep);

/* tcp_rx.c: the progress-thread callback. */
void lm_tcp_ack_timer_init(lm_tcp_ep_t *ep);
/* Queue a bare ACK now if one is owed (caller holds ep->lock). */
void lm_tcp_ack_now_locked(lm_tcp_ep_t *ep);
void lm_tcp_on_io(void *arg, uint32_t events);
/* Release what the receive path holds (after the endpoint left epoll). */
void lm_tcp_rx_cleanup(lm_tcp_ep_t *ep, int status);

#endif /* LM_TCP_H */
