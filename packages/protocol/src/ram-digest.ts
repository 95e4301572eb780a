// Per-block sha256 of the RAM a stream leaves behind, without rebuilding that RAM: a reader of a
// stream file (`livemig analyze`) keeps a few bytes per page instead of the pages.
//
// Each page's final bytes are recorded by where they are, not what they are:
//
//   where[page]  0            never written: zero
//                > 0          stream offset of the 4 KiB of its last PAGE record
//                -1 - fill    its last record was ZERO with this fill byte (-1: zero)
//                HELD         its bytes are in `held` (last record XBZRLE or COMPRESS_PAGE)
//
// While a block's pages come in ascending order, each written once (a stopped guest's single
// pass), its hash is fed as they pass and nothing is read again. The first page that breaks the
// order (a re-sent dirty page, a delta) turns the block to `rewalk`: at the end its image is
// walked page by page, the stream bytes read back through `readStreamBytes` in coalesced runs.
// Memory: 8 bytes per page, plus 4 KiB per page last written by XBZRLE or COMPRESS_PAGE.
// In-order pages are staged into one 64 KiB buffer and hashed 16 at a time: no hash call per page.

import { createSha256, type Hash } from './lazy-builtins.ts';
import { TARGET_PAGE_SIZE } from './constants.ts';
import type { RamBlockInfo } from './ram.ts';
import type { PageObserver } from './ram-record-decoder.ts';

/** Read `length` bytes of the stream at `streamOffset` into dst[dstOffset…] (synchronously). */
export type ReadStreamBytes = (streamOffset: number, dst: Uint8Array, dstOffset: number, length: number) => void;

const HELD = -1000;
/** Zeros fed to a hash for never-written and zero-filled runs, this many bytes at a time. */
const ZEROS = new Uint8Array(256 * 1024);
/** Largest read-back of stream bytes while walking a block: this many bytes per read. */
const WALK_WINDOW = 1024 * 1024;
const STAGE_BYTES = 64 * 1024;

interface BlockState {
  readonly pageCount: number;
  readonly where: Float64Array;
  readonly held: Map<number, Uint8Array>;
  /** The hash fed in page order while `rewalk` is false; the next page index it expects. */
  hash: Hash;
  cursor: number;
  rewalk: boolean;
}

export class RamDigests implements PageObserver {
  private blocks: BlockState[] = [];
  private window: Buffer | undefined;
  private fillPage: Uint8Array | undefined;
  /** In-order bytes not yet hashed, all of block `stageOwner` (-1: none). */
  private readonly stage = Buffer.allocUnsafeSlow(STAGE_BYTES);
  private stageFill = 0;
  private stageOwner = -1;

  private readonly readStreamBytes: ReadStreamBytes;

  constructor(readStreamBytes: ReadStreamBytes) {
    this.readStreamBytes = readStreamBytes;
  }

  /**
   * The stream's block list (MEM_SIZE). A mapped-ram list is handed over as it grows, the earlier
   * blocks repeated: those keep their state.
   */
  attach(blocks: readonly RamBlockInfo[]): void {
    const before = this.blocks;
    this.blocks = blocks.map((b, i) => {
      const pageCount = Math.ceil(b.length / TARGET_PAGE_SIZE);
      const kept = before[i];
      if (kept !== undefined && kept.pageCount === pageCount && blocks.length > before.length) return kept;
      return { pageCount, where: new Float64Array(pageCount), held: new Map(), hash: createSha256(), cursor: 0, rewalk: false };
    });
  }

  pageData(blockIndex: number, pageOffset: number, src: Uint8Array, srcOffset: number, dataStreamOffset: number): void {
    const b = this.blocks[blockIndex]!;
    const page = pageOffset / TARGET_PAGE_SIZE;
    if (dataStreamOffset < 0) {
      // Not in the stream as it is (inflated): keep the bytes.
      b.held.set(page, Uint8Array.prototype.slice.call(src, srcOffset, srcOffset + TARGET_PAGE_SIZE));
      b.where[page] = HELD;
    } else {
      if (b.held.size > 0) b.held.delete(page);
      b.where[page] = dataStreamOffset;
    }
    if (b.rewalk) return;
    if (page < b.cursor) {
      this.turnToRewalk(blockIndex, b);
      return;
    }
    this.stageZeros(blockIndex, b, (page - b.cursor) * TARGET_PAGE_SIZE);
    this.stageFor(blockIndex);
    copyBytes(src, srcOffset, this.stage, this.stageFill, TARGET_PAGE_SIZE);
    this.stageFill += TARGET_PAGE_SIZE;
    b.cursor = page + 1;
  }

  pageFill(blockIndex: number, pageOffset: number, fill: number): void {
    const b = this.blocks[blockIndex]!;
    const page = pageOffset / TARGET_PAGE_SIZE;
    if (b.held.size > 0) b.held.delete(page);
    b.where[page] = -1 - fill;
    if (b.rewalk) return;
    if (page < b.cursor) {
      this.turnToRewalk(blockIndex, b);
      return;
    }
    if (fill === 0) this.stageZeros(blockIndex, b, (page + 1 - b.cursor) * TARGET_PAGE_SIZE);
    else {
      this.stageZeros(blockIndex, b, (page - b.cursor) * TARGET_PAGE_SIZE);
      this.stageFor(blockIndex);
      this.stage.fill(fill, this.stageFill, this.stageFill + TARGET_PAGE_SIZE);
      this.stageFill += TARGET_PAGE_SIZE;
    }
    b.cursor = page + 1;
  }

  /** Out of order: the running hash is of no more use (the image is walked at the end). */
  private turnToRewalk(index: number, b: BlockState): void {
    b.rewalk = true;
    if (this.stageOwner === index) {
      this.stageFill = 0;
      this.stageOwner = -1;
    }
  }

