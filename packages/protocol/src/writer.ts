// BatchWriter: encodes records into reusable slabs and hands them out as a short list of
// Buffers for one cork/writev (or one file write).
//
//   slab:   [ flushed .... | pending ........ | free ............ ]
//                          ^start            ^pos
//   flush() → [ slab0[start..pos], big-payload, slab1[..], … ]   (one Buffer per slab, not per record)
//
// Page bytes are copied into the slab (one memcpy, ~370 ns/page here) so the batch holds what
// RAM held *now*: a later guest write cannot tear what was already encoded, and nothing is
// allocated per page. Payloads larger than INLINE_MAX are referenced, not copied. view() queues
// bytes by reference instead, as a ref (five numbers, no object per page): flushRefs() hands the
// batch out as pieces plus refs for a writer that gathers them itself (the source's writev of
// guest pages in place), flush() as Buffers with a view per ref.
//
// Slab reuse: the writer keeps no flushed slab alive by itself (only the current slab and a small
// pool), so a caller that never says anything just lets the garbage collector take the slabs
// once its writes are done. A caller that hands each batch back with recycle() once its write
// callback has fired gets its full slabs reused, and allocates none in the steady state. Only
// the caller knows when a socket is done with a (zero-copy) batch, so reuse is never guessed
// from flush() counts.

import { ErrorCode, MigrationError } from './errors.ts';

export interface BatchWriterOptions {
  /** Bytes per slab; 256 KiB is one efficient writev on this machine. */
  slabSize?: number;
  /**
   * Free slabs shared with other writers of the same slab size (e.g. one migration after
   * another in a long-lived process); without it the writer keeps a small pool of its own.
   */
  pool?: SlabPool;
}

/**
 * Free slabs of one size, for writers that come and go. A writer that owned its pool left its
 * slabs to the garbage collector when it went; slabs are external memory, which V8 frees only
 * at a full collection, so a source migrating again and again grew by ~1.6 MiB of RSS per
 * migration (346 → 371 MiB over 16 migrations of a 256 MiB guest). Shared, the next writer
 * takes them back instead of allocating.
 */
export class SlabPool {
  readonly slabSize: number;
  private readonly maxFree: number;
  readonly free: Buffer[] = [];
  /** Slabs allocated for the writers of this pool so far (reused ones not counted). */
  allocated = 0;

  /** `maxBytes`: free slabs kept, in bytes (at least two slabs). */
  constructor(slabSize: number, maxBytes: number) {
    this.slabSize = slabSize;
    this.maxFree = Math.max(2, Math.floor(maxBytes / slabSize));
  }

  /** A free slab, or undefined. */
  take(): Buffer | undefined {
    return this.free.pop();
  }

  /** Keep a slab nothing refers to any more (dropped when the pool is full). */
  give(buf: Buffer): void {
    if (this.free.length < this.maxFree) this.free.push(buf);
  }
}

/** Bytes per slab unless a writer is given another size. */
export const DEFAULT_SLAB_BYTES = 256 * 1024;
/** Payloads at least this long are queued by reference instead of copied. */
const INLINE_MAX = 16 * 1024;
/** The released writer's slab: no room, so its next record takes a real one. */
const NO_SLAB = Buffer.alloc(0);
/** A batch without refs. */
const NO_REFS = new Float64Array(0);

/**
 * An empty list for Buffers that V8 already holds as a list of objects. A `[]` starts as a list
 * of small integers and changes its map at its first push: optimised code that saw only lists
 * past that point (a writer's later batches, a start-up warm-up) is thrown away the first time
 * it meets a fresh one, as every migration's new writer brought.
 */
function bufferList(): Buffer[] {
  const list = [NO_SLAB];
  list.pop();
  return list;
}
/** Free slabs kept for reuse: a 1 MiB batch in flight plus one being encoded, in 256 KiB slabs. */
const POOL_MAX = 16;

/** Numbers per ref in RefBatch.refs: piece, at, source, offset, length. */
export const REF_FIELDS = 5;
/** Refs a writer's first ref array holds (grown by doubling): 1 MiB of pages. */
const FIRST_REF_CAPACITY = 256;

/**
 * A flushed batch with its by-reference bytes apart (flushRefs()). The bytes it stands for are
 * each of `pieces` in turn with each ref's bytes inserted: ref k is `refs[5k .. 5k+4]` = piece,
 * at, source, offset, length, i.e. after byte `at` of `pieces[piece]`, bytes
 * `[offset, offset + length)` of `sources[source]`; refs are in stream order. Every ref's piece is
 * one of `pieces` (a batch whose last ref comes after its last encoded byte ends with an empty
 * piece to hold it).
 */
export interface RefBatch {
  pieces: Buffer[];
  refs: Float64Array;
  refCount: number;
  sources: Buffer[];
  /** Bytes the batch stands for: pieces and refs. */
  bytes: number;
}

/**
 * A RefBatch's bytes as Buffers, a view per ref, from byte `skip` on (nothing copied); at most
 * `maxChunks` of them (the first chunk alone: where a writer goes on after a partial write).
 */
