// RamRecordDecoder's page runs (page-runs.ts): runs of CONTINUE PAGE and ZERO records for a block it
// does not store are taken in a small loop of their own. Whatever the chunking, a memoryless
// decode (observer or counting only) must see the pages, counts and errors of a decode into memory,
// which never takes that loop.

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { NEED_MORE, RamFlag, RamRecordDecoder, TARGET_PAGE_SIZE, type PageObserver, type RamBlockInfo } from '../src/index.ts';
import { xorshift32 } from './prng.ts';

const PAGE = TARGET_PAGE_SIZE;

const BLOCKS: RamBlockInfo[] = [
  { idstr: 'pc.ram', length: 64 * PAGE },
  { idstr: 'vga.vram', length: 16 * PAGE },
];

function header(pageOffset: number, flags: number): Buffer {
  const h = Buffer.alloc(8);
  h.writeUInt32BE(Math.floor(pageOffset / 2 ** 32), 0);
  h.writeUInt32BE((pageOffset % 2 ** 32) | flags, 4);
  return h;
}

/** Bare RAM records ended by EOS: runs of CONTINUE records, a named record at each block switch; `bad` puts one offset past the block's end. */
function records(seed: number, bad: boolean, zeroHeavy = false): Buffer {
  const rnd = xorshift32(seed);
  const parts: Buffer[] = [];
  let block = -1;
  const count = zeroHeavy ? 200 + rnd(400) : 40 + rnd(200);
  const badAt = bad ? rnd(count) : -1;
  for (let i = 0; i < count; i++) {
    const switchTo = block < 0 || rnd(16) === 0 ? rnd(BLOCKS.length) : block;
    const b = BLOCKS[switchTo]!;
    const pages = b.length / PAGE;
    // Zero-heavy: mostly runs of ascending pages, as a fresh guest's first pass sends them.
    const offset = i === badAt ? b.length + PAGE * rnd(3) : zeroHeavy && rnd(8) !== 0 ? (i * PAGE) % b.length : rnd(pages) * PAGE;
    const zero = zeroHeavy ? rnd(10) !== 0 : rnd(3) === 0;
    const named = switchTo !== block;
    parts.push(header(offset, (zero ? RamFlag.ZERO : RamFlag.PAGE) | (named ? 0 : RamFlag.CONTINUE)));
    if (named) parts.push(Buffer.from([b.idstr.length]), Buffer.from(b.idstr, 'latin1'));
    if (zero) parts.push(Buffer.from([rnd(zeroHeavy ? 12 : 2) !== 0 ? 0 : 1 + rnd(255)]));
    else {
      const page = Buffer.alloc(PAGE);
      for (let j = 0; j < PAGE; j += 512) page[j] = 1 + rnd(255);
      parts.push(page);
    }
    block = switchTo;
  }
  parts.push(header(0, RamFlag.EOS));
  return Buffer.concat(parts);
}

interface Outcome {
  images: Buffer[];
  stats: unknown;
  ended: boolean;
  error?: { code: string; streamOffset: number | undefined };
}

/** Feed `bytes` cut at `cuts`, each chunk in a buffer of its own overwritten after the call (only retained bytes may be read later). */
function feedInChunks(dec: RamRecordDecoder, bytes: Buffer, cuts: number[], images: Buffer[]): Outcome {
  const out: Outcome = { images, stats: undefined, ended: false };
  try {
    let at = 0;
    for (const cut of [...cuts, bytes.length]) {
      const chunk = Buffer.from(bytes.subarray(at, cut));
      dec.push(chunk);
      out.ended = dec.next() !== NEED_MORE;
      dec.retainUnread();
      chunk.fill(0xa5);
      at = cut;
    }
  } catch (err) {
    if (err instanceof assert.AssertionError) throw err;
    const e = err as { code: string; streamOffset?: number };
    out.error = { code: e.code, streamOffset: e.streamOffset };
  }
  out.stats = dec.blockStats().map((s) => ({ ...s }));
  return out;
}

