/*
 * lamina.h - the whole public C API of lamina-comm's native queue library.
 *
 * Model: a context owns a table of registered memory regions, one completion
 * queue and one progress thread. Endpoints are connected pairs (one per peer)
 * created over a transport (tcp or verbs). Operations are one-sided:
 *
 *   lm_ep_write  copies [mr+local_off, +len) into the peer's registered region
 *                at remote_off; with LM_WRITE_IMM the peer's context gets an
 *                LM_OP_RECV_IMM completion carrying the 32-bit immediate.
 *   lm_ep_read   fetches [remote_off, +len) of the peer's region into the
 *                local region; the peer's application is not involved.
 *
 * Completion semantics (both transports):
 *  - the initiator gets one completion per operation (LM_OP_WRITE / LM_OP_READ)
 *    once the target has accepted (write) or delivered (read) the data; its
 *    status is LM_OK or the reason the target refused it;
 *  - a remote LM_OP_RECV_IMM completion is raised only after every byte of that
 *    write, and of every earlier write on the same endpoint, is in place;
 *  - an endpoint's own operations complete in posting order, writes and reads
 *    alike (one send queue, as an RC queue pair's); RECV_IMM completions of an
 *    endpoint come in the peer's posting order; completions of different
 *    endpoints interleave in no promised order;
 *  - when an endpoint fails or is closed, every outstanding operation completes
 *    with an error status (LM_ERR_PEER_LOST or LM_ERR_CANCELED); nothing hangs.
 *
 * Reads observe the target's memory as of their execution (RDMA responder
 * order): a write posted after a read on the same endpoint is never visible in
 * the read's data.
 *
 * Memory: the library does not copy payloads in user space, with two
 * exceptions: shm moves bytes through its shared rings (one copy into the
 * ring, one out of it into the region: the memcpy a socket's kernel would
 * do), and tcp snapshots a read answer still unsent when a later write would
 * land on it (at most 16 MiB per endpoint). The caller owns the
 * memory behind a region and must keep it alive until lm_mr_deregister returns;
 * after that no byte of it is read or written by the library.
 *
 * Threading: every call is thread-safe. Calls never block except lm_cq_wait
 * (bounded by its timeout) and lm_mr_deregister / lm_ep_destroy, which wait for
 * an in-progress socket read or write on that object (nonblocking, so short).
 *
 * Everything between the CDEF markers is parsed by cffi (lamina_comm/_build.py),
 * so it holds only declarations and integer #defines.
 */
#ifndef LAMINA_H
#define LAMINA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* CDEF BEGIN */
#define LM_API_VERSION 1

/* Status codes: 0 is success, negatives are errors (lm_status_str names them). */
#define LM_OK 0
#define LM_ERR_INVALID -1       /* bad argument from the caller */
#define LM_ERR_NO_MEMORY -2
#define LM_ERR_IO -3            /* socket or device error; errno text in lm_last_error */
#define LM_ERR_TIMEOUT -4
#define LM_ERR_NO_KEY -5        /* target: no region with that key (or deregistered) */
#define LM_ERR_OUT_OF_BOUNDS -6 /* target: range outside the region */
#define LM_ERR_ACCESS -7        /* target: region lacks the access flag */
#define LM_ERR_PEER_LOST -8     /* connection failed or peer died */
#define LM_ERR_PROTOCOL -9      /* malformed frame from the peer */
#define LM_ERR_UNSUPPORTED -10  /* transport or feature not available here */
#define LM_ERR_CLOSED -11       /* object already closed */
#define LM_ERR_CANCELED -12     /* operation flushed by a local close */
#define LM_ERR_REMOTE -13       /* target refused for a reason the transport can't name */
#define LM_ERR_LOCAL -14        /* local region problem (deregistered, bounds) */
#define LM_ERR_SEQUENCE -15     /* channel: a message lost, duplicated or reordered */

/* Region access flags, as in verbs. */
#define LM_ACCESS_LOCAL_WRITE 1
#define LM_ACCESS_REMOTE_WRITE 2
#define LM_ACCESS_REMOTE_READ 4

/* Transports (bit flags, so a context can report a set). */
#define LM_TRANSPORT_TCP 1
#define LM_TRANSPORT_VERBS 2
#define LM_TRANSPORT_SHM 4 /* same host: the tcp frame protocol over shared-memory rings */

/* Transport capabilities (lm_ep_caps): what the layer above may rely on. */
#define LM_CAP_ZERO_COPY_SEND 1 /* payload leaves straight from the region */
#define LM_CAP_ZERO_COPY_RECV 2 /* payload lands straight in the region */
#define LM_CAP_REMOTE_ACK 4     /* initiator completion means the target accepted */
#define LM_CAP_HW_OFFLOAD 8     /* the NIC moves the data (no target CPU) */

/* Completion opcodes and flags. */
#define LM_OP_WRITE 1
#define LM_OP_READ 2
#define LM_OP_RECV_IMM 3
#define LM_OP_REFUSED 4        /* target side: a peer's write/read was refused */
#define LM_OP_POSTED 5         /* a poster's deferred write was posted (LM_POSTER_NOTIFY), or failed to be */
#define LM_CF_IMM 1

/* lm_ep_write flags. */
#define LM_WRITE_IMM 1
/* lm_poster_write_prepare only: deliver an LM_OP_POSTED completion once posted. */
#define LM_POSTER_NOTIFY 0x80000000u

/* lm_context_params field mask bits. */
#define LM_CTX_PARAM_TRANSPORTS 1
#define LM_CTX_PARAM_IB_DEVICE 2
#define LM_CTX_PARAM_GID_INDEX 4
#define LM_CTX_PARAM_KEEPALIVE_MS 8
#define LM_CTX_PARAM_PROGRESS 16

