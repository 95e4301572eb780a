// Postcopy's fault path on the destination: vCPU faults become page requests on the return path,
// the preempt channel brings requested pages (read here on the main thread, or by the fault
// thread), and the fault thread is started, handed connections and retired. What state the
// migration is in is not kept here: the incoming adapter asks its state machine and says so.

import type net from 'node:net';
import { FaultThread } from './fault-thread.ts';
import { GuestRamTarget, type PageLedger } from './guest-ram-target.ts';
import {
  BatchWriter,
  type FaultPath,
  NEED_MORE,
  RamRecordDecoder,
  type RamBlockInfo,
  type RequestNaming,
  TransportError,
  writePageRequests,
} from '@livemig/protocol';
import { type Guest, REALTIME_VCPU_PRIORITY, RequestLine } from '@livemig/guest';
import { adoptWithOnread, detachFd, pumpOnread } from '@livemig/runtime';

/** A faulted page at most this far ahead of the background stream's position is coming soon anyway (8 MiB). */
const NEAR_PAGES = 2048;
/**
 * At the end of a postcopy, how long the fault thread may take to finish its channel (EOS, sent
 * right after EOF): well under the source's keepalive timeout, which runs while it waits for SHUT.
 */
const FAULT_THREAD_END_MS = 1_000;
const PREEMPT_READ_BYTES = 256 * 1024;

export interface PostcopyFaultsOptions {
  guest: Guest;
  /** --realtime-postcopy: vCPUs in postcopy and the fault thread under SCHED_FIFO. */
  realtime: boolean;
  /** Whether the migration still listens for faults (postcopy-active, -paused or -recover). */
  listening(): boolean;
  /** Whether the source reads livemig's compressed request batches. */
  peerIsLivemig(): boolean;
  /** Write page requests on the return path (dropped while there is none). */
  sendRequests(bytes: Buffer): void;
  /** The preempt link broke (a decoding error on it, or the fault thread's connection). */
  linkLost(err: TransportError): void;
  /** The fault thread's connection broke or the thread failed (the machine decides whether that matters). */
  faultThreadEnded(reason: string): void;
  log: { warn(obj: object, msg?: string): void };
}

export class PostcopyFaults implements PageLedger {
  readonly requested = new Set<number>();
  mainHead = -1;
  /** REQ_PAGES naming on the current main channel. */
  readonly naming: RequestNaming = { named: false };
  /** Page requests sent: pages and return-path bytes they took (to measure the compression). */
  requestedPages = 0;
  requestBytes = 0;

  private readonly o: PostcopyFaultsOptions;
  private readonly faultedPages = new Uint32Array(256);
  /**
   * With a livemig source and a preempt channel the fault thread owns that channel, turns faults
   * into requests on it and places the pages that come back (fault-worker.ts): a fault never waits
   * for the main thread's event loop. It boots with the listener, so no fault waits for it.
   */
  private thread: FaultThread | undefined;
  /** The fault thread letting go of a broken connection: its claims are released when this resolves. */
  private detaching: Promise<void> = Promise.resolve();
  /** A preempt connection accepted before postcopy listens (held unread until then). */
  private heldPreempt: { raw: net.Socket; tcp: boolean } | undefined;
  /** The preempt connection read on the main thread (no fault thread). */
  private preemptSocket: net.Socket | undefined;
  private preemptDecoder: RamRecordDecoder | undefined;
  private readonly preemptBuffer = Buffer.allocUnsafeSlow(PREEMPT_READ_BYTES);
  private readonly preemptTarget: GuestRamTarget;
  /** Pages that came on preempt channels before the current one. */
  private preemptPagesBefore = 0;
  /** The vCPUs' page accesses when the guest started here (RUN), and when postcopy ended. */
  private accessesAtRun = 0;
  private accessesAtEnd: number | undefined;

  constructor(options: PostcopyFaultsOptions) {
    this.o = options;
    this.preemptTarget = new GuestRamTarget(options.guest, this, false);
  }

  /** The target for the background stream's decoders. */
  mainTarget(): GuestRamTarget {
    return new GuestRamTarget(this.o.guest, this, true);
  }

