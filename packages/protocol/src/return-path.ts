// Return-path messages, destination → source on the same socket (wire-format.md §5).
//
//   be16 type | be16 len | data[len]            len ≤ 512
//   SHUT        be32 status            PONG       be32 value
//   REQ_PAGES_ID be64 start, be32 len, cstr block       REQ_PAGES be64 start, be32 len
//   RECV_BITMAP cstr block, then outside the message: be64 size | bitmap[size] (LE bits) |
//               be64 0x0123456789abcdef
//   RESUME_ACK  be32 1                 SWITCHOVER_ACK (QEMU 8.1+) empty

import {
  CSTR_MAX,
  MIGRATION_RESUME_ACK_VALUE,
  RECV_BITMAP_END_MARK_HI,
  RECV_BITMAP_END_MARK_LO,
  RP_LIVEMIG_EXT,
  RP_MAX_PAYLOAD,
  RP_MSG_NAMES,
  RpMsg,
  TARGET_PAGE_SIZE,
} from './constants.ts';
import { ErrorCode, MigrationError, ProtocolError } from './errors.ts';
import { ByteReader } from './reader.ts';
import type { BatchWriter } from './writer.ts';

export const RP_HEADER_LENGTH = 4;

export interface ReturnPathMessage {
  type: number;
  name: string;
  /** Offset of the message header in the return-path byte stream. */
  offset: number;
  /** Payload length as on the wire. */
  length: number;
  /** SHUT status, PONG value, RESUME_ACK value. */
  value?: number;
  /** Page requests: byte offset in the block and length. */
  start?: number;
  pageLength?: number;
  /** Page requests (REQ_PAGES: the block of the previous request), RECV_BITMAP. */
  block?: string;
  /** RECV_BITMAP: the little-endian received-pages bitmap (a copy). */
  bitmap?: Buffer;
  /** RP_LIVEMIG_EXT: the payload (a copy). */
  payload?: Buffer;
}

/** Fixed payload lengths by type; -1 = variable. */
const FIXED: readonly number[] = [-1, 4, 4, -1, 12, -1, 4, 0];

export function rpMessageName(type: number): string {
  return RP_MSG_NAMES[type] ?? `RP_${type}`;
}

export interface ReturnPathDecoderOptions {
  /** First type number refused: 7 for QEMU 7.2 (the default), 8 to accept SWITCHOVER_ACK. */
  maxType?: number;
  /** Expected RECV_BITMAP size in bytes for a block (the source knows its blocks). */
  bitmapBytes?: (block: string) => number | undefined;
  /** Upper bound on a RECV_BITMAP body when bitmapBytes gives no answer (default 64 MiB = 2 TiB of RAM). */
  maxBitmapBytes?: number;
  /** Accept livemig's RP_LIVEMIG_EXT messages (only after announcing LIVEMIG_HELLO_PING). */
  livemigExtensions?: boolean;
}

export const NEED_MORE_RP: unique symbol = Symbol('need more return-path bytes');

/** Incremental decoder of the return path: push() bytes, next() messages until NEED_MORE_RP. */
export class ReturnPathDecoder {
  private readonly r = new ByteReader();
  private readonly maxType: number;
  private readonly maxBitmapBytes: number;
  private readonly bitmapBytes: ((block: string) => number | undefined) | undefined;
  private lastBlock: string | undefined;
  private failure: ProtocolError | undefined;
  /** Accept RP_LIVEMIG_EXT (may be switched on once the hello was sent). */
  livemigExtensions: boolean;

  constructor(options: ReturnPathDecoderOptions = {}) {
    this.maxType = options.maxType ?? RpMsg.SWITCHOVER_ACK;
    this.maxBitmapBytes = options.maxBitmapBytes ?? 64 * 1024 * 1024;
    this.bitmapBytes = options.bitmapBytes;
    this.livemigExtensions = options.livemigExtensions ?? false;
  }

  get streamOffset(): number {
    return this.r.streamOffset;
  }

  push(chunk: Uint8Array): void {
    this.r.push(chunk);
  }

  /**
   * Copy the undecoded bytes out of the pushed chunks, so that the caller may reuse their memory
   * (a connection's one read buffer). Call after next() returned NEED_MORE_RP.
   */
  retainUnread(): void {
    this.r.retainUnread();
  }

  /** Forget the block of the last request (a new connection after recovery). */
  forgetBlock(): void {
    this.lastBlock = undefined;
  }

