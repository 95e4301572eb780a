// The main thread's handle on the postcopy page server (page-server-worker.ts): a thread that
// owns the preempt connection and answers page requests on it from guest RAM, so a request never
// waits for the main thread, which is busy sending background pages.

import { fileURLToPath } from 'node:url';
import { Worker } from 'node:worker_threads';
import type { Guest } from '@livemig/guest';

export interface PageServerData {
  blocks: { idstr: string; memory: SharedArrayBuffer; length: number }[];
  /** Requests from the main thread (the return path): RingSlot layout, [block, page] pairs. */
  forward: SharedArrayBuffer;
  /** Pages the thread served on its own, for the main thread (it skips them in the background). */
  served: SharedArrayBuffer;
  /** Float64Array of ServerCounter slots. */
  counters: SharedArrayBuffer;
}

/** A single-producer single-consumer ring of [block, page] pairs in an Int32Array. */
export const Ring = { HEAD: 0, TAIL: 1, BASE: 2, PAIRS: 1024 } as const;
export const ServerCounter = { PAGES: 0, BYTES: 1, REQUESTS: 2, SLOTS: 3 } as const;

/** Main thread → page server. */
export type PageServerCommand =
  /** Own this connection (a detached file descriptor; `pending`: bytes it brought already). */
  | { kind: 'attach'; fd: number; tcp: boolean; pending: Uint8Array }
  /** EOS on the connection (QEMU 7.2's end of a preempt channel), then close it: answered by 'ended'. */
  | { kind: 'end' }
  /** Close the connection (the link broke): answered by 'detached'. */
  | { kind: 'detach' };

/** Page server → main thread. */
export type PageServerMessage = { kind: 'ended' } | { kind: 'detached' } | { kind: 'closed'; reason: string };

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

/**
 * The page server thread boots with the migration (so no request waits for it) and takes the
 * preempt connection when postcopy starts: attach(), then end() or detach().
 */
export class PageServer {
  private readonly worker: Worker;
  private readonly forward = new Int32Array(new SharedArrayBuffer((Ring.BASE + 2 * Ring.PAIRS) * 4));
  private readonly served = new Int32Array(new SharedArrayBuffer((Ring.BASE + 2 * Ring.PAIRS) * 4));
  private readonly counters = new Float64Array(new SharedArrayBuffer(ServerCounter.SLOTS * 8));
  /** The thread has ended (stopped, or it failed): a new one is needed. */
  exited = false;
  private readonly waiters = new Set<(m: PageServerMessage | undefined) => void>();
  /** Requests the ring could not take (full): sent on the next forward. */
  private readonly overflow: number[] = [];
  /** A connection is attached. */
  attached = false;

  /** `onClosed`: the attached connection broke. */
  constructor(guest: Guest, onClosed: (reason: string) => void) {
    const data: PageServerData = {
      blocks: guest.ram.blocks.map((b) => ({ idstr: b.idstr, memory: b.memory, length: b.length })),
      forward: this.forward.buffer as SharedArrayBuffer,
      served: this.served.buffer as SharedArrayBuffer,
      counters: this.counters.buffer as SharedArrayBuffer,
    };
    this.worker = new Worker(fileURLToPath(WORKER_URL), { workerData: data });
    this.worker.unref();
    this.worker.on('message', (m: PageServerMessage) => {
      for (const w of this.waiters) w(m);
      if (m.kind === 'closed' && this.attached) {
        this.attached = false;
        onClosed(m.reason);
      }
    });
    this.worker.on('error', (err) => {
      if (this.attached) {
        this.attached = false;
        onClosed(`page server failed: ${err.message}`);
      }
    });
    this.worker.on('exit', () => {
      this.exited = true;
      for (const w of this.waiters) w(undefined);
    });
  }

  attach(fd: number, tcp: boolean, pending: Uint8Array): void {
    this.attached = true;
    this.worker.postMessage({ kind: 'attach', fd, tcp, pending } satisfies PageServerCommand);
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

  private request(command: PageServerCommand, answer: PageServerMessage['kind'], timeoutMs: number): Promise<void> {
    this.attached = false;
    if (this.exited) return Promise.resolve();
    const done = new Promise<void>((resolve) => {
      const waiter = (m: PageServerMessage | undefined): void => {
        if (m !== undefined && m.kind !== answer) return;
        this.waiters.delete(waiter);
        clearTimeout(timer);
        resolve();
      };
      const timer = setTimeout(() => waiter(undefined), timeoutMs);
      this.waiters.add(waiter);
    });
    this.worker.postMessage(command);
    return done;
  }

  /** The end of postcopy: EOS on the preempt channel, then close it (bounded). */
  end(timeoutMs = 5_000): Promise<void> {
    return this.request({ kind: 'end' }, 'ended', timeoutMs);
  }

  /** The link broke: close the connection (a recovery attaches a new one). */
  detach(): Promise<void> {
    return this.request({ kind: 'detach' }, 'detached', 5_000);
  }

  async stop(): Promise<void> {
    await this.worker.terminate();
  }
}
