// RAM as the biggest iterative device (QEMU's SaveVMHandlers for "ram"): the migration bitmap,
// the scan, and page records for each dirty page.
//
//   migration bitmap (one per block, 1 bit per page): 1 = must be sent
//   setup: all ones; sync(): OR in the guest's dirty log (fetch-and-clear)
//   scan:  cursor (block, page) → next set bit → clear it → ZERO | XBZRLE | PAGE record
//
// The bit is cleared before the page is read, as QEMU does: a guest write after that sets
// the dirty log again and the page goes out once more.

import { type BatchWriter, RamRecordWriter, TARGET_PAGE_SIZE, writeMemSize, writeMultifdFlush } from '@livemig/protocol';
import type { Guest, IterativeDevice } from '@livemig/guest';
import type { MultifdSender } from './multifd-sender.ts';
import { XbzrleCache } from './xbzrle-cache.ts';
import { popcount as popcount32 } from '@livemig/guest';

const ZERO_PAGE = Buffer.alloc(TARGET_PAGE_SIZE);

/**
 * saveIterate's deadline: true once `ms` have passed on `now` since `started`. Every caller makes
 * it here (with the same `now`, see migration.ts' monotonicNow), so the one call to it in the
 * scan stays a call V8 has seen before, not a new target that throws the scan's optimised code
 * away (warm-up.ts runs the scan before any migration does).
 */
export function iterationDeadline(now: () => number, started: number, ms: number): () => boolean {
  return () => now() - started >= ms;
}
/** mapped-ram: contiguous pages are written in one pwrite, up to this many bytes. */
const MAPPED_RUN_BYTES = 1024 * 1024;
/** Check the clock every this many pages (QEMU: 64) for the 50 ms iteration cap. */
const TIME_CHECK_PAGES = 64;

export interface RamStats {
  /** Zero pages sent (QEMU's "duplicate"). */
  duplicate: number;
  normal: number;
  xbzrlePages: number;
  xbzrleBytes: number;
  xbzrleOverflow: number;
  /** Pages found unchanged against the cache (nothing sent). */
  xbzrleUnchanged: number;
  /** Full passes over RAM completed by the scan. */
  rounds: number;
  dirtySyncCount: number;
}

export interface RamSaverOptions {
  /** xbzrle capability: cache size in bytes, or 0 for off. */
  xbzrleCacheBytes: number;
  /** Capability multifd: normal pages go to these channels (ZERO records stay on the main one). */
  multifd?: MultifdSender;
  /**
   * cpr-exec: RAM stays where it is (shared memory the next image maps), as QEMU's x-ignore-shared
   * blocks: the block list carries each block's guest-physical address and no page is ever sent.
   */
  shared?: boolean;
  /**
   * Multifd dialect of 8.1+ machine types: every channel syncs once per scan of RAM, where the
   * scan wraps, announced by RAM_SAVE_FLAG_MULTIFD_FLUSH on the main channel (dialect.ts).
   */
  multifdSyncPerRound?: boolean;
  /** Multifd dialect of 9.0+ machine types: zero pages ride in the multifd packets. */
  multifdZeroPages?: boolean;
}

/** Where a mapped-ram file takes pages and bitmaps (runtime's PositionedFileChannel). */
export interface MappedRamFile {
  writeAt(buf: Uint8Array, offset: number): void;
}

/** One block's place in a mapped-ram file. */
export interface MappedRamBlock {
  bitmapOffset: number;
  pagesOffset: number;
  /** Pages in the file (bit p = page p, little-endian 64-bit words as QEMU writes them). */
  bitmap: Uint8Array;
}

