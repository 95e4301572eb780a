// A vCPU: a worker thread that runs the guest workload on the main RAM block, marks every page it
// writes in the dirty log, and obeys stop / continue / throttle from the control words.

import { workerData } from 'node:worker_threads';
import {
  ACK_BASE,
  AckState,
  LATENCY_BUCKETS,
  POSTCOPY,
  REALTIME,
  REALTIME_REFUSED,
  RING_BASE,
  RING_TAIL,
  RUN,
  RunState,
  FAULT_RING_SLOTS,
  S_BLOCKED_NS,
  S_FAULTS,
  S_PASSES,
  S_POSITION,
  S_RNG,
  S_WRITES,
  STATE_SLOTS,
  THROTTLE,
  type Workload,
} from './control.ts';
import { LineResult, RequestLine } from './request-line.ts';
import { STREAM_HEAD_SLOT } from './ram.ts';
import { setThreadRealtime } from './threads.ts';

export interface VcpuWorkerData {
  index: number;
  vcpus: number;
  memory: SharedArrayBuffer;
  dirtyMemory: SharedArrayBuffer;
  pageCount: number;
  control: SharedArrayBuffer;
  state: SharedArrayBuffer;
  workload: Workload;
  /** Postcopy: the main block's received-pages bitmap, the fault ring and the latency histogram. */
  receivedMemory: SharedArrayBuffer;
  /** Per vCPU: the page this vCPU waits for, plus one (0: not waiting). */
  waitingMemory: SharedArrayBuffer;
  faultRing: SharedArrayBuffer;
  /** Postcopy: the fault request line (see request-line.ts) and its requested-pages bitmap. */
  requestLine: SharedArrayBuffer;
  requestedMemory: SharedArrayBuffer;
  latency: SharedArrayBuffer;
}

const PAGE = 4096;
const d = workerData as VcpuWorkerData;
const bytes = new Uint8Array(d.memory);
const line = new RequestLine(d.requestLine, d.requestedMemory, d.receivedMemory, d.index);
const words = new Uint32Array(d.memory);
const dirty = new Int32Array(d.dirtyMemory);
const control = new Int32Array(d.control);
const received = new Int32Array(d.receivedMemory);
const waiting = new Int32Array(d.waitingMemory);
const ring = new Int32Array(d.faultRing);
const latency = new Int32Array(d.latency);
const state = new Float64Array(d.state, d.index * STATE_SLOTS * 8, STATE_SLOTS);
const first = Math.floor((d.index * d.pageCount) / d.vcpus);
const sliceLength = Math.floor(((d.index + 1) * d.pageCount) / d.vcpus) - first;
const w = d.workload;
const rate = w.kind === 'idle' ? 0 : w.pagesPerSecond;
/**
 * Postcopy: a fault at most this many pages past the background stream's head is on its way (one
 * source batch): the vCPU waits up to NEAR_STREAM_WAIT_MS for it before asking. Asking would
 * send it a second time, and the request's round trip wakes three threads that compete with
 * the stream for the CPUs (an in-order guest faults just past the head at nearly every page).
 */
const NEAR_STREAM_PAGES = 64;
const NEAR_STREAM_WAIT_MS = 1;
/** Largest batch between control checks; also the burst after a pause. */
const MAX_BATCH = 4096;

let position = 0;
/** Milliseconds blocked on postcopy faults since the pace credit was last computed. */
let blockedSinceCredit = 0;
let passes = 0;
let rng = 0;
let writes = 0;
/** Take the vCPU state from shared memory: a migration may have loaded it while we were parked. */
function loadState(): void {
  position = state[S_POSITION]!;
  passes = state[S_PASSES]!;
  rng = state[S_RNG]! >>> 0 || (0x9e3779b9 ^ (d.index + 1)) >>> 0;
  writes = state[S_WRITES]!;
}
loadState();
const hotPages = w.kind === 'hotset' ? Math.max(1, Math.min(sliceLength, Math.floor(w.hotBytes / PAGE))) : sliceLength;

function nextRandom(): number {
  rng ^= rng << 13;
  rng ^= rng >>> 17;
  rng ^= rng << 5;
  rng >>>= 0;
  return rng;
}

function markDirty(page: number): void {
  Atomics.or(dirty, page >> 5, 1 << (page & 31));
}

/**
 * Postcopy, as userfaultfd behaves: touching a page that has not arrived blocks this vCPU (and
 * only it) until the main thread has placed the page and set its received bit.
 */