  /** Boot the fault thread (a migration with postcopy-preempt), so it is ready when postcopy listens. */
  bootThread(): void {
    this.thread = this.newThread();
  }

  private newThread(): FaultThread {
    return new FaultThread(this.o.guest, this.o.realtime, (reason) => this.o.faultThreadEnded(reason));
  }

  /** POSTCOPY_LISTEN: vCPUs wait for missing pages from now on; their faults go to `faults`. */
  start(faults: FaultPath, markPrecopyReceived: boolean): void {
    const guest = this.o.guest;
    if (markPrecopyReceived) guest.ram.markAllReceived();
    guest.vcpus.setPostcopy(true);
    if (this.o.realtime) guest.vcpus.setRealtime(REALTIME_VCPU_PRIORITY);
    if (faults === 'main-thread') {
      this.retireThread();
      void this.serveFaults();
    }
  }

  /** POSTCOPY_RUN: the guest runs here from now on (its vCPU state is loaded). */
  noteRun(): void {
    this.accessesAtRun = this.guestAccesses();
    this.accessesAtEnd = undefined;
  }

  /** Page accesses of every vCPU since the guest was created (or its state loaded). */
  private guestAccesses(): number {
    const v = this.o.guest.vcpus;
    let n = 0;
    for (let i = 0; i < v.count; i++) n += v.readState(i).writes;
    return n;
  }

  /** Keep an accepted preempt connection for takePreempt. */
  holdPreempt(raw: net.Socket, tcp: boolean): void {
    this.heldPreempt?.raw.destroy();
    this.heldPreempt = { raw, tcp };
  }

  /** A preempt connection the migration refused. */
  dropHeldPreempt(): void {
    this.heldPreempt?.raw.destroy();
    this.heldPreempt = undefined;
  }

  /** Read the held preempt connection: hand it to the fault thread, or read it here. */
  takePreempt(faults: FaultPath, streamBlocks: readonly RamBlockInfo[]): void {
    const held = this.heldPreempt;
    if (held === undefined) return;
    this.heldPreempt = undefined;
    if (faults === 'fault-thread') {
      // A thread that failed (its error paused the migration) is replaced for the new connection.
      if (this.thread === undefined || this.thread.exited) this.thread = this.newThread();
      const { fd, pending } = detachFd(held.raw);
      this.thread.attach(fd, held.tcp, pending, streamBlocks);
      return;
    }
    // Bytes the connection brought before it was taken (read while the main channel's header
    // was checked) would be lost with the stream that holds them: they are placed first.
    const early: Buffer[] = [];
    for (let c = held.raw.read() as Buffer | null; c !== null; c = held.raw.read() as Buffer | null) early.push(c);
    const onread = { buffer: this.preemptBuffer, callback: (n: number) => this.onPreemptBytes(this.preemptBuffer.subarray(0, n), streamBlocks) };
    // A TLS socket has no descriptor to read from directly: its decrypted chunks are pumped.
    const tls = (held.raw as { encrypted?: boolean }).encrypted === true;
    const socket = tls ? held.raw : adoptWithOnread(held.raw, onread, { allowHalfOpen: true });
    if (tls) {
      pumpOnread(socket, onread);
      socket.resume();
    }
    if (held.tcp) socket.setNoDelay(true);
    this.preemptSocket = socket;
    socket.on('error', () => {});
    if (early.length > 0 && !this.onPreemptBytes(Buffer.concat(early), streamBlocks)) socket.pause();
  }

  /** Bytes on the preempt channel (valid during this call only): bare RAM records for the background stream's blocks. */
  private onPreemptBytes(bytes: Buffer, streamBlocks: readonly RamBlockInfo[]): boolean {
    try {
      this.preemptDecoder ??= RamRecordDecoder.forPreemptChannel(this.preemptTarget, streamBlocks);
      const d = this.preemptDecoder;
      d.push(bytes);
      if (d.next() !== NEED_MORE) {
        // Its EOS: every page of this channel is placed.
        this.o.guest.ram.wakeWaiters(0);
        return false;
      }
      this.o.guest.ram.wakeWaiters(0);
      d.retainUnread();
      return true;
    } catch (err) {
      this.o.linkLost(TransportError.lost('preempt', `preempt channel: ${(err as Error).message}`, err));
      return false;
    }
  }