/* How threads waiting for completions (lm_cq_wait) make progress. */
#define LM_PROGRESS_EVENT 0 /* sleep in epoll (after a short spin on poll hooks) */
#define LM_PROGRESS_POLL 1  /* busy-poll the transports; never sleep (a core per waiting thread) */

typedef struct lm_context lm_context_t;
typedef struct lm_mr lm_mr_t;
typedef struct lm_ep lm_ep_t;

/* What a peer needs to target a region: plain data, safe to send anywhere
 * (it grants access only to a peer that also holds a connected endpoint). */
typedef struct lm_rdesc {
    uint64_t key;     /* random 64-bit key; checked by the tcp transport */
    uint64_t addr;    /* base virtual address, as verbs expects */
    uint64_t length;  /* bytes */
    uint32_t rkey;    /* verbs remote key; 0 when the region has no verbs MR */
    uint32_t access;  /* LM_ACCESS_* the owner granted */
} lm_rdesc_t;

typedef struct lm_completion {
    uint64_t wr_id;     /* caller's id (initiator side); 0 for LM_OP_RECV_IMM */
    uint64_t ep_id;     /* the endpoint's id, as given at creation */
    uint64_t byte_len;  /* bytes moved (0 on error) */
    int32_t status;     /* LM_OK or LM_ERR_* */
    uint32_t opcode;    /* LM_OP_* */
    uint32_t imm;       /* valid when flags & LM_CF_IMM */
    uint32_t flags;
} lm_completion_t;

typedef struct lm_context_params {
    uint64_t field_mask;    /* LM_CTX_PARAM_* bits naming the fields set */
    uint32_t transports;    /* LM_TRANSPORT_* to open; default: all available */
    const char *ib_device;  /* verbs device name; default: LAMINA_IB_DEVICE or first active */
    int32_t gid_index;      /* verbs GID index; default: LAMINA_IB_GID_INDEX or first RoCE v2 IPv4 */
    uint32_t keepalive_ms;  /* tcp: peer-loss detection bound; default 10000 */
    uint32_t progress;      /* LM_PROGRESS_*; default: LAMINA_PROGRESS=poll|event, else EVENT */
} lm_context_params_t;

/* Text for a status code (static storage). */
const char *lm_status_str(int status);
/* Last error message set on this thread by a failing call (thread-local storage). */
const char *lm_last_error(void);

/* Create a context: registry, completion queue, progress thread and the
 * transports asked for that are available. Returns LM_OK and *out. */
int lm_context_create(const lm_context_params_t *params, lm_context_t **out);
/* Close every endpoint (flushing their operations), deregister every region,
 * stop the progress thread, free. Completions not yet polled are dropped. */
void lm_context_destroy(lm_context_t *ctx);
/* LM_TRANSPORT_* bits that opened in this context. */
uint32_t lm_context_transports(lm_context_t *ctx);
/* The context's LM_PROGRESS_* mode. */
uint32_t lm_context_progress(lm_context_t *ctx);
/* A file descriptor that is readable while the completion queue is not empty
 * (for poll/epoll/asyncio). Do not read or close it. */
int lm_context_fd(lm_context_t *ctx);
/* Text describing why a transport is unavailable ("" when it is available). */
const char *lm_context_transport_status(lm_context_t *ctx, uint32_t transport);

/* Register [addr, addr+length) with the given access; every open transport
 * registers it (verbs: ibv_reg_mr). *out stays valid until deregistered. */
int lm_mr_register(lm_context_t *ctx, void *addr, uint64_t length, uint32_t access, lm_mr_t **out);
/* Fill *out with the region's wire descriptor. */
int lm_mr_descriptor(lm_mr_t *mr, lm_rdesc_t *out);
/* Remove the region: new remote operations on it are refused with
 * LM_ERR_NO_KEY, queued local operations from it complete with LM_ERR_LOCAL,
 * and the call returns once no transport touches the memory any more. The
 * region is gone whatever it returns (never call it twice): an error says
 * that an lm_shmem grant could not be revoked (no memory for the copy), and
 * the allocation then cannot be registered again. Writes racing the call
 * may land or not (as on verbs); the owner must not write the memory
 * meanwhile. */
int lm_mr_deregister(lm_mr_t *mr);

/* Device (GPU) memory, for transports whose NIC reaches it: verbs with
 * GPUDirect RDMA. The CPU never touches such a region, so transports that
 * copy with it (tcp, shm) do not register it: their operations on it are
 * refused with LM_ERR_UNSUPPORTED, and a peer's frames naming its key get
 * LM_ERR_NO_KEY. Both return LM_ERR_UNSUPPORTED, with the reason in
 * lm_last_error, when no open transport takes the memory (no verbs in the
 * context, or the provider refuses: soft-RoCE has no dma-buf support).
 *
 * lm_mr_register_dmabuf: [offset, +length) of the dma-buf fd (exported by the
 * GPU driver, e.g. cuMemGetHandleForAddressRange), addressed as iova (the
 * device pointer, so offsets and descriptors work as for host memory);
 * ibv_reg_dmabuf_mr takes its own reference, so fd may be closed after.
 * lm_mr_register_device: a device pointer the NIC reaches directly
 * (ibv_reg_mr through the nvidia-peermem kernel module). */
int lm_mr_register_dmabuf(lm_context_t *ctx, int fd, uint64_t offset, uint64_t length, uint64_t iova,
                          uint32_t access, lm_mr_t **out);
int lm_mr_register_device(lm_context_t *ctx, void *addr, uint64_t length, uint32_t access, lm_mr_t **out);

