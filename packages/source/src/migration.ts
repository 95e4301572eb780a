// The outgoing migration: the source state machine (@livemig/protocol's source-machine.ts) with
// the I/O it asks for. This file owns the machine, carries out its actions and answers QMP; the
// migration thread is precopy.ts (setup, iterations, stop-and-copy) and postcopy-sender.ts
// (postcopy, its recovery, the page server); return-path-reader.ts turns the destination's
// messages into the machine's events; outgoing-options.ts holds the types it is given and reports.
//
// A RAM page's way out: precopy.ts asks RamSaver (ram-saver.ts) for a batch → RamSaver finds a
// dirty bit, clears it and writes a page record (header and page copied into the BatchWriter's
// slab) → flush() hands the batch to StreamOut as one writev of a few slabs.

import type { Duplex } from 'node:stream';
import { setTimeout as sleep } from 'node:timers/promises';
import {
  BatchWriter,
  SlabPool,
  DEFAULT_SLAB_BYTES,
  coded,
  isSourceFinal,
  initialSourceState,
  KEEPALIVE_INTERVAL_MS,
  type MigrationError,
  type MigrationParameters,
  sourceReportedStatus,
  type SourceAction,
  type SourceEvent,
  type SourceState,
  sourceStep,
  type StreamDialect,
  streamDialect,
  StateError,
  TARGET_PAGE_SIZE,
} from '@livemig/protocol';
import type { Guest, IterativeDevice } from '@livemig/guest';
import { formatGiB, formatGiBps } from '@livemig/machine';
import { AutoConverge, BandwidthMeter, downtimeVerdict, expectedDowntimeMs, type SwitchoverCost, SwitchoverCostMeter, switchoverThresholdBytes } from './convergence.ts';
import { ConvergencePolicyRunner } from './convergence-policy-runner.ts';
import { MultifdSender, multifdSlabFigures } from './multifd-sender.ts';
import { PostcopySender } from './postcopy-sender.ts';
import { Precopy } from './precopy.ts';
import { RamSaver } from './ram-saver.ts';
import { RateLimiter } from './rate-limiter.ts';
import { ReturnPathReader } from './return-path-reader.ts';
import { KeepalivePings } from './keepalive-pings.ts';
import { StateWatch } from './state-watch.ts';
import { StreamOut } from './stream-out.ts';
import type { MigrationInfoRam, MigrationStatus, OutgoingOptions } from './outgoing-options.ts';

export type { MigrationEvents, MigrationInfoRam, MigrationLog, MigrationStatus, OutgoingOptions } from './outgoing-options.ts';

/** In pre-switchover, how often the convergence policy looks at the clock (ms). */
const HELD_POLICY_TURN_MS = 100;

/** Bound on waiting for the migration thread to stop before the guest is given back. */
const THREAD_STOP_WAIT_MS = 5_000;

/** The section id of "ram" in our streams (QEMU registers it as 2 too); other iterative devices follow. */
export const RAM_SECTION_ID = 2;

/**
 * The main channel's free slabs, shared by one migration after another: a source that migrates
 * again (or resumes) reuses them instead of leaving each migration's slabs to a full GC.
 */
export const MAIN_CHANNEL_SLABS = new SlabPool(DEFAULT_SLAB_BYTES, 4 * 1024 * 1024);

/** A migration's clock unless its options give one: one function, shared with warm-up.ts. */
export const monotonicNow = (): number => performance.now();

/**
 * The source's slab pools (process-wide, over every migration so far): slabs allocated and free
 * now. A source that migrates again allocates none once the pools hold what a migration uses.
 */
export function slabFigures(): Record<string, number> {
  const multifd = multifdSlabFigures();
  return {
    'main-allocated': MAIN_CHANNEL_SLABS.allocated,
    'main-free': MAIN_CHANNEL_SLABS.free.length,
    'multifd-allocated': multifd.allocated,
    'multifd-free': multifd.free,
  };
}

