/*
 * test_native.c - C-level tests of the core and the tcp transport, built
 * plain and with ASan/UBSan (make asan). Two contexts in one process are
 * joined by a socketpair, so the tests need no network set-up.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <stdbool.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include "lamina.h"
#include "../../native/src/tcp/tcp_wire.h" /* hostile-peer tests speak the wire */
#include "../../native/src/core/core.h"     /* progress-engine counters */
#include "../../native/src/shm/shm.h"       /* hostile-ring tests reach into the rings */
#include <pthread.h>

static int failures;

#define CHECK(cond)                                                                   \
    do {                                                                              \
        if (!(cond)) {                                                                \
            fprintf(stderr, "%s:%d: CHECK failed: %s (%s)\n", __FILE__, __LINE__, #cond, \
                    lm_last_error());                                                 \
            failures++;                                                               \
        }                                                                             \
    } while (0)

typedef struct pair {
    lm_context_t *a, *b;
    lm_ep_t *ea, *eb;
} pair_t;

static void pair_open(pair_t *p)
{
    lm_context_params_t params = {.field_mask = LM_CTX_PARAM_TRANSPORTS, .transports = LM_TRANSPORT_TCP};
    int sv[2];
    CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);
    CHECK(lm_context_create(&params, &p->a) == LM_OK);
    CHECK(lm_context_create(&params, &p->b) == LM_OK);
    CHECK(lm_ep_create_tcp(p->a, sv[0], 1, &p->ea) == LM_OK);
    CHECK(lm_ep_create_tcp(p->b, sv[1], 2, &p->eb) == LM_OK);
}

static void pair_close(pair_t *p)
{
    lm_context_destroy(p->a);
    lm_context_destroy(p->b);
}

/* Wait for one completion or fail the test after 5 s. */
static lm_completion_t wait_one(lm_context_t *ctx)
{
    lm_completion_t c;
    memset(&c, 0, sizeof(c));
    int n = lm_cq_wait(ctx, &c, 1, 5000);
    CHECK(n == 1);
    return c;
}

static void test_write_with_imm_lands_in_place(void)
{
    pair_t p;
    pair_open(&p);
    enum { N = 1 << 16 };
    unsigned char *src = malloc(N), *dst = calloc(1, N);
    for (int i = 0; i < N; i++)
        src[i] = (unsigned char)(i * 7 + 3);
    lm_mr_t *ms, *md;
    CHECK(lm_mr_register(p.a, src, N, LM_ACCESS_LOCAL_WRITE, &ms) == LM_OK);
    CHECK(lm_mr_register(p.b, dst, N, LM_ACCESS_REMOTE_WRITE, &md) == LM_OK);
    lm_rdesc_t rd;
    CHECK(lm_mr_descriptor(md, &rd) == LM_OK);
    CHECK(rd.key != 0 && rd.length == N);
    CHECK(lm_ep_write(p.ea, ms, 100, 5000, &rd, 300, 0xabcdef01u, LM_WRITE_IMM, 77) == LM_OK);
    lm_completion_t c = wait_one(p.b);
    CHECK(c.opcode == LM_OP_RECV_IMM && c.status == LM_OK && c.imm == 0xabcdef01u && c.byte_len == 5000);
    CHECK(memcmp(dst + 300, src + 100, 5000) == 0);
    CHECK(dst[299] == 0 && dst[5300] == 0);
    c = wait_one(p.a);
    CHECK(c.opcode == LM_OP_WRITE && c.status == LM_OK && c.wr_id == 77);
    CHECK(lm_ep_outstanding(p.ea) == 0);
    lm_mr_deregister(ms);
    lm_mr_deregister(md);
    pair_close(&p);
    free(src);
    free(dst);
}

/* Device memory needs a transport whose NIC reaches it; tcp copies with the
 * CPU, so both device registrations are refused with a reason (the verbs side
 * is tested in the soft-RoCE guest: tests/rxe/test_verbs.py). */
static void test_device_memory_refused_without_verbs(void)
{
    pair_t p;
    pair_open(&p);
    static uint8_t buf[4096];
    lm_mr_t *mr = NULL;
    CHECK(lm_mr_register_device(p.a, buf, sizeof(buf), LM_ACCESS_REMOTE_WRITE, &mr) == LM_ERR_UNSUPPORTED);
    CHECK(strstr(lm_last_error(), "reaches device memory") && strstr(lm_last_error(), "tcp"));
    CHECK(lm_mr_register_dmabuf(p.a, 0, 0, sizeof(buf), (uint64_t)(uintptr_t)buf, LM_ACCESS_REMOTE_WRITE, &mr) ==
          LM_ERR_UNSUPPORTED);
    CHECK(lm_mr_register_dmabuf(p.a, -1, 0, sizeof(buf), (uint64_t)(uintptr_t)buf, 0, &mr) == LM_ERR_INVALID);
    CHECK(lm_mr_register_device(p.a, NULL, sizeof(buf), 0, &mr) == LM_ERR_INVALID);
    CHECK(lm_mr_register_device(p.a, buf, 0, 0, &mr) == LM_ERR_INVALID);
    CHECK(mr == NULL);
    pair_close(&p);
}

static void test_refusals_leave_target_untouched(void)
{
    pair_t p;
    pair_open(&p);
    unsigned char src[256], dst[256], ro[256];
    memset(src, 0x5a, sizeof(src));
    memset(dst, 0, sizeof(dst));
    memset(ro, 0, sizeof(ro));
    lm_mr_t *ms, *md, *mro;
    CHECK(lm_mr_register(p.a, src, sizeof(src), LM_ACCESS_LOCAL_WRITE, &ms) == LM_OK);
    CHECK(lm_mr_register(p.b, dst, sizeof(dst), LM_ACCESS_REMOTE_WRITE, &md) == LM_OK);
    CHECK(lm_mr_register(p.b, ro, sizeof(ro), LM_ACCESS_REMOTE_READ, &mro) == LM_OK);
    lm_rdesc_t rd, rro;
    lm_mr_descriptor(md, &rd);
    lm_mr_descriptor(mro, &rro);
    lm_rdesc_t bad = rd;
    bad.key ^= 1;
    struct { const lm_rdesc_t *desc; uint64_t off; int expect; } cases[] = {
        {&bad, 0, LM_ERR_NO_KEY}, {&rd, 250, LM_ERR_OUT_OF_BOUNDS}, {&rro, 0, LM_ERR_ACCESS}};
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        CHECK(lm_ep_write(p.ea, ms, 0, 16, cases[i].desc, cases[i].off, 9, LM_WRITE_IMM, i) == LM_OK);
        lm_completion_t c = wait_one(p.a);
        CHECK(c.opcode == LM_OP_WRITE && c.status == cases[i].expect && c.wr_id == i);
        c = wait_one(p.b);
        CHECK(c.opcode == LM_OP_REFUSED && c.status == cases[i].expect);
    }
    unsigned char zero[256] = {0};
    CHECK(memcmp(dst, zero, sizeof(dst)) == 0 && memcmp(ro, zero, sizeof(ro)) == 0);
    /* The endpoint still works after refusals. */
    CHECK(lm_ep_write(p.ea, ms, 0, 16, &rd, 0, 1, LM_WRITE_IMM, 99) == LM_OK);
    lm_completion_t c = wait_one(p.b);
    CHECK(c.opcode == LM_OP_RECV_IMM && c.status == LM_OK && dst[0] == 0x5a);
    pair_close(&p);
}

static void test_read(void)
{
    pair_t p;
    pair_open(&p);
    unsigned char remote[1024], local[1024];
    for (int i = 0; i < 1024; i++)
        remote[i] = (unsigned char)i;
    memset(local, 0, sizeof(local));
    lm_mr_t *mr, *ml;
    CHECK(lm_mr_register(p.b, remote, sizeof(remote), LM_ACCESS_REMOTE_READ, &mr) == LM_OK);
    CHECK(lm_mr_register(p.a, local, sizeof(local), LM_ACCESS_LOCAL_WRITE, &ml) == LM_OK);
    lm_rdesc_t rd;
    lm_mr_descriptor(mr, &rd);
    CHECK(lm_ep_read(p.ea, ml, 10, 500, &rd, 20, 5) == LM_OK);
    lm_completion_t c = wait_one(p.a);
    CHECK(c.opcode == LM_OP_READ && c.status == LM_OK && c.byte_len == 500 && c.wr_id == 5);
    CHECK(memcmp(local + 10, remote + 20, 500) == 0);
    /* Out of bounds: refused, local memory untouched. */
    memset(local, 0, sizeof(local));
    CHECK(lm_ep_read(p.ea, ml, 0, 100, &rd, 1000, 6) == LM_OK);
    c = wait_one(p.a);
    CHECK(c.opcode == LM_OP_READ && c.status == LM_ERR_OUT_OF_BOUNDS);
    CHECK(local[0] == 0);
    /* Local bounds are checked before anything is sent. */
    CHECK(lm_ep_read(p.ea, ml, 1000, 100, &rd, 0, 7) == LM_ERR_INVALID);
    pair_close(&p);
}

static void test_peer_loss_flushes_outstanding(void)
{
    pair_t p;
    pair_open(&p);
    static unsigned char big[8 << 20];
    lm_mr_t *ms, *md;
    CHECK(lm_mr_register(p.a, big, sizeof(big), LM_ACCESS_LOCAL_WRITE, &ms) == LM_OK);
    CHECK(lm_mr_register(p.b, big, sizeof(big), LM_ACCESS_REMOTE_WRITE, &md) == LM_OK);
    lm_rdesc_t rd;
    lm_mr_descriptor(md, &rd);
    for (int i = 0; i < 16; i++)
        CHECK(lm_ep_write(p.ea, ms, 0, sizeof(big), &rd, 0, 0, 0, (uint64_t)i) == LM_OK);
    lm_context_destroy(p.b); /* the peer vanishes mid-transfer */
    int errors = 0, oks = 0;
    for (int i = 0; i < 16; i++) {
        lm_completion_t c = wait_one(p.a);
        if (c.status == LM_OK)
            oks++;
        else if (c.status == LM_ERR_PEER_LOST)
            errors++;
    }
    CHECK(oks + errors == 16 && errors > 0);
    CHECK(lm_ep_error(p.ea) == LM_ERR_PEER_LOST);
    CHECK(lm_ep_write(p.ea, ms, 0, 1, &rd, 0, 0, 0, 0) == LM_ERR_PEER_LOST);
    lm_context_destroy(p.a);
}

static void test_deregister_with_writes_in_flight(void)
{
    pair_t p;
    pair_open(&p);
    enum { N = 4 << 20 };
    unsigned char *src = malloc(N), *dst = malloc(N);
    memset(src, 1, N);
    lm_mr_t *ms, *md;
    CHECK(lm_mr_register(p.a, src, N, LM_ACCESS_LOCAL_WRITE, &ms) == LM_OK);
    CHECK(lm_mr_register(p.b, dst, N, LM_ACCESS_REMOTE_WRITE, &md) == LM_OK);
    lm_rdesc_t rd;
    lm_mr_descriptor(md, &rd);
    for (int i = 0; i < 32; i++)
        CHECK(lm_ep_write(p.ea, ms, 0, N, &rd, 0, (uint32_t)i, LM_WRITE_IMM, (uint64_t)i) == LM_OK);
    CHECK(lm_mr_deregister(md) == LM_OK);
    memset(dst, 0xee, N); /* after deregistration the memory is ours again */
    free(dst);            /* ASan reports any later write by the transport */
    int done = 0;
    while (done < 32) {
        lm_completion_t c = wait_one(p.a);
        CHECK(c.opcode == LM_OP_WRITE);
        CHECK(c.status == LM_OK || c.status == LM_ERR_NO_KEY);
        done++;
    }
    CHECK(lm_ep_error(p.ea) == 0); /* refusals do not break the endpoint */
    pair_close(&p);
    free(src);
}

