// Devices with vmstate: each saves one FULL section and describes it in the VMDESCRIPTION, so
// `livemig analyze` can walk livemig's own streams as it walks QEMU's.
//
//   timer        (QEMU's layout, v2)  int64 cpu_ticks_offset | 8 unused | int64 cpu_clock_offset
//   globalstate  (QEMU's layout, v1)  uint32 size | char runstate[100]
//   livemig/vcpu (one per vCPU, v1)   uint64 position | uint64 passes | uint32 rng | uint64 writes
//   livemig/app  (v1)                 uint32 length | msgpack(state)   (arbitrary JS object)

import { Packr } from 'msgpackr';
import type { VmdescDevice, VmsdLayout } from '@livemig/protocol';
import type { VcpuSet } from './vcpus.ts';
import { GuestErrorCode } from './errors.ts';

/** Thrown by a device that cannot load what it was sent; `device` names it. */
export class DeviceLoadError extends Error {
  readonly code = GuestErrorCode.DEVICE_LOAD;
  readonly device: string;
  constructor(device: string, message: string, cause?: unknown) {
    super(`device "${device}": ${message}`, cause === undefined ? undefined : { cause });
    this.name = 'DeviceLoadError';
    this.device = device;
  }
}

export interface Device {
  readonly idstr: string;
  readonly instanceId: number;
  readonly versionId: number;
  /** Data length for the destination decoder: fixed, a be32 length prefix, or a recorded QEMU description. */
  readonly layout: number | 'be32-prefixed' | VmsdLayout;
  /** FULL section data (the guest is stopped). */
  save(): Buffer;
  /** Load FULL section data written with stream version `versionId`. */
  load(data: Buffer, versionId: number): void;
  /** The VMDESCRIPTION entry for data of this length. */
  describe(dataLength: number): VmdescDevice;
}

function checkVersion(d: Device, versionId: number): void {
  if (versionId > d.versionId) throw new DeviceLoadError(d.idstr, `stream version ${versionId} is newer than ours (${d.versionId})`);
  if (versionId < 1) throw new DeviceLoadError(d.idstr, `stream version ${versionId} is older than the oldest we load (1)`);
}

function checkLength(d: Device, data: Buffer, want: number): void {
  if (data.length !== want) throw new DeviceLoadError(d.idstr, `${data.length} bytes of state, expected ${want}`);
}

/** Guest time: frozen while the guest is stopped, so it is continuous across a migration. */
export class GuestClock {
  private baseNs = 0n;
  private resumedAt: bigint | undefined;

  nowNs(): bigint {
    return this.resumedAt === undefined ? this.baseNs : this.baseNs + (process.hrtime.bigint() - this.resumedAt);
  }

  resume(): void {
    if (this.resumedAt === undefined) this.resumedAt = process.hrtime.bigint();
  }

  pause(): void {
    this.baseNs = this.nowNs();
    this.resumedAt = undefined;
  }

  set(ns: bigint): void {
    this.baseNs = ns;
    if (this.resumedAt !== undefined) this.resumedAt = process.hrtime.bigint();
  }
}

export class TimerDevice implements Device {
  readonly idstr = 'timer';
  readonly instanceId = 0;
  readonly versionId = 2;
  readonly layout = 24;
  private readonly clock: GuestClock;
  constructor(clock: GuestClock) {
    this.clock = clock;
  }

  save(): Buffer {
    const b = Buffer.alloc(24);
    const ns = this.clock.nowNs();
    b.writeBigInt64BE(ns, 0);
    b.writeBigInt64BE(ns, 16);
    return b;
  }

  load(data: Buffer, versionId: number): void {
    checkVersion(this, versionId);
    checkLength(this, data, 24);
    this.clock.set(data.readBigInt64BE(16));
  }

  describe(): VmdescDevice {
    return {
      name: 'timer',
      instance_id: 0,
      vmsd_name: 'timer',
      version: 2,
      fields: [
        { name: 'cpu_ticks_offset', type: 'int64', size: 8 },
        { name: 'unused', type: 'unused_buffer', size: 8 },
        { name: 'cpu_clock_offset', type: 'int64', size: 8 },
      ],
    };
  }
}

const RUNSTATE_BYTES = 100;

export class GlobalStateDevice implements Device {
  readonly idstr = 'globalstate';
  readonly instanceId = 0;
  readonly versionId = 1;
  readonly layout = 4 + RUNSTATE_BYTES;
  /** The run state the source had when it stopped (QEMU stores it before stopping). */
  runstate = 'prelaunch';
  /** The source's run state as loaded on the destination. */
  loaded: string | undefined;

