// RAM records (wire-format.md §6): the body of a "ram" section, and all of a postcopy preempt
// channel, which carries bare RAM records ended by one EOS.
//
//   be64 (page offset | flags) ─┬─ MEM_SIZE: block list (idstr, be64 length[, be64 gpa])
//                               ├─ [cstr block unless CONTINUE] ZERO: u8 fill | PAGE: 4 KiB
//                               │    | XBZRLE: u8 0x01, be16 len, data | COMPRESS_PAGE: be32 len, zlib
//                               ├─ MULTIFD_FLUSH
//                               └─ EOS
//
// Page data is not turned into events: each page is copied once, from the receive chunk straight
// into the block memory the RamTarget handed over, and counted per block. A block given no
// memory has its pages lent to the target's PageObserver instead (a reader that only hashes them). A StreamDecoder reads
// RAM sections through one of these (sharing its ByteReader); a preempt channel uses one alone.
// The CONTINUE records that follow a page nobody stores, or a page still zero, are mostly taken by
// the small loops of page-runs.ts.

import { failAt, haveBytes, recordPlace } from './record-place.ts';
import { ENCODING_FLAG_XBZRLE, RamFlag, TARGET_PAGE_SIZE } from './constants.ts';
import { ErrorCode, type ErrorCodeValue, ProtocolError } from './errors.ts';
import { COMPRESS_PAGE_MAX, type RamBlockInfo } from './ram.ts';
import { type MappedRamList, MappedRamListReader } from './mapped-ram-list.ts';
import { inflateSync } from './lazy-builtins.ts';
import { type PagePlacer, placePageRun, RAM_RECORD_FLAGS_MASK, skipPageRun, skipStillZeroRun } from './page-runs.ts';
import { ByteReader } from './reader.ts';
import { xbzrleDecode, xbzrleLastFault } from './xbzrle.ts';

export const NEED_MORE: unique symbol = Symbol('need more bytes');
export type NeedMore = typeof NEED_MORE;

/** Where decoded pages go. */
export interface RamTarget {
  /**
   * The stream's block list arrived (MEM_SIZE). Return each block's memory (at least its
   * length), or undefined to count its pages without storing them. Throw a ConfigError to
   * refuse the list.
   */
  attachBlocks(blocks: readonly RamBlockInfo[], streamOffset: number): readonly (Uint8Array | undefined)[];
  /** A page was written (called once per ZERO/PAGE/XBZRLE/COMPRESS record that acceptPage did not refuse). */
  pagePlaced?(blockIndex: number, pageOffset: number): void;
  /**
   * Whether to write this page at all (postcopy: a page the guest already has and may have
   * changed since must not be overwritten by a late copy). Called before each page is placed.
   */
  acceptPage?(blockIndex: number, pageOffset: number): boolean;
  /**
   * Where the page hooks run: the CONTINUE PAGE records that follow a page record, taken at once,
   * each accepted and placed as acceptPage and pagePlaced would have it; `mem` is the memory
   * attachBlocks gave their block. Returns the records taken (8 + 4096 bytes each); 0 leaves them
   * to the record loop. Called as a function (bind it).
   */
  placePageRun?: PagePlacer;
  /**
   * Told each page of a block that attachBlocks gave no memory (a reader that hashes pages as
   * they pass instead of rebuilding RAM). Page data is lent for the call only.
   */
  pages?: PageObserver;
}

/** Pages of memoryless blocks as they are decoded; `pageOffset` is the page's byte offset in its block. */
export interface PageObserver {
  /** A PAGE record (dataStreamOffset: where its 4 KiB are in the stream), or an inflated COMPRESS_PAGE (dataStreamOffset -1). */
  pageData(blockIndex: number, pageOffset: number, src: Uint8Array, srcOffset: number, dataStreamOffset: number): void;
  /** A ZERO record: the page is `fill` in every byte. */
  pageFill(blockIndex: number, pageOffset: number, fill: number): void;
  /** An XBZRLE record: the page as it is now, 4 KiB at offset 0 of a buffer the decoder patches in place. */
  pageForDelta(blockIndex: number, pageOffset: number): Uint8Array;
}

export interface RamSectionStats {
  zero: number;
  normal: number;
  xbzrle: number;
  compressed: number;
  /** Page records that named their block. */
  named: number;
  /** Page records with CONTINUE. */
  continued: number;
  multifdFlush: number;
  eosOffset: number;
}

