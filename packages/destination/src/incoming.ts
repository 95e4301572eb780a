// The incoming migration: decode the stream straight into guest RAM, load devices, and drive the
// destination state machine (@livemig/protocol's destination-machine.ts) with what arrives,
// doing the actions it returns. Connections are channels.ts's job, postcopy's fault path
// postcopy-faults.ts's; no decision about the migration's state is taken here.
//
// Reads use Node's static-buffer mode (onread with one reused 1 MiB buffer): the decoder copies
// each page once from that buffer into guest RAM and keeps only a straddling record's bytes.

import type net from 'node:net';
import { Channels } from './channels.ts';
import { PostcopyFaults } from './postcopy-faults.ts';
import {
  BatchWriter,
  type Capabilities,
  coded,
  ConfigError,
  type DecoderEvent,
  type DestinationAction,
  type DestinationEvent,
  type DestinationState,
  destinationStep,
  encodeLivemigError,
  ErrorCode,
  type FaultPath,
  hasCode,
  initialDestinationState,
  InternalError,
  KEEPALIVE_INTERVAL_MS,
  LIVEMIG_HELLO_PING,
  MigCmd,
  type MigrationError,
  type MigrationStatus,
  NEED_MORE,
  PostcopyState,
  peerIsLivemig,
  postcopyListening,
  readsStream,
  recvBitmapBytes,
  reportedStatus,
  returnPathOpen,
  showsPostcopyFigures,
  StreamDecoder,
  TARGET_PAGE_SIZE,
  TransportError,
  writeRpLivemigExt,
  writeRpPong,
  writeRpRecvBitmap,
  writeRpResumeAck,
  writeRpShut,
} from '@livemig/protocol';
import { type Guest, RequestLine } from '@livemig/guest';

/** The statuses a livemig destination goes through (QEMU's names). */
export type IncomingStatus = Extract<
  MigrationStatus,
  'none' | 'setup' | 'active' | 'postcopy-active' | 'postcopy-paused' | 'postcopy-recover' | 'completed' | 'failed'
>;

const READ_BUFFER_BYTES = 1024 * 1024;
/** Main-channel reads while a vCPU waits for a page far from the background stream (postcopy). */
const FAULT_READ_BYTES = 64 * 1024;
/** How long a multifd failure waits for the main channel's hello, so its reason can go back to a livemig source. */
const HELLO_GRACE_MS = 100;

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
function describe(err: MigrationError): { code: string; message: string; offset?: number } {
  const offset = (err as { streamOffset?: unknown }).streamOffset;
  return typeof offset === 'number' ? { code: err.code, message: err.message, offset } : { code: err.code, message: err.message };
}

type Device = { layout: number | 'be32-prefixed'; load(data: Buffer, versionId: number): void };

export class IncomingMigration {
  errorDesc: string | undefined;
  /** Time the stream's first byte arrived and when the guest was started (ms, performance.now()). */
  firstByteAt = 0;
  loadedAt = 0;
  /** Resolves when the migration reached completed or failed. */
  readonly done: Promise<void>;
  /** Resolves when the main connection arrives (or the migration ends without one). */
  readonly connected: Promise<void>;

  private state: DestinationState;
  private readonly o: IncomingOptions;
  private readonly channels: Channels;
  private readonly faults: PostcopyFaults;
  private decoder: StreamDecoder;
  /** Every non-RAM section we accept: FULL devices and iterative loaders, by idstr + instance. */
  private readonly devices = new Map<string, Device>();
  private keepalive: NodeJS.Timeout | undefined;
  /** When the main channel last brought bytes (the keepalive's measurement). */
  private lastByteAtMs = 0;
  private runAt = 0;
  private readonly readBuffer = Buffer.allocUnsafeSlow(READ_BUFFER_BYTES);
  /** The start of readBuffer: where reads go while a vCPU waits for a page (postcopy). */
  private readonly readSlice = this.readBuffer.subarray(0, FAULT_READ_BYTES);
  private resolveDone!: () => void;
  private resolveConnected!: () => void;
  /** Depth guard: actions never feed the machine synchronously (see dispatch). */
  private dispatching = false;