  next(): ReturnPathMessage | typeof NEED_MORE_RP {
    if (this.failure !== undefined) throw this.failure;
    try {
      return this.decode();
    } catch (err) {
      if (err instanceof ProtocolError) this.failure = err;
      throw err;
    }
  }

  /** The peer closed: throws if it stopped inside a message. */
  end(): void {
    if (this.failure !== undefined) throw this.failure;
    if (this.r.available > 0) {
      throw new ProtocolError(ErrorCode.TRUNCATED, `return path ended inside a message (${this.r.available} bytes left)`, {
        streamOffset: this.r.streamOffset,
      });
    }
  }

  private decode(): ReturnPathMessage | typeof NEED_MORE_RP {
    const r = this.r;
    if (r.available < RP_HEADER_LENGTH) return NEED_MORE_RP;
    const offset = r.streamOffset;
    const type = r.be16(0);
    const len = r.be16(2);
    if (type === RP_LIVEMIG_EXT && this.livemigExtensions) {
      if (len > RP_MAX_PAYLOAD) {
        throw new ProtocolError(ErrorCode.RP_LENGTH, `return-path livemig extension has length ${len}`, { streamOffset: offset });
      }
      if (r.available < RP_HEADER_LENGTH + len) return NEED_MORE_RP;
      const payload = r.copyOut(RP_HEADER_LENGTH, len);
      r.skip(RP_HEADER_LENGTH + len);
      return { type, name: 'LIVEMIG_EXT', offset, length: len, payload };
    }
    if (type === RpMsg.INVALID || type >= this.maxType) {
      throw new ProtocolError(ErrorCode.UNKNOWN_RP_MESSAGE, `unknown return-path message type ${type}`, { streamOffset: offset });
    }
    const fixed = FIXED[type]!;
    if (len > RP_MAX_PAYLOAD || (fixed >= 0 && len !== fixed)) {
      throw new ProtocolError(ErrorCode.RP_LENGTH, `return-path ${rpMessageName(type)} has length ${len}`, { streamOffset: offset });
    }
    if (r.available < RP_HEADER_LENGTH + len) return NEED_MORE_RP;
    const msg: ReturnPathMessage = { type, name: rpMessageName(type), offset, length: len };
    const p = RP_HEADER_LENGTH;
    let total = RP_HEADER_LENGTH + len;
    switch (type) {
      case RpMsg.SHUT:
      case RpMsg.PONG:
        msg.value = r.be32(p);
        break;
      case RpMsg.RESUME_ACK:
        msg.value = r.be32(p);
        if (msg.value !== MIGRATION_RESUME_ACK_VALUE) {
          throw new ProtocolError(ErrorCode.BAD_RP_PAYLOAD, `RESUME_ACK value ${msg.value} (expected 1)`, { streamOffset: offset });
        }
        break;
      case RpMsg.REQ_PAGES_ID:
      case RpMsg.REQ_PAGES: {
        if (type === RpMsg.REQ_PAGES_ID) {
          const n = len >= 13 ? r.u8(p + 12) : 0;
          if (len < 14 || n === 0) {
            throw new ProtocolError(ErrorCode.EMPTY_IDSTR, 'REQ_PAGES_ID names no block', { streamOffset: offset });
          }
          if (len !== 13 + n) {
            throw new ProtocolError(ErrorCode.RP_LENGTH, `REQ_PAGES_ID length ${len} is not 13 + name length ${n}`, {
              streamOffset: offset,
            });
          }
          this.lastBlock = r.latin1(p + 13, n);
        } else if (this.lastBlock === undefined) {
          throw new ProtocolError(ErrorCode.BAD_RP_PAYLOAD, 'REQ_PAGES with no earlier REQ_PAGES_ID naming a block', {
            streamOffset: offset,
          });
        }
        const start = r.be64(p);
        const pageLength = r.be32(p + 8);
        if (start < 0 || start % TARGET_PAGE_SIZE !== 0 || pageLength === 0 || pageLength % TARGET_PAGE_SIZE !== 0) {
          throw new ProtocolError(
            ErrorCode.BAD_RP_PAYLOAD,
            `page request start ${start} / length ${pageLength} is not page aligned`,
            { streamOffset: offset, block: this.lastBlock },
          );
        }
        msg.start = start;
        msg.pageLength = pageLength;
        msg.block = this.lastBlock;
        break;
      }
      case RpMsg.RECV_BITMAP: {
        const n = len > 0 ? r.u8(p) : 0;
        if (n === 0) throw new ProtocolError(ErrorCode.EMPTY_IDSTR, 'RECV_BITMAP names no block', { streamOffset: offset });
        if (len !== 1 + n) {
          throw new ProtocolError(ErrorCode.RP_LENGTH, `RECV_BITMAP length ${len} is not 1 + name length ${n}`, {
            streamOffset: offset,
          });
        }
        const block = r.latin1(p + 1, n);
        if (r.available < total + 8) return NEED_MORE_RP;
        const size = r.be64(total);
        const expected = this.bitmapBytes?.(block);
        if (expected !== undefined ? size !== expected : size < 0 || size > this.maxBitmapBytes || size % 8 !== 0) {
          throw new ProtocolError(
            expected !== undefined || (size >= 0 && size % 8 !== 0) ? ErrorCode.BAD_RP_PAYLOAD : ErrorCode.LIMIT_EXCEEDED,
            `RECV_BITMAP for "${block}" announces ${size} bytes${expected !== undefined ? ` (expected ${expected})` : ''}`,
            { streamOffset: offset + total, block },
          );
        }
        if (r.available < total + 8 + size + 8) return NEED_MORE_RP;
        const markAt = total + 8 + size;
        if (r.be32(markAt) !== RECV_BITMAP_END_MARK_HI || r.be32(markAt + 4) !== RECV_BITMAP_END_MARK_LO) {
          throw new ProtocolError(ErrorCode.BAD_RP_PAYLOAD, `RECV_BITMAP for "${block}" lacks its end mark`, {
            streamOffset: offset + markAt,
            block,
          });
        }
        msg.block = block;
        msg.bitmap = r.copyOut(total + 8, size);
        total += 8 + size + 8;
        break;
      }
    }
    r.skip(total);
    return msg;
  }
}

