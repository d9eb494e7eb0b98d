/* shm_ep.c - shared-memory endpoints (see shm.h): the rings, the doorbell,
 * connection set-up, and the transport's table. */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <linux/magic.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <sys/uio.h>
#include <unistd.h>

#include "shm.h"

_Static_assert((LM_SHM_RING_BYTES & (LM_SHM_RING_BYTES - 1)) == 0, "ring size is a power of two");
_Static_assert(sizeof(lm_shm_ring_hdr_t) <= LM_SHM_HEADER_BYTES, "ring header fits its page");

/* ---- host identity: same boot, same PID and IPC namespaces ------------------------ */

static int read_boot_id(uint8_t out[16])
{
    char text[64] = {0};
    int fd = open("/proc/sys/kernel/random/boot_id", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, text, sizeof(text) - 1);
    close(fd);
    int got = 0;
    for (ssize_t i = 0; i < n && got < 32; i++) {
        char c = text[i];
        int v = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
        if (v < 0)
            continue; /* the dashes */
        out[got / 2] = (uint8_t)(got % 2 ? out[got / 2] | v : v << 4);
        got++;
    }
    return got == 32 ? 0 : -1;
}

static uint64_t namespace_inode(const char *name)
{
    char path[64];
    snprintf(path, sizeof(path), "/proc/self/ns/%s", name);
    struct stat st;
    return stat(path, &st) == 0 ? (uint64_t)st.st_ino : 0;
}

static int fill_identity(lm_shm_addr_t *a)
{
    if (read_boot_id(a->boot_id) != 0)
        return lm_fail(LM_ERR_UNSUPPORTED, "shm: cannot read the boot id");
    a->pid_ns = namespace_inode("pid");
    a->ipc_ns = namespace_inode("ipc");
    if (!a->pid_ns || !a->ipc_ns)
        return lm_fail(LM_ERR_UNSUPPORTED, "shm: cannot read this process's namespaces");
    return LM_OK;
}

/* ---- transport interface ------------------------------------------------------------ */

static int iface_open(lm_context_t *ctx, const lm_context_params_t *params, void **out, char *why,
                      size_t why_len)
{
    (void)params;
    int probe = memfd_create("lamina-shm-probe", MFD_CLOEXEC);
    if (probe < 0) {
        snprintf(why, why_len, "shm: memfd_create: %s", strerror(errno));
        return LM_ERR_UNSUPPORTED;
    }
    close(probe);
    lm_shm_addr_t me;
    if (fill_identity(&me) != LM_OK) {
        snprintf(why, why_len, "%s", lm_last_error());
        return LM_ERR_UNSUPPORTED;
    }
    lm_shm_iface_t *iface = calloc(1, sizeof(*iface));
    if (!iface) {
        snprintf(why, why_len, "shm: out of memory");
        return LM_ERR_NO_MEMORY;
    }
    iface->tcp.ctx = ctx;
    iface->tcp.keepalive_ms = ctx->keepalive_ms;
    pthread_mutex_init(&iface->lock, NULL);
    *out = iface;
    return LM_OK;
}

static void iface_close(void *ptr)
{
    lm_shm_iface_t *iface = ptr;
    pthread_mutex_destroy(&iface->lock);
    free(iface->eps);
    free(iface);
}

static int iface_track(lm_shm_iface_t *iface, lm_tcp_ep_t *ep)
{
    pthread_mutex_lock(&iface->lock);
    if (iface->count == iface->cap) {
        size_t cap = iface->cap ? 2 * iface->cap : 16;
        lm_tcp_ep_t **grown = realloc(iface->eps, cap * sizeof(*grown));
        if (!grown) {
            pthread_mutex_unlock(&iface->lock);
            return lm_fail(LM_ERR_NO_MEMORY, "shm: no memory to track another endpoint");
        }
        iface->eps = grown;
        iface->cap = cap;
    }
    iface->eps[iface->count++] = ep;
    pthread_mutex_unlock(&iface->lock);
    return LM_OK;
}

