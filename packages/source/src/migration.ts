// The outgoing migration (QEMU's migration thread): setup, precopy iterations under the rate
// limit, switchover when what is left fits the downtime limit, then the return path's verdict.
//
//   none → setup → active ──────────────→ completed        (cancelled / failed from any of them)
//            │       │ PART sections      ▲
//            │       └─ stop vCPUs, END + FULL sections, EOF, VMDESCRIPTION, SHUT(0) on the RP
//            └─ header, configuration, OPEN_RETURN_PATH, PING(1), START sections
//
// Decisions (switchover, throttle) are the pure functions of convergence.ts; this file owns the
// channel, timers and the guest's run state.

import net from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import type { Duplex } from 'node:stream';
import {
  BatchWriter,
  type Capabilities,
  KEEPALIVE_INTERVAL_MS,
  KEEPALIVE_PING_BASE,
  KEEPALIVE_TIMEOUT_MS,
  LIVEMIG_HELLO_PING,
  MigCmd,
  type MigrationParameters,
  type MigrationStatus as QmpMigrationStatus,
  recvBitmapBytes,
  NEED_MORE_RP,
  RP_LIVEMIG_EXT,
  ReturnPathDecoder,
  RpMsg,
  TARGET_PAGE_SIZE,
  toQemuJson,
  type VmdescDevice,
  writeCommand,
  writePackaged,
  writePostcopyAdvise,
  writeRamDiscard,
  writeRecvBitmapRequest,
  decodeLivemigExt,
  decodeRequestBatch,
  writeEof,
  writeEos,
  writePing,
  writeSectionFooter,
  writeSectionHeader,
  writeStreamHeader,
  writeConfiguration,
  writeVmdescription,
} from '@livemig/protocol';
import type { Guest, IterativeDevice } from '@livemig/guest';
import { detachFd } from '@livemig/runtime';
import { AutoConverge, BandwidthMeter, decideNext } from './convergence.ts';
import { RamSaver } from './ram-saver.ts';
import { RateLimiter } from './rate-limiter.ts';
import { MultifdSender } from './multifd-sender.ts';
import { PageServer } from './page-server.ts';
import { StreamOut } from './stream-out.ts';

/** The statuses a livemig source goes through (QEMU's names). */
export type MigrationStatus = Extract<
  QmpMigrationStatus,
  'none' | 'setup' | 'active' | 'postcopy-active' | 'postcopy-paused' | 'postcopy-recover' | 'cancelling' | 'cancelled' | 'completed' | 'failed'
>;

/** Bytes encoded before each write to the channel (one writev). */
const BATCH_BYTES = 1024 * 1024;
/** QEMU's MAX_WAIT: one PART section spends at most this long sending. */
const MAX_ITERATION_MS = 50;
/** How long a failure on a reset connection waits for the destination's reason on the return path. */
const DESTINATION_REASON_WAIT_MS = 500;
/** The section id of "ram" in our streams (QEMU registers it as 2 too); other iterative devices follow. */
const RAM_SECTION_ID = 2;
/** Bytes one PART section of a non-RAM iterative device may carry. */
const DEVICE_PART_BYTES = 1024 * 1024;

/** One turn of the event loop (about a microsecond when idle). */
function yieldToIo(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}

export interface MigrationEvents {
  status(status: MigrationStatus): void;
  pass(pass: number): void;
  stop(): void;
  resume(): void;
}

export interface OutgoingOptions {
  guest: Guest;
  capabilities: Capabilities;
  parameters: MigrationParameters;
  /** The connected channel. */
  channel: Duplex;
  /** With postcopy-preempt: a second connection that carries only requested pages. */
  preempt?: Duplex;
  /** With multifd: the multifd channels (connected after the main one), in channel-id order. */
  multifd?: readonly Duplex[];
  /** Machine type sent in the configuration record. */
  machineType: string;
  /** The page server thread under SCHED_FIFO (--realtime-postcopy). */
  realtimePostcopy?: boolean;
  events: MigrationEvents;
  log: { info(obj: object, msg?: string): void; warn(obj: object, msg?: string): void; debug(obj: object, msg?: string): void };
  now?: () => number;
}

export interface MigrationInfoRam {
  transferred: number;
  remaining: number;
  total: number;
  duplicate: number;
  skipped: number;
  normal: number;
  'normal-bytes': number;
  'dirty-pages-rate': number;
  mbps: number;
  'dirty-sync-count': number;
  'postcopy-requests': number;
  /** livemig: page requests a livemig destination made on the preempt channel (part of postcopy-requests). */
  'x-postcopy-preempt-requests': number;
  'page-size': number;
  'multifd-bytes': number;
  'pages-per-second': number;
  'precopy-bytes': number;
  'downtime-bytes': number;
  'postcopy-bytes': number;
  'dirty-sync-missed-zero-copy': number;
}

