// The migration thread before the switchover (QEMU's migration thread, wire-format.md §7.1, §9):
// setup, PART sections under the rate limit until what is left fits the downtime limit, then
// stop-and-copy. It tells the machine what it has done (setupSent, switchoverStarted,
// finalStateSent) and stops as soon as the machine has moved elsewhere (cancel, failure).
//
//   setup:  header, configuration, OPEN_RETURN_PATH, PING(1), START sections
//   active: PART sections (RAM, then other iterative devices) … decideNext says switch over
//   stop:   guest stopped, END sections, FULL device sections, EOF, VMDESCRIPTION

import type { PositionedFileChannel } from '@livemig/runtime';
import { iterationDeadline, type MappedRamBlock } from './ram-saver.ts';
import {
  BatchWriter,
  LIVEMIG_HELLO_PING,
  maySwitchOver,
  MigCmd,
  mappedRamPlace,
  RamFlag,
  TARGET_PAGE_SIZE,
  toQemuJson,
  type VmdescDevice,
  writeCommand,
  writeConfiguration,
  writeEof,
  writeEos,
  writeMappedRamHeader,
  writePing,
  writePostcopyAdvise,
  writeSectionFooter,
  writeSectionHeader,
  writeStreamHeader,
  writeVmdescription,
} from '@livemig/protocol';
import { BATCH_BYTES, ramBatchBytes } from './batch-size.ts';
import { BUFFER_DELAY_MS, decideNext } from './convergence.ts';
import { type OutgoingMigration, RAM_SECTION_ID } from './migration.ts';

/** QEMU's MAX_WAIT: one PART section spends at most this long sending. */
export const MAX_ITERATION_MS = 50;
/** While nothing is pending but the switchover does not fit yet: the pause between turns. */
const NOTHING_PENDING_POLL_MS = 10;
/** Bytes one PART section of a non-RAM iterative device may carry. */
const DEVICE_PART_BYTES = 1024 * 1024;
/** A FULL section's framing around its data: header with an idstr of up to 255 bytes, and footer. */
const DEVICE_SECTION_OVERHEAD = 1 + 4 + 1 + 255 + 4 + 4 + 1 + 4;
/** Section ids of the non-iterative devices' FULL sections. */
const FIRST_DEVICE_SECTION_ID = 100;

/** One turn of the event loop (about a microsecond when idle). */
export function yieldToIo(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}

export class Precopy {
  private readonly m: OutgoingMigration;
  /** Pages newly dirty per second, at the last sync. */
  dirtyRate = 0;
  pagesPerSecond = 0;
  precopyBytes = 0;
  downtimeBytes = 0;
  /** Where the switchover's time went (ms since the guest was stopped, at the end of each step). */
  readonly switchoverPhases = { stopMs: 0, syncedMs: 0, ramSentMs: 0, devicesSavedMs: 0, allSentMs: 0 };
  private lastSyncTime: number;
  /** When nothing was first found pending (ms), for decideNext's grace. */
  private nothingPendingSince: number | undefined;
  /** When the devices' trial save last ran (ms): at most once per bandwidth window. */
  private deviceSaveMeasuredAt = -Infinity;
  /** Keepalive PINGs asked for by the machine, written before the next PART section. */

  constructor(m: OutgoingMigration) {
    this.m = m;
    this.lastSyncTime = m.connectedAt;
  }

