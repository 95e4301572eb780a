// The device side of Linux's VFIO migration region, protocol v1 (struct vfio_device_migration_info
// in linux/vfio.h up to 5.17, the interface QEMU 7.2's hw/vfio/migration.c drives): a pure state
// machine that any test can drive register by register, with the device's own memory behind it.
//
//   region offset  0  u32 device_state     RW  bits _RUNNING 1, _SAVING 2, _RESUMING 4
//                  4  u32 reserved         reads 0, writes ignored
//                  8  u64 pending_bytes    RO  (_SAVING) bytes the device still has to hand out
//                 16  u64 data_offset      RO  where the data area starts (_SAVING / _RESUMING)
//                 24  u64 data_size        RW  bytes in the data area (read: _SAVING, write: _RESUMING)
//   VFIO_DATA_OFFSET  data area, `dataAreaBytes` long
//
//   device_state (bits 2 1 0)   000 _STOP   001 _RUNNING (reset)   010 _SAVING (stop-and-copy)
//                               011 _SAVING|_RUNNING (pre-copy)    100 _RESUMING
//                               101, 111 invalid (EINVAL)          110 error (only reset leaves)
//
//   save  (_SAVING set):   read pending_bytes → [0: done] read data_offset → read data_size →
//                          read the data → read pending_bytes (acks the buffer) → … until 0
//   resume (_RESUMING):    read data_offset → write the data → write data_size (applies it) → …
//
// The device data the region hands out is the device's own business (the user copies it
// verbatim): whole records of `be32 chunk index | chunk bytes`, so a buffer always applies alone.
// While _RUNNING the device keeps writing its memory (tick()); with _SAVING set it tracks which
// chunks changed, so pre-copy iterations are real.

import { GuestErrorCode } from './errors.ts';

/** device_state bits (linux/vfio.h v1: VFIO_DEVICE_STATE_*). */
export const VfioV1State = {
  STOP: 0,
  RUNNING: 1,
  SAVING: 2,
  RESUMING: 4,
  MASK: 7,
} as const;

/** Field offsets of struct vfio_device_migration_info. */
export const VfioMigInfo = {
  DEVICE_STATE: 0,
  RESERVED: 4,
  PENDING_BYTES: 8,
  DATA_OFFSET: 16,
  DATA_SIZE: 24,
} as const;
export const VFIO_MIG_INFO_LENGTH = 32;
/** The data area starts on the next page (an mmap-able data section must be page aligned). */
export const VFIO_DATA_OFFSET = 4096;
/** Bytes of the device's register file (what QEMU's config section carries for it). */
export const VFIO_REGISTER_BYTES = 256;
const RECORD_HEADER_BYTES = 4;

/** The header's VFIO_DEVICE_STATE_VALID: with _RESUMING set, no other bit may be. */
export function vfioV1StateValid(state: number): boolean {
  return (state & VfioV1State.RESUMING) !== 0 ? (state & VfioV1State.MASK) === VfioV1State.RESUMING : true;
}

/** The header's VFIO_DEVICE_STATE_IS_ERROR: _SAVING and _RESUMING together. */
export function vfioV1StateIsError(state: number): boolean {
  return (state & VfioV1State.MASK) === (VfioV1State.SAVING | VfioV1State.RESUMING);
}

export function vfioV1StateName(state: number): string {
  switch (state) {
    case 0:
      return '_STOP';
    case 1:
      return '_RUNNING';
    case 2:
      return '_SAVING';
    case 3:
      return '_SAVING|_RUNNING';
    case 4:
      return '_RESUMING';
    case 6:
      return 'error';
    default:
      return `invalid (${state})`;
  }
}

/**
 * Whether a write of `to` is accepted in state `from` (both valid, not error). The header's
 * arrows (running → pre-copy → stop-and-copy → stop, running ↔ resuming) and QEMU's recovery
 * moves (saving → running on a cancel, the vCPUs stopping or starting under a saving device)
 * are all moves between non-resuming states or through _RUNNING/_STOP; a device never goes
 * straight between saving and resuming.
 */