  constructor(options: IncomingOptions) {
    this.o = options;
    const caps = options.capabilities;
    this.state = initialDestinationState({ postcopyRam: caps['postcopy-ram'], preempt: caps['postcopy-preempt'], multifd: caps.multifd });
    for (const d of options.guest.devices) this.devices.set(`${d.idstr}\u0000${d.instanceId}`, d);
    const vfio = options.guest.vfio;
    if (vfio !== undefined) this.devices.set(`${vfio.idstr}\u0000${vfio.instanceId}`, { layout: vfio.layout, load: (data, v) => vfio.loadState(data, v) });
    this.faults = new PostcopyFaults({
      guest: options.guest,
      realtime: options.realtimePostcopy === true,
      listening: () => postcopyListening(this.state),
      peerIsLivemig: () => peerIsLivemig(this.state),
      sendRequests: (bytes) => {
        if (returnPathOpen(this.state)) this.channels.writeReturnPath(bytes);
      },
      linkLost: (err) => this.safely({ type: 'channelLost', error: err }),
      faultThreadEnded: (reason) => this.safely({ type: 'faultThreadEnded', reason }),
      log: options.log,
    });
    this.channels = new Channels({
      guest: options.guest,
      preempt: caps['postcopy-preempt'],
      multifd: caps.multifd,
      multifdChannels: options.multifdChannels ?? 2,
      reader: { buffer: () => this.nextReadBuffer(), callback: (n) => this.onBytes(n) },
      events: {
        mainAccepted: (socket) => this.onConnection(socket),
        preemptAccepted: (raw, tcp) => this.onPreempt(raw, tcp),
        multifdProgressed: () => this.checkSync(),
        multifdFailed: (err) => this.failSoon(coded(err) as MigrationError),
        listenerFailed: (err) => this.safely({ type: 'channelLost', error: err }),
      },
    });
    this.decoder = this.makeDecoder();
    this.done = new Promise((resolve) => (this.resolveDone = resolve));
    this.connected = new Promise((resolve) => (this.resolveConnected = resolve));
    void this.done.then(() => this.resolveConnected());
  }

  /** QEMU's status, as query-migrate reports it. */
  get status(): IncomingStatus {
    return reportedStatus(this.state);
  }

  get listeningAddress(): string | undefined {
    return this.channels.listeningAddress;
  }

  get bytesReceived(): number {
    return this.decoder.streamOffset + this.decoder.bufferedBytes;
  }

  /** Listen on tcp: or unix:; returns the bound address (port 0 resolved). */
  async listen(address: string): Promise<string> {
    // Refused before anything is bound (a second listen).
    destinationStep(this.state, { type: 'listenStarted' }, performance.now());
    if (this.state.config.preempt) this.faults.bootThread();
    const text = await this.channels.listen(address);
    this.dispatch({ type: 'listenStarted' });
    const s = this.state.config;
    const fields = s.preempt ? { preempt: true } : s.multifd ? { multifdChannels: this.o.multifdChannels ?? 2 } : {};
    this.o.log.info({ address: text, ...fields }, 'waiting for the incoming migration');
    return text;
  }

  /** migrate-pause: break the link on purpose. */
  pause(): void {
    this.dispatch({ type: 'pauseRequested' });
  }

  /** migrate-recover: listen for the source's recovery channel (and, with preempt, a new preempt channel). */
  async recover(uri: string): Promise<string> {
    // Refused before anything is bound; the machine takes the event once the listener is up.
    destinationStep(this.state, { type: 'recoverRequested' }, performance.now());
    // The fault thread must have let go of the broken link (and its claims be released) before pages come again.
    await this.faults.detached();
    const address = await this.channels.listenForRecovery(uri, (socket) => this.onRecoveryConnection(socket));
    this.dispatch({ type: 'recoverRequested' });
    return address;
  }

