/*
 * test_native.c - C-level tests of the core and the tcp transport, built
 * plain and with ASan/UBSan (make asan). Two contexts in one process are
 * joined by a socketpair, so the tests need no network set-up.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "lamina.h"

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

int main(void)
{
    test_bad_arguments();
    test_write_with_imm_lands_in_place();
    test_refusals_leave_target_untouched();
    test_read();
    test_peer_loss_flushes_outstanding();
    test_deregister_with_writes_in_flight();
    test_garbage_closes_only_that_endpoint();
    if (failures) {
        fprintf(stderr, "%d check(s) failed\n", failures);
        return 1;
    }
    printf("native tests passed\n");
    return 0;
}