export class RamSaver implements IterativeDevice {
  readonly idstr = 'ram';
  readonly instanceId = 0;
  readonly versionId = 4;
  /** RAM data is parsed by the stream decoder, not sized. */
  readonly layout = 0;
  private readonly guest: Guest;
  private readonly views: Buffer[];
  /** The same memory as 32-bit words: the zero-page test looks at a word before it calls memcmp. */
  private readonly words: Int32Array[];
  readonly bitmaps: Uint32Array[];
  /** Pages set in the migration bitmaps. */
  dirtyPages = 0;
  private cursorBlock = 0;
  private cursorPage = 0;
  private readonly rec = new RamRecordWriter();
  readonly xbzrle: XbzrleCache | undefined;
  private readonly scratch = Buffer.alloc(TARGET_PAGE_SIZE);
  readonly stats: RamStats = {
    duplicate: 0,
    normal: 0,
    xbzrlePages: 0,
    xbzrleBytes: 0,
    xbzrleOverflow: 0,
    xbzrleUnchanged: 0,
    rounds: 0,
    dirtySyncCount: 0,
  };
  readonly totalPages: number;
  private readonly multifd: MultifdSender | undefined;
  private readonly syncPerRound: boolean;
  private readonly zeroPagesInMultifd: boolean;
  /** The scan wrapped since the last look (a round ended). */
  private roundEnded = false;
  /** Capability mapped-ram: pages go to their place in the file, not into records. */
  private mapped: { file: MappedRamFile; blocks: MappedRamBlock[] } | undefined;
  /** mapped-ram: the run of contiguous pages not yet written (block index, byte range). */
  private runBlock = -1;
  private runStart = 0;
  private runEnd = 0;
  /** Bytes written into the mapped-ram file's page regions and bitmaps. */
  mappedBytes = 0;
  private readonly shared: boolean;
  /**
   * Normal pages on the main channel go by reference (BatchWriter.view) instead of copied: set
   * while the channel's writer gathers refs itself (StreamOut.takesRefs, the native writev).
   * Through Node's own writes a view per page costs about what the copy does.
   */
  pagesByReference = false;

  constructor(guest: Guest, options: RamSaverOptions) {
    this.guest = guest;
    this.multifd = options.multifd;
    this.syncPerRound = this.multifd !== undefined && options.multifdSyncPerRound === true;
    this.zeroPagesInMultifd = this.multifd !== undefined && options.multifdZeroPages === true;
    this.shared = options.shared === true;
    this.views = guest.ram.blocks.map((_, i) => guest.ram.view(i));
    this.words = this.views.map((v) => new Int32Array(v.buffer, v.byteOffset, Math.floor(v.byteLength / 4)));
    this.bitmaps = guest.ram.blocks.map((b) => new Uint32Array(Math.ceil(b.pageCount / 32)));
    this.totalPages = guest.ram.blocks.reduce((a, b) => a + b.pageCount, 0);
    this.xbzrle = options.xbzrleCacheBytes > 0 ? new XbzrleCache(options.xbzrleCacheBytes) : undefined;
  }

  /** START data: the block list. Starts dirty logging with every page dirty (sync 1). */
  saveSetup(w: BatchWriter): void {
    writeMemSize(
      w,
      this.guest.ram.blocks.map((b) => ({ idstr: b.idstr, length: b.length, gpa: b.globalOffset })),
      { ignoreShared: this.shared },
    );
    this.startDirtyLogging();
  }

  /**
   * mapped-ram (the block list, with each block's place in the file, was written by the caller):
   * from here pages go to `file` at their offsets, and complete() writes the bitmaps.
   */
  useMappedRam(file: MappedRamFile, blocks: MappedRamBlock[]): void {
    this.mapped = { file, blocks };
  }

  /** Dirty logging on, every page dirty (sync 1). */
  startDirtyLogging(): void {
    this.rec.forgetBlock();
    this.stats.dirtySyncCount = 1;
    // Shared RAM: nothing to send, now or later (the bitmaps stay empty).
    if (this.shared) return;
    this.guest.ram.clearDirtyLog();
    for (const [i, b] of this.guest.ram.blocks.entries()) {
      const bm = this.bitmaps[i]!;
      bm.fill(0xffffffff);
      const tail = b.pageCount & 31;
      if (tail !== 0) bm[bm.length - 1] = (2 ** tail - 1) >>> 0;
    }
    this.dirtyPages = this.totalPages;
  }

