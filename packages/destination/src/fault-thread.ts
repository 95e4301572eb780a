// The main thread's handle on the postcopy fault thread (fault-worker.ts). The thread boots when
// a preempt connection arrives and takes connections over by file descriptor: attach() when
// postcopy listens (and after each recovery), detach() when the link breaks.

import { type Guest, LINE_WRITE_TIMEOUT_MS, RequestLine } from '@livemig/guest';
import { CommandThread } from '@livemig/runtime';
import type { RamBlockInfo } from '@livemig/protocol';

export interface FaultWorkerData {
  /** This guest's blocks; vCPUs fault on the first. */
  blocks: { idstr: string; memory: SharedArrayBuffer; received: SharedArrayBuffer; claimed: SharedArrayBuffer; waiting: SharedArrayBuffer }[];
  waiterSlots: number;
  faultRing: SharedArrayBuffer;
  /** The vCPUs' request line (guest's request-line.ts), which this thread owns, and its bitmap. */
  requestLine: SharedArrayBuffer;
  requested: SharedArrayBuffer;
  /** Float64Array of FaultCounter slots. */
  counters: SharedArrayBuffer;
  /** Run under SCHED_FIFO (--realtime-postcopy). */
  realtime: boolean;
}

/** Slots of FaultWorkerData.counters. */
export const FaultCounter = { PREEMPT_PAGES: 0, REALTIME_REFUSED: 1, SLOTS: 2 } as const;

/** Main thread → fault thread. */
export type FaultThreadCommand =
  /** Own this connection (a detached file descriptor); records name the stream's blocks. */
  | { kind: 'attach'; fd: number; tcp: boolean; pending: Uint8Array; streamBlocks: RamBlockInfo[] }
  /** Close the connection; answered by 'detached'. */
  | { kind: 'detach' };

/** Fault thread → main thread: the connection ended (EOS: every page on it is placed) or broke; a detach is done. */
export type FaultWorkerMessage = { kind: 'eof' } | { kind: 'closed'; reason: string } | { kind: 'detached' };

/** The compiled worker (src/ and dist/ are both one level below the package root). */
const WORKER_URL = new URL('../dist/fault-worker.js', import.meta.url);

export class FaultThread {
  private readonly thread: CommandThread<FaultThreadCommand, FaultWorkerMessage>;
  private readonly counters = new Float64Array(new SharedArrayBuffer(FaultCounter.SLOTS * 8));
  private readonly requestLine: SharedArrayBuffer;
  /** The attached connection ended (EOS) or broke: set by the thread's message, cleared by attach(). */
  private linkEnded = false;

  /** `onClosed`: the attached connection broke (not after a detach), or the thread failed. */
  constructor(guest: Guest, realtime: boolean, onClosed: (reason: string) => void) {
    const data: FaultWorkerData = {
      blocks: guest.ram.blocks.map((b) => ({ idstr: b.idstr, memory: b.memory, received: b.receivedMemory, claimed: b.claimedMemory, waiting: b.waitingMemory })),
      waiterSlots: guest.ram.waiterSlots,
      faultRing: guest.vcpus.faultRing.buffer as SharedArrayBuffer,
      requestLine: guest.vcpus.requestLine,
      requested: guest.vcpus.requestedMemory,
      counters: this.counters.buffer as SharedArrayBuffer,
      realtime,
    };
    this.requestLine = guest.vcpus.requestLine;
    RequestLine.reopen(this.requestLine);
    this.thread = new CommandThread(
      WORKER_URL,
      data,
      (m) => {
        if (m.kind === 'eof' || m.kind === 'closed') this.linkEnded = true;
        if (m.kind === 'closed') onClosed(m.reason);
      },
      (err) => onClosed(`fault thread failed: ${err.message}`),
    );
  }

  /** The thread has ended (stopped, or it failed): a new one is needed. */
  get exited(): boolean {
    return this.thread.exited;
  }

  /** It asked for real-time priority and was refused. */
  get realtimeRefused(): boolean {
    return this.counters[FaultCounter.REALTIME_REFUSED] === 1;
  }

  get preemptPages(): number {
    return this.counters[FaultCounter.PREEMPT_PAGES]!;
  }

  /** Own this connection (`pending`: bytes it brought already). */
  attach(fd: number, tcp: boolean, pending: Uint8Array, streamBlocks: readonly RamBlockInfo[]): void {
    this.linkEnded = false;
    this.thread.post({ kind: 'attach', fd, tcp, pending, streamBlocks: streamBlocks.map((b) => ({ idstr: b.idstr, length: b.length })) });
  }

  /** Resolves once the attached connection ended (EOS) or broke (bounded by `timeoutMs`). */
  async ended(timeoutMs: number): Promise<void> {
    // The end may have come already (the preempt channel's EOS can beat the main channel's EOF).
    if (!this.linkEnded) await this.thread.waitFor(['eof', 'closed'], timeoutMs);
  }

  /**
   * Close the connection. Resolves once the thread has let go of it: pages it claimed are placed
   * by then (placement is synchronous), so the claims left may be released.
   */
  async detach(): Promise<void> {
    if (this.thread.exited) return;
    // No answer: the thread is stuck, perhaps amid a page. It is ended, so nothing it claimed is
    // written after the claims are released (and a new thread takes the next connection).
    if (!(await this.thread.ask({ kind: 'detach' }, 'detached', 5_000))) await this.stop();
  }

  async stop(): Promise<void> {
    // The thread's end closes its connection's descriptor, which vCPUs may be writing requests
    // to: the request line is shut first (a vCPU mid-request lets go within bounds).
    const deadline = Date.now() + 2 * LINE_WRITE_TIMEOUT_MS;
    while (!RequestLine.shut(this.requestLine) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 2));
    await this.thread.stop();
  }
}