/* Gather writes queued behind a full socket, their source deregistered:
 * each completes (sent whole, or withdrawn with LM_ERR_LOCAL), the endpoint
 * survives unless a frame was cut mid-send, and no byte of the freed source
 * is read afterwards (ASan). */
static void test_gather_source_deregistered_while_queued(void)
{
    pair_t p;
    pair_open(&p);
    enum { N = 4 << 20, PIECES = 300, COUNT = 24 };
    unsigned char *src = malloc(N), *dst = calloc(1, N);
    for (int i = 0; i < N; i++)
        src[i] = (unsigned char)(i * 7);
    lm_mr_t *ms, *md;
    CHECK(lm_mr_register(p.a, src, N, 0, &ms) == LM_OK);
    CHECK(lm_mr_register(p.b, dst, N, LM_ACCESS_REMOTE_WRITE, &md) == LM_OK);
    lm_rdesc_t rd;
    lm_mr_descriptor(md, &rd);
    lm_seg_t segs[PIECES];
    for (int k = 0; k < PIECES; k++) /* every other 8 KiB block, 4 KiB of it */
        segs[k] = (lm_seg_t){.offset = (uint64_t)k * 8192 % (N - 4096), .length = 4096};
    lm_seg_t bad = {.offset = N - 10, .length = 20};
    CHECK(lm_ep_writev(p.ea, ms, &bad, 1, &rd, 0, 0, 0, 99) == LM_ERR_INVALID);
    for (int i = 0; i < COUNT; i++)
        CHECK(lm_ep_writev(p.ea, ms, segs, PIECES, &rd, 0, (uint32_t)i, LM_WRITE_IMM, (uint64_t)i) == LM_OK);
    CHECK(lm_mr_deregister(ms) == LM_OK);
    memset(src, 0xee, N);
    free(src);
    int done = 0, ok = 0;
    while (done < COUNT) { /* none is lost or left hanging */
        lm_completion_t c = wait_one(p.a);
        CHECK(c.opcode == LM_OP_WRITE);
        CHECK(c.status == LM_OK || c.status == LM_ERR_LOCAL || c.status == LM_ERR_CANCELED);
        ok += c.status == LM_OK;
        done++;
    }
    CHECK(ok < COUNT); /* the deregistration overtook some (withdrawn, or the endpoint failed mid-frame) */
    lm_mr_deregister(md);
    pair_close(&p);
    free(dst);
}

/* ---- shm: two endpoints over a socketpair doorbell ---- */

typedef struct shm_connect_arg {
    lm_ep_t *ep;
    uint8_t peer[sizeof(lm_shm_addr_t)];
    int rc;
} shm_connect_arg_t;

static void *shm_connect_thread(void *p)
{
    shm_connect_arg_t *arg = p;
    arg->rc = lm_ep_connect(arg->ep, arg->peer, sizeof(arg->peer), -1);
    return NULL;
}

static void shm_pair_open(pair_t *p)
{
    lm_context_params_t params = {.field_mask = LM_CTX_PARAM_TRANSPORTS, .transports = LM_TRANSPORT_SHM};
    int sv[2];
    CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);
    CHECK(lm_context_create(&params, &p->a) == LM_OK);
    CHECK(lm_context_create(&params, &p->b) == LM_OK);
    CHECK(lm_ep_create_shm(p->a, sv[0], 1, &p->ea) == LM_OK);
    CHECK(lm_ep_create_shm(p->b, sv[1], 2, &p->eb) == LM_OK);
    shm_connect_arg_t for_a = {.ep = p->ea}, for_b = {.ep = p->eb};
    size_t len = sizeof(for_a.peer);
    CHECK(lm_ep_address(p->eb, for_a.peer, &len) == LM_OK && len == sizeof(lm_shm_addr_t));
    len = sizeof(for_b.peer);
    CHECK(lm_ep_address(p->ea, for_b.peer, &len) == LM_OK);
    pthread_t t; /* both sides wait for each other's "mapped" byte */
    pthread_create(&t, NULL, shm_connect_thread, &for_a);
    shm_connect_thread(&for_b);
    pthread_join(t, NULL);
    CHECK(for_a.rc == LM_OK && for_b.rc == LM_OK);
}

/* Posting before lm_ep_connect is refused as a usage error; the endpoint
 * stays usable. */
static void test_shm_post_before_connect_is_refused(void)
{
    lm_context_params_t params = {.field_mask = LM_CTX_PARAM_TRANSPORTS, .transports = LM_TRANSPORT_SHM};
    lm_context_t *ctx;
    lm_ep_t *ep;
    int sv[2];
    CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);
    CHECK(lm_context_create(&params, &ctx) == LM_OK);
    CHECK(lm_ep_create_shm(ctx, sv[0], 1, &ep) == LM_OK);
    uint8_t buf[64] = {0};
    lm_mr_t *mr;
    CHECK(lm_mr_register(ctx, buf, sizeof(buf), LM_ACCESS_LOCAL_WRITE, &mr) == LM_OK);
    lm_rdesc_t rd;
    lm_mr_descriptor(mr, &rd);
    CHECK(lm_ep_write(ep, mr, 0, 8, &rd, 0, 0, 0, 1) == LM_ERR_INVALID);
    CHECK(lm_ep_read(ep, mr, 0, 8, &rd, 0, 2) == LM_ERR_INVALID);
    CHECK(lm_ep_error(ep) == 0 && lm_ep_outstanding(ep) == 0);
    lm_mr_deregister(mr);
    lm_context_destroy(ctx);
    close(sv[1]);
}

static lm_shm_stream_t *shm_stream(lm_ep_t *ep)
{
    return ((lm_tcp_ep_t *)ep)->io_priv;
}

/* Writes larger than a ring (wrapping, in pieces) land byte for byte; then a
 * hostile producer's impossible tail fails the consumer, and a hostile
 * consumer's impossible head fails the producer: neither reads or writes
 * outside the ring, and no region is touched. */
static void test_shm_rings_and_hostile_indexes(void)
{
    pair_t p;
    shm_pair_open(&p);
    enum { N = 3 * LM_SHM_RING_BYTES + 12345 };
    unsigned char *src = malloc(N), *dst = calloc(1, N);
    for (int i = 0; i < N; i++)
        src[i] = (unsigned char)(i * 13 + 1);
    lm_mr_t *ms, *md;
    CHECK(lm_mr_register(p.a, src, N, 0, &ms) == LM_OK);
    CHECK(lm_mr_register(p.b, dst, N, LM_ACCESS_REMOTE_WRITE, &md) == LM_OK);
    lm_rdesc_t rd;
    lm_mr_descriptor(md, &rd);
    CHECK(lm_ep_write(p.ea, ms, 0, N, &rd, 0, 9, LM_WRITE_IMM, 1) == LM_OK);
    lm_completion_t c = wait_one(p.a);
    CHECK(c.opcode == LM_OP_WRITE && c.status == LM_OK);
    c = wait_one(p.b);
    CHECK(c.opcode == LM_OP_RECV_IMM && c.imm == 9 && memcmp(src, dst, N) == 0);

    /* A producer's tail beyond what the ring holds: the consumer fails. */
    memset(dst, 0, N);
    lm_shm_stream_t *sb = shm_stream(p.eb);
    atomic_store(&sb->rx->tail, sb->rx_head + 2 * sb->size);
    static const uint8_t bell = 1;
    CHECK(send(((lm_tcp_ep_t *)p.ea)->fd, &bell, 1, MSG_NOSIGNAL) == 1);
    for (int i = 0; i < 500 && lm_ep_error(p.eb) == 0; i++)
        usleep(10000);
    CHECK(lm_ep_error(p.eb) != 0);

    lm_mr_deregister(ms);
    lm_mr_deregister(md);
    pair_close(&p);

    /* A consumer's head ahead of what was produced (a fresh pair): the
     * producer fails on its own send path, before the peer hangs up. */
    shm_pair_open(&p);
    CHECK(lm_mr_register(p.a, src, N, 0, &ms) == LM_OK);
    CHECK(lm_mr_register(p.b, dst, N, LM_ACCESS_REMOTE_WRITE, &md) == LM_OK);
    lm_mr_descriptor(md, &rd);
    lm_shm_stream_t *sa = shm_stream(p.ea);
    atomic_store(&sa->tx->head, sa->tx_tail + 1);
    CHECK(lm_ep_write(p.ea, ms, 0, 64, &rd, 0, 0, 0, 2) == LM_OK);
    c = wait_one(p.a);
    CHECK(c.opcode == LM_OP_WRITE && c.status != LM_OK);
    CHECK(lm_ep_error(p.ea) != 0);
    for (int i = 0; i < N; i++)
        if (dst[i]) {
            CHECK(!"a hostile ring index let bytes into the region");
            break;
        }
    lm_mr_deregister(ms);
    lm_mr_deregister(md);
    pair_close(&p);
    free(src);
    free(dst);
}

/* The peer must not be able to resize a ring under our mapping (SIGBUS):
 * rings are sealed at their size. */
static void test_shm_rings_are_sealed(void)
{
    pair_t p;
    shm_pair_open(&p);
    lm_shm_stream_t *sa = shm_stream(p.ea);
    char path[64];
    snprintf(path, sizeof(path), "/proc/self/fd/%d", sa->memfd);
    int fd = open(path, O_RDWR); /* as the peer opens it */
    CHECK(fd >= 0);
    CHECK(ftruncate(fd, 4096) != 0 && errno == EPERM);
    CHECK(ftruncate(fd, (off_t)(LM_SHM_HEADER_BYTES + 2 * (uint64_t)LM_SHM_RING_BYTES)) != 0);
    close(fd);
    pair_close(&p);
}

/* The receiver stops reading (its application does not poll) while its own
 * big write waits for room and the peer's writes to it are refused: 1100
 * NACKs pile up, receiving pauses on that backlog. Once the application
 * polls again everything drains: the big write completes, every refused
 * write completes refused (never as accepted: acknowledgements stay below an
 * unsent NACK), and neither endpoint fails. On shm the "room" doorbell must
 * reach a paused receive side. */
static void test_reply_backlog_drains(bool shm)
{
    pair_t p;
    if (shm)
        shm_pair_open(&p);
    else
        pair_open(&p);
    enum { BIG = 8 << 20, NACKS = 1100 };
    uint8_t *abuf = calloc(1, BIG), *bbuf = calloc(1, BIG);
    lm_mr_t *ma, *mb;
    lm_rdesc_t ra, rb;
    CHECK(lm_mr_register(p.a, abuf, BIG, LM_ACCESS_REMOTE_WRITE, &ma) == LM_OK);
    CHECK(lm_mr_register(p.b, bbuf, BIG, LM_ACCESS_REMOTE_WRITE, &mb) == LM_OK);
    lm_mr_descriptor(mb, &rb);
    lm_mr_descriptor(ma, &ra);
    lm_rdesc_t bad = ra;
    bad.key ^= 1;
    atomic_store(&p.b->cq.congested, true); /* b's application stops polling: b parks its receive side */
    CHECK(lm_ep_write(p.ea, ma, 0, BIG, &rb, 0, 0, 0, 42) == LM_OK);
    usleep(200000);
    for (int i = 0; i < NACKS; i++)
        CHECK(lm_ep_write(p.eb, mb, 0, 16, &bad, 0, 0, 0, 1000 + (uint64_t)i) == LM_OK);
    usleep(300000);
    lm_completion_t cs[64];
    int big_done = 0, refused_ok = 0, refused_bad = 0;
    for (int round = 0; round < 1000 && (!big_done || refused_ok + refused_bad < NACKS); round++) {
        int n = lm_cq_wait(p.a, cs, 64, 10);
        for (int k = 0; k < n; k++)
            big_done |= cs[k].opcode == LM_OP_WRITE && cs[k].wr_id == 42 && cs[k].status == LM_OK;
        n = lm_cq_poll(p.b, cs, 64);
        for (int k = 0; k < n; k++)
            if (cs[k].opcode == LM_OP_WRITE && cs[k].wr_id >= 1000)
                *(cs[k].status == LM_ERR_NO_KEY ? &refused_ok : &refused_bad) += 1;
    }
    CHECK(big_done);
    CHECK(refused_ok == NACKS && refused_bad == 0);
    CHECK(lm_ep_error(p.ea) == 0 && lm_ep_error(p.eb) == 0);
    lm_mr_deregister(ma);
    lm_mr_deregister(mb);
    pair_close(&p);
    free(abuf);
    free(bbuf);
}