function decode(bytes: Buffer, cuts: number[], into: 'memory' | 'observer' | 'count'): Outcome {
  const images = BLOCKS.map((b) => Buffer.alloc(b.length));
  const observer: PageObserver = {
    pageData: (block, pageOffset, src, srcOffset) => void images[block]!.set(src.subarray(srcOffset, srcOffset + PAGE), pageOffset),
    pageFill: (block, pageOffset, fill) => void images[block]!.fill(fill, pageOffset, pageOffset + PAGE),
    pageForDelta: () => assert.fail('no XBZRLE here'),
  };
  const dec = RamRecordDecoder.forPreemptChannel(
    {
      attachBlocks: () => (into === 'memory' ? images : BLOCKS.map(() => undefined)),
      ...(into === 'observer' ? { pages: observer } : {}),
    },
    BLOCKS,
  );
  return feedInChunks(dec, bytes, cuts, images);
}

function cutsFor(seed: number, length: number): number[] {
  const rnd = xorshift32(seed * 7 + 1);
  const cuts: number[] = [];
  const step = [3, 13, 4093, 4104, 9, 65536][rnd(6)]!;
  for (let at = rnd(step) + 1; at < length; at += 1 + rnd(2 * step)) cuts.push(at);
  return cuts;
}

describe('RamRecordDecoder page runs', () => {
  for (const bad of [false, true]) {
    it(`a memoryless decode sees what a decode into memory sees, in any chunking${bad ? ', up to the same bad offset' : ''}`, () => {
      for (let seed = 1; seed <= 24; seed++) {
        const bytes = records(seed, bad);
        const whole = decode(bytes, [], 'memory');
        assert.equal(whole.error?.code, bad ? 'LM_ERR_ILLEGAL_RAM_OFFSET' : undefined, `seed ${seed}`);
        for (const cuts of [[], cutsFor(seed, bytes.length)]) {
          const seen = decode(bytes, cuts, 'observer');
          assert.equal(seen.ended, !bad, `seed ${seed}: EOS`);
          assert.deepEqual(seen.images, whole.images, `seed ${seed}: pages`);
          assert.deepEqual(seen.stats, whole.stats, `seed ${seed}: counts`);
          assert.deepEqual(seen.error, whole.error, `seed ${seed}: error`);
          const counted = decode(bytes, cuts, 'count');
          assert.deepEqual(counted.stats, whole.stats, `seed ${seed}: counts only`);
          assert.deepEqual(counted.error, whole.error, `seed ${seed}: counts only, error`);
        }
      }
    });
  }
});

/** Decoded into zeroed memory, with or without the decoder knowing it is zeroed. */
function decodeIntoZeroed(bytes: Buffer, cuts: number[], zeroedMemory: boolean): Outcome {
  const images = BLOCKS.map((b) => Buffer.alloc(b.length));
  const dec = new RamRecordDecoder({ ram: { attachBlocks: () => images }, zeroedMemory });
  dec.installBlocks(BLOCKS.map((b) => ({ ...b })), 0);
  return feedInChunks(dec, bytes, cuts, images);
}

describe('RamRecordDecoder runs of still-zero pages (zeroedMemory)', () => {
  for (const bad of [false, true]) {
    it(`skipping them leaves what writing them leaves, in any chunking${bad ? ', up to the same bad offset' : ''}`, () => {
      for (let seed = 1; seed <= 24; seed++) {
        const bytes = records(seed, bad, true);
        const written = decodeIntoZeroed(bytes, [], false);
        assert.equal(written.error?.code, bad ? 'LM_ERR_ILLEGAL_RAM_OFFSET' : undefined, `seed ${seed}`);
        for (const cuts of [[], cutsFor(seed, bytes.length)]) {
          const skipped = decodeIntoZeroed(bytes, cuts, true);
          assert.equal(skipped.ended, !bad, `seed ${seed}: EOS`);
          assert.deepEqual(skipped.images, written.images, `seed ${seed}: pages`);
          assert.deepEqual(skipped.stats, written.stats, `seed ${seed}: counts`);
          assert.deepEqual(skipped.error, written.error, `seed ${seed}: error`);
        }
      }
    });
  }
});
