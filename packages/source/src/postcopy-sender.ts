// The migration thread after the switchover to postcopy (wire-format.md §7.2–§7.5): the guest
// stops here and runs on the destination, which asks for the pages it faults on while the rest
// of RAM follows in the background. Requested pages jump the queue (and the rate limit): on the
// preempt connection a page server thread answers them (page-server.ts), else they go first in
// the next batch on the main channel. A broken link pauses; `migrate resume=true` recovers
// (RECV_BITMAP per block, POSTCOPY_RESUME, RESUME_ACK), all driven by the source machine.

import net from 'node:net';
import type { Duplex } from 'node:stream';
import {
  BatchWriter,
  MigCmd,
  TransportError,
  writeCommand,
  writeEof,
  writeEos,
  writePackaged,
  writePing,
  writeRamDiscard,
  writeRecvBitmapRequest,
  writeSectionFooter,
  writeSectionHeader,
} from '@livemig/protocol';
import { detachFd } from '@livemig/runtime';
import type { OutgoingMigration } from './migration.ts';
import { RAM_SECTION_ID } from './migration.ts';
import { PageServer } from './page-server.ts';
import { BATCH_BYTES } from './batch-size.ts';
import { MAX_ITERATION_MS, yieldToIo } from './precopy.ts';
import { iterationDeadline } from './ram-saver.ts';

/** The package's writer: device state of a small guest fits one slab. */
const PACKAGE_SLAB_BYTES = 64 * 1024;
/** Background batches without a page server are small: a request queued meanwhile waits at most one batch. */
const BACKGROUND_BATCH_BYTES = BATCH_BYTES / 4;
/**
 * With the page server answering requests on the preempt channel, no request waits behind a
 * batch: background pages go in precopy's batches. Against 256 KiB (4 + 4 interleaved runs, 128
 * MiB guest paced at 1000 MB/s): postcopy phase median 183 against 243 ms, blocked share 36 against 43 %.
 */
const PREEMPT_BACKGROUND_BATCH_BYTES = BATCH_BYTES;
/**
 * After the switch, background pages wait this long at most for the destination's first page
 * request. Sent before it, they would come from wherever precopy's scan had got to, and fill the
 * connection's buffers (megabytes on loopback) ahead of the pages around the guest's first
 * fault, where the scan jumps: the guest would fault page after page, each a round trip, until
 * that backlog drained. A guest that does not fault meanwhile loses this much of the link.
 */
const FIRST_REQUEST_WAIT_MS = 100;

export class PostcopySender {
  private readonly m: OutgoingMigration;
  /** Requested pages not served yet: [block index, page index] pairs, in arrival order. */
  private readonly requests: number[] = [];
  private requestCount = 0;
  private postcopyBytes = 0;
  /** The preempt connection until postcopy starts (or a recovery resumes) and the page server takes it. */
  private preempt: Duplex | undefined;
  /**
   * The 8.0 preempt setup: the connection is opened here, at the switch to postcopy and on each
   * recovery before POSTCOPY_RESUME, and ends with the migration (no EOS on it).
   */
  private connectPreempt: (() => Promise<Duplex>) | undefined;
  /** Answers requests on the preempt connection in its own thread; it boots with the migration. */
  private pageServer: PageServer | undefined;
  /** The page server letting go of a connection: the next one is attached after it. */
  private pageServerIdle: Promise<void> = Promise.resolve();
  /** Figures of page server threads that failed and were replaced. */
  private readonly before = { bytes: 0, requests: 0 };
  private realtimeRefusalTold = false;

  constructor(m: OutgoingMigration, preempt: Duplex | undefined, connectPreempt: (() => Promise<Duplex>) | undefined) {
    this.m = m;
    this.connectPreempt = connectPreempt;
    if (preempt !== undefined) this.takePreempt(preempt);
    // The thread boots with the migration either way: booting it at the switch would leave the
    // first requests of postcopy waiting for it.
    else if (connectPreempt !== undefined) this.pageServer = this.newPageServer();
  }

