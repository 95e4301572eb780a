// The incoming migration: accept one connection, decode the stream straight into guest RAM,
// load devices, answer on the return path, and start the guest when the stream is complete.
//
//   none → (listening) → active ──→ completed   (guest runs unless -S; SHUT(0) on the RP)
//                           └─────→ failed      (error details + SHUT(1) on the RP; the process exits)
//
// Reads use Node's static-buffer mode (onread with one reused 1 MiB buffer): the decoder copies
// each page once from that buffer into guest RAM and keeps only a straddling record's bytes.

import net from 'node:net';
import { FaultThread } from './fault-thread.ts';
import {
  BatchWriter,
  type Capabilities,
  ConfigError,
  type DecoderEvent,
  ErrorCode,
  KEEPALIVE_INTERVAL_MS,
  KEEPALIVE_TIMEOUT_MS,
  MultifdReceiver,
  LIVEMIG_HELLO_PING,
  MigCmd,
  type MigrationStatus,
  NEED_MORE,
  PostcopyState,
  recvBitmapBytes,
  type RamBlockInfo,
  type RamTarget,
  StreamDecoder,
  type RequestNaming,
  writePageRequests,
  encodeLivemigError,
  writeRpLivemigExt,
  writeRpPong,
  writeRpRecvBitmap,
  writeRpResumeAck,
  writeRpShut,
} from '@livemig/protocol';
import { type Guest, REALTIME_VCPU_PRIORITY, RequestLine } from '@livemig/guest';
import { adoptWithOnread, detachFd, formatAddress, listenChannel, listenServer, type ChannelListener } from '@livemig/runtime';

/** The statuses a livemig destination goes through (QEMU's names). */
export type IncomingStatus = Extract<
  MigrationStatus,
  'none' | 'setup' | 'active' | 'postcopy-active' | 'postcopy-paused' | 'postcopy-recover' | 'completed' | 'failed'
>;

const READ_BUFFER_BYTES = 1024 * 1024;
/** Takes a connection that followed the main channel (`extra`: 1 for the first such). */
type ExtraChannelHandler = (raw: net.Socket, extra: number, server: net.Server, tcp: boolean) => void;
const FAULT_READ_BYTES = 64 * 1024;
/** A faulted page at most this far ahead of the background stream's position is coming soon anyway (8 MiB). */
const NEAR_PAGES = 2048;
/**
 * At the end of a postcopy, how long the fault thread may take to finish its channel (EOS, sent
 * right after EOF): well under the source's keepalive timeout, which runs while it waits for SHUT.
 */
const FAULT_THREAD_END_MS = 1_000;
/** How long the extra connections of a failed migration stay open after their FIN (see shutDown). */
const FAILED_CHANNEL_LINGER_MS = 1_000;

export interface IncomingOptions {
  guest: Guest;
  capabilities: Capabilities;
  /** Start the guest after the migration (no -S) when the source was running. */
  autostart: boolean;
  /** Machine type we accept in the configuration record. */
  machineType: string;
  /** Parameter multifd-channels: how many multifd connections follow the main one (capability multifd). */
  multifdChannels?: number;
  /** Postcopy's fault path (vCPUs in postcopy, the fault thread) under SCHED_FIFO. */
  realtimePostcopy?: boolean;
  events: { status(s: IncomingStatus): void; resume(): void };
  log: { info(obj: object, msg?: string): void; warn(obj: object, msg?: string): void };
}

/** A failure with where it happened, as it is reported to QMP and to the source. */
function describe(err: unknown): { code: string; message: string; offset?: number } {
  const e = err as { code?: unknown; message?: string; streamOffset?: number };
  const out: { code: string; message: string; offset?: number } = {
    code: typeof e.code === 'string' ? e.code : 'LM_ERR_INTERNAL',
    message: e.message ?? String(err),
  };
  if (typeof e.streamOffset === 'number') out.offset = e.streamOffset;
  return out;
}

export class IncomingMigration {
  status: IncomingStatus = 'none';
  errorDesc: string | undefined;
  private readonly o: IncomingOptions;
  private listener: ChannelListener | undefined;
  private socket: net.Socket | undefined;
  private decoder: StreamDecoder;
  /** Every non-RAM section we accept: FULL devices and iterative loaders, by idstr + instance. */
  private readonly devices = new Map<string, { layout: number | 'be32-prefixed'; load(data: Buffer, versionId: number): void }>();
  private rpOpen = false;
  private peerIsLivemig = false;
  private sawEof = false;
  /** Stream block index → guest block index. */
  private blockMap: number[] = [];
  private postcopyAdvised = false;
  private discardSeen = false;
  /** POSTCOPY_LISTEN seen: pages arriving now wake vCPUs waiting for them. */
  private listening = false;
  /** REQ_PAGES naming on the current main channel. */
  private readonly rpNaming: RequestNaming = { named: false };
  /** Pages requested and not received yet (main block), so one page makes one request. */
  private readonly requested = new Set<number>();
  private faultLoopRunning = false;
  /** When the current channel last brought bytes (postcopy keepalive). */
  private lastByteAt = 0;
  /** Page requests sent: pages and return-path bytes they took (to measure the compression). */
  private requestedPages = 0;
  private requestBytes = 0;
  private runAt = 0;
  private keepalive: NodeJS.Timeout | undefined;
  private finished = false;
  private readonly readBuffer = Buffer.allocUnsafeSlow(READ_BUFFER_BYTES);
  /** The start of readBuffer: where reads go while a vCPU waits for a page (postcopy). */
  private readonly readSlice = this.readBuffer.subarray(0, FAULT_READ_BYTES);
  /**
   * Where the main channel's next read lands. With a preempt channel, while a vCPU waits for a
   * page, reads shrink to FAULT_READ_BYTES so the event loop gets to the fault path (its request,
   * the page on the preempt channel) after ~50 µs of background decoding, not a megabyte's worth.
   */
  private readonly nextReadBuffer = (): Buffer => (this.listening && this.preemptSocket !== undefined && this.faultIsUrgent() ? this.readSlice : this.readBuffer);