/* Host memory a peer on the same host may map (a sealed memfd, whole pages):
 * a region registered over it with LM_ACCESS_REMOTE_WRITE takes shm writes
 * with one copy (the writer copies into the pages, the frame carries only the
 * header) instead of two through the ring. Deregistration revokes every
 * mapping a peer was given (the owner's range moves to a fresh copy at the
 * same addresses), so remote writes after it land nowhere, as on verbs. */
typedef struct lm_shmem lm_shmem_t;
int lm_shmem_alloc(uint64_t length, lm_shmem_t **out); /* length rounded up to pages */
void *lm_shmem_addr(const lm_shmem_t *m);
uint64_t lm_shmem_length(const lm_shmem_t *m);
/* Unmap and free; LM_ERR_INVALID while a region is registered over it. */
int lm_shmem_free(lm_shmem_t *m);
/* Register the whole allocation (one live region per allocation at a time). */
int lm_mr_register_shmem(lm_context_t *ctx, lm_shmem_t *m, uint32_t access, lm_mr_t **out);

/* Create a tcp endpoint over a connected stream socket (the bootstrap's);
 * the endpoint owns fd from then on, also on failure. */
int lm_ep_create_tcp(lm_context_t *ctx, int fd, uint64_t ep_id, lm_ep_t **out);
/* Create a verbs endpoint: an RC queue pair in RESET->INIT. Its address
 * (QPN, PSN, GID, MTU) is in lm_ep_address; connect with the peer's. */
int lm_ep_create_verbs(lm_context_t *ctx, uint64_t ep_id, lm_ep_t **out);
/* Create a shared-memory endpoint for a peer on this host: its receive ring
 * is in lm_ep_address; connect with the peer's (same boot, same PID and IPC
 * namespaces, or LM_ERR_UNSUPPORTED). fd, the connected bootstrap socket,
 * stays open as doorbell and lifeline; the endpoint owns it, also on
 * failure. */
int lm_ep_create_shm(lm_context_t *ctx, int fd, uint64_t ep_id, lm_ep_t **out);
/* Copy the endpoint's transport address into buf (at most *len bytes); sets
 * *len to the size. tcp endpoints have an empty address. */
int lm_ep_address(lm_ep_t *ep, void *buf, size_t *len);
/* Bring a verbs endpoint to RTS with the peer's address. ctrl_fd (or -1) is
 * the bootstrap socket, kept open and watched to detect peer loss; the
 * endpoint owns it. */
int lm_ep_connect(lm_ep_t *ep, const void *peer_addr, size_t len, int ctrl_fd);
/* LM_TRANSPORT_* of this endpoint. */
uint32_t lm_ep_transport(lm_ep_t *ep);
/* LM_CAP_* of this endpoint's transport. */
uint32_t lm_ep_caps(lm_ep_t *ep);
/* Writes this endpoint sent straight into the peer's memory (shm, into
 * lm_shmem regions the peer granted); 0 on other transports. */
uint64_t lm_ep_mapped_writes(lm_ep_t *ep);

/* Post a one-sided write. Returns LM_OK when queued (the completion comes
 * later), or now: LM_ERR_INVALID (NULL or foreign arguments, unknown flags, a
 * local range outside the region, over 4 GiB), LM_ERR_NO_MEMORY (the
 * completion queue cannot grow to hold this operation's completion: nothing
 * was posted; poll and retry) or the status that failed the endpoint earlier
 * (LM_ERR_PEER_LOST, LM_ERR_PROTOCOL, ...). Remote bounds,
 * key and access are checked by the target: a refusal comes back as the
 * completion's status. Never waits for the peer: beyond the transport's queue
 * depth it queues in host memory. */
int lm_ep_write(lm_ep_t *ep, lm_mr_t *local, uint64_t local_off, uint64_t length,
                const lm_rdesc_t *remote, uint64_t remote_off, uint32_t imm,
                uint32_t flags, uint64_t wr_id);
/* One piece of a gather write: [offset, +length) of the local region. */
typedef struct lm_seg {
    uint64_t offset;
    uint64_t length;
} lm_seg_t;
#define LM_MAX_SEGS 4096
/* A gather write: the concatenation of nsegs pieces of one local region
 * (a strided view: rows of a fused tensor) lands as one contiguous write at
 * remote_off, with the semantics of lm_ep_write (one completion; the
 * immediate after every byte). No copy: tcp sends the pieces with one
 * sendmsg iovec list, verbs posts them as scatter-gather lists (several per
 * work request, up to the device's max_send_sge). The segment list is copied;
 * the caller may reuse it at once. Errors as lm_ep_write, and
 * LM_ERR_INVALID for nsegs outside 1..LM_MAX_SEGS or a piece outside the
 * region. */
int lm_ep_writev(lm_ep_t *ep, lm_mr_t *local, const lm_seg_t *segs, uint32_t nsegs,
                 const lm_rdesc_t *remote, uint64_t remote_off, uint32_t imm, uint32_t flags,
                 uint64_t wr_id);
/* Post a one-sided read into a region with LM_ACCESS_LOCAL_WRITE; returns
 * as lm_ep_write. */
int lm_ep_read(lm_ep_t *ep, lm_mr_t *local, uint64_t local_off, uint64_t length,
               const lm_rdesc_t *remote, uint64_t remote_off, uint64_t wr_id);
