// The guest: RAM blocks, vCPUs running a workload, devices, a clock and a run state, with the
// digest that proves a migration consistent (block hashes + the incrementer pattern check).

import { Worker } from 'node:worker_threads';
import { createHash } from 'node:crypto';
import { type ForeignMachine, TARGET_PAGE_SIZE } from '@livemig/protocol';
import { CarriedDevice } from './carried-device.ts';
import { formatWorkload, type Workload } from './control.ts';
import { AppDevice, type Device, GlobalStateDevice, GuestClock, TimerDevice, VcpuDevice } from './devices.ts';
import { type BlockConfig, GuestRam, parseSize, type RamAllocator } from './ram.ts';
import { VcpuSet } from './vcpus.ts';
import { VfioDevice } from './vfio-device.ts';
import { GuestConfigError } from './errors.ts';

export type Fill = 'zero' | 'random' | 'mixed';

export interface GuestConfig {
  /** RAM blocks; the first is the main block the workload runs on. */
  blocks: BlockConfig[];
  vcpus: number;
  workload: Workload;
  /** Initial RAM contents (source): all zero, random, or half zero pages and half random. */
  fill: Fill;
  /** Devices beyond QEMU's timer + globalstate: per-vCPU state and the application device. */
  livemigDevices: boolean;
  /**
   * A recorded QEMU machine type (--machine pc-q35-10.0, …): its devices, in QEMU's order, are
   * carried (CarriedDevice) except the timer and globalstate, which are ours.
   */
  qemuMachine?: ForeignMachine;
}

/** QEMU-style run states reported by query-status. */
export type GuestRunState = 'prelaunch' | 'running' | 'paused' | 'inmigrate' | 'postmigrate' | 'finish-migrate';

export interface GuestDigest {
  blocks: { idstr: string; length: number; sha256: string }[];
  pattern: { consistent: boolean | null; boundary: number | null; badPages: number[] };
  devices: {
    clockNs: string;
    runstate: string;
    appSha256: string | null;
    vfioSha256: string | null;
    /** The VFIO device's memory and register file apart, and its v1 device_state. */
    vfio: { memorySha256: string; registersSha256: string; deviceState: number } | null;
    vcpus: { position: number; passes: number }[];
    /** QEMU devices carried for a recorded machine type, in section order (empty otherwise). */
    carried: { idstr: string; instanceId: number; versionId: number; length: number; sha256: string; loaded: boolean }[];
  };
}

/** Default second block: small, like a video RAM next to the main RAM. */
export const SECOND_BLOCK: BlockConfig = { idstr: 'vga.vram', length: 4 * 2 ** 20 };

export function defaultBlocks(memoryBytes: number): BlockConfig[] {
  return [{ idstr: 'pc.ram', length: memoryBytes }, SECOND_BLOCK];
}

/**
 * A recorded QEMU machine type's RAM blocks as QEMU creates them for `memory` of guest RAM: the
 * main block (pc.ram) first, sized by -m, then the firmware and ROM blocks at their recorded
 * lengths.
 */
export function qemuMachineBlocks(machine: ForeignMachine, memory: string | undefined): BlockConfig[] {
  const main = machine.ramBlocks.find((b) => b.main === true);
  if (main === undefined) throw new GuestConfigError(`machine type ${machine.machineType}: the recording names no main RAM block`);
  return [
    { idstr: main.idstr, length: parseSize(memory ?? '256M') },
    ...machine.ramBlocks.filter((b) => b !== main).map((b) => ({ idstr: b.idstr, length: b.length })),
  ];
}

/** Parse --block NAME:SIZE (repeatable) or derive blocks from --memory. */
export function parseBlocks(memory: string | undefined, blocks: readonly string[]): BlockConfig[] {
  if (blocks.length === 0) return defaultBlocks(parseSize(memory ?? '256M'));
  return blocks.map((spec) => {
    const at = spec.lastIndexOf(':');
    if (at <= 0) throw new GuestConfigError(`--block "${spec}" is not NAME:SIZE`);
    return { idstr: spec.slice(0, at), length: parseSize(spec.slice(at + 1)) };
  });
}