  /** Page (main block) the main channel placed last: where the background stream is. */
  private mainHead = -1;
  private placingFromMain = false;

  /**
   * Postcopy: a vCPU waits for a page that the background stream will not bring within the next
   * NEAR_PAGES pages. Then the fault path must get its turn quickly (smaller reads, a yield after
   * each). A guest touching memory in order waits just ahead of the stream: nothing to hurry there,
   * and full-speed background reads are what it needs.
   */
  private faultIsUrgent(): boolean {
    // A fault thread serves faults without this thread's event loop.
    if (this.faultThreadMode) return false;
    const lo = this.mainHead + 1;
    const hi = lo + NEAR_PAGES;
    for (const p of this.requested) if (p < lo || p >= hi) return true;
    return !this.o.guest.vcpus.faultsWithin(lo, hi);
  }
  private resolveDone!: () => void;
  /** Resolves when the migration reached completed or failed. */
  readonly done: Promise<void>;
  /** Resolves when the main connection arrives (or the migration ends without one). */
  readonly connected: Promise<void>;
  private resolveConnected!: () => void;
  /** Time the stream's first byte arrived and when the guest was started (ms, performance.now()). */
  firstByteAt = 0;
  loadedAt = 0;

  constructor(options: IncomingOptions) {
    this.o = options;
    for (const d of options.guest.devices) this.devices.set(`${d.idstr}\u0000${d.instanceId}`, d);
    const vfio = options.guest.vfio;
    if (vfio !== undefined) {
      this.devices.set(`${vfio.idstr}\u0000${vfio.instanceId}`, { layout: vfio.layout, load: (data, v) => vfio.loadState(data, v) });
    }
    this.decoder = this.makeDecoder();    this.done = new Promise((resolve) => (this.resolveDone = resolve));
    this.connected = new Promise((resolve) => (this.resolveConnected = resolve));
    void this.done.then(() => this.resolveConnected());
  }

  /** A decoder for the first connection, or for a postcopy recovery channel (no header). */
  private makeDecoder(resume?: StreamDecoder): StreamDecoder {
    const options: ConstructorParameters<typeof StreamDecoder>[0] = {
      ram: this.ramTarget(),
      deviceLayout: (s) => this.devices.get(`${s.idstr}\u0000${s.instanceId}`)?.layout,
      // Guest RAM is fresh (never run) until the stream has been loaded.
      zeroedMemory: resume === undefined,
    };
    if (resume !== undefined) {
      options.resume = { postcopyState: PostcopyState.RUNNING, sections: resume.knownSections(), blocks: resume.ramBlocks };
      options.startOffset = 0;
    }
    return new StreamDecoder(options);
  }

  /**
   * Where the decoders put pages. The per-page callbacks are only installed when postcopy starts
   * listening, so precopy pays nothing for them.
   */
  private readonly target: RamTarget = { attachBlocks: (blocks, offset) => this.attachBlocks(blocks, offset) };

  private ramTarget(): RamTarget {
    return this.target;
  }

  private installPostcopyCallbacks(): void {
    this.target.pagePlaced = (block, pageOffset) => this.onPagePlaced(block, pageOffset);
    // Postcopy: never overwrite a page the guest already has (and may have changed since), nor
    // one the fault thread is placing.
    this.target.acceptPage = (block, pageOffset) => this.o.guest.ram.claim(this.blockMap[block]!, pageOffset / 4096);
  }

  get listeningAddress(): string | undefined {
    if (this.listenedOn !== undefined) return this.listenedOn;
    return this.listener?.addressText;
  }

  get bytesReceived(): number {
    return this.decoder.streamOffset + this.decoder.bufferedBytes;
  }

  /** Listen on tcp: or unix:; returns the bound address (port 0 resolved). */
  async listen(address: string): Promise<string> {
    if (this.listener !== undefined || this.status !== 'none') throw new Error('an incoming migration was already started');
    if (this.o.capabilities['postcopy-preempt']) return this.listenWithPreempt(address);
    if (this.o.capabilities.multifd) return this.listenWithMultifd(address);
    this.listener = await listenChannel(address, {
      allowHalfOpen: true,
      onread: { buffer: this.nextReadBuffer, callback: (n) => this.onBytes(n) },
    });
    this.o.events.status('setup');
    this.o.log.info({ address: this.listener.addressText }, 'waiting for the incoming migration');
    this.listener.accepted.then(
      (socket) => this.onConnection(socket),
      (err: Error) => this.fail(err),
    );
    return this.listener.addressText;
  }

  // ---- postcopy preempt channel (wire-format.md §7.5) ---------------------------------------------

  private preemptDecoder: StreamDecoder | undefined;
  private preemptSocket: net.Socket | undefined;
  private readonly preemptBuffer = Buffer.allocUnsafeSlow(256 * 1024);

