// A mapped-ram block list (capability mapped-ram, QEMU 9.0+): it spans every block's bitmap and
// pages, which lie at their own file offsets between one list entry and the next, so it is read
// piecewise, in file order, as the stream passes (wire-format.md §6; ram.ts has the header layout).

import { TARGET_PAGE_SIZE } from './constants.ts';
import { ErrorCode, type ErrorCodeValue } from './errors.ts';
import { MAPPED_RAM_HEADER_LENGTH, MAPPED_RAM_VERSION, type RamBlockInfo } from './ram.ts';
// A cycle with ram-record-decoder.ts, harmless: NEED_MORE is read only when a list is read.
import { NEED_MORE, type NeedMore, type PageObserver, type RamTarget } from './ram-record-decoder.ts';
import type { ByteReader } from './reader.ts';

/** What the RAM record decoder lends the list reader: its input, limits, target and failure. */
export interface MappedRamListContext {
  reader: ByteReader;
  /** The list's announced total (MEM_SIZE's page offset field). */
  total: number;
  ignoreShared: boolean;
  maxRamBlocks: number;
  ram: RamTarget | undefined;
  observer: PageObserver | undefined;
  scratchPage: Buffer;
  need(n: number): boolean;
  fail(code: ErrorCodeValue, message: string, relOffset?: number, extra?: { block?: string; pageOffset?: number }): never;
}

export class MappedRamListReader {
  private readonly o: MappedRamListContext;
  private readonly r: ByteReader;
  private readonly list: MappedRamList;
  private region: MappedRegion | undefined;

  /** At the MEM_SIZE record (its 8 bytes still unread, and skipped here). */
  constructor(o: MappedRamListContext) {
    this.o = o;
    this.r = o.reader;
    this.list = { offset: o.reader.streamOffset, total: o.total, left: o.total, blocks: [], memory: [], pagesPresent: [] };
    this.r.skip(8);
  }

  /**
   * The rest of a mapped-ram block list. After each entry (idstr, be64 length[, be64 gpa], then the
   * 28-byte MappedRamHeader: be32 version, be64 page_size, be64 bitmap_offset, be64 pages_offset)
   * the stream goes on at pages_offset + length; in between lie the block's bitmap (64-bit
   * little-endian words, bit p = page p is in the file) and its pages, each at its own offset.
   * Read in file order, so it streams: the bitmap first, then the pages it marks are copied as
   * they pass and the rest skipped (zero pages are never in the file).
   */
  read(): MappedRamList | NeedMore {
    const r = this.r;
    const m = this.list;
    for (;;) {
      if (this.region !== undefined) {
        if (!this.readMappedRegion(this.region)) return NEED_MORE;
        this.region = undefined;
        continue;
      }
      if (m.left === 0) return m;
      if (m.blocks.length >= this.o.maxRamBlocks) this.o.fail(ErrorCode.LIMIT_EXCEEDED, `block list has more than ${this.o.maxRamBlocks} blocks`);
      if (!this.o.need(1)) return NEED_MORE;
      const n = r.u8(0);
      if (n === 0) this.o.fail(ErrorCode.EMPTY_IDSTR, 'block list entry with an empty name');
      const extra = this.o.ignoreShared ? 8 : 0;
      const entry = 1 + n + 8 + extra + MAPPED_RAM_HEADER_LENGTH;
      if (!this.o.need(entry)) return NEED_MORE;
      const idstr = r.latin1(1, n);
      const length = r.be64(1 + n);
      if (length < 0 || length > m.left || length % TARGET_PAGE_SIZE !== 0 || m.blocks.some((b) => b.idstr === idstr)) {
        this.o.fail(ErrorCode.BAD_MEM_SIZE, m.blocks.some((b) => b.idstr === idstr) ? `block "${idstr}" listed twice` : `block "${idstr}" length ${length} does not fit the ${m.left} bytes the list has left in pages`, 0, { block: idstr });
      }
      const info: RamBlockInfo = { idstr, length };
      if (extra > 0) info.gpa = r.be64(1 + n + 8);
      const h = 1 + n + 8 + extra;
      const version = r.be32(h);
      const pageSize = r.be64(h + 4);
      const bitmapOffset = r.be64(h + 12);
      const pagesOffset = r.be64(h + 20);
      const headerEnd = r.streamOffset + entry;
      const pages = length / TARGET_PAGE_SIZE;
      const bitmapBytes = Math.ceil(pages / 64) * 8;
      const where = { block: idstr };
      if (version < 1 || version > MAPPED_RAM_VERSION) this.o.fail(ErrorCode.BAD_MAPPED_RAM, `mapped-ram header version ${version} (livemig reads version ${MAPPED_RAM_VERSION})`, h, where);
      if (pageSize !== TARGET_PAGE_SIZE) this.o.fail(ErrorCode.BAD_MAPPED_RAM, `mapped-ram page size ${pageSize} (expected ${TARGET_PAGE_SIZE})`, h + 4, where);
      if (bitmapOffset < headerEnd || bitmapOffset + bitmapBytes > pagesOffset) {
        this.o.fail(ErrorCode.BAD_MAPPED_RAM, `mapped-ram bitmap at file offset ${bitmapOffset} (${bitmapBytes} bytes) does not lie between the header's end (${headerEnd}) and the pages (${pagesOffset})`, h + 12, where);
      }
      if (pagesOffset % TARGET_PAGE_SIZE !== 0 || pagesOffset < 0 || pagesOffset + length > MAX_SAFE_OFFSET) {
        this.o.fail(ErrorCode.BAD_MAPPED_RAM, `mapped-ram pages of block "${idstr}" at file offset ${pagesOffset}, not page aligned or out of range`, h + 20, where);
      }
      m.blocks.push(info);
      m.left -= length;
      // The target sees the list grow: earlier blocks are repeated, and keep their memory.
      const memory = this.o.ram?.attachBlocks(m.blocks, m.offset) ?? [];
      m.memory = m.blocks.map((_, i) => memory[i]);
      this.region = { index: m.blocks.length - 1, bitmapOffset, bitmap: new Uint8Array(bitmapBytes), bitmapRead: 0, pagesOffset, end: pagesOffset + length };
      r.skip(entry);
    }
  }

