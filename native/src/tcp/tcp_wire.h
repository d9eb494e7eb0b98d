/*
 * tcp_wire.h - the frames the tcp transport puts on a stream socket.
 *
 * Every frame is a fixed 56-byte header, followed by `length` payload bytes
 * for WRITE and READ_RESP. Host byte order: the handshake only pairs
 * little-endian peers (checked at build time below).
 *
 *  WRITE     seq, key, offset, length, imm, flags(IMM) + payload
 *  READ_REQ  seq, key, offset, length
 *  READ_RESP seq, status, length + payload (length 0 when refused)
 *  ACK       no payload; only its `ack` field matters (see below)
 *  NACK      seq, status: WRITE seq was refused; all earlier ones accepted
 *  NOP       seq: the initiator withdrew this sequence number (its source
 *            region was deregistered before a byte of it left)
 *  MAP_REQ   key: (shm only) may I map this region? no sequence number
 *  MAP_RESP  key, status, imm = the memfd's number in the target's process,
 *            offset = its inode, length = its bytes (shm only)
 *
 * A WRITE with flag MAPPED (shm only) carries no payload: the initiator
 * copied the bytes into its mapping of the region (granted by MAP_RESP)
 * before sending the header; the target checks it as any write (key, bounds,
 * access, and that it granted that region) and refuses it the same way.
 *
 * Every frame carries `ack`: the peer's WRITEs (and NOPs) with a sequence
 * number below it were accepted. Acknowledgements thus ride on reverse
 * traffic; a bare ACK frame is sent only when none flows for a while.
 *
 * WRITE, READ_REQ and NOP consume a sequence number; the target requires
 * them to arrive in order, so a dropped or replayed frame is a protocol error.
 */
#ifndef LM_TCP_WIRE_H
#define LM_TCP_WIRE_H

#include <stdint.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the tcp wire format is little-endian"
#endif

#define LM_TCP_MAGIC 0x4d4cu /* "LM" */

enum lm_tcp_frame_type {
    LM_TCP_WRITE = 1,
    LM_TCP_READ_REQ = 2,
    LM_TCP_READ_RESP = 3,
    LM_TCP_ACK = 4,
    LM_TCP_NACK = 5,
    LM_TCP_NOP = 6,
    LM_TCP_MAP_REQ = 7,
    LM_TCP_MAP_RESP = 8,
};

#define LM_TCP_FLAG_IMM 1u
#define LM_TCP_FLAG_MAPPED 4u /* WRITE: the payload is in the target's memory already */

typedef struct lm_tcp_hdr {
    uint16_t magic;
    uint8_t type;
    uint8_t flags;
    uint32_t imm;
    uint64_t seq;
    uint64_t key;
    uint64_t offset;
    uint64_t length;
    uint64_t ack;
    int32_t status;
    uint32_t reserved;
} lm_tcp_hdr_t;

_Static_assert(sizeof(lm_tcp_hdr_t) == 56, "wire header must stay 56 bytes");

#endif /* LM_TCP_WIRE_H */