/* ---- posters: writes posted later, from any thread -------------------------
 * For the GPU tier's staged links: a write is prepared when its copy is
 * queued on a CUDA stream, and cuLaunchHostFunc(stream, lm_poster_run, op)
 * posts it (lm_ep_write) once the copy is done, on the driver's thread, with
 * no Python in between. The poster guards the endpoint: after
 * lm_poster_close no op touches it (an op run later only frees itself), so
 * the endpoint may then be destroyed. With LM_POSTER_NOTIFY in flags, the
 * endpoint also gets an LM_OP_POSTED completion (wr_id, status LM_OK) once
 * the write is posted: "the copy before it is done", told to the thread that
 * waits on the endpoint without another hand-off. A post that fails makes no
 * write completion: it gets an LM_OP_POSTED completion with the error (with
 * or without the flag), is kept as lm_poster_error, and later ops post
 * nothing (nor notify: an op run after a failure or after close only frees
 * itself). The op holds its region's record; a region deregistered before
 * the op runs fails the post (LM_ERR_LOCAL). If the stream an op waits on
 * fails, the op never runs: its owner must notice the stream's error (the
 * poster then leaks rather than be freed under a late op). Every prepared
 * op must be run or canceled exactly once; the poster's memory lasts until
 * lm_poster_destroy and the last op. */
typedef struct lm_poster lm_poster_t;
typedef struct lm_poster_op lm_poster_op_t;
int lm_poster_create(lm_ep_t *ep, lm_poster_t **out);
/* Waits out a post in progress; idempotent. */
void lm_poster_close(lm_poster_t *p);
void lm_poster_destroy(lm_poster_t *p);
/* 0, or the status of the first post that failed. */
int lm_poster_error(lm_poster_t *p);
/* Ops prepared and not yet run or canceled. */
uint64_t lm_poster_pending(lm_poster_t *p);
/* Arguments as lm_ep_write, checked now as the post would (flags: LM_WRITE_IMM,
 * LM_POSTER_NOTIFY); LM_ERR_CLOSED once the poster is closed. The op's
 * LM_OP_POSTED notice has its completion-queue place held from now on
 * (LM_ERR_NO_MEMORY if the queue cannot grow), so it is never lost. */
int lm_poster_write_prepare(lm_poster_t *p, lm_mr_t *local, uint64_t local_off, uint64_t length,
                            const lm_rdesc_t *remote, uint64_t remote_off, uint32_t imm, uint32_t flags,
                            uint64_t wr_id, lm_poster_op_t **op);
/* Post op (a CUhostFn), then free it. */
void lm_poster_run(void *op);
/* Free op unposted (its copy was never queued, or its stream failed). */
void lm_poster_cancel(void *op);

/* ---- staged links: the data plane of lamina_comm.gpu.StagedLink -----------
 * Device memory over any endpoint through pinned host slots (docs/gpu.md,
 * "Staging"). Python sets a link up (the pinned block and its two regions,
 * the hello, the receive gate) and hands each message here. Per chunk: one
 * copy-engine submission and one network write, posted by a host function
 * queued behind the copy (lm_poster_run); the endpoint's completions go to
 * the link (lm_ep_set_sink) and are handled on a native thread of its own,
 * which also drives the context's progress, queues the copies of arrived
 * chunks and the next chunks of waiting sends. No Python runs per chunk.
 *
 * The copy engine is a table with the CUDA driver's signatures: the driver's
 * own entry points (CUresult is an int, CUstream/CUevent/CUcontext pointers,
 * CUdeviceptr a uint64_t), or the host stand-in's (lm_host_copy_fns). The
 * event and context entries may be NULL (no stream order to keep: the host
 * stand-in). Wire format: docs/gpu.md (immediates DATA | last | length and
 * CREDIT | count; slots used round-robin on both sides). */
typedef struct lm_copy_fns {
    int (*memcpy_dtoh)(void *dst, uint64_t src, size_t n, void *stream);
    int (*memcpy_htod)(uint64_t dst, const void *src, size_t n, void *stream);
    int (*launch_host_func)(void *stream, void (*fn)(void *), void *arg);
    int (*stream_wait_event)(void *stream, void *event, unsigned int flags);
    int (*stream_write_value32)(void *stream, uint64_t address, uint32_t value, unsigned int flags);
    int (*stream_query)(void *stream);    /* 0 idle, 600 (CUDA_ERROR_NOT_READY) busy, else failed */
    int (*event_create)(void **event, unsigned int flags);
    int (*event_record)(void *event, void *stream);
    int (*event_destroy)(void *event);
    int (*ctx_set_current)(void *context);
    void *context;  /* made current on the link's thread */
    void *d2h;      /* the link's copy streams */
    void *h2d;
} lm_copy_fns_t;

#define LM_STAGED_SCRATCH 64 /* after the slots of each region: credit writes land there */
typedef struct lm_staged_params {
    lm_mr_t *tx;               /* our transmit slots: slots x chunk_bytes + LM_STAGED_SCRATCH bytes */
    lm_mr_t *rx;               /* our receive slots, the same size, LM_ACCESS_REMOTE_WRITE */
    uint32_t slots;
    uint32_t chunk_bytes;      /* a multiple of 64, at most 2^28 */
    lm_rdesc_t peer_rx;        /* the peer's receive region, from its hello */
    uint32_t peer_slots;
    uint32_t peer_chunk_bytes;
    uint64_t gate_device;      /* the receive gate for stream_write_value32; 0: none */
    uint32_t *gate_host;       /* the same word for the host: opened from here when the link fails */
} lm_staged_params_t;

typedef struct lm_staged_stats {
    uint64_t sent, received, chunks_sent, chunks_received, credits_sent;
    uint64_t posts_pending;  /* writes prepared and not yet run by their host function */
    uint64_t events_created; /* the link's pool of stream-order events (it does not grow per message) */
} lm_staged_stats_t;

typedef struct lm_staged lm_staged_t;
typedef struct lm_transfer lm_transfer_t;
/* Take ep's completions and start the link's thread. The geometry is checked
 * (LM_ERR_INVALID); the caller checked the peer's hello. The link does not own
 * ep, but ep must outlive it or see lm_staged_shutdown first. */