  async setup(): Promise<void> {
    const m = this.m;
    const w = m.w;
    writeStreamHeader(w);
    // QEMU 7.2 sends configuration/uuid only when the guest has one and validate-uuid is on.
    const uuid = m.o.capabilities['validate-uuid'] ? m.o.uuid : undefined;
    const mapped = m.o.capabilities['mapped-ram'];
    // cpr-exec: RAM stays in shared memory, marked as QEMU marks it (capability x-ignore-shared).
    const capabilities = m.o.cprExec !== undefined ? ['x-ignore-shared'] : mapped ? ['mapped-ram'] : [];
    if (m.dialect.configuration) {
      writeConfiguration(w, { machineType: m.o.machineType, ...(capabilities.length > 0 ? { capabilities } : {}), ...(uuid === undefined ? {} : { uuid }) });
    }
    if (m.state.returnPath) {
      writeCommand(w, MigCmd.OPEN_RETURN_PATH);
      writePing(w, 1);
      // Harmless to a QEMU destination (it echoes it); tells a livemig one it may send its
      // error details before SHUT.
      writePing(w, LIVEMIG_HELLO_PING);
    }
    if (m.o.capabilities['postcopy-ram']) writePostcopyAdvise(w, { hostPageSizeSummary: TARGET_PAGE_SIZE, targetPageSize: TARGET_PAGE_SIZE });
    writeSectionHeader(w, { kind: 'start', sectionId: RAM_SECTION_ID, idstr: 'ram', instanceId: 0, versionId: 4 });
    if (mapped) await this.writeMappedRamList();
    else m.ram.saveSetup(w);
    // Either dialect syncs multifd here: the destination must have set up RAM before any page lands.
    await this.multifdSync(true);
    writeEos(w);
    writeSectionFooter(w, RAM_SECTION_ID, this.m.dialect.sectionFooters);
    for (const { dev, sectionId } of m.others) {
      writeSectionHeader(w, { kind: 'start', sectionId, idstr: dev.idstr, instanceId: dev.instanceId, versionId: dev.versionId });
      dev.saveSetup(w);
      writeSectionFooter(w, sectionId, this.m.dialect.sectionFooters);
    }
    await m.flush();
    m.o.events.pass(1);
  }

  /**
   * Before a RAM section's EOS: with multifd synced per section, every channel gets its SYNC
   * packet. Synced per round, only where `always` says so (setup, and the last section, which
   * must not end with pages in flight), then with RAM_SAVE_FLAG_MULTIFD_FLUSH on the main channel.
   */
  async multifdSync(always = false): Promise<void> {
    const m = this.m;
    if (m.multifd === undefined) return;
    if (m.dialect.multifdFlush === 'per-section') {
      await m.multifd.sync();
    } else if (always) {
      m.ram.syncMultifd(m.w);
      await m.flush();
    }
  }

  /** QEMU 10.0's MIG_CMD_SWITCHOVER_START, for machine types that send it: the guest has stopped. */
  writeSwitchoverStart(): void {
    if (this.m.dialect.switchoverStart) writeCommand(this.m.w, MigCmd.SWITCHOVER_START);
  }

  /**
   * mapped-ram's block list (QEMU 9.0+): after each entry a MappedRamHeader naming where the
   * block's bitmap (right after it) and pages (1 MiB aligned after the bitmap) lie, and the stream
   * goes on after the pages. File offsets are exact once every stream byte so far is written.
   */
  private async writeMappedRamList(): Promise<void> {
    const m = this.m;
    const w = m.w;
    const file = m.channel as PositionedFileChannel;
    const blocks = m.guest.ram.blocks;
    w.be64(blocks.reduce((a, b) => a + b.length, 0) + RamFlag.MEM_SIZE);
    const placed: MappedRamBlock[] = [];
    for (const b of blocks) {
      w.cstr(b.idstr).be64(b.length);
      await m.flush();
      await m.out.settle();
      const place = mappedRamPlace(file.position, b.pageCount);
      writeMappedRamHeader(w, place);
      await m.flush();
      await m.out.settle();
      file.skipTo(place.pagesOffset + b.length);
      placed.push({ bitmapOffset: place.bitmapOffset, pagesOffset: place.pagesOffset, bitmap: new Uint8Array(place.bitmapBytes) });
    }
    m.ram.startDirtyLogging();
    m.ram.useMappedRam(file, placed);
  }

  /** Bytes of RAM encoded between two writes (ramBatchBytes), at the rate of the last 100 ms window or, before one, of the migration so far. */
  private get ramBatchBytes(): number {
    const m = this.m;
    const bytesPerMs = m.meter.bandwidth > 0 ? m.meter.bandwidth : m.meter.provisional(m.now());
    return ramBatchBytes(bytesPerMs, m.multifd?.channelCount ?? 0);
  }

  /** What every iterative device still has to send, cheaply estimated. */
  pending(): number {
    let n = this.m.ram.pendingEstimate();
    for (const { dev } of this.m.others) n += dev.pendingEstimate();
    return n;
  }

  /** Exact pending of every device (RAM: a dirty sync, with the bookkeeping each sync does). */
  private pendingExact(): number {
    let n = this.syncDirty();
    for (const { dev } of this.m.others) n += dev.pendingExact();
    return n;
  }