/* Two threads wait on one context; the frame that wakes the first spends
 * the doorbell the second armed. The consumer that empties the ring while
 * the second still sleeps must arm it again, or the next frame waits for
 * the second's wait slice (100 ms) instead of waking it. */
static lm_context_t *two_waiters_ctx;
static atomic_int two_waiters_got;

static void *two_waiters_wait(void *arg)
{
    (void)arg;
    lm_completion_t c;
    if (lm_cq_wait(two_waiters_ctx, &c, 1, 10000) == 1)
        atomic_fetch_add(&two_waiters_got, 1);
    return NULL;
}

static void test_shm_second_sleeper_keeps_its_doorbell(void)
{
    pair_t p;
    shm_pair_open(&p);
    static char src[64], dst[64];
    lm_mr_t *ms, *md;
    lm_rdesc_t rd;
    CHECK(lm_mr_register(p.a, src, 64, 0, &ms) == LM_OK);
    CHECK(lm_mr_register(p.b, dst, 64, LM_ACCESS_REMOTE_WRITE, &md) == LM_OK);
    lm_mr_descriptor(md, &rd);
    two_waiters_ctx = p.b;
    atomic_store(&two_waiters_got, 0);
    pthread_t w1, w2;
    pthread_create(&w1, NULL, two_waiters_wait, NULL);
    pthread_create(&w2, NULL, two_waiters_wait, NULL);
    for (int i = 0; i < 500 && atomic_load(&p.b->progress.sleepers) < 2; i++)
        usleep(1000);
    CHECK(lm_ep_write(p.ea, ms, 0, 8, &rd, 0, 1, LM_WRITE_IMM, 1) == LM_OK);
    for (int i = 0; i < 5000 && atomic_load(&two_waiters_got) < 1; i++)
        usleep(1000);
    lm_shm_stream_t *sb = shm_stream(p.eb);
    if (atomic_load(&p.b->progress.sleepers) > 0) /* the second waiter still sleeps */
        CHECK(atomic_load(&sb->rx->consumer_sleeping) == 1);
    CHECK(lm_ep_write(p.ea, ms, 0, 8, &rd, 0, 2, LM_WRITE_IMM, 2) == LM_OK);
    pthread_join(w1, NULL);
    pthread_join(w2, NULL);
    CHECK(atomic_load(&two_waiters_got) == 2);
    lm_mr_deregister(ms);
    lm_mr_deregister(md);
    pair_close(&p);
}

static void test_garbage_closes_only_that_endpoint(void)
{
    lm_context_params_t params = {.field_mask = LM_CTX_PARAM_TRANSPORTS, .transports = LM_TRANSPORT_TCP};
    lm_context_t *ctx;
    CHECK(lm_context_create(&params, &ctx) == LM_OK);
    int sv[2];
    CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);
    lm_ep_t *ep;
    CHECK(lm_ep_create_tcp(ctx, sv[1], 3, &ep) == LM_OK);
    char junk[4096];
    for (size_t i = 0; i < sizeof(junk); i++)
        junk[i] = (char)(rand() & 0xff);
    CHECK(write(sv[0], junk, sizeof(junk)) == (ssize_t)sizeof(junk));
    for (int i = 0; i < 500 && lm_ep_error(ep) == 0; i++)
        usleep(1000);
    CHECK(lm_ep_error(ep) == LM_ERR_PROTOCOL);
    close(sv[0]);
    /* The context still serves a fresh pair. */
    pair_t p;
    pair_open(&p);
    pair_close(&p);
    lm_context_destroy(ctx);
}


/* ---- a raw peer: the test writes and reads wire frames itself ---------- */

typedef struct raw_peer {
    lm_context_t *ctx;
    lm_ep_t *ep;
    int fd; /* the test's end of the socketpair */
} raw_peer_t;

static void raw_open(raw_peer_t *r)
{
    lm_context_params_t params = {.field_mask = LM_CTX_PARAM_TRANSPORTS, .transports = LM_TRANSPORT_TCP};
    int sv[2];
    CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);
    CHECK(lm_context_create(&params, &r->ctx) == LM_OK);
    CHECK(lm_ep_create_tcp(r->ctx, sv[1], 9, &r->ep) == LM_OK);
    r->fd = sv[0];
    struct timeval hang_guard = {.tv_sec = 30};
    setsockopt(r->fd, SOL_SOCKET, SO_RCVTIMEO, &hang_guard, sizeof(hang_guard));
    setsockopt(r->fd, SOL_SOCKET, SO_SNDTIMEO, &hang_guard, sizeof(hang_guard));
}

static void raw_close(raw_peer_t *r)
{
    close(r->fd);
    lm_context_destroy(r->ctx);
}

static lm_tcp_hdr_t frame(uint8_t type, uint64_t seq, uint64_t key, uint64_t off, uint64_t len)
{
    lm_tcp_hdr_t h;
    memset(&h, 0, sizeof(h));
    h.magic = LM_TCP_MAGIC;
    h.type = type;
    h.seq = seq;
    h.key = key;
    h.offset = off;
    h.length = len;
    return h;
}

