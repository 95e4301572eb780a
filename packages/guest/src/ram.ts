// Guest RAM: named blocks on SharedArrayBuffer, each with a dirty log that vCPU workers mark and
// the migration side syncs, like KVM's dirty bitmap (KVM_GET_DIRTY_LOG clears what it returns).
//
//   bytes    [ page 0 | page 1 | … ]                      SharedArrayBuffer, shared with workers
//   dirtyLog [ w0: pages 0–31 | w1: pages 32–63 | … ]     Int32Array on SAB, bit p&31 of word p>>5
//
// A vCPU writes the page first and sets its bit after (Atomics.or). sync() swaps each non-zero
// word with 0 (Atomics.exchange) and ORs it into the migration bitmap, so a write that races with
// the sync is either in this sync or sets the bit again for the next: no write is ever lost.

import { TARGET_PAGE_SIZE } from '@livemig/protocol';
import { GuestConfigError } from './errors.ts';
import { claimPage, isPageReceived, setPageReceived, wakeArrived, wakeWaiterOf } from './page-bitmap.ts';

export interface BlockConfig {
  idstr: string;
  /** Bytes, a multiple of the page size. */
  length: number;
}

export interface GuestBlock {
  idstr: string;
  length: number;
  pageCount: number;
  /** Offset of the block in the guest's flat RAM address space (blocks laid out in order). */
  globalOffset: number;
  memory: SharedArrayBuffer;
  bytes: Uint8Array;
  dirtyMemory: SharedArrayBuffer;
  dirtyLog: Int32Array;
  /**
   * Pages that may hold non-zero bytes (main thread only): a page whose bit is clear has never
   * been written since the block was allocated zeroed, so it is known zero without reading it.
   * Every writer sets it: the initial fill, an incoming migration, and each dirty-log sync.
   */
  written: Uint32Array;
  /**
   * Postcopy: pages the destination holds (Int32Array on SAB, same layout as the dirty log).
   * vCPUs wait on a word until the page's bit is set.
   */
  receivedMemory: SharedArrayBuffer;
  received: Int32Array;
  /**
   * Postcopy: per vCPU, the page it waits for plus one (0: not waiting). wakeWaiters wakes a
   * vCPU only for the page it waits for: Atomics.notify costs ~2–3 µs a call, waiter or not.
   * After the vCPU slots, STREAM_HEAD_SLOT: the page the background stream placed last, plus one.
   */
  waitingMemory: SharedArrayBuffer;
  waiting: Int32Array;
  /**
   * Postcopy: pages some thread has taken on to place (see claimPage). Two threads place pages
   * (the background stream, the fault channel); a page is written by the first to claim it.
   */
  claimedMemory: SharedArrayBuffer;
  claimed: Int32Array;
}

/**
 * Where a block's bytes live. Default: a fresh SharedArrayBuffer. The source passes one backed by
 * a memfd (@livemig/native) so RAM outlives an exec (cpr-exec), and the new image maps the same.
 */
export type RamAllocator = (idstr: string, length: number) => SharedArrayBuffer;

/** vCPUs a block can have waiting (the --vcpus limit). */
export const MAX_WAITERS = 64;
/** The slot of `waiting` after every vCPU's: the background stream's head (see setStreamHead). */
export const STREAM_HEAD_SLOT = MAX_WAITERS;

/** Words of 32 pages needed for a block. */
export function bitmapWords(pageCount: number): number {
  return Math.ceil(pageCount / 32);
}

export class GuestRam {
  readonly blocks: GuestBlock[];
  readonly totalBytes: number;

  constructor(configs: readonly BlockConfig[], allocate: RamAllocator = (_, length) => new SharedArrayBuffer(length)) {
    let global = 0;
    this.blocks = configs.map((c) => {
      if (c.length <= 0 || c.length % TARGET_PAGE_SIZE !== 0) {
        throw new GuestConfigError(`RAM block "${c.idstr}" length ${c.length} is not a positive multiple of ${TARGET_PAGE_SIZE}`);
      }
      const pageCount = c.length / TARGET_PAGE_SIZE;
      const memory = allocate(c.idstr, c.length);
      if (memory.byteLength < c.length) throw new GuestConfigError(`RAM block "${c.idstr}": ${memory.byteLength} bytes of memory for ${c.length}`);
      const dirtyMemory = new SharedArrayBuffer(bitmapWords(pageCount) * 4);
      const b: GuestBlock = {
        idstr: c.idstr,
        length: c.length,
        pageCount,
        globalOffset: global,
        memory,
        bytes: new Uint8Array(memory),
        dirtyMemory,
        dirtyLog: new Int32Array(dirtyMemory),
        written: new Uint32Array(bitmapWords(pageCount)),
        receivedMemory: new SharedArrayBuffer(bitmapWords(pageCount) * 4),
        received: new Int32Array(0),
        waitingMemory: new SharedArrayBuffer((MAX_WAITERS + 1) * 4),
        waiting: new Int32Array(0),
        claimedMemory: new SharedArrayBuffer(bitmapWords(pageCount) * 4),
        claimed: new Int32Array(0),
      };
      b.received = new Int32Array(b.receivedMemory);
      b.waiting = new Int32Array(b.waitingMemory);
      b.claimed = new Int32Array(b.claimedMemory);
      global += c.length;
      return b;
    });
    this.totalBytes = global;
  }

  block(idstr: string): GuestBlock | undefined {
    return this.blocks.find((b) => b.idstr === idstr);
  }

  /** A Buffer view of a block's memory (no copy). */
  view(index: number): Buffer {
    const b = this.blocks[index]!;
    return Buffer.from(b.memory, 0, b.length);
  }