int lm_staged_create(lm_ep_t *ep, const lm_copy_fns_t *fns, const lm_staged_params_t *params, lm_staged_t **out);
/* Send [src, +nbytes) of device memory as one message. With ordered, its
 * copies start once the work queued on stream before the call is done (an
 * event recorded there); the call never waits for the device or a credit. */
int lm_staged_send(lm_staged_t *s, uint64_t src, uint64_t nbytes, void *stream, int ordered, lm_transfer_t **out);
/* Receive the next message into [dst, +capacity); with ordered, it is written
 * only once the work queued on stream before the call is done. With gated,
 * the copy stream writes gate_value into the gate after the message's last
 * copy (the caller queued the stream's wait on it). Messages match in order;
 * a longer one fails this receive (LM_ERR_INVALID) and the link goes on. */
int lm_staged_recv(lm_staged_t *s, uint64_t dst, uint64_t capacity, void *stream, int ordered, int gated,
                   uint32_t gate_value, lm_transfer_t **out);
/* Wait up to timeout_ms (< 0: forever): LM_OK with *moved bytes (a receive:
 * the message's length), the transfer's error, or LM_ERR_TIMEOUT. */
int lm_transfer_wait(lm_transfer_t *t, int timeout_ms, uint64_t *moved);
int lm_transfer_done(lm_transfer_t *t);
/* The error's text once lm_transfer_wait returned it ("" before). */
const char *lm_transfer_message(lm_transfer_t *t);
void lm_transfer_release(lm_transfer_t *t);
/* 0, or the status that failed the link; its text is copied into text. */
int lm_staged_error(lm_staged_t *s, char *text, size_t len);
/* Sends not done yet. */
uint64_t lm_staged_sending(lm_staged_t *s);
void lm_staged_stats(lm_staged_t *s, lm_staged_stats_t *out);
/* Fail what is pending with status (why: its text), open the gate, post
 * nothing more, stop the thread and give the endpoint back; idempotent.
 * After it the endpoint may be destroyed. */
void lm_staged_shutdown(lm_staged_t *s, int status, const char *why);
/* lm_staged_shutdown(LM_ERR_CLOSED), destroy the pooled events (the copy
 * engine's context current), then let go: transfers still held stay valid. */
void lm_staged_destroy(lm_staged_t *s);

/* The host stand-in for a copy engine: host memory as "device", each stream a
 * worker thread running its work in order (NULL: run at once, in the call). */
typedef struct lm_host_stream lm_host_stream_t;
/* delay_us: each piece of work waits that long first (tests, "slow copies"). */
int lm_host_stream_create(uint32_t delay_us, lm_host_stream_t **out);
/* Run what is queued, then stop and free. */
void lm_host_stream_destroy(lm_host_stream_t *hs);
int lm_host_stream_idle(lm_host_stream_t *hs);
/* Tests: the next copy queued on hs is refused (as a driver refuses one). */
void lm_host_stream_fail_next_copy(lm_host_stream_t *hs);
/* The stand-in's table, with no events or context; set d2h and h2d after. */
void lm_host_copy_fns(lm_copy_fns_t *fns);

/* Operations posted and not yet completed on this endpoint. */
uint64_t lm_ep_outstanding(lm_ep_t *ep);
/* 0 while usable, else the status that failed it (e.g. LM_ERR_PEER_LOST). */
int lm_ep_error(lm_ep_t *ep);
/* Close and free: outstanding operations complete with LM_ERR_CANCELED. */
void lm_ep_destroy(lm_ep_t *ep);

/* Take up to max completions without waiting; returns how many.
 * Back-pressure: while 65536 (LM_CQ_PAUSE_DEPTH) completions wait unpolled,
 * the context stops reading new frames from its peers (their sends block, as
 * with RDMA's receiver-not-ready) and resumes once polled below half that.
 * Out of memory loses nothing: a post that has no room for its completion
 * is refused (LM_ERR_NO_MEMORY), and arrivals pause as above while the queue
 * cannot grow. Should a transport still overrun it, every call returns
 * LM_ERR_NO_MEMORY once the queue is empty (the loss is never silent). */
int lm_cq_poll(lm_context_t *ctx, lm_completion_t *out, int max);
/* Like lm_cq_poll but waits up to timeout_ms (-1: forever) for at least one;
 * returns 0 on timeout. The waiting thread runs the progress engine itself:
 * LM_PROGRESS_EVENT spins up to 50 us on the transports' poll hooks, then
 * sleeps in epoll; LM_PROGRESS_POLL never sleeps (it busy-polls the poll
 * hooks and, without waiting, epoll) until a completion or the timeout. */
int lm_cq_wait(lm_context_t *ctx, lm_completion_t *out, int max, int timeout_ms);

/* ---- channels (native/src/channel; wire format in docs/channel.md) --------
 *
 * A channel joins one model worker and one attention worker over a connected
 * endpoint and one registered region per side, laid out as
 *   [recv slots | send slots | credit-in words | credit-out words],
 * each ring indexed by (micro-batch, slot); a slot is a 256-byte header then
 * the payload. A message is one write (header + payload from the send slot,
 * or payload from a registered region then the header) whose immediate names
 * (kind, micro-batch, slot); the receiver returns the slot with a credit,
 * written on its own or piggybacked in the header of its next message.
 *
 * The channel owns its endpoint's completions: they never reach the context's
 * completion queue. Arrivals are demultiplexed, checked and queued in native
 * code by whichever thread dispatches; a send is one call, a receive is one
 * call, and every wait runs the progress engine in the calling thread (the GIL
 * is released by the bindings). One application thread at a time per channel;
 * another thread may close it (lm_chan_close) while that one is inside a call.
 */