function xorshiftFill(words: Uint32Array, seed: number): void {
  let x = seed >>> 0 || 1;
  for (let i = 0; i < words.length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    words[i] = x >>> 0;
  }
}

export class Guest {
  readonly config: GuestConfig;
  readonly ram: GuestRam;
  readonly vcpus: VcpuSet;
  readonly clock = new GuestClock();
  readonly globalState = new GlobalStateDevice();
  readonly app: AppDevice | undefined;
  /** The VFIO device behind a v1 migration region (livemig devices only). */
  readonly vfio: VfioDevice | undefined;
  readonly devices: Device[];
  private state: GuestRunState = 'prelaunch';
  private appTimer: NodeJS.Timeout | undefined;

  /** `allocateRam`: where RAM blocks live (default: fresh SharedArrayBuffers). */
  constructor(config: GuestConfig, allocateRam?: RamAllocator) {
    if (config.blocks.length === 0) throw new GuestConfigError('a guest needs at least one RAM block');
    if (!Number.isInteger(config.vcpus) || config.vcpus < 1 || config.vcpus > 64) throw new GuestConfigError(`--vcpus ${config.vcpus} is outside 1–64`);
    this.config = config;
    this.ram = new GuestRam(config.blocks, allocateRam);
    this.vcpus = new VcpuSet(config.vcpus, this.ram.blocks[0]!, config.workload);
    this.ram.waiterSlots = config.vcpus;
    // Threads start now, parked: starting the guest later (the destination, at the end of a
    // migration's downtime) must not wait for threads to boot.
    this.vcpus.spawn();
    this.devices = [new TimerDevice(this.clock)];
    if (config.livemigDevices) {
      for (let i = 0; i < config.vcpus; i++) this.devices.push(new VcpuDevice(i, this.vcpus));
      this.app = new AppDevice({
        kind: 'livemig-demo-app',
        bootedAt: new Date(),
        requests: 0,
        recent: [] as { at: number; n: number }[],
        tags: new Set(['demo', formatWorkload(config.workload)]),
        sessions: new Map([['admin', { since: Date.now(), roles: ['root'] }]]),
      });
      this.devices.push(this.app);
      this.vfio = new VfioDevice();
    } else {
      this.app = undefined;
      this.vfio = undefined;
    }
    this.devices.push(this.globalState);
    if (config.qemuMachine !== undefined) this.devices = this.qemuDevices(config.qemuMachine);
  }

  /** QEMU's device sections in its order: ours where we emulate the device, carried otherwise. */
  private qemuDevices(machine: ForeignMachine): Device[] {
    return machine.devices.map((d, i) => {
      if (d.name === 'timer' && d.instance_id === 0) return this.devices[0]!;
      if (d.name === 'globalstate' && d.instance_id === 0) return this.globalState;
      return new CarriedDevice(d, Buffer.from(machine.initialData[i] ?? '', 'hex'));
    });
  }

  get runState(): GuestRunState {
    return this.state;
  }

  /** Set by the migration code: inmigrate, postmigrate, finish-migrate. */
  setRunState(s: GuestRunState): void {
    this.state = s;
  }

  get running(): boolean {
    return this.state === 'running';
  }

  /** Fill RAM with the configured initial contents (source side, before the first run). */
  fillInitial(): void {
    const fill = this.config.fill;
    for (const [i, b] of this.ram.blocks.entries()) {
      if (fill === 'zero') continue;
      const words = new Uint32Array(b.memory);
      xorshiftFill(words, 0x2545f491 + i);
      this.ram.markAllWritten(i);
      if (fill === 'mixed') {
        // Every other pair of pages is zero, so zero-page detection has work to do.
        for (let p = 2; p < b.pageCount; p += 4) b.bytes.fill(0, p * TARGET_PAGE_SIZE, Math.min(b.pageCount, p + 2) * TARGET_PAGE_SIZE);
      }
    }
    if (this.config.workload.kind === 'incrementer') {
      // The incrementer owns byte 0 of every page of the main block: it starts uniform.
      const main = this.ram.blocks[0]!;
      for (let p = 0; p < main.pageCount; p++) if (main.bytes[p * TARGET_PAGE_SIZE] !== 0) main.bytes[p * TARGET_PAGE_SIZE] = 0;
    }
  }