export class OutgoingMigration {
  /** The machine's state: every decision about the migration's course is made from it. */
  state: SourceState;
  /** When `migrate` was issued: total-time runs from here to the final state, as QEMU's does. */
  readonly startTime: number;
  /** When the channels were connected and this migration began sending (setup-time, the meters). */
  readonly connectedAt: number;
  setupTime = 0;
  totalTime = 0;
  downtime = 0;
  expectedDowntime = 0;
  /** When the guest was stopped for the switchover (downtime starts). */
  stopTime = 0;
  /** The switchover as it was decided: the downtime-limit it was planned for and the downtime expected then (ms). */
  switchoverPlan: { limitMs: number; expectedMs: number; pendingBytes: number; cost: SwitchoverCost; bytesPerMs: number } | undefined;
  readonly o: OutgoingOptions;
  readonly now: () => number;
  readonly guest: Guest;
  /** The channel in use (a new one after a postcopy recovery), and its writer. */
  channel: Duplex;
  out: StreamOut;
  readonly w = new BatchWriter({ pool: MAIN_CHANNEL_SLABS });
  readonly ram: RamSaver;
  readonly dialect: StreamDialect;
  readonly multifd: MultifdSender | undefined;
  /** Iterative devices besides RAM, with their section ids. */
  readonly others: { dev: IterativeDevice; sectionId: number }[];
  readonly limiter: RateLimiter;
  readonly meter: BandwidthMeter;
  /** What the switchover costs besides the pending bytes, measured as the migration goes. */
  readonly switchoverCost: SwitchoverCostMeter;
  readonly converge: AutoConverge;
  /** livemig's convergence policy (x-livemig-no-progress-timeout …), consulted on each precopy turn and in pre-switchover. */
  readonly policy: ConvergencePolicyRunner;
  readonly watch = new StateWatch();
  readonly keepalivePings = new KeepalivePings();
  readonly returnPath: ReturnPathReader | undefined;
  readonly precopy: Precopy;
  readonly postcopy: PostcopySender;
  /** Channels given by `migrate resume=true`, taken by the recovery's first action. */
  private resumeChannels: { channel: Duplex; preempt: Duplex | undefined; connectPreempt: (() => Promise<Duplex>) | undefined } | undefined;
  private keepaliveTimer: NodeJS.Timeout | undefined;
  /** The stall deadline's baseline: the last return-path byte or bytes the kernel took (ms). */
  private lastProgressAt: number;
  /** Bytes taken on the migration connections at the last keepalive tick. */
  private progressBytes = 0;
  private reasonTimer: NodeJS.Timeout | undefined;
  /** The migration thread (precopy.ts, postcopy-sender.ts): settles once it has stopped. */
  private readonly thread: Promise<void>;
  /** Resolves when the migration has reached a final state. */
  readonly done: Promise<void>;

  constructor(options: OutgoingOptions) {
    this.o = options;
    this.guest = options.guest;
    this.now = options.now ?? monotonicNow;
    this.connectedAt = this.now();
    this.startTime = Math.min(options.requestedAt ?? this.connectedAt, this.connectedAt);
    this.lastProgressAt = this.connectedAt;
    this.channel = options.channel;
    this.out = this.streamOut(options.channel);
    const p = options.parameters;
    this.multifd = options.multifd !== undefined && options.multifd.length > 0 ? new MultifdSender(options.multifd, { initSent: options.multifdInitSent === true }) : undefined;
    void this.multifd?.failed().then((error) => this.dispatch({ type: 'faulted', error: coded(error) as MigrationError }));
    this.dialect = options.dialect ?? streamDialect(options.machineType);
    this.ram = new RamSaver(options.guest, {
      xbzrleCacheBytes: options.capabilities.xbzrle ? p['xbzrle-cache-size'] : 0,
      ...(this.multifd === undefined ? {} : { multifd: this.multifd }),
      multifdSyncPerRound: this.dialect.multifdFlush === 'per-round',
      multifdZeroPages: this.dialect.multifdZeroPages,
      shared: options.cprExec !== undefined,
    });
    this.ram.pagesByReference = this.out.takesRefs;
    this.others = (options.guest.vfio === undefined ? [] : [options.guest.vfio]).map((dev, i) => ({ dev, sectionId: RAM_SECTION_ID + 1 + i }));
    // switchover-ack: the VFIO device marks the end of its initial data for the destination's ack.
    if (options.guest.vfio !== undefined) options.guest.vfio.initDataMarker = options.capabilities['switchover-ack'];
    this.limiter = new RateLimiter(p['max-bandwidth'], this.connectedAt);
    this.meter = new BandwidthMeter(this.connectedAt);
    this.converge = new AutoConverge(this.connectedAt);
    const returnPath = options.capabilities['return-path'] || options.capabilities['postcopy-ram'];
    this.switchoverCost = new SwitchoverCostMeter(returnPath);
    const blocks = options.guest.ram.blocks;
    this.state = initialSourceState({
      returnPath,
      guestWasRunning: options.guest.running,
      blocks,
      postcopyRequested: options.postcopyRequested === true,
      stallTimeoutMs: p['x-livemig-stall-timeout'],
      execAfterSave: options.cprExec !== undefined,
      pauseBeforeSwitchover: options.capabilities['pause-before-switchover'],
      switchoverAck: options.capabilities['switchover-ack'],
    });
    this.returnPath = returnPath
      ? new ReturnPathReader(blocks, (e) => {
          if (e.type === 'returnPathHeard') this.lastProgressAt = this.now();
          if (e.type === 'pongReceived') {
            const ms = this.keepalivePings.answered(e.value, this.now());
            if (ms !== undefined) this.switchoverCost.noteRoundTrip(ms);
          }
          this.dispatch(e);
        })
      : undefined;
    this.policy = new ConvergencePolicyRunner(this);
    this.precopy = new Precopy(this);
    this.postcopy = new PostcopySender(this, options.preempt, options.connectPreempt);
    this.done = this.watch.until(() => isSourceFinal(this.state));
    // Setup and precopy are under the stall deadline from the start (the machine's keepalive).
    this.perform({ type: 'startKeepalive' });
    this.thread = this.run();
  }