export interface BlockStats {
  idstr: string;
  length: number;
  zeroPages: number;
  normalPages: number;
  xbzrlePages: number;
  compressedPages: number;
}

export type RamBlocksEvent = { kind: 'ramBlocks'; offset: number; total: number; blocks: RamBlockInfo[] };
/**
 * RAM_SAVE_FLAG_MULTIFD_FLUSH (QEMU 8.0+ sources flushing multifd once per round): every multifd
 * channel's next SYNC belongs here, and the section's EOS no longer waits for one.
 */
export type MultifdFlushEvent = { kind: 'multifdFlush'; offset: number };

/** readRecords() consumed the EOS that ends a RAM section (or a preempt channel). */
export const RAM_EOS: unique symbol = Symbol('RAM EOS');
export type RamEos = typeof RAM_EOS;

export interface RamRecordDecoderOptions {
  ram?: RamTarget | undefined;
  /** Largest total RAM a block list may announce, bytes. Default 1 TiB. */
  maxRamBytes?: number | undefined;
  /** Most RAM blocks in a block list. Default 1024. */
  maxRamBlocks?: number | undefined;
  /** Capability x-ignore-shared: block list entries carry a guest address. */
  ignoreShared?: boolean | undefined;
  /** Capability mapped-ram: each block list entry is followed by the block's bitmap and page region. */
  mappedRam?: boolean | undefined;
  /** The target's memory is all zero to begin with: a ZERO record for a page never written is skipped. */
  zeroedMemory?: boolean | undefined;
  /** Call acceptPage/pagePlaced only while postcopy listens. Default false: for every page. */
  postcopyPageHooks?: boolean | undefined;
  /**
   * Copies a run of CONTINUE PAGE records' pages into their block at once (a native memcpy per
   * page, see page-runs.ts placePageRun), where no page hook runs. Without it each page is copied
   * by the record loop.
   */
  placePages?: PagePlacer | undefined;
}

/** A preempt channel's end: its EOS, at this stream offset. */
export type PreemptEnd = { kind: 'eos'; offset: number };

export function emptyRamSectionStats(): RamSectionStats {
  return { zero: 0, normal: 0, xbzrle: 0, compressed: 0, named: 0, continued: 0, multifdFlush: 0, eosOffset: -1 };
}

export class RamRecordDecoder {
  private readonly r: ByteReader;
  private readonly ram: RamTarget | undefined;
  private readonly observer: PageObserver | undefined;
  private readonly maxRamBytes: number;
  private readonly maxRamBlocks: number;
  private readonly zeroedMemory: boolean;
  private readonly postcopyPageHooks: boolean;
  private readonly placePages: PagePlacer | undefined;
  /** Learned from the configuration record by a StreamDecoder. */
  ignoreShared: boolean;
  /** Learned from the configuration record by a StreamDecoder: the mapped-ram file layout. */
  mappedRam: boolean;
  /** A mapped-ram block list being read (it spans every block's pages, so it is read piecewise). */
  private mapped: MappedRamListReader | undefined;
  /** A StreamDecoder's PACKAGED blob end (stream offset): no record may run past it. */
  packageEnd = Infinity;
  /** The section being read, for error messages. */
  section: { sectionId: number; idstr: string } | undefined;
  /** MULTIFD_FLUSH records read so far: a source that sends them syncs multifd once per round, not per section. */
  multifdFlushes = 0;

  private blocks: RamBlockInfo[] = [];
  private blockIndex = new Map<string, number>();
  private memory: (Uint8Array | undefined)[] = [];
  /** With zeroedMemory: per block, one bit per page this stream wrote non-zero bytes to. */
  private written: (Uint32Array | undefined)[] = [];
  private stats: BlockStats[] = [];
  /** Index of the block named last on this channel; -1 before any. */
  private lastBlock = -1;
  private readonly scratch = Buffer.allocUnsafeSlow(COMPRESS_PAGE_MAX);
  private readonly scratchPage = Buffer.allocUnsafeSlow(TARGET_PAGE_SIZE);
  // Alone (a preempt channel): its stats, whether its EOS came, and the failure that stops it.
  private readonly channelStats = emptyRamSectionStats();
  private ended = false;
  private failure: ProtocolError | undefined;