export class OutgoingMigration {
  status: MigrationStatus = 'setup';
  errorDesc: string | undefined;
  readonly startTime: number;
  setupTime = 0;
  totalTime = 0;
  downtime = 0;
  expectedDowntime = 0;
  private readonly o: OutgoingOptions;
  private readonly now: () => number;
  private out: StreamOut;
  /** The channel in use (a new one after a postcopy recovery). */
  private channel: Duplex;
  private readonly w = new BatchWriter();
  readonly ram: RamSaver;
  /** Iterative devices besides RAM, with their section ids. */
  private readonly others: { dev: IterativeDevice; sectionId: number }[];
  private readonly limiter: RateLimiter;
  private readonly meter: BandwidthMeter;
  private readonly converge: AutoConverge;
  private rp: ReturnPathDecoder | undefined;
  private shutStatus: number | undefined;
  private shutWaiter: (() => void) | undefined;
  private destinationError: { code?: string; message?: string; offset?: number } | undefined;
  /** Set while a failure waits for the destination's reason (awaitDestinationReason). */
  private reasonWaiter: (() => void) | undefined;
  private cancelRequested = false;
  private readonly abort = new AbortController();
  private wasRunning = false;
  private stopTime = 0;
  private precopyBytes = 0;
  private downtimeBytes = 0;
  private dirtyRate = 0;
  private pagesPerSecond = 0;
  private lastSyncTime: number;
  private postcopyRequested = false;
  private inPostcopy = false;
  /** Postcopy page requests not served yet: [block index, page index] pairs, in arrival order. */
  private requests: number[] = [];
  private requestCount = 0;
  private postcopyBytes = 0;
  private wake: (() => void) | undefined;
  private pongAt = new Map<number, number>();
  /** Resolves when the migration has reached a final state. */
  readonly done: Promise<void>;

  constructor(options: OutgoingOptions) {
    this.o = options;
    this.now = options.now ?? (() => performance.now());
    this.startTime = this.now();
    this.lastSyncTime = this.startTime;
    this.channel = options.channel;
    this.out = new StreamOut(options.channel);
    if (options.preempt !== undefined) {
      this.pageServer = new PageServer(options.guest, options.realtimePostcopy === true, (reason) => this.onPreemptLost(reason));
      this.holdPreempt(options.preempt);
    }
    const p = options.parameters;
    if (options.multifd !== undefined && options.multifd.length > 0) this.multifd = new MultifdSender(options.multifd);
    this.ram = new RamSaver(options.guest, {
      xbzrleCacheBytes: options.capabilities.xbzrle ? p['xbzrle-cache-size'] : 0,
      ...(this.multifd === undefined ? {} : { multifd: this.multifd }),
    });
    this.others = (options.guest.vfio === undefined ? [] : [options.guest.vfio]).map((dev, i) => ({ dev, sectionId: RAM_SECTION_ID + 1 + i }));
    this.limiter = new RateLimiter(p['max-bandwidth'], this.startTime);
    this.meter = new BandwidthMeter(this.startTime);
    this.converge = new AutoConverge(this.startTime);
    const returnPath = options.capabilities['return-path'] || options.capabilities['postcopy-ram'];
    this.rp = returnPath ? this.newReturnPathDecoder() : undefined;
    this.done = this.run();
  }

  /** Bytes written to the channels so far. */
  get transferred(): number {
    return this.out.written + this.multifdBytes;
  }

  private readonly multifd: MultifdSender | undefined;

  private get multifdBytes(): number {
    return this.multifd?.written ?? 0;
  }

  get throttlePercent(): number {
    return this.converge.percent;
  }

  /** Change max-bandwidth while running (takes effect at once). */
  setMaxBandwidth(bytesPerSecond: number): void {
    this.limiter.setRate(bytesPerSecond, this.now());
  }

  /**
   * migrate-set-parameters while running. QEMU reads downtime-limit, the cpu-throttle parameters
   * and the bandwidth limits live, so the running migration takes the new values at once.
   */
  setParameters(p: MigrationParameters): void {
    Object.assign(this.o.parameters, p);
    this.setMaxBandwidth(this.inPostcopy ? p['max-postcopy-bandwidth'] : p['max-bandwidth']);
  }

  /** migrate-start-postcopy: switch to postcopy as soon as what must go in precopy is sent. */
  requestPostcopy(): void {
    this.postcopyRequested = true;
    this.wake?.();
  }

  cancel(): void {
    if (this.status === 'completed' || this.status === 'failed' || this.status === 'cancelled') return;
    this.cancelRequested = true;
    this.setStatus('cancelling');
    this.cancelWaiter?.();
    this.wake?.();
    this.abort.abort();
    this.out.fail(new Error('migration cancelled'));
    this.channel.destroy();
    this.multifd?.destroy();
  }

  private setStatus(s: MigrationStatus): void {
    if (this.status === s) return;
    this.status = s;
    this.o.events.status(s);
  }

  ramInfo(): MigrationInfoRam {
    const s = this.ram.stats;
    const elapsed = Math.max(1, this.now() - this.startTime) / 1000;
    return {
      transferred: this.out.written + this.preemptBytes + this.multifdBytes,
      remaining: this.pending(),
      total: this.o.guest.ram.totalBytes,
      duplicate: s.duplicate,
      skipped: 0,
      normal: s.normal,
      'normal-bytes': s.normal * TARGET_PAGE_SIZE,
      'dirty-pages-rate': Math.round(this.dirtyRate),
      mbps: this.meter.mbps > 0 ? this.meter.mbps : (this.transferred * 8) / elapsed / 1e6,
      'dirty-sync-count': s.dirtySyncCount,
      'postcopy-requests': this.requestCount + this.pageServerBefore.requests + (this.pageServer?.requests ?? 0),
      'x-postcopy-preempt-requests': this.pageServerBefore.requests + (this.pageServer?.requests ?? 0),
      'page-size': TARGET_PAGE_SIZE,
      'multifd-bytes': this.multifdBytes,
      'pages-per-second': Math.round(this.pagesPerSecond),
      'precopy-bytes': this.precopyBytes,
      'downtime-bytes': this.downtimeBytes,
      'postcopy-bytes': this.postcopyBytes,
      'dirty-sync-missed-zero-copy': 0,
    };
  }

