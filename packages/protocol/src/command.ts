// Migration commands, type byte 0x08 (wire-format.md §4).
//
//   u8 0x08 | be16 cmd | be16 len | payload[len]      (PACKAGED: then be32-counted blob follows)
//
//   PING            be32 value
//   POSTCOPY_ADVISE (empty) | be64 host_pagesize_summary, be64 target_page_size
//   RAM_DISCARD     u8 version=0 | cstr block | u8 0 | { be64 start, be64 length }+
//   PACKAGED        be32 blob_len
//   RECV_BITMAP     cstr block

import { CSTR_MAX, MIG_CMD_MAX_7_2, MIG_CMD_NAMES, MigCmd, RecordType, TARGET_PAGE_SIZE } from './constants.ts';
import { ErrorCode, MigrationError, ProtocolError } from './errors.ts';
import type { BatchWriter } from './writer.ts';

/** Bytes before the payload: type, cmd, len. */
export const COMMAND_HEADER_LENGTH = 5;
/** QEMU packs at most this many ranges into one discard command. */
export const DISCARD_RANGES_PER_COMMAND = 12;

/** Fixed payload lengths; -1 = variable (checked by the decoder of that command). */
const FIXED_LENGTH: readonly number[] = [
  -1, // INVALID
  0, // OPEN_RETURN_PATH
  4, // PING
  -1, // POSTCOPY_ADVISE: 0 or 16
  0, // POSTCOPY_LISTEN
  0, // POSTCOPY_RUN
  -1, // POSTCOPY_RAM_DISCARD
  4, // PACKAGED
  0, // ENABLE_COLO
  0, // POSTCOPY_RESUME
  -1, // RECV_BITMAP
  0, // SWITCHOVER_START
];

export interface DiscardRange {
  /** Byte offset inside the block. */
  start: number;
  /** Bytes. */
  length: number;
}

export interface DiscardPayload {
  version: number;
  block: string;
  ranges: DiscardRange[];
}

export interface CommandInfo {
  cmd: number;
  name: string;
  /** Payload length as on the wire. */
  length: number;
  /** A copy of the payload bytes. */
  payload: Buffer;
  pingValue?: number;
  hostPageSizeSummary?: number;
  targetPageSize?: number;
  discard?: DiscardPayload;
  /** PACKAGED: bytes of nested records that follow the command. */
  blobLength?: number;
  /** RECV_BITMAP: the block asked for. */
  block?: string;
}

export function commandName(cmd: number): string {
  return MIG_CMD_NAMES[cmd] ?? `CMD_${cmd}`;
}

/**
 * Check a command's number and length before its payload is read. `maxCmd` is the first
 * number refused (11 for QEMU 7.2, 12 when SWITCHOVER_START is allowed).
 */
export function checkCommandHeader(cmd: number, length: number, streamOffset: number, maxCmd = MIG_CMD_MAX_7_2): void {
  if (cmd === MigCmd.INVALID || cmd >= maxCmd) {
    throw new ProtocolError(ErrorCode.UNKNOWN_COMMAND, `unknown migration command ${cmd}`, { streamOffset });
  }
  const fixed = FIXED_LENGTH[cmd]!;
  const ok =
    fixed >= 0
      ? length === fixed
      : cmd === MigCmd.POSTCOPY_ADVISE
        ? length === 0 || length === 16
        : cmd === MigCmd.POSTCOPY_RAM_DISCARD
          ? length >= 20 // the exact rule needs the name length: decodeDiscard
          : length >= 2 && length <= 1 + CSTR_MAX; // RECV_BITMAP
  if (!ok) {
    throw new ProtocolError(
      ErrorCode.COMMAND_LENGTH,
      `command ${commandName(cmd)} has payload length ${length}, which its length rule does not allow`,
      { streamOffset },
    );
  }
}

/** Decode a command payload (header already checked). */
export function decodeCommand(cmd: number, payload: Buffer, streamOffset: number): CommandInfo {
  const info: CommandInfo = { cmd, name: commandName(cmd), length: payload.length, payload };
  const at = streamOffset + COMMAND_HEADER_LENGTH;
  switch (cmd) {
    case MigCmd.PING:
      info.pingValue = payload.readUInt32BE(0);
      break;
    case MigCmd.POSTCOPY_ADVISE:
      if (payload.length === 16) {
        const summary = readBe64(payload, 0);
        const pageSize = readBe64(payload, 8);
        if (pageSize !== TARGET_PAGE_SIZE) {
          throw new ProtocolError(
            ErrorCode.BAD_COMMAND_PAYLOAD,
            `POSTCOPY_ADVISE target page size ${pageSize} differs from ours (${TARGET_PAGE_SIZE})`,
            { streamOffset: at + 8 },
          );
        }
        info.hostPageSizeSummary = summary;
        info.targetPageSize = pageSize;
      }
      break;
    case MigCmd.POSTCOPY_RAM_DISCARD:
      info.discard = decodeDiscard(payload, at);
      break;
    case MigCmd.PACKAGED:
      info.blobLength = payload.readUInt32BE(0);
      break;
    case MigCmd.RECV_BITMAP: {
      const n = payload[0]!;
      if (n === 0) {
        throw new ProtocolError(ErrorCode.EMPTY_IDSTR, 'RECV_BITMAP names no block', { streamOffset: at });
      }
      if (payload.length !== 1 + n) {
        throw new ProtocolError(
          ErrorCode.COMMAND_LENGTH,
          `RECV_BITMAP payload length ${payload.length} is not 1 + name length ${n}`,
          { streamOffset: at },
        );
      }
      info.block = payload.toString('latin1', 1, 1 + n);
      break;
    }
  }
  return info;
}

