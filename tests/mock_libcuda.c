/* A stand-in libcuda for exercising the ctypes layer without a GPU: "device" memory is host
 * memory, every async operation runs at once, events are always complete, stream waits are
 * recorded but never block. Failures on demand (environment, read at each call):
 * MOCK_CUDA_HOSTFN_FAIL (cuLaunchHostFunc refuses), MOCK_CUDA_SYNC_FAIL (cuStreamSynchronize
 * reports a failed stream), MOCK_CUDA_CAPTURING (every stream is capturing). */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <stdio.h>
#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>
#include <time.h>
typedef int CUresult;
typedef unsigned long long CUdeviceptr;
#define MAXA 4096
static struct { uintptr_t p; size_t n; int host; } allocs[MAXA];
static int nallocs;
static __thread void *cur;
static int ctx_token;
static unsigned waits;
static void track(void *p, size_t n, int host) { if (nallocs < MAXA) { allocs[nallocs].p = (uintptr_t)p; allocs[nallocs].n = n; allocs[nallocs++].host = host; } }
static void untrack(uintptr_t p) { for (int i = 0; i < nallocs; i++) if (allocs[i].p == p) { allocs[i] = allocs[--nallocs]; return; } }
CUresult cuInit(unsigned f) { (void)f; return 0; }
CUresult cuDriverGetVersion(int *v) { *v = 12080; return 0; }
CUresult cuGetErrorString(CUresult e, const char **s) { *s = e == 1 ? "invalid argument" : "mock error"; return 0; }
CUresult cuGetErrorName(CUresult e, const char **s) { *s = e == 1 ? "CUDA_ERROR_INVALID_VALUE" : "CUDA_ERROR_UNKNOWN"; return 0; }
CUresult cuDeviceGetCount(int *n) { *n = 1; return 0; }
CUresult cuDeviceGet(int *d, int o) { if (o) return 101; *d = 0; return 0; }
CUresult cuDeviceGetName(char *b, int n, int d) { (void)d; snprintf(b, n, "Mock GPU"); return 0; }
/* MOCK_CUDA_DMABUF=1: the "GPU" offers dma-buf export (attribute 124), as an H100 does;
 * MOCK_CUDA_GPUDIRECT=1: GPUDirect RDMA (attribute 116, the peermem path). */
CUresult cuDeviceGetAttribute(int *v, int a, int d)
{
    (void)d;
    *v = a == 75 ? 9 : a == 124 ? getenv("MOCK_CUDA_DMABUF") != NULL : a == 116 ? getenv("MOCK_CUDA_GPUDIRECT") != NULL : 0;
    return 0;
}
CUresult cuDevicePrimaryCtxRetain(void **c, int d) { (void)d; *c = &ctx_token; return 0; }
CUresult cuCtxGetCurrent(void **c) { *c = cur; return 0; }
CUresult cuCtxSetCurrent(void *c) { cur = c; return 0; }
static __thread void *stack[16]; static __thread int depth;
CUresult cuCtxPushCurrent_v2(void *c) { stack[depth++] = cur; cur = c; return 0; }
CUresult cuCtxPopCurrent_v2(void **c) { if (c) *c = cur; cur = stack[--depth]; return 0; }
static int need_ctx(void) { return cur == &ctx_token ? 0 : 201; }
CUresult cuStreamCreate(void **s, unsigned f) { (void)f; if (need_ctx()) return 201; *s = malloc(1); return 0; }
CUresult cuStreamDestroy_v2(void *s) { free(s); return 0; }
static void drain_host_funcs(void);
CUresult cuStreamSynchronize(void *s) { (void)s; drain_host_funcs(); return getenv("MOCK_CUDA_SYNC_FAIL") ? 700 : need_ctx(); }
CUresult cuStreamWaitEvent(void *s, void *e, unsigned f) { (void)s; (void)e; (void)f; return need_ctx(); }
CUresult cuStreamIsCapturing(void *s, int *st) { (void)s; *st = getenv("MOCK_CUDA_CAPTURING") != NULL; return 0; }
/* An event holds the time it was recorded (the mock's work is done at once): elapsed times are real,
 * and refused as the driver refuses them (CUDA_ERROR_INVALID_HANDLE) for an event made with
 * CU_EVENT_DISABLE_TIMING (2) or never recorded. */