  // ---- the migration thread --------------------------------------------------------------------

  private async run(): Promise<void> {
    const guest = this.o.guest;
    this.wasRunning = guest.running;
    this.o.events.status('setup');
    try {
      if (this.rp !== undefined) this.startReturnPath();
      await this.setup();
      this.setupTime = this.now() - this.startTime;
      this.setStatus('active');
      if ((await this.iterate()) === 'postcopy') await this.postcopy();
      else await this.complete();
      this.totalTime = this.now() - this.startTime;
      guest.setRunState('postmigrate');
      this.setStatus('completed');
      this.o.log.info(
        { totalMs: Math.round(this.totalTime), downtimeMs: Math.round(this.downtime), bytes: this.transferred, passes: this.ram.stats.dirtySyncCount },
        'migration completed',
      );
    } catch (err) {
      await this.recover(err as Error);
    } finally {
      this.o.guest.vcpus.setThrottle(0);
      void this.pageServer?.stop();
      this.ram.cleanup();
      for (const { dev } of this.others) dev.cleanup();
    }
  }

  /** Failure or cancel: the source guest runs on as before, with its memory untouched. */
  private async recover(err: Error): Promise<void> {
    this.totalTime = this.now() - this.startTime;
    if (!this.cancelRequested) await this.awaitDestinationReason(err);
    this.channel.destroy();
    this.multifd?.destroy();
    this.preempt?.destroy();
    const guest = this.o.guest;
    // Once postcopy has started the destination owns the guest: never run it here again.
    if (this.wasRunning && !guest.running && !this.inPostcopy) {
      await guest.start();
      this.o.events.resume();
    } else if (!guest.running && guest.runState === 'finish-migrate') {
      guest.setRunState('paused');
    }
    if (this.cancelRequested) {
      this.setStatus('cancelled');
      this.o.log.info({}, 'migration cancelled');
      return;
    }
    this.errorDesc = this.describeFailure(err);
    this.setStatus('failed');
    this.o.log.warn({ err: { message: err.message, code: (err as { code?: string }).code } }, `migration failed: ${this.errorDesc}`);
  }

  /**
   * A connection the destination reset usually means the destination failed, and its reason is on
   * the return path, written before the reset; the reset of another channel can outrun it here.
   * Read on, briefly, until the reason arrives or the return path ends.
   */
  private async awaitDestinationReason(err: Error): Promise<void> {
    const channel = this.channel;
    const code = (err as { code?: string }).code;
    const transport = code === 'ECONNRESET' || code === 'EPIPE' || /ECONNRESET|EPIPE|closed/.test(err.message);
    if (this.rp === undefined || !transport || this.destinationError !== undefined || channel.destroyed || channel.readableEnded) return;
    await new Promise<void>((resolve) => {
      const finish = (): void => {
        clearTimeout(timer);
        this.reasonWaiter = undefined;
        channel.off('end', finish).off('close', finish).off('error', finish);
        resolve();
      };
      const timer = setTimeout(finish, DESTINATION_REASON_WAIT_MS);
      this.reasonWaiter = finish;
      channel.on('end', finish).on('close', finish).on('error', finish);
    });
  }

  private describeFailure(err: Error): string {
    const d = this.destinationError;
    if (d !== undefined) return `destination failed: ${d.message ?? 'unknown error'}${d.code !== undefined ? ` [${d.code}]` : ''}`;
    if (this.shutStatus !== undefined && this.shutStatus !== 0) return `destination failed: it reported status ${this.shutStatus} on the return path`;
    return err.message;
  }

  private async flush(): Promise<void> {
    const bufs = this.w.flush();
    if (this.multifd === undefined) {
      await this.out.write(bufs);
      return;
    }
    await Promise.all([this.out.write(bufs), this.multifd.flush()]);
  }

  /** End of a RAM section: with multifd, every channel gets its SYNC packet before the EOS. */
  private async multifdSync(): Promise<void> {
    if (this.multifd !== undefined) await this.multifd.sync();
  }

  private async setup(): Promise<void> {
    const w = this.w;
    const caps = this.o.capabilities;
    writeStreamHeader(w);
    writeConfiguration(w, { machineType: this.o.machineType });
    if (this.rp !== undefined) {
      writeCommand(w, MigCmd.OPEN_RETURN_PATH);
      writePing(w, 1);
      // Harmless to a QEMU destination (it echoes it); tells a livemig one it may send its
      // error details before SHUT.
      writePing(w, LIVEMIG_HELLO_PING);
    }
    if (caps['postcopy-ram']) writePostcopyAdvise(w, { hostPageSizeSummary: TARGET_PAGE_SIZE, targetPageSize: TARGET_PAGE_SIZE });
    writeSectionHeader(w, { kind: 'start', sectionId: RAM_SECTION_ID, idstr: 'ram', instanceId: 0, versionId: 4 });
    this.ram.saveSetup(w);
    await this.multifdSync();
    writeEos(w);
    writeSectionFooter(w, RAM_SECTION_ID);
    for (const { dev, sectionId } of this.others) {
      writeSectionHeader(w, { kind: 'start', sectionId, idstr: dev.idstr, instanceId: dev.instanceId, versionId: dev.versionId });
      dev.saveSetup(w);
      writeSectionFooter(w, sectionId);
    }
    await this.flush();
    this.o.events.pass(1);
  }

  /** What every iterative device still has to send, cheaply estimated. */
  private pending(): number {
    let n = this.ram.pendingEstimate();
    for (const { dev } of this.others) n += dev.pendingEstimate();
    return n;
  }