  /** `reader`: a StreamDecoder's; without one this decoder reads its own pushed chunks. */
  constructor(options: RamRecordDecoderOptions = {}, reader?: ByteReader) {
    this.r = reader ?? new ByteReader(0);
    this.ram = options.ram;
    this.observer = options.ram?.pages;
    this.maxRamBytes = options.maxRamBytes ?? 2 ** 40;
    this.maxRamBlocks = options.maxRamBlocks ?? 1024;
    this.ignoreShared = options.ignoreShared ?? false;
    this.mappedRam = options.mappedRam ?? false;
    this.zeroedMemory = options.zeroedMemory ?? false;
    this.postcopyPageHooks = options.postcopyPageHooks ?? false;
    this.placePages = options.placePages;
  }

  /**
   * A postcopy preempt channel: bare RAM records for `blocks` (the main stream's list), ended by
   * one EOS. Its records are postcopy's (ZERO and PAGE only), and the page hooks always run.
   */
  static forPreemptChannel(ram: RamTarget, blocks: readonly RamBlockInfo[]): RamRecordDecoder {
    const d = new RamRecordDecoder({ ram });
    d.installBlocks(blocks.map((b) => ({ ...b })), 0);
    return d;
  }

  get ramBlocks(): readonly RamBlockInfo[] {
    return this.blocks;
  }

  /** Page-record counts per block so far. */
  blockStats(): readonly BlockStats[] {
    return this.stats;
  }

  /** Forget the last named block (a new channel: the next page record must name its block). */
  forgetBlock(): void {
    this.lastBlock = -1;
  }

  // ---- alone: a preempt channel ---------------------------------------------------------------

  push(chunk: Uint8Array): void {
    if (this.failure !== undefined) throw this.failure;
    this.r.push(chunk);
  }

  /** Copy out the undecoded bytes so the caller may reuse its read buffer (after next() gave NEED_MORE). */
  retainUnread(): void {
    this.r.retainUnread();
  }

  /** Place the buffered records' pages; the channel's EOS once it comes, else NEED_MORE. */
  next(): PreemptEnd | NeedMore {
    if (this.failure !== undefined) throw this.failure;
    try {
      if (this.ended) {
        if (this.r.available > 0) this.fail(ErrorCode.TRAILING_DATA, `byte 0x${this.r.u8(0).toString(16).padStart(2, '0')} after the preempt channel's EOS`);
        return NEED_MORE;
      }
      const res = this.readRecords(this.channelStats, true);
      if (res === NEED_MORE) return NEED_MORE;
      // Listening, MEM_SIZE is refused: only the EOS gets here.
      this.ended = true;
      return { kind: 'eos', offset: this.channelStats.eosOffset };
    } catch (err) {
      if (err instanceof ProtocolError) this.failure = err;
      throw err;
    }
  }

  // ---- internals ------------------------------------------------------------------------------

  /** True when n bytes (relative) are buffered; throws if a package would be overrun. */
  private need(n: number): boolean {
    return haveBytes(this.r, n, this.packageEnd, this.section);
  }

  private fail(code: ErrorCodeValue, message: string, relOffset = 0, extra: { block?: string; pageOffset?: number } = {}): never {
    return failAt(code, message, this.r, this.section, relOffset, extra);
  }