  pendingEstimate(): number {
    return this.dirtyPages * TARGET_PAGE_SIZE;
  }

  /** Syncs the dirty log first (QEMU's migration_bitmap_sync), then counts. */
  pendingExact(): number {
    this.sync();
    return this.pendingEstimate();
  }

  /** Merge the guest's dirty log into the migration bitmap; returns pages newly dirty. */
  sync(): number {
    if (this.shared) return 0;
    let added = 0;
    for (let i = 0; i < this.bitmaps.length; i++) added += this.guest.ram.syncDirty(i, this.bitmaps[i]!);
    this.dirtyPages += added;
    this.stats.dirtySyncCount++;
    return added;
  }

  saveIterate(w: BatchWriter, maxBytes: number, deadline?: () => boolean): boolean {
    return this.iterate(w, maxBytes, deadline);
  }

  /** Guest stopped: every dirty page, no cache insertion (QEMU's last stage). */
  saveComplete(w: BatchWriter, maxBytes: number): boolean {
    const empty = this.iterate(w, maxBytes, undefined, true);
    if (empty && this.mapped !== undefined) {
      // The bitmaps say which pages the file holds: written last, as QEMU does.
      for (const b of this.mapped.blocks) {
        this.mapped.file.writeAt(b.bitmap, b.bitmapOffset);
        this.mappedBytes += b.bitmap.length;
      }
    }
    return empty;
  }

  cleanup(): void {
    // Dirty logging simply stops being read; the log keeps accumulating for the next attempt.
  }

  private xbzrleOff = false;

  private get xbzrleActive(): boolean {
    // As in QEMU, multifd takes the normal pages before XBZRLE could.
    return this.xbzrle !== undefined && this.stats.rounds > 0 && !this.xbzrleOff && this.multifd === undefined;
  }

  /**
   * Send dirty pages until `maxBytes` were encoded, `deadline()` says stop (checked every 64
   * pages), or none is left. Returns true when no dirty page is left.
   */
  private iterate(w: BatchWriter, maxBytes: number, deadline?: () => boolean, final = false): boolean {
    const start = this.encodedBytes(w);
    let sinceCheck = 0;
    while (this.dirtyPages > 0) {
      if (this.encodedBytes(w) - start >= maxBytes) break;
      if (deadline !== undefined && ++sinceCheck >= TIME_CHECK_PAGES) {
        sinceCheck = 0;
        if (deadline()) break;
      }
      const found = this.findDirty();
      if (this.roundEnded) {
        this.roundEnded = false;
        if (this.syncPerRound) this.syncMultifd(w);
      }
      if (!found) break;
      const run = this.knownZeroRun();
      if (run > 0) {
        // Never-written pages: ZERO records straight from the bitmaps, memory untouched.
        const block = this.guest.ram.blocks[this.cursorBlock]!;
        if (this.mapped !== undefined) {
          // Zero pages are not in a mapped-ram file: their bits say so.
          const bitmap = this.mapped.blocks[this.cursorBlock]!.bitmap;
          for (let p = this.cursorPage; p < this.cursorPage + run; p++) bitmap[p >>> 3] = bitmap[p >>> 3]! & ~(1 << (p & 7));
        } else if (this.zeroPagesInMultifd) {
          const mem = this.views[this.cursorBlock]!;
          for (let i = 0, off = this.cursorPage * TARGET_PAGE_SIZE; i < run; i++, off += TARGET_PAGE_SIZE) this.multifd!.queueZeroPage(block.idstr, mem, off);
        } else {
          this.rec.zeroPages(w, block.idstr, this.cursorPage * TARGET_PAGE_SIZE, run);
        }
        this.stats.duplicate += run;
        this.cursorPage += run - 1;
        if (this.xbzrleActive) {
          for (let i = 0; i < run; i++) this.xbzrle!.insertZero(block.globalOffset + (this.cursorPage - i) * TARGET_PAGE_SIZE, this.stats.dirtySyncCount);
        }
        sinceCheck += run;
        continue;
      }
      this.sendPage(w, this.cursorBlock, this.cursorPage, final);
    }
    this.writeMappedRun();
    return this.dirtyPages === 0;
  }

