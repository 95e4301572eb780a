// Runs of CONTINUE PAGE and ZERO records read straight out of the reader's head chunk, beside the
// record loop of ram-record-decoder.ts. That loop is large and slow to optimize: on a loaded
// machine a 512 MiB file was decoded mostly before its optimized code was ready. These are small,
// take everything as arguments (no closure, no per-call object) and see one record layout:
//
//   be64 (page offset | PAGE|CONTINUE), 4 KiB page  │  be64 (page offset | ZERO|CONTINUE), u8 fill
//
// Values are read out of the head chunk by index: a call per value kept the loops slow until
// optimized. Each loop stops at the first record it does not take (another type, a named block,
// an offset to refuse, a record not wholly in the head chunk); the record loop reads that one.

import { RamFlag, TARGET_PAGE_SIZE } from './constants.ts';
import type { ByteReader } from './reader.ts';
import type { BlockStats, PageObserver, RamSectionStats } from './ram-record-decoder.ts';

/** The flags in a RAM record's be64 word: the bits below the page size. */
export const RAM_RECORD_FLAGS_MASK = TARGET_PAGE_SIZE - 1;
const PAGE_RECORD_BYTES = 8 + TARGET_PAGE_SIZE;
const ZERO_RECORD_BYTES = 8 + 1;

/**
 * The CONTINUE PAGE and ZERO records of `block` that follow a page the decoder does not store (a
 * reader that hashes or only counts), while they are buffered in the head chunk and before
 * `packageEnd` (stream offset): counted, lent to the observer, skipped.
 */
export function skipPageRun(
  r: ByteReader,
  packageEnd: number,
  observer: PageObserver | undefined,
  block: number,
  blockLength: number,
  stats: RamSectionStats,
  bs: BlockStats,
): void {
  const chunk = r.headChunk;
  const view = r.headChunkView;
  const base = r.headOffset;
  const stop = headRunStop(r, packageEnd);
  const streamBase = r.streamOffset - base;
  let pages = 0;
  let zeros = 0;
  let at = base;
  while (at + ZERO_RECORD_BYTES <= stop) {
    const lo = view.getUint32(at + 4);
    const flags = lo & RAM_RECORD_FLAGS_MASK;
    const pageOffset = view.getUint32(at) * 0x100000000 + (lo - flags);
    if (pageOffset + TARGET_PAGE_SIZE > blockLength) break;
    if (flags === (RamFlag.PAGE | RamFlag.CONTINUE)) {
      if (at + PAGE_RECORD_BYTES > stop) break;
      if (observer !== undefined) observer.pageData(block, pageOffset, chunk, at + 8, streamBase + at + 8);
      pages++;
      at += PAGE_RECORD_BYTES;
    } else if (flags === (RamFlag.ZERO | RamFlag.CONTINUE)) {
      if (observer !== undefined) observer.pageFill(block, pageOffset, chunk[at + 8]!);
      zeros++;
      at += ZERO_RECORD_BYTES;
    } else break;
  }
  if (at === base) return;
  stats.normal += pages;
  stats.zero += zeros;
  stats.continued += pages + zeros;
  bs.normalPages += pages;
  bs.zeroPages += zeros;
  r.skip(at - base);
}

/**
 * Copies the pages of CONTINUE PAGE records from byte `from` of `chunk`, while each record is whole
 * before `to` and names a page inside `mem` (its block's memory), setting each page's bit in
 * `written` (one bit per page) when given; returns the records placed (each 8 + 4096 bytes). It
 * stops at the first record it does not take.
 */
export type PagePlacer = (chunk: Uint8Array, from: number, to: number, mem: Uint8Array, written: Uint32Array | undefined) => number;

/**
 * The CONTINUE PAGE records that follow a page the decoder stored in `mem`, while they are buffered
 * in the head chunk and before `packageEnd` (stream offset): placed by `placer` in one call
 * (the decoder's placePages, or where the page hooks run its target's placePageRun), counted,
 * skipped. What it does not take, the record loop reads.
 */
export function placePageRun(
  r: ByteReader,
  packageEnd: number,
  placer: PagePlacer,
  mem: Uint8Array,
  written: Uint32Array | undefined,
  stats: RamSectionStats,
  bs: BlockStats,
): void {
  const base = r.headOffset;
  const stop = headRunStop(r, packageEnd);
  if (stop - base < PAGE_RECORD_BYTES) return;
  const pages = placer(r.headChunk, base, stop, mem, written);
  if (pages === 0) return;
  stats.normal += pages;
  stats.continued += pages;
  bs.normalPages += pages;
  r.skip(pages * PAGE_RECORD_BYTES);
}

/**
 * The CONTINUE ZERO records (fill 0) that follow one for a page still zero since the start, as
 * long as their pages are too (`written`: one bit per page written non-zero) and they are buffered
 * in the head chunk before `packageEnd`: counted and skipped, as the record loop would, without
 * its per-record work. A fresh guest's first pass is mostly these (65 536 records for 256 MiB),
 * and the record loop took ~0.8 µs each before it was optimized.
 */
export function skipStillZeroRun(
  r: ByteReader,
  packageEnd: number,
  written: Uint32Array,
  blockLength: number,
  stats: RamSectionStats,
  bs: BlockStats,
): void {
  const chunk = r.headChunk;
  const view = r.headChunkView;
  const base = r.headOffset;
  const stop = headRunStop(r, packageEnd);
  let at = base;
  while (at + ZERO_RECORD_BYTES <= stop) {
    const lo = view.getUint32(at + 4);
    const flags = lo & RAM_RECORD_FLAGS_MASK;
    if (flags !== (RamFlag.ZERO | RamFlag.CONTINUE) || chunk[at + 8] !== 0) break;
    const pageOffset = view.getUint32(at) * 0x100000000 + (lo - flags);
    if (pageOffset + TARGET_PAGE_SIZE > blockLength) break;
    const page = pageOffset / TARGET_PAGE_SIZE;
    if ((written[page >>> 5]! & (1 << (page & 31))) !== 0) break;
    at += ZERO_RECORD_BYTES;
  }
  if (at === base) return;
  const zeros = (at - base) / ZERO_RECORD_BYTES;
  stats.zero += zeros;
  stats.continued += zeros;
  bs.zeroPages += zeros;
  r.skip(at - base);
}

/** Where a run in the head chunk must stop (an index into it): its end, or the package's. */
function headRunStop(r: ByteReader, packageEnd: number): number {
  return r.headOffset + Math.min(r.headAvailable, packageEnd - r.streamOffset);
}