  /** Exact pending of every device (RAM: a dirty sync, with the bookkeeping each sync does). */
  private pendingExact(): number {
    let n = this.syncDirty();
    for (const { dev } of this.others) n += dev.pendingExact();
    return n;
  }

  /** Sync RAM's dirty log; returns RAM's exact pending bytes. */
  private syncDirty(): number {
    const now = this.now();
    const pending = this.ram.pendingExact();
    const added = this.ram.lastSyncAdded;
    const elapsed = (now - this.lastSyncTime) / 1000;
    if (elapsed > 0) this.dirtyRate = added / elapsed;
    this.lastSyncTime = now;
    this.converge.addDirty(added);
    this.o.events.pass(this.ram.stats.dirtySyncCount);
    this.o.log.debug(
      { pass: this.ram.stats.dirtySyncCount, newlyDirty: added, pending, sent: this.transferred, thresholdBytes: Math.round(this.meter.threshold), ms: Math.round(now - this.startTime) },
      'dirty sync',
    );
    const p = this.o.parameters;
    const next = this.converge.onSync(
      now,
      this.transferred,
      TARGET_PAGE_SIZE,
      {
        throttleTriggerThreshold: p['throttle-trigger-threshold'],
        cpuThrottleInitial: p['cpu-throttle-initial'],
        cpuThrottleIncrement: p['cpu-throttle-increment'],
        maxCpuThrottle: p['max-cpu-throttle'],
        cpuThrottleTailslow: p['cpu-throttle-tailslow'],
      },
      this.o.capabilities['auto-converge'],
    );
    if (next !== undefined) {
      this.o.guest.vcpus.setThrottle(next);
      this.o.log.info({ percent: next }, 'auto-converge: vCPU throttle raised');
    }
    return pending;
  }

  private checkCancelled(): void {
    if (this.cancelRequested) throw new Error('migration cancelled');
    if (this.out.error !== undefined) throw this.out.error;
    const multifdError = this.multifd?.error;
    if (multifdError !== undefined) throw new Error(`multifd channel: ${multifdError.message}`);
    if (this.shutStatus !== undefined && this.shutStatus !== 0) throw new Error('destination failed');
  }

  private async iterate(): Promise<'complete' | 'postcopy'> {
    for (;;) {
      this.checkCancelled();
      let pending = this.pending();
      // The exact figure costs a dirty sync: ask for it only when the estimate says we may be done.
      if (pending < this.meter.threshold) pending = this.pendingExact();
      this.expectedDowntime = this.meter.expectedDowntime(pending);
      // With postcopy-ram, RAM may go after the switch; other iterative devices must go before.
      let mustPrecopy = pending;
      if (this.o.capabilities['postcopy-ram']) {
        mustPrecopy = 0;
        for (const { dev } of this.others) mustPrecopy += dev.pendingEstimate();
      }
      const step = decideNext({
        pendingBytes: pending,
        thresholdBytes: this.meter.threshold,
        mustPrecopyBytes: mustPrecopy,
        postcopyRequested: this.postcopyRequested,
        inPostcopy: false,
      });
      if (step !== 'iterate') return step;
      await this.partSection();
      await this.devicePartSections();
    }
  }

  /** One PART section per other iterative device, under the same rate limit. */
  private async devicePartSections(): Promise<void> {
    const w = this.w;
    for (const { dev, sectionId } of this.others) {
      if (dev.pendingEstimate() === 0) continue;
      this.checkCancelled();
      const allowance = this.limiter.allowance(this.now());
      if (allowance <= 0) return;
      const before = w.totalBytes;
      writeSectionHeader(w, { kind: 'part', sectionId });
      dev.saveIterate(w, Math.min(DEVICE_PART_BYTES, allowance));
      writeSectionFooter(w, sectionId);
      const bytes = w.totalBytes - before;
      this.limiter.consume(bytes);
      this.meter.add(bytes);
      this.precopyBytes += bytes;
      await this.flush();
    }
  }

  /** One PART section: pages until the rate limit, 50 ms, or no dirty page is left. */
  private async partSection(): Promise<void> {
    const w = this.w;
    const started = this.now();
    writeSectionHeader(w, { kind: 'part', sectionId: RAM_SECTION_ID });
    const deadline = (): boolean => this.now() - started >= MAX_ITERATION_MS;
    let pagesBefore = this.ram.stats.normal + this.ram.stats.duplicate + this.ram.stats.xbzrlePages;
    for (;;) {
      this.checkCancelled();
      const allowance = this.limiter.allowance(this.now());
      if (allowance < Math.min(BATCH_BYTES, this.limiter.burstBytes) && !this.limiter.unlimited) {
        // Over the line: end this section here and sleep until a batch fits.
        break;
      }
      const before = this.ram.encodedBytes(w);
      const empty = this.ram.saveIterate(w, Math.min(BATCH_BYTES, allowance), deadline);
      const bytes = this.ram.encodedBytes(w) - before;
      this.limiter.consume(bytes);
      this.meter.add(bytes);
      this.precopyBytes += bytes;
      await this.flush();
      if (empty || deadline()) break;
      // A socket that takes every batch at once never makes us wait: let QMP and the return path in.
      await yieldToIo();
    }
    await this.multifdSync();
    writeEos(w);
    writeSectionFooter(w, RAM_SECTION_ID);
    await this.flush();
    const now = this.now();
    const pagesAfter = this.ram.stats.normal + this.ram.stats.duplicate + this.ram.stats.xbzrlePages;
    if (now > started) this.pagesPerSecond = ((pagesAfter - pagesBefore) * 1000) / (now - started);
    pagesBefore = pagesAfter;
    this.meter.update(now, this.o.parameters['downtime-limit']);
    const wait = this.limiter.delayFor(Math.min(BATCH_BYTES, this.limiter.burstBytes), now);
    if (wait > 0) await sleep(wait, undefined, { signal: this.abort.signal }).catch(() => {});
  }