  /**
   * A multifd sync point: every channel's open packet and a SYNC packet queued, and
   * RAM_SAVE_FLAG_MULTIFD_FLUSH on the main channel, after which the destination waits for them.
   */
  syncMultifd(w: BatchWriter): void {
    this.multifd!.queueSync();
    writeMultifdFlush(w);
  }

  /** Bytes encoded so far: the main channel's and the multifd channels'. */
  encodedBytes(w: BatchWriter): number {
    return w.totalBytes + (this.multifd?.queuedBytes ?? 0) + this.mappedBytes + (this.runEnd - this.runStart);
  }

  /** Move the cursor to the next dirty page (wrapping), clearing its bit; false if none. */
  private findDirty(): boolean {
    const nBlocks = this.bitmaps.length;
    for (let visited = 0; visited <= nBlocks; visited++) {
      const bm = this.bitmaps[this.cursorBlock]!;
      let w = this.cursorPage >>> 5;
      let word = bm[w]! & (~0 << (this.cursorPage & 31));
      while (word === 0 && ++w < bm.length) word = bm[w]!;
      if (word !== 0) {
        const bit = 31 - Math.clz32(word & -word);
        bm[w] = (bm[w]! & ~(1 << bit)) >>> 0;
        this.cursorPage = (w << 5) + bit;
        this.dirtyPages--;
        return true;
      }
      // Block exhausted: on to the next; a wrap to block 0 completes a round.
      this.cursorPage = 0;
      this.cursorBlock++;
      if (this.cursorBlock === nBlocks) {
        this.cursorBlock = 0;
        this.stats.rounds++;
        this.roundEnded = true;
      }
    }
    return false;
  }

  /**
   * Postcopy: send a requested page if it is still to be sent (else the request is dropped, as
   * QEMU does), and move the background scan there (locality). Returns true when it was sent.
   */
  sendRequested(w: BatchWriter, blockIndex: number, page: number): boolean {
    if (!this.takeDirty(blockIndex, page)) return false;
    this.cursorBlock = blockIndex;
    this.cursorPage = page;
    this.sendPage(w, blockIndex, page, true);
    return true;
  }

  /**
   * Postcopy: a requested page goes out elsewhere (the page server, page-server.ts). Clear its
   * bit so the background does not send it again, and move the scan there (locality), as for a
   * request served here. Returns false when it had gone already.
   */
  takeRequested(blockIndex: number, page: number): boolean {
    const bm = this.bitmaps[blockIndex];
    if (bm === undefined || page >= this.guest.ram.blocks[blockIndex]!.pageCount) return false;
    this.cursorBlock = blockIndex;
    this.cursorPage = page;
    return this.takeDirty(blockIndex, page);
  }

  /** Clear a page's bit in the migration bitmap; false if it was clear (the page went already). */
  private takeDirty(blockIndex: number, page: number): boolean {
    const bm = this.bitmaps[blockIndex]!;
    const wi = page >>> 5;
    const bit = 1 << (page & 31);
    if ((bm[wi]! & bit) === 0) return false;
    bm[wi] = (bm[wi]! & ~bit) >>> 0;
    this.dirtyPages--;
    return true;
  }

