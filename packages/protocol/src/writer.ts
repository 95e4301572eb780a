// BatchWriter: encodes records into reusable slabs and hands them out as a short list of
// Buffers for one cork/writev (or one file write).
//
//   slab:   [ flushed .... | pending ........ | free ............ ]
//                          ^start            ^pos
//   flush() → [ slab0[start..pos], big-payload, slab1[..], … ]   (one Buffer per slab, not per record)
//
// Page bytes are copied into the slab (one memcpy, ~370 ns/page here) so the batch holds what
// RAM held *now*: a later guest write cannot tear what was already encoded, and nothing is
// allocated per page. Payloads larger than INLINE_MAX are referenced, not copied.

import { ErrorCode, MigrationError } from './errors.ts';

export interface BatchWriterOptions {
  /** Bytes per slab; 256 KiB is one efficient writev on this machine. */
  slabSize?: number;
}

const DEFAULT_SLAB = 256 * 1024;
/** Payloads at least this long are queued by reference instead of copied. */
const INLINE_MAX = 16 * 1024;

export class BatchWriter {
  private readonly slabSize: number;
  private slab: Buffer;
  private dataView: DataView;
  private start = 0;
  private pos = 0;
  private out: Buffer[] = [];
  private pool: Buffer[] = [];
  /** Full slabs sealed since the last flush(): their tail is still pending, so not reusable yet. */
  private inFlight: Buffer[] = [];
  /** Full slabs whose every byte has been handed out by flush(): reusable after release(). */
  private flushed: Buffer[] = [];
  /** Bytes encoded since creation (flushed or not). */
  totalBytes = 0;

  constructor(options: BatchWriterOptions = {}) {
    this.slabSize = options.slabSize ?? DEFAULT_SLAB;
    this.slab = Buffer.allocUnsafeSlow(this.slabSize);
    this.dataView = new DataView(this.slab.buffer, this.slab.byteOffset, this.slab.byteLength);
  }

  /** Bytes encoded but not yet flushed. */
  get pendingBytes(): number {
    let n = this.pos - this.start;
    for (const b of this.out) n += b.length;
    return n;
  }

  /** Make room for n contiguous bytes in the current slab. */
  private ensure(n: number): void {
    if (this.pos + n <= this.slab.length) return;
    this.seal();
    this.inFlight.push(this.slab);
    const size = Math.max(this.slabSize, n);
    const reused = size === this.slabSize ? this.pool.pop() : undefined;
    this.slab = reused ?? Buffer.allocUnsafeSlow(size);
    this.dataView = new DataView(this.slab.buffer, this.slab.byteOffset, this.slab.byteLength);
    this.start = 0;
    this.pos = 0;
  }

  private seal(): void {
    if (this.pos > this.start) {
      this.out.push(this.slab.subarray(this.start, this.pos));
      this.start = this.pos;
    }
  }

  u8(v: number): this {
    this.ensure(1);
    this.slab[this.pos++] = v;
    this.totalBytes += 1;
    return this;
  }

  be16(v: number): this {
    this.ensure(2);
    this.dataView.setUint16(this.pos, v);
    this.pos += 2;
    this.totalBytes += 2;
    return this;
  }

  be32(v: number): this {
    this.ensure(4);
    this.dataView.setUint32(this.pos, v >>> 0);
    this.pos += 4;
    this.totalBytes += 4;
    return this;
  }

  /** be64 from a non-negative safe integer. */
  be64(v: number): this {
    if (!Number.isSafeInteger(v) || v < 0) {
      throw new MigrationError(ErrorCode.INVALID_ARGUMENT, `be64 value ${v} is not a non-negative safe integer`);
    }
    this.ensure(8);
    this.dataView.setUint32(this.pos, Math.floor(v / 0x100000000));
    this.dataView.setUint32(this.pos + 4, v >>> 0);
    this.pos += 8;
    this.totalBytes += 8;
    return this;
  }

  /**
   * `count` records of one be64 word and one byte: word = first + i × step (all safe, below
   * 2^53), the byte fixed. One bounds check for the lot (runs of ZERO page records).
   */
  be64u8Run(first: number, step: number, count: number, byte: number): this {
    const last = first + (count - 1) * step;
    if (count <= 0) return this;
    if (!Number.isSafeInteger(first) || !Number.isSafeInteger(last) || first < 0 || last < 0) {
      throw new MigrationError(ErrorCode.INVALID_ARGUMENT, `be64 run ${first}..${last} is not of non-negative safe integers`);
    }
    this.ensure(9 * count);
    const v = this.dataView;
    const slab = this.slab;
    let p = this.pos;
    for (let i = 0, word = first; i < count; i++, word += step) {
      v.setUint32(p, Math.floor(word / 0x100000000));
      v.setUint32(p + 4, word >>> 0);
      slab[p + 8] = byte;
      p += 9;
    }
    this.pos = p;
    this.totalBytes += 9 * count;
    return this;
  }

  /** Counted string: u8 length + latin1 bytes (1–255 bytes). */
  cstr(s: string): this {
    const n = s.length;
    if (n === 0 || n > 255) {
      throw new MigrationError(ErrorCode.INVALID_ARGUMENT, `counted string "${s}" must be 1–255 bytes long`);
    }
    this.ensure(1 + n);
    this.slab[this.pos] = n;
    this.slab.write(s, this.pos + 1, n, 'latin1');
    this.pos += 1 + n;
    this.totalBytes += 1 + n;
    return this;
  }

  /** Raw bytes: copied into the slab when small, else queued by reference (do not modify them until flushed). */
  bytes(src: Uint8Array, offset = 0, length = src.byteLength - offset): this {
    if (length >= INLINE_MAX) {
      this.seal();
      this.out.push(Buffer.from(src.buffer, src.byteOffset + offset, length));
      this.totalBytes += length;
      return this;
    }
    this.ensure(length);
    this.slab.set(src.subarray(offset, offset + length), this.pos);
    this.pos += length;
    this.totalBytes += length;
    return this;
  }

  /**
   * Queue `length` bytes of `src` by reference (zero copy): what goes out is what src holds when
   * the batch is written, not now. Use it for guest pages when nothing depends on the exact
   * bytes sent (a later guest write re-dirties the page anyway).
   */
  view(src: Buffer, offset: number, length: number): this {
    this.seal();
    this.out.push(src.subarray(offset, offset + length));
    this.totalBytes += length;
    return this;
  }

  /** Copy exactly `length` bytes from src (a guest page) into the batch. */
  copyFrom(src: Uint8Array, offset: number, length: number): this {
    this.ensure(length);
    // Buffer.prototype.copy is a native memcpy and makes no view object.
    Buffer.prototype.copy.call(src, this.slab, this.pos, offset, offset + length);
    this.pos += length;
    this.totalBytes += length;
    return this;
  }

  /**
   * Take everything encoded so far. The returned Buffers stay valid until release() is called;
   * call it once they have been written out so their slabs can be reused.
   */
  flush(): Buffer[] {
    this.seal();
    const out = this.out;
    this.out = [];
    for (const s of this.inFlight) this.flushed.push(s);
    this.inFlight = [];
    return out;
  }

  /** Everything encoded so far as one Buffer (tests and small messages). */
  flushConcat(): Buffer {
    const parts = this.flush();
    return parts.length === 1 ? Buffer.from(parts[0]!) : Buffer.concat(parts);
  }

  /** The previously flushed Buffers have been written: their slabs may be reused. */
  release(): void {
    for (const s of this.flushed) if (s.length === this.slabSize && this.pool.length < 8) this.pool.push(s);
    this.flushed = [];
  }
}
