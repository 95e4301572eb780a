// The incoming migration: decode the stream straight into guest RAM, load devices, and drive the
// destination state machine (@livemig/protocol's destination-machine.ts) with what arrives,
// doing the actions it returns. Connections are channels.ts's job, postcopy's fault path
// postcopy-faults.ts's; no decision about the migration's state is taken here.
// The main channel's byte pump is main-stream.ts (one copy per page, straight into guest RAM).

import type net from 'node:net';
import { Channels } from './channels.ts';
import { MainStream } from './main-stream.ts';
import { PostcopyFaults } from './postcopy-faults.ts';
import { StreamLoader } from './stream-loader.ts';
import {
  BatchWriter,
  type Capabilities,
  coded,
  type DecoderEvent,
  type DestinationAction,
  type DestinationConfig,
  type DestinationEvent,
  type DestinationState,
  destinationStep,
  encodeLivemigError,
  ErrorCode,
  hasCode,
  initialDestinationState,
  InternalError,
  KEEPALIVE_INTERVAL_MS,
  type MigrationError,
  type MigrationStatus,
  peerIsLivemig,
  postcopyListening,
  readsStream,
  reportedStatus,
  returnPathOpen,
  showsPostcopyFigures,
  StateError,
  TransportError,
  writeRpLivemigExt,
  writeRpPong,
  writeRpRecvBitmap,
  writeRpResumeAck,
  writeRpSwitchoverAck,
  writeRpShut,
} from '@livemig/protocol';
import type { Guest } from '@livemig/guest';
import { adoptWithOnread, type MigrationAddress, openIncomingPipe } from '@livemig/runtime';
import type { TlsServerOptions } from '@livemig/runtime';

/** The statuses a livemig destination goes through (QEMU's names). */
export type IncomingStatus = Extract<
  MigrationStatus,
  'none' | 'setup' | 'active' | 'postcopy-active' | 'postcopy-paused' | 'postcopy-recover' | 'completed' | 'failed'
>;

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
  /** Parameter x-livemig-stall-timeout (ms): a precopy stream silent this long fails. */
  stallTimeoutMs?: number;
  /** Parameter x-livemig-handshake-timeout (ms): a connection must send the stream header this soon. */
  handshakeTimeoutMs?: number;
  /** --uuid (normalized): a stream carrying another configuration/uuid is refused. */
  uuid?: string;
  /** Parameters tls-creds / tls-authz, resolved: every connection is TLS. */
  tls?: TlsServerOptions;
  events: { status(s: IncomingStatus): void; resume(): void };
  log: { info(obj: object, msg?: string): void; warn(obj: object, msg?: string): void };
}

/** A failure with where it happened, as it is reported to QMP and to the source. */
function describe(err: MigrationError): { code: string; message: string; offset?: number } {
  const offset = (err as { streamOffset?: unknown }).streamOffset;
  return typeof offset === 'number' ? { code: err.code, message: err.message, offset } : { code: err.code, message: err.message };
}

export class IncomingMigration {
  errorDesc: string | undefined;
  /** Time the stream's first byte arrived and when the guest was started (ms, performance.now()). */
  firstByteAt = 0;
  loadedAt = 0;

  private state: DestinationState;
  private readonly o: IncomingOptions;
  private readonly channels: Channels;
  private readonly faults: PostcopyFaults;
  private readonly stream: MainStream;
  private readonly loader: StreamLoader;
  private keepalive: NodeJS.Timeout | undefined;
  private runAt = 0;
  /** Depth guard: actions never feed the machine synchronously (see dispatch). */
  private dispatching = false;

  constructor(options: IncomingOptions) {
    this.o = options;
    const caps = options.capabilities;
    this.state = initialDestinationState(this.configOf(caps, options.stallTimeoutMs));
    this.loader = new StreamLoader(options.guest, options.machineType, this.state.config, options.uuid);
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
    this.stream = new MainStream(this.faults, this.loader, {
      takesBytes: () => 'finishing' in this.state && !this.state.finishing,
      readsStream: () => readsStream(this.state),
      faultPath: () => ('faults' in this.state ? this.state.faults : undefined),
      event: (ev) => this.onEvent(ev),
      failed: (err) => this.failWith(err),
      socket: () => this.channels.main,
    });
    this.channels = new Channels({
      guest: options.guest,
      preempt: caps['postcopy-preempt'],
      multifd: caps.multifd,
      multifdChannels: options.multifdChannels ?? 2,
      reader: this.stream,
      ...(options.handshakeTimeoutMs === undefined ? {} : { handshakeTimeoutMs: options.handshakeTimeoutMs }),
      ...(options.tls === undefined ? {} : { tls: options.tls }),
      events: {
        mainAccepted: (socket, prefix) => this.onConnection(socket, prefix),
        candidateDropped: (reason, peer) =>
          this.o.log.warn({ peer, err: { code: reason.code, message: reason.message } }, `dropped a connection from ${peer} that is not a migration source: ${reason.message} [${reason.code}]`),
        preemptAccepted: (raw, tcp) => this.onPreempt(raw, tcp),
        tlsAccepted: (peer, session) => this.o.log.info({ peer, ...session }, `TLS connection from ${peer} authenticated (${session.protocol ?? '?'} ${session.cipher}${session.client === undefined ? '' : `, client ${session.client}`})`),
        multifdProgressed: () => this.checkSync(),
        multifdFailed: (err) => this.failSoon(coded(err) as MigrationError),
        listenerFailed: (err) => this.safely({ type: 'channelLost', error: err }),
      },
    });
  }