  /** The switchover to postcopy, then background and requested pages until none is left. */
  async run(): Promise<void> {
    const m = this.m;
    const w = m.w;
    // The 8.0 setup opens the preempt channel now, while the guest still runs here (as QEMU does,
    // waiting for it before the switchover): a failure fails the migration, which is still precopy.
    if (this.connectPreempt !== undefined) {
      const channel = await this.connectPreempt().catch((err: Error) => {
        throw TransportError.lost('preempt', `cannot open the postcopy-preempt channel: ${err.message}`, err);
      });
      this.takePreempt(channel);
      m.expect('active');
    }
    // A request that reaches the preempt connection before the thread serving it has booted
    // waits for the boot (seconds on a loaded machine) or for the background stream: the
    // guest keeps running here until the thread is up instead.
    if (this.pageServer !== undefined) await this.pageServer.ready;
    m.expect('active');
    await m.precopy.stopGuest();
    m.expect('active');
    m.dispatch({ type: 'switchoverStarted', postcopy: true });
    await m.holdBeforeSwitchover();
    m.expect('active', 'pre-switchover');
    // postcopy-active: the page server takes the preempt connection before the destination can ask.
    m.dispatch({ type: 'postcopyStarted' });
    m.precopy.writeSwitchoverStart();
    await m.precopy.endOtherDevices();
    m.precopy.syncDirty();
    m.ram.disableXbzrle();
    for (const [i, b] of m.guest.ram.blocks.entries()) {
      const ranges = m.ram.dirtyRanges(i);
      if (ranges.length > 0) writeRamDiscard(w, b.idstr, ranges);
    }
    m.ram.forgetBlock();
    writePing(w, 2);
    // The package: the destination parses it whole, starts listening for pages, loads devices, runs.
    const pkg = new BatchWriter({ slabSize: PACKAGE_SLAB_BYTES });
    writeCommand(pkg, MigCmd.POSTCOPY_LISTEN);
    m.precopy.writeDeviceSections(pkg);
    writePing(pkg, 3);
    writeCommand(pkg, MigCmd.POSTCOPY_RUN);
    const blob = pkg.flushConcat();
    writePackaged(w, blob.length);
    w.bytes(blob);
    writePing(w, 4);
    await m.flush();
    m.o.log.info({ ms: Math.round(m.now() - m.startTime), dirtyPages: m.ram.dirtyPages }, 'postcopy started');
    await this.firstRequest();
    await this.loop();
  }

  /**
   * Until the destination confirms the end: a batch while postcopy-active; while paused or
   * recovering, wait for the machine. Returns when the migration has left postcopy.
   */
  private async loop(): Promise<void> {
    const m = this.m;
    for (;;) {
      const status = m.state.status;
      if (status === 'postcopy-paused' || status === 'postcopy-recover') {
        await m.watch.next();
        continue;
      }
      if (status !== 'postcopy-active') return;
      try {
        if (await this.batch()) return;
      } catch (err) {
        // A write that failed with the link: the machine pauses (the fault came from the
        // channel); the recovery's received bitmaps say what to send again.
        // What was encoded and not written is dropped.
        m.w.discard();
        if (m.state.status === 'postcopy-active') throw err;
      }
    }
  }

  /** Wait (FIRST_REQUEST_WAIT_MS at most) until a page request came, on the return path or to the page server. */
  private async firstRequest(): Promise<void> {
    const m = this.m;
    const until = m.now() + FIRST_REQUEST_WAIT_MS;
    // The page server counts the requests it took on its own connection; the main thread is not
    // told of them one by one, so it looks every millisecond. A keepalive PING due meanwhile goes
    // with the first batch: this wait is far shorter than the destination's keepalive timeout.
    while (this.requestCount === 0 && (this.pageServer?.requests ?? 0) === 0 && m.state.status === 'postcopy-active') {
      const left = until - m.now();
      if (left <= 0) return;
      await m.watch.next(Math.min(1, left));
    }
  }