static void iface_untrack(lm_shm_iface_t *iface, lm_tcp_ep_t *ep)
{
    pthread_mutex_lock(&iface->lock);
    for (size_t i = 0; i < iface->count; i++)
        if (iface->eps[i] == ep) {
            iface->eps[i] = iface->eps[--iface->count];
            break;
        }
    pthread_mutex_unlock(&iface->lock);
}

/* ---- the ring stream -------------------------------------------------------------- */

static void ring_doorbell(lm_tcp_ep_t *ep)
{
    static const uint8_t one = 1;
    /* A full socket buffer already holds a pending wake-up: EAGAIN is fine. */
    (void)!send(ep->fd, &one, 1, MSG_DONTWAIT | MSG_NOSIGNAL);
}

/* Bytes the producer has published and we have not consumed; false if the
 * peer's index is impossible (more than the ring holds, or going back). */
static bool ring_filled(const lm_shm_stream_t *s, uint64_t *filled)
{
    /* seq_cst (not acquire): the re-check after raising a doorbell flag must
     * be ordered after that store for both sides (the Dekker pattern). */
    uint64_t tail = atomic_load(&s->rx->tail);
    *filled = tail - s->rx_head;
    return *filled <= s->size;
}

static bool ring_room(const lm_shm_stream_t *s, uint64_t *room)
{
    uint64_t head = atomic_load(&s->tx->head); /* seq_cst: see ring_filled */
    uint64_t used = s->tx_tail - head;
    *room = s->size - used;
    return used <= s->size;
}

static ssize_t ring_send(lm_tcp_ep_t *ep, const struct iovec *iov, int n)
{
    lm_shm_stream_t *s = ep->io_priv;
    uint64_t room;
    if (!s->tx) {
        errno = ENOTCONN;
        return -1;
    }
    if (!ring_room(s, &room))
        goto corrupt;
    if (room == 0) {
        /* Ask for a doorbell, then look again: the consumer may have made room
         * before it saw the request (seq_cst store, then load: no lost wake-up). */
        atomic_store(&s->tx->producer_waiting, 1);
        if (!ring_room(s, &room))
            goto corrupt;
        if (room == 0) {
            errno = EAGAIN;
            return -1;
        }
        atomic_store(&s->tx->producer_waiting, 0);
    }
    uint64_t copied = 0, mask = s->size - 1;
    for (int i = 0; i < n && copied < room; i++) {
        uint64_t len = iov[i].iov_len < room - copied ? iov[i].iov_len : room - copied;
        const uint8_t *src = iov[i].iov_base;
        uint64_t at = (s->tx_tail + copied) & mask, first = len < s->size - at ? len : s->size - at;
        memcpy(s->tx_data + at, src, first);
        memcpy(s->tx_data, src + first, len - first);
        copied += len;
    }
    s->tx_tail += copied;
    atomic_store(&s->tx->tail, s->tx_tail);
    if (atomic_load(&s->tx->consumer_sleeping) && atomic_exchange(&s->tx->consumer_sleeping, 0))
        ring_doorbell(ep);
    return (ssize_t)copied;
corrupt:
    errno = EPROTO; /* the peer wrote an impossible index: the endpoint fails */
    return -1;
}