  save(): Buffer {
    const b = Buffer.alloc(4 + RUNSTATE_BYTES);
    const n = b.write(this.runstate, 4, RUNSTATE_BYTES - 1, 'latin1');
    b.writeUInt32BE(n + 1, 0);
    return b;
  }

  load(data: Buffer, versionId: number): void {
    checkVersion(this, versionId);
    checkLength(this, data, 4 + RUNSTATE_BYTES);
    const size = data.readUInt32BE(0);
    if (size < 1 || size > RUNSTATE_BYTES) throw new DeviceLoadError(this.idstr, `run state size ${size} is outside 1–${RUNSTATE_BYTES}`);
    this.loaded = data.toString('latin1', 4, 4 + size - 1);
  }

  describe(): VmdescDevice {
    return {
      name: 'globalstate',
      instance_id: 0,
      vmsd_name: 'globalstate',
      version: 1,
      fields: [
        { name: 'size', type: 'uint32', size: 4 },
        { name: 'runstate', type: 'buffer', size: RUNSTATE_BYTES },
      ],
    };
  }
}

export class VcpuDevice implements Device {
  readonly idstr = 'livemig/vcpu';
  readonly versionId = 1;
  readonly layout = 28;
  readonly instanceId: number;
  private readonly vcpus: VcpuSet;
  constructor(instanceId: number, vcpus: VcpuSet) {
    this.instanceId = instanceId;
    this.vcpus = vcpus;
  }

  save(): Buffer {
    const s = this.vcpus.readState(this.instanceId);
    const b = Buffer.alloc(28);
    b.writeBigUInt64BE(BigInt(s.position), 0);
    b.writeBigUInt64BE(BigInt(s.passes), 8);
    b.writeUInt32BE(s.rng >>> 0, 16);
    b.writeBigUInt64BE(BigInt(s.writes), 20);
    return b;
  }

  load(data: Buffer, versionId: number): void {
    checkVersion(this, versionId);
    checkLength(this, data, 28);
    this.vcpus.writeState(this.instanceId, {
      position: Number(data.readBigUInt64BE(0)),
      passes: Number(data.readBigUInt64BE(8)),
      rng: data.readUInt32BE(16),
      writes: Number(data.readBigUInt64BE(20)),
    });
  }

  describe(): VmdescDevice {
    return {
      name: this.idstr,
      instance_id: this.instanceId,
      vmsd_name: this.idstr,
      version: 1,
      fields: [
        { name: 'position', type: 'uint64', size: 8 },
        { name: 'passes', type: 'uint64', size: 8 },
        { name: 'rng', type: 'uint32', size: 4 },
        { name: 'writes', type: 'uint64', size: 8 },
      ],
    };
  }
}

/** One shared Packr: structured clone keeps Maps, Sets, Dates, typed arrays and shared references. */
export const appPackr = new Packr({ structuredClone: true, moreTypes: true });

/** An application's state, an arbitrary JS object, carried with msgpackr. */
export class AppDevice implements Device {
  readonly idstr = 'livemig/app';
  readonly instanceId = 0;
  readonly versionId = 1;
  readonly layout = 'be32-prefixed' as const;
  /** Largest state accepted on load. */
  static readonly MAX_BYTES = 8 * 1024 * 1024;
  state: unknown;

  constructor(initial: unknown) {
    this.state = initial;
  }

  encodeState(): Buffer {
    return appPackr.pack(this.state);
  }

  save(): Buffer {
    const packed = this.encodeState();
    const b = Buffer.allocUnsafe(4 + packed.length);
    b.writeUInt32BE(packed.length, 0);
    packed.copy(b, 4);
    return b;
  }

  load(data: Buffer, versionId: number): void {
    checkVersion(this, versionId);
    if (data.length < 4) throw new DeviceLoadError(this.idstr, `${data.length} bytes of state, expected at least 4`);
    const n = data.readUInt32BE(0);
    if (n !== data.length - 4) throw new DeviceLoadError(this.idstr, `length prefix ${n} does not match ${data.length - 4} bytes of state`);
    try {
      this.state = appPackr.unpack(data.subarray(4));
    } catch (err) {
      throw new DeviceLoadError(this.idstr, `state does not unpack: ${(err as Error).message}`);
    }
  }

  describe(dataLength: number): VmdescDevice {
    return {
      name: this.idstr,
      instance_id: 0,
      size: dataLength,
      fields: [{ name: 'data', type: 'buffer', size: dataLength }],
    };
  }
}