  /** Sync RAM's dirty log (dirty rate, auto-converge, MIGRATION_PASS); returns RAM's pending bytes. */
  syncDirty(): number {
    const m = this.m;
    const now = m.now();
    const added = m.ram.sync();
    // The switchover starts with one of these, with the guest stopped.
    m.switchoverCost.noteSync(m.now() - now);
    const pending = m.ram.pendingEstimate();
    const elapsed = (now - this.lastSyncTime) / 1000;
    if (elapsed > 0) this.dirtyRate = added / elapsed;
    this.lastSyncTime = now;
    m.converge.addDirty(added);
    m.o.events.pass(m.ram.stats.dirtySyncCount);
    m.o.log.debug(
      { pass: m.ram.stats.dirtySyncCount, newlyDirty: added, pending, sent: m.transferred, thresholdBytes: Math.round(m.switchoverThreshold()), ms: Math.round(now - m.startTime) },
      'dirty sync',
    );
    const p = m.o.parameters;
    const next = m.converge.onSync(
      now,
      m.transferred,
      TARGET_PAGE_SIZE,
      {
        throttleTriggerThreshold: p['throttle-trigger-threshold'],
        cpuThrottleInitial: p['cpu-throttle-initial'],
        cpuThrottleIncrement: p['cpu-throttle-increment'],
        maxCpuThrottle: p['max-cpu-throttle'],
        cpuThrottleTailslow: p['cpu-throttle-tailslow'],
      },
      m.o.capabilities['auto-converge'],
    );
    if (next !== undefined) {
      m.guest.vcpus.setThrottle(next);
      m.o.events.throttled?.(next);
      m.o.log.info({ percent: next }, 'auto-converge: vCPU throttle raised');
    }
    return pending;
  }

  /** PART sections until decideNext says to switch over; returns how. */
  async iterate(): Promise<'complete' | 'postcopy'> {
    const m = this.m;
    for (;;) {
      m.expect('active');
      let pending = this.pending();
      let threshold = m.switchoverThreshold();
      // The exact figure costs a dirty sync: ask for it only when the estimate says we may be done
      // (nothing known to be dirty is such a case: the guest may have dirtied much since the last sync).
      if (pending === 0 || pending < threshold) {
        pending = this.pendingExact();
        this.measureDeviceSave();
        threshold = m.switchoverThreshold(pending === 0);
        if (pending === 0) this.nothingPendingSince ??= m.now();
      }
      m.expectedDowntime = m.expectDowntime(pending);
      const converged = pending === 0 || pending < threshold;
      // May raise downtime-limit, ask for postcopy (decideNext below starts it) or cancel (the
      // next expect() stops this thread). Converged but not acknowledged: only the ack is awaited.
      m.policy.turn(pending, converged && !maySwitchOver(m.state, m.guest.running) ? 'awaiting-ack' : 'iterating');
      m.expect('active');
      threshold = m.switchoverThreshold(pending === 0);
      // With postcopy-ram, RAM may go after the switch; other iterative devices must go before.
      let mustPrecopy = pending;
      if (m.o.capabilities['postcopy-ram']) {
        mustPrecopy = 0;
        for (const { dev } of m.others) mustPrecopy += dev.pendingEstimate();
      }
      const canSwitchover = maySwitchOver(m.state, m.guest.running);
      const step = decideNext({
        pendingBytes: pending,
        thresholdBytes: threshold,
        mustPrecopyBytes: mustPrecopy,
        postcopyRequested: m.state.postcopyRequested,
        inPostcopy: false,
        canSwitchover,
        ...(this.nothingPendingSince === undefined ? {} : { nothingPendingForMs: m.now() - this.nothingPendingSince }),
      });
      if (step !== 'iterate') {
        m.switchoverPlan = { limitMs: m.o.parameters['downtime-limit'], expectedMs: m.expectedDowntime, pendingBytes: pending, cost: m.switchoverCost.cost, bytesPerMs: m.planBytesPerMs(pending === 0) };
        return step;
      }
      await this.partSection();
      await this.devicePartSections();
      // Converged but waiting for the destination's SWITCHOVER_ACK: no busy loop while nothing is dirty.
      if (!canSwitchover && (pending === 0 || pending < threshold)) await m.watch.next(MAX_ITERATION_MS);
      // Nothing pending, waiting for the fixed costs to fit: a turn (a dirty sync, an empty
      // section) every few ms, not thousands a second.
      else if (pending === 0) await m.watch.next(NOTHING_PENDING_POLL_MS);
    }
  }