  /**
   * RAM records until EOS (returns RAM_EOS, the EOS consumed) or a block list (the ramBlocks
   * event), counting them in `stats`. `listening`: postcopy listens (only ZERO and PAGE records,
   * and the target's page hooks run).
   */
  readRecords(stats: RamSectionStats, listening: boolean): RamBlocksEvent | MultifdFlushEvent | RamEos | NeedMore {
    const r = this.r;
    const hooks = listening || !this.postcopyPageHooks;
    const placed = hooks ? this.ram?.pagePlaced : undefined;
    const accept = hooks ? this.ram?.acceptPage : undefined;
    const hookedPlacer = placed !== undefined ? this.ram?.placePageRun : undefined;
    if (this.mapped !== undefined) return this.readMappedList();
    for (;;) {
      if (!this.need(8)) return NEED_MORE;
      const hi = r.be32(0);
      const lo = r.be32(4);
      const flags = lo & RAM_RECORD_FLAGS_MASK;
      const type = flags & ~RamFlag.CONTINUE;
      const pageOffset = hi * 0x100000000 + (lo - flags);
      if (type === RamFlag.EOS) {
        stats.eosOffset = r.streamOffset;
        r.skip(8);
        return RAM_EOS;
      }
      let body: number;
      switch (type) {
        case RamFlag.ZERO:
          body = 1;
          break;
        case RamFlag.PAGE:
          body = TARGET_PAGE_SIZE;
          break;
        case RamFlag.XBZRLE:
        case RamFlag.COMPRESS_PAGE:
          body = -1; // read below, after the block name
          break;
        case RamFlag.MEM_SIZE:
          if (listening) this.badFlag(flags, 'once postcopy is listening');
          if (hi >= 0x200000 || pageOffset > this.maxRamBytes) {
            this.fail(ErrorCode.LIMIT_EXCEEDED, `block list announces ${hi >= 0x200000 ? 'over 2^53' : pageOffset} bytes of RAM (limit ${this.maxRamBytes})`);
          }
          return this.mappedRam ? this.startMappedList(pageOffset) : this.readMemSize(pageOffset);
        case RamFlag.MULTIFD_FLUSH: {
          if (listening) this.badFlag(flags, 'once postcopy is listening');
          if (this.mappedRam) this.badFlag(flags, 'with mapped-ram');
          const offset = r.streamOffset;
          r.skip(8);
          stats.multifdFlush++;
          this.multifdFlushes++;
          return { kind: 'multifdFlush', offset };
        }
        default:
          this.badFlag(flags, '');
      }
      if (listening && type !== RamFlag.ZERO && type !== RamFlag.PAGE) this.badFlag(flags, 'once postcopy is listening');
      // mapped-ram pages live at their place in the file, never in records (QEMU refuses these too).
      if (this.mappedRam) this.badFlag(flags, 'with mapped-ram');
      // Block: named, or the one named last on this channel.
      let k = 8;
      let block: number;
      const named = (flags & RamFlag.CONTINUE) === 0;
      if (named) {
        if (!this.need(9)) return NEED_MORE;
        const n = r.u8(8);
        if (!this.need(9 + n)) return NEED_MORE;
        const name = r.latin1(9, n);
        const idx = this.blockIndex.get(name);
        if (idx === undefined) this.fail(ErrorCode.UNKNOWN_BLOCK, `RAM record names unknown block "${name}"`, 0, { block: name });
        block = idx;
        k = 9 + n;
      } else {
        if (this.lastBlock < 0) this.fail(ErrorCode.CONTINUE_WITHOUT_BLOCK, 'RAM record with CONTINUE before any block was named');
        block = this.lastBlock;
      }
      if (body < 0) {
        if (type === RamFlag.XBZRLE) {
          if (!this.need(k + 3)) return NEED_MORE;
          const enc = r.u8(k);
          if (enc !== ENCODING_FLAG_XBZRLE) this.fail(ErrorCode.BAD_XBZRLE, `XBZRLE encoding flag 0x${enc.toString(16)} (expected 0x01)`, k);
          const encLen = r.be16(k + 1);
          if (encLen > TARGET_PAGE_SIZE) this.fail(ErrorCode.BAD_XBZRLE, `XBZRLE length ${encLen} exceeds the page size`, k + 1);
          body = 3 + encLen;
        } else {
          if (!this.need(k + 4)) return NEED_MORE;
          const clen = r.be32(k);
          if (clen === 0 || clen > COMPRESS_PAGE_MAX) {
            this.fail(ErrorCode.LIMIT_EXCEEDED, `compressed page of ${clen} bytes (at most ${COMPRESS_PAGE_MAX})`, k);
          }
          body = 4 + clen;
        }
      }
      const total = k + body;
      if (!this.need(total)) return NEED_MORE;
      const info = this.blocks[block]!;
      if (hi >= 0x200000 || pageOffset + TARGET_PAGE_SIZE > info.length) {
        this.fail(
          ErrorCode.ILLEGAL_RAM_OFFSET,
          `RAM offset 0x${pageOffset.toString(16)} is outside block "${info.idstr}" (length 0x${info.length.toString(16)})`,
          0,
          { block: info.idstr, pageOffset },
        );
      }
      let mem = this.memory[block];
      const bs = this.stats[block]!;
      // A page refused (postcopy: another thread placed it, or is placing it) is not reported placed.
      let accepted = true;
      if (accept !== undefined && mem !== undefined && !accept.call(this.ram, block, pageOffset)) {
        mem = undefined;
        accepted = false;
      }
      const written = this.written[block];
      if (written !== undefined) {
        const page = pageOffset / TARGET_PAGE_SIZE;
        const bit = 1 << (page & 31);
        if (type === RamFlag.ZERO && r.u8(k) === 0 && (written[page >>> 5]! & bit) === 0) {
          // Still zero since the start: nothing to clear.
          stats.zero++;
          bs.zeroPages++;
          if (named) {
            stats.named++;
            this.lastBlock = block;
          } else stats.continued++;
          r.skip(total);
          if (placed !== undefined && accepted) placed.call(this.ram, block, pageOffset);
          else if (placed === undefined && accept === undefined) skipStillZeroRun(r, this.packageEnd, written, info.length, stats, bs);
          continue;
        }
        written[page >>> 5] = written[page >>> 5]! | bit;
      }
      switch (type) {
        case RamFlag.ZERO:
          if (mem !== undefined) mem.fill(r.u8(k), pageOffset, pageOffset + TARGET_PAGE_SIZE);
          else if (this.observer !== undefined) this.observer.pageFill(block, pageOffset, r.u8(k));
          stats.zero++;
          bs.zeroPages++;
          break;
        case RamFlag.PAGE:
          if (mem !== undefined) r.copyTo(k, TARGET_PAGE_SIZE, mem, pageOffset);
          else if (this.observer !== undefined) {
            const src = r.span(k, TARGET_PAGE_SIZE, this.scratchPage);
            this.observer.pageData(block, pageOffset, src, r.spanOffset, r.streamOffset + k);
          }
          stats.normal++;
          bs.normalPages++;
          break;
        case RamFlag.XBZRLE: {
          const encLen = body - 3;
          const src = r.span(k + 3, encLen, this.scratch);
          const at = r.spanOffset;
          let dst: Uint8Array = this.scratchPage;
          let dstOffset = 0;
          if (mem !== undefined) {
            dst = mem;
            dstOffset = pageOffset;
          } else if (this.observer !== undefined) {
            dst = this.observer.pageForDelta(block, pageOffset);
          }
          if (xbzrleDecode(src, at, encLen, dst, dstOffset, TARGET_PAGE_SIZE) < 0) {
            this.fail(ErrorCode.BAD_XBZRLE, `malformed XBZRLE page: ${xbzrleLastFault}`, k + 3, { block: info.idstr, pageOffset });
          }
          stats.xbzrle++;
          bs.xbzrlePages++;
          break;
        }
        case RamFlag.COMPRESS_PAGE: {
          const clen = body - 4;
          const src = r.span(k + 4, clen, this.scratch);
          let page: Buffer;
          try {
            page = inflateSync(src.subarray(r.spanOffset, r.spanOffset + clen), TARGET_PAGE_SIZE);
          } catch (cause) {
            throw new ProtocolError(ErrorCode.BAD_COMPRESSED_PAGE, `compressed page does not inflate: ${(cause as Error).message}`, {
              ...recordPlace(r.streamOffset + k + 4, this.section),
              block: info.idstr,
              pageOffset,
              cause,
            });
          }
          if (page.length !== TARGET_PAGE_SIZE) {
            this.fail(ErrorCode.BAD_COMPRESSED_PAGE, `compressed page inflates to ${page.length} bytes, not a page`, k + 4, {
              block: info.idstr,
              pageOffset,
            });
          }
          if (mem !== undefined) mem.set(page, pageOffset);
          else if (this.observer !== undefined) this.observer.pageData(block, pageOffset, page, 0, -1);
          stats.compressed++;
          bs.compressedPages++;
          break;
        }
      }
      if (named) {
        stats.named++;
        this.lastBlock = block;
      } else {
        stats.continued++;
      }
      r.skip(total);
      if (placed !== undefined && accepted) placed.call(this.ram, block, pageOffset);
      if ((type === RamFlag.PAGE || type === RamFlag.ZERO) && mem === undefined && placed === undefined && accept === undefined && written === undefined) {
        skipPageRun(r, this.packageEnd, this.observer, block, info.length, stats, bs);
      } else if (type === RamFlag.PAGE && mem !== undefined && placed === undefined && accept === undefined && this.placePages !== undefined) {
        placePageRun(r, this.packageEnd, this.placePages, mem, written, stats, bs);
      } else if (type === RamFlag.PAGE && hookedPlacer !== undefined && this.memory[block] !== undefined) {
        placePageRun(r, this.packageEnd, hookedPlacer, this.memory[block]!, written, stats, bs);
      }
    }
  }