typedef struct lm_chan lm_chan_t;

#define LM_CHAN_HEADER_BYTES 256
#define LM_CHAN_MAX_TENSORS 6
#define LM_CHAN_MAX_NDIM 4
#define LM_CHAN_MAX_PIGGYBACK 4
#define LM_CHAN_WIRE_VERSION 1
/* Wire dtype codes of lm_chan_tensor_t.dtype (the one table: the Python
 * layer reads these; docs/channel.md). */
#define LM_DTYPE_FLOAT16 1
#define LM_DTYPE_BFLOAT16 2
#define LM_DTYPE_FLOAT32 3
#define LM_DTYPE_INT32 4
#define LM_DTYPE_INT64 5
#define LM_DTYPE_UINT8 6
#define LM_DTYPE_INT8 7
#define LM_DTYPE_FLOAT64 8
/* lm_chan_send flags. */
#define LM_CHAN_SEND_RAW_SEQ 1 /* tests: use *seq as given, do not advance the counter */

typedef struct lm_chan_params {
    uint32_t microbatches;    /* 1..4096 */
    uint32_t slots;           /* per micro-batch, 1..65536 */
    uint64_t recv_capacity;   /* payload bytes of one of our receive slots (multiple of 64) */
    uint64_t send_capacity;   /* payload bytes of one of our send slots (the peer's receive slots) */
    uint32_t piggyback;       /* 1: credits ride in our next message's header */
} lm_chan_params_t;

typedef struct lm_chan_tensor {
    uint64_t addr;            /* send: host address; receive: offset in the region */
    uint64_t nbytes;
    uint32_t shape[4];
    uint8_t dtype;            /* wire code (docs/channel.md) */
    uint8_t ndim;
    /* Send only: rows > 1 describes a strided tensor, nbytes / rows bytes at
     * addr + r * row_stride for r < rows (a column block of a fused qkv
     * tensor); 0 or 1: contiguous. Received tensors are always contiguous. */
    uint32_t rows;
    uint64_t row_stride;
} lm_chan_tensor_t;

typedef struct lm_chan_msg {
    uint64_t seq;
    uint32_t layer;
    uint32_t microbatch;
    uint32_t slot;
    uint32_t ntensors;
    uint64_t payload_bytes;
    uint64_t arrived_ns;      /* CLOCK_MONOTONIC when its immediate was dispatched */
    lm_chan_tensor_t tensors[6];
} lm_chan_msg_t;

typedef struct lm_chan_stats {
    uint64_t messages, bytes_sent, staged_bytes, slot_messages, region_messages, staged_messages, gather_messages;
    uint64_t credit_waits, credit_wait_ns;
    uint64_t messages_received, bytes_received, credits_returned, credits_piggybacked;
    uint64_t outstanding;     /* writes posted and not completed */
} lm_chan_stats_t;

/* Bytes of the region one side registers for these params. */
uint64_t lm_chan_region_bytes(const lm_chan_params_t *params);
/* Create a channel over ep, our region mr (at least lm_chan_region_bytes,
 * zeroed) and the peer's region descriptor. From then on ep's completions go
 * to the channel (do not wait on ep yourself); the caller still owns ep and
 * mr. LM_ERR_INVALID for bad params or a region too small, LM_ERR_PROTOCOL
 * for a peer region smaller than its layout. */
int lm_chan_create(lm_ep_t *ep, lm_mr_t *mr, const lm_rdesc_t *peer, const lm_chan_params_t *params,
                   lm_chan_t **out);
/* Split payloads, set right after lm_chan_create (both sides agreed in their
 * handshake): recv_payloads (or NULL), a region of ours with at least
 * recv_microbatches * slots * recv_capacity bytes granting remote writes,
 * takes the payloads of the messages we receive on micro-batches below
 * recv_microbatches (1..microbatches; slot s of micro-batch m at
 * (m * slots + s) * recv_capacity), the headers staying in our region: it
 * may be device memory the NIC writes (GPUDirect), since only headers are
 * read by the CPU. Later micro-batches keep their payloads after the header
 * (host-readable: an engine's control micro-batch). lm_chan_recv's tensor
 * addresses are offsets in the payload region for split micro-batches, in
 * our region for the others. peer_payloads (or NULL): the peer's such region
 * for its first peer_microbatches; our sends write their payloads there,
 * then the header. Arrivals already queued (a fast peer) are fine: they were
 * placed as the handshake said. LM_ERR_INVALID once this side sent or
 * opened a message, or for a bad region (too small, no
 * LM_ACCESS_REMOTE_WRITE) or count, LM_ERR_UNSUPPORTED for device memory the
 * transport cannot write, LM_ERR_PROTOCOL for a peer region too small or a
 * peer count out of range. */
int lm_chan_split_payloads(lm_chan_t *ch, lm_mr_t *recv_payloads, uint32_t recv_microbatches,
                           const lm_rdesc_t *peer_payloads, uint32_t peer_microbatches);
/* Sent words, for sends straight from device memory (GPUDirect: the NIC
 * reads the source after the stream passed the send): words (the caller's
 * host memory, one uint32 per micro-batch, e.g. page-locked and mapped for
 * the GPU; kept until lm_chan_close returned) holds, per micro-batch m, the
 * low 32 bits of seq + 1 of m's latest stream-ordered send (lm_chan_send_*
 * prepare) whose writes all completed: work that overwrites the source of
 * send seq waits for words[m] >= seq + 1 (cuStreamWaitValue32 with GEQ, a
 * cyclic compare) and never for the host. Set now to m's next sequence
 * number; words only move forward. When the channel fails, and again when
 * it closes, every send prepared so far counts as sent (a waiting stream
 * must not hang; nothing reads the sources any more); after lm_chan_close
 * returned the words are not written again. NULL stops updating.
 * LM_ERR_NO_MEMORY. */