function decodeDiscard(p: Buffer, at: number): DiscardPayload {
  const version = p[0]!;
  if (version !== 0) {
    throw new ProtocolError(ErrorCode.BAD_COMMAND_PAYLOAD, `POSTCOPY_RAM_DISCARD version ${version} (expected 0)`, {
      streamOffset: at,
    });
  }
  const n = p[1]!;
  if (n === 0) throw new ProtocolError(ErrorCode.EMPTY_IDSTR, 'POSTCOPY_RAM_DISCARD names no block', { streamOffset: at + 1 });
  if (p.length < 3 + n + 16 || (p.length - 3 - n) % 16 !== 0) {
    throw new ProtocolError(
      ErrorCode.COMMAND_LENGTH,
      `POSTCOPY_RAM_DISCARD length ${p.length} does not hold whole 16-byte ranges after the ${n}-byte name`,
      { streamOffset: at },
    );
  }
  const block = p.toString('latin1', 2, 2 + n);
  if (p[2 + n] !== 0) {
    throw new ProtocolError(ErrorCode.BAD_COMMAND_PAYLOAD, `POSTCOPY_RAM_DISCARD name terminator is ${p[2 + n]} (expected 0)`, {
      streamOffset: at + 2 + n,
      block,
    });
  }
  const ranges: DiscardRange[] = [];
  for (let i = 3 + n; i < p.length; i += 16) {
    const start = readBe64(p, i);
    const length = readBe64(p, i + 8);
    if (start < 0 || length < 0 || start % TARGET_PAGE_SIZE !== 0 || length % TARGET_PAGE_SIZE !== 0) {
      throw new ProtocolError(ErrorCode.BAD_COMMAND_PAYLOAD, 'POSTCOPY_RAM_DISCARD range is not page aligned', {
        streamOffset: at + i,
        block,
      });
    }
    ranges.push({ start, length });
  }
  return { version, block, ranges };
}

/** be64 as a number; -1 when ≥ 2^53. */
export function readBe64(b: Uint8Array, at: number): number {
  const hi = ((b[at]! << 24) >>> 0) + ((b[at + 1]! << 16) | (b[at + 2]! << 8) | b[at + 3]!);
  if (hi >= 0x200000) return -1;
  const lo = ((b[at + 4]! << 24) >>> 0) + ((b[at + 5]! << 16) | (b[at + 6]! << 8) | b[at + 7]!);
  return hi * 0x100000000 + lo;
}

// ---- encoders -------------------------------------------------------------------------------

function header(w: BatchWriter, cmd: number, length: number): BatchWriter {
  if (length > 0xffff) {
    throw new MigrationError(ErrorCode.INVALID_ARGUMENT, `command payload of ${length} bytes exceeds 65535`);
  }
  return w.u8(RecordType.COMMAND).be16(cmd).be16(length);
}

/** A command with no payload (OPEN_RETURN_PATH, LISTEN, RUN, RESUME, ENABLE_COLO, SWITCHOVER_START). */
export function writeCommand(w: BatchWriter, cmd: number, payload?: Uint8Array): void {
  header(w, cmd, payload?.length ?? 0);
  if (payload !== undefined && payload.length > 0) w.bytes(payload);
}

export function writePing(w: BatchWriter, value: number): void {
  header(w, MigCmd.PING, 4).be32(value);
}

/** POSTCOPY_ADVISE: with page sizes when the destination has postcopy-ram, empty otherwise. */
export function writePostcopyAdvise(w: BatchWriter, pageSizes?: { hostPageSizeSummary: number; targetPageSize: number }): void {
  if (pageSizes === undefined) {
    header(w, MigCmd.POSTCOPY_ADVISE, 0);
    return;
  }
  header(w, MigCmd.POSTCOPY_ADVISE, 16).be64(pageSizes.hostPageSizeSummary).be64(pageSizes.targetPageSize);
}

/** One POSTCOPY_RAM_DISCARD command per 12 ranges (QEMU's packing), for one block. */
export function writeRamDiscard(w: BatchWriter, block: string, ranges: readonly DiscardRange[]): void {
  for (let i = 0; i < ranges.length; i += DISCARD_RANGES_PER_COMMAND) {
    const part = ranges.slice(i, i + DISCARD_RANGES_PER_COMMAND);
    header(w, MigCmd.POSTCOPY_RAM_DISCARD, 3 + block.length + 16 * part.length)
      .u8(0)
      .cstr(block)
      .u8(0);
    for (const r of part) w.be64(r.start).be64(r.length);
  }
}

/** PACKAGED header; the caller writes exactly `blobLength` bytes of records next. */
export function writePackaged(w: BatchWriter, blobLength: number): void {
  header(w, MigCmd.PACKAGED, 4).be32(blobLength);
}

export function writeRecvBitmapRequest(w: BatchWriter, block: string): void {
  header(w, MigCmd.RECV_BITMAP, 1 + block.length).cstr(block);
}