  /** Whether a preempt connection is read on this thread (its pages can overtake the background stream here). */
  get readsPreemptHere(): boolean {
    return this.preemptSocket !== undefined;
  }

  /**
   * A vCPU waits for a page that the background stream will not bring within the next NEAR_PAGES
   * pages. Then the fault path must get its turn quickly (smaller reads, a yield after each). A
   * guest touching memory in order waits just ahead of the stream: nothing to hurry there.
   */
  urgent(faults: FaultPath): boolean {
    // A fault thread serves faults without this thread's event loop.
    if (faults === 'fault-thread') return false;
    const lo = this.mainHead + 1;
    const hi = lo + NEAR_PAGES;
    for (const p of this.requested) if (p < lo || p >= hi) return true;
    return !this.o.guest.vcpus.faultsWithin(lo, hi);
  }

  /**
   * vCPU faults become page requests on the return path. This loop wakes when a vCPU queues a
   * fault; a main-channel read that finds one queued sends its request at once instead
   * (afterRead: the wake-up would wait for the event loop's next turn).
   */
  private async serveFaults(): Promise<void> {
    while (this.o.listening()) {
      await this.o.guest.vcpus.waitForFault(200);
      // A fault slot reserved but not written yet: let I/O run before looking again.
      if (this.requestFaultedPages() === 0) await new Promise((r) => setImmediate(r));
    }
  }

  /** After each main-channel read in postcopy: wake vCPUs whose pages came, request what they fault on. */
  afterRead(faults: FaultPath): void {
    this.o.guest.ram.setStreamHead(0, this.mainHead);
    this.o.guest.ram.wakeWaiters(0);
    if (faults === 'main-thread' && this.o.guest.vcpus.faultsPending()) this.requestFaultedPages();
  }

  /** Drain the vCPUs' fault ring and request each page not received nor requested yet; returns how many faults were drained. */
  private requestFaultedPages(): number {
    const guest = this.o.guest;
    const pages = this.faultedPages;
    const n = guest.vcpus.drainFaults(pages);
    if (n === 0) return 0;
    const w = new BatchWriter({ slabSize: 4096 });
    const fresh: number[] = [];
    for (let i = 0; i < n; i++) {
      const page = pages[i]!;
      if (guest.ram.isReceived(0, page) || this.requested.has(page)) continue;
      this.requested.add(page);
      fresh.push(page);
    }
    // Several faults at once, to a livemig source: one message of compressed page indices.
    this.requestBytes += writePageRequests(w, guest.ram.blocks[0]!.idstr, fresh, this.o.peerIsLivemig(), this.naming);
    this.requestedPages += fresh.length;
    if (w.totalBytes > 0) this.o.sendRequests(w.flushConcat());
    return n;
  }

  /** After a recovery: the requests in flight died with the link; ask again for every page still awaited. */
  rerequestAwaited(): void {
    const awaited = [...this.requested].filter((page) => !this.o.guest.ram.isReceived(0, page));
    this.naming.named = false;
    if (awaited.length > 0) {
      const w = new BatchWriter({ slabSize: 4096 });
      writePageRequests(w, this.o.guest.ram.blocks[0]!.idstr, awaited, false, this.naming);
      this.o.sendRequests(w.flushConcat());
    }
  }

  /** The link broke (a pause): the preempt connection goes with the main one; the fault thread lets go of its. */
  dropLink(): void {
    // No stream moves until a recovery: faults ask at once.
    this.o.guest.ram.setStreamHead(0, -1);
    this.preemptSocket?.destroy();
    this.preemptSocket = undefined;
    this.preemptPagesBefore += this.preemptDecoderPages();
    this.preemptDecoder = undefined;
    this.dropHeldPreempt();
    const t = this.thread;
    if (t !== undefined) this.detaching = t.detach().then(() => this.o.guest.ram.releaseClaims());
  }

