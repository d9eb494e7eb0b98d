/* shm.h - the shared-memory transport: the tcp transport's frame protocol
 * (checks, acknowledgements, refusals, reads) over a pair of byte rings in
 * shared memory, one per direction, instead of a socket.
 *
 * Each endpoint creates its receive ring in a memfd; the peer (a process on
 * the same host, in the same PID and IPC namespaces: checked at connect)
 * opens it through /proc/<pid>/fd/<n> and writes frames into it. The peer
 * only ever gets the ring: a frame is copied out of it and checked against
 * registered keys and bounds before a byte lands in a region, exactly as a
 * frame read from a socket. Nothing the peer writes into shared memory is
 * trusted: the ring indexes are checked against our own private copies.
 *
 * The bootstrap socket stays open as doorbell and lifeline: a side that
 * found the ring empty (or full) says so in the ring header and sleeps in
 * epoll on the socket; the other side writes one byte to wake it. The
 * peer's death closes the socket: PEER_LOST, never a hang.
 */
#ifndef LM_SHM_H
#define LM_SHM_H

#include <stdatomic.h>

#include "../tcp/tcp.h"

#define LM_SHM_RING_BYTES (4u << 20) /* per direction; a power of two */
#define LM_SHM_HEADER_BYTES 4096u    /* the ring header's page; data follows */
#define LM_SHM_ADDR_MAGIC 0x4d48534cu /* "LSHM" */
#define LM_SHM_ADDR_VERSION 2 /* 2: MAP_REQ / MAP_RESP and mapped writes */
#define LM_SHM_MAPPED_BYTE 'M'        /* set-up: "I mapped your ring" */
#define LM_SHM_CONNECT_TIMEOUT_MS 10000

/* The first page of a ring, shared: written by both sides, trusted by neither. */
typedef struct lm_shm_ring_hdr {
    uint32_t magic;
    uint32_t version;
    uint64_t size;               /* data bytes */
    uint8_t nonce[16];           /* proves the peer opened the ring it was told of */
    _Alignas(64) _Atomic uint64_t tail; /* producer: bytes written so far */
    _Atomic uint32_t consumer_sleeping; /* consumer found it empty and waits for a doorbell */
    _Alignas(64) _Atomic uint64_t head; /* consumer: bytes read so far */
    _Atomic uint32_t producer_waiting;  /* producer found it full and waits for a doorbell */
} lm_shm_ring_hdr_t;

/* What lm_ep_address hands the peer (fixed size, little-endian host order:
 * both sides are on one host). */
typedef struct lm_shm_addr {
    uint32_t magic;
    uint32_t version;
    uint32_t pid;
    int32_t fd;                  /* the memfd of our receive ring, in our process */
    uint64_t ring_bytes;
    uint8_t nonce[16];
    uint8_t boot_id[16];
    uint64_t pid_ns, ipc_ns;     /* namespace inode numbers */
} lm_shm_addr_t;

typedef struct lm_shm_stream {
    /* Our receive ring (we consume), created by us. */
    int memfd;
    lm_shm_ring_hdr_t *rx;
    uint8_t *rx_data;
    uint64_t rx_head;            /* private: what we consumed */
    _Atomic uint64_t rx_head_shared; /* the same, for iface_arm on another thread */
    /* The peer's receive ring (we produce), mapped at connect. */
    lm_shm_ring_hdr_t *tx;
    uint8_t *tx_data;
    uint64_t tx_tail;            /* private: what we produced */
    uint64_t size;
    uint8_t nonce[16];
    uint32_t peer_pid;           /* the peer's process (its granted regions are opened through /proc) */
    atomic_bool peer_gone;       /* the doorbell socket reached its end */
} lm_shm_stream_t;

/* The transport's interface: the tcp one (scratch, keepalive) plus the
 * connected endpoints, which a waiting thread polls (iface_poll). */
typedef struct lm_shm_iface {
    lm_tcp_iface_t tcp; /* first: endpoints point at it as their lm_tcp_iface_t */
    pthread_mutex_t lock;
    lm_tcp_ep_t **eps;
    size_t count, cap;
} lm_shm_iface_t;

extern const lm_transport_ops_t lm_shm_transport;

#endif /* LM_SHM_H */
