// The guest's dirty rate by page sampling, as QEMU 7.2's calc-dirty-rate mode "page-sampling":
// hash a random sample of pages of every RAM block, wait, hash them again, and scale the share
// that changed by the block's size. It reads guest RAM and nothing else: the dirty log is left
// alone, so a migration running meanwhile loses no dirty bit.
//
//   per block:  pages   [ p0 | p1 | … ]   Uint32Array, random page numbers
//               hashes  [ h0 | h1 | … ]   Uint32Array, crc32 of each page at the start
//   rate (MiB/s) = Σ_blocks (changed / sampled) · blockMiB / seconds

import { crc32 } from 'node:zlib';
import { TARGET_PAGE_SIZE } from '@livemig/protocol';
import type { GuestRam } from './ram.ts';

const MiB = 2 ** 20;
const GiB = 2 ** 30;

/** QEMU 7.2's default sample-pages (per GiB) and its accepted range. */
export const DIRTY_RATE_DEFAULT_SAMPLE_PAGES = 512;
export const DIRTY_RATE_MIN_SAMPLE_PAGES = 128;
export const DIRTY_RATE_MAX_SAMPLE_PAGES = 16384;

interface BlockSample {
  blockIndex: number;
  pages: Uint32Array;
  hashes: Uint32Array;
}

function pageHash(ram: GuestRam, blockIndex: number, page: number): number {
  const b = ram.blocks[blockIndex]!;
  return crc32(new Uint8Array(b.memory, page * TARGET_PAGE_SIZE, TARGET_PAGE_SIZE));
}

/**
 * One measurement: `start()` takes the first hashes, `finish()` the second and gives the rate.
 * Unlike QEMU, which skips blocks under 128 MiB, every block gets at least one sampled page, so
 * a small guest is measured too.
 */
export class DirtyRateSample {
  readonly #ram: GuestRam;
  readonly #blocks: BlockSample[];
  readonly #startedAt: number;

  private constructor(ram: GuestRam, blocks: BlockSample[], startedAt: number) {
    this.#ram = ram;
    this.#blocks = blocks;
    this.#startedAt = startedAt;
  }

  /** Hash `samplePagesPerGiB` random pages per GiB of each block (at least one per block). */
  static start(ram: GuestRam, samplePagesPerGiB: number, now = performance.now()): DirtyRateSample {
    const blocks = ram.blocks.map((b, blockIndex) => {
      const count = Math.min(b.pageCount, Math.max(1, Math.round((samplePagesPerGiB * b.length) / GiB)));
      const pages = new Uint32Array(count);
      const hashes = new Uint32Array(count);
      for (let i = 0; i < count; i++) {
        pages[i] = Math.floor(Math.random() * b.pageCount);
        hashes[i] = pageHash(ram, blockIndex, pages[i]!);
      }
      return { blockIndex, pages, hashes };
    });
    return new DirtyRateSample(ram, blocks, now);
  }

  /** Pages sampled in all (for the record). */
  get sampledPages(): number {
    return this.#blocks.reduce((n, b) => n + b.pages.length, 0);
  }

  /** Hash the same pages again: the estimated dirty rate in MiB/s (QEMU's "MB/s"), rounded. */
  finish(now = performance.now()): number {
    const seconds = (now - this.#startedAt) / 1000;
    if (!(seconds > 0)) return 0;
    let dirtyMiB = 0;
    for (const s of this.#blocks) {
      let changed = 0;
      for (let i = 0; i < s.pages.length; i++) if (pageHash(this.#ram, s.blockIndex, s.pages[i]!) !== s.hashes[i]) changed++;
      dirtyMiB += (changed / s.pages.length) * (this.#ram.blocks[s.blockIndex]!.length / MiB);
    }
    return Math.round(dirtyMiB / seconds);
  }
}
