// Postcopy's per-page bits, shared by every thread that places pages or waits for them: received
// (the page is in guest RAM), claimed (a thread is placing it). Bit p&31 of word p>>5, as the
// dirty log. Nothing here imports more than the language, so worker threads load it cheaply.

/** Set a page's bit in a received bitmap (no wake-up; see wakeArrived). */
export function setPageReceived(received: Int32Array, page: number): void {
  const bit = 1 << (page & 31);
  if ((received[page >> 5]! & bit) === 0) Atomics.or(received, page >> 5, bit);
}

/** Whether a page's bit is set in a received bitmap (postcopy). */
export function isPageReceived(received: Int32Array, page: number): boolean {
  return (Atomics.load(received, page >> 5) & (1 << (page & 31))) !== 0;
}

/**
 * Claim a page for placing: true for exactly one caller, and only while the page has not been
 * received. The loser must not write it: the guest may already have changed the winner's copy.
 */
export function claimPage(claimed: Int32Array, received: Int32Array, page: number): boolean {
  const bit = 1 << (page & 31);
  return (Atomics.or(claimed, page >> 5, bit) & bit) === 0 && !isPageReceived(received, page);
}

/**
 * Wake every vCPU whose page has arrived (after its received bit was set). No wake-up is lost:
 * a vCPU publishes its page before it re-reads the bitmap and sleeps, and this reads the slots
 * after the bits were set (sequentially consistent atomics), so either it sees its bit or we see it.
 */
export function wakeArrived(received: Int32Array, waiting: Int32Array, slots: number): void {
  for (let i = 0; i < slots; i++) {
    const p = Atomics.load(waiting, i) - 1;
    if (p >= 0 && isPageReceived(received, p)) Atomics.notify(received, p >> 5);
  }
}

/**
 * Wake the vCPU that waits for this very page, if one does (after its received bit was set): a
 * page placed early in a long run of them need not wait for the run's end and its wakeArrived.
 * Returns how many threads the wake reached (0 when no vCPU waits for the page).
 */
export function wakeWaiterOf(received: Int32Array, waiting: Int32Array, slots: number, page: number): number {
  for (let i = 0; i < slots; i++) if (Atomics.load(waiting, i) === page + 1) return Atomics.notify(received, page >> 5);
  return 0;
}