  /** One batch: keepalive PING, requested pages, background pages. True once the destination confirmed the end. */
  private async batch(): Promise<boolean> {
    const m = this.m;
    const w = m.w;
    const started = m.now();
    const deadline = iterationDeadline(m.now, started, MAX_ITERATION_MS);
    m.keepalivePings.writeDue(w);
    this.pageServer?.drainServed((block, page) => m.ram.takeRequested(block, page));
    writeSectionHeader(w, { kind: 'part', sectionId: RAM_SECTION_ID });
    const before = w.totalBytes;
    this.serveRequests(w);
    // Requested pages bypass the limit; only background pages count against it.
    const background = w.totalBytes;
    const allowance = m.limiter.allowance(m.now());
    const batchBytes = this.pageServer?.attached === true ? PREEMPT_BACKGROUND_BATCH_BYTES : BACKGROUND_BATCH_BYTES;
    if (m.ram.dirtyPages > 0 && allowance > 0) m.ram.saveIterate(w, Math.min(batchBytes, allowance), deadline);
    writeEos(w);
    writeSectionFooter(w, RAM_SECTION_ID, this.m.dialect.sectionFooters);
    m.limiter.consume(w.totalBytes - background);
    this.postcopyBytes += w.totalBytes - before;
    await m.flush();
    // A socket that takes every batch at once never makes us wait for 'drain': give the
    // return path (page requests) and QMP their turn at each batch.
    await yieldToIo();
    if (m.ram.dirtyPages === 0 && this.requests.length === 0 && m.state.status === 'postcopy-active') return this.endStream();
    const wait = this.requests.length > 0 || m.keepalivePings.pending ? 0 : m.limiter.delayFor(batchBytes, m.now());
    // Any step of the machine (a request, a keepalive, a pause) ends the wait.
    if (wait > 0) await m.watch.next(wait);
    return false;
  }

  /**
   * The end of the stream: RAM's END section, EOF, the page server's EOS on the preempt channel,
   * then the destination's SHUT. True once the migration completed; false if the link broke first
   * (after the recovery the received bitmaps say what to send again, then the end goes once more).
   */
  private async endStream(): Promise<boolean> {
    const m = this.m;
    const w = m.w;
    m.dispatch({ type: 'postcopyStreamEnded' });
    writeSectionHeader(w, { kind: 'end', sectionId: RAM_SECTION_ID });
    writeEos(w);
    writeSectionFooter(w, RAM_SECTION_ID, this.m.dialect.sectionFooters);
    writeEof(w);
    await m.flush();
    const server = this.pageServer;
    // QEMU 7.2's setup ends the preempt channel with an EOS; in the 8.0 setup it just stays open
    // until the migration is over.
    if (server?.attached === true && this.connectPreempt === undefined) await server.end();
    await m.watch.until(() => m.state.status !== 'postcopy-active' || !m.state.ending);
    return m.state.status !== 'postcopy-paused' && m.state.status !== 'postcopy-recover' && m.state.status !== 'postcopy-active';
  }

  // ---- requested pages --------------------------------------------------------------------------

  /** The machine accepted a page request: queue it; with the page server attached it goes at once. */
  queue(blockIndex: number, firstPage: number, pageCount: number): void {
    for (let p = firstPage; p < firstPage + pageCount; p++) this.requests.push(blockIndex, p);
    this.requestCount++;
    if (this.pageServer?.attached === true && this.m.state.status === 'postcopy-active') this.serveRequests(this.m.w);
  }

  /**
   * Send every queued requested page that is still to be sent: through the page server when it
   * has the preempt channel (at once, never behind background pages), else in `w`.
   */
  private serveRequests(w: BatchWriter): void {
    const q = this.requests;
    if (q.length === 0) return;
    const ram = this.m.ram;
    if (this.pageServer?.attached === true) {
      // As QEMU: a page already sent is not sent again (a QEMU destination fails on a second copy).
      for (let i = 0; i < q.length; i += 2) if (ram.takeRequested(q[i]!, q[i + 1]!)) this.pageServer.forwardRequest(q[i]!, q[i + 1]!);
    } else {
      for (let i = 0; i < q.length; i += 2) ram.sendRequested(w, q[i]!, q[i + 1]!);
    }
    q.length = 0;
  }

  // ---- recovery ---------------------------------------------------------------------------------

  /** A recovery's first step, on the new main channel: RECV_BITMAP requests for every block. */
  recover(blocks: readonly string[], preempt: Duplex | undefined, connectPreempt: (() => Promise<Duplex>) | undefined): void {
    const m = this.m;
    this.requests.length = 0;
    this.connectPreempt = connectPreempt;
    if (preempt !== undefined) this.takePreempt(preempt);
    for (const b of blocks) writeRecvBitmapRequest(m.w, b);
    void m.flush().catch(() => {});
  }

  /** A block's received bitmap: dirty := not received. */
  applyReceivedBitmap(block: string, bitmap: Uint8Array): void {
    const i = this.m.guest.ram.blocks.findIndex((b) => b.idstr === block);
    this.m.ram.setDirtyFromReceived(i, bitmap);
  }