  /**
   * Listen for a main channel and the extra connections that follow it to the same address: the
   * first connection is the main channel (as a QEMU 7.2 destination assumes) and goes to
   * `onMain`; `onExtra` gets each later one (its 1-based position among the extras).
   */
  private async listenWithExtraChannels(
    address: string,
    onMain: (socket: net.Socket) => void,
    onExtra: ExtraChannelHandler,
  ): Promise<string> {
    const server = net.createServer({ pauseOnConnect: true, allowHalfOpen: true });
    const bound = await listenServer(server, address);
    const tcp = bound.transport === 'tcp';
    let count = 0;
    server.on('connection', (raw) => {
      count++;
      if (count > 1) {
        onExtra(raw, count - 1, server, tcp);
        return;
      }
      const socket = adoptWithOnread(raw, { buffer: this.nextReadBuffer, callback: (n) => this.onBytes(n) }, { allowHalfOpen: true });
      if (tcp) socket.setNoDelay(true);
      onMain(socket);
    });
    this.channelServer?.close();
    this.channelServer = server;
    return formatAddress(bound);
  }

  private async listenFirstTime(address: string, logFields: Record<string, unknown>, onExtra: ExtraChannelHandler): Promise<string> {
    const text = await this.listenWithExtraChannels(address, (socket) => this.onConnection(socket), onExtra);
    this.o.events.status('setup');
    this.listenedOn = text;
    this.o.log.info({ address: text, ...logFields }, 'waiting for the incoming migration');
    return text;
  }

  /**
   * With postcopy-preempt the source opens two connections to the same address: the first is the
   * main channel, the second carries requested pages only (bare RAM records), so they never queue
   * behind background pages. A postcopy recovery opens both again.
   */
  private listenWithPreempt(address: string): Promise<string> {
    this.faultThread = this.newFaultThread();
    return this.listenFirstTime(address, { preempt: true }, (raw, extra, server, tcp) => this.acceptPreempt(raw, extra, server, tcp));
  }

  private acceptPreempt(raw: net.Socket, extra: number, server: net.Server, tcp: boolean): void {
    if (extra > 1 || this.finished) {
      raw.destroy();
      return;
    }
    this.takePreempt(raw, tcp);
    server.close();
  }

  /** The listener of a migration with extra channels (preempt or multifd). */
  private channelServer: net.Server | undefined;

  // ---- multifd channels (wire-format.md §7.6) ------------------------------------------------------

  private readonly multifd: { recv: MultifdReceiver; socket: net.Socket; ended: boolean }[] = [];
  /** Connections beyond what multifd-channels allows, left unread until the migration ends. */
  private readonly heldConnections: net.Socket[] = [];
  /** RAM sections the main channel has ended: each needs a SYNC packet from every channel. */
  private ramSectionsEnded = 0;
  /** The main channel stopped at a RAM section end until the channels' SYNCs arrive. */
  private waitingForSync = false;

  /**
   * With multifd the first connection is the main channel (as a QEMU 7.2 destination assumes);
   * the next `multifd-channels` connections each start with an init packet naming their id.
   * Page data is read straight into guest RAM.
   */
  private listenWithMultifd(address: string): Promise<string> {
    const expected = this.o.multifdChannels ?? 2;
    const seen = new Set<number>();
    const blocks = new Map(this.o.guest.ram.blocks.map((b, i) => [b.idstr, this.o.guest.ram.view(i)]));
    return this.listenFirstTime(address, { multifdChannels: expected }, (raw, extra) => {
      // One connection beyond multifd-channels is read too: its init packet names the mismatch
      // (a channel id this side does not expect), and that reason goes back to the source. More
      // are held unread until the end (closing them first would let the source fail on a reset
      // before the reason arrives); past 256 they are closed at once.
      if (extra > expected + 1) {
        if (this.heldConnections.length < 256 && !this.finished) this.heldConnections.push(raw);
        else raw.destroy();
        return;
      }
      const recv = new MultifdReceiver((name) => blocks.get(name));
      const channel = { recv, socket: undefined as unknown as net.Socket, ended: false };
      const socket = adoptWithOnread(
        raw,
        { buffer: () => recv.nextBuffer(), callback: (n) => this.onMultifdBytes(channel, seen, expected, n) },
        { allowHalfOpen: true },
      );
      channel.socket = socket;
      this.multifd.push(channel);
      socket.on('end', () => {
        channel.ended = true;
        if (!this.finished && !recv.atPacketBoundary) this.fail(new Error(`multifd channel ${recv.channelId} closed in the middle of a packet`));
        else this.checkSync();
      });
      socket.on('error', (err) => this.fail(new Error(`multifd channel ${recv.channelId}: ${err.message}`)));
    });
  }

  private onMultifdBytes(channel: { recv: MultifdReceiver }, seen: Set<number>, expected: number, n: number): boolean {
    if (this.finished) return false;
    try {
      const ev = channel.recv.advance(n);
      if (ev === null) return true;
      if (ev.kind === 'init') {
        const id = ev.init.channelId;
        if (id >= expected) throw new ConfigError(ErrorCode.BAD_MULTIFD, `multifd channel id ${id}, but multifd-channels is ${expected} here`);
        if (seen.has(id)) throw new ConfigError(ErrorCode.BAD_MULTIFD, `multifd channel id ${id} connected twice`);
        if (ev.init.uuid.some((b) => b !== 0)) throw new ConfigError(ErrorCode.BAD_MULTIFD, `multifd channel ${id} names a UUID other than this guest's (all zeros)`);
        seen.add(id);
      } else if (ev.sync) this.checkSync();
      return true;
    } catch (err) {
      this.failSoon(err as Error);
      return false;
    }
  }

  /**
   * A multifd channel failed. If the main channel has not yet said the source is livemig (its
   * hello comes first on that channel), give it a moment, so the reason can go back to the source.
   */
  private failSoon(err: Error): void {
    if (this.peerIsLivemig || this.finished) this.fail(err);
    else setTimeout(() => this.fail(err), 100).unref();
  }

