// Iterative devices: QEMU's SaveVMHandlers for devices whose state is too big to send at once
// and changes while the guest runs. RAM is the biggest; a VFIO device behind a v1 migration
// region is the other kind.
//
//   source:      saveSetup → (pendingEstimate → [pendingExact] → saveIterate)* → saveComplete → cleanup
//   destination: loadState(data of START / PART / END, versionId)   (RAM: the stream decoder)

import type { BatchWriter, SectionLayout } from '@livemig/protocol';

export interface IterativeDevice {
  readonly idstr: string;
  readonly instanceId: number;
  readonly versionId: number;
  /** How the destination decoder sizes this device's section data. */
  readonly layout: SectionLayout;
  /** START section data; begins tracking changes. */
  saveSetup(w: BatchWriter): void;
  /** Bytes still to send, cheap (no sync): asked every loop turn. */
  pendingEstimate(): number;
  /** Bytes still to send, exact: may sync dirty tracking first. Asked only near switchover. */
  pendingExact(): number;
  /** PART section data: send until `maxBytes` or `deadline()`; true when nothing is left now. */
  saveIterate(w: BatchWriter, maxBytes: number, deadline?: () => boolean): boolean;
  /** END section data with the guest stopped: call until it returns true (the caller flushes in between). */
  saveComplete(w: BatchWriter, maxBytes: number): boolean;
  /** Stop tracking (migration ended either way). */
  cleanup(): void;
  /**
   * QEMU's save_state: a FULL section under this device's section id, after the END sections,
   * with the guest stopped (a VFIO device's config). `stateLength` bytes.
   */
  saveState?(w: BatchWriter): void;
  readonly stateLength?: number;
}

/** The destination side of an iterative device other than RAM. */
export interface IterativeLoader {
  readonly idstr: string;
  readonly instanceId: number;
  readonly layout: SectionLayout;
  /** Load one START / PART / END section's data; true when it says the device's initial data is all in (switchover-ack). */
  loadState(data: Buffer, versionId: number): boolean | void;
}