  /** One block's region: skip to its bitmap, read it, then copy the pages it marks. False: more input needed. */
  private readMappedRegion(g: MappedRegion): boolean {
    const r = this.r;
    const mem = this.list.memory[g.index];
    for (;;) {
      const at = r.streamOffset;
      if (r.available === 0) return at >= g.end && this.finishRegion(g);
      if (at < g.bitmapOffset) {
        r.skip(Math.min(r.available, g.bitmapOffset - at));
      } else if (g.bitmapRead < g.bitmap.length) {
        const n = Math.min(r.available, g.bitmap.length - g.bitmapRead);
        r.copyTo(0, n, g.bitmap, g.bitmapRead);
        r.skip(n);
        g.bitmapRead += n;
      } else if (at < g.pagesOffset) {
        r.skip(Math.min(r.available, g.pagesOffset - at));
      } else if (at < g.end) {
        // A run of pages all in the file, or all absent, from here: copied or skipped whole.
        const rel = at - g.pagesOffset;
        const page = Math.floor(rel / TARGET_PAGE_SIZE);
        const present = (g.bitmap[page >>> 3]! & (1 << (page & 7))) !== 0;
        let runEnd = page + 1;
        const pages = (g.end - g.pagesOffset) / TARGET_PAGE_SIZE;
        while (runEnd < pages && ((g.bitmap[runEnd >>> 3]! & (1 << (runEnd & 7))) !== 0) === present) runEnd++;
        const n = Math.min(r.available, runEnd * TARGET_PAGE_SIZE - rel);
        if (present && mem !== undefined) r.copyTo(0, n, mem, rel);
        else if (present && this.o.observer !== undefined) {
          // A reader without the memory sees each whole page once, in order, where it lies.
          const whole = Math.floor(Math.min(n, r.available) / TARGET_PAGE_SIZE) * TARGET_PAGE_SIZE;
          if (rel % TARGET_PAGE_SIZE === 0 && whole === 0) return false;
          for (let k = 0; k < whole; k += TARGET_PAGE_SIZE) {
            const src = r.span(k, TARGET_PAGE_SIZE, this.o.scratchPage);
            this.o.observer.pageData(g.index, rel + k, src, r.spanOffset, r.streamOffset + k);
          }
          r.skip(whole);
          continue;
        }
        r.skip(n);
      } else {
        return this.finishRegion(g);
      }
    }
  }

  /** The block's pages in the file: its bitmap's set bits. */
  private finishRegion(g: MappedRegion): true {
    let present = 0;
    for (const byte of g.bitmap) present += popcount8(byte);
    this.list.pagesPresent.push(present);
    return true;
  }
}

const MAX_SAFE_OFFSET = 2 ** 53;

interface MappedRegion {
  index: number;
  bitmapOffset: number;
  bitmap: Uint8Array;
  bitmapRead: number;
  pagesOffset: number;
  /** pages_offset + length: where the stream goes on. */
  end: number;
}

/** A mapped-ram block list as read: its blocks, their memory (attached as the list grew) and pages present. */
export interface MappedRamList {
  offset: number;
  total: number;
  left: number;
  blocks: RamBlockInfo[];
  memory: (Uint8Array | undefined)[];
  /** Per block read so far: pages its bitmap marks present. */
  pagesPresent: number[];
}

function popcount8(b: number): number {
  b = b - ((b >> 1) & 0x55);
  b = (b & 0x33) + ((b >> 2) & 0x33);
  return (b + (b >> 4)) & 0x0f;
}