  /** Whether every channel has delivered the SYNC of each RAM section the main channel ended. */
  private syncsComplete(): boolean {
    const need = this.ramSectionsEnded;
    if (this.multifd.length < (this.o.multifdChannels ?? 2)) return need === 0;
    return this.multifd.every((c) => c.recv.syncs >= need);
  }

  private checkSync(): void {
    if (!this.waitingForSync || this.finished) return;
    if (!this.syncsComplete()) {
      const stuck = this.multifd.find((c) => c.ended && c.recv.syncs < this.ramSectionsEnded);
      if (stuck !== undefined) this.fail(new Error(`multifd channel ${stuck.recv.channelId} ended before the SYNC of RAM section ${this.ramSectionsEnded}`));
      return;
    }
    this.waitingForSync = false;
    try {
      if (this.drainEvents() && this.socket !== undefined) {
        this.decoder.retainUnread();
        this.socket.resume();
      }
    } catch (err) {
      this.fail(err as Error);
    }
  }
  /** Pages that came on preempt channels (earlier ones, before a recovery, included). */
  private preemptPagesBefore = 0;

  private preemptPages(): number {
    return this.preemptPagesBefore + this.preemptDecoderPages() + (this.faultThread?.preemptPages ?? 0);
  }

  /** Pages the main thread placed from the current preempt channel (without a fault thread). */
  private preemptDecoderPages(): number {
    const stats = this.preemptDecoder?.blockStats() ?? [];
    return stats.reduce((a, b) => a + b.normalPages + b.zeroPages, 0);
  }

  /**
   * Postcopy with a livemig source and a preempt channel: the fault thread owns that channel,
   * turns faults into requests on it and places the pages that come back (fault-worker.ts). The
   * main thread then only decodes the background stream: a fault never waits for its event loop.
   * It boots when the migration starts listening, so no fault waits for it.
   */
  private faultThread: FaultThread | undefined;
  /** Whether faults go through the fault thread (decided when postcopy starts listening). */
  private faultThreadMode = false;
  /** The fault thread owns a connection now. */
  private faultThreadAttached = false;
  /** The fault thread letting go of a broken connection: its claims are released when this resolves. */
  private faultThreadDetaching: Promise<void> = Promise.resolve();
  /** A preempt connection accepted before postcopy listens, taken on then. */
  private pendingPreempt: { raw: net.Socket; tcp: boolean } | undefined;

  /** Take on an accepted preempt connection: now if postcopy listens, else at LISTEN. */
  private takePreempt(raw: net.Socket, tcp: boolean): void {
    if (!this.listening) {
      this.pendingPreempt = { raw, tcp };
      return;
    }
    if (this.faultThreadMode && this.faultThread !== undefined) {
      // A thread that failed (its error paused the migration) is replaced for the new connection.
      if (this.faultThread.exited) this.faultThread = this.newFaultThread();
      const { fd, pending } = detachFd(raw);
      this.faultThread.attach(fd, tcp, pending, this.decoder.ramBlocks);
      this.faultThreadAttached = true;
      return;
    }
    const socket = adoptWithOnread(raw, { buffer: this.preemptBuffer, callback: (n) => this.onPreemptBytes(n) }, { allowHalfOpen: true });
    if (tcp) socket.setNoDelay(true);
    this.preemptSocket = socket;
    socket.on('error', () => {});
  }

  private newFaultThread(): FaultThread {
    return new FaultThread(this.o.guest, this.o.realtimePostcopy === true, (reason) => {
      if (this.faultThreadAttached) this.linkLost(new Error(reason));
    });
  }

  /** End the fault thread; its figures stay in the totals. */
  private retireFaultThread(): void {
    const t = this.faultThread;
    if (t === undefined) return;
    this.faultThread = undefined;
    this.faultThreadAttached = false;
    this.preemptPagesBefore += t.preemptPages;
    void t.stop();
  }

  /** Postcopy is over: vCPUs go back to the normal policy; a refused real-time priority is told once. */
  private endRealtime(): void {
    if (this.o.realtimePostcopy !== true) return;
    this.o.guest.vcpus.setRealtime(0);
    const refused = [this.o.guest.vcpus.realtimeRefused ? 'vCPUs' : '', this.faultThread?.realtimeRefused === true ? 'the fault thread' : ''].filter((w) => w !== '');
    if (refused.length > 0) {
      this.o.log.warn({ refused }, `--realtime-postcopy: ${refused.join(' and ')} could not run under SCHED_FIFO (it needs CAP_SYS_NICE), so they ran at the normal policy`);
    }
  }

  /** The fault thread lets go of its connection; then pages it claimed and did not place are free again. */
  private detachFaultThread(): Promise<void> {
    if (!this.faultThreadAttached || this.faultThread === undefined) return this.faultThreadDetaching;
    this.faultThreadAttached = false;
    this.faultThreadDetaching = this.faultThread.detach().then(() => this.o.guest.ram.releaseClaims());
    return this.faultThreadDetaching;
  }

  private listenedOn: string | undefined;

  /** Bytes on the preempt channel: bare RAM records, decoded once the block list is known. */
  private onPreemptBytes(n: number): boolean {
    if (this.finished) return false;
    try {
      if (this.preemptDecoder === undefined) {
        this.preemptDecoder = new StreamDecoder({
          ram: this.ramTarget(),
          bareRam: true,
          resume: { postcopyState: PostcopyState.RUNNING, sections: [], blocks: this.decoder.ramBlocks },
        });
      }
      const d = this.preemptDecoder;
      d.push(this.preemptBuffer.subarray(0, n));
      for (let ev = d.next(); ev !== NEED_MORE; ev = d.next()) {
        if (ev.kind === 'eof') {
          this.o.guest.ram.wakeWaiters(0);
          return false;
        }
      }
      this.o.guest.ram.wakeWaiters(0);
      d.retainUnread();
      return true;
    } catch (err) {
      this.linkLost(new Error(`preempt channel: ${(err as Error).message}`));
      return false;
    }
  }

