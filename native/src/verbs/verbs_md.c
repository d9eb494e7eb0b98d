/* verbs_md.c - the memory domain: which device, port and GID a context uses,
 * its protection domain, and registering regions with the device. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "verbs.h"

/* ---- device and port ------------------------------------------------------ */

static const char *wanted_device(const lm_context_params_t *params)
{
    if ((params->field_mask & LM_CTX_PARAM_IB_DEVICE) && params->ib_device && params->ib_device[0])
        return params->ib_device;
    const char *env = getenv("LAMINA_IB_DEVICE");
    return env && env[0] ? env : NULL;
}

static uint8_t first_active_port(struct ibv_context *dev, const struct ibv_device_attr *attr,
                                 struct ibv_port_attr *out)
{
    for (unsigned p = 1; p <= attr->phys_port_cnt; p++)
        if (ibv_query_port(dev, (uint8_t)p, out) == 0 && out->state == IBV_PORT_ACTIVE)
            return (uint8_t)p;
    return 0;
}

static void append_name(char *list, size_t size, const char *name)
{
    size_t used = strlen(list);
    snprintf(list + used, size - used, "%s%s", used ? ", " : "", name);
}

/* Open the named device, or the first one with an ACTIVE port. */
static int open_device(lm_verbs_iface_t *iface, const char *name, struct ibv_port_attr *port,
                       char *why, size_t why_len)
{
    int n = 0;
    struct ibv_device **list = ibv_get_device_list(&n);
    if (!list || n == 0) {
        snprintf(why, why_len, "verbs: no RDMA device found (ibv_get_device_list returned 0 devices)");
        if (list)
            ibv_free_device_list(list);
        return LM_ERR_UNSUPPORTED;
    }
    char seen[160] = "";
    char problem[160] = "";
    for (int i = 0; i < n && !iface->dev; i++) {
        const char *dev_name = ibv_get_device_name(list[i]);
        append_name(seen, sizeof(seen), dev_name);
        if (name && strcmp(name, dev_name) != 0)
            continue;
        struct ibv_context *dev = ibv_open_device(list[i]);
        if (!dev) {
            snprintf(problem, sizeof(problem), "cannot open %s: %s", dev_name, strerror(errno));
            continue;
        }
        if (ibv_query_device(dev, &iface->dev_attr) == 0 &&
            (iface->port = first_active_port(dev, &iface->dev_attr, port)) != 0) {
            iface->dev = dev;
            snprintf(iface->dev_name, sizeof(iface->dev_name), "%s", dev_name);
        } else {
            snprintf(problem, sizeof(problem), "%s has no ACTIVE port", dev_name);
            ibv_close_device(dev);
        }
    }
    ibv_free_device_list(list);
    if (iface->dev)
        return LM_OK;
    if (name && !problem[0])
        snprintf(why, why_len, "verbs: device '%s' not found (devices: %s)", name, seen);
    else if (name)
        snprintf(why, why_len, "verbs: %s", problem);
    else
        snprintf(why, why_len, "verbs: no RDMA device has an ACTIVE port (devices: %s%s%s)", seen,
                 problem[0] ? "; last problem: " : "", problem);
    return LM_ERR_UNSUPPORTED;
}

/* ---- GID ------------------------------------------------------------------ */