export function refBatchBuffers(batch: RefBatch, skip = 0, maxChunks = Infinity): Buffer[] {
  const out: Buffer[] = [];
  let left = skip;
  const push = (b: Buffer): void => {
    if (left >= b.length) {
      left -= b.length;
      return;
    }
    out.push(left > 0 ? b.subarray(left) : b);
    left = 0;
  };
  let ref = 0;
  const { refs } = batch;
  for (let p = 0; p < batch.pieces.length && out.length < maxChunks; p++) {
    const piece = batch.pieces[p]!;
    let from = 0;
    for (; ref < batch.refCount && refs[ref * REF_FIELDS] === p && out.length < maxChunks; ref++) {
      const r = ref * REF_FIELDS;
      const at = refs[r + 1]!;
      if (at > from) push(piece.subarray(from, at));
      if (out.length >= maxChunks) return out;
      const offset = refs[r + 3]!;
      push(batch.sources[refs[r + 2]!]!.subarray(offset, offset + refs[r + 4]!));
      from = at;
    }
    if (out.length >= maxChunks) break;
    if (piece.length > from) push(from === 0 ? piece : piece.subarray(from));
  }
  return out;
}

/** What the writer knows of one of its standard-size slabs. */
interface Slab {
  readonly buf: Buffer;
  /** Pieces of this slab handed out by flush() (or pending) and not recycled yet. */
  pieces: number;
  /** No longer the current slab: nothing more will be encoded into it until it is reused. */
  sealed: boolean;
}

export class BatchWriter {
  private readonly slabSize: number;
  private slab: Buffer;
  private dataView: DataView;
  private start = 0;
  private pos = 0;
  private out: Buffer[] = bufferList();
  private current: Slab | undefined;
  private readonly pool: SlabPool;
  /**
   * Slabs by their ArrayBuffer (each slab has its own): recycle() finds a piece's slab even
   * after a transport has cut the piece shorter. Weak, so slabs nobody recycles are collected.
   */
  private readonly slabs = new WeakMap<ArrayBufferLike, Slab>();
  private allocated = 0;
  /** Bytes encoded since creation (flushed or not). */
  totalBytes = 0;
  /** view()'s refs since the last flush (see RefBatch), their sources, and their bytes. */
  private refs: Float64Array | undefined;
  private refCount = 0;
  private refSources: Buffer[] = bufferList();
  private refBytes = 0;

  constructor(options: BatchWriterOptions = {}) {
    this.slabSize = options.slabSize ?? DEFAULT_SLAB_BYTES;
    if (options.pool !== undefined && options.pool.slabSize !== this.slabSize) {
      throw new RangeError(`BatchWriter: a pool of ${options.pool.slabSize}-byte slabs for a writer of ${this.slabSize}-byte slabs`);
    }
    this.pool = options.pool ?? new SlabPool(this.slabSize, POOL_MAX * this.slabSize);
    this.slab = this.take(this.slabSize);
    this.dataView = new DataView(this.slab.buffer, this.slab.byteOffset, this.slab.byteLength);
  }

  /** Slabs allocated since creation (reused ones not counted): stays flat when batches are recycled. */
  get slabsAllocated(): number {
    return this.allocated;
  }

  /** Free slabs waiting to be reused. */
  get slabsPooled(): number {
    return this.pool.free.length;
  }

  /** A slab of at least `size` bytes: from the pool when it is the standard size, else new. */
  private take(size: number): Buffer {
    let buf = size === this.slabSize ? this.pool.take() : undefined;
    if (buf === undefined) {
      buf = Buffer.allocUnsafeSlow(size);
      this.allocated++;
      if (size === this.slabSize) this.pool.allocated++;
    }
    if (size === this.slabSize) {
      const slab: Slab = { buf, pieces: 0, sealed: false };
      this.slabs.set(buf.buffer, slab);
      this.current = slab;
    } else {
      this.current = undefined;
    }
    return buf;
  }

  private toPool(slab: Slab): void {
    this.slabs.delete(slab.buf.buffer);
    this.pool.give(slab.buf);
  }

  /**
   * The writer is done (its migration ended): its current slab goes back to the pool now, and
   * each slab still out in a batch when that batch is recycled, instead of all of them waiting
   * for a full GC. Anything encoded and not flushed is dropped. The writer stays usable: it
   * takes a slab again at its next record.
   */
  release(): void {
    this.discard();
    const current = this.current;
    if (current !== undefined) {
      current.sealed = true;
      if (current.pieces === 0) this.toPool(current);
    }
    this.current = undefined;
    this.slab = NO_SLAB;
    this.dataView = new DataView(NO_SLAB.buffer, NO_SLAB.byteOffset, 0);
    this.start = 0;
    this.pos = 0;
  }

  /** Bytes encoded but not yet flushed. */
  get pendingBytes(): number {
    let n = this.pos - this.start + this.refBytes;
    for (const b of this.out) n += b.length;
    return n;
  }

