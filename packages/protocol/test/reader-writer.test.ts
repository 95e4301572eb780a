// ByteReader (peeks over a chunk list) and BatchWriter (slabs + referenced payloads).
// The reader is checked against the same bytes split at every point, because decoders rely on
// peeks giving identical values whether or not a value straddles two chunks.

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { BatchWriter, ByteReader, REF_FIELDS, refBatchBuffers, SlabPool } from '../src/index.ts';
import { xorshift32 } from './prng.ts';

/** A full GC without --expose-gc on the command line (the flag takes effect for new contexts). */
function collectGarbage(): void {
  setFlagsFromString('--expose-gc');
  (runInNewContext('gc') as () => void)();
}

/** A reader holding `bytes` split into the given chunk lengths (the rest in a last chunk). */
function readerOf(bytes: Buffer, cuts: number[]): ByteReader {
  const r = new ByteReader();
  let at = 0;
  for (const n of cuts) {
    r.push(bytes.subarray(at, at + n));
    at += n;
  }
  if (at < bytes.length) r.push(bytes.subarray(at));
  return r;
}

/** Every way of cutting `bytes` in two, plus one byte per chunk. */
function splits(bytes: Buffer): ByteReader[] {
  const out: ByteReader[] = [];
  for (let i = 0; i <= bytes.length; i++) out.push(readerOf(bytes, [i]));
  out.push(readerOf(bytes, Array.from({ length: bytes.length }, () => 1)));
  return out;
}

const SAMPLE = Buffer.from('0102030405060708090a0b0c0d0e0f10', 'hex');