  /**
   * Touch every page of RAM, in a worker. 'write' (destination, while it waits for the stream)
   * allocates it: first touch of fresh memory is ~10× slower than a copy here, so the transfer
   * must not pay for it, and RAM must not be written until this resolves. 'read' (source) only
   * maps never-written pages (to the kernel's zero page), as a booted guest's RAM is mapped, so
   * that the first migration pass does not pay a page fault per page either.
   */
  prefault(mode: 'read' | 'write'): Promise<void> {
    const memories = this.ram.blocks.map((b) => b.memory);
    const code = `
      const { workerData } = require('node:worker_threads');
      let sum = 0;
      for (const m of workerData.memories) {
        const a = new Int32Array(m);
        if (workerData.write) for (let i = 0; i < a.length; i += 1024) Atomics.add(a, i, 0);
        else for (let i = 0; i < a.length; i += 1024) sum += a[i];
      }`;
    return new Promise((resolve, reject) => {
      const w = new Worker(code, { eval: true, workerData: { memories, write: mode === 'write' } });
      w.once('error', reject);
      w.once('exit', () => resolve());
    });
  }

  /**
   * Keep RAM resident while waiting for a migration: this machine hands memory that stays
   * untouched for a few seconds back to the host, and touching it again costs a fault per page.
   * A worker reads one word per page every `periodMs`; call the returned function to stop it.
   * The worker starts only after the first period: RAM is warm then anyway (just prefaulted), and
   * a migration that comes at once (the usual case) does not share the cores with a thread's
   * start-up (~20 ms of CPU, a new isolate).
   */
  keepWarm(periodMs = 1000): () => void {
    const memories = this.ram.blocks.map((b) => b.memory);
    const stop = new Int32Array(new SharedArrayBuffer(4));
    const code = `
      const { workerData } = require('node:worker_threads');
      const stop = new Int32Array(workerData.stop);
      let sum = 0;
      while (Atomics.load(stop, 0) === 0) {
        for (const m of workerData.memories) { const a = new Int32Array(m); for (let i = 0; i < a.length; i += 1024) sum += a[i]; }
        Atomics.wait(stop, 0, 0, workerData.periodMs);
      }`;
    const startTimer = setTimeout(() => {
      const w = new Worker(code, { eval: true, workerData: { memories, stop: stop.buffer, periodMs } });
      w.unref();
    }, periodMs);
    startTimer.unref();
    return () => {
      clearTimeout(startTimer);
      Atomics.store(stop, 0, 1);
      Atomics.notify(stop, 0);
    };
  }

  async start(): Promise<void> {
    await this.vcpus.cont();
    this.clock.resume();
    this.vfio?.start();
    this.state = 'running';
    if (this.app !== undefined && this.appTimer === undefined) {
      // The application keeps working while the guest runs: its state changes under migration.
      this.appTimer = setInterval(() => this.tickApp(), 100);
      this.appTimer.unref();
    }
  }

  async stop(next: GuestRunState = 'paused'): Promise<void> {
    if (this.appTimer !== undefined) {
      clearInterval(this.appTimer);
      this.appTimer = undefined;
    }
    if (this.state === 'running') this.globalState.runstate = 'running';
    await this.vcpus.stop();
    this.vfio?.stop();
    this.clock.pause();
    this.state = next;
  }

  private tickApp(): void {
    const s = this.app!.state as { requests: number; recent: { at: number; n: number }[] };
    s.requests++;
    s.recent.push({ at: Date.now(), n: s.requests });
    if (s.recent.length > 16) s.recent.shift();
  }