  /** The switchover: stop the guest (STOP event) and start counting downtime. */
  private async stopGuest(): Promise<void> {
    const guest = this.o.guest;
    this.stopTime = this.now();
    if (guest.running) {
      await guest.stop('finish-migrate');
      this.o.events.stop();
    } else {
      guest.setRunState('finish-migrate');
    }
  }

  /** END sections of the iterative devices other than RAM (everything they still hold). */
  private async endOtherDevices(): Promise<void> {
    const w = this.w;
    for (const { dev, sectionId } of this.others) {
      writeSectionHeader(w, { kind: 'end', sectionId });
      while (!dev.saveComplete(w, BATCH_BYTES)) await this.flush();
      writeSectionFooter(w, sectionId);
    }
  }

  /** One FULL section per non-iterative device into `w`; returns their VMDESCRIPTION entries. */
  private writeDeviceSections(w: BatchWriter): VmdescDevice[] {
    const described: VmdescDevice[] = [];
    let sectionId = 100;
    for (const dev of this.o.guest.devices) {
      const data = dev.save();
      writeSectionHeader(w, { kind: 'full', sectionId, idstr: dev.idstr, instanceId: dev.instanceId, versionId: dev.versionId });
      w.bytes(data);
      writeSectionFooter(w, sectionId++);
      described.push(dev.describe(data.length));
    }
    return described;
  }

  private async complete(): Promise<void> {
    const guest = this.o.guest;
    const w = this.w;
    // Stop-and-copy: the guest pauses, everything left goes out unthrottled.
    await this.stopGuest();
    this.checkCancelled();
    this.syncDirty();
    const startBytes = this.transferred;
    writeSectionHeader(w, { kind: 'end', sectionId: RAM_SECTION_ID });
    for (;;) {
      this.checkCancelled();
      const empty = this.ram.saveComplete(w, BATCH_BYTES);
      await this.flush();
      if (empty) break;
    }
    await this.multifdSync();
    writeEos(w);
    writeSectionFooter(w, RAM_SECTION_ID);
    await this.endOtherDevices();
    // Devices: one FULL section each, described in the VMDESCRIPTION.
    const described = this.writeDeviceSections(w);
    writeEof(w);
    const prefixed = [...this.others.map((o) => o.dev), ...guest.devices]
      .filter((d) => d.layout === 'be32-prefixed')
      .map((d) => ({ name: d.idstr, instance_id: d.instanceId }));
    const desc: Record<string, unknown> = { page_size: TARGET_PAGE_SIZE, devices: described };
    if (prefixed.length > 0) desc['livemig'] = { prefixed };
    writeVmdescription(w, toQemuJson(desc));
    await this.flush();
    this.downtimeBytes = this.transferred - startBytes;
    this.o.log.debug({ ms: Math.round(this.now() - this.startTime), stopMs: Math.round(this.now() - this.stopTime), downtimeBytes: this.downtimeBytes }, 'final state sent');
    if (this.rp !== undefined) {
      await this.waitForShut();
    } else {
      await Promise.all([this.out.end(), this.multifd?.end()]);
    }
    this.downtime = this.now() - this.stopTime;
    this.channel.destroy();
    this.multifd?.destroy();
  }

  // ---- postcopy ---------------------------------------------------------------------------------

  /**
   * Postcopy (wire-format.md §7.2): stop the guest, END what cannot go later, discard the dirty
   * ranges, send the device state in a PACKAGED blob ending with RUN, then the rest of RAM in the
   * background while requested pages jump the queue (and the rate limit).
   */
  private async postcopy(): Promise<void> {
    const guest = this.o.guest;
    const w = this.w;
    await this.stopGuest();
    this.inPostcopy = true;
    this.setStatus('postcopy-active');
    // Before the destination can ask for anything (it listens once it has the package).
    this.startPageServer();
    await this.endOtherDevices();
    this.syncDirty();
    this.ram.disableXbzrle();
    for (const [i, b] of guest.ram.blocks.entries()) {
      const ranges = this.ram.dirtyRanges(i);
      if (ranges.length > 0) writeRamDiscard(w, b.idstr, ranges);
    }
    this.ram.forgetBlock();
    this.limiter.setRate(this.o.parameters['max-postcopy-bandwidth'], this.now());
    writePing(w, 2);
    // The package: the destination parses it whole, starts listening for pages, loads devices, runs.
    const pkg = new BatchWriter({ slabSize: 64 * 1024 });
    writeCommand(pkg, MigCmd.POSTCOPY_LISTEN);
    this.writeDeviceSections(pkg);
    writePing(pkg, 3);
    writeCommand(pkg, MigCmd.POSTCOPY_RUN);
    const blob = pkg.flushConcat();
    writePackaged(w, blob.length);
    w.bytes(blob);
    writePing(w, 4);
    await this.flush();
    this.o.log.info({ ms: Math.round(this.now() - this.startTime), dirtyPages: this.ram.dirtyPages }, 'postcopy started');

    // Background pages and requested pages until none is left. A broken link pauses (the
    // destination guest runs on, waiting for what it lacks) until `migrate resume=true`.
    this.startKeepalive();
    try {
      await this.postcopyLoop();
    } finally {
      clearInterval(this.keepalive);
    }
  }

