// QEMU's side of a VFIO device (hw/vfio/migration.c of QEMU 7.2, migration region v1), as an
// iterative migration device: it drives a VfioV1Region only through its registers and data area,
// and frames what it reads the way QEMU does (vfio-framing.ts), so a livemig stream carries this
// device as a QEMU stream carries a vfio-pci device.
//
//   source:  saveSetup     _RUNNING → _SAVING|_RUNNING; SETUP | END                   (START)
//            saveIterate   one buffer: DATA | size | data | END  (DATA | 0 | END when none)  (PART)
//                          with switchover-ack, the PART that completes the initial data (what was
//                          pending at setup, or pending down to 0) ends in INIT_DATA_SENT instead
//            guest stops   _SAVING|_RUNNING → _SAVING        (QEMU's vm state change handler)
//            saveComplete  buffers until pending_bytes is 0, END; then _STOP            (END)
//            saveState     CONFIG | register file | END                               (FULL, same section id)
//            cleanup       drop _SAVING (a cancel or failure leaves the device running again)
//   dest:    setup frame   → _RESUMING; data frames → data_offset, data, data_size; config → registers;
//            INIT_DATA_SENT → loadState says so (the destination's switchover-ack count)
//            guest starts  → _RUNNING (from _RESUMING, or from a save that failed)

import { createHash } from 'node:crypto';
import {
  type BatchWriter,
  readVfioSection,
  sizeOfVfioConfig,
  type VfioFrameHandler,
  writeVfioConfig,
  writeVfioDataHeader,
  writeVfioEndOfState,
  writeVfioInitDataSent,
  writeVfioSetup,
} from '@livemig/protocol';
import { DeviceLoadError } from './devices.ts';
import type { IterativeDevice, IterativeLoader } from './iterative.ts';
import { VFIO_REGISTER_BYTES, VfioMigInfo, VfioV1Region, type VfioV1RegionOptions, VfioV1State, vfioV1StateIsError } from './vfio-v1-region.ts';

/** What query-migrate shows of the device (livemig's `x-vfio`). */
export interface VfioMigrationStats {
  /** Device data bytes sent (QEMU's `vfio.transferred`: the DATA payloads). */
  transferredBytes: number;
  /** PART sections that carried device data while the device ran. */
  precopyIterations: number;
  precopyBytes: number;
  /** Device data sent with the device stopped (the END section). */
  stopCopyBytes: number;
  /** Register file bytes (the FULL config section). */
  configBytes: number;
}

export class VfioDevice implements IterativeDevice, IterativeLoader {
  readonly idstr = 'livemig/vfio';
  readonly instanceId = 0;
  readonly versionId = 1;
  readonly layout = { framing: 'vfio', configBytes: VFIO_REGISTER_BYTES } as const;
  readonly region: VfioV1Region;
  readonly stats: VfioMigrationStats = { transferredBytes: 0, precopyIterations: 0, precopyBytes: 0, stopCopyBytes: 0, configBytes: 0 };
  /** QEMU's data_buffer: one device buffer at a time, reused (no allocation per buffer). */
  private readonly buffer: Buffer;
  /** pending_bytes as last read: the cheap estimate. */
  private pendingBytes = 0;
  private timer: NodeJS.Timeout | undefined;
  /**
   * Capability switchover-ack (QEMU 8.1+'s VFIO side): mark the end of the initial data. The v1
   * region has no precopy_init_size, so the initial data is what was pending at setup.
   */
  initDataMarker = false;
  /** Initial data still to send (bytes), and whether INIT_DATA_SENT went out. */
  private initRemaining = 0;
  private initDataSent = false;
  private readonly onData: VfioFrameHandler = { onData: (src, offset, length) => this.resumeBuffer(src, offset, length), onConfig: (src, offset, length) => this.loadConfig(src, offset, length) };

  constructor(options: VfioV1RegionOptions = {}) {
    this.region = new VfioV1Region(options);
    this.buffer = Buffer.allocUnsafe(this.region.dataAreaBytes);
  }

  /** Device memory (the region's), for digests and tests. */
  get memory(): Buffer {
    return this.region.memory;
  }

  get registers(): Buffer {
    return this.region.registers;
  }

  /** In the error state: the vCPUs may still start and stop; the device stays as it is until reset. */
  private get broken(): boolean {
    return vfioV1StateIsError(this.state);
  }

  private get state(): number {
    return this.region.read(VfioMigInfo.DEVICE_STATE, 4);
  }

  /** QEMU's vfio_migration_set_state(mask, value): keep the bits in `mask`, then set `value`. */
  private setState(mask: number, value: number): void {
    this.region.write(VfioMigInfo.DEVICE_STATE, 4, (this.state & mask) | value);
  }

  /**
   * The guest runs: the device is _RUNNING and nothing else (QEMU 7.2 clears _RESUMING after a
   * resume and _SAVING after a failed save the same way); it works (≤ 0.8 MB/s of dirty chunks).
   */
  start(): void {
    if (!this.broken) this.setState(0, VfioV1State.RUNNING);
    if (this.timer !== undefined) return;
    this.timer = setInterval(() => this.region.tick(), 20);
    this.timer.unref();
  }

  /** The guest stops: clear _RUNNING (a pre-copying device goes to stop-and-copy). */
  stop(): void {
    clearInterval(this.timer);
    this.timer = undefined;
    if (!this.broken) this.setState(~VfioV1State.RUNNING & VfioV1State.MASK, 0);
  }

  private readPending(): number {
    this.pendingBytes = this.region.read(VfioMigInfo.PENDING_BYTES, 8);
    return this.pendingBytes;
  }

