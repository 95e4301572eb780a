// The sending path warmed up when the process starts: a source process usually migrates once, so
// every real migration would otherwise run its first megabytes in V8's interpreter and pay for
// compiling the per-page code (RamSaver's scan, the zero test, the record writer, the batch's
// refs) while it sends. Measured on a two-core AMD EPYC machine, 256 MiB random guest, six fresh
// sources of each kind alternating, medians of their first migration: source CPU over all its
// threads 178 -> 131 ms, total-time 187 -> 157 ms. The multifd scan beside it (same machine and
// guest, 2 channels, six of each alternating): source CPU 128 -> 112 ms, total-time 136 -> 130 ms,
// where V8 had recompiled the scan at its multifd branch. Costs 10-22 ms at start-up (6-13 before
// the multifd scan). e2e/warm-up.test.ts checks that the per-page functions are optimised before
// a migration, stay so while the process waits (what the warm-up made is kept: keepForProcessLife),
// and that the migration throws none of that code away.

import { closeSync, openSync } from 'node:fs';
import { PassThrough } from 'node:stream';
import type { Guest } from '@livemig/guest';
import { native } from '@livemig/native';
import { BatchWriter } from '@livemig/protocol';
import { keepForProcessLife } from '@livemig/runtime';
import { MAIN_CHANNEL_SLABS, monotonicNow } from './migration.ts';
import { MultifdSender } from './multifd-sender.ts';
import { BATCH_BYTES } from './batch-size.ts';
import { MAX_ITERATION_MS } from './precopy.ts';
import { iterationDeadline, RamSaver } from './ram-saver.ts';

/** Pages the warm-up sends (16 MiB): enough for V8 to optimise the per-page path. */
const WARM_UP_PAGES = 4096;
/** Its batches: 256 KiB (64 of them over the warm-up's pages). */
const WARM_UP_BATCH_BYTES = BATCH_BYTES / 4;
/**
 * The one-stream scan's first batch: more pages than a writer's first ref array holds, so that
 * V8 sees the array grow (a migration's 4 MiB batches grow it twice) before it optimises.
 */
const WARM_UP_FIRST_BATCH_BYTES = 2 * BATCH_BYTES;
/** Batches of one writer before the warm-up takes a new one. */
const WRITER_BATCHES = 4;
/** A bound on the batches, whatever the guest's pages are. */
const WARM_UP_MAX_BATCHES = 256;
/** The multifd scan's channels (its packets rotate over them as a migration's do). */
const WARM_UP_MULTIFD_CHANNELS = 2;
/** What a kept warm-up scan's bitmaps become. */
const NO_PAGES = new Uint32Array(0);

/**
 * Encode the guest's first pages as a migration does, into batches written to /dev/null with the
 * native writev (the kernel discards them), or flushed as Buffers without the addon. Two scans
 * take turns batch by batch, so that V8 sees both kinds of migration from the start: one on the
 * main channel alone, one (with the addon) whose normal and zero pages go to multifd channels
 * (the 9.0+ dialect; the other writes ZERO records). Only reads guest RAM: each scan's RamSaver
 * is its own (its bitmaps, not the guest's dirty log). Returns the pages encoded.
 */
export function warmUpSender(guest: Guest): number {
  const fd = native.available ? openSync('/dev/null', 'w') : -1;
  const streams = fd >= 0 ? Array.from({ length: WARM_UP_MULTIFD_CHANNELS }, () => new PassThrough()) : [];
  const multifd = fd >= 0 ? new MultifdSender(streams, { initSent: true }) : undefined;
  const scans = [scanOfFirstPages(guest, undefined)];
  if (multifd !== undefined) scans.push(scanOfFirstPages(guest, multifd));
  const encoded = scans.reduce((n, ram) => n + ram.dirtyPages, 0);
  // All of it stays reachable: the code it optimises would be thrown away with it.
  keepForProcessLife(scans, streams, ...(multifd === undefined ? [] : [multifd]));
  let w: BatchWriter | undefined;
  try {
    // As precopy's batches, with differences that let V8 see what migrations show it: each batch
    // starts with no block named (a migration's first record compares against none), has a
    // deadline of its own (a section's is a new closure each time), every other one a size that
    // is not a whole number (a bandwidth limit's allowance), and every WRITER_BATCHES batches a
    // new writer comes (each migration brings its own). The multifd scan's every fourth batch
    // ends with a sync point (a RAM section's end, or a scan's).
    for (let batches = 0; batches < WARM_UP_MAX_BATCHES && scans.some((ram) => ram.dirtyPages > 0); batches++) {
      if (batches % WRITER_BATCHES === 0) {
        w?.release();
        w = new BatchWriter({ pool: MAIN_CHANNEL_SLABS });
        keepForProcessLife(w);
      }
      const turn = batches % scans.length;
      const ram = scans[turn]!;
      if (ram.dirtyPages === 0) continue;
      ram.forgetBlock();
      const deadline = iterationDeadline(monotonicNow, monotonicNow(), MAX_ITERATION_MS);
      ram.saveIterate(w!, batches === 0 ? WARM_UP_FIRST_BATCH_BYTES : WARM_UP_BATCH_BYTES + (batches & 1) / 2, deadline);
      if (turn === 1 && batches % 8 === 7) ram.syncMultifd(w!);
      if (fd >= 0) {
        const batch = w!.flushRefs();
        native.writeRefs(fd, batch.pieces, batch.refs, batch.refCount, batch.sources, 0);
        w!.recycle(batch.pieces);
        multifd?.writeSealedTo(fd);
      } else {
        w!.recycle(w!.flush());
      }
    }
  } finally {
    // The scans stay (kept above) but not their bitmaps, sized to the whole guest (RAM / 16384
    // each): arrays of the same kind in their place leave the optimised code as it is.
    for (const ram of scans) ram.bitmaps.fill(NO_PAGES);
    w?.release();
    multifd?.release();
    for (const s of streams) s.destroy();
    if (fd >= 0) closeSync(fd);
  }
  return scans.reduce((n, ram) => n - ram.dirtyPages, encoded);
}

/** A scan of its own over the first WARM_UP_PAGES pages of RAM; `multifd` takes its normal and zero pages. */
function scanOfFirstPages(guest: Guest, multifd: MultifdSender | undefined): RamSaver {
  const ram = new RamSaver(guest, multifd === undefined ? { xbzrleCacheBytes: 0 } : { xbzrleCacheBytes: 0, multifd, multifdZeroPages: true });
  ram.pagesByReference = native.available;
  let left = WARM_UP_PAGES;
  for (const [i, block] of guest.ram.blocks.entries()) {
    const pages = Math.min(left, block.pageCount);
    const bm = ram.bitmaps[i]!;
    for (let p = 0; p < pages; p++) bm[p >>> 5] = (bm[p >>> 5]! | (1 << (p & 31))) >>> 0;
    ram.dirtyPages += pages;
    left -= pages;
    if (left === 0) break;
  }
  return ram;
}
