// XBZRLE (wire-format.md §6.5): exact encodings, QEMU's overflow points, and the decoder's
// refusals. The encoder must match QEMU byte for byte, including *when* it gives up, because
// the source decides between XBZRLE and a plain PAGE on that result.

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import fc from 'fast-check';
import { TARGET_PAGE_SIZE, XBZRLE_OVERFLOW, xbzrleDecode, xbzrleEncode, xbzrleLastFault } from '../src/index.ts';

const PAGE = TARGET_PAGE_SIZE;

/** A deterministic non-trivial old page. */
function oldPage(): Buffer {
  const b = Buffer.alloc(PAGE);
  for (let i = 0; i < PAGE; i++) b[i] = (i * 7 + 3) & 0xff;
  return b;
}

/** `old` with the bytes in [from, to) changed (each XORed so it surely differs). */
function changed(old: Buffer, ...ranges: [number, number][]): Buffer {
  const b = Buffer.from(old);
  for (const [from, to] of ranges) for (let i = from; i < to; i++) b[i] = old[i]! ^ 0x5a;
  return b;
}

/** Encode with QEMU's limit (one page); returns the hex, or XBZRLE_OVERFLOW. */
function enc(old: Uint8Array, cur: Uint8Array, limit = PAGE): string | number {
  const dst = Buffer.alloc(PAGE + 16, 0xee);
  const n = xbzrleEncode(old, 0, cur, 0, PAGE, dst, 0, limit);
  // Never writes past dstLimit, whatever the outcome.
  assert.ok(dst.subarray(limit).every((b) => b === 0xee), 'wrote past dstLimit');
  return n < 0 ? n : dst.subarray(0, n).toString('hex');
}

function hexOf(b: Buffer, from: number, to: number): string {
  return b.subarray(from, to).toString('hex');
}

/**
 * QEMU's xbzrle_encode_buffer (migration/xbzrle.c) transliterated without its word-at-a-time
 * speedups, which only change speed: a second opinion on where it returns -1.
 */
function qemuEncode(oldBuf: Uint8Array, newBuf: Uint8Array, slen: number, dlen: number): number[] | -1 {
  const dst: number[] = [];
  let i = 0;
  const uleb = (n: number): void => {
    if (n < 0x80) dst.push(n);
    else dst.push((n & 0x7f) | 0x80, n >> 7);
  };
  while (i < slen) {
    if (dst.length + 2 > dlen) return -1;
    let zrun = 0;
    while (i < slen && oldBuf[i] === newBuf[i]) {
      zrun++;
      i++;
    }
    if (zrun === slen) return [];
    if (i === slen) return dst;
    uleb(zrun);
    if (dst.length + 2 > dlen) return -1;
    const start = i;
    while (i < slen && oldBuf[i] !== newBuf[i]) i++;
    const nz = i - start;
    uleb(nz);
    if (dst.length + nz > dlen) return -1;
    for (let j = start; j < i; j++) dst.push(newBuf[j]!);
  }
  return dst;
}