  /** Postcopy start: every block's still-dirty ranges, as [start byte, length] for DISCARD. */
  dirtyRanges(blockIndex: number): { start: number; length: number }[] {
    const bm = this.bitmaps[blockIndex]!;
    const pages = this.guest.ram.blocks[blockIndex]!.pageCount;
    const out: { start: number; length: number }[] = [];
    let runStart = -1;
    for (let p = 0; p <= pages; p++) {
      const dirty = p < pages && (bm[p >>> 5]! & (1 << (p & 31))) !== 0;
      if (dirty && runStart < 0) runStart = p;
      else if (!dirty && runStart >= 0) {
        out.push({ start: runStart * TARGET_PAGE_SIZE, length: (p - runStart) * TARGET_PAGE_SIZE });
        runStart = -1;
      }
    }
    return out;
  }

  /**
   * Postcopy recovery: the destination's received bitmap (little endian, page i = byte i >> 3,
   * bit i & 7) becomes the migration bitmap's complement: whatever it lacks is sent again.
   */
  setDirtyFromReceived(blockIndex: number, received: Uint8Array): void {
    const bm = this.bitmaps[blockIndex]!;
    const pages = this.guest.ram.blocks[blockIndex]!.pageCount;
    let before = 0;
    for (let w = 0; w < bm.length; w++) before += popcount32(bm[w]!);
    for (let p = 0; p < pages; p++) {
      const has = (received[p >> 3]! & (1 << (p & 7))) !== 0;
      const w = p >>> 5;
      const bit = 1 << (p & 31);
      bm[w] = has ? (bm[w]! & ~bit) >>> 0 : (bm[w]! | bit) >>> 0;
    }
    let after = 0;
    for (let w = 0; w < bm.length; w++) after += popcount32(bm[w]!);
    this.dirtyPages += after - before;
  }

  /** Postcopy start and recovery: the next record names its block. */
  forgetBlock(): void {
    this.rec.forgetBlock();
  }

  /** Turn XBZRLE off (postcopy never uses it). */
  disableXbzrle(): void {
    this.xbzrleOff = true;
  }

  /**
   * If the page under the cursor was never written, take it and the never-written dirty pages
   * right after it in the same bitmap word (clearing their bits); returns how many (0: not one).
   */
  private knownZeroRun(): number {
    const block = this.guest.ram.blocks[this.cursorBlock]!;
    const page = this.cursorPage;
    const w = page >>> 5;
    const unwritten = ~block.written[w]!;
    if ((unwritten & (1 << (page & 31))) === 0) return 0;
    const bm = this.bitmaps[this.cursorBlock]!;
    // Bits above `page` that are dirty and unwritten, as a run starting at page + 1.
    const candidates = ((bm[w]! & unwritten) >>> 0) >>> (page & 31);
    let n = 1;
    while ((page & 31) + n < 32 && ((candidates >>> n) & 1) === 1) n++;
    if (n > 1) {
      const mask = (2 ** (n - 1) - 1) * 2 ** ((page & 31) + 1);
      bm[w] = (bm[w]! & ~mask) >>> 0;
      this.dirtyPages -= n - 1;
    }
    // The run reached the end of its word: whole words after it that are all dirty and all
    // never-written join it (a fresh guest is mostly that), up to 1 MiB of records at a time.
    if ((page & 31) + n === 32) {
      const written = block.written;
      let next = w + 1;
      const lastWord = Math.floor(block.pageCount / 32);
      while (next < lastWord && bm[next] === 0xffffffff && written[next] === 0 && n < 110_000) {
        bm[next] = 0;
        this.dirtyPages -= 32;
        n += 32;
        next++;
      }
    }
    return n;
  }

  /** mapped-ram: a page goes to its place in the file (runs of them in one write); a zero page is only a cleared bit. */
  private savePageInFile(blockIndex: number, page: number, zero: boolean): void {
    const bitmap = this.mapped!.blocks[blockIndex]!.bitmap;
    const off = page * TARGET_PAGE_SIZE;
    if (zero) {
      bitmap[page >>> 3] = bitmap[page >>> 3]! & ~(1 << (page & 7));
      this.stats.duplicate++;
      return;
    }
    bitmap[page >>> 3] = bitmap[page >>> 3]! | (1 << (page & 7));
    this.stats.normal++;
    if (blockIndex === this.runBlock && off === this.runEnd && this.runEnd - this.runStart < MAPPED_RUN_BYTES) {
      this.runEnd += TARGET_PAGE_SIZE;
      return;
    }
    this.writeMappedRun();
    this.runBlock = blockIndex;
    this.runStart = off;
    this.runEnd = off + TARGET_PAGE_SIZE;
  }