  saveSetup(w: BatchWriter): void {
    this.setState(VfioV1State.MASK, VfioV1State.SAVING);
    Object.assign(this.stats, { transferredBytes: 0, precopyIterations: 0, precopyBytes: 0, stopCopyBytes: 0, configBytes: 0 });
    this.initRemaining = this.readPending();
    this.initDataSent = false;
    writeVfioSetup(w);
  }

  /** END_OF_STATE, or INIT_DATA_SENT once the initial data is out (switchover-ack). */
  private closeIterate(w: BatchWriter, pending: number): void {
    if (this.initDataMarker && !this.initDataSent && (this.initRemaining <= 0 || pending === 0)) {
      this.initDataSent = true;
      writeVfioInitDataSent(w);
    } else {
      writeVfioEndOfState(w);
    }
  }

  pendingEstimate(): number {
    return this.pendingBytes;
  }

  /**
   * QEMU's state_pending split: the estimate is the last pending_bytes read; the exact figure
   * reads the register again, but only when it can matter (the device is stopped, so nothing
   * more will come, or the estimate is down to about one buffer).
   */
  pendingExact(): number {
    const running = (this.state & VfioV1State.RUNNING) !== 0;
    if (!running || this.pendingBytes <= this.region.dataAreaBytes) return this.readPending();
    return this.pendingBytes;
  }

  /** One device buffer: read data_offset, data_size, the data; DATA | size | data. Returns its size. */
  private saveBuffer(w: BatchWriter): number {
    const offset = this.region.read(VfioMigInfo.DATA_OFFSET, 8);
    const size = this.region.read(VfioMigInfo.DATA_SIZE, 8);
    writeVfioDataHeader(w, size);
    if (size > 0) {
      this.region.readData(offset, this.buffer, 0, size);
      w.copyFrom(this.buffer, 0, size);
    }
    this.stats.transferredBytes += size;
    return size;
  }

  /** QEMU 7.2 sends at most one buffer per iteration; `maxBytes` is at least one data area here. */
  saveIterate(w: BatchWriter, maxBytes: number): boolean {
    void maxBytes;
    if (this.pendingBytes === 0 && this.readPending() === 0) {
      writeVfioDataHeader(w, 0);
      this.closeIterate(w, 0);
      return true;
    }
    const size = this.saveBuffer(w);
    this.initRemaining -= size;
    // Step f: the buffer is taken, and the new figure is the estimate.
    const pending = this.readPending();
    this.closeIterate(w, pending);
    if (size > 0) {
      this.stats.precopyIterations++;
      this.stats.precopyBytes += size;
    }
    return pending === 0;
  }

  /** Stop-and-copy: buffers until pending_bytes is 0, then END and _STOP. Call until true. */
  saveComplete(w: BatchWriter, maxBytes: number): boolean {
    if ((this.state & VfioV1State.RUNNING) !== 0) this.setState(~VfioV1State.RUNNING & VfioV1State.MASK, VfioV1State.SAVING);
    let sent = 0;
    while (this.readPending() > 0) {
      if (sent >= maxBytes) return false;
      const size = this.saveBuffer(w);
      this.stats.stopCopyBytes += size;
      sent += size;
      if (size === 0) break;
    }
    writeVfioEndOfState(w);
    this.setState(~VfioV1State.SAVING & VfioV1State.MASK, 0);
    return true;
  }

  /** The config section (QEMU's save_state): the register file. */
  saveState(w: BatchWriter): void {
    writeVfioConfig(w, this.region.registers);
    this.stats.configBytes += this.region.registers.length;
  }

  /** Bytes saveState writes. */
  get stateLength(): number {
    return sizeOfVfioConfig(VFIO_REGISTER_BYTES);
  }

  cleanup(): void {
    // A cancel or failure ends the save (QEMU 7.2's notifier also sets _RUNNING then; here
    // _RUNNING follows the vCPUs, which run again right after).
    const s = this.state;
    if ((s & VfioV1State.SAVING) !== 0 && !this.broken) this.setState(~VfioV1State.SAVING & VfioV1State.MASK, 0);
  }

  /** Load one section's data; true when it ended with INIT_DATA_SENT (its initial data is all here). */
  loadState(data: Buffer, versionId: number): boolean {
    if (versionId !== 1) throw new DeviceLoadError(this.idstr, `stream version ${versionId} is not 1`);
    try {
      const s = readVfioSection(data, 0, data.length, { maxDataBytes: this.region.dataAreaBytes }, this.onData);
      if (s.phase === 'setup') this.setState(0, VfioV1State.RESUMING);
      return s.initDataSent;
    } catch (err) {
      if (err instanceof DeviceLoadError) throw err;
      throw new DeviceLoadError(this.idstr, `${(err as { code?: string }).code ?? 'error'}: ${(err as Error).message}`, err);
    }
  }

  private resumeBuffer(src: Buffer, offset: number, length: number): void {
    if (length === 0) return;
    const at = this.region.read(VfioMigInfo.DATA_OFFSET, 8);
    this.region.writeData(at, src, offset, length);
    this.region.write(VfioMigInfo.DATA_SIZE, 8, length);
    this.stats.transferredBytes += length;
  }

  private loadConfig(src: Buffer, offset: number, length: number): void {
    if (length !== VFIO_REGISTER_BYTES) throw new DeviceLoadError(this.idstr, `config of ${length} bytes, expected ${VFIO_REGISTER_BYTES}`);
    src.copy(this.region.registers, 0, offset, offset + length);
    this.stats.configBytes += length;
  }

  /** sha256 of device memory and registers. */
  digest(): string {
    return createHash('sha256').update(this.region.memory).update(this.region.registers).digest('hex');
  }
}