  /**
   * A trial save of the non-iterative devices (they only read their state): how long it takes
   * and how many bytes it makes, with the iterative devices' FULL sections, for the plan.
   */
  private measureDeviceSave(): void {
    const m = this.m;
    const started = m.now();
    if (started - this.deviceSaveMeasuredAt < BUFFER_DELAY_MS) return;
    this.deviceSaveMeasuredAt = started;
    let bytes = 0;
    for (const { dev } of m.others) if (dev.saveState !== undefined) bytes += (dev.stateLength ?? 0) + DEVICE_SECTION_OVERHEAD;
    for (const dev of m.guest.devices) bytes += dev.save().length + DEVICE_SECTION_OVERHEAD;
    m.switchoverCost.noteDeviceSave(m.now() - started, bytes);
  }

  /** One PART section per other iterative device, under the same rate limit. */
  private async devicePartSections(): Promise<void> {
    const m = this.m;
    const w = m.w;
    for (const { dev, sectionId } of m.others) {
      if (dev.pendingEstimate() === 0) continue;
      m.expect('active');
      const allowance = m.limiter.allowance(m.now());
      if (allowance <= 0) return;
      const before = w.totalBytes;
      writeSectionHeader(w, { kind: 'part', sectionId });
      dev.saveIterate(w, Math.min(DEVICE_PART_BYTES, allowance));
      writeSectionFooter(w, sectionId, this.m.dialect.sectionFooters);
      const bytes = w.totalBytes - before;
      m.limiter.consume(bytes);
      m.meter.add(bytes);
      this.precopyBytes += bytes;
      await m.flush();
    }
  }

  /** One PART section: pages until the rate limit, 50 ms, or no dirty page is left. */
  private async partSection(): Promise<void> {
    const m = this.m;
    const w = m.w;
    const started = m.now();
    // Its PONG proves the link end to end (QEMU 7.2 answers PINGs too once the return path is open).
    m.keepalivePings.writeDue(w, m.now());
    writeSectionHeader(w, { kind: 'part', sectionId: RAM_SECTION_ID });
    const deadline = iterationDeadline(m.now, started, MAX_ITERATION_MS);
    const pagesBefore = this.pagesSent();
    for (;;) {
      m.expect('active');
      const allowance = m.limiter.allowance(m.now());
      // Over the line: end this section here and sleep until a batch fits.
      if (allowance < Math.min(BATCH_BYTES, m.limiter.burstBytes) && !m.limiter.unlimited) break;
      const before = m.ram.encodedBytes(w);
      const empty = m.ram.saveIterate(w, Math.min(this.ramBatchBytes, allowance), deadline);
      const bytes = m.ram.encodedBytes(w) - before;
      m.limiter.consume(bytes);
      m.meter.add(bytes);
      this.precopyBytes += bytes;
      await m.flush();
      if (empty || deadline()) break;
      // A socket that takes every batch at once never makes us wait: let QMP and the return path in.
      await yieldToIo();
    }
    await this.multifdSync();
    writeEos(w);
    writeSectionFooter(w, RAM_SECTION_ID, this.m.dialect.sectionFooters);
    await m.flush();
    const now = m.now();
    if (now > started) this.pagesPerSecond = ((this.pagesSent() - pagesBefore) * 1000) / (now - started);
    m.meter.update(now);
    await this.sleepWhileActive(m.limiter.delayFor(Math.min(BATCH_BYTES, m.limiter.burstBytes), now));
  }

  private pagesSent(): number {
    const s = this.m.ram.stats;
    return s.normal + s.duplicate + s.xbzrlePages;
  }

  /** The rate limit's pause, cut short only when the machine leaves `active` (a cancel, a failure). */
  private async sleepWhileActive(ms: number): Promise<void> {
    const m = this.m;
    const until = m.now() + ms;
    while (m.state.status === 'active' && m.now() < until) await m.watch.next(until - m.now());
  }

  /** The switchover: stop the guest (STOP event) and start counting downtime. */
  async stopGuest(): Promise<void> {
    const m = this.m;
    m.stopTime = m.now();
    // cpr-exec: the new image runs the guest on only if it runs now (QEMU's global_state_store).
    if (m.o.cprExec !== undefined) m.guest.globalState.runstate = m.guest.running ? 'running' : 'paused';
    if (m.guest.running) {
      await m.guest.stop('finish-migrate');
      this.switchoverPhases.stopMs = m.now() - m.stopTime;
      m.switchoverCost.noteStop(this.switchoverPhases.stopMs);
      m.o.events.stop();
    } else {
      m.guest.setRunState('finish-migrate');
    }
  }