export function vfioV1TransitionAllowed(from: number, to: number): boolean {
  if (!vfioV1StateValid(from) || !vfioV1StateValid(to) || from > VfioV1State.MASK || to > VfioV1State.MASK) return false;
  const saving = (s: number): boolean => (s & VfioV1State.SAVING) !== 0;
  const resuming = (s: number): boolean => (s & VfioV1State.RESUMING) !== 0;
  return !((saving(from) && resuming(to)) || (resuming(from) && saving(to)));
}

export type VfioRegionErrorCode =
  | typeof GuestErrorCode.VFIO_INVALID_STATE
  | typeof GuestErrorCode.VFIO_BAD_TRANSITION
  | typeof GuestErrorCode.VFIO_SEQUENCE
  | typeof GuestErrorCode.VFIO_OUT_OF_RANGE
  | typeof GuestErrorCode.VFIO_DEVICE_ERROR;

/**
 * A region access the device refuses, as the kernel's read()/write() would fail. `errno` is what
 * the kernel would return (EINVAL, EIO); `deviceState` the state after the failure;
 * `regionOffset` the access.
 */
export class VfioRegionError extends Error {
  readonly code: VfioRegionErrorCode;
  readonly errno: 'EINVAL' | 'EIO';
  readonly deviceState: number;
  readonly regionOffset: number;
  constructor(code: VfioRegionErrorCode, errno: 'EINVAL' | 'EIO', deviceState: number, regionOffset: number, message: string) {
    super(`VFIO migration region offset ${regionOffset} in ${vfioV1StateName(deviceState)}: ${message}`);
    this.name = 'VfioRegionError';
    this.code = code;
    this.errno = errno;
    this.deviceState = deviceState;
    this.regionOffset = regionOffset;
  }
}

/** Where the save or resume sequence stands. */
type Seq = 'start' | 'pending' | 'offset' | 'size';

export interface VfioV1RegionOptions {
  /** Device memory, bytes (a multiple of chunkBytes). Default 4 MiB. */
  memoryBytes?: number;
  /** Dirty-tracking granule, bytes. Default 16 KiB. */
  chunkBytes?: number;
  /** Data area, bytes (at least one record). Default 1 MiB, QEMU's default data buffer. */
  dataAreaBytes?: number;
  /** Seed of the device's initial memory and its writes. */
  seed?: number;
}

export class VfioV1Region {
  /** The device's own memory (a GPU's, a NIC's). */
  readonly memory: Buffer;
  /** The device's register file (config space). */
  readonly registers = Buffer.alloc(VFIO_REGISTER_BYTES);
  readonly chunkBytes: number;
  readonly dataAreaBytes: number;
  /** Region size: the info struct's page and the data area. */
  readonly regionBytes: number;
  /** Figures for tests and query-migrate: buffers handed out / applied and their bytes. */
  readonly stats = { savedBuffers: 0, savedBytes: 0, resumedBuffers: 0, resumedBytes: 0 };
  private readonly area: Buffer;
  private readonly recordBytes: number;
  private readonly dirty: Uint8Array;
  private dirtyCount = 0;
  private cursor = 0;
  private state: number = VfioV1State.RUNNING;
  private seq: Seq = 'start';
  private dataSize = 0;
  /** Resume: bytes of the data area written since data_offset was read. */
  private written = 0;
  private rng: number;

  constructor(options: VfioV1RegionOptions = {}) {
    this.chunkBytes = options.chunkBytes ?? 16 * 1024;
    const memoryBytes = options.memoryBytes ?? 4 * 2 ** 20;
    this.dataAreaBytes = options.dataAreaBytes ?? 2 ** 20;
    this.recordBytes = RECORD_HEADER_BYTES + this.chunkBytes;
    if (memoryBytes % this.chunkBytes !== 0 || memoryBytes === 0) throw new RangeError(`device memory of ${memoryBytes} bytes is not whole ${this.chunkBytes}-byte chunks`);
    if (this.dataAreaBytes < this.recordBytes) throw new RangeError(`a data area of ${this.dataAreaBytes} bytes holds no ${this.recordBytes}-byte record`);
    this.regionBytes = VFIO_DATA_OFFSET + this.dataAreaBytes;
    this.memory = Buffer.alloc(memoryBytes);
    this.area = Buffer.alloc(this.dataAreaBytes);
    this.dirty = new Uint8Array(memoryBytes / this.chunkBytes);
    this.rng = (options.seed ?? 0x1234567) >>> 0 || 1;
    // One typed-array pass (a Buffer method call per word cost ~30 ms at every start).
    const words = new Uint32Array(this.memory.buffer, this.memory.byteOffset, memoryBytes / 4);
    for (let i = 0; i < words.length; i++) words[i] = this.next();
    this.registers.fill(0x5a);
  }