  /** Resolves once the fault thread has let go of a broken link (and its claims are released). */
  detached(): Promise<void> {
    return this.detaching;
  }

  /** The stream is complete: the fault thread's last pages are placed first; then every page is here. */
  async finish(awaitFaultThread: boolean): Promise<void> {
    const t = this.thread;
    if (awaitFaultThread && t !== undefined) {
      // It ends with the preempt channel's EOS, which the source sends right after EOF.
      await t.ended(FAULT_THREAD_END_MS);
      await t.detach();
      this.o.guest.ram.releaseClaims();
    }
    this.accessesAtEnd = this.guestAccesses();
    this.o.guest.ram.markAllReceived();
    this.o.guest.vcpus.setPostcopy(false);
    this.endRealtime();
  }

  /** Postcopy is over: vCPUs go back to the normal policy; a refused real-time priority is told once. */
  endRealtime(): void {
    if (!this.o.realtime) return;
    this.o.guest.vcpus.setRealtime(0);
    const refused = [this.o.guest.vcpus.realtimeRefused ? 'vCPUs' : '', this.thread?.realtimeRefused === true ? 'the fault thread' : ''].filter((w) => w !== '');
    if (refused.length > 0) {
      this.o.log.warn({ refused }, `--realtime-postcopy: ${refused.join(' and ')} could not run under SCHED_FIFO (it needs CAP_SYS_NICE), so they ran at the normal policy`);
    }
  }

  /** The migration is over: close the preempt connection, end the fault thread (its figures stay in the totals). */
  close(): void {
    this.preemptSocket?.destroy();
    this.dropHeldPreempt();
    this.retireThread();
  }

  private retireThread(): void {
    const t = this.thread;
    if (t === undefined) return;
    this.thread = undefined;
    this.preemptPagesBefore += t.preemptPages;
    void t.stop();
  }

  /** Postcopy figures for query-migrate (QEMU's names; the histogram as in QEMU 10.1); `runTimeMs`: RUN until completion (or now). */
  figures(runTimeMs: number): Record<string, unknown> {
    const v = this.o.guest.vcpus;
    const per = Array.from({ length: v.count }, (_, i) => v.blockTime(i));
    const buckets = Array.from(v.latency);
    const faults = per.reduce((a, b) => a + b.faults, 0);
    const blocked = per.reduce((a, b) => a + b.blockedMs, 0);
    // Requests the vCPUs wrote themselves (see guest's request-line.ts), with their fault thread's.
    const lineRequests = RequestLine.written(v.requestLine);
    return {
      'postcopy-blocktime': Math.round(blocked),
      'postcopy-vcpu-blocktime': per.map((p) => Math.round(p.blockedMs)),
      'postcopy-latency': faults > 0 ? Math.round((blocked * 1e6) / faults) : 0,
      'postcopy-latency-dist': buckets.slice(0, buckets.findLastIndex((b) => b > 0) + 1),
      'postcopy-faults': faults,
      'x-postcopy-request-pages': this.requestedPages + lineRequests.requests,
      'x-postcopy-preempt-pages': this.preemptPages(),
      'x-postcopy-request-bytes': this.requestBytes + lineRequests.bytes,
      // livemig: how long the guest has run in postcopy, for blocktime shares.
      'x-postcopy-run-time': Math.round(runTimeMs),
      // livemig: pages the vCPUs accessed meanwhile (the guest's own speed, beside its blocktime).
      'x-postcopy-guest-accesses': (this.accessesAtEnd ?? this.guestAccesses()) - this.accessesAtRun,
    };
  }

  /** Pages that came on preempt channels (earlier ones, before a recovery, included). */
  private preemptPages(): number {
    return this.preemptPagesBefore + this.preemptDecoderPages() + (this.thread?.preemptPages ?? 0);
  }

  /** Pages the main thread placed from the current preempt channel (without a fault thread). */
  private preemptDecoderPages(): number {
    const stats = this.preemptDecoder?.blockStats() ?? [];
    return stats.reduce((a, b) => a + b.normalPages + b.zeroPages, 0);
  }
}