  /** Write the pending run of pages at its place in the file. */
  private writeMappedRun(): void {
    if (this.runEnd === this.runStart) return;
    const m = this.mapped!;
    const mem = this.views[this.runBlock]!;
    m.file.writeAt(mem.subarray(this.runStart, this.runEnd), m.blocks[this.runBlock]!.pagesOffset + this.runStart);
    this.mappedBytes += this.runEnd - this.runStart;
    this.runStart = this.runEnd = 0;
    this.runBlock = -1;
  }

  /**
   * Whether the page at `off` holds only zero bytes. A used page mostly has a nonzero first or
   * last word, found in a few ns; only the others pay for the native compare (~150 ns a call).
   */
  private isZeroPage(blockIndex: number, off: number): boolean {
    const words = this.words[blockIndex]!;
    const first = off / 4;
    if (words[first] !== 0 || words[first + TARGET_PAGE_SIZE / 4 - 1] !== 0) return false;
    return ZERO_PAGE.compare(this.views[blockIndex]!, off, off + TARGET_PAGE_SIZE) === 0;
  }

  private sendPage(w: BatchWriter, blockIndex: number, page: number, final: boolean): void {
    const rec = this.rec;
    const block = this.guest.ram.blocks[blockIndex]!;
    const mem = this.views[blockIndex]!;
    const off = page * TARGET_PAGE_SIZE;
    const idstr = block.idstr;
    // A page never written since allocation is zero without reading it (no fault, no memcmp).
    const knownZero = (block.written[page >>> 5]! & (1 << (page & 31))) === 0;
    const zero = knownZero || this.isZeroPage(blockIndex, off);
    if (this.mapped !== undefined) {
      this.savePageInFile(blockIndex, page, zero);
      return;
    }
    if (zero) {
      if (this.zeroPagesInMultifd) this.multifd!.queueZeroPage(idstr, mem, off);
      else rec.zeroPage(w, idstr, off);
      this.stats.duplicate++;
      if (this.xbzrleActive) this.xbzrle!.insertZero(block.globalOffset + off, this.stats.dirtySyncCount);
      return;
    }
    if (this.multifd !== undefined) {
      this.multifd.queuePage(idstr, mem, off);
      this.stats.normal++;
      return;
    }
    if (!this.xbzrleActive) {
      rec.page(w, idstr, off, mem, off, this.pagesByReference);
      this.stats.normal++;
      return;
    }
    // XBZRLE: work on a snapshot of the page so the cache equals exactly what was sent.
    const cache = this.xbzrle!;
    const addr = block.globalOffset + off;
    mem.copy(this.scratch, 0, off, off + TARGET_PAGE_SIZE);
    const slot = cache.lookup(addr, this.stats.dirtySyncCount);
    if (slot < 0) {
      if (!final) cache.insert(addr, this.scratch, 0, this.stats.dirtySyncCount);
      rec.page(w, idstr, off, this.scratch, 0);
      this.stats.normal++;
      return;
    }
    const before = w.totalBytes;
    const result = rec.deltaPage(w, idstr, off, cache.data, slot * TARGET_PAGE_SIZE, this.scratch, 0);
    if (result === 'unchanged') {
      this.stats.xbzrleUnchanged++;
      return;
    }
    if (!final) this.scratch.copy(cache.data, slot * TARGET_PAGE_SIZE);
    if (result === 'xbzrle') {
      this.stats.xbzrlePages++;
      this.stats.xbzrleBytes += w.totalBytes - before;
    } else {
      this.stats.xbzrleOverflow++;
      this.stats.normal++;
    }
  }
}