describe('xbzrleEncode: exact bytes', () => {
  const old = oldPage();

  it('identical page → 0 bytes (send nothing)', () => {
    assert.equal(enc(old, Buffer.from(old)), '');
    const dst = Buffer.alloc(PAGE);
    assert.equal(xbzrleEncode(old, 0, old, 0, PAGE, dst, 0, PAGE), 0);
  });

  it('one changed byte in the middle: zrun 100, nzrun 1, the new byte; trailing run omitted', () => {
    const cur = changed(old, [100, 101]);
    assert.equal(enc(old, cur), '64' + '01' + hexOf(cur, 100, 101));
  });

  it('change at byte 0: the first zrun is 0', () => {
    const cur = changed(old, [0, 1]);
    assert.equal(enc(old, cur), '00' + '01' + hexOf(cur, 0, 1));
  });

  it('change at the last byte: zrun 4095 as a 2-byte uleb (ff 1f)', () => {
    const cur = changed(old, [4095, 4096]);
    assert.equal(enc(old, cur), 'ff1f' + '01' + hexOf(cur, 4095, 4096));
  });

  it('changes at start and end: 00 01 a, zrun 4094 (fe 1f), 01 b', () => {
    const cur = changed(old, [0, 1], [4095, 4096]);
    assert.equal(enc(old, cur), '0001' + hexOf(cur, 0, 1) + 'fe1f' + '01' + hexOf(cur, 4095, 4096));
  });

  it('a 200-byte changed run: nzrun length c8 01, then the 200 new bytes verbatim (not XOR)', () => {
    const cur = changed(old, [10, 210]);
    assert.equal(enc(old, cur), '0a' + 'c801' + hexOf(cur, 10, 210));
  });

  it('uleb boundaries: zrun 127 is 1 byte, 128 is 80 01, 300 is ac 02', () => {
    assert.equal(enc(old, changed(old, [127, 128])), '7f01' + hexOf(changed(old, [127, 128]), 127, 128));
    assert.equal(enc(old, changed(old, [128, 129])), '800101' + hexOf(changed(old, [128, 129]), 128, 129));
    const cur = changed(old, [300, 302]);
    assert.equal(enc(old, cur), 'ac02' + '02' + hexOf(cur, 300, 302));
  });

  it('several runs: zrun ≥ 1 between nzruns, runs maximal', () => {
    const cur = changed(old, [5, 8], [9, 10], [1000, 1128]);
    assert.equal(
      enc(old, cur),
      '05' + '03' + hexOf(cur, 5, 8) + '01' + '01' + hexOf(cur, 9, 10) + 'de07' + '8001' + hexOf(cur, 1000, 1128),
    );
  });

  it('writes at dstOffset and reads old/cur at their offsets', () => {
    const o = Buffer.concat([Buffer.alloc(3, 1), old]);
    const c = Buffer.concat([Buffer.alloc(5, 2), changed(old, [1, 2])]);
    const dst = Buffer.alloc(20, 0xee);
    const n = xbzrleEncode(o, 3, c, 5, PAGE, dst, 7, PAGE);
    assert.equal(n, 3);
    assert.equal(dst.toString('hex', 7, 10), '0101' + hexOf(c, 6, 7));
    assert.equal(dst[6], 0xee);
    assert.equal(dst[10], 0xee);
  });
});