  /**
   * Every bitmap is in: POSTCOPY_RESUME (the stream carries on from a fresh block context). In
   * the 8.0 setup the new preempt channel is opened first (a QEMU 10 destination, once resumed,
   * waits for it before it reads on); failing to open it pauses again.
   */
  sendResume(): void {
    const connect = this.connectPreempt;
    if (connect === undefined) return this.writeResume();
    const m = this.m;
    void connect().then(
      (channel) => {
        if (m.state.status !== 'postcopy-recover') {
          channel.destroy();
          return;
        }
        this.takePreempt(channel);
        this.writeResume();
      },
      (err: Error) => {
        if (m.state.status !== 'postcopy-recover') return;
        m.dispatch({ type: 'faulted', error: TransportError.lost('preempt', `cannot open the postcopy-preempt channel: ${err.message}`, err) });
      },
    );
  }

  private writeResume(): void {
    const m = this.m;
    m.ram.forgetBlock();
    writeCommand(m.w, MigCmd.POSTCOPY_RESUME);
    void m.flush().catch(() => {});
  }

  // ---- the page server --------------------------------------------------------------------------

  private newPageServer(): PageServer {
    return new PageServer(this.m.guest, this.m.o.realtimePostcopy === true, (reason) => this.preemptLost(reason));
  }

  /** A new preempt connection, held until postcopy runs (again). */
  private takePreempt(channel: Duplex): void {
    // The page server thread writes to the connection's descriptor, which TLS rules out: with
    // TLS, requested pages go first on the main channel and the preempt channel stays idle.
    if (this.pageServer === undefined && (channel as { encrypted?: boolean }).encrypted !== true) this.pageServer = this.newPageServer();
    this.holdPreempt(channel);
  }

  private holdPreempt(channel: Duplex): void {
    // A failure before postcopy shows as a destroyed channel then (requests use the main channel).
    channel.on('error', () => {});
    this.preempt = channel;
  }

  /** The preempt channel broke: pause, as for a break of the main channel. */
  private preemptLost(reason: string): void {
    this.m.o.log.warn({ reason }, 'the preempt channel broke');
    this.m.dispatch({ type: 'faulted', error: TransportError.lost('preempt', `the preempt channel broke: ${reason}`) });
  }

  /** Postcopy runs (again): postcopy's bandwidth; the page server takes the preempt connection. */
  startPaging(): void {
    const m = this.m;
    m.limiter.setRate(m.o.parameters['max-postcopy-bandwidth'], m.now());
    const socket = this.preempt;
    if (socket !== undefined && (socket as { encrypted?: boolean }).encrypted === true) return; // stays idle: see takePreempt
    this.preempt = undefined;
    if (socket === undefined || this.pageServer === undefined) return;
    if (!(socket instanceof net.Socket) || socket.destroyed) {
      socket.destroy();
      return;
    }
    const attach = (): void => {
      if (socket.destroyed || this.pageServer === undefined) return;
      // A thread that failed (its error paused the migration) is replaced for the new connection.
      if (this.pageServer.exited) {
        this.before.bytes += this.pageServer.bytes;
        this.before.requests += this.pageServer.requests;
        this.pageServer = this.newPageServer();
      }
      const { fd, pending } = detachFd(socket);
      this.pageServer.attach(fd, socket.remoteFamily !== undefined, pending);
      if (this.pageServer.realtimeRefused && !this.realtimeRefusalTold) {
        this.realtimeRefusalTold = true;
        m.o.log.warn({}, '--realtime-postcopy: the page server could not run under SCHED_FIFO (it needs CAP_SYS_NICE), so it runs at the normal policy');
      }
    };
    // A recovery: the thread must have let go of the broken connection first.
    void this.pageServerIdle.then(attach);
  }

  /** The link broke or was paused: the page server lets go of its connection. */
  stopPaging(): void {
    const server = this.pageServer;
    if (server === undefined || !server.attached) return;
    this.pageServerIdle = server.detach().catch(() => {});
  }

  /** Close the preempt connection if it is still held here. */
  closePreempt(): void {
    this.preempt?.destroy();
    this.preempt = undefined;
  }

  dispose(): void {
    this.closePreempt();
    void this.pageServer?.stop();
  }

  figures(): { requests: number; preemptRequests: number; preemptBytes: number; postcopyBytes: number } {
    const preemptRequests = this.before.requests + (this.pageServer?.requests ?? 0);
    return {
      requests: this.requestCount + preemptRequests,
      preemptRequests,
      preemptBytes: this.before.bytes + (this.pageServer?.bytes ?? 0),
      postcopyBytes: this.postcopyBytes,
    };
  }
}