static ssize_t ring_recv(lm_tcp_ep_t *ep, void *buf, size_t len, bool *drained)
{
    lm_shm_stream_t *s = ep->io_priv;
    uint64_t filled;
    *drained = false;
    if (!ring_filled(s, &filled))
        goto corrupt;
    if (filled == 0) {
        if (atomic_load(&s->peer_gone))
            return 0; /* everything the peer wrote before it went is read: the end */
        /* Nothing to read. The doorbell is armed only by a thread about to
         * sleep (iface_arm, before epoll), so a polling consumer costs the
         * producer no syscall. */
        *drained = true;
        errno = EAGAIN;
        return -1;
    }
    if (atomic_load_explicit(&s->rx->consumer_sleeping, memory_order_relaxed))
        atomic_store(&s->rx->consumer_sleeping, 0); /* awake: no more doorbells needed */
    uint64_t n = len < filled ? len : filled, mask = s->size - 1;
    uint64_t at = s->rx_head & mask, first = n < s->size - at ? n : s->size - at;
    memcpy(buf, s->rx_data + at, first);
    memcpy((uint8_t *)buf + first, s->rx_data, n - first);
    atomic_store_explicit(&s->rx_head_shared, s->rx_head + n, memory_order_relaxed);
    s->rx_head += n;
    atomic_store(&s->rx->head, s->rx_head);
    if (atomic_load(&s->rx->producer_waiting) && atomic_exchange(&s->rx->producer_waiting, 0))
        ring_doorbell(ep);
    *drained = n == filled;
    if (*drained && atomic_load(&ep->base.ctx->progress.sleepers) > 0) {
        /* Another thread sleeps in epoll (two waiters, or a waiter and the
         * progress thread): it armed the doorbell before it slept, and this
         * read may have spent that. Arm it again for the next frame. */
        atomic_store(&s->rx->consumer_sleeping, 1);
        if (!ring_filled(s, &filled))
            goto corrupt;
        *drained = filled == 0;
    }
    return (ssize_t)n;
corrupt:
    errno = EPROTO;
    return -1;
}

static void ring_shutdown(lm_tcp_ep_t *ep)
{
    shutdown(ep->fd, SHUT_RDWR); /* the peer reads the end of its doorbell: it fails too */
}

static void unmap_ring(lm_shm_ring_hdr_t *hdr, uint64_t size)
{
    if (hdr)
        munmap(hdr, LM_SHM_HEADER_BYTES + size);
}

static void ring_release(lm_tcp_ep_t *ep)
{
    lm_shm_stream_t *s = ep->io_priv;
    if (!s)
        return;
    unmap_ring(s->rx, s->size);
    unmap_ring(s->tx, s->size);
    if (s->memfd >= 0)
        close(s->memfd);
    free(s);
    ep->io_priv = NULL;
}

/* Map a region the peer granted (MAP_RESP): its memfd through /proc, checked
 * to be the file it named (inode), at least as long as it said, and sealed
 * against shrinking (a shrunk file would fault our copies into it). */
static int map_peer_region(lm_tcp_ep_t *ep, int32_t fd, uint64_t ino, uint64_t length, uint8_t **addr)
{
    lm_shm_stream_t *s = ep->io_priv;
    if (fd < 0 || length == 0 || length > (1ull << 40))
        return LM_ERR_PROTOCOL;
    char path[64];
    snprintf(path, sizeof(path), "/proc/%u/fd/%d", s->peer_pid, fd);
    int file = open(path, O_RDWR | O_CLOEXEC);
    if (file < 0)
        return LM_ERR_ACCESS; /* e.g. deregistered meanwhile: the fd is gone */
    struct stat st;
    struct statfs fs;
    int seals = fcntl(file, F_GET_SEALS);
    int rc = LM_OK;
    /* tmpfs only: a hugetlb memfd passes every other check, and faults when its pool runs dry. */
    if (fstat(file, &st) != 0 || (uint64_t)st.st_ino != ino || (uint64_t)st.st_size < length ||
        seals < 0 || !(seals & F_SEAL_SHRINK) || fstatfs(file, &fs) != 0 || fs.f_type != TMPFS_MAGIC)
        rc = LM_ERR_ACCESS;
    void *mapped = MAP_FAILED;
    if (rc == LM_OK)
        mapped = mmap(NULL, length, PROT_READ | PROT_WRITE, MAP_SHARED, file, 0);
    close(file);
    if (rc != LM_OK || mapped == MAP_FAILED)
        return LM_ERR_ACCESS;
    *addr = mapped;
    return LM_OK;
}

