// The guest's vCPUs: worker threads running the workload, stopped, continued and throttled
// through shared control words (no message round trips on the hot path).

import { Worker } from 'node:worker_threads';
import { fileURLToPath } from 'node:url';
import {
  ACK_BASE,
  AckState,
  controlWords,
  FAULT_RING_SLOTS,
  LATENCY_BUCKETS,
  POSTCOPY,
  RING_BASE,
  RING_EMPTY,
  RING_HEAD,
  RING_TAIL,
  REALTIME,
  REALTIME_REFUSED,
  S_BLOCKED_NS,
  S_FAULTS,
  RUN,
  RunState,
  S_PASSES,
  S_POSITION,
  S_RNG,
  S_WRITES,
  STATE_SLOTS,
  THROTTLE,
  type Workload,
} from './control.ts';
import { bitmapWords, type GuestBlock } from './ram.ts';
import { createRequestLine } from './request-line.ts';
import { waitOnWord } from './threads.ts';
import type { VcpuWorkerData } from './vcpu-worker.ts';
import { VcpuError } from './errors.ts';

/** The compiled worker (src/ and dist/ are both one level below the package root). */
const WORKER_URL = new URL('../dist/vcpu-worker.js', import.meta.url);

/**
 * Take the faults queued since the last call (page indices in the main block), in order, from a
 * fault ring (see control.ts; one consumer at a time). Returns how many were written into `out`.
 */
export function drainFaultRing(ring: Int32Array, out: Uint32Array): number {
  let head = Atomics.load(ring, RING_HEAD);
  const tail = Atomics.load(ring, RING_TAIL);
  let n = 0;
  while (head !== tail && n < out.length) {
    const slot = RING_BASE + (head & (FAULT_RING_SLOTS - 1));
    const page = Atomics.load(ring, slot);
    if (page === RING_EMPTY) break; // reserved, not written yet: next time
    out[n++] = page;
    Atomics.store(ring, slot, RING_EMPTY);
    head = (head + 1) | 0;
  }
  Atomics.store(ring, RING_HEAD, head);
  return n;
}

/** Resolves when a fault is queued in the ring (or after `timeoutMs`). */
export async function waitForFaultRing(ring: Int32Array, timeoutMs: number): Promise<void> {
  const tail = Atomics.load(ring, RING_TAIL);
  if (tail !== Atomics.load(ring, RING_HEAD)) return;
  await waitOnWord(ring, RING_TAIL, tail, timeoutMs);
}

export interface VcpuState {
  /** Page index inside the vCPU's slice where the incrementer goes next. */
  position: number;
  passes: number;
  rng: number;
  writes: number;
}

export interface VcpuBlockTime {
  /** Milliseconds blocked on missing pages (postcopy). */
  blockedMs: number;
  faults: number;
}

export class VcpuSet {
  readonly count: number;
  readonly control: Int32Array;
  private readonly stateArray: Float64Array;
  /** Faulted pages, vCPUs → main thread (see control.ts). */
  readonly faultRing: Int32Array;
  /** Postcopy: the fault request line vCPUs write their page requests on (see request-line.ts). */
  readonly requestLine: SharedArrayBuffer;
  /** Its requested-pages bitmap (main block). */
  readonly requestedMemory: SharedArrayBuffer;
  /** Fault latency histogram, power-of-2 µs buckets. */
  readonly latency: Int32Array;
  private readonly workers: Worker[] = [];
  private readonly block: GuestBlock;
  readonly workload: Workload;
  private started = false;

  constructor(count: number, block: GuestBlock, workload: Workload) {
    this.count = count;
    this.block = block;
    this.workload = workload;
    this.control = new Int32Array(new SharedArrayBuffer(controlWords(count) * 4));
    this.stateArray = new Float64Array(new SharedArrayBuffer(count * STATE_SLOTS * 8));
    this.faultRing = new Int32Array(new SharedArrayBuffer((RING_BASE + FAULT_RING_SLOTS) * 4)).fill(RING_EMPTY, RING_BASE);
    this.latency = new Int32Array(new SharedArrayBuffer(LATENCY_BUCKETS * 4));
    this.requestLine = createRequestLine();
    this.requestedMemory = new SharedArrayBuffer(bitmapWords(block.pageCount) * 4);
  }

  /**
   * The SCHED_FIFO priority vCPUs run at from their next step (0: the normal policy): each one
   * changes its own policy (see setThreadRealtime).
   */
  setRealtime(priority: number): void {
    Atomics.store(this.control, REALTIME, priority);
  }

  /** A vCPU asked for real time and was refused. */
  get realtimeRefused(): boolean {
    return Atomics.load(this.control, REALTIME_REFUSED) === 1;
  }

  /** Postcopy fault mode on/off: vCPUs check the received bitmap before each page access. */
  setPostcopy(on: boolean): void {
    Atomics.store(this.control, POSTCOPY, on ? 1 : 0);
  }

