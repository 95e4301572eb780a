// RamDigests (ram-digest.ts): the sha256 and the walked image of each block equal those of the
// block rebuilt in memory, whatever order, repetition and record kinds the pages come in.

import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { describe, it } from 'node:test';
import { RamDigests, TARGET_PAGE_SIZE } from '../src/index.ts';
import { xorshift32 } from './prng.ts';

const PAGE = TARGET_PAGE_SIZE;

interface Run {
  digests: RamDigests;
  images: Buffer[];
  readBacks: number;
}

/**
 * Feed `ops` random page records for blocks of these page counts, mirrored into in-memory
 * images. PAGE data lives in a fake stream (read back by offset); XBZRLE is modelled by patching
 * the page the digests hand over, as the decoder does.
 */
function run(seed: number, pageCounts: number[], ops: number, kinds: { ordered?: boolean } = {}): Run {
  const rnd = xorshift32(seed);
  const stream = Buffer.alloc((ops + 1) * (PAGE + 8));
  let streamEnd = 8;
  let readBacks = 0;
  const digests = new RamDigests((at, dst, dstOffset, length) => {
    readBacks++;
    assert.ok(at >= 8 && at + length <= streamEnd, `read-back ${at}+${length} inside what was streamed`);
    dst.set(stream.subarray(at, at + length), dstOffset);
  });
  digests.attach(pageCounts.map((n, i) => ({ idstr: `b${i}`, length: n * PAGE })));
  const images = pageCounts.map((n) => Buffer.alloc(n * PAGE));
  const next = pageCounts.map(() => 0);
  for (let k = 0; k < ops; k++) {
    const b = rnd(pageCounts.length);
    let page: number;
    if (kinds.ordered === true) {
      if (next[b]! >= pageCounts[b]!) continue;
      page = next[b]! + rnd(3); // gaps of never-written pages too
      if (page >= pageCounts[b]!) page = pageCounts[b]! - 1;
      next[b] = page + 1;
    } else page = rnd(pageCounts[b]!);
    const img = images[b]!;
    const kind = kinds.ordered === true ? rnd(3) : rnd(5);
    if (kind === 0 || kind === 3) {
      // PAGE: 8-byte header, then the data (its stream offset is what the digests keep).
      streamEnd += 8;
      const at = streamEnd;
      for (let i = 0; i < PAGE; i += 64) stream[at + i] = rnd(256);
      stream.copy(img, page * PAGE, at, at + PAGE);
      streamEnd += PAGE;
      if (kind === 3) {
        // An inflated COMPRESS_PAGE: the bytes are not in the stream as they are.
        const inflated = Buffer.from(stream.subarray(at, at + PAGE));
        digests.pageData(b, page * PAGE, inflated, 0, -1);
        inflated.fill(0x5a); // lent for the call only
      } else digests.pageData(b, page * PAGE, stream, at, at);
    } else if (kind === 1) {
      const fill = rnd(2) === 0 ? 0 : rnd(256);
      img.fill(fill, page * PAGE, (page + 1) * PAGE);
      digests.pageFill(b, page * PAGE, fill);
    } else if (kind === 2) {
      // ZERO with fill 0 (QEMU's only kind).
      img.fill(0, page * PAGE, (page + 1) * PAGE);
      digests.pageFill(b, page * PAGE, 0);
    } else {
      // XBZRLE: patch a few bytes of the page as it is now.
      const cur = digests.pageForDelta(b, page * PAGE);
      assert.deepEqual(Buffer.from(cur.subarray(0, PAGE)), img.subarray(page * PAGE, (page + 1) * PAGE), 'current page handed for a delta');
      const off = rnd(PAGE - 16);
      for (let i = 0; i < 16; i++) cur[off + i] = rnd(256);
      img.set(cur.subarray(0, PAGE), page * PAGE);
    }
  }
  return { digests, images, readBacks };
}

function sha(b: Uint8Array): string {
  return createHash('sha256').update(b).digest('hex');
}

function walked(d: RamDigests, i: number): Buffer {
  const parts: Buffer[] = [];
  d.walk(i, (bytes) => parts.push(Buffer.from(bytes)));
  return Buffer.concat(parts);
}

describe('RamDigests', () => {
  it('in-order pages with gaps are hashed as they pass, no stream bytes read back', () => {
    for (let seed = 1; seed <= 20; seed++) {
      const r = run(seed, [37, 5, 64], 120, { ordered: true });
      for (let i = 0; i < r.images.length; i++) assert.equal(r.digests.sha256(i), sha(r.images[i]!), `seed ${seed} block ${i}`);
      assert.equal(r.readBacks, 0, `seed ${seed}`);
    }
  });

  it('pages in any order, re-sent, filled, compressed or patched by deltas: sha256 and walked image equal the rebuilt block', () => {
    for (let seed = 1; seed <= 60; seed++) {
      const r = run(seed * 7919, [29, 3, 70], 150);
      for (let i = 0; i < r.images.length; i++) {
        assert.equal(r.digests.sha256(i), sha(r.images[i]!), `seed ${seed * 7919} block ${i}`);
        assert.ok(walked(r.digests, i).equals(r.images[i]!), `seed ${seed * 7919} block ${i} walk`);
        assert.equal(r.digests.sha256(i), sha(r.images[i]!), 'a second sha256() walks again');
      }
    }
  });

  it('a block never written hashes as zeros of its length', () => {
    const d = new RamDigests(() => assert.fail('nothing to read back'));
    d.attach([{ idstr: 'z', length: 300 * PAGE }]);
    assert.equal(d.sha256(0), sha(Buffer.alloc(300 * PAGE)));
    assert.ok(walked(d, 0).equals(Buffer.alloc(300 * PAGE)));
  });
});