static int send_all(int fd, const void *buf, size_t len)
{
    for (const char *p = buf; len > 0;) {
        ssize_t n = send(fd, p, len, MSG_NOSIGNAL);
        if (n <= 0)
            return -1;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

static int recv_all(int fd, void *buf, size_t len)
{
    for (char *p = buf; len > 0;) {
        ssize_t n = recv(fd, p, len, 0);
        if (n <= 0)
            return -1;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Wait (10 s hang guard) until the endpoint failed; returns its status. */
static int wait_ep_error(lm_ep_t *ep)
{
    for (int i = 0; i < 10000 && lm_ep_error(ep) == 0; i++)
        usleep(1000);
    return lm_ep_error(ep);
}

/* Send copies of one frame without blocking until the socket stays full for
 * 2 s (the target stopped reading) or max frames went; returns frames sent.
 * seq_step: how much the sequence number advances per frame. */
static uint64_t flood_until_blocked(int fd, lm_tcp_hdr_t h, uint64_t seq_step, uint64_t max)
{
    enum { BATCH = 256 };
    static lm_tcp_hdr_t batch[BATCH];
    uint64_t sent_frames = 0;
    size_t partial = 0; /* bytes of the batch's first frame already sent */
    while (sent_frames < max) {
        for (int i = 0; i < BATCH; i++) {
            batch[i] = h;
            batch[i].seq = h.seq + (sent_frames + (uint64_t)i) * seq_step;
        }
        uint64_t want = max - sent_frames < BATCH ? max - sent_frames : BATCH;
        ssize_t n = send(fd, (char *)batch + partial, want * sizeof(h) - partial, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            struct pollfd pfd = {.fd = fd, .events = POLLOUT};
            if (poll(&pfd, 1, 2000) == 0)
                break; /* blocked: the target no longer reads */
            continue;
        }
        if (n <= 0)
            break;
        size_t done = partial + (size_t)n;
        sent_frames += done / sizeof(h);
        partial = done % sizeof(h);
        if (partial) { /* finish the split frame so the stream stays parseable */
            lm_tcp_hdr_t last = h;
            last.seq = h.seq + sent_frames * seq_step;
            CHECK(send_all(fd, (char *)&last + partial, sizeof(h) - partial) == 0);
            sent_frames++;
            partial = 0;
        }
    }
    return sent_frames;
}

/* Defect 2: frames already pulled into the receive buffer when the per-wake
 * budget ran out waited for the socket to become readable again. 70 empty
 * writes with immediate in one send: all 70 must complete, no 71st needed. */
static void test_burst_beyond_rx_budget_completes(void)
{
    raw_peer_t r;
    raw_open(&r);
    unsigned char dst[64];
    lm_mr_t *md;
    CHECK(lm_mr_register(r.ctx, dst, sizeof(dst), LM_ACCESS_REMOTE_WRITE, &md) == LM_OK);
    lm_rdesc_t rd;
    lm_mr_descriptor(md, &rd);
    enum { N = 70 };
    lm_tcp_hdr_t frames[N];
    for (int i = 0; i < N; i++) {
        frames[i] = frame(LM_TCP_WRITE, (uint64_t)i, rd.key, 0, 0);
        frames[i].flags = LM_TCP_FLAG_IMM;
        frames[i].imm = (uint32_t)i;
    }
    CHECK(send_all(r.fd, frames, sizeof(frames)) == 0);
    int got = 0;
    lm_completion_t c[N];
    for (int round = 0; round < 100 && got < N; round++) {
        int n = lm_cq_wait(r.ctx, c, N, 100);
        for (int i = 0; i < n; i++)
            CHECK(c[i].opcode == LM_OP_RECV_IMM && c[i].imm == (uint32_t)(got + i));
        got += n > 0 ? n : 0;
    }
    if (got != N)
        fprintf(stderr, "burst: %d of %d writes completed\n", got, N);
    CHECK(got == N);
    raw_close(&r);
}

/* The same with the library on both ends and a slow target: more writes
 * than the budget, every one completes. */
static void test_burst_library_both_ends(void)
{
    pair_t p;
    pair_open(&p);
    unsigned char src[64] = {1}, dst[64];
    lm_mr_t *ms, *md;
    CHECK(lm_mr_register(p.a, src, sizeof(src), LM_ACCESS_LOCAL_WRITE, &ms) == LM_OK);
    CHECK(lm_mr_register(p.b, dst, sizeof(dst), LM_ACCESS_REMOTE_WRITE, &md) == LM_OK);
    lm_rdesc_t rd;
    lm_mr_descriptor(md, &rd);
    enum { N = 130 };
    for (int i = 0; i < N; i++)
        CHECK(lm_ep_write(p.ea, ms, 0, 8, &rd, 0, (uint32_t)i, LM_WRITE_IMM, (uint64_t)i) == LM_OK);
    int imms = 0, acks = 0;
    lm_completion_t c[N];
    for (int round = 0; round < 100 && (imms < N || acks < N); round++) {
        int n = lm_cq_wait(p.b, c, N, 50);
        imms += n > 0 ? n : 0;
        n = lm_cq_wait(p.a, c, N, 50);
        acks += n > 0 ? n : 0;
    }
    CHECK(imms == N && acks == N);
    pair_close(&p);
}

/* Defect 7: a READ answers with memory as of its execution; a WRITE that
 * arrives after it (while the answer still waits unsent for a peer that does
 * not read yet) must not show through. */
static void test_read_answer_not_changed_by_later_write(void)
{
    raw_peer_t r;
    raw_open(&r);
    enum { N = 1 << 20 };
    unsigned char *region = malloc(N), *payload = malloc(N), *answer = malloc(N);
    memset(region, 0x11, N);
    memset(payload, 0x22, N);
    lm_mr_t *mr;
    CHECK(lm_mr_register(r.ctx, region, N, LM_ACCESS_REMOTE_READ | LM_ACCESS_REMOTE_WRITE, &mr) == LM_OK);
    lm_rdesc_t rd;
    lm_mr_descriptor(mr, &rd);
    lm_tcp_hdr_t req = frame(LM_TCP_READ_REQ, 0, rd.key, 0, N);
    lm_tcp_hdr_t wr = frame(LM_TCP_WRITE, 1, rd.key, 0, N);
    CHECK(send_all(r.fd, &req, sizeof(req)) == 0);
    CHECK(send_all(r.fd, &wr, sizeof(wr)) == 0);
    CHECK(send_all(r.fd, payload, N) == 0); /* the target takes it all: it lands */
    lm_tcp_hdr_t resp;
    CHECK(recv_all(r.fd, &resp, sizeof(resp)) == 0);
    CHECK(resp.type == LM_TCP_READ_RESP && resp.status == LM_OK && resp.length == N);
    CHECK(recv_all(r.fd, answer, N) == 0);
    size_t changed = 0;
    for (size_t i = 0; i < N; i++)
        changed += answer[i] != 0x11;
    if (changed)
        fprintf(stderr, "read answer: %zu of %d bytes came from the later write\n", changed, N);
    CHECK(changed == 0);
    CHECK(region[0] == 0x22 && region[N - 1] == 0x22); /* the write landed */
    CHECK(lm_ep_error(r.ep) == 0);
    raw_close(&r);
    free(region);
    free(payload);
    free(answer);
}

/* Defect 8: an ACK for a write whose bytes have not left us is a protocol
 * error; the write must not complete OK (its buffer would be reused). */
static void test_ack_for_unsent_write_fails_endpoint(void)
{
    raw_peer_t r;
    raw_open(&r);
    enum { N = 32 << 20 };
    unsigned char *src = calloc(1, N);
    lm_mr_t *ms;
    CHECK(lm_mr_register(r.ctx, src, N, LM_ACCESS_LOCAL_WRITE, &ms) == LM_OK);
    lm_rdesc_t fake = {.key = 1234, .length = N};
    CHECK(lm_ep_write(r.ep, ms, 0, N, &fake, 0, 0, 0, 42) == LM_OK);
    lm_tcp_hdr_t seen;
    CHECK(recv_all(r.fd, &seen, sizeof(seen)) == 0); /* only the header is read */
    CHECK(seen.type == LM_TCP_WRITE && seen.seq == 0);
    lm_tcp_hdr_t ack = frame(LM_TCP_ACK, 0, 0, 0, 0);
    ack.ack = 1; /* "write 0 accepted" while most of it is still here */
    CHECK(send_all(r.fd, &ack, sizeof(ack)) == 0);
    lm_completion_t c = wait_one(r.ctx);
    CHECK(c.opcode == LM_OP_WRITE && c.wr_id == 42);
    if (c.status == LM_OK)
        fprintf(stderr, "ack check: a write completed OK before its bytes left\n");
    CHECK(c.status == LM_ERR_PROTOCOL);
    CHECK(lm_ep_error(r.ep) == LM_ERR_PROTOCOL);
    raw_close(&r);
    free(src);
}

/* Same for a READ_RESP answering a read that was never sent. */
static void test_answer_to_unsent_read_fails_endpoint(void)
{
    raw_peer_t r;
    raw_open(&r);
    enum { N = 32 << 20 };
    unsigned char *src = calloc(1, N), local[16];
    lm_mr_t *ms, *ml;
    CHECK(lm_mr_register(r.ctx, src, N, LM_ACCESS_LOCAL_WRITE, &ms) == LM_OK);
    CHECK(lm_mr_register(r.ctx, local, sizeof(local), LM_ACCESS_LOCAL_WRITE, &ml) == LM_OK);
    lm_rdesc_t fake = {.key = 1234, .length = N};
    CHECK(lm_ep_write(r.ep, ms, 0, N, &fake, 0, 0, 0, 1) == LM_OK); /* seq 0, stuck */
    CHECK(lm_ep_read(r.ep, ml, 0, 16, &fake, 0, 2) == LM_OK);       /* seq 1, queued */
    lm_tcp_hdr_t resp = frame(LM_TCP_READ_RESP, 1, 0, 0, 0);
    resp.status = LM_ERR_NO_KEY;
    CHECK(send_all(r.fd, &resp, sizeof(resp)) == 0);
    CHECK(wait_ep_error(r.ep) == LM_ERR_PROTOCOL);
    raw_close(&r);
    free(src);
}

/* Defect 9: a peer that floods READ_REQs and never reads the answers breaks
 * the reads-in-flight limit: the endpoint fails (PROTOCOL), the target's
 * queue stays bounded, and the context goes on serving. */
static void test_read_flood_never_reading_fails_endpoint(void)
{
    raw_peer_t r;
    raw_open(&r);
    unsigned char region[64];
    lm_mr_t *mr;
    CHECK(lm_mr_register(r.ctx, region, sizeof(region), LM_ACCESS_REMOTE_READ, &mr) == LM_OK);
    lm_rdesc_t rd;
    lm_mr_descriptor(mr, &rd);
    uint64_t sent = flood_until_blocked(r.fd, frame(LM_TCP_READ_REQ, 0, rd.key, 0, 64), 1, 1000000);
    int err = wait_ep_error(r.ep);
    if (err == 0)
        fprintf(stderr, "read flood: %llu requests taken, endpoint still open\n", (unsigned long long)sent);
    CHECK(err == LM_ERR_PROTOCOL);
    pair_t p; /* the context still serves others */
    pair_open(&p);
    pair_close(&p);
    raw_close(&r);
}

/* Defect 9: refused writes from a peer that never reads its NACKs: the
 * target stops reading (the flood blocks) instead of queueing without bound,
 * and once the peer reads, every NACK arrives (nothing lost). */
static void test_refused_write_flood_blocks_then_recovers(void)
{
    raw_peer_t r;
    raw_open(&r);
    enum { MAX = 400000 };
    uint64_t sent = flood_until_blocked(r.fd, frame(LM_TCP_WRITE, 0, 0xbad, 0, 0), 1, MAX);
    if (sent >= MAX)
        fprintf(stderr, "refused-write flood: all %d frames taken, nothing pushed back\n", MAX);
    CHECK(sent < MAX);
    CHECK(lm_ep_error(r.ep) == 0);
    uint64_t nacks = 0;
    lm_tcp_hdr_t h;
    lm_completion_t c[256];
    while (nacks < sent && recv_all(r.fd, &h, sizeof(h)) == 0) {
        CHECK(h.type == LM_TCP_NACK || h.type == LM_TCP_ACK);
        if (h.type == LM_TCP_NACK) {
            CHECK(h.seq == nacks && h.status == LM_ERR_NO_KEY);
            nacks++;
        }
        if ((nacks & 1023) == 0)
            while (lm_cq_poll(r.ctx, c, 256) > 0) {
            }
    }
    CHECK(nacks == sent);
    raw_close(&r);
}

/* Defect 9: completions the application does not poll: past the CQ bound the
 * target stops reading; polling resumes it and every completion arrives. */
static void test_unpolled_completions_pause_receiving(void)
{
    raw_peer_t r;
    raw_open(&r);
    unsigned char dst[8];
    lm_mr_t *md;
    CHECK(lm_mr_register(r.ctx, dst, sizeof(dst), LM_ACCESS_REMOTE_WRITE, &md) == LM_OK);
    lm_rdesc_t rd;
    lm_mr_descriptor(md, &rd);
    lm_tcp_hdr_t w = frame(LM_TCP_WRITE, 0, rd.key, 0, 0);
    w.flags = LM_TCP_FLAG_IMM;
    enum { MAX = 400000 };
    uint64_t sent = flood_until_blocked(r.fd, w, 1, MAX);
    CHECK(sent < MAX);
    CHECK(sent >= 65536);
    uint64_t got = 0;
    lm_completion_t c[256];
    for (int idle = 0; got < sent && idle < 100;) {
        int n = lm_cq_wait(r.ctx, c, 256, 100);
        idle = n > 0 ? 0 : idle + 1;
        got += n > 0 ? (uint64_t)n : 0;
    }
    CHECK(got == sent);
    CHECK(lm_ep_error(r.ep) == 0);
    raw_close(&r);
}

/* Out of memory (the ring held at its first size): arrivals pause receiving
 * instead of being lost, and a post that has no room for its completion is
 * refused before anything is sent; polling recovers both, and every
 * completion of what was accepted arrives. */
static void test_out_of_memory_loses_no_completion(void)
{
    raw_peer_t r;
    raw_open(&r);
    r.ctx->cq.max_capacity = r.ctx->cq.capacity;
    unsigned char dst[8];
    lm_mr_t *md;
    CHECK(lm_mr_register(r.ctx, dst, sizeof(dst), LM_ACCESS_REMOTE_WRITE, &md) == LM_OK);
    lm_rdesc_t rd;
    lm_mr_descriptor(md, &rd);
    lm_tcp_hdr_t w = frame(LM_TCP_WRITE, 0, rd.key, 0, 0);
    w.flags = LM_TCP_FLAG_IMM;
    enum { MAX = 400000 };
    uint64_t sent = flood_until_blocked(r.fd, w, 1, MAX);
    CHECK(sent < MAX);
    pthread_mutex_lock(&r.ctx->cq.lock);
    CHECK(r.ctx->cq.starved && r.ctx->cq.count < r.ctx->cq.capacity); /* paused, not full */
    pthread_mutex_unlock(&r.ctx->cq.lock);
    uint64_t got = 0;
    lm_completion_t c[256];
    for (int idle = 0; got < sent && idle < 50;) {
        int n = lm_cq_wait(r.ctx, c, 256, 100);
        CHECK(n >= 0);
        idle = n > 0 ? 0 : idle + 1;
        got += n > 0 ? (uint64_t)n : 0;
    }
    CHECK(got == sent);
    CHECK(r.ctx->cq.lost == 0 && lm_ep_error(r.ep) == 0);
    raw_close(&r);

    pair_t p;
    pair_open(&p);
    p.a->cq.max_capacity = p.a->cq.capacity;
    unsigned char src[8] = {0}, target[8];
    lm_mr_t *ms, *mt;
    CHECK(lm_mr_register(p.a, src, sizeof(src), 0, &ms) == LM_OK);
    CHECK(lm_mr_register(p.b, target, sizeof(target), LM_ACCESS_REMOTE_WRITE, &mt) == LM_OK);
    lm_mr_descriptor(mt, &rd);
    uint64_t posted = 0;
    int rc = LM_OK;
    while (posted < 2 * p.a->cq.capacity && (rc = lm_ep_write(p.ea, ms, 0, 8, &rd, 0, 0, 0, posted)) == LM_OK)
        posted++;
    CHECK(rc == LM_ERR_NO_MEMORY);
    CHECK(posted + 2 * LM_CQ_HEADROOM <= p.a->cq.capacity); /* the arrivals' headroom stays free */
    for (uint64_t i = 0; i < posted; i++) {
        lm_completion_t one = wait_one(p.a);
        CHECK(one.wr_id == i && one.status == LM_OK);
    }
    CHECK(lm_ep_write(p.ea, ms, 0, 8, &rd, 0, 0, 0, posted) == LM_OK); /* room again */
    lm_completion_t last = wait_one(p.a);
    CHECK(last.wr_id == posted && last.status == LM_OK);
    CHECK(p.a->cq.lost == 0 && atomic_load(&p.a->cq.reserved) == 0);
    pair_close(&p);
}

/* Reads larger than a piece and more reads than the in-flight limit: all
 * complete, in order, with the right bytes (library on both ends). */
static void test_reads_in_pieces_and_beyond_the_read_limit(void)
{
    pair_t p;
    pair_open(&p);
    enum { N = (11 << 19) + 777, SMALL = 40 };
    unsigned char *remote = malloc(N), *local = calloc(1, N), small[SMALL][64];
    for (size_t i = 0; i < N; i++)
        remote[i] = (unsigned char)(i * 13 + (i >> 20));
    lm_mr_t *mr, *ml, *msm;
    CHECK(lm_mr_register(p.b, remote, N, LM_ACCESS_REMOTE_READ, &mr) == LM_OK);
    CHECK(lm_mr_register(p.a, local, N, LM_ACCESS_LOCAL_WRITE, &ml) == LM_OK);
    CHECK(lm_mr_register(p.a, small, sizeof(small), LM_ACCESS_LOCAL_WRITE, &msm) == LM_OK);
    lm_rdesc_t rd;
    lm_mr_descriptor(mr, &rd);
    CHECK(lm_ep_read(p.ea, ml, 0, N, &rd, 0, 1000) == LM_OK);
    for (int i = 0; i < SMALL; i++)
        CHECK(lm_ep_read(p.ea, msm, (uint64_t)i * 64, 64, &rd, (uint64_t)i * 1000, (uint64_t)i) == LM_OK);
    CHECK(lm_ep_read(p.ea, ml, 0, 64, &rd, N - 32, 2000) == LM_OK); /* out of bounds */
    lm_completion_t c = wait_one(p.a);
    CHECK(c.opcode == LM_OP_READ && c.wr_id == 1000 && c.status == LM_OK && c.byte_len == N);
    CHECK(memcmp(local, remote, N) == 0);
    for (int i = 0; i < SMALL; i++) {
        c = wait_one(p.a);
        CHECK(c.wr_id == (uint64_t)i && c.status == LM_OK);
        CHECK(memcmp(small[i], remote + i * 1000, 64) == 0);
    }
    c = wait_one(p.a);
    CHECK(c.wr_id == 2000 && c.status == LM_ERR_OUT_OF_BOUNDS);
    c = wait_one(p.b);
    CHECK(c.opcode == LM_OP_REFUSED && c.status == LM_ERR_OUT_OF_BOUNDS);
    CHECK(lm_ep_outstanding(p.ea) == 0);
    pair_close(&p);
    free(remote);
    free(local);
}

static void test_bad_arguments(void)
{
    CHECK(lm_context_create(NULL, NULL) == LM_ERR_INVALID);
    lm_context_t *ctx;
    CHECK(lm_context_create(NULL, &ctx) == LM_OK);
    lm_mr_t *mr;
    char buf[8];
    CHECK(lm_mr_register(ctx, buf, sizeof(buf), 0x80, &mr) == LM_ERR_INVALID);
    CHECK(lm_ep_create_tcp(ctx, -1, 1, NULL) == LM_ERR_INVALID);
    CHECK(strcmp(lm_status_str(LM_ERR_NO_KEY), "no registered region with that key") == 0);
    CHECK(lm_context_transports(ctx) & LM_TRANSPORT_TCP);
    lm_context_destroy(ctx);
}

/* Reads held back by the ORD limit must not hold back the answers we owe
 * the peer: with both peers reading from each other past the limit, each
 * side's answers queued behind its held read would wait for the other's. */
static void test_answers_overtake_reads_held_by_ord(void)
{
    raw_peer_t r;
    raw_open(&r);
    unsigned char local[16], served[64];
    memset(served, 0x5a, sizeof(served));
    lm_mr_t *ml, *ms;
    CHECK(lm_mr_register(r.ctx, local, sizeof(local), LM_ACCESS_LOCAL_WRITE, &ml) == LM_OK);
    CHECK(lm_mr_register(r.ctx, served, sizeof(served), LM_ACCESS_REMOTE_READ, &ms) == LM_OK);
    lm_rdesc_t theirs = {.key = 77, .length = 1 << 20}, ours;
    lm_mr_descriptor(ms, &ours);
    for (int i = 0; i <= 16; i++) /* 16 go out, the 17th waits for an answer */
        CHECK(lm_ep_read(r.ep, ml, 0, sizeof(local), &theirs, 0, (uint64_t)i) == LM_OK);
    lm_tcp_hdr_t h;
    for (int i = 0; i < 16; i++)
        CHECK(recv_all(r.fd, &h, sizeof(h)) == 0 && h.type == LM_TCP_READ_REQ);
    lm_tcp_hdr_t req = frame(LM_TCP_READ_REQ, 0, ours.key, 0, sizeof(served));
    CHECK(send_all(r.fd, &req, sizeof(req)) == 0);
    bool answered = false;
    for (int i = 0; i < 64 && !answered; i++) {
        if (recv_all(r.fd, &h, sizeof(h)) != 0)
            break; /* 30 s hang guard: the answer never came */
        answered = h.type == LM_TCP_READ_RESP;
    }
    CHECK(answered && h.seq == 0 && h.status == LM_OK && h.length == sizeof(served));
    unsigned char got[sizeof(served)];
    CHECK(answered && recv_all(r.fd, got, sizeof(got)) == 0 && memcmp(got, served, sizeof(got)) == 0);
    raw_close(&r);
}

/* Completions in posting order: an acknowledgement riding on a read's answer
 * must not complete a later write before the read itself completes. */
static void test_ack_on_read_answer_keeps_completion_order(void)
{
    raw_peer_t r;
    raw_open(&r);
    unsigned char dest[16], src[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    lm_mr_t *md, *ms;
    CHECK(lm_mr_register(r.ctx, dest, sizeof(dest), LM_ACCESS_LOCAL_WRITE, &md) == LM_OK);
    CHECK(lm_mr_register(r.ctx, src, sizeof(src), LM_ACCESS_LOCAL_WRITE, &ms) == LM_OK);
    lm_rdesc_t theirs = {.key = 5, .length = 64};
    CHECK(lm_ep_read(r.ep, md, 0, sizeof(dest), &theirs, 0, 1) == LM_OK);  /* seq 0 */
    CHECK(lm_ep_write(r.ep, ms, 0, sizeof(src), &theirs, 0, 0, 0, 2) == LM_OK); /* seq 1 */
    lm_tcp_hdr_t h;
    unsigned char payload[sizeof(src)];
    CHECK(recv_all(r.fd, &h, sizeof(h)) == 0 && h.type == LM_TCP_READ_REQ);
    CHECK(recv_all(r.fd, &h, sizeof(h)) == 0 && h.type == LM_TCP_WRITE);
    CHECK(recv_all(r.fd, payload, sizeof(payload)) == 0);
    lm_tcp_hdr_t resp = frame(LM_TCP_READ_RESP, 0, 0, 0, sizeof(dest));
    resp.ack = 2; /* the write (seq 1) was accepted */
    CHECK(send_all(r.fd, &resp, sizeof(resp)) == 0);
    usleep(100000); /* let the header be handled before its payload arrives */
    unsigned char answer[sizeof(dest)];
    memset(answer, 0xab, sizeof(answer));
    CHECK(send_all(r.fd, answer, sizeof(answer)) == 0);
    lm_completion_t first = wait_one(r.ctx), second = wait_one(r.ctx);
    CHECK(first.opcode == LM_OP_READ && first.wr_id == 1 && first.status == LM_OK);
    CHECK(second.opcode == LM_OP_WRITE && second.wr_id == 2 && second.status == LM_OK);
    CHECK(memcmp(dest, answer, sizeof(dest)) == 0);
    raw_close(&r);
}

/* Poll (never drive) until one completion of the given opcode shows, or 5 s. */
static bool poll_for(lm_context_t *ctx, uint32_t opcode)
{
    for (int i = 0; i < 5000; i++) {
        lm_completion_t c;
        if (lm_cq_poll(ctx, &c, 1) == 1 && c.opcode == opcode)
            return c.status == LM_OK;
        usleep(1000);
    }
    return false;
}

/* The drivers' lease: an application that stopped waiting gets progress back
 * from the progress thread (bounded, never lost); one that keeps posting
 * without waiting is served by its own posts; a ping-pong of waits does not
 * wake the progress thread per message. */
static void test_progress_lease(void)
{
    pair_t p;
    pair_open(&p);
    enum { N = 1 << 16, ROUNDS = 2000 };
    unsigned char *src = calloc(1, N), *dst = calloc(1, N);
    lm_mr_t *ms, *md;
    CHECK(lm_mr_register(p.a, src, N, LM_ACCESS_LOCAL_WRITE | LM_ACCESS_REMOTE_WRITE, &ms) == LM_OK);
    CHECK(lm_mr_register(p.b, dst, N, LM_ACCESS_LOCAL_WRITE | LM_ACCESS_REMOTE_WRITE, &md) == LM_OK);
    lm_rdesc_t ra, rb;
    CHECK(lm_mr_descriptor(ms, &ra) == LM_OK);
    CHECK(lm_mr_descriptor(md, &rb) == LM_OK);
    lm_completion_t c;

    /* b drives, then stops: its progress thread must take over (the write's
     * acknowledgement and the arrival both need b's side to run). */
    CHECK(lm_cq_wait(p.b, &c, 1, 20) == 0);
    uint64_t ext0, resumes0;
    lm_progress_stats(p.b, &ext0, &resumes0);
    CHECK(lm_ep_write(p.ea, ms, 0, 4096, &rb, 0, 1, LM_WRITE_IMM, 1) == LM_OK);
    CHECK(poll_for(p.a, LM_OP_WRITE));
    CHECK(poll_for(p.b, LM_OP_RECV_IMM));
    uint64_t ext1, resumes1;
    lm_progress_stats(p.b, &ext1, &resumes1);
    CHECK(resumes1 > resumes0);

    /* a posts without ever waiting: its completions still come. */
    for (int i = 0; i < 64; i++) {
        CHECK(lm_ep_write(p.ea, ms, 0, N, &rb, 0, 0, 0, 100 + (uint64_t)i) == LM_OK);
        usleep(200);
    }
    int done = 0;
    for (int i = 0; i < 5000 && done < 64; i++) {
        int n = lm_cq_poll(p.a, &c, 1);
        done += n > 0 && c.opcode == LM_OP_WRITE && c.status == LM_OK;
        if (n == 0)
            usleep(1000);
    }
    CHECK(done == 64);

    /* Ping-pong, each side waiting in turn: the progress threads stay parked. */
    lm_progress_stats(p.a, &ext0, &resumes0);
    for (int i = 0; i < ROUNDS; i++) {
        CHECK(lm_ep_write(p.ea, ms, 0, 64, &rb, 0, 2, LM_WRITE_IMM, 2) == LM_OK);
        do
            CHECK(lm_cq_wait(p.b, &c, 1, 5000) == 1);
        while (c.opcode != LM_OP_RECV_IMM);
        CHECK(lm_ep_write(p.eb, md, 0, 64, &ra, 0, 3, LM_WRITE_IMM, 3) == LM_OK);
        do
            CHECK(lm_cq_wait(p.a, &c, 1, 5000) == 1);
        while (c.opcode != LM_OP_RECV_IMM);
    }
    lm_progress_stats(p.a, &ext1, &resumes1);
    /* Not a timing bound: a count. Per-message hand-offs would be ~ROUNDS;
     * a descheduled moment here and there may resume the thread a few times. */
    CHECK(resumes1 - resumes0 < ROUNDS / 10);
    CHECK(ext1 - ext0 < ROUNDS);
    lm_mr_deregister(ms);
    lm_mr_deregister(md);
    pair_close(&p);
    free(src);
    free(dst);
}

/* Posters (lamina.h): a prepared write is posted only when its op runs, from
 * another thread; ops run after close or canceled post nothing and free
 * themselves, and the poster outlives its owner until the last op (run under
 * LeakSanitizer: nothing may be left). */
static void *run_op(void *op)
{
    lm_poster_run(op);
    return NULL;
}

static void test_poster_posts_when_run_and_never_after_close(void)
{
    pair_t p;
    pair_open(&p);
    unsigned char src[256], dst[256] = {0};
    for (int i = 0; i < 256; i++)
        src[i] = (unsigned char)i;
    lm_mr_t *ms, *md;
    CHECK(lm_mr_register(p.a, src, sizeof(src), LM_ACCESS_LOCAL_WRITE, &ms) == LM_OK);
    CHECK(lm_mr_register(p.b, dst, sizeof(dst), LM_ACCESS_REMOTE_WRITE, &md) == LM_OK);
    lm_rdesc_t rd;
    CHECK(lm_mr_descriptor(md, &rd) == LM_OK);
    lm_poster_t *poster;
    CHECK(lm_poster_create(p.ea, &poster) == LM_OK);
    lm_poster_op_t *now, *late, *dropped, *op;
    CHECK(lm_poster_write_prepare(poster, ms, 0, 64, &rd, 0, 5, LM_WRITE_IMM, 9, &now) == LM_OK);
    CHECK(lm_poster_write_prepare(poster, ms, 0, 512, &rd, 0, 5, LM_WRITE_IMM, 10, &op) == LM_ERR_INVALID);
    CHECK(lm_poster_write_prepare(poster, ms, 64, 64, &rd, 64, 6, LM_WRITE_IMM, 11, &late) == LM_OK);
    CHECK(lm_poster_write_prepare(poster, ms, 0, 16, &rd, 0, 7, LM_WRITE_IMM, 12, &dropped) == LM_OK);
    CHECK(lm_poster_pending(poster) == 3);
    CHECK(atomic_load(&p.a->cq.reserved) == 3); /* each op's notice has its place held */
    pthread_t t;
    CHECK(pthread_create(&t, NULL, run_op, now) == 0);
    pthread_join(t, NULL);
    lm_completion_t c = wait_one(p.b);
    CHECK(c.opcode == LM_OP_RECV_IMM && c.imm == 5 && memcmp(dst, src, 64) == 0);
    c = wait_one(p.a);
    CHECK(c.opcode == LM_OP_WRITE && c.wr_id == 9 && c.status == LM_OK);
    CHECK(atomic_load(&p.a->cq.reserved) == 2); /* the posted one's place went back: it asked for no notice */
    lm_poster_cancel(dropped);
    CHECK(atomic_load(&p.a->cq.reserved) == 1);
    lm_poster_close(poster);
    CHECK(atomic_load(&p.a->cq.reserved) == 0); /* `late` runs after close: its place went back with it */
    CHECK(lm_poster_write_prepare(poster, ms, 0, 16, &rd, 0, 7, LM_WRITE_IMM, 13, &op) == LM_ERR_CLOSED);
    CHECK(lm_poster_pending(poster) == 1 && lm_poster_error(poster) == 0);
    lm_poster_destroy(poster); /* the owner lets go; `late` still holds the poster */
    lm_poster_run(late);       /* posts nothing, frees itself and the poster */
    CHECK(lm_cq_wait(p.b, &c, 1, 100) == 0 && dst[64] == 0);
    lm_mr_deregister(ms);
    lm_mr_deregister(md);
    pair_close(&p);
}

/* Two channels over a tcp pair (a sends, b receives), each region zeroed. */
typedef struct chan_pair {
    pair_t p;
    lm_chan_t *ca, *cb;
    lm_mr_t *ma, *mb;
    void *ra, *rb;
} chan_pair_t;

static void chan_pair_open_mbs(chan_pair_t *c, uint32_t microbatches)
{
    pair_open(&c->p);
    lm_chan_params_t params = {.microbatches = microbatches, .slots = 2, .recv_capacity = 1024, .send_capacity = 1024};
    uint64_t bytes = lm_chan_region_bytes(&params);
    c->ra = calloc(1, bytes);
    c->rb = calloc(1, bytes);
    uint32_t all = LM_ACCESS_LOCAL_WRITE | LM_ACCESS_REMOTE_WRITE;
    CHECK(lm_mr_register(c->p.a, c->ra, bytes, all, &c->ma) == LM_OK);
    CHECK(lm_mr_register(c->p.b, c->rb, bytes, all, &c->mb) == LM_OK);
    lm_rdesc_t da, db;
    CHECK(lm_mr_descriptor(c->ma, &da) == LM_OK && lm_mr_descriptor(c->mb, &db) == LM_OK);
    CHECK(lm_chan_create(c->p.ea, c->ma, &db, &params, &c->ca) == LM_OK);
    CHECK(lm_chan_create(c->p.eb, c->mb, &da, &params, &c->cb) == LM_OK);
}

static void chan_pair_open(chan_pair_t *c)
{
    chan_pair_open_mbs(c, 1);
}

static void chan_pair_close(chan_pair_t *c)
{
    lm_chan_destroy(c->ca);
    lm_chan_destroy(c->cb);
    lm_mr_deregister(c->ma);
    lm_mr_deregister(c->mb);
    pair_close(&c->p);
    free(c->ra);
    free(c->rb);
}

static void *run_deferred(void *op)
{
    lm_chan_run_deferred(op); /* as the CUDA driver's host-function thread would */
    return NULL;
}

/* A column block of 4 rows, `width` bytes each, of a [4, 96] uint8 source. */
static lm_chan_tensor_t column_block(const unsigned char *src, uint32_t first, uint32_t width)
{
    return (lm_chan_tensor_t){.addr = (uint64_t)(uintptr_t)(src + first), .nbytes = 4 * width,
                              .shape = {4, width}, .dtype = LM_DTYPE_UINT8, .ndim = 2, .rows = 4,
                              .row_stride = 96};
}

/* lm_chan_send_prepare_from (GPUDirect sends, host memory standing in):
 * nothing is read until the op runs; rows are gathered from the region
 * however short; checks fail before the credit wait; a deregistered region
 * fails the channel instead of letting a stale payload through; an op run
 * after close lets its region go (LeakSanitizer: nothing may be left). */
static void test_chan_send_prepare_from(void)
{
    chan_pair_t c;
    chan_pair_open(&c);
    unsigned char *src = calloc(1, 4 * 96), outside[64] = {0};
    lm_mr_t *ms;
    CHECK(lm_mr_register(c.p.a, src, 4 * 96, LM_ACCESS_LOCAL_WRITE, &ms) == LM_OK);
    lm_chan_tensor_t t[2] = {column_block(src, 0, 16), column_block(src, 48, 32)};
    lm_mr_t *sources[2] = {ms, ms};
    uint64_t seq;
    lm_chan_deferred_t *op;
    CHECK(lm_chan_send_prepare_from(c.ca, 3, 0, t, 2, sources, 1000, &seq, &op) == LM_OK && seq == 0);
    for (int i = 0; i < 4 * 96; i++)
        src[i] = (unsigned char)(i % 251); /* the "stream" writes after the send was prepared */
    lm_chan_msg_t msg;
    CHECK(lm_chan_recv(c.cb, 0, &msg, 100) == 0); /* nothing posted yet */
    pthread_t runner;
    CHECK(pthread_create(&runner, NULL, run_deferred, op) == 0);
    pthread_join(runner, NULL);
    CHECK(lm_chan_recv(c.cb, 0, &msg, 5000) == 1 && msg.layer == 3 && msg.ntensors == 2);
    const unsigned char *got = (const unsigned char *)c.rb + msg.tensors[1].addr;
    for (int r = 0; r < 4; r++)
        CHECK(memcmp(got + r * 32, src + r * 96 + 48, 32) == 0);
    CHECK(lm_chan_release(c.cb, 0, msg.slot, msg.seq) == LM_OK);
    lm_chan_stats_t st;
    lm_chan_stats(c.ca, &st);
    CHECK(st.gather_messages == 1 && st.staged_bytes == 0 && st.slot_messages == 0);

    /* Refused at once, before any credit wait: a tensor outside its region, too many pieces. */
    lm_chan_tensor_t bad = {.addr = (uint64_t)(uintptr_t)outside, .nbytes = 64, .shape = {64}, .dtype = LM_DTYPE_UINT8,
                            .ndim = 1};
    CHECK(lm_chan_send_prepare_from(c.ca, 0, 0, &bad, 1, sources, 1000, &seq, &op) == LM_ERR_INVALID);
    lm_chan_tensor_t many = {.addr = (uint64_t)(uintptr_t)src, .nbytes = 5000, .shape = {5000}, .dtype = LM_DTYPE_UINT8,
                             .ndim = 1, .rows = 5000, .row_stride = 0};
    CHECK(lm_chan_send_prepare_from(c.ca, 0, 0, &many, 1, sources, 1000, &seq, &op) == LM_ERR_INVALID);

    /* The region goes before the op runs: the channel fails, nothing is delivered. */
    CHECK(lm_chan_send_prepare_from(c.ca, 4, 0, t, 2, sources, 1000, &seq, &op) == LM_OK);
    lm_mr_deregister(ms);
    lm_chan_run_deferred(op);
    CHECK(lm_chan_recv(c.cb, 0, &msg, 200) == 0);
    CHECK(lm_chan_flush(c.ca, 1000) == LM_ERR_LOCAL);

    /* Prepared, then the channel closes: run late, it posts nothing and drops its region. */
    chan_pair_close(&c);
    chan_pair_open(&c);
    CHECK(lm_mr_register(c.p.a, src, 4 * 96, LM_ACCESS_LOCAL_WRITE, &ms) == LM_OK);
    sources[0] = sources[1] = ms;
    CHECK(lm_chan_send_prepare_from(c.ca, 5, 0, t, 2, sources, 1000, &seq, &op) == LM_OK);
    lm_chan_close(c.ca);
    lm_chan_run_deferred(op);
    CHECK(lm_chan_recv(c.cb, 0, &msg, 200) != 1);
    lm_mr_deregister(ms);
    chan_pair_close(&c);
    free(src);
}

/* Split payloads: b's payloads land in a region of their own (device memory
 * in production; host memory here), the headers in b's ring. Every send path
 * of a writes there: staged, gathered from a region, deferred from the slot
 * and deferred from a region. */
static void test_chan_split_payloads(void)
{
    chan_pair_t c;
    chan_pair_open(&c);
    uint64_t payload_bytes = 2 * 1024; /* 1 micro-batch x 2 slots x 1024 */
    unsigned char *payloads = calloc(1, payload_bytes), *src = calloc(1, 4 * 96);
    for (int i = 0; i < 4 * 96; i++)
        src[i] = (unsigned char)(i * 7 + 1);
    lm_mr_t *mp, *ms;
    CHECK(lm_mr_register(c.p.b, payloads, payload_bytes, LM_ACCESS_REMOTE_WRITE, &mp) == LM_OK);
    CHECK(lm_mr_register(c.p.a, src, 4 * 96, LM_ACCESS_LOCAL_WRITE, &ms) == LM_OK);
    lm_rdesc_t dp;
    CHECK(lm_mr_descriptor(mp, &dp) == LM_OK);
    lm_rdesc_t small = dp;
    small.length = 100;
    CHECK(lm_chan_split_payloads(c.ca, NULL, 0, &small, 1) == LM_ERR_PROTOCOL);
    CHECK(lm_chan_split_payloads(c.cb, mp, 1, NULL, 0) == LM_OK);
    CHECK(lm_chan_split_payloads(c.ca, NULL, 0, &dp, 1) == LM_OK);

    lm_chan_tensor_t block = column_block(src, 48, 32);
    lm_mr_t *sources[1] = {ms};
    uint64_t seq;
    lm_chan_deferred_t *op;
    lm_chan_msg_t msg;
    for (int round = 0; round < 4; round++) {
        if (round == 0) { /* strided, not registered: staged into the slot, then written apart */
            CHECK(lm_chan_send(c.ca, 0, 0, &block, 1, NULL, 0, 1000, &seq) == LM_OK);
        } else if (round == 1) { /* gathered from the source region */
            CHECK(lm_chan_send_from(c.ca, 1, 0, &block, 1, sources, 1000, &seq) == LM_OK);
        } else if (round == 2) { /* deferred, from the slot (what the copy engine fills) */
            uint64_t at;
            CHECK(lm_chan_send_slot(c.ca, 0, 1000, &at) == LM_OK);
            unsigned char *slot = (unsigned char *)c.ra + at;
            for (int r = 0; r < 4; r++)
                memcpy(slot + r * 32, src + r * 96 + 48, 32);
            lm_chan_tensor_t packed = {.addr = (uint64_t)(uintptr_t)slot, .nbytes = 128, .shape = {4, 32},
                                       .dtype = LM_DTYPE_UINT8, .ndim = 2};
            CHECK(lm_chan_send_prepare(c.ca, 2, 0, &packed, 1, 1000, &seq, &op) == LM_OK);
            lm_chan_run_deferred(op);
        } else { /* deferred, from the source region (GPUDirect) */
            CHECK(lm_chan_send_prepare_from(c.ca, 3, 0, &block, 1, sources, 1000, &seq, &op) == LM_OK);
            lm_chan_run_deferred(op);
        }
        CHECK(lm_chan_recv(c.cb, 0, &msg, 5000) == 1 && msg.layer == (uint32_t)round && msg.ntensors == 1);
        CHECK(msg.tensors[0].addr == (uint64_t)msg.slot * 1024 && msg.tensors[0].nbytes == 128);
        for (int r = 0; r < 4; r++)
            CHECK(memcmp(payloads + msg.tensors[0].addr + r * 32, src + r * 96 + 48, 32) == 0);
        memset(payloads + msg.tensors[0].addr, 0, 128);
        CHECK(lm_chan_release(c.cb, 0, msg.slot, msg.seq) == LM_OK);
    }
    /* Only headers went to b's ring: its slots' payload areas stayed zero. */
    for (uint32_t slot = 0; slot < 2; slot++) {
        const unsigned char *area = (const unsigned char *)c.rb + slot * (LM_CHAN_HEADER_BYTES + 1024) +
                                    LM_CHAN_HEADER_BYTES;
        for (int i = 0; i < 1024; i++)
            CHECK(area[i] == 0);
    }
    CHECK(lm_chan_split_payloads(c.ca, NULL, 0, NULL, 0) == LM_ERR_INVALID); /* messages moved already */
    CHECK(lm_chan_flush(c.ca, 1000) == LM_OK);
    lm_chan_close(c.ca);
    lm_chan_close(c.cb);
    lm_mr_deregister(mp);
    lm_mr_deregister(ms);
    chan_pair_close(&c);
    free(payloads);
    free(src);
}

/* Split payloads of the first micro-batch only: its payloads land apart, the
 * second's (an engine's control micro-batch, read by the CPU) stay after
 * their headers in the ring. Counts out of range are refused. */
/* Sent words: a stream-ordered send's word reaches seq + 1 once its writes
 * completed, not when it is prepared; closing releases every prepared send. */
static void test_chan_sent_words(void)
{
    chan_pair_t c;
    chan_pair_open(&c);
    unsigned char src[4 * 96];
    for (int i = 0; i < (int)sizeof(src); i++)
        src[i] = (unsigned char)i;
    lm_mr_t *ms;
    CHECK(lm_mr_register(c.p.a, src, sizeof(src), LM_ACCESS_LOCAL_WRITE, &ms) == LM_OK);
    lm_mr_t *sources[1] = {ms};
    lm_chan_tensor_t block = column_block(src, 16, 32);
    uint32_t words[1] = {12345};
    uint64_t seq;
    lm_chan_deferred_t *op;
    lm_chan_msg_t msg;
    CHECK(lm_chan_send(c.ca, 0, 0, &block, 1, NULL, 0, 1000, &seq) == LM_OK && seq == 0); /* before: not waited for */
    CHECK(lm_chan_set_sent_words(c.ca, words) == LM_OK && words[0] == 1);
    CHECK(lm_chan_recv(c.cb, 0, &msg, 5000) == 1 && lm_chan_release(c.cb, 0, msg.slot, msg.seq) == LM_OK);
    for (uint32_t layer = 1; layer < 4; layer++) {
        CHECK(lm_chan_send_prepare_from(c.ca, layer, 0, &block, 1, sources, 1000, &seq, &op) == LM_OK);
        CHECK(seq == layer && __atomic_load_n(&words[0], __ATOMIC_ACQUIRE) == layer); /* not sent yet */
        lm_chan_run_deferred(op);
        CHECK(lm_chan_flush(c.ca, 1000) == LM_OK);
        CHECK(__atomic_load_n(&words[0], __ATOMIC_ACQUIRE) == layer + 1);
        CHECK(lm_chan_recv(c.cb, 0, &msg, 5000) == 1 && msg.layer == layer);
        CHECK(lm_chan_release(c.cb, 0, msg.slot, msg.seq) == LM_OK);
    }
    /* Prepared, never run: closing counts it as sent, so no stream waits forever. */
    CHECK(lm_chan_send_prepare_from(c.ca, 9, 0, &block, 1, sources, 1000, &seq, &op) == LM_OK && seq == 4);
    CHECK(words[0] == 4);
    lm_chan_close(c.ca);
    CHECK(__atomic_load_n(&words[0], __ATOMIC_ACQUIRE) == 5);
    lm_chan_run_deferred(op); /* dropped: the channel is closed */
    CHECK(words[0] == 5);
    lm_chan_close(c.cb);
    lm_mr_deregister(ms);
    chan_pair_close(&c);

    /* A channel that fails releases the sends prepared so far, and the words
     * never go back when those ops run afterwards. */
    chan_pair_open(&c);
    CHECK(lm_mr_register(c.p.a, src, sizeof(src), LM_ACCESS_LOCAL_WRITE, &ms) == LM_OK);
    sources[0] = ms;
    words[0] = 777;
    CHECK(lm_chan_set_sent_words(c.ca, words) == LM_OK && words[0] == 0);
    lm_chan_deferred_t *ops[2];
    for (int i = 0; i < 2; i++)
        CHECK(lm_chan_send_prepare_from(c.ca, 1, 0, &block, 1, sources, 1000, &seq, &ops[i]) == LM_OK && seq == (uint64_t)i);
    CHECK(words[0] == 0);
    lm_chan_inject_imm(c.ca, 0xFu << 28); /* an immediate of no known kind: the channel fails */
    CHECK(lm_chan_error(c.ca) == LM_ERR_PROTOCOL && words[0] == 2);
    for (int i = 0; i < 2; i++)
        lm_chan_run_deferred(ops[i]);
    CHECK(words[0] == 2);
    lm_chan_close(c.ca);
    CHECK(words[0] == 2);
    lm_chan_close(c.cb);
    lm_mr_deregister(ms);
    chan_pair_close(&c);
}

static void test_chan_split_payloads_of_some_microbatches(void)
{
    chan_pair_t c;
    chan_pair_open_mbs(&c, 2);
    uint64_t payload_bytes = 2 * 1024; /* the first micro-batch's 2 slots only */
    unsigned char *payloads = calloc(1, payload_bytes), src[64];
    for (int i = 0; i < 64; i++)
        src[i] = (unsigned char)(i * 5 + 3);
    lm_mr_t *mp;
    CHECK(lm_mr_register(c.p.b, payloads, payload_bytes, LM_ACCESS_REMOTE_WRITE, &mp) == LM_OK);
    lm_rdesc_t dp;
    CHECK(lm_mr_descriptor(mp, &dp) == LM_OK);
    CHECK(lm_chan_split_payloads(c.cb, mp, 0, NULL, 0) == LM_ERR_INVALID);
    CHECK(lm_chan_split_payloads(c.cb, mp, 3, NULL, 0) == LM_ERR_INVALID);
    CHECK(lm_chan_split_payloads(c.cb, mp, 2, NULL, 0) == LM_ERR_INVALID); /* too small for both */
    CHECK(lm_chan_split_payloads(c.ca, NULL, 0, &dp, 3) == LM_ERR_PROTOCOL);
    CHECK(lm_chan_split_payloads(c.ca, NULL, 0, &dp, 2) == LM_ERR_PROTOCOL);
    CHECK(lm_chan_split_payloads(c.cb, mp, 1, NULL, 0) == LM_OK);
    CHECK(lm_chan_split_payloads(c.ca, NULL, 0, &dp, 1) == LM_OK);

    lm_chan_tensor_t t = {.addr = (uint64_t)(uintptr_t)src, .nbytes = 64, .shape = {64}, .dtype = LM_DTYPE_UINT8,
                          .ndim = 1};
    uint64_t seq;
    lm_chan_msg_t msg;
    for (uint32_t mb = 0; mb < 2; mb++) {
        CHECK(lm_chan_send(c.ca, 7, mb, &t, 1, NULL, 0, 1000, &seq) == LM_OK);
        CHECK(lm_chan_recv(c.cb, mb, &msg, 5000) == 1 && msg.microbatch == mb && msg.ntensors == 1);
        const unsigned char *at = mb == 0 ? payloads + msg.tensors[0].addr
                                          : (const unsigned char *)c.rb + msg.tensors[0].addr;
        if (mb == 0)
            CHECK(msg.tensors[0].addr == (uint64_t)msg.slot * 1024);
        else /* in the ring, after the header of micro-batch 1's slot */
            CHECK(msg.tensors[0].addr == (2 + (uint64_t)msg.slot) * (LM_CHAN_HEADER_BYTES + 1024) +
                                             LM_CHAN_HEADER_BYTES);
        CHECK(memcmp(at, src, 64) == 0);
        CHECK(lm_chan_release(c.cb, mb, msg.slot, msg.seq) == LM_OK);
    }
    /* Micro-batch 0's slot in the ring kept no payload. */
    for (uint32_t slot = 0; slot < 2; slot++) {
        const unsigned char *area = (const unsigned char *)c.rb + slot * (LM_CHAN_HEADER_BYTES + 1024) +
                                    LM_CHAN_HEADER_BYTES;
        for (int i = 0; i < 64; i++)
            CHECK(area[i] == 0);
    }
    CHECK(lm_chan_flush(c.ca, 1000) == LM_OK);
    lm_chan_close(c.ca);
    lm_chan_close(c.cb);
    lm_mr_deregister(mp);
    chan_pair_close(&c);
    free(payloads);
}


/* ---- staged links over a tcp pair, host streams standing in for the device ---- */
#define SL_SLOTS 2u
#define SL_CHUNK 256u
#define SL_SIDE (SL_SLOTS * SL_CHUNK + LM_STAGED_SCRATCH)

typedef struct staged_side {
    unsigned char *ring; /* transmit side, then receive side */
    lm_mr_t *tx, *rx;
    lm_host_stream_t *d2h, *h2d;
    uint32_t gate;
    lm_staged_t *link;
} staged_side_t;

static void staged_side_open(staged_side_t *s, lm_context_t *ctx, uint32_t delay_us)
{
    memset(s, 0, sizeof(*s));
    s->ring = calloc(2, SL_SIDE);
    CHECK(lm_mr_register(ctx, s->ring, SL_SIDE, LM_ACCESS_LOCAL_WRITE, &s->tx) == LM_OK);
    CHECK(lm_mr_register(ctx, s->ring + SL_SIDE, SL_SIDE, LM_ACCESS_LOCAL_WRITE | LM_ACCESS_REMOTE_WRITE, &s->rx) ==
          LM_OK);
    CHECK(lm_host_stream_create(delay_us, &s->d2h) == LM_OK);
    CHECK(lm_host_stream_create(delay_us, &s->h2d) == LM_OK);
}

/* Start s's link over ep, sending into peer's receive slots. */
static void staged_side_start(staged_side_t *s, lm_ep_t *ep, const staged_side_t *peer)
{
    lm_copy_fns_t fns;
    lm_host_copy_fns(&fns);
    fns.d2h = s->d2h;
    fns.h2d = s->h2d;
    lm_staged_params_t params = {.tx = s->tx, .rx = s->rx, .slots = SL_SLOTS, .chunk_bytes = SL_CHUNK,
                                 .peer_slots = SL_SLOTS, .peer_chunk_bytes = SL_CHUNK,
                                 .gate_device = (uint64_t)(uintptr_t)&s->gate, .gate_host = &s->gate};
    CHECK(lm_mr_descriptor(peer->rx, &params.peer_rx) == LM_OK);
    CHECK(lm_staged_create(ep, &fns, &params, &s->link) == LM_OK);
}

static void staged_side_close(staged_side_t *s)
{
    lm_staged_destroy(s->link);
    lm_host_stream_destroy(s->d2h); /* runs what is queued: the posts behind it post nothing now */
    lm_host_stream_destroy(s->h2d);
    lm_mr_deregister(s->tx);
    lm_mr_deregister(s->rx);
    free(s->ring);
}

/* A tcp pair with a staged link at each end, a's streams delayed by delay_a us, b's by delay_b. */
static void staged_pair_open(pair_t *p, staged_side_t *a, staged_side_t *b, uint32_t delay_a, uint32_t delay_b)
{
    pair_open(p);
    staged_side_open(a, p->a, delay_a);
    staged_side_open(b, p->b, delay_b);
    staged_side_start(a, p->ea, b);
    staged_side_start(b, p->eb, a);
}

static void test_staged_link(void)
{
    pair_t p;
    staged_side_t a, b;
    staged_pair_open(&p, &a, &b, 0, 100);
    /* Messages of 0 to 5 chunks (the ring holds 2): credits pace them; receives gated, in order. */
    static const uint64_t sizes[] = {0, 1, 255, 256, 257, 1280};
    unsigned char src[1280], dst[1300];
    for (int i = 0; i < 1280; i++)
        src[i] = (unsigned char)(i * 7 + 3);
    for (uint32_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
        memset(dst, 0xEE, sizeof(dst));
        lm_transfer_t *r, *t;
        CHECK(lm_staged_recv(b.link, (uint64_t)(uintptr_t)dst, sizeof(dst), NULL, 0, 1, i + 1, &r) == LM_OK);
        CHECK(lm_staged_send(a.link, (uint64_t)(uintptr_t)src, sizes[i], NULL, 0, &t) == LM_OK);
        uint64_t got = 99, sent = 99;
        CHECK(lm_transfer_wait(r, 5000, &got) == LM_OK && got == sizes[i]);
        CHECK(lm_transfer_wait(t, 5000, &sent) == LM_OK && sent == sizes[i]);
        CHECK(memcmp(dst, src, sizes[i]) == 0 && dst[sizes[i]] == 0xEE);
        CHECK(b.gate == i + 1);
        lm_transfer_release(r);
        lm_transfer_release(t);
    }
    /* A message longer than its receive fails that receive only. */
    lm_transfer_t *small, *t, *next, *again;
    CHECK(lm_staged_recv(b.link, (uint64_t)(uintptr_t)dst, 100, NULL, 0, 0, 0, &small) == LM_OK);
    CHECK(lm_staged_send(a.link, (uint64_t)(uintptr_t)src, 600, NULL, 0, &t) == LM_OK);
    CHECK(lm_transfer_wait(small, 5000, NULL) == LM_ERR_INVALID);
    CHECK(strstr(lm_transfer_message(small), "larger than the 100-byte receive buffer") != NULL);
    CHECK(lm_staged_recv(b.link, (uint64_t)(uintptr_t)dst, sizeof(dst), NULL, 0, 0, 0, &next) == LM_OK);
    CHECK(lm_staged_send(a.link, (uint64_t)(uintptr_t)src + 1, 300, NULL, 0, &again) == LM_OK);
    uint64_t got = 0;
    CHECK(lm_transfer_wait(next, 5000, &got) == LM_OK && got == 300 && memcmp(dst, src + 1, 300) == 0);
    CHECK(lm_transfer_wait(t, 5000, NULL) == LM_OK && lm_transfer_wait(again, 5000, NULL) == LM_OK);
    lm_staged_stats_t st;
    lm_staged_stats(a.link, &st);
    CHECK(st.sent == 8 && st.chunks_sent == 1 + 1 + 1 + 1 + 2 + 5 + 3 + 2 && st.events_created == 0);
    lm_transfer_release(small);
    lm_transfer_release(t);
    lm_transfer_release(next);
    lm_transfer_release(again);
    /* A send that can never go (no receive, more chunks than credits) fails on close; so does a receive
     * waiting on the other side, and its gate opens. */
    lm_transfer_t *stuck, *waiting;
    CHECK(lm_staged_send(a.link, (uint64_t)(uintptr_t)src, 1280, NULL, 0, &stuck) == LM_OK);
    CHECK(lm_staged_recv(a.link, (uint64_t)(uintptr_t)dst, 10, NULL, 0, 1, 41, &waiting) == LM_OK);
    CHECK(lm_transfer_wait(stuck, 50, NULL) == LM_ERR_TIMEOUT && lm_staged_sending(a.link) == 1);
    lm_staged_shutdown(a.link, LM_ERR_CLOSED, "closing under a stuck send");
    CHECK(lm_transfer_wait(stuck, 0, NULL) == LM_ERR_CLOSED && lm_transfer_wait(waiting, 0, NULL) == LM_ERR_CLOSED);
    CHECK(strstr(lm_transfer_message(stuck), "stuck send") != NULL && a.gate == 41);
    CHECK(lm_staged_send(a.link, (uint64_t)(uintptr_t)src, 1, NULL, 0, &t) == LM_ERR_CLOSED);
    staged_side_close(&a);
    CHECK(lm_transfer_done(stuck)); /* a transfer outlives its link */
    lm_transfer_release(stuck);
    lm_transfer_release(waiting);
    staged_side_close(&b);
    pair_close(&p);
}

/* A send spanning both transmit slots, its transfer let go by the caller at once, then the link
 * failed while its chunks are still queued behind a slow stream: each slot lets go on its own. */
static void test_staged_link_fails_under_a_released_transfer(void)
{
    pair_t p;
    staged_side_t a, b;
    staged_pair_open(&p, &a, &b, 200000, 0);
    unsigned char src[2 * SL_CHUNK] = {1};
    lm_transfer_t *t;
    CHECK(lm_staged_send(a.link, (uint64_t)(uintptr_t)src, sizeof(src), NULL, 0, &t) == LM_OK);
    lm_transfer_release(t);
    lm_staged_shutdown(a.link, LM_ERR_CLOSED, "failed under a released transfer");
    staged_side_close(&a);
    staged_side_close(&b);
    pair_close(&p);
}

/* A hostile peer: an unknown immediate, a chunk larger than our slots, more credits than we have
 * sent chunks for, a credit of none, a chunk without a credit; each fails the link with
 * LM_ERR_PROTOCOL, and nothing else. */
static void test_staged_link_refuses_a_hostile_peer(void)
{
    const uint32_t imms[] = {3u << 30, (1u << 30) | (SL_CHUNK + 1), (2u << 30) | 1, 2u << 30, 1u << 30};
    for (uint32_t k = 0; k < sizeof(imms) / sizeof(imms[0]); k++) {
        pair_t p;
        pair_open(&p);
        staged_side_t a, b;
        staged_side_open(&a, p.a, 0);
        staged_side_open(&b, p.b, 0);
        staged_side_start(&a, p.ea, &b);
        lm_rdesc_t rd;
        CHECK(lm_mr_descriptor(a.rx, &rd) == LM_OK);
        /* The last case floods, with no receive to take the chunks: SL_SLOTS + 1 of them, one more than
         * a's receive slots. The others fail a receive waiting meanwhile. */
        bool flood = k == 4;
        lm_transfer_t *r = NULL;
        if (!flood)
            CHECK(lm_staged_recv(a.link, (uint64_t)(uintptr_t)b.ring, 16, NULL, 0, 0, 0, &r) == LM_OK);
        for (uint32_t w = 0; w < (flood ? SL_SLOTS + 1 : 1); w++)
            CHECK(lm_ep_write(p.eb, b.tx, 0, 4, &rd, 0, imms[k], LM_WRITE_IMM, 100 + w) == LM_OK);
        if (r)
            CHECK(lm_transfer_wait(r, 5000, NULL) == LM_ERR_PROTOCOL);
        char text[200];
        uint64_t deadline = lm_now_ns() + 5000000000ull;
        while (!lm_staged_error(a.link, text, sizeof(text)) && lm_now_ns() < deadline)
            usleep(1000);
        CHECK(lm_staged_error(a.link, text, sizeof(text)) == LM_ERR_PROTOCOL && strstr(text, "staged link") != NULL);
        lm_transfer_release(r);
        staged_side_close(&a);
        staged_side_close(&b);
        pair_close(&p);
    }
}

int main(void)
{
    test_bad_arguments();
    test_write_with_imm_lands_in_place();
    test_refusals_leave_target_untouched();
    test_read();
    test_peer_loss_flushes_outstanding();
    test_deregister_with_writes_in_flight();
    test_gather_source_deregistered_while_queued();
    test_shm_rings_and_hostile_indexes();
    test_shm_rings_are_sealed();
    test_shm_post_before_connect_is_refused();
    test_shm_second_sleeper_keeps_its_doorbell();
    test_reply_backlog_drains(false);
    test_reply_backlog_drains(true);
    test_garbage_closes_only_that_endpoint();
    test_reads_in_pieces_and_beyond_the_read_limit();
    test_burst_beyond_rx_budget_completes();
    test_burst_library_both_ends();
    test_read_answer_not_changed_by_later_write();
    test_ack_for_unsent_write_fails_endpoint();
    test_answer_to_unsent_read_fails_endpoint();
    test_read_flood_never_reading_fails_endpoint();
    test_refused_write_flood_blocks_then_recovers();
    test_unpolled_completions_pause_receiving();
    test_out_of_memory_loses_no_completion();
    test_answers_overtake_reads_held_by_ord();
    test_ack_on_read_answer_keeps_completion_order();
    test_progress_lease();
    test_device_memory_refused_without_verbs();
    test_poster_posts_when_run_and_never_after_close();
    test_chan_send_prepare_from();
    test_chan_split_payloads();
    test_chan_split_payloads_of_some_microbatches();
    test_chan_sent_words();
    test_staged_link();
    test_staged_link_fails_under_a_released_transfer();
    test_staged_link_refuses_a_hostile_peer();
    if (failures) {
        fprintf(stderr, "%d check(s) failed\n", failures);
        return 1;
    }
    printf("native tests passed\n");
    return 0;
}