  /** What query-migrate reports. */
  get status(): MigrationStatus {
    return sourceReportedStatus(this.state) as MigrationStatus;
  }

  get errorDesc(): string | undefined {
    return this.state.status === 'failed' ? this.state.error.message : undefined;
  }

  get paused(): boolean {
    return this.state.status === 'postcopy-paused';
  }

  /** Bytes written to the channels so far (main and multifd). */
  get transferred(): number {
    return this.out.written + (this.multifd?.written ?? 0) + this.ram.mappedBytes;
  }

  get throttlePercent(): number {
    return this.converge.percent;
  }

  /** Bytes the guest dirties per millisecond (at the last sync). */
  private get dirtyBytesPerMs(): number {
    return (this.precopy.dirtyRate * TARGET_PAGE_SIZE) / 1000;
  }

  /** The most that may be pending for a switchover now to keep the downtime limit (bytes). */
  switchoverThreshold(nothingPending = false): number {
    return switchoverThresholdBytes(this.o.parameters['downtime-limit'], this.switchoverCost.cost, this.planBytesPerMs(nothingPending), this.dirtyBytesPerMs);
  }

  /** Downtime a switchover now would take with `pendingBytes` left (ms, with the margin). */
  expectDowntime(pendingBytes: number): number {
    return expectedDowntimeMs(pendingBytes, this.switchoverCost.cost, this.planBytesPerMs(pendingBytes === 0), this.dirtyBytesPerMs);
  }

  /** The bandwidth the switchover is planned on; with nothing pending, measured so far if no window has closed yet. */
  planBytesPerMs(nothingPending: boolean): number {
    return nothingPending ? this.meter.provisional(this.now()) : this.meter.conservative;
  }

  /** The downtime-limit the switchover was planned for (the parameter as it is, before one). */
  get downtimeLimitMs(): number {
    return this.switchoverPlan?.limitMs ?? this.o.parameters['downtime-limit'];
  }

  /** By how much the downtime exceeded its limit (ms; 0 within it or before the end). */
  get downtimeOvershootMs(): number {
    return this.state.status === 'completed' ? downtimeVerdict(this.downtime, this.downtimeLimitMs).overshootMs : 0;
  }

  // ---- the machine ------------------------------------------------------------------------------

  /** Feed the machine one event and carry out its actions. Throws what the machine refuses. */
  dispatch(event: SourceEvent): void {
    const { state, actions } = sourceStep(this.state, event, this.now());
    const from = this.state.status;
    this.state = state;
    if (from === 'postcopy-recover' && state.status === 'postcopy-active') this.o.log.info({ dirtyPages: this.ram.dirtyPages }, 'postcopy resumed');
    for (const a of actions) this.perform(a);
    this.watch.notify();
  }

  /** An event from I/O (a channel, a timer): a refusal is a fault of the migration, not of the caller. */
  private report(event: SourceEvent): void {
    try {
      this.dispatch(event);
    } catch (err) {
      this.dispatch({ type: 'faulted', error: coded(err) as MigrationError });
    }
  }