  private next(): number {
    this.rng ^= this.rng << 13;
    this.rng ^= this.rng >>> 17;
    this.rng ^= this.rng << 5;
    this.rng >>>= 0;
    return this.rng;
  }

  /** device_state as a read would return it. */
  get deviceState(): number {
    return this.state;
  }

  /** Chunks changed since _SAVING began and not handed out yet. */
  get dirtyChunks(): number {
    return this.dirtyCount;
  }

  private fail(code: VfioRegionErrorCode, errno: 'EINVAL' | 'EIO', at: number, message: string): never {
    throw new VfioRegionError(code, errno, this.state, at, message);
  }

  private failIfError(at: number): void {
    if (vfioV1StateIsError(this.state)) this.fail(GuestErrorCode.VFIO_DEVICE_ERROR, 'EIO', at, 'the device is in the error state (only a reset leaves it)');
  }

  private checkWidth(at: number, width: number): void {
    const want = at === VfioMigInfo.DEVICE_STATE || at === VfioMigInfo.RESERVED ? 4 : at === VfioMigInfo.PENDING_BYTES || at === VfioMigInfo.DATA_OFFSET || at === VfioMigInfo.DATA_SIZE ? 8 : 0;
    if (want === 0) this.fail(GuestErrorCode.VFIO_OUT_OF_RANGE, 'EINVAL', at, 'no register of vfio_device_migration_info starts here (the data area is read and written with readData/writeData)');
    if (width !== want) this.fail(GuestErrorCode.VFIO_OUT_OF_RANGE, 'EINVAL', at, `a ${width}-byte access to a ${want}-byte field`);
  }

  private get saving(): boolean {
    return (this.state & VfioV1State.SAVING) !== 0 && !vfioV1StateIsError(this.state);
  }

  private get resuming(): boolean {
    return this.state === VfioV1State.RESUMING;
  }

  /** A register read of `width` bytes at `regionOffset` (pread on the region). */
  read(regionOffset: number, width: 4 | 8): number {
    this.checkWidth(regionOffset, width);
    if (regionOffset === VfioMigInfo.DEVICE_STATE) return this.state;
    this.failIfError(regionOffset);
    switch (regionOffset) {
      case VfioMigInfo.RESERVED:
        return 0;
      case VfioMigInfo.PENDING_BYTES:
        return this.readPending();
      case VfioMigInfo.DATA_OFFSET:
        return this.readDataOffset();
      default:
        return this.readDataSize();
    }
  }

  private readPending(): number {
    const at = VfioMigInfo.PENDING_BYTES;
    if (!this.saving) this.fail(GuestErrorCode.VFIO_SEQUENCE, 'EINVAL', at, 'pending_bytes is read only while _SAVING');
    if (this.seq === 'offset') this.fail(GuestErrorCode.VFIO_SEQUENCE, 'EINVAL', at, 'pending_bytes read before data_size (the buffer was not taken)');
    if (this.seq === 'size') {
      // Step f: the user has the buffer.
      this.stats.savedBuffers++;
      this.stats.savedBytes += this.dataSize;
      this.dataSize = 0;
    }
    this.seq = 'pending';
    return this.dirtyCount * this.recordBytes;
  }

  private readDataOffset(): number {
    const at = VfioMigInfo.DATA_OFFSET;
    if (this.resuming) {
      this.seq = 'offset';
      this.written = 0;
      return VFIO_DATA_OFFSET;
    }
    if (!this.saving) this.fail(GuestErrorCode.VFIO_SEQUENCE, 'EINVAL', at, 'data_offset is read only while _SAVING or _RESUMING');
    if (this.seq === 'start') this.fail(GuestErrorCode.VFIO_SEQUENCE, 'EINVAL', at, 'data_offset read before pending_bytes');
    if (this.seq === 'pending') {
      if (this.dirtyCount === 0) this.fail(GuestErrorCode.VFIO_SEQUENCE, 'EINVAL', at, 'data_offset read with no bytes pending');
      this.fill();
      this.seq = 'offset';
    }
    return VFIO_DATA_OFFSET;
  }