describe('xbzrleEncode: overflow exactly where QEMU gives up (dstLimit 4096)', () => {
  const old = oldPage();

  it('whole page changed: 00 80 20 + 4096 bytes does not fit → overflow', () => {
    assert.equal(enc(old, changed(old, [0, PAGE])), XBZRLE_OVERFLOW);
  });

  it('nzrun of 4091 at the start: 4094 bytes, room for 2 more at the next turn → fits', () => {
    const cur = changed(old, [0, 4091]);
    const r = enc(old, cur);
    assert.equal(typeof r, 'string');
    assert.equal((r as string).length / 2, 4094);
    assert.equal((r as string).slice(0, 6), '00fb1f');
  });

  it('nzrun of 4092: 4095 bytes would fit, but the next turn has no room for 2 bytes → overflow', () => {
    // QEMU checks d + 2 <= dlen *before* it looks at the rest of the page, so it gives up even
    // though the rest is unchanged and the encoding would have been 4095 bytes.
    assert.equal(enc(old, changed(old, [0, 4092])), XBZRLE_OVERFLOW);
  });

  it('nzrun of 4093 ending 3 bytes short of the page: would be exactly 4096, still overflow', () => {
    assert.equal(enc(old, changed(old, [0, 4093])), XBZRLE_OVERFLOW);
  });

  it('nzrun of 4093 reaching the page end at 4096: verbatim run does not fit → overflow', () => {
    // zrun 3 (1 byte) + nzrun 4093 (2 bytes) + 4093 = 4096 fits exactly: the run reaches the
    // end, so the loop stops without another d + 2 check.
    const cur = changed(old, [3, PAGE]);
    const r = enc(old, cur);
    assert.equal(typeof r, 'string');
    assert.equal((r as string).length / 2, 4096);
    // One byte more of changes: zrun 2, nzrun 4094 → 4097 → overflow.
    assert.equal(enc(old, changed(old, [2, PAGE])), XBZRLE_OVERFLOW);
  });

  it('room for a zrun length but not for the nzrun length after it → overflow', () => {
    // nzrun 4091 → d = 4094; zrun 1 → d = 4095; 4095 + 2 > 4096 before the next nzrun length.
    assert.equal(enc(old, changed(old, [0, 4091], [4092, 4093])), XBZRLE_OVERFLOW);
    // Without that last change the zrun runs to the end and is omitted: 4094 bytes.
    assert.equal((enc(old, changed(old, [0, 4091])) as string).length / 2, 4094);
  });

  it('alternating changed/unchanged bytes (3 output bytes per 2 input bytes) → overflow', () => {
    const ranges: [number, number][] = [];
    for (let i = 1; i < PAGE; i += 2) ranges.push([i, i + 1]);
    assert.equal(enc(old, changed(old, ...ranges)), XBZRLE_OVERFLOW);
    // 1364 pairs end at d = 4092 (room for 2 more): fits. 1365 pairs end at d = 4095: the
    // next turn's d + 2 check fails although the rest of the page is unchanged.
    const fits: [number, number][] = ranges.filter(([a]) => a < 2728);
    assert.equal(fits.length, 1364);
    assert.equal((enc(old, changed(old, ...fits)) as string).length / 2, 4092);
    const over: [number, number][] = ranges.filter(([a]) => a < 2730);
    assert.equal(over.length, 1365);
    assert.equal(enc(old, changed(old, ...over)), XBZRLE_OVERFLOW);
  });

  it('agrees with a transliteration of QEMU’s encoder on random sparse edits and small limits', () => {
    fc.assert(
      fc.property(
        fc.array(fc.record({ at: fc.nat(PAGE - 1), len: fc.integer({ min: 1, max: 600 }) }), { maxLength: 40 }),
        fc.integer({ min: 1, max: PAGE }),
        (edits, limit) => {
          const cur = changed(old, ...edits.map(({ at, len }): [number, number] => [at, Math.min(PAGE, at + len)]));
          const dst = Buffer.alloc(PAGE);
          const n = xbzrleEncode(old, 0, cur, 0, PAGE, dst, 0, limit);
          const want = qemuEncode(old, cur, PAGE, limit);
          if (want === -1) assert.equal(n, XBZRLE_OVERFLOW);
          else assert.equal(dst.subarray(0, n).toString('hex'), Buffer.from(want).toString('hex'));
        },
      ),
      { numRuns: 300 },
    );
  });
});