  private perform(a: SourceAction): void {
    switch (a.type) {
      case 'emitStatus':
        this.o.events.status(a.status as MigrationStatus);
        if (a.status === 'failed' && this.state.status === 'failed') {
          const err = this.state.error;
          this.o.log.warn({ err: { message: err.message, code: err.code } }, `migration failed: ${err.message}`);
        } else if (a.status === 'cancelled') {
          this.o.log.info({}, 'migration cancelled');
        } else if (a.status === 'postcopy-paused' && this.state.status === 'postcopy-paused') {
          this.o.log.warn({ reason: this.state.reason.message, code: this.state.reason.code }, 'postcopy paused: waiting for migrate resume=true');
        }
        return;
      case 'closeChannels':
        this.channel.destroy();
        this.multifd?.destroy();
        this.postcopy.closePreempt();
        return;
      case 'startReasonTimer':
        this.reasonTimer = setTimeout(() => this.report({ type: 'reasonTimerFired' }), a.ms);
        return;
      case 'startKeepalive':
        clearInterval(this.keepaliveTimer);
        this.keepaliveTimer = setInterval(() => this.report({ type: 'keepaliveTicked', lastProgressAt: this.progressAt() }), KEEPALIVE_INTERVAL_MS);
        this.keepaliveTimer.unref();
        return;
      case 'stopKeepalive':
        clearInterval(this.keepaliveTimer);
        return;
      case 'sendKeepalivePing':
        // Precopy writes it between two sections, postcopy in its next batch.
        this.keepalivePings.add();
        return;
      case 'restoreGuest':
        void this.restoreGuest(a.run);
        return;
      case 'servePages':
        this.postcopy.queue(a.blockIndex, a.firstPage, a.pageCount);
        return;
      case 'requestReceivedBitmaps': {
        const c = this.resumeChannels!;
        this.resumeChannels = undefined;
        this.adoptChannel(c.channel);
        this.postcopy.recover(a.blocks, c.preempt, c.connectPreempt);
        return;
      }
      case 'applyReceivedBitmap':
        this.postcopy.applyReceivedBitmap(a.block, a.bitmap);
        return;
      case 'sendPostcopyResume':
        this.postcopy.sendResume();
        return;
      case 'startPostcopyPaging':
        this.postcopy.startPaging();
        return;
      case 'stopPostcopyPaging':
        this.postcopy.stopPaging();
        return;
      case 'cleanUp':
        this.cleanUp();
        return;
      case 'execNewImage':
        // After this machine step has settled: a failed exec is the next event, not a nested one.
        queueMicrotask(() => this.execNewImage());
        return;
    }
  }

  /** cpr-exec: the state file is closed; become the new image (returns only when that failed). */
  private execNewImage(): void {
    this.o.log.info({ stateBytes: this.transferred }, 'cpr-exec: state saved, executing the new image');
    try {
      this.o.cprExec!.exec();
    } catch (err) {
      this.report({ type: 'faulted', error: coded(err) as MigrationError });
    }
  }

  /** When the link last showed life: a return-path byte, or more bytes taken by the kernel since the last tick. */
  private progressAt(): number {
    const taken = this.out.accepted + (this.multifd?.written ?? 0);
    if (taken !== this.progressBytes) {
      this.progressBytes = taken;
      this.lastProgressAt = this.now();
    }
    return this.lastProgressAt;
  }

  private streamOut(channel: Duplex): StreamOut {
    // With a return path the destination ends the connection only after its SHUT. A writer
    // thread sends the pages beside this thread, except where postcopy may come without preempt:
    // a requested page then goes on this channel, and must not wait for that thread to be
    // scheduled. With preempt the page server answers requests on its own channel.
    const c = this.o.capabilities;
    const writerThread = !c['postcopy-ram'] || c['postcopy-preempt'];
    const out = new StreamOut(channel, 'main', { peerEndIsLoss: c['return-path'] || c['postcopy-ram'], writerThread });
    void out.failed().then((error) => {
      if (this.out === out) this.report({ type: 'faulted', error: coded(error) as MigrationError });
    });
    return out;
  }