struct mock_event { struct timespec at; unsigned flags; int recorded; };
CUresult cuEventCreate(void **e, unsigned f)
{
    if (need_ctx()) return 201;
    struct mock_event *ev = calloc(1, sizeof(*ev));
    ev->flags = f;
    *e = ev;
    return 0;
}
CUresult cuEventDestroy_v2(void *e) { free(e); return 0; }
CUresult cuEventRecord(void *e, void *s)
{
    (void)s;
    struct mock_event *ev = e;
    clock_gettime(CLOCK_MONOTONIC, &ev->at);
    ev->recorded = 1;
    return need_ctx();
}
CUresult cuEventElapsedTime(float *ms, void *a, void *b)
{
    const struct mock_event *x = a, *y = b;
    if ((x->flags | y->flags) & 2 || !x->recorded || !y->recorded) return 400;
    *ms = (float)((double)(y->at.tv_sec - x->at.tv_sec) * 1e3 + (double)(y->at.tv_nsec - x->at.tv_nsec) / 1e6);
    return 0;
}
CUresult cuEventQuery(void *e) { (void)e; return 0; }
CUresult cuEventSynchronize(void *e) { (void)e; return need_ctx(); }
CUresult cuMemAlloc_v2(CUdeviceptr *p, size_t n) { if (need_ctx()) return 201; void *m = malloc(n); track(m, n, 0); *p = (uintptr_t)m; return 0; }
CUresult cuMemFree_v2(CUdeviceptr p) { for (int i = 0; i < nallocs; i++) if (allocs[i].p == p && !allocs[i].host) { untrack(p); free((void *)(uintptr_t)p); return 0; } return 1; }
CUresult cuMemHostAlloc(void **p, size_t n, unsigned f) { (void)f; if (need_ctx()) return 201; *p = calloc(1, n); track(*p, n, 1); return 0; }
CUresult cuMemFreeHost(void *p) { untrack((uintptr_t)p); free(p); return 0; }
CUresult cuMemHostGetDevicePointer_v2(CUdeviceptr *d, void *p, unsigned f) { (void)f; *d = (uintptr_t)p; return 0; }
CUresult cuMemcpyDtoHAsync_v2(void *h, CUdeviceptr d, size_t n, void *s) { (void)s; if (need_ctx()) return 201; memcpy(h, (void *)(uintptr_t)d, n); return 0; }
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr d, const void *h, size_t n, void *s) { (void)s; if (need_ctx()) return 201; memcpy((void *)(uintptr_t)d, h, n); return 0; }
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr d, CUdeviceptr x, size_t n, void *s) { (void)s; memcpy((void *)(uintptr_t)d, (void *)(uintptr_t)x, n); return 0; }
CUresult cuMemsetD8Async(CUdeviceptr d, unsigned char v, size_t n, void *s) { (void)s; memset((void *)(uintptr_t)d, v, n); return 0; }
static CUdeviceptr last_wait_addr;
static uint32_t last_wait_value;
CUresult cuStreamWaitValue32_v2(void *s, CUdeviceptr a, uint32_t v, unsigned f)
{
    (void)s; (void)f;
    waits++;
    last_wait_addr = a;
    last_wait_value = v;
    return need_ctx();
}
/* The address and value of the last stream wait queued (the mock does not wait). */
void mock_last_wait(CUdeviceptr *a, uint32_t *v) { *a = last_wait_addr; *v = last_wait_value; }
CUresult cuStreamWriteValue32_v2(void *s, CUdeviceptr a, uint32_t v, unsigned f) { (void)s; (void)f; *(volatile uint32_t *)(uintptr_t)a = v; return need_ctx(); }
unsigned mock_waits(void) { return waits; }
CUresult cuPointerGetAttribute(void *out, int attr, CUdeviceptr p) {
    for (int i = 0; i < nallocs; i++)
        if (p >= allocs[i].p && p < allocs[i].p + allocs[i].n) {
            switch (attr) {
            case 2: *(unsigned *)out = allocs[i].host ? 1 : 2; return 0;
            case 9: *(int *)out = 0; return 0;
            case 8: *(unsigned *)out = 0; return 0;
            case 11: *(CUdeviceptr *)out = allocs[i].p; return 0;
            case 12: *(size_t *)out = allocs[i].n; return 0;
            default: return 1;
            }
        }
    return 1;
}
/* A dma-buf stand-in: a memfd of the range's size (a verbs provider without dma-buf support refuses any fd). */
CUresult cuMemGetHandleForAddressRange(void *handle, CUdeviceptr p, size_t n, int type, unsigned long long flags) {
    (void)p; (void)type; (void)flags;
    int fd = memfd_create("mock-dmabuf", MFD_CLOEXEC);
    if (fd < 0 || ftruncate(fd, (off_t)n) != 0) return 1;
    *(int *)handle = fd;
    return 0;
}
CUresult cuMemHostRegister_v2(void *p, size_t n, unsigned f) { (void)f; if (need_ctx()) return 201; track(p, n, 1); return 0; }
CUresult cuMemHostUnregister(void *p) { untrack((uintptr_t)p); return 0; }

