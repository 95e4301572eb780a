// ByteReader: an incremental view over a list of received chunks.
//
//   chunks:  [ consumed | head ........ ][ next ........ ][ last .... ]
//                       ^headPos
//   peeks are relative to the next unread byte (k = 0); nothing is consumed until skip(n).
//
// Decoders peek a whole record, check that it is all here (`available`), and only then skip it,
// so a short read keeps no partial state and any chunking gives identical results. Values are
// read straight out of the head chunk through one cached DataView; only a value that straddles
// two chunks takes the slow, byte-at-a-time path.

const EMPTY = Buffer.alloc(0);
/** Pages and smaller copies into shared memory go through this aligned buffer (see copyTo). */
const BOUNCE_BYTES = 4096;
const bounce = Buffer.allocUnsafeSlow(BOUNCE_BYTES);
/** Compact the chunk list once this many exhausted chunks have piled up at its front. */
const COMPACT_AFTER = 32;
/** retainUnread() copies into slabs of at least this size. */
const RETAIN_SLAB = 64 * 1024;

export class ByteReader {
  private chunks: Buffer[] = [];
  private head = 0;
  private headBuf: Buffer = EMPTY;
  private headView: DataView = new DataView(EMPTY.buffer, 0, 0);
  private headPos = 0;
  /** Unread bytes buffered. */
  available = 0;
  /** Stream offset of the next unread byte (bytes consumed since the start). */
  streamOffset = 0;
  /** Set by span(): where the returned buffer's bytes start. */
  spanOffset = 0;
  // locate()'s memo: chunk `memoChunk` starts at stream offset `memoStart`. It stays valid while
  // the head chunk (object, index, start offset) is the one it was taken under, so peeks and
  // scans far ahead walk the chunk list once, not once per call (a footer scan over thousands of
  // small chunks was quadratic).
  private memoChunk = -1;
  private memoStart = 0;
  private memoHead: Buffer = EMPTY;
  private memoHeadIndex = -1;
  private memoHeadStart = -1;
  /** Set by locate(): stream offset of the located chunk's first byte. */
  private locStart = 0;
  /** Memory retainUnread() copies borrowed chunks into; `tailFill` bytes of it are used. */
  private tail: Buffer = EMPTY;
  private tailFill = 0;
  /** ArrayBuffers of the copies retainUnread() made (chunks that are ours, not the caller's). */
  private readonly owned = new WeakSet<ArrayBufferLike>();

  constructor(startOffset = 0) {
    this.streamOffset = startOffset;
  }