describe('xbzrleDecode', () => {
  it('applies runs in place and leaves the rest of the page as it was', () => {
    const page = oldPage();
    const before = Buffer.from(page);
    const src = Buffer.from('0001aa' + 'ff1d02bbcc', 'hex'); // byte 0, then zrun 3839 → bytes 3840..3841
    assert.equal(xbzrleDecode(src, 0, src.length, page, 0, PAGE), 3842);
    assert.equal(page[0], 0xaa);
    assert.equal(page[3840], 0xbb);
    assert.equal(page[3841], 0xcc);
    assert.deepEqual(page.subarray(1, 3840), before.subarray(1, 3840));
    assert.deepEqual(page.subarray(3842), before.subarray(3842));
  });

  it('empty input covers 0 bytes and changes nothing', () => {
    const page = oldPage();
    assert.equal(xbzrleDecode(Buffer.alloc(0), 0, 0, page, 0, PAGE), 0);
    assert.deepEqual(page, oldPage());
  });

  it('honours srcOffset and pageOffset', () => {
    const mem = Buffer.alloc(3 * PAGE);
    const src = Buffer.from('ffff' + '0502abcd', 'hex');
    assert.equal(xbzrleDecode(src, 2, 4, mem, PAGE, PAGE), 7);
    assert.equal(mem.readUInt16BE(PAGE + 5), 0xabcd);
    assert.equal(mem.subarray(0, PAGE + 5).every((b) => b === 0), true);
  });

  it('may cover exactly the whole page', () => {
    const page = Buffer.alloc(PAGE);
    const src = Buffer.concat([Buffer.from('ff1f01', 'hex'), Buffer.from([0x42])]);
    assert.equal(xbzrleDecode(src, 0, src.length, page, 0, PAGE), PAGE);
    assert.equal(page[PAGE - 1], 0x42);
  });

  const bad: [string, string, string][] = [
    ['one byte of input', '05', 'short input'],
    ['a zrun with only one byte after it', '0501', 'short input'],
    ['a pair then a lone byte', '0001aa07', 'short input'],
    ['zrun uleb whose second byte has bit 7 set', '808001aa', 'bad run length'],
    ['nzrun uleb whose second byte has bit 7 set', '0081' + '80aa', 'bad run length'],
    ['zero-length nzrun', '0500aa', 'zero-length run'],
    ['zero zrun that is not the first', '0001aa' + '0001bb', 'zero-length run'],
    ['zrun past the page end', '8021' + '01aa', 'output overflow'],
    ['nzrun past the page end', 'ff1f' + '02aabb', 'output overflow'],
    ['nzrun longer than the input', '0005aabb', 'input overflow'],
  ];
  for (const [what, hex, fault] of bad) {
    it(`rejects ${what} (${fault})`, () => {
      const src = Buffer.from(hex, 'hex');
      const page = Buffer.alloc(PAGE);
      assert.equal(xbzrleDecode(src, 0, src.length, page, 0, PAGE), -1);
      assert.equal(xbzrleLastFault, fault);
    });
  }

  it('reads only encLen bytes even when the buffer holds more', () => {
    // "0001aa" then junk that would be a short input if it were read.
    const src = Buffer.from('0001aa07', 'hex');
    const page = Buffer.alloc(PAGE);
    assert.equal(xbzrleDecode(src, 0, 3, page, 0, PAGE), 1);
  });
});

describe('xbzrle round trip (property)', () => {
  it('decode(encode(old, new)) applied to old gives new whenever the encoding fits', () => {
    const edit = fc.record({
      at: fc.nat(PAGE - 1),
      bytes: fc.uint8Array({ minLength: 1, maxLength: 400 }),
    });
    fc.assert(
      fc.property(fc.uint8Array({ minLength: 64, maxLength: 64 }), fc.array(edit, { maxLength: 30 }), (seed, edits) => {
        const old = Buffer.alloc(PAGE);
        for (let i = 0; i < PAGE; i++) old[i] = seed[i % 64]! ^ (i >> 6);
        const cur = Buffer.from(old);
        for (const { at, bytes } of edits) cur.set(bytes.subarray(0, PAGE - at), at);
        const dst = Buffer.alloc(PAGE);
        const n = xbzrleEncode(old, 0, cur, 0, PAGE, dst, 0, PAGE);
        if (n === XBZRLE_OVERFLOW) return;
        assert.ok(n >= 0 && n <= PAGE);
        if (n === 0) {
          assert.deepEqual(cur, old);
          return;
        }
        const page = Buffer.from(old);
        const covered = xbzrleDecode(dst, 0, n, page, 0, PAGE);
        assert.ok(covered > 0 && covered <= PAGE);
        assert.deepEqual(page, cur);
      }),
      { numRuns: 400 },
    );
  });

  it('overflow happens only for pages that differ a lot', () => {
    // Fewer than ~1/3 of the bytes changed in one run never overflows.
    const old = oldPage();
    const cur = changed(old, [500, 500 + 1300]);
    assert.notEqual(enc(old, cur), XBZRLE_OVERFLOW);
  });
});