  private setStatus(s: IncomingStatus): void {
    if (this.status === s) return;
    this.status = s;
    this.o.events.status(s);
  }

  private onConnection(socket: net.Socket): void {
    this.resolveConnected();
    this.socket = socket;
    this.firstByteAt = performance.now();
    this.o.guest.setRunState('inmigrate');
    // The stream writes RAM behind the dirty log: from now on any page may be non-zero.
    this.o.guest.ram.markAllWritten();
    this.setStatus('active');
    this.watch(socket);
  }

  private watch(socket: net.Socket): void {
    socket.on('end', () => {
      if (this.socket === socket) this.onEnd();
    });
    socket.on('error', (err) => {
      if (this.socket === socket) this.linkLost(new Error(`migration connection failed: ${err.message}`));
    });
    socket.on('close', () => {
      if (this.socket === socket && !this.finished) this.linkLost(new Error(`the source closed the connection at stream offset ${this.bytesReceived}`));
    });
  }

  /**
   * The channel broke. Before postcopy runs that is a failure; once the guest runs here it is a
   * pause: vCPUs wait for missing pages until migrate-recover brings a new channel.
   */
  private linkLost(err: Error): void {
    if (this.finished) return;
    if (!this.listening) {
      this.fail(err);
      return;
    }
    if (this.status === 'postcopy-paused') return;
    this.socket?.destroy();
    this.socket = undefined;
    // The preempt channel goes with the main one; a recovery brings a new one.
    this.preemptSocket?.destroy();
    this.preemptSocket = undefined;
    void this.detachFaultThread();
    this.preemptPagesBefore += this.preemptDecoderPages();
    this.preemptDecoder = undefined;
    this.rpOpen = false;
    this.setStatus('postcopy-paused');
    this.o.log.warn({ reason: err.message }, 'postcopy paused: waiting for migrate-recover');
  }

  /**
   * A livemig source PINGs at least every 500 ms while postcopy runs: silence for 3 s means the
   * link is gone even though TCP has not noticed. (A QEMU source sends no keepalive.)
   */
  private startKeepalive(): void {
    this.lastByteAt = performance.now();
    this.keepalive = setInterval(() => {
      if (this.finished) {
        clearInterval(this.keepalive);
        return;
      }
      if (!this.peerIsLivemig || this.status !== 'postcopy-active') return;
      const silent = performance.now() - this.lastByteAt;
      if (silent > KEEPALIVE_TIMEOUT_MS) this.linkLost(new Error(`no data from the source for ${Math.round(silent)} ms: link presumed broken`));
    }, KEEPALIVE_INTERVAL_MS);
    this.keepalive.unref();
  }

  /** migrate-pause: break the link on purpose. */
  pause(): void {
    if (this.status !== 'postcopy-active' && this.status !== 'postcopy-recover') {
      throw new Error(`migrate-pause needs a postcopy migration (status is ${this.status})`);
    }
    this.linkLost(new Error('paused by migrate-pause'));
  }

  /** migrate-recover: listen for the source's recovery channel (and, with preempt, a new preempt channel). */
  async recover(uri: string): Promise<string> {
    if (this.status !== 'postcopy-paused') throw new Error(`migrate-recover needs a paused postcopy migration (status is ${this.status})`);
    // The fault thread must have let go of the broken link (and its claims be released) before pages come again.
    await this.faultThreadDetaching;
    const onMain = (socket: net.Socket): void => {
      if (this.status !== 'postcopy-paused') {
        socket.destroy();
        return;
      }
      // A new stream without header: records straight away, in the state we were in.
      this.decoder = this.makeDecoder(this.decoder);
      this.socket = socket;
      this.rpOpen = true;
      this.rpNaming.named = false;
      this.lastByteAt = performance.now();
      this.setStatus('postcopy-recover');
      this.watch(socket);
    };
    let address: string;
    if (this.o.capabilities['postcopy-preempt']) {
      address = await this.listenWithExtraChannels(uri, onMain, (raw, extra, server, tcp) => this.acceptPreempt(raw, extra, server, tcp));
    } else {
      const listener = await listenChannel(uri, {
        allowHalfOpen: true,
        onread: { buffer: this.nextReadBuffer, callback: (n) => this.onBytes(n) },
      });
      listener.accepted.then(onMain, () => {});
      address = listener.addressText;
    }
    this.o.events.status('setup');
    return address;
  }

  /** RECV_BITMAP: which pages of a block we hold (our bitmap words are its little-endian bytes). */
  private sendReceivedBitmap(name: string, offset: number): void {
    const ram = this.o.guest.ram;
    const b = ram.blocks.find((x) => x.idstr === name);
    if (b === undefined) throw new ConfigError(ErrorCode.CONFIG_MISMATCH, `RECV_BITMAP for unknown block "${name}"`, { streamOffset: offset, block: name });
    const size = recvBitmapBytes(b.pageCount);
    const bytes = Buffer.alloc(size);
    Buffer.from(b.receivedMemory).copy(bytes, 0, 0, Math.min(size, b.receivedMemory.byteLength));
    // Bits past the last page stay zero, as QEMU's do.
    for (let p = b.pageCount; p < size * 8; p++) bytes[p >> 3] = bytes[p >> 3]! & ~(1 << (p & 7));
    this.sendRp((w) => writeRpRecvBitmap(w, name, bytes));
  }