  /** Mark a page dirty from the main thread (device DMA, tests). */
  markDirty(blockIndex: number, page: number): void {
    Atomics.or(this.blocks[blockIndex]!.dirtyLog, page >> 5, 1 << (page & 31));
  }

  /** Forget every logged write (start of dirty logging); they stay noted in `written`. */
  clearDirtyLog(): void {
    for (const b of this.blocks) {
      for (let w = 0; w < b.dirtyLog.length; w++) {
        if (b.dirtyLog[w] !== 0) b.written[w] = (b.written[w]! | Atomics.exchange(b.dirtyLog, w, 0)) >>> 0;
      }
    }
  }

  /**
   * Set a page's received bit without waking anyone: for placing many pages in a row, followed
   * by one wakeWaiters() (a wake per page costs a futex call per page for an in-order guest).
   */
  setReceived(blockIndex: number, page: number): void {
    setPageReceived(this.blocks[blockIndex]!.received, page);
  }

  /**
   * Postcopy: the page of the block the background stream placed last (-1: none, or the stream
   * is not moving). A vCPU faulting just ahead of it waits a moment for the stream instead of
   * asking (see the vCPU's touch()).
   */
  setStreamHead(blockIndex: number, page: number): void {
    Atomics.store(this.blocks[blockIndex]!.waiting, STREAM_HEAD_SLOT, page + 1);
  }

  /** Wake the vCPU waiting for this page, if any (after setReceived; see wakeWaiterOf). */
  wakeWaiterOf(blockIndex: number, page: number): number {
    const b = this.blocks[blockIndex]!;
    return wakeWaiterOf(b.received, b.waiting, this.waiterSlots, page);
  }

  /** Wake every vCPU whose page has arrived (after setReceived; see wakeArrived). */
  wakeWaiters(blockIndex: number): void {
    const b = this.blocks[blockIndex]!;
    wakeArrived(b.received, b.waiting, this.waiterSlots);
  }

  /**
   * Forget claims on pages not received: a thread that claimed pages stopped (its connection
   * broke), and what it had not placed must be placeable again. Call with no placer running.
   */
  releaseClaims(): void {
    for (const b of this.blocks) for (let w = 0; w < b.claimed.length; w++) Atomics.store(b.claimed, w, Atomics.load(b.received, w));
  }

  /** Claim a page for placing (postcopy; see claimPage). */
  claim(blockIndex: number, page: number): boolean {
    const b = this.blocks[blockIndex]!;
    return claimPage(b.claimed, b.received, page);
  }

  /** How many vCPU slots wakeWaiters checks (the guest sets its vCPU count). */
  waiterSlots = MAX_WAITERS;

  isReceived(blockIndex: number, page: number): boolean {
    return isPageReceived(this.blocks[blockIndex]!.received, page);
  }

  /** Postcopy discard: these pages must come again; vCPUs touching them will fault. */
  clearReceived(blockIndex: number, firstPage: number, count: number): void {
    const r = this.blocks[blockIndex]!.received;
    for (let p = firstPage; p < firstPage + count; p++) Atomics.and(r, p >> 5, ~(1 << (p & 31)));
  }

  /** Mark every page of every block received (the precopy phase delivered what was not discarded). */
  markAllReceived(): void {
    for (const b of this.blocks) {
      for (let w = 0; w < b.received.length; w++) {
        Atomics.store(b.received, w, -1);
        Atomics.notify(b.received, w);
      }
    }
  }

  /** Note that a whole block may now hold anything (e.g. it was loaded by a migration). */
  markAllWritten(blockIndex?: number): void {
    for (const [i, b] of this.blocks.entries()) if (blockIndex === undefined || blockIndex === i) b.written.fill(0xffffffff);
  }

  /** Note one page as possibly non-zero (a main-thread write). */
  noteWritten(blockIndex: number, page: number): void {
    const b = this.blocks[blockIndex]!;
    b.written[page >> 5] = (b.written[page >> 5]! | (1 << (page & 31))) >>> 0;
  }

  /** False only for a page never written since allocation (so certainly all zero). */
  mayBeNonZero(blockIndex: number, page: number): boolean {
    return (this.blocks[blockIndex]!.written[page >> 5]! & (1 << (page & 31))) !== 0;
  }

  /**
   * Fetch and clear a block's dirty log, ORing it into `bitmap` (one bit per page, same layout).
   * Returns how many pages became dirty in `bitmap` that were not dirty before.
   */
  syncDirty(blockIndex: number, bitmap: Uint32Array): number {
    const b = this.blocks[blockIndex]!;
    const log = b.dirtyLog;
    const written = b.written;
    let added = 0;
    for (let w = 0; w < log.length; w++) {
      if (log[w] === 0) continue;
      const bits = Atomics.exchange(log, w, 0) >>> 0;
      written[w] = (written[w]! | bits) >>> 0;
      const fresh = (bits & ~bitmap[w]!) >>> 0;
      if (fresh !== 0) {
        added += popcount(fresh);
        bitmap[w] = (bitmap[w]! | fresh) >>> 0;
      }
    }
    return added;
  }
}

export function popcount(x: number): number {
  x -= (x >>> 1) & 0x55555555;
  x = (x & 0x33333333) + ((x >>> 2) & 0x33333333);
  return (((x + (x >>> 4)) & 0x0f0f0f0f) * 0x01010101) >>> 24;
}

/** Parse a size like 256M, 1G, 4096, 64K (binary units). */
export function parseSize(text: string): number {
  const m = /^(\d+)([KMGT]?)i?B?$/i.exec(text.trim());
  if (m === null) throw new GuestConfigError(`"${text}" is not a size (e.g. 256M, 1G)`);
  const unit = { '': 1, K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40 }[m[2]!.toUpperCase() as '' | 'K' | 'M' | 'G' | 'T'];
  return Number(m[1]) * unit;
}