// ---- encoders -------------------------------------------------------------------------------

function rpHeader(w: BatchWriter, type: number, len: number): BatchWriter {
  return w.be16(type).be16(len);
}

export function writeRpShut(w: BatchWriter, status: number): void {
  rpHeader(w, RpMsg.SHUT, 4).be32(status);
}

export function writeRpPong(w: BatchWriter, value: number): void {
  rpHeader(w, RpMsg.PONG, 4).be32(value);
}

/** A page request; names the block (REQ_PAGES_ID) when `block` is given, else REQ_PAGES. */
export function writeRpReqPages(w: BatchWriter, start: number, length: number, block?: string): void {
  if (block === undefined) {
    rpHeader(w, RpMsg.REQ_PAGES, 12).be64(start).be32(length);
    return;
  }
  if (block.length === 0 || block.length > CSTR_MAX) {
    throw new MigrationError(ErrorCode.INVALID_ARGUMENT, `block name "${block}" must be 1–255 bytes`);
  }
  rpHeader(w, RpMsg.REQ_PAGES_ID, 13 + block.length).be64(start).be32(length).cstr(block);
}

/** RECV_BITMAP reply: header, be64 size, the bitmap (size must be a multiple of 8), end mark. */
export function writeRpRecvBitmap(w: BatchWriter, block: string, bitmap: Uint8Array): void {
  if (bitmap.length % 8 !== 0) throw new MigrationError(ErrorCode.INVALID_ARGUMENT, 'received bitmap size must be a multiple of 8');
  rpHeader(w, RpMsg.RECV_BITMAP, 1 + block.length).cstr(block);
  w.be64(bitmap.length).bytes(bitmap).be32(RECV_BITMAP_END_MARK_HI).be32(RECV_BITMAP_END_MARK_LO);
}

export function writeRpResumeAck(w: BatchWriter): void {
  rpHeader(w, RpMsg.RESUME_ACK, 4).be32(MIGRATION_RESUME_ACK_VALUE);
}

/** livemig's extension message (payload ≤ 512 bytes); only to a source that sent LIVEMIG_HELLO_PING. */
export function writeRpLivemigExt(w: BatchWriter, payload: Uint8Array): void {
  if (payload.length > RP_MAX_PAYLOAD) {
    throw new MigrationError(ErrorCode.INVALID_ARGUMENT, `livemig extension payload of ${payload.length} bytes exceeds ${RP_MAX_PAYLOAD}`);
  }
  rpHeader(w, RP_LIVEMIG_EXT, payload.length).bytes(payload);
}

export function writeRpSwitchoverAck(w: BatchWriter): void {
  rpHeader(w, RpMsg.SWITCHOVER_ACK, 0);
}
