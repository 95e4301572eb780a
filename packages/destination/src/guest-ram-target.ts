// Where the decoders put pages: straight into the guest's RAM blocks. The stream's block list is
// checked against the guest's and mapped once, when it arrives (attachBlocks); the per-page hooks
// only run once postcopy listens (the decoder's postcopyPageHooks), so precopy pays nothing for them.

import { ConfigError, ErrorCode, PAGE_RECORD_HEADER, type RamBlockInfo, type RamTarget, TARGET_PAGE_SIZE } from '@livemig/protocol';
import type { Guest } from '@livemig/guest';
import { native } from '@livemig/native';

/** Pages of the main block requested and not received yet (postcopy-faults.ts owns the set). */
export interface PageLedger {
  readonly requested: Set<number>;
  /** Page (main block) the background stream placed last. */
  mainHead: number;
}

export class GuestRamTarget implements RamTarget {
  private readonly guest: Guest;
  private readonly ledger: PageLedger;
  /** The background stream's target (not a preempt channel's): its pages move the ledger's head. */
  private readonly tracksHead: boolean;
  /** Stream block index → guest block index. */
  private blockMap: number[] = [];
  /** Stream block index → the memory attachBlocks gave it (placePageRun finds its block by it). */
  private views: readonly Uint8Array[] = [];

  constructor(guest: Guest, ledger: PageLedger, tracksHead: boolean) {
    this.guest = guest;
    this.ledger = ledger;
    this.tracksHead = tracksHead;
  }

  attachBlocks(blocks: readonly RamBlockInfo[], streamOffset: number): Buffer[] {
    const ram = this.guest.ram;
    this.blockMap = [];
    const views = blocks.map((b) => {
      const index = ram.blocks.findIndex((x) => x.idstr === b.idstr);
      if (index < 0) {
        throw new ConfigError(
          ErrorCode.CONFIG_MISMATCH,
          `RAM block "${b.idstr}" (${b.length} bytes) is not in this guest, which has ${ram.blocks.map((x) => `"${x.idstr}" (${x.length} bytes)`).join(', ')}`,
          { streamOffset, block: b.idstr },
        );
      }
      const local = ram.blocks[index]!;
      if (local.length !== b.length) {
        throw new ConfigError(ErrorCode.CONFIG_MISMATCH, `RAM block "${b.idstr}" is ${b.length} bytes in the stream but ${local.length} bytes here`, {
          streamOffset,
          block: b.idstr,
        });
      }
      this.blockMap.push(index);
      return ram.view(index);
    });
    this.views = views;
    return views;
  }

  /** Postcopy: never overwrite a page the guest already has (and may have changed since), nor one the fault thread is placing. */
  acceptPage(streamBlock: number, pageOffset: number): boolean {
    return this.guest.ram.claim(this.blockMap[streamBlock]!, pageOffset / TARGET_PAGE_SIZE);
  }

  /**
   * Postcopy's runs of page records at once (RamTarget.placePageRun; `mem` names the block): each
   * page claimed, copied if this thread won it, marked received, as acceptPage and pagePlaced do
   * one by one, then the vCPUs whose pages came woken at the run's end (wakeWaiters; at most one
   * read's pages later, see the README's data path). While pages are requested from this thread
   * (no fault thread) the record loop keeps the ledger page by page.
   */
  readonly placePageRun = (chunk: Uint8Array, from: number, to: number, mem: Uint8Array, written: Uint32Array | undefined): number => {
    if (!native.available || this.ledger.requested.size > 0) return 0;
    const streamBlock = this.views.indexOf(mem);
    if (streamBlock < 0) return 0;
    const block = this.blockMap[streamBlock]!;
    const b = this.guest.ram.blocks[block]!;
    const taken = native.placeClaimedPages(chunk, from, to, mem, written, b.claimed, b.received);
    if (taken === 0) return 0;
    this.guest.ram.wakeWaiters(block);
    if (block === 0 && this.tracksHead) {
      // The run's last record: its page is where the stream is now.
      const at = from + (taken - 1) * (PAGE_RECORD_HEADER + TARGET_PAGE_SIZE);
      const hi = ((chunk[at]! << 24) | (chunk[at + 1]! << 16) | (chunk[at + 2]! << 8) | chunk[at + 3]!) >>> 0;
      const lo = ((chunk[at + 4]! << 24) | (chunk[at + 5]! << 16) | (chunk[at + 6]! << 8) | chunk[at + 7]!) >>> 0;
      this.ledger.mainHead = (hi * 0x100000000 + lo - (lo % TARGET_PAGE_SIZE)) / TARGET_PAGE_SIZE;
    }
    return taken;
  };

  pagePlaced(streamBlock: number, pageOffset: number): void {
    const block = this.blockMap[streamBlock]!;
    const page = pageOffset / TARGET_PAGE_SIZE;
    // A futex wake per page would cost more than the copy: a vCPU is woken for the one page it
    // waits for (a load per vCPU here), the rest once per read (wakeWaiters).
    this.guest.ram.setReceived(block, page);
    this.guest.ram.wakeWaiterOf(block, page);
    if (block === 0) {
      this.ledger.requested.delete(page);
      if (this.tracksHead) this.ledger.mainHead = page;
    }
  }
}
