// The main thread's handle on the postcopy page server (page-server-worker.ts): a thread that
// owns the preempt connection and answers page requests on it from guest RAM, so a request never
// waits for the main thread, which is busy sending background pages.

import type { Guest } from '@livemig/guest';
import { CommandThread } from '@livemig/runtime';

export interface PageServerData {
  blocks: { idstr: string; memory: SharedArrayBuffer; length: number }[];
  /** Requests from the main thread (the return path): RingSlot layout, [block, page] pairs. */
  forward: SharedArrayBuffer;
  /** Pages the thread served on its own, for the main thread (it skips them in the background). */
  served: SharedArrayBuffer;
  /** Float64Array of ServerCounter slots. */
  counters: SharedArrayBuffer;
  /** Run under SCHED_FIFO (--realtime-postcopy). */
  realtime: boolean;
}

/** A single-producer single-consumer ring of [block, page] pairs in an Int32Array. */
export const Ring = { HEAD: 0, TAIL: 1, BASE: 2, PAIRS: 1024 } as const;
export const ServerCounter = { PAGES: 0, BYTES: 1, REQUESTS: 2, REALTIME_REFUSED: 3, SLOTS: 4 } as const;

/** Main thread → page server. */
export type PageServerCommand =
  /** Own this connection (a detached file descriptor; `pending`: bytes it brought already). */
  | { kind: 'attach'; fd: number; tcp: boolean; pending: Uint8Array }
  /** EOS on the connection (QEMU 7.2's end of a preempt channel), then close it: answered by 'ended'. */
  | { kind: 'end' }
  /** Close the connection (the link broke): answered by 'detached'. */
  | { kind: 'detach' };

/** Page server → main thread. */
export type PageServerMessage = { kind: 'ready' } | { kind: 'ended' } | { kind: 'detached' } | { kind: 'closed'; reason: string };

/** Push a pair; false when the ring is full. */
export function ringPush(ring: Int32Array, block: number, page: number): boolean {
  const tail = Atomics.load(ring, Ring.TAIL);
  if (tail - Atomics.load(ring, Ring.HEAD) >= Ring.PAIRS) return false;
  const at = Ring.BASE + 2 * (tail & (Ring.PAIRS - 1));
  ring[at] = block;
  ring[at + 1] = page;
  Atomics.store(ring, Ring.TAIL, tail + 1);
  Atomics.notify(ring, Ring.TAIL);
  return true;
}

/** Take every queued pair, oldest first. */
export function ringDrain(ring: Int32Array, each: (block: number, page: number) => void): void {
  let head = Atomics.load(ring, Ring.HEAD);
  const tail = Atomics.load(ring, Ring.TAIL);
  for (; head !== tail; head++) {
    const at = Ring.BASE + 2 * (head & (Ring.PAIRS - 1));
    each(ring[at]!, ring[at + 1]!);
  }
  Atomics.store(ring, Ring.HEAD, head);
}

const WORKER_URL = new URL('../dist/page-server-worker.js', import.meta.url);

/** How long the switchover to postcopy waits for the page server thread to boot, at most. */
const BOOT_BOUND_MS = 10_000;

/**
 * The page server thread boots with the migration (so no request waits for it) and takes the
 * preempt connection when postcopy starts: attach(), then end() or detach().
 */
export class PageServer {
  private readonly thread: CommandThread<PageServerCommand, PageServerMessage>;
  private readonly forward = new Int32Array(new SharedArrayBuffer((Ring.BASE + 2 * Ring.PAIRS) * 4));
  private readonly served = new Int32Array(new SharedArrayBuffer((Ring.BASE + 2 * Ring.PAIRS) * 4));
  private readonly counters = new Float64Array(new SharedArrayBuffer(ServerCounter.SLOTS * 8));
  /** Requests the ring could not take (full): sent on the next forward. */
  private readonly overflow: number[] = [];
  /** A connection is attached. */
  attached = false;
  /**
   * Settles true once the thread runs its message handler (false if it ended or took over
   * BOOT_BOUND_MS): booting a worker loads its modules, which took over a second here under load.
   */
  readonly ready: Promise<boolean>;

  /** `onClosed`: the attached connection broke. */
  constructor(guest: Guest, realtime: boolean, onClosed: (reason: string) => void) {
    const data: PageServerData = {
      blocks: guest.ram.blocks.map((b) => ({ idstr: b.idstr, memory: b.memory, length: b.length })),
      forward: this.forward.buffer as SharedArrayBuffer,
      served: this.served.buffer as SharedArrayBuffer,
      counters: this.counters.buffer as SharedArrayBuffer,
      realtime,
    };
    const closed = (reason: string): void => {
      if (!this.attached) return;
      this.attached = false;
      onClosed(reason);
    };
    this.thread = new CommandThread(
      WORKER_URL,
      data,
      (m) => {
        if (m.kind === 'closed') closed(m.reason);
      },
      (err) => closed(`page server failed: ${err.message}`),
    );
    this.ready = this.thread.waitFor(['ready'], BOOT_BOUND_MS);
  }

  /** It asked for real-time priority and was refused (known once it has booted). */
  get realtimeRefused(): boolean {
    return this.counters[ServerCounter.REALTIME_REFUSED] === 1;
  }

  /** The thread has ended (stopped, or it failed): a new one is needed. */
  get exited(): boolean {
    return this.thread.exited;
  }

  attach(fd: number, tcp: boolean, pending: Uint8Array): void {
    // Requests handed over before a link broke and not served then are dropped, not served on
    // this connection: the recovery sends those pages again (a QEMU destination fails on a
    // second copy). The thread drains the ring only while attached, so it is not draining now.
    ringDrain(this.forward, () => {});
    this.overflow.length = 0;
    this.attached = true;
    this.thread.post({ kind: 'attach', fd, tcp, pending });
  }

  /** Serve a page requested on the return path. */
  forwardRequest(block: number, page: number): void {
    this.overflow.push(block, page);
    let i = 0;
    while (i < this.overflow.length && ringPush(this.forward, this.overflow[i]!, this.overflow[i + 1]!)) i += 2;
    this.overflow.splice(0, i);
  }

  /** Pages served on the thread's own since the last call. */
  drainServed(each: (block: number, page: number) => void): void {
    ringDrain(this.served, each);
  }

  get bytes(): number {
    return this.counters[ServerCounter.BYTES]!;
  }

  get requests(): number {
    return this.counters[ServerCounter.REQUESTS]!;
  }

  /** The end of postcopy: EOS on the preempt channel, then close it (bounded). */
  async end(timeoutMs = 5_000): Promise<void> {
    this.attached = false;
    await this.thread.ask({ kind: 'end' }, 'ended', timeoutMs);
  }

  /** The link broke: close the connection (a recovery attaches a new one). */
  async detach(): Promise<void> {
    this.attached = false;
    await this.thread.ask({ kind: 'detach' }, 'detached', 5_000);
  }

  stop(): Promise<void> {
    return this.thread.stop();
  }
}
