// RAM section records ("ram", instance 0, version 4), wire-format.md §6.
//
//   be64 word = page offset in block | flags            flags = word & 0xfff
//   [cstr block]                                          unless flags has CONTINUE (0x20)
//   ZERO  0x002: u8 fill           PAGE 0x008: page[4096]
//   XBZRLE 0x040: u8 0x01, be16 enc_len (≤ 4096), enc[enc_len]
//   COMPRESS_PAGE 0x100: be32 clen (≤ 4110), zlib[clen]
//   EOS 0x010, MULTIFD_FLUSH 0x200: no body
//   MEM_SIZE 0x004 (setup): word = total | 0x04, then per block: cstr idstr, be64 used_length,
//                           [be64 gpa with x-ignore-shared] … until the lengths add up to total

import { RamFlag, TARGET_PAGE_SIZE } from './constants.ts';
import { ErrorCode, MigrationError } from './errors.ts';
import type { BatchWriter } from './writer.ts';
import { XBZRLE_OVERFLOW, xbzrleEncode } from './xbzrle.ts';

export interface RamBlockInfo {
  idstr: string;
  /** used_length in bytes (a multiple of the page size). */
  length: number;
  /** Guest-physical base address; only sent with capability x-ignore-shared. */
  gpa?: number;
}

/** A zlib stream of one 4 KiB page is at most this long (zlib's compressBound). */
export const COMPRESS_PAGE_MAX = TARGET_PAGE_SIZE + (TARGET_PAGE_SIZE >> 12) + (TARGET_PAGE_SIZE >> 14) + 13;

export const PAGE_RECORD_HEADER = 8;

export interface MemSizeOptions {
  /** Capability x-ignore-shared: each entry carries the block's guest-physical address. */
  ignoreShared?: boolean;
}

export function writeMemSize(w: BatchWriter, blocks: readonly RamBlockInfo[], options: MemSizeOptions = {}): void {
  let total = 0;
  for (const b of blocks) total += b.length;
  w.be64(total + RamFlag.MEM_SIZE);
  for (const b of blocks) {
    w.cstr(b.idstr).be64(b.length);
    if (options.ignoreShared === true) w.be64(b.gpa ?? 0);
  }
}

/**
 * mapped-ram (QEMU 9.0+ file layout): each block list entry is followed by a MappedRamHeader,
 * be32 version | be64 page size | be64 bitmap offset | be64 pages offset (file offsets).
 */
export const MAPPED_RAM_HEADER_LENGTH = 28;
export const MAPPED_RAM_VERSION = 1;
/** QEMU puts each block's pages at a 1 MiB aligned file offset (its MAPPED_RAM_FILE_OFFSET_ALIGNMENT). */
export const MAPPED_RAM_ALIGNMENT = 0x100000;

/** Where a block lies in a mapped-ram file. */
export interface MappedRamPlace {
  bitmapOffset: number;
  /** The bitmap's size: 64-bit words, one bit per page. */
  bitmapBytes: number;
  pagesOffset: number;
}

/** A block of `pageCount` pages whose header starts at file offset `headerAt`: its bitmap right after, its pages aligned after that, as QEMU places them. */
export function mappedRamPlace(headerAt: number, pageCount: number): MappedRamPlace {
  const bitmapOffset = headerAt + MAPPED_RAM_HEADER_LENGTH;
  const bitmapBytes = Math.ceil(pageCount / 64) * 8;
  const pagesOffset = Math.ceil((bitmapOffset + bitmapBytes) / MAPPED_RAM_ALIGNMENT) * MAPPED_RAM_ALIGNMENT;
  return { bitmapOffset, bitmapBytes, pagesOffset };
}

export function writeMappedRamHeader(w: BatchWriter, place: MappedRamPlace): void {
  w.be32(MAPPED_RAM_VERSION).be64(TARGET_PAGE_SIZE).be64(place.bitmapOffset).be64(place.pagesOffset);
}

export function writeEos(w: BatchWriter): void {
  w.be64(RamFlag.EOS);
}

export function writeMultifdFlush(w: BatchWriter): void {
  w.be64(RamFlag.MULTIFD_FLUSH);
}

/**
 * Writes page records, naming a block only when it differs from the last one named on this
 * channel (CONTINUE otherwise), as QEMU does. Call forgetBlock() where QEMU forgets it
 * (setup, discard, channel switch, recovery).
 */
