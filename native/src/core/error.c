/* error.c - status texts and the per-thread last error message. */
#include <stdarg.h>
#include <stdio.h>

#include "core.h"

static _Thread_local char last_error[512];

const char *lm_status_str(int status)
{
    switch (status) {
    case LM_OK: return "success";
    case LM_ERR_INVALID: return "invalid argument";
    case LM_ERR_NO_MEMORY: return "out of memory";
    case LM_ERR_IO: return "I/O error";
    case LM_ERR_TIMEOUT: return "timed out";
    case LM_ERR_NO_KEY: return "no registered region with that key";
    case LM_ERR_OUT_OF_BOUNDS: return "range outside the registered region";
    case LM_ERR_ACCESS: return "region lacks the required access flag";
    case LM_ERR_PEER_LOST: return "peer lost";
    case LM_ERR_PROTOCOL: return "protocol error";
    case LM_ERR_UNSUPPORTED: return "not supported";
    case LM_ERR_CLOSED: return "closed";
    case LM_ERR_CANCELED: return "canceled";
    case LM_ERR_REMOTE: return "refused by the remote side";
    case LM_ERR_LOCAL: return "local region error";
    case LM_ERR_SEQUENCE: return "channel sequence error";
    default: return "unknown status";
    }
}

const char *lm_last_error(void)
{
    return last_error;
}

int lm_fail(int status, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof(last_error), fmt, ap);
    va_end(ap);
    return status;
}