  /** A recovery's new main channel: its writer, and its return path. */
  private adoptChannel(channel: Duplex): void {
    this.channel = channel;
    this.out = this.streamOut(channel);
    this.ram.pagesByReference = this.out.takesRefs;
    // What was encoded for the old channel is dropped.
    this.w.discard();
    this.returnPath?.attach(channel);
  }

  /** Failure or cancel: the source guest runs on as before (unless postcopy gave it away). */
  private async restoreGuest(run: boolean): Promise<void> {
    const guest = this.guest;
    try {
      // The thread may be stopping the guest for the switchover right now: let it finish first
      // (it stops at its next step; a stuck write is cut by closeChannels).
      await Promise.race([this.thread, sleep(THREAD_STOP_WAIT_MS, undefined, { ref: false })]);
      if (run && !guest.running) {
        await guest.start();
        this.o.events.resume();
      } else if (!guest.running && guest.runState === 'finish-migrate') {
        guest.setRunState('paused');
      }
    } finally {
      this.report({ type: 'guestRestored' });
    }
  }

  /** A final state: timers off, threads and caches freed, the figures settled. */
  private cleanUp(): void {
    clearInterval(this.keepaliveTimer);
    clearTimeout(this.reasonTimer);
    this.totalTime = this.now() - this.startTime;
    this.guest.vcpus.setThrottle(0);
    this.postcopy.dispose();
    this.ram.cleanup();
    for (const { dev } of this.others) dev.cleanup();
    // The slabs go back to the pools for the next migration now, not at some later full GC.
    this.w.release();
    this.multifd?.release();
    const s = this.state;
    if (s.status === 'completed') {
      // Downtime ends when the destination runs the guest: SHUT (precopy) or PONG 4 after RUN (postcopy).
      this.downtime = (s.runConfirmedAt ?? this.now()) - this.stopTime;
      this.guest.setRunState('postmigrate');
      const v = downtimeVerdict(this.downtime, this.downtimeLimitMs);
      const seconds = this.totalTime / 1000;
      const within = v.overshootMs > 0 ? `OVER the ${v.limitMs} ms limit by ${v.overshootMs} ms` : `within the ${v.limitMs} ms limit`;
      // One summary line; a broken downtime promise is a warning.
      this.o.log[v.overshootMs > 0 ? 'warn' : 'info'](
        {
          totalMs: Math.round(this.totalTime),
          downtimeMs: v.downtimeMs,
          downtimeLimitMs: v.limitMs,
          ...(v.overshootMs > 0 ? { downtimeOvershootMs: v.overshootMs } : {}),
          expectedDowntimeMs: Math.round(this.switchoverPlan?.expectedMs ?? 0),
          bytes: this.transferred,
          passes: this.ram.stats.dirtySyncCount,
        },
        `migration completed in ${Math.round(this.totalTime)} ms: downtime ${v.downtimeMs} ms, ${within}; ` +
          `${formatGiB(this.transferred)} sent at ${seconds > 0 ? formatGiBps(this.transferred / seconds) : '-'}, ${this.ram.stats.dirtySyncCount} passes`,
      );
    }
  }

  // ---- the migration thread ---------------------------------------------------------------------

  private async run(): Promise<void> {
    this.o.events.status('setup');
    try {
      if (this.returnPath !== undefined) this.returnPath.attach(this.channel);
      await this.precopy.setup();
      // As QEMU's setup-time: from the migration thread's start (connected), not from the command.
      this.setupTime = this.now() - this.connectedAt;
      this.dispatch({ type: 'setupSent' });
      if ((await this.precopy.iterate()) === 'postcopy') await this.postcopy.run();
      else await this.precopy.complete();
    } catch (err) {
      // Cancelled or failed already (the machine ignores this then), or a fault of our own.
      this.report({ type: 'faulted', error: coded(err) as MigrationError });
    }
  }

  /** Throws when the machine has left `status` (cancelled, failed, paused): the thread stops there. */
  expect(...statuses: SourceState['status'][]): void {
    // The machine has moved on (its reason is in the state); this refusal is ignored there.
    if (!statuses.includes(this.state.status)) throw new StateError(this.status, 'send', `the migration thread stops: the migration is ${this.status}`);
    const multifdError = this.multifd?.error;
    if (multifdError !== undefined) throw multifdError;
  }