  private badFlag(flags: number, why: string): never {
    const names: string[] = [];
    for (const [name, bit] of Object.entries(RamFlag)) if ((flags & bit) !== 0) names.push(name);
    this.fail(
      ErrorCode.UNKNOWN_RAM_FLAG,
      `RAM record flags 0x${flags.toString(16).padStart(3, '0')} (${names.join('|') || 'none'}) are not a valid record type${why ? ' ' + why : ''}`,
    );
  }

  private readMemSize(total: number): RamBlocksEvent | NeedMore {
    const r = this.r;
    const extra = this.ignoreShared ? 8 : 0;
    const blocks: RamBlockInfo[] = [];
    const seen = new Set<string>();
    let left = total;
    let k = 8;
    while (left > 0) {
      if (blocks.length >= this.maxRamBlocks) this.fail(ErrorCode.LIMIT_EXCEEDED, `block list has more than ${this.maxRamBlocks} blocks`, k);
      if (!this.need(k + 1)) return NEED_MORE;
      const n = r.u8(k);
      if (n === 0) this.fail(ErrorCode.EMPTY_IDSTR, 'block list entry with an empty name', k);
      if (!this.need(k + 1 + n + 8 + extra)) return NEED_MORE;
      const idstr = r.latin1(k + 1, n);
      const length = r.be64(k + 1 + n);
      if (length < 0 || length > left || length % TARGET_PAGE_SIZE !== 0 || seen.has(idstr)) {
        this.fail(
          ErrorCode.BAD_MEM_SIZE,
          seen.has(idstr)
            ? `block "${idstr}" listed twice`
            : length % TARGET_PAGE_SIZE !== 0 && length > 0 && length <= left
              ? `block "${idstr}" length 0x${length.toString(16)} is not page aligned`
              : `block "${idstr}" length ${length < 0 ? '≥ 2^53' : length} exceeds the ${left} bytes the list has left`,
          k,
          { block: idstr },
        );
      }
      const info: RamBlockInfo = { idstr, length };
      if (extra > 0) info.gpa = r.be64(k + 1 + n + 8);
      blocks.push(info);
      seen.add(idstr);
      left -= length;
      k += 1 + n + 8 + extra;
    }
    const offset = r.streamOffset;
    this.installBlocks(blocks, offset);
    r.skip(k);
    return { kind: 'ramBlocks', offset, total, blocks };
  }


