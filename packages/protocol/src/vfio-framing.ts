// A VFIO device's section data as QEMU 7.2 frames it (hw/vfio/migration.c, the v1 migration
// region): a run of be64 markers, each device state piece opened by one and the whole closed by
// END_OF_STATE, so the data delimits itself and needs no length prefix.
//
//   MARK      := ff ff ff ff  ef 10 00 0N       hi 32 bits all ones, 0xef10 "virtual function IO",
//                                               low 16 bits the flag (N below)
//     N = 1  END_OF_STATE      N = 2  DEV_CONFIG_STATE
//     N = 3  DEV_SETUP_STATE   N = 4  DEV_DATA_STATE
//     N = 5  DEV_INIT_DATA_SENT (QEMU 8.1+, switchover-ack: closes the PART whose data completed
//            the device's initial data, in place of END_OF_STATE)
//
//   setup    (START)  SETUP | END                                   16 bytes
//   iterate  (PART)   DATA | be64 size | data[size] | END           size 0: nothing was pending
//   complete (END)    { DATA | be64 size | data[size] }* | END
//   config   (FULL)   CONFIG | config[n] | END                       n: the device's own (PCI config space in QEMU)
//
// QEMU's loader reads markers until END_OF_STATE: SETUP and CONFIG must be followed by their END
// and end the section; DATA frames may repeat. This module writes those sequences and checks them
// on the way in (a whole buffered section, or incrementally while the stream decoder looks for
// where the section ends).

import type { BatchWriter } from './writer.ts';
import { ErrorCode, ProtocolError } from './errors.ts';

/** High 32 bits of every VFIO marker. */
export const VFIO_MIG_FLAG_HI = 0xffffffff;
/** Low 32 bits of QEMU 7.2's VFIO_MIG_FLAG_* (the full marker is 0xffffffff_ef10000N). */
export const VfioMigFlag = {
  END_OF_STATE: 0xef100001,
  DEV_CONFIG_STATE: 0xef100002,
  DEV_SETUP_STATE: 0xef100003,
  DEV_DATA_STATE: 0xef100004,
  DEV_INIT_DATA_SENT: 0xef100005,
} as const;
export type VfioMigFlagValue = (typeof VfioMigFlag)[keyof typeof VfioMigFlag];

export const VFIO_MARK_LENGTH = 8;
/** DATA marker and its be64 size. */
export const VFIO_DATA_HEADER_LENGTH = 16;
/** SETUP | END. */
export const VFIO_SETUP_LENGTH = 16;

/** What a section's markers say it is. */
export type VfioSectionPhase = 'setup' | 'data' | 'config';

export interface VfioSectionSummary {
  phase: VfioSectionPhase;
  /** DATA frames (a size-0 frame included). */
  dataFrames: number;
  /** Device data bytes carried by the DATA frames. */
  dataBytes: number;
  /** Config bytes (config sections). */
  configBytes: number;
  /** Bytes of section data, markers included. */
  length: number;
  /** The data closed with INIT_DATA_SENT (switchover-ack): the device's initial data is all here. */
  initDataSent: boolean;
}

export interface VfioFrameHandler {
  /** One DATA frame's payload: `length` bytes of `src` at `offset` (a view; copy to keep). */
  onData?(src: Buffer, offset: number, length: number): void;
  /** The config payload. */
  onConfig?(src: Buffer, offset: number, length: number): void;
}

export function writeVfioMark(w: BatchWriter, flag: VfioMigFlagValue): void {
  w.be32(VFIO_MIG_FLAG_HI).be32(flag);
}

/** A setup section's data: SETUP | END. */
export function writeVfioSetup(w: BatchWriter): void {
  writeVfioMark(w, VfioMigFlag.DEV_SETUP_STATE);
  writeVfioMark(w, VfioMigFlag.END_OF_STATE);
}

/** DATA | be64 size: the caller writes the `dataSize` bytes after it. */
export function writeVfioDataHeader(w: BatchWriter, dataSize: number): void {
  writeVfioMark(w, VfioMigFlag.DEV_DATA_STATE);
  w.be64(dataSize);
}

export function writeVfioEndOfState(w: BatchWriter): void {
  writeVfioMark(w, VfioMigFlag.END_OF_STATE);
}

/** switchover-ack: close a PART's data with INIT_DATA_SENT (the device's initial data is all out). */
export function writeVfioInitDataSent(w: BatchWriter): void {
  writeVfioMark(w, VfioMigFlag.DEV_INIT_DATA_SENT);
}

export function sizeOfVfioConfig(configBytes: number): number {
  return 2 * VFIO_MARK_LENGTH + configBytes;
}

/** A config section's data: CONFIG | config | END. */
export function writeVfioConfig(w: BatchWriter, config: Uint8Array): void {
  writeVfioMark(w, VfioMigFlag.DEV_CONFIG_STATE);
  w.bytes(config);
  writeVfioMark(w, VfioMigFlag.END_OF_STATE);
}