  /** POSTCOPY_RESUME: back to postcopy-active; ask again for every page still awaited. */
  private resumed(): void {
    if (this.status !== 'postcopy-recover') return; // QEMU ignores it elsewhere
    this.setStatus('postcopy-active');
    this.sendRp((w) => writeRpResumeAck(w));
    const awaited = [...this.requested].filter((page) => !this.o.guest.ram.isReceived(0, page));
    this.rpNaming.named = false;
    if (awaited.length > 0 && this.socket !== undefined) {
      const w = new BatchWriter({ slabSize: 4096 });
      writePageRequests(w, this.o.guest.ram.blocks[0]!.idstr, awaited, false, this.rpNaming);
      this.socket.write(w.flushConcat());
    }
    this.o.log.info({ outstanding: this.requested.size }, 'postcopy resumed');
  }

  private attachBlocks(blocks: readonly RamBlockInfo[], streamOffset: number): Buffer[] {
    const ram = this.o.guest.ram;
    this.blockMap = [];
    return blocks.map((b) => {
      const index = ram.blocks.findIndex((x) => x.idstr === b.idstr);
      if (index < 0) {
        throw new ConfigError(
          ErrorCode.CONFIG_MISMATCH,
          `RAM block "${b.idstr}" (${b.length} bytes) is not in this guest, which has ${ram.blocks.map((x) => `"${x.idstr}" (${x.length} bytes)`).join(', ')}`,
          { streamOffset, block: b.idstr },
        );
      }
      const local = ram.blocks[index]!;
      if (local.length !== b.length) {
        throw new ConfigError(
          ErrorCode.CONFIG_MISMATCH,
          `RAM block "${b.idstr}" is ${b.length} bytes in the stream but ${local.length} bytes here`,
          { streamOffset, block: b.idstr },
        );
      }
      this.blockMap.push(index);
      return ram.view(index);
    });
  }

  private onPagePlaced(streamBlock: number, pageOffset: number): void {
    const block = this.blockMap[streamBlock]!;
    const page = pageOffset / 4096;
    // vCPUs are woken once per read (wakeWaiters), not per page.
    this.o.guest.ram.setReceived(block, page);
    if (block === 0) {
      this.requested.delete(page);
      if (this.placingFromMain) this.mainHead = page;
    }
  }

  /**
   * Postcopy: vCPU faults become page requests on the return path. This loop wakes when a vCPU
   * queues a fault; a main-channel read that finds one queued sends its request at once instead
   * (the wake-up would wait for the event loop's next turn).
   */
  private async serveFaults(): Promise<void> {
    if (this.faultLoopRunning) return;
    this.faultLoopRunning = true;
    while (this.listening && !this.finished) {
      await this.o.guest.vcpus.waitForFault(200);
      // A fault slot reserved but not written yet: let I/O run before looking again.
      if (this.requestFaultedPages() === 0) await new Promise((r) => setImmediate(r));
    }
    this.faultLoopRunning = false;
  }

  private readonly faultedPages = new Uint32Array(256);

  /** Drain the vCPUs' fault ring and request each page not received nor requested yet; returns how many faults were drained. */
  private requestFaultedPages(): number {
    const guest = this.o.guest;
    const pages = this.faultedPages;
    const n = guest.vcpus.drainFaults(pages);
    if (n === 0) return 0;
    const main = guest.ram.blocks[0]!;
    const w = new BatchWriter({ slabSize: 4096 });
    const fresh: number[] = [];
    for (let i = 0; i < n; i++) {
      const page = pages[i]!;
      if (guest.ram.isReceived(0, page) || this.requested.has(page)) continue;
      this.requested.add(page);
      fresh.push(page);
    }
    // Several faults at once, to a livemig source: one message of compressed page indices.
    this.requestBytes += writePageRequests(w, main.idstr, fresh, this.peerIsLivemig, this.rpNaming);
    this.requestedPages += fresh.length;
    if (w.totalBytes > 0 && this.rpOpen && this.socket !== undefined && !this.socket.destroyed) this.socket.write(w.flushConcat());
    return n;
  }

