// The received-pages bitmap (wire-format.md §5.4): little-endian bit order, page i in byte
// i >> 3 at bit i & 7 (LSB first), wire size rounded up to whole 8-byte words.

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { PageBitmap, recvBitmapBytes } from '../src/index.ts';

describe('recvBitmapBytes', () => {
  it('rounds ceil(pages / 8) up to a multiple of 8 bytes', () => {
    assert.equal(recvBitmapBytes(0), 0);
    assert.equal(recvBitmapBytes(1), 8);
    assert.equal(recvBitmapBytes(64), 8);
    assert.equal(recvBitmapBytes(65), 16);
    assert.equal(recvBitmapBytes(100), 16);
    assert.equal(recvBitmapBytes(128), 16);
    assert.equal(recvBitmapBytes(129), 24);
  });

  it('a 64 MiB block: 16384 pages → 2048 bytes ([obs] size 0x800)', () => {
    assert.equal(recvBitmapBytes((64 * 1024 * 1024) / 4096), 2048);
  });
});

describe('PageBitmap', () => {
  it('page i is byte i >> 3, bit i & 7, LSB first', () => {
    const bm = new PageBitmap(16384);
    assert.equal(bm.bytes.length, 2048);
    bm.set(0);
    assert.equal(bm.bytes[0], 0x01);
    bm.set(7);
    assert.equal(bm.bytes[0], 0x81);
    bm.set(8);
    assert.equal(bm.bytes[1], 0x01);
    bm.set(13);
    assert.equal(bm.bytes[1], 0x21);
    bm.set(16383);
    assert.equal(bm.bytes[2047], 0x80);
    assert.equal(Buffer.from(bm.bytes.subarray(0, 3)).toString('hex'), '812100');
    assert.ok(bm.has(13) && !bm.has(12) && !bm.has(14));
    assert.equal(bm.count(), 5);
  });

  it('clear, setRange and clearRange touch only their pages', () => {
    const bm = new PageBitmap(100);
    assert.equal(bm.bytes.length, 16);
    bm.setRange(3, 10); // pages 3..12
    assert.equal(Buffer.from(bm.bytes.subarray(0, 2)).toString('hex'), 'f81f');
    bm.clear(8);
    assert.equal(bm.bytes[1], 0x1e);
    bm.clearRange(4, 2); // pages 4, 5
    assert.equal(bm.bytes[0], 0xc8);
    assert.equal(bm.count(), 7);
    bm.setRange(0, 100);
    assert.equal(bm.count(), 100);
    // Pad bits past the last page stay 0, as the wire format requires.
    assert.equal(bm.bytes[12], 0x0f);
    assert.ok(bm.bytes.subarray(13).every((b) => b === 0));
  });

  it('works over caller storage (e.g. a SharedArrayBuffer view)', () => {
    const storage = new Uint8Array(new SharedArrayBuffer(8));
    const bm = new PageBitmap(64, storage);
    bm.set(63);
    assert.equal(storage[7], 0x80);
    assert.ok(new PageBitmap(64, storage).has(63));
  });
});