/** Whether 8 bytes read as (hi, lo) are a VFIO marker (QEMU 7.2's, and 8.1's INIT_DATA_SENT). */
export function isVfioMark(hi: number, lo: number): boolean {
  return hi === VFIO_MIG_FLAG_HI && lo >= VfioMigFlag.END_OF_STATE && lo <= VfioMigFlag.DEV_INIT_DATA_SENT;
}

/** Markers that end a data section: END_OF_STATE, or INIT_DATA_SENT (QEMU's loader returns at either). */
function endsData(lo: number): boolean {
  return lo === VfioMigFlag.END_OF_STATE || lo === VfioMigFlag.DEV_INIT_DATA_SENT;
}

function markName(lo: number): string {
  switch (lo) {
    case VfioMigFlag.END_OF_STATE:
      return 'END_OF_STATE';
    case VfioMigFlag.DEV_CONFIG_STATE:
      return 'DEV_CONFIG_STATE';
    case VfioMigFlag.DEV_SETUP_STATE:
      return 'DEV_SETUP_STATE';
    case VfioMigFlag.DEV_INIT_DATA_SENT:
      return 'DEV_INIT_DATA_SENT';
    default:
      return 'DEV_DATA_STATE';
  }
}

function hex64(hi: number, lo: number): string {
  return `0x${hi.toString(16).padStart(8, '0')}${lo.toString(16).padStart(8, '0')}`;
}

export interface ReadVfioSectionOptions {
  /** Stream offset of `src[offset]`, for error messages. Default 0. */
  streamOffset?: number;
  /** Largest DATA frame accepted, bytes. Default 16 MiB. */
  maxDataBytes?: number;
}

/**
 * Check one whole VFIO section's data (`length` bytes of `src` at `offset`) against QEMU's loader
 * and hand its payloads to `handler`. Throws LM_ERR_BAD_VFIO_FRAME (or LM_ERR_LIMIT_EXCEEDED for
 * a DATA size over `maxDataBytes`) with the stream offset of the faulty marker or field.
 */
export function readVfioSection(src: Buffer, offset: number, length: number, options: ReadVfioSectionOptions = {}, handler?: VfioFrameHandler): VfioSectionSummary {
  const base = (options.streamOffset ?? 0) - offset;
  const maxData = options.maxDataBytes ?? 16 * 1024 * 1024;
  const end = offset + length;
  const fail = (at: number, message: string): never => {
    throw new ProtocolError(ErrorCode.BAD_VFIO_FRAME, `VFIO section data: ${message}`, { streamOffset: base + at });
  };
  const mark = (at: number): number => {
    if (at + VFIO_MARK_LENGTH > end) fail(at, `ends ${end - at} bytes into a marker (END_OF_STATE missing)`);
    const hi = src.readUInt32BE(at);
    const lo = src.readUInt32BE(at + 4);
    if (!isVfioMark(hi, lo)) fail(at, `unknown marker ${hex64(hi, lo)}`);
    return lo;
  };
  const out: VfioSectionSummary = { phase: 'data', dataFrames: 0, dataBytes: 0, configBytes: 0, length, initDataSent: false };
  let p = offset;
  const first = mark(p);
  if (first === VfioMigFlag.DEV_SETUP_STATE || first === VfioMigFlag.DEV_CONFIG_STATE) {
    const setup = first === VfioMigFlag.DEV_SETUP_STATE;
    out.phase = setup ? 'setup' : 'config';
    // The config's length is whatever lies between its marker and the END that closes the data.
    const endAt = setup ? p + VFIO_MARK_LENGTH : end - VFIO_MARK_LENGTH;
    if (endAt < p + VFIO_MARK_LENGTH) fail(p, `${markName(first)} without END_OF_STATE`);
    const closing = mark(endAt);
    if (closing !== VfioMigFlag.END_OF_STATE) fail(endAt, `${markName(first)} is followed by ${markName(closing)}, not END_OF_STATE`);
    if (!setup) {
      out.configBytes = endAt - p - VFIO_MARK_LENGTH;
      handler?.onConfig?.(src, p + VFIO_MARK_LENGTH, out.configBytes);
    }
    p = endAt + VFIO_MARK_LENGTH;
  } else {
    let lo = first;
    for (; !endsData(lo); lo = mark(p)) {
      if (lo !== VfioMigFlag.DEV_DATA_STATE) fail(p, `${markName(lo)} after DEV_DATA_STATE frames (only more data or END_OF_STATE may follow)`);
      if (p + VFIO_DATA_HEADER_LENGTH > end) fail(p + VFIO_MARK_LENGTH, 'ends inside a DEV_DATA_STATE size');
      const hi = src.readUInt32BE(p + 8);
      const size = hi * 0x100000000 + src.readUInt32BE(p + 12);
      if (size > maxData) {
        throw new ProtocolError(ErrorCode.LIMIT_EXCEEDED, `VFIO data frame of ${size} bytes exceeds the ${maxData}-byte limit`, { streamOffset: base + p + 8 });
      }
      const at = p + VFIO_DATA_HEADER_LENGTH;
      if (at + size > end) fail(p + 8, `DEV_DATA_STATE of ${size} bytes runs ${at + size - end} bytes past the section data`);
      out.dataFrames++;
      out.dataBytes += size;
      handler?.onData?.(src, at, size);
      p = at + size;
    }
    out.initDataSent = lo === VfioMigFlag.DEV_INIT_DATA_SENT;
    p += VFIO_MARK_LENGTH;
  }
  if (p !== end) fail(p, `${end - p} bytes after END_OF_STATE`);
  return out;
}