int lm_chan_set_sent_words(lm_chan_t *ch, uint32_t *words);
/* Close: fail the channel with LM_ERR_CLOSED, wake and wait out any thread
 * inside a call on it (each returns LM_ERR_CLOSED), then let go of the
 * endpoint (its later completions go to the context's queue again). Calls
 * after it return LM_ERR_CLOSED; the memory stays valid until
 * lm_chan_destroy, so a thread that was about to call does not touch freed
 * memory. Then ep and mr may be destroyed. Idempotent. */
void lm_chan_close(lm_chan_t *ch);
/* Close if not closed, and free. No call may be in progress or follow. */
void lm_chan_destroy(lm_chan_t *ch);
/* Wait up to timeout_ms for the credit of the next send slot of a micro-batch;
 * *payload_offset: where its payload starts in our region (fill it in place).
 * LM_ERR_TIMEOUT when the receiver still holds the slot. */
int lm_chan_send_slot(lm_chan_t *ch, uint32_t microbatch, int timeout_ms, uint64_t *payload_offset);
/* Send one message of n tensors (n <= 6) of host memory, each contiguous or
 * strided (rows): tensors already in the send slot go with the header in one
 * write (no copy); tensors packed in `source` (or our own region) go from
 * there (two writes, payload then header); tensors that all lie in one of
 * those regions but not packed (strided views, scattered tensors) go as
 * gather writes from it (lm_ep_writev: one per run of tensors that need no
 * alignment padding between them, then the header; counted in
 * gather_messages; strided rows under 64 B are copied instead); anything
 * else is copied into the slot first (counted in staged_bytes). Waits only for the slot's credit (timeout_ms). *seq: the
 * message's sequence number (in with LM_CHAN_SEND_RAW_SEQ). Errors: TIMEOUT,
 * INVALID (too many or too large tensors, bad micro-batch), the channel's
 * sticky error. */
int lm_chan_send(lm_chan_t *ch, uint32_t layer, uint32_t microbatch, const lm_chan_tensor_t *tensors,
                 uint32_t n, lm_mr_t *source, uint32_t flags, int timeout_ms, uint64_t *seq);
/* lm_chan_send with a registered region per tensor (sources[i], or NULL):
 * tensors in several regions (q, k, v registered apart) go as gather writes,
 * one per run of tensors that lie in one region with no padding between them,
 * then the header; one in no region (or rows under 64 B) stages the message.
 * Device memory is never staged (the CPU cannot read it): its rows are
 * gathered however short, and a message that would need staging is refused
 * (LM_ERR_UNSUPPORTED). */
int lm_chan_send_from(lm_chan_t *ch, uint32_t layer, uint32_t microbatch, const lm_chan_tensor_t *tensors,
                      uint32_t n, lm_mr_t *const *sources, int timeout_ms, uint64_t *seq);
/* Stream-ordered (deferred) sends and releases, for the GPU tier: the work
 * is prepared here and run later by lm_chan_run_deferred(op), from any thread
 * (it has the signature of a CUDA host function: cuLaunchHostFunc(stream,
 * lm_chan_run_deferred, op) runs it once the stream's copies are done), so
 * that the caller never waits for the device.
 *
 * lm_chan_send_prepare: a send whose tensors lie packed in the next send slot
 * of mb (lm_chan_send_slot's payload), to be filled by the stream meanwhile.
 * It waits for the slot's credit, takes the sequence number (*seq) and writes
 * the header; running op posts the one write. Immediate sends on mb wait until
 * the deferred ones prepared before them are posted (lm_chan_unposted); the
 * deferred sends of one micro-batch must run in the order they were prepared
 * (one stream). A post that fails fails the channel.
 * lm_chan_release_prepare: lm_chan_release(mb, slot, seq), when op runs (after
 * the stream copied the message out of the slot).
 * Every prepared op must run (or be canceled) exactly once, also after
 * lm_chan_close (it then does nothing); the channel's memory is freed by the
 * later of lm_chan_destroy and the last op, so an op that never runs leaks the
 * channel rather than hanging. Held credits ride in a deferred send's header
 * when it posts; a deferred release writes its credit at once. */
typedef struct lm_chan_deferred lm_chan_deferred_t;
int lm_chan_send_prepare(lm_chan_t *ch, uint32_t layer, uint32_t microbatch, const lm_chan_tensor_t *tensors,
                         uint32_t n, int timeout_ms, uint64_t *seq, lm_chan_deferred_t **op);
/* lm_chan_send_prepare_from: a send whose tensors lie in registered regions
 * (sources[i], one per tensor, all of this context), read by the NIC when op
 * runs: device memory registered with lm_mr_register_device/_dmabuf goes
 * straight from the GPU, no slot copy (GPUDirect). Running op posts the
 * payload as gather writes (one per run of tensors without padding between
 * them, rows of strided tensors as pieces, however short), then the header.
 * The regions' records are referenced until op has run; the memory must
 * stay registered and unchanged until the message is sent (lm_chan_flush:
 * a send token taken before op ran does not cover it). A region
 * deregistered before op runs fails the channel (LM_ERR_LOCAL) instead of
 * posting a header over a payload that never came. Refused before the
 * credit wait: LM_ERR_UNSUPPORTED (with the reason) when a region is device
 * memory the channel's transport cannot reach (tcp, shm: stage it through
 * the slot); LM_ERR_INVALID when a tensor lies outside its region or the
 * message has more than LM_MAX_SEGS pieces (rows). */