  /** MEM_SIZE with mapped-ram: the list is read entry by entry, each block's region in between. */
  private startMappedList(total: number): RamBlocksEvent | NeedMore {
    this.mapped = new MappedRamListReader({
      reader: this.r,
      total,
      ignoreShared: this.ignoreShared,
      maxRamBlocks: this.maxRamBlocks,
      ram: this.ram,
      observer: this.observer,
      scratchPage: this.scratchPage,
      need: (n) => this.need(n),
      fail: (code, message, relOffset, extra) => this.fail(code, message, relOffset, extra),
    });
    return this.readMappedList();
  }

  private readMappedList(): RamBlocksEvent | NeedMore {
    const m = this.mapped!;
    const list = m.read();
    if (list === NEED_MORE) return NEED_MORE;
    this.mapped = undefined;
    this.adoptBlocks(list);
    return { kind: 'ramBlocks', offset: list.offset, total: list.total, blocks: list.blocks };
  }

  /** A block list read piecewise: its memory was attached as it grew; its pages are in place. */
  private adoptBlocks(m: MappedRamList): void {
    const blocks = m.blocks;
    this.blocks = blocks;
    this.blockIndex = new Map(blocks.map((b, i) => [b.idstr, i]));
    this.memory = m.memory;
    // No record follows that could need them: mapped-ram sends no ZERO or PAGE records.
    this.written = blocks.map(() => undefined);
    this.stats = blocks.map((b, i) => ({ idstr: b.idstr, length: b.length, zeroPages: 0, normalPages: m.pagesPresent[i] ?? 0, xbzrlePages: 0, compressedPages: 0 }));
    this.lastBlock = -1;
  }

  /** The block list of this stream (MEM_SIZE, or a resumed channel's): the target attaches its memory. */
  installBlocks(blocks: RamBlockInfo[], offset: number): void {
    const memory = this.ram?.attachBlocks(blocks, offset) ?? [];
    this.blocks = blocks;
    this.blockIndex = new Map(blocks.map((b, i) => [b.idstr, i]));
    this.memory = blocks.map((_, i) => memory[i]);
    this.written = blocks.map((b, i) =>
      this.zeroedMemory && memory[i] !== undefined ? new Uint32Array(Math.ceil(b.length / TARGET_PAGE_SIZE / 32)) : undefined,
    );
    this.stats = blocks.map((b) => ({ idstr: b.idstr, length: b.length, zeroPages: 0, normalPages: 0, xbzrlePages: 0, compressedPages: 0 }));
    this.lastBlock = -1;
  }
}