function touch(page: number): boolean {
  const w = page >> 5;
  const bit = 1 << (page & 31);
  let v = Atomics.load(received, w);
  if ((v & bit) !== 0) return true;
  const t0 = performance.now();
  // Say which page we wait for (whoever places it wakes us only for that page, and a new
  // connection asks for it again), then ask: on the request line when it is open, which saves a
  // hop through another thread, else through the fault ring.
  Atomics.store(waiting, d.index, page + 1);
  const head = Atomics.load(waiting, STREAM_HEAD_SLOT) - 1;
  if (head >= 0 && page > head && page - head <= NEAR_STREAM_PAGES) {
    const until = t0 + NEAR_STREAM_WAIT_MS;
    for (v = Atomics.load(received, w); (v & bit) === 0 && performance.now() < until; v = Atomics.load(received, w)) Atomics.wait(received, w, v, 0.25);
  }
  if ((Atomics.load(received, w) & bit) !== 0) {
    // The stream brought it: nothing to ask.
  } else if (line.requestPage(page) === LineResult.UNAVAILABLE) {
    const slot = Atomics.add(ring, RING_TAIL, 1) & (FAULT_RING_SLOTS - 1);
    Atomics.store(ring, RING_BASE + slot, page);
    Atomics.notify(ring, RING_TAIL);
  }
  v = Atomics.load(received, w);
  while ((v & bit) === 0) {
    Atomics.wait(received, w, v, 100);
    v = Atomics.load(received, w);
    const run = Atomics.load(control, RUN);
    if (run === RunState.EXIT) {
      Atomics.store(waiting, d.index, 0);
      return false;
    }
    // Stopped while waiting (a paused postcopy, say): report parked, keep waiting for the page.
    if (run === RunState.STOPPED && Atomics.load(control, ACK_BASE + d.index) !== AckState.PAUSED) ack(AckState.PAUSED);
  }
  Atomics.store(waiting, d.index, 0);
  const us = (performance.now() - t0) * 1000;
  blockedSinceCredit += us / 1000;
  state[S_BLOCKED_NS] = state[S_BLOCKED_NS]! + us * 1000;
  state[S_FAULTS] = state[S_FAULTS]! + 1;
  const bucket = us < 1 ? 0 : Math.min(LATENCY_BUCKETS - 1, Math.floor(Math.log2(us)));
  Atomics.add(latency, bucket, 1);
  // Stopped meanwhile: do not write; the main loop parks and the access is redone after cont.
  return Atomics.load(control, RUN) === RunState.RUNNING;
}

function work(n: number): void {
  if (sliceLength <= 0) return;
  const postcopy = Atomics.load(control, POSTCOPY) === 1;
  // Accesses done; a postcopy wait that ends with the vCPU stopped cuts the batch short.
  let done = 0;
  if (w.kind === 'incrementer') {
    for (; done < n; done++) {
      const page = first + position;
      if (postcopy && !touch(page)) break;
      const at = page * PAGE;
      bytes[at] = (bytes[at]! + 1) & 0xff;
      markDirty(page);
      if (++position === sliceLength) {
        position = 0;
        passes++;
      }
    }
  } else if (w.kind === 'scan') {
    // Read one word per page, in order; the sum lands in S_RNG so the reads cannot be skipped.
    let sum = rng;
    for (; done < n; done++) {
      const page = first + position;
      if (postcopy && !touch(page)) break;
      sum = (sum + words[(page * PAGE) / 4]!) >>> 0;
      if (++position === sliceLength) {
        position = 0;
        passes++;
      }
    }
    rng = sum;
  } else {
    const range = w.kind === 'hotset' ? hotPages : sliceLength;
    for (; done < n; done++) {
      const page = first + (nextRandom() % range);
      if (postcopy && !touch(page)) break;
      const word = (page * PAGE) / 4 + ((nextRandom() & 0x1ff) << 1);
      words[word] = writes + done;
      words[word + 1] = rng;
      markDirty(page);
    }
  }
  writes += done;
  state[S_POSITION] = position;
  state[S_PASSES] = passes;
  state[S_RNG] = rng;
  state[S_WRITES] = writes;
}

function ack(s: number): void {
  Atomics.store(control, ACK_BASE + d.index, s);
  Atomics.notify(control, ACK_BASE + d.index);
}

let credit = 0;
/** The SCHED_FIFO priority this thread runs at (0: the normal policy). */
let realtimeNow = 0;
let last = performance.now();
let runSince = last;
for (;;) {
  const run = Atomics.load(control, RUN);
  if (run !== RunState.RUNNING) {
    ack(run === RunState.EXIT ? AckState.EXITED : AckState.PAUSED);
    if (run === RunState.EXIT) break;
    Atomics.wait(control, RUN, run);
    loadState();
    credit = 0;
    last = runSince = performance.now();
    continue;
  }
  if (Atomics.load(control, ACK_BASE + d.index) !== AckState.RUNNING) ack(AckState.RUNNING);
  const realtime = Atomics.load(control, REALTIME);
  if (realtime !== realtimeNow) {
    if (!setThreadRealtime(realtime) && realtime > 0) Atomics.store(control, REALTIME_REFUSED, 1);
    realtimeNow = realtime;
  }
  if (rate === 0) {
    Atomics.wait(control, RUN, RunState.RUNNING);
    continue;
  }
  const now = performance.now();
  // Time blocked on a missing page earns no credit: a stalled CPU does not run faster afterwards
  // to make up for it, it just runs later.
  credit = rate === Infinity ? MAX_BATCH : Math.min(credit + (Math.max(0, now - last - blockedSinceCredit) * rate) / 1000, MAX_BATCH);
  last = now;
  blockedSinceCredit = 0;
  const n = Math.floor(credit);
  if (n > 0) {
    work(n);
    credit -= n;
  }
  const throttle = Atomics.load(control, THROTTLE);
  if (throttle > 0 && now - runSince >= 10) {
    // Run 10 ms out of every 10 / (1 − p) ms, as QEMU's CPU throttle does.
    const p = Math.min(throttle, 99) / 100;
    Atomics.wait(control, RUN, RunState.RUNNING, (10 * p) / (1 - p));
    last = runSince = performance.now();
    credit = 0;
  } else if (rate !== Infinity && n < MAX_BATCH) {
    Atomics.wait(control, RUN, RunState.RUNNING, 1);
  }
}