  private readDataSize(): number {
    const at = VfioMigInfo.DATA_SIZE;
    if (this.resuming) return this.dataSize;
    if (!this.saving) this.fail(GuestErrorCode.VFIO_SEQUENCE, 'EINVAL', at, 'data_size is read only while _SAVING or _RESUMING');
    if (this.seq !== 'offset' && this.seq !== 'size') this.fail(GuestErrorCode.VFIO_SEQUENCE, 'EINVAL', at, 'data_size read before data_offset');
    this.seq = 'size';
    return this.dataSize;
  }

  /** Step b: put as many whole dirty chunks in the data area as fit. */
  private fill(): void {
    const n = this.dirty.length;
    let p = 0;
    for (let seen = 0; seen < n && this.dirtyCount > 0 && p + this.recordBytes <= this.dataAreaBytes; seen++) {
      const c = this.cursor;
      this.cursor = c + 1 === n ? 0 : c + 1;
      if (this.dirty[c] === 0) continue;
      this.dirty[c] = 0;
      this.dirtyCount--;
      this.area.writeUInt32BE(c, p);
      this.memory.copy(this.area, p + RECORD_HEADER_BYTES, c * this.chunkBytes, (c + 1) * this.chunkBytes);
      p += this.recordBytes;
    }
    this.dataSize = p;
  }

  /** A register write of `width` bytes at `regionOffset` (pwrite on the region). */
  write(regionOffset: number, width: 4 | 8, value: number): void {
    this.checkWidth(regionOffset, width);
    this.failIfError(regionOffset);
    switch (regionOffset) {
      case VfioMigInfo.DEVICE_STATE:
        return this.writeState(value);
      case VfioMigInfo.RESERVED:
        return;
      case VfioMigInfo.DATA_SIZE:
        return this.writeDataSize(value);
      default:
        this.fail(GuestErrorCode.VFIO_OUT_OF_RANGE, 'EINVAL', regionOffset, 'pending_bytes and data_offset are read-only');
    }
  }

  private writeState(to: number): void {
    const at = VfioMigInfo.DEVICE_STATE;
    if (!Number.isInteger(to) || to < 0 || to > VfioV1State.MASK || !vfioV1StateValid(to)) {
      this.fail(GuestErrorCode.VFIO_INVALID_STATE, 'EINVAL', at, `${to} is not a valid device_state`);
    }
    if (to === this.state) return;
    if (!vfioV1TransitionAllowed(this.state, to)) {
      this.fail(GuestErrorCode.VFIO_BAD_TRANSITION, 'EINVAL', at, `no transition from ${vfioV1StateName(this.state)} to ${vfioV1StateName(to)}`);
    }
    const wasSaving = (this.state & VfioV1State.SAVING) !== 0;
    const willSave = (to & VfioV1State.SAVING) !== 0;
    if (willSave && !wasSaving) {
      // Saving begins: everything is to send, and changes are tracked from now on.
      this.dirty.fill(1);
      this.dirtyCount = this.dirty.length;
      this.cursor = 0;
      this.seq = 'start';
      this.dataSize = 0;
    } else if (!willSave && wasSaving) {
      this.dirty.fill(0);
      this.dirtyCount = 0;
      this.seq = 'start';
      this.dataSize = 0;
    }
    if (to === VfioV1State.RESUMING) {
      this.seq = 'start';
      this.dataSize = 0;
    }
    this.state = to;
  }

  private writeDataSize(size: number): void {
    const at = VfioMigInfo.DATA_SIZE;
    if (!this.resuming) this.fail(GuestErrorCode.VFIO_SEQUENCE, 'EINVAL', at, 'data_size is written only while _RESUMING');
    if (this.seq !== 'offset') this.fail(GuestErrorCode.VFIO_SEQUENCE, 'EINVAL', at, 'data_size written before data_offset was read');
    if (!Number.isInteger(size) || size < 0 || size > this.written) {
      this.fail(GuestErrorCode.VFIO_OUT_OF_RANGE, 'EINVAL', at, `data_size ${size} is more than the ${this.written} bytes written to the data area`);
    }
    this.dataSize = size;
    this.seq = 'start';
    this.apply(size);
  }