  blockTime(index: number): VcpuBlockTime {
    const s = this.stateArray.subarray(index * STATE_SLOTS, (index + 1) * STATE_SLOTS);
    return { blockedMs: s[S_BLOCKED_NS]! / 1e6, faults: s[S_FAULTS]! };
  }

  /**
   * Take the faults queued since the last call (page indices in the main block), in order.
   * Returns how many were written into `out`.
   */
  drainFaults(out: Uint32Array): number {
    return drainFaultRing(this.faultRing, out);
  }

  /**
   * Whether every fault queued and not yet drained is for a page in [lo, hi) (true when none is
   * queued). A slot reserved but not yet written counts as outside.
   */
  faultsWithin(lo: number, hi: number): boolean {
    const ring = this.faultRing;
    const tail = Atomics.load(ring, RING_TAIL);
    for (let head = Atomics.load(ring, RING_HEAD); head !== tail; head = (head + 1) | 0) {
      const page = Atomics.load(ring, RING_BASE + (head & (FAULT_RING_SLOTS - 1)));
      if (page === RING_EMPTY || page < lo || page >= hi) return false;
    }
    return true;
  }

  /** A vCPU has queued a fault not yet drained (two shared-memory loads). */
  faultsPending(): boolean {
    return Atomics.load(this.faultRing, RING_TAIL) !== Atomics.load(this.faultRing, RING_HEAD);
  }

  /** Resolves when a vCPU queues a fault (or after `timeoutMs`). */
  waitForFault(timeoutMs: number): Promise<void> {
    return waitForFaultRing(this.faultRing, timeoutMs);
  }

  /** True while the vCPUs are meant to run. */
  get running(): boolean {
    return Atomics.load(this.control, RUN) === RunState.RUNNING;
  }

  get throttlePercent(): number {
    return Atomics.load(this.control, THROTTLE);
  }

  setThrottle(percent: number): void {
    Atomics.store(this.control, THROTTLE, Math.max(0, Math.min(99, Math.round(percent))));
  }

  readState(index: number): VcpuState {
    const s = this.stateArray.subarray(index * STATE_SLOTS, (index + 1) * STATE_SLOTS);
    return { position: s[S_POSITION]!, passes: s[S_PASSES]!, rng: s[S_RNG]!, writes: s[S_WRITES]! };
  }

  writeState(index: number, v: VcpuState): void {
    const s = this.stateArray.subarray(index * STATE_SLOTS, (index + 1) * STATE_SLOTS);
    s[S_POSITION] = v.position;
    s[S_PASSES] = v.passes;
    s[S_RNG] = v.rng;
    s[S_WRITES] = v.writes;
  }

  /** Start the worker threads, parked until cont(). */
  spawn(): void {
    if (this.started) return;
    this.started = true;
    for (let i = 0; i < this.count; i++) {
      const data: VcpuWorkerData = {
        index: i,
        vcpus: this.count,
        memory: this.block.memory,
        dirtyMemory: this.block.dirtyMemory,
        pageCount: this.block.pageCount,
        control: this.control.buffer as SharedArrayBuffer,
        state: this.stateArray.buffer as SharedArrayBuffer,
        workload: this.workload,
        receivedMemory: this.block.receivedMemory,
        waitingMemory: this.block.waitingMemory,
        faultRing: this.faultRing.buffer as SharedArrayBuffer,
        requestLine: this.requestLine,
        requestedMemory: this.requestedMemory,
        latency: this.latency.buffer as SharedArrayBuffer,
      };
      const w = new Worker(fileURLToPath(WORKER_URL), { workerData: data });
      w.on('error', (err) => {
        process.emitWarning(`vCPU ${i} failed: ${err.message}`);
      });
      this.workers.push(w);
    }
  }

  /** Start or continue the vCPUs; resolves once every one is running. */
  async cont(): Promise<void> {
    this.spawn();
    Atomics.store(this.control, RUN, RunState.RUNNING);
    Atomics.notify(this.control, RUN);
    await this.waitAcks(AckState.RUNNING);
  }

  /** Stop the vCPUs; resolves once every one has finished its last write and parked. */
  async stop(): Promise<void> {
    Atomics.store(this.control, RUN, RunState.STOPPED);
    Atomics.notify(this.control, RUN);
    if (this.started) await this.waitAcks(AckState.PAUSED);
  }

  async exit(): Promise<void> {
    Atomics.store(this.control, RUN, RunState.EXIT);
    Atomics.notify(this.control, RUN);
    await Promise.all(this.workers.map((w) => w.terminate()));
    this.workers.length = 0;
  }

  private async waitAcks(want: number): Promise<void> {
    for (let i = 0; i < this.count; i++) {
      const slot = ACK_BASE + i;
      for (;;) {
        const cur = Atomics.load(this.control, slot);
        if (cur === want) break;
        if (cur === AckState.EXITED) throw new VcpuError(i, `vCPU ${i} has exited`);
        if ((await waitOnWord(this.control, slot, cur, 5000)) === 'timed-out') throw new VcpuError(i, `vCPU ${i} did not ${want === AckState.PAUSED ? 'stop' : 'start'} within 5 s`);
      }
    }
  }
}