  /** Postcopy figures for query-migrate (QEMU's names; the histogram as in QEMU 10.1). */
  postcopyInfo(): Record<string, unknown> | undefined {
    if (!this.postcopyAdvised || !this.discardSeen && !this.listening && this.status !== 'completed') return undefined;
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
      // livemig: how long the guest has run in postcopy (RUN until completion), for blocktime shares.
      'x-postcopy-run-time': Math.round((this.loadedAt > 0 ? this.loadedAt : performance.now()) - this.runAt),
    };
  }

  /** onread callback: the bytes are valid only during this call. */
  private onBytes(n: number): boolean {
    if (this.finished) return false;
    this.lastByteAt = performance.now();
    try {
      this.decoder.push(this.readBuffer.subarray(0, n));
      let drained: boolean;
      this.placingFromMain = true;
      try {
        drained = this.drainEvents();
      } finally {
        this.placingFromMain = false;
      }
      if (this.listening) {
        this.o.guest.ram.wakeWaiters(0);
        if (!this.faultThreadMode && this.o.guest.vcpus.faultsPending()) this.requestFaultedPages();
      }
      // Keep only the undecoded tail: the read buffer is reused by the next read.
      this.decoder.retainUnread();
      if (!drained) return false;
      if (this.listening && this.socket !== undefined && this.faultIsUrgent()) {
        // Postcopy: libuv reads up to 32 buffers in a row; while a vCPU waits for a page, let
        // the fault path (its page request, the preempt channel) in after every read.
        const socket = this.socket;
        setImmediate(() => {
          if (this.socket === socket && !this.finished) socket.resume();
        });
        return false;
      }
      return true;
    } catch (err) {
      this.fail(err as Error);
      return false;
    }
  }

  /**
   * Handle the decoder's events until it needs bytes (true) or must stop: finished, or (multifd)
   * a RAM section ended whose pages are still coming on the channels (false: pause the socket).
   */
  private drainEvents(): boolean {
    for (let ev = this.decoder.next(); ev !== NEED_MORE; ev = this.decoder.next()) {
      this.onEvent(ev);
      if (this.finished) return false;
      if (this.waitingForSync) return false;
    }
    return true;
  }

  private onEvent(ev: DecoderEvent): void {
    switch (ev.kind) {
      case 'configuration':
        // QEMU compares over the received length only (a prefix compare).
        if (!this.o.machineType.startsWith(ev.machineType) || ev.machineType.length === 0) {
          throw new ConfigError(
            ErrorCode.CONFIG_MISMATCH,
            `Machine type received is '${ev.machineType}' and local is '${this.o.machineType}'`,
            { streamOffset: ev.offset },
          );
        }
        break;
      case 'sectionStart': {
        const s = ev.section;
        if (s.idstr === 'ram' && s.instanceId === 0) break;
        if (!this.devices.has(`${s.idstr}\u0000${s.instanceId}`)) {
          throw new ConfigError(
            ErrorCode.CONFIG_MISMATCH,
            `Unknown savevm section or instance '${s.idstr}' ${s.instanceId}: this guest has no such device`,
            { streamOffset: ev.offset, sectionId: s.sectionId, idstr: s.idstr },
          );
        }
        break;
      }
      case 'sectionEnd':
        if (this.o.capabilities.multifd && ev.idstr === 'ram' && ev.instanceId === 0) {
          // Pages sent before this EOS travel on the channels: read on only when all are in.
          this.ramSectionsEnded++;
          if (!this.syncsComplete()) this.waitingForSync = true;
        }
        if (ev.data !== undefined) {
          const dev = this.devices.get(`${ev.idstr}\u0000${ev.instanceId}`)!;
          try {
            dev.load(ev.data, ev.versionId);
          } catch (err) {
            throw new ConfigError(ErrorCode.CONFIG_MISMATCH, (err as Error).message, {
              streamOffset: ev.dataOffset,
              sectionId: ev.sectionId,
              idstr: ev.idstr,
            });
          }
        }
        break;
      case 'command':
        this.onCommand(ev);
        break;
      case 'eof':
        if (ev.depth === 0) {
          this.sawEof = true;
          // Postcopy streams end at EOF (no VMDESCRIPTION); every page has arrived.
          if (this.listening) void this.finish();
        }
        break;
      case 'vmdescription':
        void this.finish();
        break;
      default:
        break;
    }
  }

  private onCommand(ev: Extract<DecoderEvent, { kind: 'command' }>): void {
    const c = ev.command;
    switch (c.cmd) {
      case MigCmd.OPEN_RETURN_PATH:
        this.rpOpen = true;
        break;
      case MigCmd.PING:
        if (!this.rpOpen) throw new ConfigError(ErrorCode.UNEXPECTED_COMMAND, 'PING before OPEN_RETURN_PATH', { streamOffset: ev.offset });
        if (c.pingValue === LIVEMIG_HELLO_PING) this.peerIsLivemig = true;
        this.sendRp((w) => writeRpPong(w, c.pingValue!));
        break;
      case MigCmd.POSTCOPY_ADVISE:
        if (c.length === 16 && !this.o.capabilities['postcopy-ram']) {
          throw new ConfigError(ErrorCode.CONFIG_MISMATCH, 'the source uses postcopy-ram but this destination does not have the capability on', {
            streamOffset: ev.offset,
          });
        }
        if (c.length === 0 && this.o.capabilities['postcopy-ram']) {
          throw new ConfigError(ErrorCode.CONFIG_MISMATCH, 'this destination has postcopy-ram on but the source does not', { streamOffset: ev.offset });
        }
        if (c.hostPageSizeSummary !== undefined && c.hostPageSizeSummary !== 4096) {
          throw new ConfigError(ErrorCode.CONFIG_MISMATCH, `host page size summary 0x${c.hostPageSizeSummary.toString(16)} differs from ours (0x1000)`, {
            streamOffset: ev.offset,
          });
        }
        this.postcopyAdvised = c.length === 16;
        break;
      case MigCmd.POSTCOPY_RAM_DISCARD: {
        const d = c.discard!;
        const guestIndex = this.o.guest.ram.blocks.findIndex((b) => b.idstr === d.block);
        const block = this.o.guest.ram.blocks[guestIndex];
        if (block === undefined) {
          throw new ConfigError(ErrorCode.CONFIG_MISMATCH, `POSTCOPY_RAM_DISCARD for unknown block "${d.block}"`, { streamOffset: ev.offset, block: d.block });
        }
        if (!this.discardSeen) {
          // Everything the precopy phase delivered is here; the discards name what is not.
          this.o.guest.ram.markAllReceived();
          this.discardSeen = true;
        }
        for (const r of d.ranges) {
          if (r.start + r.length > block.length) {
            throw new ConfigError(ErrorCode.CONFIG_MISMATCH, `discard range 0x${r.start.toString(16)}+0x${r.length.toString(16)} is outside "${d.block}"`, {
              streamOffset: ev.offset,
              block: d.block,
            });
          }
          this.o.guest.ram.clearReceived(guestIndex, r.start / 4096, r.length / 4096);
        }
        break;
      }
      case MigCmd.POSTCOPY_LISTEN:
        if (!this.discardSeen) this.o.guest.ram.markAllReceived();
        this.discardSeen = true;
        this.listening = true;
        this.installPostcopyCallbacks();
        this.startKeepalive();
        this.o.guest.vcpus.setPostcopy(true);
        if (this.o.realtimePostcopy === true) this.o.guest.vcpus.setRealtime(REALTIME_VCPU_PRIORITY);
        this.setStatus('postcopy-active');
        // A livemig source reads page requests on its preempt channel: the fault thread serves them.
        this.faultThreadMode = this.peerIsLivemig && this.faultThread !== undefined;
        if (!this.faultThreadMode) this.retireFaultThread();
        if (this.pendingPreempt !== undefined) {
          const p = this.pendingPreempt;
          this.pendingPreempt = undefined;
          this.takePreempt(p.raw, p.tcp);
        }
        if (!this.faultThreadMode) void this.serveFaults();
        break;
      case MigCmd.POSTCOPY_RUN: {
        this.runAt = performance.now();
        const guest = this.o.guest;
        const sourceWasRunning = guest.globalState.loaded === undefined || guest.globalState.loaded === 'running';
        guest.setRunState('paused');
        if (this.o.autostart && sourceWasRunning) {
          void guest.start().then(() => this.o.events.resume());
        }
        break;
      }
      case MigCmd.RECV_BITMAP:
        this.sendReceivedBitmap(c.block!, ev.offset);
        break;
      case MigCmd.POSTCOPY_RESUME:
        this.resumed();
        break;
      case MigCmd.PACKAGED:
        break;
      default:
        throw new ConfigError(ErrorCode.UNEXPECTED_COMMAND, `command ${c.name} is not supported by this destination`, { streamOffset: ev.offset });
    }
  }

  private sendRp(encode: (w: BatchWriter) => void): void {
    if (!this.rpOpen || this.socket === undefined || this.socket.destroyed) return;
    const w = new BatchWriter({ slabSize: 1024 });
    encode(w);
    this.socket.write(w.flushConcat());
  }

  /** The source half-closed (or ended) its side. */
  private onEnd(): void {
    if (this.finished) return;
    if (this.listening) {
      // Postcopy: a closed link is a pause, not the end (the final EOF ends it).
      this.linkLost(new Error(`the source closed the connection at stream offset ${this.bytesReceived}`));
      return;
    }
    if (this.sawEof && this.decoder.bufferedBytes === 0) {
      // EOF without a VMDESCRIPTION (postcopy, or a source that sends none): complete.
      void this.finish();
      return;
    }
    try {
      this.decoder.end();
      this.fail(new Error(`the source ended the stream at offset ${this.bytesReceived} before EOF`));
    } catch (err) {
      this.fail(err as Error);
    }
  }

  private async finish(): Promise<void> {
    if (this.finished) return;
    this.finished = true;
    const guest = this.o.guest;
    this.loadedAt = performance.now();
    if (this.listening) {
      if (this.faultThreadAttached && this.faultThread !== undefined) {
        // Pages it is placing must be in place first: it ends with the preempt channel's EOS,
        // which the source sends right after EOF.
        await this.faultThread.ended(FAULT_THREAD_END_MS);
        await this.detachFaultThread();
      }
      // Postcopy: the guest has been running since RUN; all pages are here now.
      guest.ram.markAllReceived();
      guest.vcpus.setPostcopy(false);
      this.endRealtime();
      this.listening = false;
    } else {
      const sourceWasRunning = guest.globalState.loaded === undefined || guest.globalState.loaded === 'running';
      guest.setRunState('paused');
      if (this.o.autostart && sourceWasRunning) {
        await guest.start();
        this.o.events.resume();
      }
    }
    this.setStatus('completed');
    this.o.log.info({ bytes: this.bytesReceived, running: guest.running }, 'incoming migration completed');
    this.shutDown(0);
    this.resolveDone();
  }

  /** SHUT with `status` on the return path, then close every connection and the listener of extra ones. */
  private shutDown(status: number): void {
    this.sendRp((w) => writeRpShut(w, status));
    this.socket?.end();
    this.preemptSocket?.destroy();
    this.retireFaultThread();
    this.pendingPreempt?.raw.destroy();
    this.channelServer?.close();
    const extra = [...this.multifd.map((c) => c.socket), ...this.heldConnections];
    if (status === 0) {
      for (const c of extra) c.destroy();
      return;
    }
    // After a failure the source may still be writing: closing a connection with unread bytes
    // resets it, and that reset can reach the source before the reason sent on the return path.
    // End them (FIN) and close them a moment later.
    for (const c of extra) c.end();
    setTimeout(() => {
      for (const c of extra) c.destroy();
    }, FAILED_CHANNEL_LINGER_MS).unref();
  }

  fail(err: Error): void {
    if (this.finished) return;
    this.finished = true;
    const d = describe(err);
    this.errorDesc = d.message;
    this.o.guest.setRunState('paused');
    this.endRealtime();
    this.setStatus('failed');
    this.o.log.warn({ err: d }, `incoming migration failed: ${d.message}`);
    if (this.peerIsLivemig) {
      const payload = encodeLivemigError(d);
      this.sendRp((w) => writeRpLivemigExt(w, payload));
    }
    this.shutDown(1);
    void this.listener?.close();
    this.resolveDone();
  }
}