  /** Resume step c: the device takes the records in the data area; bad ones break it. */
  private apply(size: number): void {
    if (size % this.recordBytes !== 0) this.breakDevice(`resume data of ${size} bytes is not whole ${this.recordBytes}-byte records`);
    for (let p = 0; p < size; p += this.recordBytes) {
      const c = this.area.readUInt32BE(p);
      if (c >= this.dirty.length) this.breakDevice(`resume data names chunk ${c} of ${this.dirty.length}`);
      this.area.copy(this.memory, c * this.chunkBytes, p + RECORD_HEADER_BYTES, p + this.recordBytes);
    }
    this.stats.resumedBuffers++;
    this.stats.resumedBytes += size;
  }

  private breakDevice(message: string): never {
    this.state = VfioV1State.SAVING | VfioV1State.RESUMING;
    this.fail(GuestErrorCode.VFIO_DEVICE_ERROR, 'EIO', VfioMigInfo.DATA_SIZE, message);
  }

  /** Copy `length` bytes of the data area at `regionOffset` into `dst` (step d of the save). */
  readData(regionOffset: number, dst: Uint8Array, dstOffset: number, length: number): void {
    this.failIfError(regionOffset);
    if (!this.saving || this.seq !== 'size') this.fail(GuestErrorCode.VFIO_SEQUENCE, 'EINVAL', regionOffset, 'the data area is read only after data_size, while _SAVING');
    const from = regionOffset - VFIO_DATA_OFFSET;
    if (from < 0 || length < 0 || from + length > this.dataSize) {
      this.fail(GuestErrorCode.VFIO_OUT_OF_RANGE, 'EINVAL', regionOffset, `a ${length}-byte read outside the ${this.dataSize} bytes of data_size at data_offset ${VFIO_DATA_OFFSET}`);
    }
    this.area.copy(dst, dstOffset, from, from + length);
  }

  /** Copy `length` bytes of `src` into the data area at `regionOffset` (step b of the resume). */
  writeData(regionOffset: number, src: Uint8Array, srcOffset: number, length: number): void {
    this.failIfError(regionOffset);
    if (!this.resuming || this.seq !== 'offset') this.fail(GuestErrorCode.VFIO_SEQUENCE, 'EINVAL', regionOffset, 'the data area is written only after data_offset, while _RESUMING');
    const from = regionOffset - VFIO_DATA_OFFSET;
    if (from < 0 || length < 0 || from + length > this.dataAreaBytes) {
      this.fail(GuestErrorCode.VFIO_OUT_OF_RANGE, 'EINVAL', regionOffset, `a ${length}-byte write outside the ${this.dataAreaBytes}-byte data area`);
    }
    this.area.set(src.subarray(srcOffset, srcOffset + length), from);
    this.written = Math.max(this.written, from + length);
  }

  /** VFIO_DEVICE_RESET: back to _RUNNING from anywhere, the error state included. */
  reset(): void {
    this.state = VfioV1State.RUNNING;
    this.seq = 'start';
    this.dataSize = 0;
    this.written = 0;
    this.dirty.fill(0);
    this.dirtyCount = 0;
  }

  /** The device at work: while _RUNNING, `writes` scattered 4-byte writes and a register bump. */
  tick(writes = 1): void {
    if ((this.state & VfioV1State.RUNNING) === 0 || !vfioV1StateValid(this.state)) return;
    const words = this.memory.length / 4;
    for (let i = 0; i < writes; i++) {
      const at = (this.next() % words) * 4;
      this.memory.writeUInt32LE(this.next(), at);
      if ((this.state & VfioV1State.SAVING) !== 0) {
        const c = Math.floor(at / this.chunkBytes);
        if (this.dirty[c] === 0) {
          this.dirty[c] = 1;
          this.dirtyCount++;
        }
      }
    }
    this.registers.writeUInt32LE((this.registers.readUInt32LE(0) + 1) >>> 0, 0);
  }
}