describe('ByteReader peeks', () => {
  it('u8/be16/be32/be64 give the same values across every chunk boundary', () => {
    for (const r of splits(SAMPLE)) {
      assert.equal(r.available, 16);
      assert.equal(r.u8(0), 0x01);
      assert.equal(r.u8(15), 0x10);
      assert.equal(r.be16(1), 0x0203);
      assert.equal(r.be32(3), 0x04050607);
      assert.equal(r.be64(0), -1, 'hi word 0x01020304 is ≥ 2^21, so the value is ≥ 2^53');
    }
    for (const r of splits(Buffer.from('ff00010203040506070809', 'hex'))) {
      assert.equal(r.be64(1), 0x0001020304050607);
      assert.equal(r.be64(3), -1);
    }
  });

  it('be32 of 0xffffffff is unsigned on both paths', () => {
    const b = Buffer.from('00ffffffff', 'hex');
    for (const r of splits(b)) assert.equal(r.be32(1), 0xffffffff);
  });

  it('be64 is exact just below 2^53 and -1 from 2^53 on', () => {
    const below = Buffer.from('001fffffffffffff', 'hex'); // 2^53 - 1
    const at = Buffer.from('0020000000000000', 'hex'); // 2^53
    const top = Buffer.from('ffffffffffffffff', 'hex');
    for (const r of splits(below)) assert.equal(r.be64(0), 2 ** 53 - 1);
    for (const r of splits(at)) assert.equal(r.be64(0), -1);
    for (const r of splits(top)) assert.equal(r.be64(0), -1);
  });

  it('latin1 decodes bytes ≥ 0x80 one to one, across chunks', () => {
    const b = Buffer.from([0x70, 0x63, 0x2e, 0xe9, 0xff, 0x72]);
    for (const r of splits(b)) assert.equal(r.latin1(1, 5), 'c.\u00e9\u00ffr');
  });

  it('copyTo and span reassemble a run spread over many chunks', () => {
    const bytes = Buffer.from(Array.from({ length: 100 }, (_, i) => i));
    const r = readerOf(bytes, [3, 1, 7, 20, 2, 30]);
    const dst = Buffer.alloc(60, 0xee);
    r.copyTo(5, 50, dst, 4);
    assert.deepEqual(dst.subarray(4, 54), bytes.subarray(5, 55));
    assert.equal(dst[3], 0xee);
    assert.equal(dst[54], 0xee);
    // Inside the head chunk: no copy, the chunk itself with spanOffset.
    const scratch = Buffer.alloc(64);
    const inHead = r.span(0, 3, scratch);
    assert.notEqual(inHead, scratch);
    assert.deepEqual(inHead.subarray(r.spanOffset, r.spanOffset + 3), bytes.subarray(0, 3));
    // Straddling: copied into scratch at 0.
    const across = r.span(2, 40, scratch);
    assert.equal(across, scratch);
    assert.equal(r.spanOffset, 0);
    assert.deepEqual(across.subarray(0, 40), bytes.subarray(2, 42));
    // copyOut is a fresh buffer, independent of the chunks.
    const out = r.copyOut(10, 5);
    bytes[10] = 0xaa;
    assert.equal(out[0], 10);
  });

  it('copyTo into shared memory gives the same bytes at every source and target alignment', () => {
    // Misaligned pages into a SharedArrayBuffer take the bounce-buffer path; aligned ones do not.
    const bytes = Buffer.alloc(3 * 4096 + 16);
    for (let i = 0; i < bytes.length; i++) bytes[i] = (i * 131 + 7) & 0xff;
    const shared = new Uint8Array(new SharedArrayBuffer(2 * 4096 + 16));
    for (let src = 0; src < 8; src++) {
      for (const [dstOffset, n] of [[0, 4096], [4096, 4096], [3, 4096], [5, 1], [4101, 4096], [0, 5000]] as const) {
        shared.fill(0xee);
        const r = readerOf(bytes, []);
        r.copyTo(src, n, shared, dstOffset);
        assert.deepEqual(Buffer.from(shared.buffer, dstOffset, n), bytes.subarray(src, src + n), `source +${src}, target +${dstOffset}, ${n} bytes`);
        if (dstOffset > 0) assert.equal(shared[dstOffset - 1], 0xee);
        if (dstOffset + n < shared.length) assert.equal(shared[dstOffset + n], 0xee);
      }
    }
  });

  it('a zero-length copy right at the end of the buffered bytes is empty, not a crash', () => {
    // An empty command payload whose header ends the last chunk asks for copyOut(5, 0).
    for (const r of [readerOf(Buffer.from('0800010000', 'hex'), [2]), readerOf(Buffer.from('0800010000', 'hex'), [5])]) {
      assert.equal(r.copyOut(5, 0).length, 0);
      r.copyTo(5, 0, Buffer.alloc(0), 0);
      assert.equal(r.latin1(5, 0), '');
    }
  });

  it('indexOf finds a byte at or after `from`, across chunks, relative to the read position', () => {
    const bytes = Buffer.from('007e00007e00007e', 'hex');
    for (const r of splits(bytes)) {
      assert.equal(r.indexOf(0x7e, 0), 1);
      assert.equal(r.indexOf(0x7e, 2), 4);
      assert.equal(r.indexOf(0x7e, 5), 7);
      assert.equal(r.indexOf(0x7e, 8), -1);
      assert.equal(r.indexOf(0x55, 0), -1);
    }
    const r = readerOf(bytes, [3, 3]);
    r.skip(2);
    assert.equal(r.indexOf(0x7e, 0), 2, 'relative to the next unread byte');
  });

  it('skip moves across many chunks, keeps streamOffset, and compacts the chunk list', () => {
    const r = new ByteReader(1000);
    const total = 200;
    for (let i = 0; i < total; i++) r.push(Buffer.from([i & 0xff])); // 200 one-byte chunks
    r.push(Buffer.alloc(0)); // empty chunks are ignored
    assert.equal(r.available, total);
    let pos = 0;
    for (const n of [0, 1, 2, 3, 40, 33, 60]) {
      r.skip(n);
      pos += n;
      assert.equal(r.streamOffset, 1000 + pos);
      assert.equal(r.available, total - pos);
      assert.equal(r.u8(0), pos & 0xff);
      assert.equal(r.be16(0), ((pos & 0xff) << 8) | ((pos + 1) & 0xff));
    }
    r.skip(total - pos);
    assert.equal(r.available, 0);
    assert.equal(r.streamOffset, 1000 + total);
    // Drained: the next push starts fresh.
    r.push(Buffer.from('abcd', 'hex'));
    assert.equal(r.be16(0), 0xabcd);
    assert.equal(r.streamOffset, 1200);
  });

  it('skip ending exactly on a chunk boundary, then pushes, then peeks', () => {
    const r = readerOf(Buffer.from('0102030405', 'hex'), [2]);
    r.skip(2);
    assert.equal(r.u8(0), 3);
    r.skip(3);
    assert.equal(r.available, 0);
    r.push(Buffer.from('06', 'hex'));
    r.push(Buffer.from('0708', 'hex'));
    assert.equal(r.be16(1), 0x0708);
    assert.equal(r.streamOffset, 5);
  });

  it('accepts Uint8Array views with an offset, without copying them', () => {
    const backing = new Uint8Array([9, 9, 0xca, 0xfe, 9]);
    const r = new ByteReader();
    r.push(backing.subarray(2, 4));
    assert.equal(r.be16(0), 0xcafe);
    backing[2] = 0x00;
    assert.equal(r.be16(0), 0x00fe, 'reads the caller memory, not a copy');
  });

  it('a peek past the buffered bytes is a RangeError (a decoder bug, not bad input)', () => {
    const r = readerOf(SAMPLE.subarray(0, 3), [1]);
    assert.throws(() => r.be32(0), RangeError);
  });
});