  /** Make room for n contiguous bytes in the current slab. */
  private ensure(n: number): void {
    if (this.pos + n <= this.slab.length) return;
    this.seal();
    const full = this.current;
    if (full !== undefined) {
      full.sealed = true;
      if (full.pieces === 0) this.toPool(full);
    }
    this.slab = this.take(Math.max(this.slabSize, n));
    this.dataView = new DataView(this.slab.buffer, this.slab.byteOffset, this.slab.byteLength);
    this.start = 0;
    this.pos = 0;
  }

  private seal(): void {
    if (this.pos > this.start) {
      this.out.push(this.slab.subarray(this.start, this.pos));
      this.start = this.pos;
      if (this.current !== undefined) this.current.pieces++;
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
   * bytes sent (a later guest write re-dirties the page anyway). Recorded as a ref: nothing is
   * allocated per call.
   */
  view(src: Buffer, offset: number, length: number): this {
    let source = this.refSources.length - 1;
    // A batch's refs come from a block or two: the last source is almost always the one.
    if (source < 0 || this.refSources[source] !== src) {
      source = this.refSources.indexOf(src);
      if (source < 0) source = this.refSources.push(src) - 1;
    }
    let refs = this.refs;
    if (refs === undefined || (this.refCount + 1) * REF_FIELDS > refs.length) {
      const grown = new Float64Array(Math.max(FIRST_REF_CAPACITY, 2 * this.refCount) * REF_FIELDS);
      if (refs !== undefined) grown.set(refs.subarray(0, this.refCount * REF_FIELDS));
      refs = this.refs = grown;
    }
    // Inserted at the current end of the pending piece: the next piece out.push() takes.
    const r = this.refCount++ * REF_FIELDS;
    refs[r] = this.out.length;
    refs[r + 1] = this.pos - this.start;
    refs[r + 2] = source;
    refs[r + 3] = offset;
    refs[r + 4] = length;
    this.refBytes += length;
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
   * Take everything encoded so far. The returned Buffers stay valid (their slabs are not reused)
   * until they are given back with recycle(); a batch never recycled is left to the GC. Refs
   * (view()) come as views of their sources, between the pieces.
   */
  flush(): Buffer[] {
    const batch = this.flushRefs();
    if (batch.refCount === 0) return batch.pieces;
    // Refs split pieces in two: each Buffer handed out counts as a piece of its slab (recycle()).
    const out = refBatchBuffers(batch);
    for (const b of batch.pieces) this.countPiece(b, -1);
    for (const b of out) this.countPiece(b, 1);
    return out;
  }

  private countPiece(b: Uint8Array, delta: number): void {
    const slab = this.slabs.get(b.buffer);
    if (slab !== undefined) slab.pieces += delta;
  }

  /**
   * Take everything encoded so far with view()'s refs apart (RefBatch): recycle(batch.pieces)
   * once it is written, as for flush().
   */
  flushRefs(): RefBatch {
    this.seal();
    const pieces = this.out;
    this.out = bufferList();
    let bytes = this.refBytes;
    for (const b of pieces) bytes += b.length;
    const refCount = this.refCount;
    const batch: RefBatch = { pieces, refs: NO_REFS, refCount, sources: refCount > 0 ? this.refSources : [], bytes };
    if (refCount > 0) {
      batch.refs = this.refs!;
      // A ref after the last piece: an empty piece to insert it into.
      if (this.refs![(refCount - 1) * REF_FIELDS] === pieces.length) pieces.push(NO_SLAB);
      // The batch keeps these until it is written: the next batch's refs start afresh.
      this.refs = undefined;
      this.refCount = 0;
      this.refSources = bufferList();
      this.refBytes = 0;
    }
    return batch;
  }

  /** Drop everything encoded and not yet flushed: never written, its slabs are free again. */
  discard(): void {
    this.recycle(this.flush());
  }

  /** Everything encoded so far as one Buffer (tests and small messages). */
  flushConcat(): Buffer {
    const parts = this.flush();
    const joined = parts.length === 1 ? Buffer.from(parts[0]!) : Buffer.concat(parts);
    this.recycle(parts); // copied: the slabs are free again
    return joined;
  }

  /**
   * A batch returned by flush() has been written out (its last write callback fired): its slabs
   * may be reused. Give back the same array flush() returned, once; a transport may have
   * replaced an element by a shorter view of it. Buffers that are not ours are ignored.
   */
  recycle(batch: readonly Uint8Array[]): void {
    for (const b of batch) {
      const slab = this.slabs.get(b.buffer);
      if (slab === undefined) continue;
      if (slab.pieces === 0) {
        throw new MigrationError(ErrorCode.INVALID_ARGUMENT, 'recycle() of a batch that was already recycled');
      }
      slab.pieces--;
      if (slab.pieces > 0) continue;
      if (slab.sealed) this.toPool(slab);
      else if (slab === this.current && this.start === this.pos) {
        // Nothing of the current slab is out or pending: encode from its start again.
        this.start = 0;
        this.pos = 0;
      }
    }
  }
}