  async destroy(): Promise<void> {
    if (this.appTimer !== undefined) clearInterval(this.appTimer);
    this.vfio?.stop();
    await this.vcpus.exit();
  }

  /** Block hashes (computed in a worker, off the event loop), pattern check and device state. */
  async digest(): Promise<GuestDigest> {
    const hashes = await hashBlocks(this.ram.blocks.map((b) => b.memory));
    const vcpus = Array.from({ length: this.config.vcpus }, (_, i) => {
      const s = this.vcpus.readState(i);
      return { position: s.position, passes: s.passes };
    });
    return {
      blocks: this.ram.blocks.map((b, i) => ({ idstr: b.idstr, length: b.length, sha256: hashes[i]! })),
      pattern:
        this.config.workload.kind === 'incrementer'
          ? checkIncrementer(this.ram.blocks[0]!.bytes, this.ram.blocks[0]!.pageCount, this.config.vcpus)
          : { consistent: null, boundary: null, badPages: [] },
      devices: {
        clockNs: this.clock.nowNs().toString(),
        runstate: this.globalState.loaded ?? this.globalState.runstate,
        appSha256: this.app === undefined ? null : createHash('sha256').update(this.app.encodeState()).digest('hex'),
        vfioSha256: this.vfio === undefined ? null : this.vfio.digest(),
        vfio:
          this.vfio === undefined
            ? null
            : {
                memorySha256: createHash('sha256').update(this.vfio.memory).digest('hex'),
                registersSha256: createHash('sha256').update(this.vfio.registers).digest('hex'),
                deviceState: this.vfio.region.deviceState,
              },
        vcpus,
        carried: this.devices
          .filter((d): d is CarriedDevice => d instanceof CarriedDevice)
          .map((d) => {
            const data = d.save();
            return { idstr: d.idstr, instanceId: d.instanceId, versionId: d.versionId, length: data.length, sha256: createHash('sha256').update(data).digest('hex'), loaded: d.loaded };
          }),
      },
    };
  }
}

/** sha256 of each SharedArrayBuffer, in a worker thread. */
export function hashBlocks(memories: SharedArrayBuffer[]): Promise<string[]> {
  const code = `
    const { workerData, parentPort } = require('node:worker_threads');
    const { createHash } = require('node:crypto');
    parentPort.postMessage(workerData.map((m) => createHash('sha256').update(new Uint8Array(m)).digest('hex')));`;
  return new Promise((resolve, reject) => {
    const w = new Worker(code, { eval: true, workerData: memories });
    w.once('message', (m: string[]) => resolve(m));
    w.once('error', reject);
  });
}

/**
 * QEMU's test-guest check: byte 0 of every page, in address order, equals the first page's
 * value up to one step-down-by-one boundary (per vCPU slice). A stale, lost or torn page
 * breaks it without any reference copy.
 */
export function checkIncrementer(
  bytes: Uint8Array,
  pageCount: number,
  vcpus: number,
): { consistent: boolean; boundary: number | null; badPages: number[] } {
  const bad: number[] = [];
  let boundary: number | null = null;
  for (let v = 0; v < vcpus; v++) {
    const first = Math.floor((v * pageCount) / vcpus);
    const end = Math.floor(((v + 1) * pageCount) / vcpus);
    let sliceBoundary: number | null = null;
    for (let p = first + 1; p < end; p++) {
      const prev = bytes[(p - 1) * TARGET_PAGE_SIZE]!;
      const cur = bytes[p * TARGET_PAGE_SIZE]!;
      if (cur === prev) continue;
      if (cur === ((prev - 1) & 0xff) && sliceBoundary === null) {
        sliceBoundary = p;
        continue;
      }
      if (bad.length < 10) bad.push(p);
      else break;
    }
    if (v === 0) boundary = sliceBoundary;
  }
  return { consistent: bad.length === 0, boundary, badPages: bad };
}