  /** END sections of the iterative devices other than RAM (everything they still hold). */
  async endOtherDevices(): Promise<void> {
    const m = this.m;
    for (const { dev, sectionId } of m.others) {
      writeSectionHeader(m.w, { kind: 'end', sectionId });
      while (!dev.saveComplete(m.w, BATCH_BYTES)) await m.flush();
      writeSectionFooter(m.w, sectionId, this.m.dialect.sectionFooters);
    }
  }

  /**
   * One FULL section per non-iterative device into `w`, after the save_state FULL sections of the
   * iterative devices that have one (a VFIO device's config, under its own section id, as QEMU
   * sends it); returns their VMDESCRIPTION entries.
   */
  writeDeviceSections(w: BatchWriter): VmdescDevice[] {
    const described: VmdescDevice[] = [];
    for (const { dev, sectionId } of this.m.others) {
      if (dev.saveState === undefined) continue;
      writeSectionHeader(w, { kind: 'full', sectionId, idstr: dev.idstr, instanceId: dev.instanceId, versionId: dev.versionId });
      const before = w.totalBytes;
      dev.saveState(w);
      const size = w.totalBytes - before;
      writeSectionFooter(w, sectionId, this.m.dialect.sectionFooters);
      // QEMU describes a save_state section as one buffer of its size.
      described.push({ name: dev.idstr, instance_id: dev.instanceId, size, fields: [{ name: 'data', type: 'buffer', size }] });
    }
    let sectionId = FIRST_DEVICE_SECTION_ID;
    for (const dev of this.m.guest.devices) {
      const data = dev.save();
      writeSectionHeader(w, { kind: 'full', sectionId, idstr: dev.idstr, instanceId: dev.instanceId, versionId: dev.versionId });
      w.bytes(data);
      writeSectionFooter(w, sectionId++, this.m.dialect.sectionFooters);
      described.push(dev.describe(data.length));
    }
    return described;
  }

  /** Stop-and-copy: the guest pauses, everything left goes out unthrottled, then the destination confirms. */
  async complete(): Promise<void> {
    const m = this.m;
    const w = m.w;
    await this.stopGuest();
    m.expect('active');
    m.dispatch({ type: 'switchoverStarted', postcopy: false });
    await m.holdBeforeSwitchover();
    m.expect('active', 'device');
    // After the hold, as QEMU sends it: the switchover really starts now.
    this.writeSwitchoverStart();
    this.syncDirty();
    const phases = this.switchoverPhases;
    phases.syncedMs = m.now() - m.stopTime;
    const startBytes = m.transferred;
    writeSectionHeader(w, { kind: 'end', sectionId: RAM_SECTION_ID });
    for (;;) {
      m.expect('active', 'device');
      const empty = m.ram.saveComplete(w, this.ramBatchBytes);
      await m.flush();
      if (empty) break;
    }
    await this.multifdSync(true);
    writeEos(w);
    writeSectionFooter(w, RAM_SECTION_ID, this.m.dialect.sectionFooters);
    phases.ramSentMs = m.now() - m.stopTime;
    await this.endOtherDevices();
    const described = this.writeDeviceSections(w);
    phases.devicesSavedMs = m.now() - m.stopTime;
    writeEof(w);
    const prefixed = [...m.others.map((o) => o.dev), ...m.guest.devices]
      .filter((d) => d.layout === 'be32-prefixed')
      .map((d) => ({ name: d.idstr, instance_id: d.instanceId }));
    const desc: Record<string, unknown> = { page_size: TARGET_PAGE_SIZE, devices: described };
    if (prefixed.length > 0) desc['livemig'] = { prefixed };
    writeVmdescription(w, toQemuJson(desc));
    m.expect('active', 'device');
    // With a return path the destination's SHUT completes the migration; it may come as soon
    // as these last bytes are out, so the machine waits for it from here on.
    if (m.state.returnPath) m.dispatch({ type: 'finalStateSent' });
    await m.flush();
    phases.allSentMs = m.now() - m.stopTime;
    this.downtimeBytes = m.transferred - startBytes;
    m.o.log.debug({ ms: Math.round(m.now() - m.startTime), stopMs: Math.round(m.now() - m.stopTime), downtimeBytes: this.downtimeBytes }, 'final state sent');
    if (!m.state.returnPath) {
      await Promise.all([m.out.end(), m.multifd?.end()]);
      m.dispatch({ type: 'finalStateSent' });
    }
  }
}