describe('BatchWriter', () => {
  it('encodes big-endian integers and counted strings', () => {
    const w = new BatchWriter();
    w.u8(0xfe).be16(0xbeef).be32(0xdeadbeef).be32(-1).be64(0x0123456789abc).be64(2 ** 53 - 1).cstr('pc.ram');
    assert.equal(
      w.flushConcat().toString('hex'),
      'fe' + 'beef' + 'deadbeef' + 'ffffffff' + '0000123456789abc' + '001fffffffffffff' + '06' + '70632e72616d',
    );
    assert.equal(w.totalBytes, 1 + 2 + 4 + 4 + 8 + 8 + 7);
    assert.equal(w.pendingBytes, 0);
  });

  it('be64 rejects unsafe, negative and fractional values with LM_ERR_INVALID_ARGUMENT', () => {
    const w = new BatchWriter();
    for (const v of [2 ** 53, -1, 1.5, Number.NaN, Infinity]) {
      assert.throws(() => w.be64(v), { code: 'LM_ERR_INVALID_ARGUMENT' });
    }
    assert.equal(w.totalBytes, 0, 'nothing written by a refused value');
  });

  it('cstr accepts 1–255 bytes and refuses 0 and 256', () => {
    const w = new BatchWriter();
    w.cstr('a').cstr('x'.repeat(255));
    const b = w.flushConcat();
    assert.equal(b.length, 2 + 256);
    assert.equal(b[2], 255);
    assert.throws(() => w.cstr(''), { code: 'LM_ERR_INVALID_ARGUMENT' });
    assert.throws(() => w.cstr('x'.repeat(256)), { code: 'LM_ERR_INVALID_ARGUMENT' });
  });

  it('flush returns one Buffer per slab, not per record', () => {
    const w = new BatchWriter({ slabSize: 16 });
    for (let i = 0; i < 40; i++) w.u8(i);
    assert.equal(w.pendingBytes, 40);
    const parts = w.flush();
    assert.deepEqual(
      parts.map((p) => p.length),
      [16, 16, 8],
    );
    assert.deepEqual(Buffer.concat(parts), Buffer.from(Array.from({ length: 40 }, (_, i) => i)));
    assert.deepEqual(w.flush(), [], 'nothing pending');
  });

  it('a value never straddles two slabs', () => {
    const w = new BatchWriter({ slabSize: 16 });
    w.bytes(Buffer.alloc(13, 1)).be32(0x11223344);
    const parts = w.flush();
    assert.deepEqual(
      parts.map((p) => p.length),
      [13, 4],
    );
    assert.equal(parts[1]!.toString('hex'), '11223344');
  });

  it('a record larger than the slab gets a slab of its own', () => {
    const w = new BatchWriter({ slabSize: 16 });
    const page = Buffer.alloc(100, 7);
    w.u8(1).copyFrom(page, 0, 100).u8(2);
    const out = w.flushConcat();
    assert.equal(out.length, 102);
    assert.equal(out[0], 1);
    assert.equal(out[101], 2);
    assert.ok(out.subarray(1, 101).every((b) => b === 7));
  });

  it('small payloads are copied; payloads of 16 KiB and more are referenced', () => {
    const w = new BatchWriter();
    const small = Buffer.alloc(16 * 1024 - 1, 1);
    const large = Buffer.alloc(16 * 1024 + 8, 2);
    w.u8(0xaa).bytes(small).bytes(large, 8).u8(0xbb);
    // Changing the sources after encoding: the copy stays, the reference follows.
    small[0] = 9;
    large[8] = 9;
    const parts = w.flush();
    assert.equal(parts.length, 3, 'slab, referenced payload, slab');
    assert.equal(parts[0]![1], 1, 'small payload was copied');
    assert.equal(parts[1]!.buffer, large.buffer, 'large payload shares memory with the source');
    assert.equal(parts[1]!.byteOffset, large.byteOffset + 8);
    assert.equal(parts[1]!.length, 16 * 1024);
    assert.equal(parts[1]![0], 9);
    assert.deepEqual(parts[2], Buffer.from([0xbb]));
    assert.equal(w.totalBytes, 1 + small.length + 16 * 1024 + 1);
  });

  it('copyFrom copies a page out of guest memory at an offset', () => {
    const ram = new Uint8Array(3 * 4096);
    ram.fill(5, 4096, 8192);
    const w = new BatchWriter();
    w.copyFrom(ram, 4096, 4096);
    ram.fill(6, 4096, 8192); // a later guest write cannot change what was encoded
    const out = w.flushConcat();
    assert.equal(out.length, 4096);
    assert.ok(out.every((b) => b === 5));
  });

  it('recycle() lets full slabs be reused, and flushed data stays intact until then', () => {
    const w = new BatchWriter({ slabSize: 16 });
    for (let i = 0; i < 32; i++) w.u8(i); // fills slab A, slab B
    w.u8(0x20); // slab C current
    const first = w.flush();
    const firstCopy = Buffer.concat(first);
    // More records before the first batch is written: full slabs come from fresh memory, not from A or B.
    for (let i = 0; i < 40; i++) w.u8(0x80 + i);
    assert.deepEqual(Buffer.concat(first), firstCopy, 'in-flight buffers not overwritten');
    const second = w.flush();
    w.recycle(first);
    w.recycle(second); // both batches written
    const allocated = w.slabsAllocated;
    const slabsBefore = new Set([...first, ...second].map((b) => b.buffer));
    for (let i = 0; i < 64; i++) w.u8(0xc0 + i);
    const third = w.flush();
    assert.ok(third.some((b) => slabsBefore.has(b.buffer)), 'a recycled slab was reused');
    assert.equal(w.slabsAllocated, allocated, 'no new slab while recycled ones are pooled');
    assert.deepEqual(
      Buffer.concat(third),
      Buffer.from(Array.from({ length: 64 }, (_, i) => 0xc0 + i)),
    );
  });

  it('recycle() after encoding more does not recycle a slab whose tail is still pending', () => {
    // flush → encode the next batch → recycle the first: the slab that filled up during the
    // second batch holds unflushed bytes and must not be handed out again.
    const w = new BatchWriter({ slabSize: 16 });
    w.u8(0xa0).u8(0xa1).u8(0xa2);
    const first = w.flush();
    for (let i = 0; i < 20; i++) w.u8(i);
    w.recycle(first);
    for (let i = 0; i < 20; i++) w.u8(0xff);
    const out = Buffer.concat(w.flush());
    const expected = Buffer.concat([Buffer.from(Array.from({ length: 20 }, (_, i) => i)), Buffer.alloc(20, 0xff)]);
    assert.deepEqual(out, expected);
  });

  it('a slab is reused only once every batch that holds a piece of it is recycled', () => {
    const w = new BatchWriter({ slabSize: 16 });
    w.u8(1).u8(2);
    const a = w.flush(); // slab S, bytes 0..2
    for (let i = 0; i < 14; i++) w.u8(3);
    const b = w.flush(); // slab S, bytes 2..16 (S is now full)
    const bCopy = Buffer.concat(b);
    w.recycle(a);
    for (let i = 0; i < 40; i++) w.u8(0x55); // S sealed, still out in b: must not be reused
    assert.deepEqual(Buffer.concat(b), bCopy, 'b still holds what was encoded');
    assert.equal(w.slabsPooled, 0);
    w.recycle(b);
    assert.equal(w.slabsPooled, 1, 'S is free once b is back');
  });

  it('recycle() ignores buffers that are not its slabs and pieces a transport cut shorter', () => {
    const w = new BatchWriter({ slabSize: 16 });
    const page = Buffer.alloc(4096, 9);
    for (let i = 0; i < 20; i++) w.u8(i);
    w.view(page, 0, 4096);
    w.u8(0xee);
    const batch = w.flush();
    batch[0] = batch[0]!.subarray(5); // as WorkerConnection.write does after a partial writev
    w.recycle(batch);
    assert.equal(w.slabsPooled, 1, 'the full first slab came back; the page view was ignored');
    assert.ok(page.every((x) => x === 9));
  });

  it('flushRefs: pieces and refs stand for exactly the bytes encoded, in order, whatever the slab spills', () => {
    const rng = { int: xorshift32(0x5eed) };
    const ramA = Buffer.from(new SharedArrayBuffer(64 * 1024));
    const ramB = Buffer.alloc(16 * 1024);
    for (let i = 0; i < ramA.length; i++) ramA[i] = (i * 7 + 3) & 0xff;
    for (let i = 0; i < ramB.length; i++) ramB[i] = (i * 13 + 1) & 0xff;
    for (let round = 0; round < 300; round++) {
      // Small slabs, so refs land at piece ends, at piece starts and after spills.
      const w = new BatchWriter({ slabSize: 32 + rng.int(64) });
      const expected: Buffer[] = [];
      let refs = 0;
      const ops = 1 + rng.int(40);
      for (let k = 0; k < ops; k++) {
        const op = rng.int(5);
        if (op === 0) {
          const v = rng.int(256);
          w.u8(v);
          expected.push(Buffer.from([v]));
        } else if (op === 1) {
          const len = rng.int(100);
          const src = Buffer.from(Array.from({ length: len }, () => rng.int(256)));
          w.bytes(src);
          expected.push(src);
        } else if (op === 2) {
          // Above INLINE_MAX: queued as its own piece.
          const src = Buffer.alloc(16 * 1024 + rng.int(100), rng.int(256));
          w.bytes(src);
          expected.push(src);
        } else {
          const ram = op === 3 ? ramA : ramB;
          const offset = rng.int(ram.length - 4096);
          const len = rng.int(4097);
          w.view(ram, offset, len);
          expected.push(ram.subarray(offset, offset + len));
          refs++;
        }
      }
      const want = Buffer.concat(expected);
      assert.equal(w.pendingBytes, want.length);
      if (round % 2 === 1) {
        // flush(): the same bytes as Buffers, each of a slab counted as one of its pieces.
        const bufs = w.flush();
        assert.deepEqual(Buffer.concat(bufs), want, `round ${round}`);
        w.recycle(bufs);
        assert.equal(w.pendingBytes, 0);
        continue;
      }
      const batch = w.flushRefs();
      assert.equal(batch.refCount, refs);
      assert.equal(batch.bytes, want.length);
      for (let r = 1; r < batch.refCount; r++) {
        const [p0, a0] = [batch.refs[(r - 1) * REF_FIELDS]!, batch.refs[(r - 1) * REF_FIELDS + 1]!];
        const [p1, a1] = [batch.refs[r * REF_FIELDS]!, batch.refs[r * REF_FIELDS + 1]!];
        assert.ok(p1 > p0 || (p1 === p0 && a1 >= a0), 'refs in stream order');
      }
      assert.deepEqual(Buffer.concat(refBatchBuffers(batch)), want, `round ${round}`);
      const skip = rng.int(want.length + 1);
      assert.deepEqual(Buffer.concat(refBatchBuffers(batch, skip)), want.subarray(skip), `round ${round}, from byte ${skip}`);
      const [chunk] = refBatchBuffers(batch, skip, 1);
      if (skip === want.length) assert.equal(chunk, undefined);
      else assert.deepEqual(chunk, want.subarray(skip, skip + chunk!.length), `round ${round}, the chunk at byte ${skip}`);
      w.recycle(batch.pieces);
      assert.equal(w.pendingBytes, 0);
      assert.equal(w.flushRefs().refCount, 0, 'the next batch starts without refs');
    }
  });

  it('view() right after a flush, as the last thing: the batch ends with an empty piece to hold it', () => {
    const w = new BatchWriter({ slabSize: 64 });
    const ram = Buffer.alloc(4096, 0x42);
    w.u8(1);
    w.recycle(w.flush());
    w.view(ram, 0, 4096);
    const batch = w.flushRefs();
    assert.equal(batch.refCount, 1);
    assert.equal(batch.refs[0], batch.pieces.length - 1);
    assert.equal(batch.pieces.at(-1)!.length, 0);
    assert.deepEqual(Buffer.concat(refBatchBuffers(batch)), ram);
  });

  it('flush() gives refs as views between the pieces: what RAM holds when written, not when encoded', () => {
    const w = new BatchWriter({ slabSize: 64 });
    const ram = Buffer.alloc(8, 1);
    w.u8(0xaa).view(ram, 2, 4).u8(0xbb);
    ram.fill(9);
    assert.deepEqual(Buffer.concat(w.flush()), Buffer.from([0xaa, 9, 9, 9, 9, 0xbb]));
  });

  it('recycle() of the same batch twice is refused (it would free slabs still in flight)', () => {
    const w = new BatchWriter({ slabSize: 16 });
    w.u8(1);
    const a = w.flush();
    w.recycle(a);
    assert.throws(() => w.recycle(a), { code: 'LM_ERR_INVALID_ARGUMENT' });
  });

  it('keeps no flushed slab alive by itself, and allocates none in a long run when batches are recycled', async () => {
    // 100,000 flushes of mixed records, one batch in flight while the next is encoded (the
    // source's StreamOut): each batch is recycled after the next one is flushed.
    const page = Buffer.alloc(4096, 7);
    const ram = Buffer.alloc(16 * 4096, 3);
    const encode = (w: BatchWriter, i: number): void => {
      for (let p = 0; p < 4; p++) {
        w.be64(((i * 4 + p) % 1024) * 4096 + 0x08);
        if (p === 0) w.view(ram, p * 4096, 4096);
        else w.copyFrom(page, 0, 4096);
      }
      w.cstr('pc.ram').bytes(page, 0, 100).be32(i).u8(0x10);
    };
    const recycled = new BatchWriter({ slabSize: 64 * 1024 });
    let previous: Buffer[] = [];
    let checked = 0;
    for (let i = 0; i < 100_000; i++) {
      encode(recycled, i);
      const batch = recycled.flush();
      if (i % 9973 === 0) {
        // What was flushed is exactly what was encoded (recycling never tore a batch).
        const mirror = new BatchWriter({ slabSize: 64 * 1024 });
        encode(mirror, i);
        assert.deepEqual(Buffer.concat(batch), mirror.flushConcat());
        checked++;
      }
      recycled.recycle(previous);
      previous = batch;
    }
    assert.equal(checked, 11);
    // ~1.2 GiB went through 64 KiB slabs; two batches (~24 KiB each) never need more than a few.
    assert.ok(recycled.slabsAllocated <= 4, `slabs allocated: ${recycled.slabsAllocated}`);

    // A caller that never recycles: slabs are allocated as bytes go through, but the writer
    // holds none of them once flushed (only its current slab), so the GC takes them.
    const dropped = new BatchWriter({ slabSize: 64 * 1024 });
    const refs: WeakRef<ArrayBufferLike>[] = [];
    for (let i = 0; i < 2_000; i++) {
      encode(dropped, i);
      for (const b of dropped.flush()) if (b.buffer !== ram.buffer) refs.push(new WeakRef(b.buffer));
    }
    assert.ok(dropped.slabsAllocated > 100, `slabs allocated: ${dropped.slabsAllocated}`);
    assert.equal(dropped.slabsPooled, 0);
    await new Promise((resolve) => setImmediate(resolve)); // WeakRefs read in this job stay alive until it ends
    collectGarbage();
    const alive = new Set(refs.map((r) => r.deref()).filter((b) => b !== undefined));
    assert.ok(alive.size <= 1, `${alive.size} flushed slabs still reachable`);
  });

  it('release() gives the current slab back to a shared pool at once, and slabs still out once their batch is recycled', () => {
    const pool = new SlabPool(16, 16 * 16);
    const w = new BatchWriter({ slabSize: 16, pool });
    for (let i = 0; i < 20; i++) w.u8(i); // slab A full, slab B current
    const inFlight = w.flush();
    const inFlightCopy = Buffer.concat(inFlight);
    w.u8(0x77); // encoded, never flushed: dropped by release()
    w.release();
    assert.equal(pool.free.length, 0, 'A and B are both still out in a batch');
    assert.deepEqual(Buffer.concat(inFlight), inFlightCopy, 'release() does not touch what is in flight');
    w.recycle(inFlight);
    assert.equal(pool.free.length, 2, 'both came back once their batch was written');
    assert.equal(pool.allocated, 2);

    // The next writer on the pool (the next migration) allocates nothing.
    const next = new BatchWriter({ slabSize: 16, pool });
    for (let i = 0; i < 20; i++) next.u8(0x40 + i);
    const batch = next.flush();
    assert.deepEqual(Buffer.concat(batch), Buffer.from(Array.from({ length: 20 }, (_, i) => 0x40 + i)));
    next.recycle(batch);
    next.release();
    assert.equal(pool.allocated, 2, 'no slab allocated by the second writer');
    assert.equal(pool.free.length, 2);

    // A released writer that is written to again takes a slab, and what it encodes is intact.
    next.u8(0xaa).be32(0x01020304);
    assert.deepEqual(next.flushConcat(), Buffer.from([0xaa, 1, 2, 3, 4]));
  });

  it('a slab pool keeps at most its byte budget of free slabs', () => {
    const pool = new SlabPool(16, 3 * 16);
    for (let i = 0; i < 5; i++) pool.give(Buffer.alloc(16));
    assert.equal(pool.free.length, 3);
  });

  it('flushConcat joins everything into one Buffer that owns its bytes', () => {
    const w = new BatchWriter({ slabSize: 8 });
    w.be32(1).be32(2).be32(3);
    const b = w.flushConcat();
    assert.equal(b.toString('hex'), '000000010000000200000003');
    const w2 = new BatchWriter();
    w2.be16(0x1234);
    const one = w2.flushConcat();
    w2.be16(0xffff); // the same slab is reused; the concatenated copy must not change
    assert.equal(one.toString('hex'), '1234');
    assert.equal(new BatchWriter().flushConcat().length, 0);
  });
});