  push(chunk: Uint8Array): void {
    if (chunk.byteLength === 0) return;
    const buf = Buffer.isBuffer(chunk) ? chunk : Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength);
    this.chunks.push(buf);
    this.available += buf.length;
    if (this.headBuf.length - this.headPos === 0) this.advanceHead();
  }

  /** Copy the unread bytes still in pushed chunks into memory of our own (the caller may then reuse that chunk memory). */
  retainUnread(): void {
    // Only the chunks pushed since the last call are borrowed; the ones before are copies we own
    // already. Copying all unread bytes on every call was quadratic while a large record (a
    // device section or VMDESCRIPTION of up to 16 MiB) arrived in many small reads.
    let f = this.chunks.length;
    while (f > this.head && !this.owned.has(this.chunks[f - 1]!.buffer)) f--;
    if (f === this.chunks.length) return;
    const from = f === this.head ? this.headPos : 0;
    let n = -from;
    for (let c = f; c < this.chunks.length; c++) n += this.chunks[c]!.length;
    const prev = f > this.head ? this.chunks[f - 1]! : undefined;
    const tail = this.tail;
    // Append to the previous copy when it ends where the tail's free space begins, else start a new chunk.
    const append = prev !== undefined && prev.buffer === tail.buffer && prev.byteOffset + prev.length === tail.byteOffset + this.tailFill && this.tailFill + n <= tail.length;
    if (!append && this.tailFill + n > tail.length) {
      this.tail = Buffer.allocUnsafeSlow(Math.max(RETAIN_SLAB, n));
      this.owned.add(this.tail.buffer);
      this.tailFill = 0;
    }
    const start = append ? prev!.byteOffset - this.tail.byteOffset : this.tailFill;
    let w = this.tailFill;
    for (let c = f; c < this.chunks.length; c++) {
      const src = this.chunks[c]!;
      w += src.copy(this.tail, w, c === f ? from : 0);
    }
    this.tailFill = w;
    const copy = this.tail.subarray(start, w);
    this.chunks.length = append ? f - 1 : f;
    this.chunks.push(copy);
    this.memoHeadIndex = -1; // chunk boundaries changed
    if (this.chunks.length - 1 === this.head) {
      // The head itself was replaced (by its copy, or by the extended previous copy).
      if (!append) this.headPos = 0;
      this.headBuf = copy;
      this.headView = new DataView(copy.buffer, copy.byteOffset, copy.byteLength);
    }
  }

  /** Unread bytes in the head chunk: peeks below this many read straight out of it. */
  get headAvailable(): number {
    return this.headBuf.length - this.headPos;
  }

  /**
   * The head chunk, a view of it, and where its next unread byte is: for a loop over many small
   * records in it that would otherwise make a call per value (up to headAvailable bytes on).
   */
  get headChunk(): Buffer {
    return this.headBuf;
  }

  get headChunkView(): DataView {
    return this.headView;
  }

  get headOffset(): number {
    return this.headPos;
  }

  /**
   * Forget the buffered, unread bytes (nothing is consumed): a reader of a file pushes them
   * again from `streamOffset`, read into the same buffer, instead of having them copied out.
   * Decoders peek a record whole before they consume it, so they resume on the same bytes.
   */
  dropUnread(): number {
    const dropped = this.available;
    this.chunks.length = 0;
    this.head = 0;
    this.headBuf = EMPTY;
    this.headView = new DataView(EMPTY.buffer, 0, 0);
    this.headPos = 0;
    this.available = 0;
    this.memoHeadIndex = -1;
    this.memoHead = EMPTY;
    return dropped;
  }

  /** Peek the byte k positions ahead (caller ensures k < available). */
  u8(k: number): number {
    const i = this.headPos + k;
    if (i < this.headBuf.length) return this.headBuf[i]!;
    return this.slowU8(k);
  }

  be16(k: number): number {
    const i = this.headPos + k;
    if (i + 2 <= this.headBuf.length) return this.headView.getUint16(i);
    return (this.slowU8(k) << 8) | this.slowU8(k + 1);
  }

  be32(k: number): number {
    const i = this.headPos + k;
    if (i + 4 <= this.headBuf.length) return this.headView.getUint32(i);
    return this.slowU8(k) * 0x1000000 + ((this.slowU8(k + 1) << 16) | (this.slowU8(k + 2) << 8) | this.slowU8(k + 3));
  }

  /** be64 as a number, or -1 when it is 2^53 or more (not exactly representable). */
  be64(k: number): number {
    const hi = this.be32(k);
    if (hi >= 0x200000) return -1;
    return hi * 0x100000000 + this.be32(k + 4);
  }

  /** Peek n bytes at k as a latin1 string (names are ASCII in practice). */
  latin1(k: number, n: number): string {
    const i = this.headPos + k;
    if (i + n <= this.headBuf.length) return this.headBuf.toString('latin1', i, i + n);
    let s = '';
    for (let j = 0; j < n; j++) s += String.fromCharCode(this.slowU8(k + j));
    return s;
  }

  /** copyTo's last target and whether it is shared memory (targets are a few RAM views, reused). */
  private sharedTarget: Uint8Array | undefined;
  private sharedTargetIs = false;

  private isShared(dst: Uint8Array): boolean {
    if (dst !== this.sharedTarget) {
      this.sharedTarget = dst;
      this.sharedTargetIs = dst.buffer instanceof SharedArrayBuffer;
    }
    return this.sharedTargetIs;
  }

  /** Copy n bytes starting k ahead into dst at dstOffset. */
  copyTo(k: number, n: number, dst: Uint8Array, dstOffset: number): void {
    // Nothing to copy; k may then equal `available` (an empty payload ending the buffered bytes),
    // where the chunk walk below would run off the list.
    if (n === 0) return;
    let i = this.headPos + k;
    if (i + n <= this.headBuf.length) {
      const src = this.headBuf;
      if (n <= BOUNCE_BYTES && this.isShared(dst) && ((src.byteOffset + i - dst.byteOffset - dstOffset) & 7) !== 0) {
        // V8 copies into shared memory word by word only when source and target are equally
        // aligned, byte by byte otherwise (1.5 µs a page here). A plain memmove into an aligned
        // bounce buffer first, then the word copy: 0.45 µs.
        src.copy(bounce, 0, i, i + n);
        bounce.copy(dst, dstOffset, 0, n);
        return;
      }
      src.copy(dst, dstOffset, i, i + n);
      return;
    }
    let c = this.head;
    let buf = this.chunks[c]!;
    while (i >= buf.length) {
      i -= buf.length;
      buf = this.chunks[++c]!;
    }
    while (n > 0) {
      const take = Math.min(n, buf.length - i);
      buf.copy(dst, dstOffset, i, i + take);
      dstOffset += take;
      n -= take;
      i = 0;
      if (n > 0) buf = this.chunks[++c]!;
    }
  }

  /** A fresh Buffer holding a copy of n bytes at k (for small values kept beyond this chunk). */
  copyOut(k: number, n: number): Buffer {
    const out = Buffer.allocUnsafeSlow(n);
    this.copyTo(k, n, out, 0);
    return out;
  }

  /** n bytes at k: a view of the head chunk when they lie in it (lent: valid while its memory is), else a fresh copy. */
  lend(k: number, n: number): Buffer {
    const i = this.headPos + k;
    if (i + n <= this.headBuf.length) return this.headBuf.subarray(i, i + n);
    return this.copyOut(k, n);
  }

  /**
   * n contiguous bytes at k without a copy when they lie in the head chunk, else copied into
   * `scratch` (length ≥ n). The bytes start at `this.spanOffset` in the returned buffer.
   */
  span(k: number, n: number, scratch: Buffer): Buffer {
    const i = this.headPos + k;
    if (i + n <= this.headBuf.length) {
      this.spanOffset = i;
      return this.headBuf;
    }
    this.copyTo(k, n, scratch, 0);
    this.spanOffset = 0;
    return scratch;
  }

  /** Relative position (≥ from) of the next `byte` among the buffered bytes, or -1. */
  indexOf(byte: number, from: number): number {
    let c = this.locate(Math.max(0, from));
    if (c < 0) return -1;
    let start = this.locStart;
    const target = this.streamOffset + Math.max(0, from);
    for (; c < this.chunks.length; c++) {
      const buf = this.chunks[c]!;
      const at = buf.indexOf(byte, Math.max(0, target - start));
      if (at >= 0) {
        this.remember(c, start);
        return start + at - this.streamOffset;
      }
      if (c + 1 === this.chunks.length) this.remember(c, start);
      start += buf.length;
    }
    return -1;
  }

  skip(n: number): void {
    this.available -= n;
    this.streamOffset += n;
    let left = this.headBuf.length - this.headPos;
    while (n >= left && n > 0) {
      n -= left;
      this.headPos = this.headBuf.length;
      if (!this.advanceHead()) break;
      left = this.headBuf.length;
    }
    this.headPos += n;
    if (this.headPos === this.headBuf.length) this.advanceHead();
  }

  private slowU8(k: number): number {
    const c = this.locate(k);
    if (c < 0) throw new RangeError(`ByteReader: peek ${k} past the ${this.available} buffered bytes`);
    return this.chunks[c]![this.streamOffset + k - this.locStart]!;
  }

  /** Index of the chunk holding the byte k ahead (its start in locStart), or -1 past the buffered bytes. */
  private locate(k: number): number {
    const target = this.streamOffset + k;
    const headStart = this.streamOffset - this.headPos;
    let c = this.head;
    let start = headStart;
    if (this.memoHead === this.headBuf && this.memoHeadIndex === this.head && this.memoHeadStart === headStart && this.memoChunk < this.chunks.length) {
      c = this.memoChunk;
      start = this.memoStart;
      // Peeks step back a little at times (a scan resumes just after the candidate it peeked past).
      while (start > target) start -= this.chunks[--c]!.length;
    }
    for (; c < this.chunks.length; c++) {
      const len = this.chunks[c]!.length;
      if (target < start + len) {
        this.remember(c, start);
        this.locStart = start;
        return c;
      }
      start += len;
    }
    return -1;
  }

  private remember(c: number, start: number): void {
    this.memoChunk = c;
    this.memoStart = start;
    this.memoHead = this.headBuf;
    this.memoHeadIndex = this.head;
    this.memoHeadStart = this.streamOffset - this.headPos;
  }

  /** Move to the next chunk once the head is exhausted; false when none is buffered. */
  private advanceHead(): boolean {
    // The head may be a chunk that is still in the list (exhausted) or EMPTY before the first push.
    if (this.chunks.length > 0 && this.chunks[this.head] === this.headBuf && this.headBuf !== EMPTY) {
      if (this.head + 1 >= this.chunks.length) {
        // Nothing after it: drop everything and wait for the next push.
        this.chunks.length = 0;
        this.head = 0;
        this.headBuf = EMPTY;
        this.headPos = 0;
        return false;
      }
      this.head++;
    }
    const next = this.chunks[this.head];
    if (next === undefined) return false;
    this.headBuf = next;
    this.headPos = 0;
    this.headView = new DataView(next.buffer, next.byteOffset, next.byteLength);
    if (this.head >= COMPACT_AFTER) {
      this.chunks.splice(0, this.head);
      this.head = 0;
    }
    return true;
  }
}