static bool is_ipv4_mapped(const union ibv_gid *gid)
{
    static const uint8_t prefix[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    return memcmp(gid->raw, prefix, sizeof(prefix)) == 0;
}

/* RoCE: the first RoCE v2 GID with an IPv4 address (routable, and what rxe
 * and most RoCE set-ups use), else the first RoCE v2 GID, else index 0. */
static int default_roce_gid(const lm_verbs_iface_t *iface, int table_len)
{
    int first_v2 = -1;
    for (int i = 0; i < table_len; i++) {
        struct ibv_gid_entry entry;
        if (ibv_query_gid_ex(iface->dev, iface->port, (uint32_t)i, &entry, 0) != 0 ||
            entry.gid_type != IBV_GID_TYPE_ROCE_V2)
            continue;
        if (is_ipv4_mapped(&entry.gid))
            return i;
        if (first_v2 < 0)
            first_v2 = i;
    }
    return first_v2 >= 0 ? first_v2 : 0;
}

/* The index asked for: params, else LAMINA_IB_GID_INDEX; -1 when neither. */
static int requested_gid_index(const lm_context_params_t *params, char *why, size_t why_len)
{
    if (params->field_mask & LM_CTX_PARAM_GID_INDEX)
        return params->gid_index;
    const char *env = getenv("LAMINA_IB_GID_INDEX");
    if (!env || !env[0])
        return -1;
    char *end;
    long v = strtol(env, &end, 10);
    if (*end != '\0' || v < 0 || v > 0xffff) {
        snprintf(why, why_len, "verbs: LAMINA_IB_GID_INDEX=%s is not a GID index", env);
        return -2;
    }
    return (int)v;
}

static int choose_gid(lm_verbs_iface_t *iface, const lm_context_params_t *params, int table_len,
                      char *why, size_t why_len)
{
    int index = requested_gid_index(params, why, why_len);
    if (index == -2)
        return LM_ERR_INVALID;
    if (index < 0)
        index = iface->link_layer == IBV_LINK_LAYER_ETHERNET ? default_roce_gid(iface, table_len) : 0;
    static const union ibv_gid zero;
    if (index >= table_len || ibv_query_gid(iface->dev, iface->port, index, &iface->gid) != 0 ||
        (iface->link_layer == IBV_LINK_LAYER_ETHERNET && memcmp(&iface->gid, &zero, sizeof(zero)) == 0)) {
        snprintf(why, why_len, "verbs: GID index %d on %s port %u is empty or invalid (table has %d entries)",
                 index, iface->dev_name, iface->port, table_len);
        return LM_ERR_INVALID;
    }
    iface->gid_index = index;
    return LM_OK;
}

/* ---- open / close ------------------------------------------------------------ */

int lm_verbs_md_open(lm_verbs_iface_t *iface, const lm_context_params_t *params, char *why,
                     size_t why_len)
{
    struct ibv_port_attr port;
    int rc = open_device(iface, wanted_device(params), &port, why, why_len);
    if (rc != LM_OK)
        return rc;
    iface->link_layer = port.link_layer;
    iface->lid = port.lid;
    iface->active_mtu = port.active_mtu;
    /* sge.length is 32 bits; stay well inside it whatever the port says. */
    iface->max_chunk = port.max_msg_sz && port.max_msg_sz < (1u << 31) ? port.max_msg_sz : (1u << 31);
    rc = choose_gid(iface, params, port.gid_tbl_len, why, why_len);
    if (rc == LM_OK && !(iface->pd = ibv_alloc_pd(iface->dev))) {
        snprintf(why, why_len, "verbs: ibv_alloc_pd on %s: %s", iface->dev_name, strerror(errno));
        rc = LM_ERR_IO;
    }
    if (rc != LM_OK) {
        ibv_close_device(iface->dev);
        iface->dev = NULL;
    }
    return rc;
}

void lm_verbs_md_close(lm_verbs_iface_t *iface)
{
    if (iface->pd)
        ibv_dealloc_pd(iface->pd);
    if (iface->dev)
        ibv_close_device(iface->dev);
}

/* ---- regions ----------------------------------------------------------------- */

/* Where this transport sits in the context's table, hence in mr->tr_priv. */
static int verbs_slot(const lm_verbs_iface_t *iface)
{
    for (int t = 0; t < LM_MAX_TRANSPORTS; t++)
        if (iface->ctx->ifaces[t] == iface)
            return t;
    return -1; /* not reached: the core only calls open transports */
}

static int ibv_access_of(uint32_t access)
{
    int flags = 0;
    if (access & LM_ACCESS_LOCAL_WRITE)
        flags |= IBV_ACCESS_LOCAL_WRITE;
    /* Verbs refuses remote write without local write. */
    if (access & LM_ACCESS_REMOTE_WRITE)
        flags |= IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_LOCAL_WRITE;
    if (access & LM_ACCESS_REMOTE_READ)
        flags |= IBV_ACCESS_REMOTE_READ;
    return flags;
}

int lm_verbs_mr_register(void *iface_ptr, lm_mr_t *mr)
{
    lm_verbs_iface_t *iface = iface_ptr;
    int slot = verbs_slot(iface);
    if (slot < 0)
        return lm_fail(LM_ERR_INVALID, "verbs: interface not open in this context");
    mr->rkey = 0;
    mr->tr_priv[slot] = NULL;
    if (mr->length == 0) /* nothing to pin; only empty operations can use it */
        return LM_OK;
    lm_verbs_mr_t *vmr = calloc(1, sizeof(*vmr));
    if (!vmr)
        return lm_fail(LM_ERR_NO_MEMORY, "verbs: region allocation failed");
    vmr->ibv = ibv_reg_mr(iface->pd, mr->addr, mr->length, ibv_access_of(mr->access));
    if (!vmr->ibv) {
        int err = errno;
        free(vmr);
        return lm_fail(err == ENOMEM ? LM_ERR_NO_MEMORY : LM_ERR_IO, "ibv_reg_mr(%llu bytes) on %s: %s%s",
                       (unsigned long long)mr->length, iface->dev_name, strerror(err),
                       err == ENOMEM ? " (is the locked-memory limit, ulimit -l, too low?)" : "");
    }
    atomic_init(&vmr->posted, 0);
    mr->rkey = vmr->ibv->rkey;
    mr->tr_priv[slot] = vmr;
    return LM_OK;
}

int lm_verbs_mr_register_device(void *iface_ptr, lm_mr_t *mr, int dmabuf_fd, uint64_t dmabuf_offset)
{
    lm_verbs_iface_t *iface = iface_ptr;
    int slot = verbs_slot(iface);
    if (slot < 0)
        return lm_fail(LM_ERR_INVALID, "verbs: interface not open in this context");
    lm_verbs_mr_t *vmr = calloc(1, sizeof(*vmr));
    if (!vmr)
        return lm_fail(LM_ERR_NO_MEMORY, "verbs: region allocation failed");
    int access = ibv_access_of(mr->access);
    vmr->ibv = dmabuf_fd >= 0
                   ? ibv_reg_dmabuf_mr(iface->pd, dmabuf_offset, mr->length, (uint64_t)(uintptr_t)mr->addr,
                                       dmabuf_fd, access)
                   : ibv_reg_mr(iface->pd, mr->addr, mr->length, access);
    if (!vmr->ibv) {
        int err = errno;
        free(vmr);
        /* EOPNOTSUPP: the provider (or its kernel driver) has no dma-buf support;
         * a device pointer without nvidia-peermem fails with EFAULT or EINVAL. */
        bool unsupported = err == EOPNOTSUPP || err == ENOSYS || err == EPROTONOSUPPORT ||
                           (dmabuf_fd < 0 && (err == EFAULT || err == EINVAL));
        const char *hint = dmabuf_fd >= 0 ? (unsupported ? " (the provider has no dma-buf support)" : "")
                                          : (unsupported ? " (is the nvidia_peermem module loaded?)" : "");
        return lm_fail(unsupported ? LM_ERR_UNSUPPORTED : err == ENOMEM ? LM_ERR_NO_MEMORY : LM_ERR_IO,
                       "%s(%llu bytes of device memory) on %s: %s%s",
                       dmabuf_fd >= 0 ? "ibv_reg_dmabuf_mr" : "ibv_reg_mr", (unsigned long long)mr->length,
                       iface->dev_name, strerror(err), hint);
    }
    atomic_init(&vmr->posted, 0);
    mr->rkey = vmr->ibv->rkey;
    mr->tr_priv[slot] = vmr;
    return LM_OK;
}

void lm_verbs_mr_deregister(void *iface_ptr, lm_mr_t *mr)
{
    lm_verbs_iface_t *iface = iface_ptr;
    int slot = verbs_slot(iface);
    lm_verbs_mr_t *vmr = slot >= 0 ? mr->tr_priv[slot] : NULL;
    if (!vmr)
        return;
    /* The region is no longer alive, so no new WR takes it; WRs already
     * posted may still move its bytes, and finish (or flush) soon. */
    pthread_mutex_lock(&iface->mr_lock);
    while (atomic_load(&vmr->posted) > 0)
        pthread_cond_wait(&iface->mr_idle, &iface->mr_lock);
    pthread_mutex_unlock(&iface->mr_lock);
    ibv_dereg_mr(vmr->ibv);
    mr->tr_priv[slot] = NULL;
    free(vmr);
}

lm_verbs_mr_t *lm_verbs_region(const lm_verbs_iface_t *iface, const lm_mr_t *mr)
{
    int slot = verbs_slot(iface);
    return slot >= 0 ? mr->tr_priv[slot] : NULL;
}

void lm_verbs_region_release(lm_verbs_iface_t *iface, lm_verbs_mr_t *vmr)
{
    if (!vmr)
        return;
    /* vmr may be freed as soon as the count is 0: only the iface is touched after. */
    if (atomic_fetch_sub(&vmr->posted, 1) == 1) {
        pthread_mutex_lock(&iface->mr_lock);
        pthread_cond_broadcast(&iface->mr_idle);
        pthread_mutex_unlock(&iface->mr_lock);
    }
}
