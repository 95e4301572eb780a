// The source's XBZRLE page cache (wire-format.md §6.5): direct mapped, one slot per
// cache-size / page; slot = (guest address / page) & (slots − 1). Each slot keeps the address
// it holds, the dirty-sync count when it was last used (its age) and a copy of the page as the
// destination last received it.

import { TARGET_PAGE_SIZE } from '@livemig/protocol';

/** A cached page younger than this many syncs is not evicted by another address. */
export const CACHED_PAGE_LIFETIME = 2;

export class XbzrleCache {
  readonly sizeBytes: number;
  readonly slots: number;
  readonly data: Buffer;
  private readonly address: Float64Array;
  private readonly age: Float64Array;
  /** Counters for query-migrate's xbzrle-cache. */
  cacheMiss = 0;
  lookups = 0;

  constructor(sizeBytes: number) {
    this.slots = Math.max(1, Math.floor(sizeBytes / TARGET_PAGE_SIZE));
    this.sizeBytes = this.slots * TARGET_PAGE_SIZE;
    this.data = Buffer.alloc(this.sizeBytes);
    this.address = new Float64Array(this.slots).fill(-1);
    this.age = new Float64Array(this.slots);
  }

  slotOf(globalAddress: number): number {
    return (globalAddress / TARGET_PAGE_SIZE) & (this.slots - 1);
  }

  /** Slot holding this address (its age refreshed), or -1 on a miss. */
  lookup(globalAddress: number, syncCount: number): number {
    this.lookups++;
    const slot = this.slotOf(globalAddress);
    if (this.address[slot] === globalAddress) {
      this.age[slot] = syncCount;
      return slot;
    }
    this.cacheMiss++;
    return -1;
  }

  /**
   * Store `page` for `globalAddress` unless the slot holds another address's copy that is still
   * young. Returns the slot, or -1 when refused.
   */
  insert(globalAddress: number, page: Uint8Array, pageOffset: number, syncCount: number): number {
    const slot = this.slotOf(globalAddress);
    const held = this.address[slot]!;
    if (held !== -1 && held !== globalAddress && this.age[slot]! + CACHED_PAGE_LIFETIME > syncCount) return -1;
    this.address[slot] = globalAddress;
    this.age[slot] = syncCount;
    this.data.set(page.subarray(pageOffset, pageOffset + TARGET_PAGE_SIZE), slot * TARGET_PAGE_SIZE);
    return slot;
  }

  /** A page went out as ZERO: cache zeros for it so a stale copy is never used as a base. */
  insertZero(globalAddress: number, syncCount: number): void {
    const slot = this.slotOf(globalAddress);
    const held = this.address[slot]!;
    if (held !== -1 && held !== globalAddress && this.age[slot]! + CACHED_PAGE_LIFETIME > syncCount) return;
    this.address[slot] = globalAddress;
    this.age[slot] = syncCount;
    this.data.fill(0, slot * TARGET_PAGE_SIZE, (slot + 1) * TARGET_PAGE_SIZE);
  }
}