  /** Postcopy figures for query-migrate (QEMU's names; the histogram as in QEMU 10.1). */
  postcopyInfo(): Record<string, unknown> | undefined {
    if (!showsPostcopyFigures(this.state)) return undefined;
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
      'x-postcopy-request-pages': this.faults.requestedPages + lineRequests.requests,
      'x-postcopy-preempt-pages': this.faults.preemptPages(),
      'x-postcopy-request-bytes': this.faults.requestBytes + lineRequests.bytes,
      // livemig: how long the guest has run in postcopy (RUN until completion), for blocktime shares.
      'x-postcopy-run-time': Math.round((this.loadedAt > 0 ? this.loadedAt : performance.now()) - this.runAt),
    };
  }

  // ---- the machine ------------------------------------------------------------------------------

  /**
   * Step the machine and do its actions. Actions never dispatch synchronously (what follows from
   * them comes in a later turn), so each event sees the state its predecessor left.
   */
  private dispatch(event: DestinationEvent): void {
    if (this.dispatching) throw new InternalError(new Error(`${event.type} dispatched while the previous event's actions run`));
    const step = destinationStep(this.state, event, performance.now());
    this.state = step.state;
    this.dispatching = true;
    try {
      for (const a of step.actions) this.perform(a);
    } finally {
      this.dispatching = false;
    }
  }

  /** Dispatch from an I/O callback: whatever goes wrong fails the migration with a code. */
  private safely(event: DestinationEvent): void {
    try {
      this.dispatch(event);
    } catch (err) {
      this.failWith(err);
    }
  }

  private failWith(err: unknown): void {
    try {
      this.dispatch({ type: 'loadFailed', error: coded(err) as MigrationError });
    } catch (again) {
      this.o.log.warn({ err: again }, 'incoming migration: a failure could not be recorded');
    }
  }

  private perform(a: DestinationAction): void {
    const guest = this.o.guest;
    switch (a.type) {
      case 'emitStatus':
        this.o.events.status(a.status);
        return;
      case 'beginLoad':
        this.resolveConnected();
        this.firstByteAt = performance.now();
        guest.setRunState('inmigrate');
        // The stream writes RAM behind the dirty log: from now on any page may be non-zero.
        guest.ram.markAllWritten();
        return;
      case 'sendPong':
        return this.sendRp((w) => writeRpPong(w, a.value));
      case 'sendShut':
        return this.sendRp((w) => writeRpShut(w, a.shutStatus));
      case 'sendRecvBitmap':
        return this.sendReceivedBitmap(a.block, a.streamOffset);
      case 'sendResumeAck':
        return this.sendRp((w) => writeRpResumeAck(w));
      case 'sendErrorReport': {
        const payload = encodeLivemigError(describe(a.error));
        return this.sendRp((w) => writeRpLivemigExt(w, payload));
      }
      case 'rerequestAwaitedPages':
        this.faults.rerequestAwaited();
        this.o.log.info({ outstanding: this.faults.requested.size }, 'postcopy resumed');
        return;
      case 'markPrecopyReceived':
        guest.ram.markAllReceived();
        return;
      case 'discardPages':
        return this.discard(a.discard.block, a.discard.ranges, a.streamOffset);
      case 'startPostcopyFaults':
        return this.faults.start(a.faults, a.markPrecopyReceived);
      case 'startGuestInPostcopy': {
        this.runAt = performance.now();
        const sourceWasRunning = guest.globalState.loaded === undefined || guest.globalState.loaded === 'running';
        guest.setRunState('paused');
        if (this.o.autostart && sourceWasRunning) void guest.start().then(() => this.o.events.resume());
        return;
      }
      case 'startKeepalive':
        clearInterval(this.keepalive);
        this.keepalive = setInterval(() => this.safely({ type: 'keepaliveTicked', lastByteAtMs: this.lastByteAtMs }), KEEPALIVE_INTERVAL_MS);
        this.keepalive.unref();
        return;
      case 'stopKeepalive':
        clearInterval(this.keepalive);
        return;
      case 'holdPreempt':
        return; // onPreempt holds it already
      case 'takePreempt':
        return this.faults.takePreempt(a.faults, this.decoder.ramBlocks);
      case 'awaitMultifdSync':
        return; // drainEvents stops at this event; checkSync resumes
      case 'resumeMainChannel':
        queueMicrotask(() => this.resumeReading());
        return;
      case 'finish':
        void Promise.resolve().then(() => this.finish(a.postcopy, a.awaitFaultThread));
        return;
      case 'dropLink':
        this.channels.dropMain();
        this.faults.dropLink();
        this.o.log.warn({ reason: a.reason.message }, 'postcopy paused: waiting for migrate-recover');
        return;
      case 'adoptRecoveryChannel':
        // A new stream without header: records straight away, in the state we were in.
        this.decoder = this.makeDecoder(this.decoder);
        this.faults.naming.named = false;
        this.lastByteAtMs = performance.now();
        return;
      case 'complete':
        this.o.log.info({ bytes: this.bytesReceived, running: guest.running }, 'incoming migration completed');
        this.resolveDone();
        return;
      case 'fail': {
        const d = describe(a.error);
        this.errorDesc = d.message;
        guest.setRunState('paused');
        this.faults.endRealtime();
        this.o.log.warn({ err: d }, `incoming migration failed: ${d.message}`);
        this.resolveDone();
        return;
      }
      case 'closeChannels':
        this.channels.close(a.failed);
        this.faults.close();
        return;
    }
  }

  // ---- connections ------------------------------------------------------------------------------

  private onConnection(socket: net.Socket): void {
    try {
      this.dispatch({ type: 'connectionAccepted' });
    } catch (err) {
      socket.destroy();
      this.failWith(err);
      return;
    }
    this.channels.main = socket;
    this.watch(socket);
  }

  private onRecoveryConnection(socket: net.Socket): void {
    try {
      this.dispatch({ type: 'recoveryAccepted' });
    } catch (err) {
      // Not paused (any more): the migration goes on without this connection.
      socket.destroy();
      if (!hasCode(err, ErrorCode.WRONG_STATE)) this.failWith(err);
      return;
    }
    this.channels.main = socket;
    this.watch(socket);
  }

  private onPreempt(raw: net.Socket, tcp: boolean): void {
    this.faults.holdPreempt(raw, tcp);
    try {
      this.dispatch({ type: 'preemptAccepted' });
    } catch (err) {
      this.faults.dropHeldPreempt();
      if (!hasCode(err, ErrorCode.WRONG_STATE)) this.failWith(err);
    }
  }

  private watch(socket: net.Socket): void {
    socket.on('end', () => {
      if (this.channels.main === socket) this.onEnd();
    });
    socket.on('error', (err) => {
      if (this.channels.main === socket) this.safely({ type: 'channelLost', error: TransportError.lost('main', `migration connection failed: ${err.message}`, err) });
    });
    socket.on('close', () => {
      if (this.channels.main === socket) {
        this.safely({ type: 'channelLost', error: TransportError.lost('main', `the source closed the connection at stream offset ${this.bytesReceived}`) });
      }
    });
  }

  /** The source half-closed (or ended) its side: the decoder says whether the stream was complete. */
  private onEnd(): void {
    const streamOffset = this.bytesReceived;
    let error: MigrationError | undefined;
    try {
      this.decoder.end();
    } catch (err) {
      error = coded(err) as MigrationError;
    }
    this.safely(error === undefined ? { type: 'sourceEnded', streamOffset } : { type: 'sourceEnded', streamOffset, error });
  }

  /**
   * A multifd channel failed. If the main channel has not yet said the source is livemig (its
   * hello comes first on that channel), give it a moment, so the reason can go back to the source.
   */
  private failSoon(err: MigrationError): void {
    if (peerIsLivemig(this.state)) this.failWith(err);
    else setTimeout(() => this.failWith(err), HELLO_GRACE_MS).unref();
  }

  /** A multifd channel moved: if the main channel waits at a RAM section end and all SYNCs are in, it reads on. */
  private checkSync(): void {
    const s = this.state;
    if (!('awaitingSync' in s) || !s.awaitingSync) return;
    if (this.channels.syncsComplete(s.ramSectionsEnded)) {
      this.safely({ type: 'multifdSynced' });
      return;
    }
    const stuck = this.channels.stuckChannel(s.ramSectionsEnded);
    if (stuck !== undefined) this.failWith(TransportError.lost('multifd', `multifd channel ${stuck} ended before the SYNC of RAM section ${s.ramSectionsEnded}`));
  }

  // ---- the main channel's bytes -----------------------------------------------------------------

  /** A decoder for the first connection, or for a postcopy recovery channel (no header). */
  private makeDecoder(resume?: StreamDecoder): StreamDecoder {
    const options: ConstructorParameters<typeof StreamDecoder>[0] = {
      ram: this.faults.mainTarget(),
      postcopyPageHooks: true,
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

  private faultPath(): FaultPath | undefined {
    const s = this.state;
    return 'faults' in s ? s.faults : undefined;
  }

  /**
   * Where the main channel's next read lands. With a preempt channel read here, while a vCPU waits
   * for a page, reads shrink to FAULT_READ_BYTES so the event loop gets to the fault path (its
   * request, the preempt channel) after ~50 µs of background decoding, not a megabyte's worth.
   */
  private nextReadBuffer(): Buffer {
    const faults = this.faultPath();
    return faults !== undefined && this.faults.readsPreemptHere && this.faults.urgent(faults) ? this.readSlice : this.readBuffer;
  }

  /** onread callback: the bytes are valid only during this call. */
  private onBytes(n: number): boolean {
    const s = this.state;
    if (!('finishing' in s) || s.finishing) return false;
    this.lastByteAtMs = performance.now();
    try {
      this.decoder.push(this.readBuffer.subarray(0, n));
      const drained = this.drainEvents();
      const faults = this.faultPath();
      if (faults !== undefined && postcopyListening(this.state)) this.faults.afterRead(faults);
      // Keep only the undecoded tail: the read buffer is reused by the next read.
      this.decoder.retainUnread();
      if (!drained) return false;
      const socket = this.channels.main;
      if (faults !== undefined && socket !== undefined && this.faults.readsPreemptHere && this.faults.urgent(faults)) {
        // Postcopy: libuv reads up to 32 buffers in a row; while a vCPU waits for a page, let
        // the fault path (its page request, the preempt channel) in after every read.
        setImmediate(() => {
          if (this.channels.main === socket && readsStream(this.state)) socket.resume();
        });
        return false;
      }
      return true;
    } catch (err) {
      this.failWith(err);
      return false;
    }
  }

  /** Handle the decoder's events until it needs bytes (true) or the machine stops reading (false: pause the socket). */
  private drainEvents(): boolean {
    if (!readsStream(this.state)) return false;
    for (let ev = this.decoder.next(); ev !== NEED_MORE; ev = this.decoder.next()) {
      this.onEvent(ev);
      if (!readsStream(this.state)) return false;
    }
    return true;
  }

  /** Multifd: the channels' SYNCs are in; decode what is buffered and read on. */
  private resumeReading(): void {
    try {
      const socket = this.channels.main;
      if (this.drainEvents() && socket !== undefined) {
        this.decoder.retainUnread();
        socket.resume();
      }
    } catch (err) {
      this.failWith(err);
    }
  }

  private onEvent(ev: DecoderEvent): void {
    switch (ev.kind) {
      case 'configuration':
        // QEMU compares over the received length only (a prefix compare).
        if (!this.o.machineType.startsWith(ev.machineType) || ev.machineType.length === 0) {
          throw new ConfigError(ErrorCode.CONFIG_MISMATCH, `Machine type received is '${ev.machineType}' and local is '${this.o.machineType}'`, {
            streamOffset: ev.offset,
          });
        }
        return;
      case 'sectionStart': {
        const s = ev.section;
        if (s.idstr === 'ram' && s.instanceId === 0) return;
        if (!this.devices.has(`${s.idstr}\u0000${s.instanceId}`)) {
          throw new ConfigError(ErrorCode.CONFIG_MISMATCH, `Unknown savevm section or instance '${s.idstr}' ${s.instanceId}: this guest has no such device`, {
            streamOffset: ev.offset,
            sectionId: s.sectionId,
            idstr: s.idstr,
          });
        }
        return;
      }
      case 'sectionEnd':
        if (this.state.config.multifd && ev.idstr === 'ram' && ev.instanceId === 0) {
          const ended = ('ramSectionsEnded' in this.state ? this.state.ramSectionsEnded : 0) + 1;
          this.dispatch({ type: 'ramSectionEnded', streamOffset: ev.offset, channelsSynced: this.channels.syncsComplete(ended) });
        }
        if (ev.data !== undefined) this.loadDevice(ev);
        return;
      case 'command':
        return this.onCommand(ev);
      case 'eof':
        if (ev.depth === 0) this.dispatch({ type: 'eofReceived', streamOffset: ev.offset });
        return;
      case 'vmdescription':
        return this.dispatch({ type: 'vmdescriptionReceived', streamOffset: ev.offset });
      default:
        return;
    }
  }

  private loadDevice(ev: Extract<DecoderEvent, { kind: 'sectionEnd' }>): void {
    const dev = this.devices.get(`${ev.idstr}\u0000${ev.instanceId}`)!;
    try {
      dev.load(ev.data!, ev.versionId);
    } catch (err) {
      throw new ConfigError(ErrorCode.CONFIG_MISMATCH, (err as Error).message, { streamOffset: ev.dataOffset, sectionId: ev.sectionId, idstr: ev.idstr, cause: err });
    }
  }

  private onCommand(ev: Extract<DecoderEvent, { kind: 'command' }>): void {
    const c = ev.command;
    const streamOffset = ev.offset;
    switch (c.cmd) {
      case MigCmd.OPEN_RETURN_PATH:
        return this.dispatch({ type: 'returnPathOpened', streamOffset });
      case MigCmd.PING:
        return this.dispatch({ type: 'pingReceived', streamOffset, value: c.pingValue!, livemigHello: c.pingValue === LIVEMIG_HELLO_PING });
      case MigCmd.POSTCOPY_ADVISE:
        this.checkAdvise(c.length, c.hostPageSizeSummary, streamOffset);
        return this.dispatch({ type: 'postcopyAdviseReceived', streamOffset, postcopyRam: c.length === 16 });
      case MigCmd.POSTCOPY_RAM_DISCARD:
        return this.dispatch({ type: 'discardReceived', streamOffset, discard: c.discard! });
      case MigCmd.POSTCOPY_LISTEN:
        return this.dispatch({ type: 'listenReceived', streamOffset });
      case MigCmd.POSTCOPY_RUN:
        return this.dispatch({ type: 'runReceived', streamOffset });
      case MigCmd.RECV_BITMAP:
        return this.dispatch({ type: 'recvBitmapRequested', streamOffset, block: c.block! });
      case MigCmd.POSTCOPY_RESUME:
        return this.dispatch({ type: 'resumeReceived', streamOffset });
      case MigCmd.PACKAGED:
        return; // its records follow as events of their own
      default:
        throw new ConfigError(ErrorCode.UNEXPECTED_COMMAND, `command ${c.name} is not supported by this destination`, { streamOffset });
    }
  }

  /** ADVISE must match this side's postcopy-ram capability and page size. */
  private checkAdvise(length: number, hostPageSizeSummary: number | undefined, streamOffset: number): void {
    const postcopyRam = this.state.config.postcopyRam;
    if (length === 16 && !postcopyRam) {
      throw new ConfigError(ErrorCode.CONFIG_MISMATCH, 'the source uses postcopy-ram but this destination does not have the capability on', { streamOffset });
    }
    if (length === 0 && postcopyRam) {
      throw new ConfigError(ErrorCode.CONFIG_MISMATCH, 'this destination has postcopy-ram on but the source does not', { streamOffset });
    }
    if (hostPageSizeSummary !== undefined && hostPageSizeSummary !== TARGET_PAGE_SIZE) {
      throw new ConfigError(ErrorCode.CONFIG_MISMATCH, `host page size summary 0x${hostPageSizeSummary.toString(16)} differs from ours (0x1000)`, { streamOffset });
    }
  }

  /** POSTCOPY_RAM_DISCARD: these pages did not arrive (or went stale): vCPUs must wait for them. */
  private discard(name: string, ranges: readonly { start: number; length: number }[], streamOffset: number): void {
    const ram = this.o.guest.ram;
    const guestIndex = ram.blocks.findIndex((b) => b.idstr === name);
    const block = ram.blocks[guestIndex];
    if (block === undefined) throw new ConfigError(ErrorCode.CONFIG_MISMATCH, `POSTCOPY_RAM_DISCARD for unknown block "${name}"`, { streamOffset, block: name });
    for (const r of ranges) {
      if (r.start + r.length > block.length) {
        throw new ConfigError(ErrorCode.CONFIG_MISMATCH, `discard range 0x${r.start.toString(16)}+0x${r.length.toString(16)} is outside "${name}"`, { streamOffset, block: name });
      }
      ram.clearReceived(guestIndex, r.start / TARGET_PAGE_SIZE, r.length / TARGET_PAGE_SIZE);
    }
  }

  // ---- the return path and the end ----------------------------------------------------------------

  private sendRp(encode: (w: BatchWriter) => void): void {
    const w = new BatchWriter({ slabSize: 1024 });
    encode(w);
    this.channels.writeReturnPath(w.flushConcat());
  }

  /** RECV_BITMAP: which pages of a block we hold (our bitmap words are its little-endian bytes). */
  private sendReceivedBitmap(name: string, streamOffset: number): void {
    const b = this.o.guest.ram.blocks.find((x) => x.idstr === name);
    if (b === undefined) {
      throw new ConfigError(ErrorCode.CONFIG_MISMATCH, `RECV_BITMAP for unknown block "${name}"`, { streamOffset, block: name });
    }
    const size = recvBitmapBytes(b.pageCount);
    const bytes = Buffer.alloc(size);
    Buffer.from(b.receivedMemory).copy(bytes, 0, 0, Math.min(size, b.receivedMemory.byteLength));
    // Bits past the last page stay zero, as QEMU's do.
    for (let p = b.pageCount; p < size * 8; p++) bytes[p >> 3] = bytes[p >> 3]! & ~(1 << (p & 7));
    this.sendRp((w) => writeRpRecvBitmap(w, name, bytes));
  }

  /** The stream is complete: the last pages in place (postcopy) or the guest started (precopy); then loadFinished. */
  private async finish(postcopy: boolean, awaitFaultThread: boolean): Promise<void> {
    const guest = this.o.guest;
    this.loadedAt = performance.now();
    try {
      if (postcopy) {
        // Postcopy: the guest has been running since RUN; all pages are here now.
        await this.faults.finish(awaitFaultThread);
      } else {
        const sourceWasRunning = guest.globalState.loaded === undefined || guest.globalState.loaded === 'running';
        guest.setRunState('paused');
        if (this.o.autostart && sourceWasRunning) {
          await guest.start();
          this.o.events.resume();
        }
      }
      this.dispatch({ type: 'loadFinished' });
    } catch (err) {
      this.failWith(err);
    }
  }
}