/** What measureVfioSection needs of a reader: peeks relative to the section data's first byte. */
export interface VfioPeekSource {
  readonly available: number;
  be32(k: number): number;
}

/** Where an incremental measure stopped: the start of the next marker to read. */
export interface VfioScan {
  vfioFrom: number;
  /** The first marker was SETUP or CONFIG: the next one must be END_OF_STATE. */
  vfioCloseNext: boolean;
}

/**
 * The length of a VFIO section's data still arriving in `r` (undefined while more bytes are
 * needed; `scan` keeps the progress, so each call reads only new markers). `configBytes`: the
 * config payload's length (a CONFIG section cannot be measured without it). Throws as
 * readVfioSection does; `streamOffset` is where `r`'s byte 0 is.
 */
export function measureVfioSection(r: VfioPeekSource, scan: VfioScan, streamOffset: number, configBytes: number | undefined, maxBytes: number): number | undefined {
  for (;;) {
    const p = scan.vfioFrom;
    if (p > maxBytes) {
      throw new ProtocolError(ErrorCode.LIMIT_EXCEEDED, `VFIO section data longer than the ${maxBytes}-byte limit`, { streamOffset: streamOffset + p });
    }
    if (r.available < p + VFIO_MARK_LENGTH) return undefined;
    const hi = r.be32(p);
    const lo = r.be32(p + 4);
    if (!isVfioMark(hi, lo)) {
      throw new ProtocolError(ErrorCode.BAD_VFIO_FRAME, `VFIO section data: unknown marker ${hex64(hi, lo)}`, { streamOffset: streamOffset + p });
    }
    if (lo === VfioMigFlag.END_OF_STATE) return p + VFIO_MARK_LENGTH;
    if (lo === VfioMigFlag.DEV_INIT_DATA_SENT && !scan.vfioCloseNext) return p + VFIO_MARK_LENGTH;
    if (scan.vfioCloseNext) {
      throw new ProtocolError(ErrorCode.BAD_VFIO_FRAME, `VFIO section data: ${markName(lo)} where END_OF_STATE must close the setup or config`, {
        streamOffset: streamOffset + p,
      });
    }
    if (lo === VfioMigFlag.DEV_DATA_STATE) {
      if (r.available < p + VFIO_DATA_HEADER_LENGTH) return undefined;
      const sizeHi = r.be32(p + 8);
      const size = sizeHi * 0x100000000 + r.be32(p + 12);
      if (p + VFIO_DATA_HEADER_LENGTH + size > maxBytes) {
        throw new ProtocolError(ErrorCode.LIMIT_EXCEEDED, `VFIO data frame of ${size} bytes exceeds the ${maxBytes}-byte section limit`, { streamOffset: streamOffset + p + 8 });
      }
      scan.vfioFrom = p + VFIO_DATA_HEADER_LENGTH + size;
      continue;
    }
    if (p !== 0) {
      throw new ProtocolError(ErrorCode.BAD_VFIO_FRAME, `VFIO section data: ${markName(lo)} after DEV_DATA_STATE frames`, { streamOffset: streamOffset + p });
    }
    scan.vfioCloseNext = true;
    if (lo === VfioMigFlag.DEV_CONFIG_STATE) {
      if (configBytes === undefined) {
        throw new ProtocolError(ErrorCode.BAD_VFIO_FRAME, 'VFIO section data: DEV_CONFIG_STATE of a device whose config length is not known', { streamOffset });
      }
      scan.vfioFrom = VFIO_MARK_LENGTH + configBytes;
    } else {
      scan.vfioFrom = VFIO_MARK_LENGTH;
    }
  }
}

/** A FULL section of known length that is a VFIO config (CONFIG … END): its summary, else undefined. */
export function vfioConfigSummary(data: Buffer): VfioSectionSummary | undefined {
  if (data.length < 2 * VFIO_MARK_LENGTH || !isVfioMark(data.readUInt32BE(0), data.readUInt32BE(4)) || data.readUInt32BE(4) !== VfioMigFlag.DEV_CONFIG_STATE) return undefined;
  try {
    return readVfioSection(data, 0, data.length);
  } catch {
    return undefined;
  }
}
