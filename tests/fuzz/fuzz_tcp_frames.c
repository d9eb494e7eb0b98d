/*
 * fuzz_tcp_frames.c - libFuzzer harness for the tcp transport's frame parser
 * (native/src/tcp/tcp_rx.c): the input is what a hostile peer sends down one
 * endpoint's socket.
 *
 * One context for the whole run; per input a socketpair with a tcp endpoint
 * on one end, the input fed into the other while its answers are drained,
 * then EOF. The endpoint must end failed (PEER_LOST at EOF, PROTOCOL on bad
 * frames), never hang, and a region without remote write access must never
 * change.
 *
 * Input: byte 0 picks the mode. Odd: the rest is sent raw. Even: the rest is
 * a list of records, each a control byte and a 56-byte header (short ones
 * zero-padded), followed by its payload bytes for WRITE / READ_RESP; the
 * control byte lets the fuzzer reach deep states by fixing up fields:
 *   bit 0 magic, bit 1 the next expected sequence number, bits 2-3 the key
 *   (0 as given, 1 the writable region, 2 the read-only one, 3 as given),
 *   bit 4 offset and length folded into the region.
 * With byte 0 bit 1 set the endpoint also posts a write and a read first, so
 * ACK / NACK / READ_RESP frames can answer something.
 */
#include <errno.h>
#include <poll.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "lamina.h"
#include "../../native/src/tcp/tcp_wire.h"

enum { REGION = 4096, HANG_GUARD_MS = 10000 };

static lm_context_t *ctx;
static uint8_t writable[REGION], readonly[REGION], local[REGION];
static lm_mr_t *mr_w, *mr_ro, *mr_local;
static lm_rdesc_t desc_w, desc_ro;

static void setup_once(void)
{
    lm_context_params_t params = {.field_mask = LM_CTX_PARAM_TRANSPORTS, .transports = LM_TRANSPORT_TCP};
    if (lm_context_create(&params, &ctx) != LM_OK)
        abort();
    for (int i = 0; i < REGION; i++)
        readonly[i] = (uint8_t)(i * 31 + 7);
    if (lm_mr_register(ctx, writable, REGION, LM_ACCESS_REMOTE_WRITE | LM_ACCESS_REMOTE_READ, &mr_w) ||
        lm_mr_register(ctx, readonly, REGION, LM_ACCESS_REMOTE_READ, &mr_ro) ||
        lm_mr_register(ctx, local, REGION, LM_ACCESS_LOCAL_WRITE, &mr_local))
        abort();
    lm_mr_descriptor(mr_w, &desc_w);
    lm_mr_descriptor(mr_ro, &desc_ro);
}

/* ---- turning the input into a byte stream ------------------------------ */

typedef struct stream {
    uint8_t *buf;
    size_t len, cap;
} stream_t;

static void put(stream_t *s, const void *p, size_t n)
{
    if (n == 0)
        return; /* an empty input leaves buf NULL: no pointer arithmetic on it */
    if (s->len + n > s->cap) {
        s->cap = (s->len + n) * 2;
        s->buf = realloc(s->buf, s->cap);
        if (!s->buf)
            abort();
    }
    memcpy(s->buf + s->len, p, n);
    s->len += n;
}

static void fix_header(lm_tcp_hdr_t *h, uint8_t ctl, uint64_t *next_seq)
{
    if (ctl & 1)
        h->magic = LM_TCP_MAGIC;
    bool sequenced = h->type == LM_TCP_WRITE || h->type == LM_TCP_READ_REQ || h->type == LM_TCP_NOP;
    if ((ctl & 2) && sequenced)
        h->seq = (*next_seq)++;
    switch ((ctl >> 2) & 3) {
    case 1: h->key = desc_w.key; break;
    case 2: h->key = desc_ro.key; break;
    default: break;
    }
    if (ctl & 16) {
        h->offset %= REGION;
        h->length %= REGION + 1;
    }
}

static void build_structured(stream_t *s, const uint8_t *data, size_t size)
{
    uint64_t next_seq = 0;
    while (size > 0) {
        uint8_t ctl = data[0];
        data++, size--;
        lm_tcp_hdr_t h;
        memset(&h, 0, sizeof(h));
        size_t n = size < sizeof(h) ? size : sizeof(h);
        memcpy(&h, data, n);
        data += n, size -= n;
        fix_header(&h, ctl, &next_seq);
        put(s, &h, sizeof(h));
        if (h.type == LM_TCP_WRITE || h.type == LM_TCP_READ_RESP) {
            size_t p = h.length < size ? (size_t)h.length : size;
            put(s, data, p);
            data += p, size -= p;
        }
    }
}

/* ---- driving one endpoint ----------------------------------------------- */

static void drain_cq(void)
{
    lm_completion_t c[64];
    while (lm_cq_poll(ctx, c, 64) > 0) {
    }
}

/* Feed the stream while reading (and dropping) the endpoint's answers, then
 * EOF, then wait for the endpoint to fail. */
static void feed(int fd, lm_ep_t *ep, const uint8_t *buf, size_t len)
{
    static uint8_t sink[1 << 16];
    size_t off = 0;
    bool eof_sent = false;
    for (int waited = 0; lm_ep_error(ep) == 0;) {
        if (off == len && !eof_sent) {
            shutdown(fd, SHUT_WR);
            eof_sent = true;
        }
        struct pollfd pfd = {.fd = fd, .events = POLLIN | (off < len ? POLLOUT : 0)};
        int r = poll(&pfd, 1, 10);
        waited = r == 0 ? waited + 10 : 0;
        if (waited > HANG_GUARD_MS) {
            fprintf(stderr, "fuzz_tcp_frames: endpoint neither failed nor read the input (hang)\n");
            abort();
        }
        if (pfd.revents & POLLIN)
            (void)!recv(fd, sink, sizeof(sink), MSG_DONTWAIT);
        if ((pfd.revents & POLLOUT) && off < len) { /* off < len: buf is not NULL */
            ssize_t n = send(fd, buf + off, len - off, MSG_DONTWAIT | MSG_NOSIGNAL);
            if (n > 0)
                off += (size_t)n;
            else if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK)
                off = len; /* the endpoint shut its side: stop sending */
        }
        drain_cq();
    }
}

static void post_own_operations(lm_ep_t *ep)
{
    lm_rdesc_t any = desc_w; /* the peer's "region": any key the input answers for */
    (void)lm_ep_write(ep, mr_local, 0, 64, &any, 0, 1, LM_WRITE_IMM, 1);
    (void)lm_ep_read(ep, mr_local, 64, 64, &any, 0, 2);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!ctx)
        setup_once();
    if (size == 0)
        return 0;
    stream_t s = {0};
    if (data[0] & 1)
        put(&s, data + 1, size - 1);
    else
        build_structured(&s, data + 1, size - 1);
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0)
        abort();
    lm_ep_t *ep;
    if (lm_ep_create_tcp(ctx, sv[1], 1, &ep) != LM_OK)
        abort();
    if (data[0] & 2)
        post_own_operations(ep);
    feed(sv[0], ep, s.buf, s.len);
    lm_ep_destroy(ep);
    close(sv[0]);
    drain_cq();
    free(s.buf);
    for (int i = 0; i < REGION; i++)
        if (readonly[i] != (uint8_t)(i * 31 + 7)) {
            fprintf(stderr, "fuzz_tcp_frames: a region without remote write access changed\n");
            abort();
        }
    return 0;
}