static const lm_tcp_io_t ring_io = {
    .send = ring_send, .recv = ring_recv, .shutdown = ring_shutdown, .release = ring_release,
    .out_event = 0, /* "room again" comes as a doorbell (EPOLLIN) */
    .map_peer = map_peer_region,
    .transport = &lm_shm_transport,
};

/* Doorbell bytes carry no data: read them all; the socket's end (or an error)
 * means the peer is gone. */
static void drain_doorbell(lm_tcp_ep_t *ep)
{
    lm_shm_stream_t *s = ep->io_priv;
    uint8_t sink[256];
    for (;;) {
        ssize_t n = recv(ep->fd, sink, sizeof(sink), MSG_DONTWAIT);
        if (n > 0)
            continue;
        if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR))
            atomic_store(&s->peer_gone, true);
        if (n < 0 && errno == EINTR)
            continue;
        return;
    }
}

/* A thread waiting for completions spins here before it sleeps (and in
 * polling mode instead of sleeping): rings that hold frames are read at
 * once, without waiting for the doorbell to go through epoll. Called with
 * the dispatch lock held, like handlers. */
static int iface_poll(void *ptr)
{
    lm_shm_iface_t *iface = ptr;
    int got = 0;
    pthread_mutex_lock(&iface->lock);
    if (iface->count == 0) {
        pthread_mutex_unlock(&iface->lock);
        return -1; /* nothing to spin on */
    }
    for (size_t i = 0; i < iface->count; i++) {
        lm_tcp_ep_t *ep = iface->eps[i];
        lm_shm_stream_t *s = ep->io_priv;
        if (atomic_load_explicit(&ep->base.error, memory_order_relaxed) != 0)
            continue; /* failed: its handler has left the progress engine */
        uint64_t tail = atomic_load_explicit(&s->rx->tail, memory_order_relaxed);
        if (tail == s->rx_head)
            continue;
        pthread_mutex_lock(&ep->lock);
        bool receiving = ep->in_armed; /* paused (backlog, congested queue): not from here */
        pthread_mutex_unlock(&ep->lock);
        if (receiving) {
            lm_tcp_on_io(ep, EPOLLIN);
            got++;
        }
    }
    pthread_mutex_unlock(&iface->lock);
    return got;
}

/* About to sleep: ask every producer for a doorbell, then look once more
 * (seq_cst store, then load: a producer that published before seeing the
 * flag is seen here). */
static int iface_arm(void *ptr)
{
    lm_shm_iface_t *iface = ptr;
    int pending = 0;
    pthread_mutex_lock(&iface->lock);
    for (size_t i = 0; i < iface->count; i++) {
        lm_tcp_ep_t *ep = iface->eps[i];
        lm_shm_stream_t *s = ep->io_priv;
        atomic_store(&s->rx->consumer_sleeping, 1);
        uint64_t head = atomic_load_explicit(&s->rx_head_shared, memory_order_relaxed);
        if (atomic_load(&s->rx->tail) == head || atomic_load_explicit(&ep->base.error, memory_order_relaxed))
            continue;
        pthread_mutex_lock(&ep->lock);
        pending |= ep->in_armed; /* a paused receive side waits for its resume, not for us */
        pthread_mutex_unlock(&ep->lock);
    }
    pthread_mutex_unlock(&iface->lock);
    return pending;
}

static void shm_on_io(void *arg, uint32_t events)
{
    lm_tcp_ep_t *ep = arg;
    lm_shm_stream_t *s = ep->io_priv;
    if (events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
        drain_doorbell(ep);
        /* A doorbell: data for us, or room in the peer's ring. While our
         * receive side is paused (in_armed false) only the send side runs:
         * EPOLLIN stays watched for the room doorbell (lm_tcp_update_interest). */
        pthread_mutex_lock(&ep->lock);
        bool receiving = ep->in_armed;
        pthread_mutex_unlock(&ep->lock);
        events |= EPOLLOUT;
        if (receiving)
            events |= EPOLLIN;
        else
            events &= ~(uint32_t)EPOLLIN;
    }
    if (atomic_load(&s->peer_gone))
        events |= EPOLLHUP; /* read what is left, then fail the endpoint */
    lm_tcp_on_io(arg, events);
}