/* Host functions: run at once, or (MOCK_CUDA_HOSTFN_THREAD=1) in order on a thread of their own, as the
 * driver runs them: the caller has long returned when they run. */
typedef void (*hostfn_t)(void *);
#define MAXQ 4096
static struct { hostfn_t fn; void *arg; } queue[MAXQ];
static unsigned q_head, q_tail, q_running;
static pthread_mutex_t q_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t q_cond = PTHREAD_COND_INITIALIZER;
static pthread_t q_thread;
static int q_started;
static unsigned hostfns_run;
static int q_held; /* mock_hold_hostfns(1): the queued ones wait, as behind a stream still busy */
static void *hostfn_thread(void *unused) {
    (void)unused;
    pthread_mutex_lock(&q_lock);
    for (;;) {
        while (q_head == q_tail || q_held) pthread_cond_wait(&q_cond, &q_lock);
        hostfn_t fn = queue[q_head % MAXQ].fn; void *arg = queue[q_head % MAXQ].arg;
        q_running = 1;
        pthread_mutex_unlock(&q_lock);
        usleep(200); /* the stream's copies "take time" */
        fn(arg);
        pthread_mutex_lock(&q_lock);
        q_running = 0;
        q_head++;
        hostfns_run++;
        pthread_cond_broadcast(&q_cond);
    }
    return NULL;
}
static void drain_host_funcs(void) {
    pthread_mutex_lock(&q_lock);
    while (q_head != q_tail || q_running) pthread_cond_wait(&q_cond, &q_lock);
    pthread_mutex_unlock(&q_lock);
}
CUresult cuLaunchHostFunc(void *s, hostfn_t fn, void *arg) {
    (void)s;
    if (need_ctx()) return 201;
    if (getenv("MOCK_CUDA_HOSTFN_FAIL")) return 999;
    if (!getenv("MOCK_CUDA_HOSTFN_THREAD")) { fn(arg); __atomic_add_fetch(&hostfns_run, 1, __ATOMIC_SEQ_CST); return 0; }
    pthread_mutex_lock(&q_lock);
    if (!q_started) { pthread_create(&q_thread, NULL, hostfn_thread, NULL); q_started = 1; }
    if (q_tail - q_head == MAXQ) { pthread_mutex_unlock(&q_lock); return 2; }
    queue[q_tail % MAXQ].fn = fn; queue[q_tail % MAXQ].arg = arg; q_tail++;
    pthread_cond_broadcast(&q_cond);
    pthread_mutex_unlock(&q_lock);
    return 0;
}
unsigned mock_hostfns_run(void) { drain_host_funcs(); return hostfns_run; }
void mock_hold_hostfns(int hold)
{
    pthread_mutex_lock(&q_lock);
    q_held = hold;
    pthread_cond_broadcast(&q_cond);
    pthread_mutex_unlock(&q_lock);
}
/* A stream with host functions still to run is busy (CUDA_ERROR_NOT_READY), as the driver says. */
CUresult cuStreamQuery(void *s)
{
    (void)s;
    pthread_mutex_lock(&q_lock);
    int busy = q_head != q_tail || q_running;
    pthread_mutex_unlock(&q_lock);
    return busy ? 600 : need_ctx();
}
typedef struct {
    size_t srcXInBytes, srcY; int srcMemoryType; const void *srcHost; CUdeviceptr srcDevice; void *srcArray; size_t srcPitch;
    size_t dstXInBytes, dstY; int dstMemoryType; void *dstHost; CUdeviceptr dstDevice; void *dstArray; size_t dstPitch;
    size_t WidthInBytes, Height;
} CUDA_MEMCPY2D;
CUresult cuMemcpy2DAsync_v2(const CUDA_MEMCPY2D *p, void *s) {
    (void)s;
    if (need_ctx()) return 201;
    const char *src = p->srcMemoryType == 1 ? p->srcHost : (const char *)(uintptr_t)p->srcDevice;
    char *dst = p->dstMemoryType == 1 ? p->dstHost : (char *)(uintptr_t)p->dstDevice;
    if (p->WidthInBytes > p->srcPitch || p->WidthInBytes > p->dstPitch) return 1;
    for (size_t r = 0; r < p->Height; r++)
        memcpy(dst + p->dstXInBytes + (p->dstY + r) * p->dstPitch, src + p->srcXInBytes + (p->srcY + r) * p->srcPitch,
               p->WidthInBytes);
    return 0;
}
