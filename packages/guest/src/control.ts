// Layout of the shared control words between the main thread and the vCPU workers.
//
//   control (Int32Array on SAB): [RUN][THROTTLE][POSTCOPY][REALTIME][REALTIME_REFUSED][ · ][ · ][ · ][ACK vcpu0][ACK vcpu1]…
//   state (Float64Array on SAB): per vCPU, STATE_SLOTS numbers: position, passes, rng, writes

import { GuestConfigError } from './errors.ts';

export const RUN = 0;
export const THROTTLE = 1;
/** 1 while pages may be missing (postcopy): vCPUs check the received bitmap before each access. */
export const POSTCOPY = 2;
/** SCHED_FIFO priority vCPUs put themselves under (0: the normal policy); see setThreadRealtime. */
export const REALTIME = 3;
/** Set to 1 by a vCPU that was refused the real-time priority. */
export const REALTIME_REFUSED = 4;
export const ACK_BASE = 8;

export const RunState = { STOPPED: 0, RUNNING: 1, EXIT: 2 } as const;
export const AckState = { PAUSED: 0, RUNNING: 1, EXITED: 2 } as const;

export const STATE_SLOTS = 8;
export const S_POSITION = 0;
export const S_PASSES = 1;
export const S_RNG = 2;
export const S_WRITES = 3;
/** Postcopy: ns this vCPU spent blocked on missing pages, and how many faults it took. */
export const S_BLOCKED_NS = 4;
export const S_FAULTS = 5;

/**
 * The fault ring, vCPU workers → main thread (Int32Array on SAB):
 *   [HEAD consumer index][TAIL producer index][ · ×6][slot 0][slot 1]…   slot = page index or EMPTY
 * Each entry is a 32-bit page index inside the main block: the 64-bit guest address compressed
 * to an offset from the block base shifted right by the page bits (DPDK's pointer compression),
 * half the size of an address. A vCPU has at most one fault outstanding, so FAULT_RING_SLOTS
 * ≥ 64 vCPUs never overflows.
 */
export const RING_HEAD = 0;
export const RING_TAIL = 1;
export const RING_BASE = 8;
export const FAULT_RING_SLOTS = 128;
export const RING_EMPTY = -1;

/** Fault latency histogram: bucket i counts waits of [2^i, 2^(i+1)) µs (bucket 0 also < 1 µs). */
export const LATENCY_BUCKETS = 32;

export function controlWords(vcpus: number): number {
  return ACK_BASE + vcpus;
}

export type Workload =
  | { kind: 'idle' }
  /** One byte per page incremented in address order, forever (QEMU's test guest), paced. */
  | { kind: 'incrementer'; pagesPerSecond: number }
  /** Random 8-byte writes anywhere in the main block at a set page rate. */
  | { kind: 'random'; pagesPerSecond: number }
  /** Random 8-byte writes inside the first hotBytes of the main block. */
  | { kind: 'hotset'; hotBytes: number; pagesPerSecond: number }
  /** Reads every page in address order, writing nothing (pulls pages in postcopy; memory stays as sent). */
  | { kind: 'scan'; pagesPerSecond: number };

/** Default incrementer pace: 100 MB/s of dirtied pages, a busy but migratable guest. */
export const DEFAULT_INCREMENTER_MBPS = 100;

function rate(mbps: string, what: string): number {
  if (mbps === 'max') return Infinity;
  const v = Number(mbps);
  if (!Number.isFinite(v) || v < 0) throw new GuestConfigError(`${what}: "${mbps}" is not a rate in MB/s (or "max")`);
  return (v * 1e6) / 4096;
}

/** Parse --workload: idle | incrementer[:<MB/s>|:max] | random:<MB/s> | hotset:<MiB>:<MB/s> | scan[:<MB/s>]. */
export function parseWorkload(text: string): Workload {
  const [kind, a, b, ...rest] = text.split(':');
  if (rest.length > 0) throw new GuestConfigError(`workload "${text}" has too many fields`);
  switch (kind) {
    case 'idle':
      if (a !== undefined) break;
      return { kind: 'idle' };
    case 'incrementer':
      if (b !== undefined) break;
      return { kind: 'incrementer', pagesPerSecond: rate(a ?? String(DEFAULT_INCREMENTER_MBPS), 'incrementer') };
    case 'scan':
      if (b !== undefined) break;
      return { kind: 'scan', pagesPerSecond: rate(a ?? String(DEFAULT_INCREMENTER_MBPS), 'scan') };
    case 'random':
      if (a === undefined || b !== undefined) break;
      return { kind: 'random', pagesPerSecond: rate(a, 'random') };
    case 'hotset': {
      if (a === undefined || b === undefined) break;
      const mib = Number(a);
      if (!Number.isFinite(mib) || mib <= 0) throw new GuestConfigError(`hotset: "${a}" is not a size in MiB`);
      return { kind: 'hotset', hotBytes: Math.round(mib * 2 ** 20), pagesPerSecond: rate(b, 'hotset') };
    }
  }
  throw new GuestConfigError(`unknown workload "${text}" (idle | incrementer[:<MB/s>] | random:<MB/s> | hotset:<MiB>:<MB/s> | scan[:<MB/s>])`);
}

export function formatWorkload(w: Workload): string {
  const mbps = (pps: number): string => (pps === Infinity ? 'max' : String(Math.round((pps * 4096) / 1e6)));
  switch (w.kind) {
    case 'idle':
      return 'idle';
    case 'incrementer':
      return `incrementer:${mbps(w.pagesPerSecond)}`;
    case 'random':
      return `random:${mbps(w.pagesPerSecond)}`;
    case 'hotset':
      return `hotset:${w.hotBytes / 2 ** 20}:${mbps(w.pagesPerSecond)}`;
    case 'scan':
      return `scan:${mbps(w.pagesPerSecond)}`;
  }
}