  private keepalive: NodeJS.Timeout | undefined;
  private keepaliveDue = false;
  private keepaliveCount = 0;
  private lastRpAt = 0;

  /** Keepalive PINGs while postcopy runs, and a link with no answer for 3 s is declared broken. */
  private startKeepalive(): void {
    this.lastRpAt = this.now();
    this.keepalive = setInterval(() => {
      if (this.status !== 'postcopy-active' && this.status !== 'postcopy-recover') return;
      this.keepaliveDue = true;
      this.wake?.();
      const silent = this.now() - this.lastRpAt;
      if (silent > KEEPALIVE_TIMEOUT_MS) {
        this.o.log.warn({ silentMs: Math.round(silent) }, 'no word from the destination: the link is presumed broken');
        this.out.fail(new Error(`no return-path traffic for ${Math.round(silent)} ms: link presumed broken`));
        this.channel.destroy();
        this.wake?.();
      }
    }, KEEPALIVE_INTERVAL_MS);
    this.keepalive.unref();
  }

  private async postcopyLoop(): Promise<void> {
    const w = this.w;
    for (;;) {
      if (this.out.error !== undefined && !this.cancelRequested) {
        await this.pauseUntilResumed(this.out.error);
        continue;
      }
      this.checkCancelled();
      const started = this.now();
      const deadline = (): boolean => this.now() - started >= MAX_ITERATION_MS;
      if (this.keepaliveDue) {
        this.keepaliveDue = false;
        writePing(w, (KEEPALIVE_PING_BASE + (this.keepaliveCount++ & 0xffff)) >>> 0);
      }
      this.pageServer?.drainServed((block, page) => this.ram.takeRequested(block, page));
      writeSectionHeader(w, { kind: 'part', sectionId: RAM_SECTION_ID });
      const before = w.totalBytes;
      this.serveRequests(w);
      // Requested pages bypass the limit; only background pages count against it.
      const background = w.totalBytes;
      const allowance = this.limiter.allowance(this.now());
      if (this.ram.dirtyPages > 0 && allowance > 0) {
        // Small batches: a request arriving meanwhile waits at most one batch.
        this.ram.saveIterate(w, Math.min(BATCH_BYTES / 4, allowance), deadline);
      }
      writeEos(w);
      writeSectionFooter(w, RAM_SECTION_ID);
      this.limiter.consume(w.totalBytes - background);
      this.postcopyBytes += w.totalBytes - before;
      try {
        await this.flush();
      } catch {
        // Lost with the link: the destination's received bitmap will say what to send again.
        this.w.flush();
        continue;
      }
      // A socket that takes every batch at once never makes us wait for 'drain': give the
      // return path (page requests) and QMP their turn at each batch.
      await yieldToIo();
      // Everything went out: end the stream. A link that breaks before the destination's SHUT
      // pauses like any other (the stream's end may not have arrived): after the recovery the
      // destination's received bitmap says what to send again, then the end goes once more.
      if (this.ram.dirtyPages === 0 && this.requests.length === 0 && (await this.endPostcopyStream())) break;
      const wait = this.requests.length > 0 || this.keepaliveDue ? 0 : this.limiter.delayFor(BATCH_BYTES / 4, this.now());
      if (wait > 0) await this.sleepOrWake(wait);
    }
    this.inPostcopy = false;
    const pong4 = this.pongAt.get(4);
    // Downtime: source stopped → the destination had run RUN (it answers PING 4 after it).
    this.downtime = (pong4 ?? this.now()) - this.stopTime;
    this.channel.destroy();
  }

  /**
   * The end of a postcopy stream: RAM's END section, EOF (and the page server's EOS on the preempt channel), then
   * the destination's SHUT. True once SHUT(0) came; false if the link broke first (the caller
   * pauses until a recovery); throws on a SHUT with a failure status.
   */
  private async endPostcopyStream(): Promise<boolean> {
    const w = this.w;
    writeSectionHeader(w, { kind: 'end', sectionId: RAM_SECTION_ID });
    writeEos(w);
    writeSectionFooter(w, RAM_SECTION_ID);
    writeEof(w);
    try {
      await this.flush();
    } catch {
      this.w.flush();
      return false;
    }
    await this.stopPageServer(true);
    try {
      await this.waitForShut();
      return true;
    } catch (err) {
      if (this.shutStatus !== undefined) throw err;
      return false;
    }
  }

  // ---- postcopy recovery (wire-format.md §7.3) ---------------------------------------------------

  private recovery: { bitmap(block: string, bits: Buffer): void; acked(): void } | undefined;
  private resumeWith: ((channels: { channel: Duplex; preempt: Duplex | undefined }) => void) | undefined;

  /** migrate-pause: break the link on purpose; both sides go to postcopy-paused. */
  pause(): void {
    if (this.status !== 'postcopy-active' && this.status !== 'postcopy-recover') {
      throw new Error(`migrate-pause needs a postcopy migration (status is ${this.status})`);
    }
    this.channel.destroy();
    this.out.fail(new Error('paused by migrate-pause'));
    this.wake?.();
  }

  /** migrate resume=true: carry on over a freshly connected channel (and a new preempt channel, with postcopy-preempt). */
  resume(channel: Duplex, preempt?: Duplex): void {
    if (this.status !== 'postcopy-paused' || this.resumeWith === undefined) {
      channel.destroy();
      preempt?.destroy();
      throw new Error(`migrate with resume=true needs a paused postcopy migration (status is ${this.status})`);
    }
    this.resumeWith({ channel, preempt });
  }