  /** QEMU's status, as query-migrate reports it. */
  get status(): IncomingStatus {
    return reportedStatus(this.state);
  }

  get listeningAddress(): string | undefined {
    return this.channels.listeningAddress;
  }

  get bytesReceived(): number {
    return this.stream.bytesReceived;
  }

  /** Whether settings may still change: nothing connected has sent a byte yet (QEMU 7.2 takes them on a listening destination). */
  get configurable(): boolean {
    return (this.state.status === 'none' || this.state.status === 'setup') && !this.channels.streamStarted;
  }

  /**
   * migrate-set-capabilities / -parameters on a destination that listens, before the stream: the
   * connections still to come and the stream are read with the new values. Throws
   * StateError ("There's a migration process in progress") once the stream has begun.
   */
  reconfigure(capabilities: Capabilities, parameters: { multifdChannels: number; stallTimeoutMs: number; handshakeTimeoutMs: number }): void {
    if (this.channels.streamStarted && this.state.status === 'setup') {
      throw new StateError('setup', 'configured', "There's a migration process in progress");
    }
    const config = this.configOf(capabilities, parameters.stallTimeoutMs);
    const bootFaultThread = config.preempt && !this.state.config.preempt && this.state.status === 'setup';
    this.dispatch({ type: 'configured', config });
    this.o.capabilities = { ...capabilities };
    this.o.multifdChannels = parameters.multifdChannels;
    this.loader.config = config;
    this.channels.reconfigure({ preempt: config.preempt, multifd: config.multifd, multifdChannels: parameters.multifdChannels, handshakeTimeoutMs: parameters.handshakeTimeoutMs });
    // With preempt the fault thread starts with the listener (its worker is ready before postcopy).
    if (bootFaultThread) this.faults.bootThread();
    const on = Object.entries(capabilities).filter(([, v]) => v).map(([k]) => k);
    this.o.log.info({ capabilities: on, multifdChannels: parameters.multifdChannels }, 'settings changed while listening: the stream will be read with them');
  }