/* ---- endpoints ------------------------------------------------------------------- */

static int map_ring(int fd, uint64_t size, lm_shm_ring_hdr_t **hdr)
{
    void *p = mmap(NULL, LM_SHM_HEADER_BYTES + size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED)
        return lm_fail(LM_ERR_NO_MEMORY, "shm: mmap of a %llu-byte ring: %s", (unsigned long long)size,
                       strerror(errno));
    *hdr = p;
    return LM_OK;
}

static int ep_create(void *iface_ptr, uint64_t ep_id, int fd, lm_ep_t **out)
{
    lm_shm_stream_t *s = calloc(1, sizeof(*s));
    if (!s) {
        close(fd);
        return lm_fail(LM_ERR_NO_MEMORY, "shm: endpoint allocation failed");
    }
    s->size = LM_SHM_RING_BYTES;
    s->memfd = memfd_create("lamina-shm-ring", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    int rc = LM_OK;
    /* Sealed at its size: the peer opens it read-write, and a ring shrunk
     * under our mapping would turn our next access into SIGBUS. */
    if (s->memfd < 0 || ftruncate(s->memfd, (off_t)(LM_SHM_HEADER_BYTES + s->size)) != 0 ||
        fcntl(s->memfd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0)
        rc = lm_fail(LM_ERR_NO_MEMORY, "shm: cannot create a %llu-byte ring: %s", (unsigned long long)s->size,
                     strerror(errno));
    if (rc == LM_OK)
        rc = map_ring(s->memfd, s->size, &s->rx);
    if (rc == LM_OK && getrandom(s->nonce, sizeof(s->nonce), 0) != (ssize_t)sizeof(s->nonce))
        rc = lm_fail(LM_ERR_IO, "shm: getrandom: %s", strerror(errno));
    if (rc != LM_OK) {
        unmap_ring(s->rx, s->size);
        if (s->memfd >= 0)
            close(s->memfd);
        free(s);
        close(fd);
        return rc;
    }
    s->rx_data = (uint8_t *)s->rx + LM_SHM_HEADER_BYTES;
    s->rx->consumer_sleeping = 1; /* a sleeper that armed before this ring existed hears its first frame */
    s->rx->magic = LM_SHM_ADDR_MAGIC;
    s->rx->version = LM_SHM_ADDR_VERSION;
    s->rx->size = s->size;
    memcpy(s->rx->nonce, s->nonce, sizeof(s->nonce));
    /* Watched once connected: nothing can arrive before the peer maps our ring. */
    lm_tcp_ep_t *ep = NULL;
    rc = lm_tcp_ep_init(iface_ptr, ep_id, fd, &ring_io, s, shm_on_io, false, &ep);
    if (rc != LM_OK) {
        unmap_ring(s->rx, s->size);
        close(s->memfd);
        free(s);
        return rc;
    }
    *out = &ep->base;
    return LM_OK;
}

static int ep_address(lm_ep_t *base, void *buf, size_t *len)
{
    lm_tcp_ep_t *ep = (lm_tcp_ep_t *)base;
    lm_shm_stream_t *s = ep->io_priv;
    if (*len < sizeof(lm_shm_addr_t))
        return lm_fail(LM_ERR_INVALID, "shm: address buffer of %zu bytes, need %zu", *len, sizeof(lm_shm_addr_t));
    lm_shm_addr_t a = {.magic = LM_SHM_ADDR_MAGIC, .version = LM_SHM_ADDR_VERSION, .pid = (uint32_t)getpid(),
                       .fd = s->memfd, .ring_bytes = s->size};
    memcpy(a.nonce, s->nonce, sizeof(a.nonce));
    int rc = fill_identity(&a);
    if (rc != LM_OK)
        return rc;
    memcpy(buf, &a, sizeof(a));
    *len = sizeof(a);
    return LM_OK;
}

/* Tell the peer we mapped its ring and wait until it says the same. */
static int mapped_barrier(int fd)
{
    const uint8_t mine = LM_SHM_MAPPED_BYTE;
    if (send(fd, &mine, 1, MSG_NOSIGNAL) != 1)
        return lm_fail(LM_ERR_PEER_LOST, "shm: the peer left during set-up: %s", strerror(errno));
    struct pollfd p = {.fd = fd, .events = POLLIN};
    int ready;
    do
        ready = poll(&p, 1, LM_SHM_CONNECT_TIMEOUT_MS);
    while (ready < 0 && errno == EINTR);
    if (ready == 0)
        return lm_fail(LM_ERR_TIMEOUT, "shm: the peer did not map our ring within %d ms", LM_SHM_CONNECT_TIMEOUT_MS);
    uint8_t theirs = 0;
    ssize_t n = recv(fd, &theirs, 1, MSG_DONTWAIT);
    if (n != 1)
        return lm_fail(LM_ERR_PEER_LOST, "shm: the peer left during set-up");
    if (theirs != LM_SHM_MAPPED_BYTE)
        return lm_fail(LM_ERR_PROTOCOL, "shm: unexpected byte 0x%02x during set-up", theirs);
    return LM_OK;
}

static int ep_connect(lm_ep_t *base, const void *peer, size_t len, int ctrl_fd)
{
    (void)ctrl_fd; /* the bootstrap socket given at creation is the doorbell */
    lm_tcp_ep_t *ep = (lm_tcp_ep_t *)base;
    lm_shm_stream_t *s = ep->io_priv;
    lm_shm_addr_t a, me;
    if (s->tx)
        return lm_fail(LM_ERR_INVALID, "shm: endpoint already connected");
    if (!peer || len != sizeof(a))
        return lm_fail(LM_ERR_PROTOCOL, "shm: peer address of %zu bytes, expected %zu", len, sizeof(a));
    memcpy(&a, peer, sizeof(a));
    if (a.magic != LM_SHM_ADDR_MAGIC || a.version != LM_SHM_ADDR_VERSION || a.ring_bytes != s->size)
        return lm_fail(LM_ERR_PROTOCOL, "shm: not a version %d shm address (or another ring size)",
                       LM_SHM_ADDR_VERSION);
    int rc = fill_identity(&me);
    if (rc != LM_OK)
        return rc;
    if (memcmp(a.boot_id, me.boot_id, sizeof(me.boot_id)) != 0)
        return lm_fail(LM_ERR_UNSUPPORTED, "shm: the peer runs on another host (boot id differs)");
    if (a.pid_ns != me.pid_ns || a.ipc_ns != me.ipc_ns)
        return lm_fail(LM_ERR_UNSUPPORTED, "shm: the peer is in another PID or IPC namespace");
    char path[64];
    snprintf(path, sizeof(path), "/proc/%u/fd/%d", a.pid, a.fd);
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0)
        return lm_fail(LM_ERR_UNSUPPORTED, "shm: cannot open the peer's ring (%s): %s", path, strerror(errno));
    struct stat st;
    lm_shm_ring_hdr_t *tx = NULL;
    int seals = fcntl(fd, F_GET_SEALS);
    if (fstat(fd, &st) != 0 || (uint64_t)st.st_size != LM_SHM_HEADER_BYTES + s->size)
        rc = lm_fail(LM_ERR_PROTOCOL, "shm: %s is not a ring of %llu bytes", path, (unsigned long long)s->size);
    else if (seals < 0 || !(seals & F_SEAL_SHRINK))
        rc = lm_fail(LM_ERR_PROTOCOL, "shm: %s is not sealed against shrinking", path);
    if (rc == LM_OK)
        rc = map_ring(fd, s->size, &tx);
    close(fd); /* the mapping keeps the memory */
    if (rc != LM_OK)
        return rc;
    if (tx->magic != LM_SHM_ADDR_MAGIC || memcmp(tx->nonce, a.nonce, sizeof(a.nonce)) != 0) {
        unmap_ring(tx, s->size);
        return lm_fail(LM_ERR_PROTOCOL, "shm: %s is not the ring the peer named (nonce differs)", path);
    }
    /* Neither side may let go of its ring before the other has mapped it (a
     * side that refuses the connection right after set-up closes its memfd). */
    rc = mapped_barrier(ep->fd);
    if (rc != LM_OK) {
        unmap_ring(tx, s->size);
        return rc;
    }
    pthread_mutex_lock(&ep->lock);
    s->peer_pid = a.pid;
    s->tx = tx;
    s->tx_data = (uint8_t *)tx + LM_SHM_HEADER_BYTES;
    /* Frames may wait in our ring already: the peer connected first. */
    s->tx_tail = 0;
    pthread_mutex_unlock(&ep->lock);
    rc = lm_tcp_ep_watch(ep);
    if (rc == LM_OK)
        rc = iface_track((lm_shm_iface_t *)ep->iface, ep);
    if (rc == LM_OK)
        lm_progress_rerun(ep->base.ctx, &ep->handler);
    return rc;
}

/* Posting before lm_ep_connect is a usage error (as on verbs), not a
 * failure of the endpoint. */
static int require_connected(lm_ep_t *base)
{
    lm_tcp_ep_t *ep = (lm_tcp_ep_t *)base;
    pthread_mutex_lock(&ep->lock);
    bool connected = ((lm_shm_stream_t *)ep->io_priv)->tx != NULL;
    pthread_mutex_unlock(&ep->lock);
    return connected ? LM_OK : lm_fail(LM_ERR_INVALID, "shm endpoint is not connected yet (lm_ep_connect)");
}

static int ep_write(lm_ep_t *ep, lm_mr_t *local, uint64_t local_off, uint64_t length, const lm_rdesc_t *remote,
                    uint64_t remote_off, uint32_t imm, uint32_t flags, uint64_t wr_id)
{
    int rc = require_connected(ep);
    return rc != LM_OK ? rc : lm_tcp_ep_write(ep, local, local_off, length, remote, remote_off, imm, flags, wr_id);
}

static int ep_writev(lm_ep_t *ep, lm_mr_t *local, lm_seg_t *segs, uint32_t nsegs, uint64_t length,
                     const lm_rdesc_t *remote, uint64_t remote_off, uint32_t imm, uint32_t flags, uint64_t wr_id)
{
    int rc = require_connected(ep);
    if (rc != LM_OK) {
        free(segs); /* the list is ours from the call on (transport.h) */
        return rc;
    }
    return lm_tcp_ep_writev(ep, local, segs, nsegs, length, remote, remote_off, imm, flags, wr_id);
}

static int ep_read(lm_ep_t *ep, lm_mr_t *local, uint64_t local_off, uint64_t length, const lm_rdesc_t *remote,
                   uint64_t remote_off, uint64_t wr_id)
{
    int rc = require_connected(ep);
    return rc != LM_OK ? rc : lm_tcp_ep_read(ep, local, local_off, length, remote, remote_off, wr_id);
}

static void ep_destroy(lm_ep_t *base)
{
    lm_tcp_ep_t *ep = (lm_tcp_ep_t *)base;
    iface_untrack((lm_shm_iface_t *)ep->iface, ep); /* no poll reaches it from here on */
    lm_tcp_ep_destroy(base);
}

const lm_transport_ops_t lm_shm_transport = {
    .name = "shm",
    .id = LM_TRANSPORT_SHM,
    .caps = LM_CAP_REMOTE_ACK,
    .iface_open = iface_open,
    .iface_close = iface_close,
    .iface_poll = iface_poll,
    .iface_arm = iface_arm,
    .ep_create = ep_create,
    .ep_address = ep_address,
    .ep_connect = ep_connect,
    .ep_write = ep_write,
    .ep_writev = ep_writev,
    .ep_read = ep_read,
    .ep_destroy = ep_destroy,
};