int lm_chan_send_prepare_from(lm_chan_t *ch, uint32_t layer, uint32_t microbatch, const lm_chan_tensor_t *tensors,
                              uint32_t n, lm_mr_t *const *sources, int timeout_ms, uint64_t *seq,
                              lm_chan_deferred_t **op);
int lm_chan_release_prepare(lm_chan_t *ch, uint32_t microbatch, uint32_t slot, uint64_t seq,
                            lm_chan_deferred_t **op);
void lm_chan_run_deferred(void *op);
/* Instead of running op: its stream failed, so the copies it waited for may
 * not have happened. Fails the channel with status (or LM_ERR_CANCELED). */
void lm_chan_cancel_deferred(void *op, int status);
/* Deferred sends of mb prepared and not yet posted. */
uint32_t lm_chan_unposted(lm_chan_t *ch, uint32_t microbatch);
/* The next message (of micro-batch mb, or of any when mb < 0, in arrival
 * order): 1 and *out (tensor addrs are offsets into our region, valid until
 * released), 0 on timeout, or an error: LM_ERR_SEQUENCE (lost, duplicated,
 * reordered: the slot is handed back, the channel goes on) or LM_ERR_PROTOCOL
 * (a malformed header: the same), or the channel's sticky error. */
int lm_chan_recv(lm_chan_t *ch, int32_t microbatch, lm_chan_msg_t *out, int timeout_ms);
/* Hand a received slot back (a credit now, or in our next header). */
int lm_chan_release(lm_chan_t *ch, uint32_t microbatch, uint32_t slot, uint64_t seq);
/* Write out held credits, then wait until every posted write completed; the
 * channel's sticky error if it failed (a failed write is not flushed). */
int lm_chan_flush(lm_chan_t *ch, int timeout_ms);
/* The completion token of the last message this channel sent (0 before any).
 * Once lm_chan_wait_sent(token) returns LM_OK every write of that message,
 * and of every earlier one, has completed: its source memory may be reused.
 * (An endpoint's writes complete in the order they were posted: RC and TCP.) */
uint64_t lm_chan_send_token(lm_chan_t *ch);
/* Wait up to timeout_ms (0: only look) until the writes up to token completed;
 * LM_ERR_TIMEOUT when they have not, or the channel's sticky error. */
int lm_chan_wait_sent(lm_chan_t *ch, uint64_t token, int timeout_ms);
/* Run completions without waiting (credits and arrivals are then visible),
 * then write out held credits (a caller about to sleep, as asyncio's, must
 * not keep the peer waiting for them). */
int lm_chan_progress(lm_chan_t *ch);
/* Whether the next send slot of mb is free (after lm_chan_progress). */
int lm_chan_slot_free(lm_chan_t *ch, uint32_t microbatch);
/* Arrivals waiting (of mb, or of any when mb < 0). */
int lm_chan_pending(lm_chan_t *ch, int32_t microbatch);
/* 0, or the status that failed the channel (its text in lm_last_error after
 * any failing call). */
int lm_chan_error(lm_chan_t *ch);
/* Counters (a snapshot). */
void lm_chan_stats(lm_chan_t *ch, lm_chan_stats_t *out);
/* An eventfd readable after any change (arrival, credit, failure); drain it
 * (read 8 bytes) before looking, as asyncio's add_reader callbacks do. */
int lm_chan_fd(lm_chan_t *ch);
/* Channel groups: one model worker and its attention workers.
 * lm_chan_send_group posts one message per channel (channel i gets counts[i]
 * tensors, taken in order from `tensors`) for the same layer and
 * micro-batch, in one call; seqs[i] gets each sequence number. It stops at
 * the first failure (its status; the messages of channels [0, *failed) are
 * posted; *failed is -1 when nothing was, e.g. a channel closed meanwhile).
 * lm_chan_recv_group waits until every channel has a message of mb (any when
 * mb < 0) and takes one from each into out[i], in one call: n, 0 on timeout
 * (nothing taken), or the first error (messages taken before it stay in
 * out[] and must be released: *taken says how many). On an error, *failed
 * is the index of the channel it came from (-1 when none did). */
int lm_chan_send_group(lm_chan_t **chans, uint32_t n, uint32_t layer, uint32_t microbatch,
                       const lm_chan_tensor_t *tensors, const uint32_t *counts, lm_mr_t *source, int timeout_ms,
                       uint64_t *seqs, int32_t *failed);
int lm_chan_recv_group(lm_chan_t **chans, uint32_t n, int32_t microbatch, lm_chan_msg_t *out, int timeout_ms,
                       uint32_t *taken, int32_t *failed);
/* One receiver, several senders (an attention worker serving several model
 * nodes): take the oldest arrival of mb (any when mb < 0) over all n
 * channels, so requests are served in arrival order whichever channel
 * carried them. 1 with *index naming the channel, 0 on timeout, or an error
 * (*index names the failed channel, -1 when none). */
int lm_chan_recv_any(lm_chan_t **chans, uint32_t n, int32_t microbatch, lm_chan_msg_t *out, int timeout_ms,
                     int32_t *index);
/* Tests and fuzzing: process an immediate as if it had arrived (the header
 * must already be in the slot). Returns the channel's error status or 0. */
int lm_chan_inject_imm(lm_chan_t *ch, uint32_t imm);
/* Tests and fuzzing: expect seq recv_seq next on every micro-batch, and mark
 * every send slot in use by a message of seq slot_seq. */
int lm_chan_test_state(lm_chan_t *ch, uint64_t recv_seq, uint64_t slot_seq);
/* CDEF END */

#ifdef __cplusplus
}
#endif
#endif /* LAMINA_H */
