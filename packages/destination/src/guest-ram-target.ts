// Where the decoders put pages: straight into the guest's RAM blocks. The stream's block list is
// checked against the guest's and mapped once, when it arrives (attachBlocks); the per-page hooks
// only run once postcopy listens (the decoder's postcopyPageHooks), so precopy pays nothing for them.

import { ConfigError, ErrorCode, type RamBlockInfo, type RamTarget, TARGET_PAGE_SIZE } from '@livemig/protocol';
import type { Guest } from '@livemig/guest';

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

  constructor(guest: Guest, ledger: PageLedger, tracksHead: boolean) {
    this.guest = guest;
    this.ledger = ledger;
    this.tracksHead = tracksHead;
  }

  attachBlocks(blocks: readonly RamBlockInfo[], streamOffset: number): Buffer[] {
    const ram = this.guest.ram;
    this.blockMap = [];
    return blocks.map((b) => {
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
  }

  /** Postcopy: never overwrite a page the guest already has (and may have changed since), nor one the fault thread is placing. */
  acceptPage(streamBlock: number, pageOffset: number): boolean {
    return this.guest.ram.claim(this.blockMap[streamBlock]!, pageOffset / TARGET_PAGE_SIZE);
  }

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