export class RamRecordWriter {
  /**
   * The block the last record named, while `named`. Always a string (and the flag apart): a field
   * that is undefined in some writers and a string in others changes the writers' map in V8's
   * eyes, and optimised code that met one kind is thrown away when it meets the other.
   */
  private lastBlock = '';
  private named = false;
  /** Scratch for one XBZRLE encoding. */
  private readonly encoded = Buffer.allocUnsafeSlow(TARGET_PAGE_SIZE);
  /** Always name the block (a safe sender; receivers must accept both). */
  alwaysName = false;

  forgetBlock(): void {
    this.named = false;
  }

  private word(w: BatchWriter, block: string, pageOffset: number, flag: number): void {
    if (pageOffset % TARGET_PAGE_SIZE !== 0 || pageOffset < 0) {
      throw new MigrationError(ErrorCode.INVALID_ARGUMENT, `page offset ${pageOffset} is not page aligned`);
    }
    if (!this.alwaysName && this.named && block === this.lastBlock) {
      w.be64(pageOffset + flag + RamFlag.CONTINUE);
    } else {
      w.be64(pageOffset + flag).cstr(block);
      this.lastBlock = block;
      this.named = true;
    }
  }

  zeroPage(w: BatchWriter, block: string, pageOffset: number): void {
    this.word(w, block, pageOffset, RamFlag.ZERO);
    w.u8(0);
  }

  /** ZERO records for `count` consecutive pages from `firstOffset` (one block named at most once). */
  zeroPages(w: BatchWriter, block: string, firstOffset: number, count: number): void {
    if (count <= 0) return;
    this.zeroPage(w, block, firstOffset);
    if (this.alwaysName) {
      for (let i = 1; i < count; i++) w.be64(firstOffset + i * TARGET_PAGE_SIZE + RamFlag.ZERO).cstr(block).u8(0);
      return;
    }
    w.be64u8Run(firstOffset + TARGET_PAGE_SIZE + RamFlag.ZERO + RamFlag.CONTINUE, TARGET_PAGE_SIZE, count - 1, 0);
  }

  /**
   * A normal page of TARGET_PAGE_SIZE bytes from `src` at `srcOffset`: copied into the batch, or
   * with `byReference` queued as a view of `src` (zero copy; see BatchWriter.view).
   */
  page(w: BatchWriter, block: string, pageOffset: number, src: Uint8Array, srcOffset: number, byReference = false): void {
    this.word(w, block, pageOffset, RamFlag.PAGE);
    if (byReference && Buffer.isBuffer(src)) w.view(src, srcOffset, TARGET_PAGE_SIZE);
    else w.copyFrom(src, srcOffset, TARGET_PAGE_SIZE);
  }

  /** An XBZRLE record of already-encoded bytes. */
  xbzrlePage(w: BatchWriter, block: string, pageOffset: number, enc: Uint8Array, encOffset: number, encLength: number): void {
    if (encLength <= 0 || encLength > TARGET_PAGE_SIZE) {
      throw new MigrationError(ErrorCode.INVALID_ARGUMENT, `XBZRLE length ${encLength} is outside 1–${TARGET_PAGE_SIZE}`);
    }
    this.word(w, block, pageOffset, RamFlag.XBZRLE);
    w.u8(0x01).be16(encLength).copyFrom(enc, encOffset, encLength);
  }

  /**
   * Send `cur` as a delta against `old` the way QEMU decides: nothing when unchanged
   * (returns 'unchanged'), XBZRLE when the delta fits a page, else a plain page.
   */
  deltaPage(
    w: BatchWriter,
    block: string,
    pageOffset: number,
    old: Uint8Array,
    oldOffset: number,
    cur: Uint8Array,
    curOffset: number,
  ): 'unchanged' | 'xbzrle' | 'page' {
    const n = xbzrleEncode(old, oldOffset, cur, curOffset, TARGET_PAGE_SIZE, this.encoded, 0, TARGET_PAGE_SIZE);
    if (n === 0) return 'unchanged';
    if (n === XBZRLE_OVERFLOW) {
      this.page(w, block, pageOffset, cur, curOffset);
      return 'page';
    }
    this.xbzrlePage(w, block, pageOffset, this.encoded, 0, n);
    return 'xbzrle';
  }

  /** A COMPRESS_PAGE record (QEMU 7.2 capability `compress`) of an already deflated page. */
  compressedPage(w: BatchWriter, block: string, pageOffset: number, zlibData: Uint8Array): void {
    if (zlibData.length === 0 || zlibData.length > COMPRESS_PAGE_MAX) {
      throw new MigrationError(ErrorCode.INVALID_ARGUMENT, `compressed page of ${zlibData.length} bytes is outside 1–${COMPRESS_PAGE_MAX}`);
    }
    this.word(w, block, pageOffset, RamFlag.COMPRESS_PAGE);
    w.be32(zlibData.length).bytes(zlibData);
  }
}
