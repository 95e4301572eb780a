// A VFIO-style device: device-owned memory (think of a GPU's or a NIC's), dirtied by the device
// itself while the guest runs, migrated with its own pre-copy data in the START / PART / END
// sections of an iterative device, plus a register file sent last.
//
//   section data := be32 length | body
//   body         := u8 kind | ...
//     kind 1 (setup)   be32 regionBytes | be32 chunkBytes
//     kind 2 (chunks)  { be32 chunk index | chunk bytes }*         (PART, and END before kind 3)
//     kind 3 (final)   { be32 chunk index | chunk bytes }* then 0xffffffff | registers[256]

import { createHash } from 'node:crypto';
import type { BatchWriter } from '@livemig/protocol';
import { DeviceLoadError } from './devices.ts';
import type { IterativeDevice, IterativeLoader } from './iterative.ts';
import { VFIO_REGISTER_BYTES } from './vfio-v1-region.ts';

const KIND_SETUP = 1;
const KIND_CHUNKS = 2;
const KIND_FINAL = 3;
const END_OF_CHUNKS = 0xffffffff;

export class VfioDevice implements IterativeDevice, IterativeLoader {
  readonly idstr = 'livemig/vfio';
  readonly instanceId = 0;
  readonly versionId = 1;
  readonly layout = 'be32-prefixed' as const;
  readonly region: Buffer;
  readonly registers = Buffer.alloc(VFIO_REGISTER_BYTES);
  readonly chunkBytes: number;
  private readonly dirty: Uint8Array;
  private dirtyCount = 0;
  private tracking = false;
  private cursor = 0;
  private rng = 0x1234567;
  private timer: NodeJS.Timeout | undefined;

  constructor(regionBytes = 4 * 2 ** 20, chunkBytes = 16 * 1024) {
    this.region = Buffer.alloc(regionBytes);
    this.chunkBytes = chunkBytes;
    this.dirty = new Uint8Array(Math.ceil(regionBytes / chunkBytes));
    // One typed-array pass (a Buffer method call per word cost ~30 ms at every start).
    const words = new Uint32Array(this.region.buffer, this.region.byteOffset, this.region.length / 4);
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

  /** The device works while the guest runs: a scattered write every 20 ms (≤ 0.8 MB/s of dirty chunks). */
  start(): void {
    if (this.timer !== undefined) return;
    this.timer = setInterval(() => {
      const at = (this.next() % (this.region.length / 4)) * 4;
      this.region.writeUInt32LE(this.next(), at);
      this.markDirty(Math.floor(at / this.chunkBytes));
      this.registers.writeUInt32LE(this.registers.readUInt32LE(0) + 1, 0);
    }, 20);
    this.timer.unref();
  }

  stop(): void {
    clearInterval(this.timer);
    this.timer = undefined;
  }

  private markDirty(chunk: number): void {
    if (this.tracking && this.dirty[chunk] === 0) {
      this.dirty[chunk] = 1;
      this.dirtyCount++;
    }
  }

  saveSetup(w: BatchWriter): void {
    this.tracking = true;
    this.dirty.fill(1);
    this.dirtyCount = this.dirty.length;
    this.cursor = 0;
    w.be32(9).u8(KIND_SETUP).be32(this.region.length).be32(this.chunkBytes);
  }

  pendingEstimate(): number {
    return this.dirtyCount * this.chunkBytes;
  }

  pendingExact(): number {
    return this.pendingEstimate();
  }

  /** Write dirty chunks as one framed body; returns true when none is left. */
  private writeChunks(w: BatchWriter, kind: number, maxBytes: number, deadline?: () => boolean): boolean {
    // The length prefix covers what follows; count first, then write.
    const chunks: number[] = [];
    let bytes = 0;
    for (let seen = 0; seen < this.dirty.length && this.dirtyCount > 0; seen++) {
      if (bytes >= maxBytes || deadline?.() === true) break;
      const c = this.cursor;
      this.cursor = (this.cursor + 1) % this.dirty.length;
      if (this.dirty[c] === 0) continue;
      this.dirty[c] = 0;
      this.dirtyCount--;
      chunks.push(c);
      bytes += 4 + this.chunkLength(c);
    }
    const final = kind === KIND_FINAL;
    w.be32(1 + bytes + (final ? 4 + VFIO_REGISTER_BYTES : 0)).u8(kind);
    for (const c of chunks) {
      const at = c * this.chunkBytes;
      w.be32(c).copyFrom(this.region, at, this.chunkLength(c));
    }
    if (final) w.be32(END_OF_CHUNKS).copyFrom(this.registers, 0, VFIO_REGISTER_BYTES);
    return this.dirtyCount === 0;
  }

  private chunkLength(c: number): number {
    return Math.min(this.chunkBytes, this.region.length - c * this.chunkBytes);
  }

  saveIterate(w: BatchWriter, maxBytes: number, deadline?: () => boolean): boolean {
    return this.writeChunks(w, KIND_CHUNKS, maxBytes, deadline);
  }

  saveComplete(w: BatchWriter, maxBytes: number): boolean {
    // Everything goes in the one END section: the registers must come after the last chunk.
    void maxBytes;
    return this.writeChunks(w, KIND_FINAL, Infinity);
  }

  cleanup(): void {
    this.tracking = false;
  }

  loadState(data: Buffer, versionId: number): void {
    if (versionId !== 1) throw new DeviceLoadError(this.idstr, `stream version ${versionId} is not 1`);
    if (data.length < 5 || data.readUInt32BE(0) !== data.length - 4) throw new DeviceLoadError(this.idstr, 'bad length prefix');
    const kind = data[4]!;
    let p = 5;
    if (kind === KIND_SETUP) {
      if (data.length !== 13) throw new DeviceLoadError(this.idstr, 'bad setup record');
      const regionBytes = data.readUInt32BE(5);
      const chunkBytes = data.readUInt32BE(9);
      if (regionBytes !== this.region.length || chunkBytes !== this.chunkBytes) {
        throw new DeviceLoadError(this.idstr, `region of ${regionBytes} bytes in ${chunkBytes}-byte chunks, here ${this.region.length} in ${this.chunkBytes}`);
      }
      return;
    }
    if (kind !== KIND_CHUNKS && kind !== KIND_FINAL) throw new DeviceLoadError(this.idstr, `unknown record kind ${kind}`);
    while (p < data.length) {
      if (p + 4 > data.length) throw new DeviceLoadError(this.idstr, 'truncated chunk header');
      const c = data.readUInt32BE(p);
      p += 4;
      if (c === END_OF_CHUNKS) {
        if (kind !== KIND_FINAL || data.length - p !== VFIO_REGISTER_BYTES) throw new DeviceLoadError(this.idstr, 'bad register file');
        data.copy(this.registers, 0, p, p + VFIO_REGISTER_BYTES);
        return;
      }
      if (c >= this.dirty.length) throw new DeviceLoadError(this.idstr, `chunk ${c} is outside the region`);
      const len = this.chunkLength(c);
      if (p + len > data.length) throw new DeviceLoadError(this.idstr, `chunk ${c} is truncated`);
      data.copy(this.region, c * this.chunkBytes, p, p + len);
      p += len;
    }
    if (kind === KIND_FINAL) throw new DeviceLoadError(this.idstr, 'final record without its register file');
  }

  digest(): string {
    return createHash('sha256').update(this.region).update(this.registers).digest('hex');
  }
}