  /** The machine's config for these capabilities. */
  private configOf(caps: Capabilities, stallTimeoutMs: number | undefined): DestinationConfig {
    return {
      postcopyRam: caps['postcopy-ram'],
      preempt: caps['postcopy-preempt'],
      multifd: caps.multifd,
      ...(stallTimeoutMs === undefined ? {} : { stallTimeoutMs }),
      switchoverAck: caps['switchover-ack'],
      // QEMU's switchover_ack_needed: a VFIO device with precopy asks (livemig's, from a livemig
      // source, marks its initial data with INIT_DATA_SENT).
      ackDevices: caps['switchover-ack'] && this.o.guest.vfio !== undefined ? 1 : 0,
      // TLS: only the main thread's TLS socket decrypts, so the fault path stays there.
      ...(this.o.tls === undefined ? {} : { faultThread: false }),
    };
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

  /**
   * `file:PATH[,offset=N]` or `exec:CMD` (QEMU's forms): the stream is read from a file or from a
   * command's output, through a pipe, as one connection that ends when the stream does.
   */
  async readFrom(address: Extract<MigrationAddress, { transport: 'file' | 'exec' }>): Promise<string> {
    destinationStep(this.state, { type: 'listenStarted' }, performance.now());
    const pipe = await openIncomingPipe(address);
    this.dispatch({ type: 'listenStarted' });
    this.o.log.info({ address: pipe.text }, 'reading the incoming migration');
    this.onConnection(adoptWithOnread(pipe.stdout, this.stream, { allowHalfOpen: true }), Buffer.alloc(0));
    return pipe.text;
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
    const address = await this.channels.listenForRecovery(uri, (socket, prefix) => this.onRecoveryConnection(socket, prefix));
    this.dispatch({ type: 'recoverRequested' });
    return address;
  }

  /** Postcopy figures for query-migrate (QEMU's names), once postcopy began. */
  postcopyInfo(): Record<string, unknown> | undefined {
    if (!showsPostcopyFigures(this.state)) return undefined;
    return this.faults.figures((this.loadedAt > 0 ? this.loadedAt : performance.now()) - this.runAt);
  }

  // ---- the machine ------------------------------------------------------------------------------

  /**
   * Step the machine and do its actions. Actions never dispatch synchronously (what follows from
   * them comes in a later turn), so each event sees the state its predecessor left.
   */
  private dispatch(event: DestinationEvent): void {
    if (this.dispatching) throw new InternalError(`${event.type} dispatched while the previous event's actions run`);
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
        {
        const bitmap = this.loader.receivedBitmap(a.block, a.streamOffset);
        return this.sendRp((w) => writeRpRecvBitmap(w, a.block, bitmap));
      }
      case 'sendResumeAck':
        return this.sendRp((w) => writeRpResumeAck(w));
      case 'sendSwitchoverAck':
        this.o.log.info({ ackDevices: this.state.config.ackDevices ?? 0 }, 'switchover acknowledged: every device that asked has its initial data');
        return this.sendRp((w) => writeRpSwitchoverAck(w));
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
        return this.loader.discard(a.discard.block, a.discard.ranges, a.streamOffset);
      case 'startPostcopyFaults':
        return this.faults.start(a.faults, a.markPrecopyReceived);
      case 'startGuestInPostcopy': {
        this.runAt = performance.now();
        this.faults.noteRun();
        const sourceWasRunning = guest.globalState.loaded === undefined || guest.globalState.loaded === 'running';
        guest.setRunState('paused');
        if (this.o.autostart && sourceWasRunning) void guest.start().then(() => this.o.events.resume());
        return;
      }
      case 'startKeepalive':
        clearInterval(this.keepalive);
        // Bytes on a multifd channel are the source's too (the main channel is quiet while they carry pages).
        this.keepalive = setInterval(
          () => this.safely({ type: 'keepaliveTicked', lastByteAtMs: Math.max(this.stream.lastByteAtMs, this.channels.lastMultifdByteAtMs) }),
          KEEPALIVE_INTERVAL_MS,
        );
        this.keepalive.unref();
        return;
      case 'stopKeepalive':
        clearInterval(this.keepalive);
        return;
      case 'holdPreempt':
        return; // onPreempt holds it already
      case 'takePreempt':
        return this.faults.takePreempt(a.faults, this.stream.ramBlocks);
      case 'awaitMultifdSync':
        return; // drainEvents stops at this event; checkSync resumes
      case 'resumeMainChannel':
        queueMicrotask(() => this.stream.resumeReading());
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
        this.stream.restartForRecovery();
        this.faults.naming.named = false;
        return;
      case 'complete':
        this.o.log.info({ bytes: this.bytesReceived, running: guest.running }, 'incoming migration completed');
        return;
      case 'fail': {
        const d = describe(a.error);
        this.errorDesc = d.message;
        guest.setRunState('paused');
        this.faults.endRealtime();
        this.o.log.warn({ err: d }, `incoming migration failed: ${d.message}`);
        return;
      }
      case 'closeChannels':
        this.channels.close(a.failed);
        this.faults.close();
        return;
    }
  }

  // ---- connections ------------------------------------------------------------------------------

  private onConnection(socket: net.Socket, prefix: Buffer): void {
    try {
      this.dispatch({ type: 'connectionAccepted' });
    } catch (err) {
      socket.destroy();
      this.failWith(err);
      return;
    }
    this.channels.main = socket;
    this.watch(socket);
    // The header (and whatever came with it) was read to check it: decode it before the next read.
    if (prefix.length > 0 && !this.stream.feed(prefix)) socket.pause();
  }

  private onRecoveryConnection(socket: net.Socket, prefix: Buffer): void {
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
    // Its first record was read to check it: decode it before the next read.
    if (prefix.length > 0 && !this.stream.feed(prefix)) socket.pause();
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
    const error = this.stream.end();
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

  private onEvent(ev: DecoderEvent): void {
    const s = this.state;
    const ramSectionsEnded = 'ramSectionsEnded' in s ? s.ramSectionsEnded : 0;
    const event = this.loader.machineEvent(ev, ramSectionsEnded, (n) => this.channels.syncsComplete(n));
    if (event !== undefined) this.dispatch(event);
  }

  // ---- the return path and the end ----------------------------------------------------------------

  private sendRp(encode: (w: BatchWriter) => void): void {
    const w = new BatchWriter({ slabSize: 1024 });
    encode(w);
    this.channels.writeReturnPath(w.flushConcat());
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