  /** Write the batch to the main channel (and the multifd channels' queued packets). */
  async flush(): Promise<void> {
    const batch = this.w.flushRefs();
    const w = this.w;
    // Once written, the batch's slabs go back to the writer's pool (its memory stays flat).
    const written = this.out.writeBatch(batch, 1, () => w.recycle(batch.pieces));
    await (this.multifd === undefined ? written : Promise.all([written, this.multifd.flush()]));
  }

  // ---- QMP --------------------------------------------------------------------------------------

  /** migrate-set-parameters while running: downtime-limit, throttling and bandwidth apply at once. */
  setParameters(p: MigrationParameters): void {
    Object.assign(this.o.parameters, p);
    const postcopy = this.state.status === 'postcopy-active' || this.state.status === 'postcopy-recover';
    this.limiter.setRate(postcopy ? p['max-postcopy-bandwidth'] : p['max-bandwidth'], this.now());
  }

  /** migrate-start-postcopy: switch to postcopy as soon as what must go in precopy is sent. */
  requestPostcopy(): void {
    this.dispatch({ type: 'postcopyRequested' });
  }

  /** migrate-continue: `state` must be the status now (QEMU's check); leaves pre-switchover. */
  continueFrom(state: string): void {
    this.dispatch({ type: 'continueRequested', state });
  }

  /**
   * The switchover with pause-before-switchover: wait in pre-switchover for migrate-continue (or
   * a cancel, a failure). Keepalive PINGs the machine asks for meanwhile go out between sections.
   */
  async holdBeforeSwitchover(): Promise<void> {
    while (this.state.status === 'pre-switchover' && !this.state.continued) {
      if (this.keepalivePings.pending) {
        this.keepalivePings.writeDue(this.w);
        await this.flush();
      }
      // The completion timeout counts on while the operator holds the switchover (and may cancel it).
      this.policy.turn(this.ram.pendingEstimate(), 'held');
      if (this.state.status !== 'pre-switchover') break;
      await this.watch.next(HELD_POLICY_TURN_MS);
    }
  }

  /** migrate_cancel (a no-op once the migration has ended). */
  cancel(): void {
    this.dispatch({ type: 'cancelRequested' });
  }

  /** migrate-pause: break the link on purpose; throws StateError outside postcopy. */
  pause(): void {
    this.dispatch({ type: 'pauseRequested' });
  }

  /**
   * migrate resume=true: carry on over new connections (with postcopy-preempt, the preempt one
   * connected already in 7.2's setup, or how to connect it in the 8.0 setup); throws StateError
   * unless paused.
   */
  resume(channel: Duplex, preempt?: Duplex, connectPreempt?: () => Promise<Duplex>): void {
    this.resumeChannels = { channel, preempt, connectPreempt };
    try {
      this.dispatch({ type: 'resumeRequested' });
    } catch (err) {
      this.resumeChannels = undefined;
      channel.destroy();
      preempt?.destroy();
      throw err;
    }
  }

  ramInfo(): MigrationInfoRam {
    const s = this.ram.stats;
    // Once ended, the figures stay as they were at the end (query-migrate after completion).
    const elapsed = Math.max(1, isSourceFinal(this.state) && this.totalTime > 0 ? this.totalTime : this.now() - this.startTime) / 1000;
    const served = this.postcopy.figures();
    return {
      transferred: this.out.written + served.preemptBytes + (this.multifd?.written ?? 0) + this.ram.mappedBytes,
      remaining: this.precopy.pending(),
      total: this.guest.ram.totalBytes,
      duplicate: s.duplicate,
      skipped: 0,
      normal: s.normal,
      'normal-bytes': s.normal * TARGET_PAGE_SIZE,
      'dirty-pages-rate': Math.round(this.precopy.dirtyRate),
      mbps: this.meter.mbps > 0 ? this.meter.mbps : (this.transferred * 8) / elapsed / 1e6,
      'dirty-sync-count': s.dirtySyncCount,
      'postcopy-requests': served.requests,
      'x-postcopy-preempt-requests': served.preemptRequests,
      'page-size': TARGET_PAGE_SIZE,
      'multifd-bytes': this.multifd?.written ?? 0,
      'pages-per-second': Math.round(this.precopy.pagesPerSecond),
      'precopy-bytes': this.precopy.precopyBytes,
      'downtime-bytes': this.precopy.downtimeBytes,
      'postcopy-bytes': served.postcopyBytes,
      'dirty-sync-missed-zero-copy': 0,
    };
  }
}