  get paused(): boolean {
    return this.status === 'postcopy-paused';
  }

  /** Wait in postcopy-paused for a new channel, then run the recovery handshake; repeat on failure. */
  private async pauseUntilResumed(cause: Error): Promise<void> {
    await this.stopPageServer(false);
    for (;;) {
      this.channel.destroy();
      this.setStatus('postcopy-paused');
      this.o.log.warn({ reason: cause.message }, 'postcopy paused: waiting for migrate resume=true');
      const channels = await new Promise<{ channel: Duplex; preempt: Duplex | undefined } | undefined>((resolve) => {
        this.resumeWith = resolve;
        this.cancelWaiter = () => resolve(undefined);
      });
      this.resumeWith = undefined;
      this.cancelWaiter = undefined;
      if (channels === undefined) throw new Error('migration cancelled');
      try {
        await this.resumeOver(channels.channel);
        if (channels.preempt !== undefined) {
          // Requested pages jump the queue again, on the new preempt channel.
          this.holdPreempt(channels.preempt);
          this.startPageServer();
        }
        return;
      } catch (err) {
        channels.preempt?.destroy();
        cause = err as Error;
      }
    }
  }

  private cancelWaiter: (() => void) | undefined;

  /**
   * Recovery over a new channel: RECV_BITMAP for every block, dirty := not received, then
   * POSTCOPY_RESUME and wait for RESUME_ACK. The stream carries no header this time.
   */
  private async resumeOver(channel: Duplex): Promise<void> {
    this.setStatus('postcopy-recover');
    // The keepalive measures silence on this channel, not since the last word on the old one.
    this.lastRpAt = this.now();
    this.channel = channel;
    this.out = new StreamOut(channel);
    this.w.flush();
    this.rp = this.newReturnPathDecoder();
    this.startReturnPath();
    this.requests.length = 0;
    const blocks = this.o.guest.ram.blocks;
    const pending = new Map<string, number>(blocks.map((b, i) => [b.idstr, i]));
    const done = new Promise<void>((resolve, reject) => {
      let bitmapsLeft = blocks.length;
      let acked = false;
      this.recovery = {
        bitmap: (name, bits) => {
          const i = pending.get(name);
          if (i === undefined) {
            reject(new Error(`RECV_BITMAP for unknown or repeated block "${name}"`));
            return;
          }
          pending.delete(name);
          this.ram.setDirtyFromReceived(i, bits);
          if (--bitmapsLeft === 0) {
            const w = this.w;
            this.ram.forgetBlock();
            writeCommand(w, MigCmd.POSTCOPY_RESUME);
            void this.flush().catch(reject);
          }
        },
        acked: () => {
          if (bitmapsLeft !== 0 || acked) {
            reject(new Error('RESUME_ACK before every RECV_BITMAP arrived'));
            return;
          }
          acked = true;
          resolve();
        },
      };
      void this.out.failed().then(reject);
    });
    for (const b of blocks) writeRecvBitmapRequest(this.w, b.idstr);
    await this.flush();
    await done;
    this.recovery = undefined;
    this.limiter.setRate(this.o.parameters['max-postcopy-bandwidth'], this.now());
    this.setStatus('postcopy-active');
    this.o.log.info({ dirtyPages: this.ram.dirtyPages }, 'postcopy resumed');
  }

  /** Bytes written to the preempt channel(s). */
  private get preemptBytes(): number {
    return this.pageServerBefore.bytes + (this.pageServer?.bytes ?? 0);
  }

  /**
   * The preempt channel until postcopy starts (or a recovery resumes) and hands it to the page
   * server. Nothing goes on it before that.
   */
  private preempt: Duplex | undefined;

  private holdPreempt(channel: Duplex): void {
    // A failure before postcopy shows as a destroyed channel then (requests use the main channel).
    channel.on('error', () => {});
    this.preempt = channel;
  }

  /**
   * In postcopy the preempt channel belongs to a page server thread: requests a livemig
   * destination writes on that channel are answered there without this thread's event loop, and
   * requests from the return path are handed to it. It boots with the migration.
   */
  private pageServer: PageServer | undefined;

  /** Postcopy (and each recovery): hand the preempt channel (a socket) to the page server. */
  private startPageServer(): void {
    const socket = this.preempt;
    this.preempt = undefined;
    if (socket === undefined || this.pageServer === undefined) return;
    if (!(socket instanceof net.Socket) || socket.destroyed) {
      socket.destroy();
      return;
    }
    // A thread that failed (its error paused the migration) is replaced for the new connection.
    if (this.pageServer.exited) {
      this.pageServerBefore.bytes += this.pageServer.bytes;
      this.pageServerBefore.requests += this.pageServer.requests;
      this.pageServer = new PageServer(this.o.guest, this.o.realtimePostcopy === true, (reason) => this.onPreemptLost(reason));
    }
    const { fd, pending } = detachFd(socket);
    this.pageServer.attach(fd, socket.remoteFamily !== undefined, pending);
    if (this.pageServer.realtimeRefused && !this.realtimeRefusalTold) {
      this.realtimeRefusalTold = true;
      this.o.log.warn({}, '--realtime-postcopy: the page server could not run under SCHED_FIFO (it needs CAP_SYS_NICE), so it runs at the normal policy');
    }
  }

  private realtimeRefusalTold = false;

  /** Figures of page server threads that failed and were replaced. */
  private readonly pageServerBefore = { bytes: 0, requests: 0 };

  /** The page server lets go of its connection: after EOS at the end, or at once when the link broke. */
  private async stopPageServer(end: boolean): Promise<void> {
    const server = this.pageServer;
    if (server === undefined || !server.attached) return;
    if (end) await server.end();
    else await server.detach();
  }