  /** Make room for one page of block `index` in the stage (hashing what is there if full or another block's). */
  private stageFor(index: number): void {
    if (this.stageOwner !== index || this.stageFill === STAGE_BYTES) this.flushStage();
    this.stageOwner = index;
  }

  private flushStage(): void {
    if (this.stageFill > 0) this.blocks[this.stageOwner]!.hash.update(this.stage.subarray(0, this.stageFill));
    this.stageFill = 0;
    this.stageOwner = -1;
  }

  /** `n` zero bytes (whole pages) in order: staged when few, else hashed straight from ZEROS. */
  private stageZeros(index: number, b: BlockState, n: number): void {
    if (n === 0) return;
    if (n === TARGET_PAGE_SIZE) {
      this.stageFor(index);
      this.stage.fill(0, this.stageFill, this.stageFill + TARGET_PAGE_SIZE);
      this.stageFill += TARGET_PAGE_SIZE;
      return;
    }
    if (this.stageOwner === index) this.flushStage();
    feedZeros(b.hash, n);
  }

  pageForDelta(blockIndex: number, pageOffset: number): Uint8Array {
    const b = this.blocks[blockIndex]!;
    const page = pageOffset / TARGET_PAGE_SIZE;
    if (!b.rewalk) this.turnToRewalk(blockIndex, b);
    const v = b.where[page]!;
    if (v === HELD) return b.held.get(page)!;
    const bytes = new Uint8Array(TARGET_PAGE_SIZE);
    if (v > 0) this.readStreamBytes(v, bytes, 0, TARGET_PAGE_SIZE);
    else if (v < -1) bytes.fill(-1 - v);
    b.held.set(page, bytes);
    b.where[page] = HELD;
    return bytes;
  }

  /** sha256 (hex) of a block's final image. */
  sha256(blockIndex: number): string {
    const b = this.blocks[blockIndex]!;
    if (!b.rewalk) {
      if (this.stageOwner === blockIndex) this.flushStage();
      feedZeros(b.hash, (b.pageCount - b.cursor) * TARGET_PAGE_SIZE);
      b.cursor = b.pageCount;
      b.rewalk = true; // the hash is spent: a second call walks
      const hex = b.hash.digest('hex');
      b.hash = createSha256();
      return hex;
    }
    const hash = createSha256();
    this.walk(blockIndex, (bytes) => hash.update(bytes));
    return hash.digest('hex');
  }

  /**
   * Hand a block's final image to `emit`, in order, in pieces (each lent for the call only).
   * Reads stream bytes back; works after sha256() too.
   */
  walk(blockIndex: number, emit: (bytes: Uint8Array) => void): void {
    const b = this.blocks[blockIndex]!;
    const where = b.where;
    const win = (this.window ??= Buffer.allocUnsafeSlow(WALK_WINDOW));
    let winStart = 0;
    let winEnd = 0;
    for (let i = 0; i < b.pageCount; ) {
      const v = where[i]!;
      if (v === 0 || v === -1) {
        let j = i + 1;
        while (j < b.pageCount && (where[j] === 0 || where[j] === -1)) j++;
        emitZeros(emit, (j - i) * TARGET_PAGE_SIZE);
        i = j;
        continue;
      }
      if (v === HELD) emit(b.held.get(i)!);
      else if (v < 0) emit(this.filled(-1 - v));
      else {
        if (v < winStart || v + TARGET_PAGE_SIZE > winEnd) {
          // Read this page and the following ones that lie after it within one window.
          let end = v + TARGET_PAGE_SIZE;
          for (let j = i + 1; j < b.pageCount; j++) {
            const w = where[j]!;
            if (w < end || w + TARGET_PAGE_SIZE - v > WALK_WINDOW) break;
            end = w + TARGET_PAGE_SIZE;
          }
          this.readStreamBytes(v, win, 0, end - v);
          winStart = v;
          winEnd = end;
        }
        emit(win.subarray(v - winStart, v - winStart + TARGET_PAGE_SIZE));
      }
      i++;
    }
  }

  private filled(fill: number): Uint8Array {
    const p = (this.fillPage ??= new Uint8Array(TARGET_PAGE_SIZE));
    if (p[0] !== fill || p[TARGET_PAGE_SIZE - 1] !== fill) p.fill(fill);
    return p;
  }
}

function feedZeros(hash: Hash, n: number): void {
  for (; n >= ZEROS.length; n -= ZEROS.length) hash.update(ZEROS);
  if (n > 0) hash.update(ZEROS.subarray(0, n));
}

function emitZeros(emit: (bytes: Uint8Array) => void, n: number): void {
  for (; n >= ZEROS.length; n -= ZEROS.length) emit(ZEROS);
  if (n > 0) emit(ZEROS.subarray(0, n));
}

/**
 * Buffer's native copy. In Node 20 a partial range still makes a view of the source per call
 * (~90 ns; ~12 MB of young garbage per 512 MiB of pages), but what avoids it costs more: one copy
 * per 16 pages compacted with copyWithin took ~1.2-1.6× the time per page, and a JS word loop
 * needs an alignment the stream does not give. And a probe copying from a whole 4 KiB buffer
 * instead (no view) ran `livemig analyze` of a 512 MiB stream in the same CPU time, with ~1.5 MiB
 * less peak RSS.
 */
const nativeCopy = Buffer.prototype.copy;
function copyBytes(src: Uint8Array, srcOffset: number, dst: Uint8Array, dstOffset: number, n: number): void {
  nativeCopy.call(src, dst, dstOffset, srcOffset, srcOffset + n);
}