  /** The preempt channel broke: pause, as for a break of the main channel. */
  private onPreemptLost(reason: string): void {
    this.o.log.warn({ reason }, 'the preempt channel broke');
    this.out.fail(new Error(reason));
    this.channel.destroy();
    this.wake?.();
  }

  /**
   * Send every queued requested page that is still to be sent: through the page server when it
   * has the preempt channel (at once, never behind background pages), else in `w`.
   */
  private serveRequests(w: BatchWriter): void {
    const q = this.requests;
    if (q.length === 0) return;
    if (this.pageServer?.attached === true) {
      // As QEMU: a page already sent is not sent again (a QEMU destination fails on a second copy).
      for (let i = 0; i < q.length; i += 2) if (this.ram.takeRequested(q[i]!, q[i + 1]!)) this.pageServer.forwardRequest(q[i]!, q[i + 1]!);
      q.length = 0;
      return;
    }
    for (let i = 0; i < q.length; i += 2) this.ram.sendRequested(w, q[i]!, q[i + 1]!);
    q.length = 0;
  }

  private sleepOrWake(ms: number): Promise<void> {
    void this.out.failed().then(() => this.wake?.());
    return new Promise((resolve) => {
      const t = setTimeout(done, ms);
      function done(): void {
        clearTimeout(t);
        resolve();
      }
      this.wake = () => {
        this.wake = undefined;
        done();
      };
    });
  }

  private onPageRequest(block: string, start: number, length: number): void {
    const blocks = this.o.guest.ram.blocks;
    const index = blocks.findIndex((b) => b.idstr === block);
    const b = blocks[index];
    if (b === undefined || start + length > b.length) {
      throw new Error(`page request for ${b === undefined ? `unknown block "${block}"` : `0x${start.toString(16)}+0x${length.toString(16)} outside "${block}"`}`);
    }
    if (!this.inPostcopy) throw new Error('page request before postcopy started');
    for (let p = start / TARGET_PAGE_SIZE; p < (start + length) / TARGET_PAGE_SIZE; p++) this.requests.push(index, p);
    this.requestCount++;
    // With a preempt channel the page goes out right away, from the return-path handler itself.
    if (this.pageServer?.attached === true && this.status === 'postcopy-active') this.serveRequests(this.w);
    this.wake?.();
  }

  // ---- return path ------------------------------------------------------------------------------

  private newReturnPathDecoder(): ReturnPathDecoder {
    const blocks = this.o.guest.ram.blocks;
    return new ReturnPathDecoder({
      livemigExtensions: true,
      bitmapBytes: (name) => {
        const b = blocks.find((x) => x.idstr === name);
        return b === undefined ? undefined : recvBitmapBytes(b.pageCount);
      },
    });
  }

  private startReturnPath(): void {
    const rp = this.rp!;
    this.channel.on('data', (chunk: Buffer) => {
      this.lastRpAt = this.now();
      try {
        rp.push(chunk);
        for (let m = rp.next(); m !== NEED_MORE_RP; m = rp.next()) {
          switch (m.type) {
            case RpMsg.SHUT:
              this.shutStatus = m.value!;
              this.shutWaiter?.();
              break;
            case RpMsg.PONG:
              if (m.value! <= 4 && !this.pongAt.has(m.value!)) this.pongAt.set(m.value!, this.now());
              break;
            case RpMsg.REQ_PAGES_ID:
            case RpMsg.REQ_PAGES:
              this.onPageRequest(m.block!, m.start!, m.pageLength!);
              break;
            case RP_LIVEMIG_EXT:
              this.onExtension(m.payload!);
              break;
            case RpMsg.RECV_BITMAP:
              if (this.status !== 'postcopy-recover') throw new Error('RECV_BITMAP outside postcopy recovery');
              this.recovery?.bitmap(m.block!, m.bitmap!);
              break;
            case RpMsg.RESUME_ACK:
              if (this.status !== 'postcopy-recover') throw new Error('RESUME_ACK outside postcopy recovery');
              this.recovery?.acked();
              break;
            default:
              throw new Error(`unexpected return-path message ${m.name}`);
          }
        }
      } catch (err) {
        this.out.fail(new Error(`return path: ${(err as Error).message}`));
      }
    });
  }

  private onExtension(payload: Buffer): void {
    const msg = decodeLivemigExt(payload);
    if (msg.kind === 'request-batch') {
      this.onRequestBatch(payload);
    } else if (msg.kind === 'error') {
      this.destinationError = msg;
      this.reasonWaiter?.();
    }
    // An extension we cannot read is ignored, as QEMU ignores what it does not need.
  }

  /** A batch of page requests in compressed page indices (see encodeRequestBatch). */
  private onRequestBatch(p: Buffer): void {
    decodeRequestBatch(p, (block, page) => this.onPageRequest(block, page * TARGET_PAGE_SIZE, TARGET_PAGE_SIZE));
  }

  private waitForShut(): Promise<void> {
    return new Promise((resolve, reject) => {
      const check = (): boolean => {
        if (this.shutStatus === undefined) return false;
        this.shutWaiter = undefined;
        if (this.shutStatus === 0) resolve();
        else reject(new Error(`destination reported status ${this.shutStatus}`));
        return true;
      };
      if (check()) return;
      this.shutWaiter = () => void check();
      void this.out.failed().then((err) => {
        if (!check()) reject(new Error(`the return path closed before the destination confirmed: ${err.message}`));
      });
    });
  }
}

