// Multifd channel codec (wire-format.md §7.6, QEMU 7.2 layout): exact bytes of the init packet
// and packet header, and MultifdReceiver placing pages in guest RAM for any split of the reads.

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import {
  MULTIFD_FLAG_SYNC,
  MULTIFD_INIT_LENGTH,
  MULTIFD_PACKET_HEADER_LENGTH,
  MULTIFD_PAGES_PER_PACKET,
  type MultifdEvent,
  MultifdReceiver,
  readMultifdInit,
  writeMultifdInit,
  writeMultifdPacketHeader,
} from '../src/index.ts';

const PAGE = 4096;

function init(channelId: number): Buffer {
  const b = Buffer.alloc(MULTIFD_INIT_LENGTH);
  writeMultifdInit(b, { uuid: new Uint8Array(16), channelId });
  return b;
}

function packet(block: string, offsets: number[], src: Buffer, flags = 0, packetNum = 0): Buffer {
  const h = Buffer.alloc(MULTIFD_PACKET_HEADER_LENGTH);
  writeMultifdPacketHeader(h, { flags, packetNum, block }, offsets, offsets.length);
  return Buffer.concat([h, ...offsets.map((o) => src.subarray(o, o + PAGE))]);
}

/** Feed `bytes` to a receiver in reads of at most `chunk(i)` bytes, as a socket would. */
function feed(recv: MultifdReceiver, bytes: Buffer, chunk: (i: number) => number): MultifdEvent[] {
  const events: MultifdEvent[] = [];
  let at = 0;
  for (let i = 0; at < bytes.length; i++) {
    const dst = recv.nextBuffer();
    assert.ok(dst.length > 0, 'the receiver always offers room for the next read');
    const n = Math.min(dst.length, chunk(i), bytes.length - at);
    dst.set(bytes.subarray(at, at + n));
    at += n;
    const ev = recv.advance(n);
    if (ev !== null) events.push(ev);
  }
  return events;
}

describe('multifd codec', () => {
  it('init packet: magic, version, uuid, id, 39 reserved bytes', () => {
    const b = Buffer.alloc(MULTIFD_INIT_LENGTH, 0xee);
    const uuid = Uint8Array.from({ length: 16 }, (_, i) => i + 1);
    writeMultifdInit(b, { uuid, channelId: 3 });
    assert.equal(b.subarray(0, 25).toString('hex'), '11223344' + '00000001' + '0102030405060708090a0b0c0d0e0f10' + '03');
    assert.ok(b.subarray(25).every((x) => x === 0));
    assert.deepEqual(readMultifdInit(b), { uuid, channelId: 3 });
  });

  it('packet header: 320 fixed bytes then 128 be64 offsets (1344 bytes)', () => {
    assert.equal(MULTIFD_PAGES_PER_PACKET, 128);
    assert.equal(MULTIFD_PACKET_HEADER_LENGTH, 1344);
    const h = Buffer.alloc(MULTIFD_PACKET_HEADER_LENGTH, 0xee);
    writeMultifdPacketHeader(h, { flags: MULTIFD_FLAG_SYNC, packetNum: 2 ** 32 + 5, block: 'pc.ram' }, [0x1000, 0x1_0000_2000], 2);
    assert.equal(
      h.subarray(0, 32).toString('hex'),
      '11223344' + '00000001' + '00000001' + '00000080' + '00000002' + '00000000' + '0000000100000005',
    );
    assert.ok(h.subarray(32, 64).every((x) => x === 0), 'reserved');
    assert.equal(h.subarray(64, 71).toString('latin1'), 'pc.ram\0');
    assert.ok(h.subarray(71, 320).every((x) => x === 0));
    assert.equal(h.subarray(320, 336).toString('hex'), '0000000000001000' + '0000000100002000');
    assert.ok(h.subarray(336).every((x) => x === 0), 'unused offsets');
  });
});

describe('MultifdReceiver', () => {
  const src = Buffer.alloc(1024 * PAGE);
  for (let i = 0; i < src.length; i += 4) src.writeUInt32LE((i * 2654435761) >>> 0, i);
  const small = Buffer.alloc(16 * PAGE);
  for (let i = 0; i < small.length; i += 4) small.writeUInt32LE((i * 40503) >>> 0, i);

  const contiguous = Array.from({ length: 128 }, (_, i) => (256 + i) * PAGE);
  const scattered = [7, 100, 3, 900, 512].map((p) => p * PAGE);
  /** Three runs of 10, 8 and 12 pages: long enough to be read straight into RAM, run by run. */
  const runs = [
    ...Array.from({ length: 10 }, (_, i) => (600 + i) * PAGE),
    ...Array.from({ length: 8 }, (_, i) => (620 + i) * PAGE),
    ...Array.from({ length: 12 }, (_, i) => (700 + i) * PAGE),
  ];
  const stream = Buffer.concat([
    init(1),
    packet('', [], src, MULTIFD_FLAG_SYNC, 0),
    packet('pc.ram', contiguous, src, 0, 1),
    packet('pc.ram', scattered, src, 0, 2),
    packet('vga', [0, PAGE * 15], small, 0, 3),
    packet('pc.ram', runs, src, 0, 4),
    packet('pc.ram', [PAGE * 1000, PAGE * 1001], src, MULTIFD_FLAG_SYNC, 5),
  ]);

  function check(chunk: (i: number) => number): void {
    const ram = Buffer.alloc(src.length);
    const vga = Buffer.alloc(small.length);
    const recv = new MultifdReceiver((name) => (name === 'pc.ram' ? ram : name === 'vga' ? vga : undefined));
    const events = feed(recv, stream, chunk);
    assert.deepEqual(events, [
      { kind: 'init', init: { uuid: new Uint8Array(16), channelId: 1 } },
      { kind: 'packet', block: '', pages: 0, sync: true, packetNum: 0 },
      { kind: 'packet', block: 'pc.ram', pages: 128, sync: false, packetNum: 1 },
      { kind: 'packet', block: 'pc.ram', pages: 5, sync: false, packetNum: 2 },
      { kind: 'packet', block: 'vga', pages: 2, sync: false, packetNum: 3 },
      { kind: 'packet', block: 'pc.ram', pages: 30, sync: false, packetNum: 4 },
      { kind: 'packet', block: 'pc.ram', pages: 2, sync: true, packetNum: 5 },
    ]);
    assert.deepEqual([recv.pages, recv.syncs, recv.channelId, recv.streamOffset, recv.atPacketBoundary], [167, 2, 1, stream.length, true]);
    for (const o of [...contiguous, ...scattered, ...runs, 1000 * PAGE, 1001 * PAGE]) {
      assert.ok(ram.subarray(o, o + PAGE).equals(src.subarray(o, o + PAGE)), `page 0x${o.toString(16)}`);
    }
    for (const o of [0, 610 * PAGE, 619 * PAGE, 628 * PAGE, 699 * PAGE, 712 * PAGE]) {
      assert.ok(ram.subarray(o, o + PAGE).every((x) => x === 0), `page 0x${o.toString(16)}, not sent, stays untouched`);
    }
    assert.ok(vga.subarray(0, PAGE).equals(small.subarray(0, PAGE)) && vga.subarray(15 * PAGE).equals(small.subarray(15 * PAGE)));
  }

  it('places every page whole, one read per offered buffer', () => check(() => Infinity));
  it('places every page with reads of 1, 7, 4095 and 65536 bytes', () => {
    for (const size of [1, 7, 4095, 65536]) check(() => size);
  });
  it('places every page for random read sizes (50 splits)', () => {
    let seed = 12345;
    const rnd = (): number => (seed = (seed * 1103515245 + 12345) >>> 0);
    for (let k = 0; k < 50; k++) check(() => 1 + (rnd() % 9000));
  });

  it('reads a packet of long runs straight into guest RAM, run by run (each offered buffer is a view of it)', () => {
    const ram = Buffer.from(new SharedArrayBuffer(src.length));
    const recv = new MultifdReceiver(() => ram);
    const bytes = Buffer.concat([init(0), packet('pc.ram', runs, src)]);
    let at = MULTIFD_INIT_LENGTH + MULTIFD_PACKET_HEADER_LENGTH;
    feed(recv, bytes.subarray(0, at), () => Infinity);
    for (const [firstPage, pages] of [[600, 10], [620, 8], [700, 12]] as const) {
      const into = recv.nextBuffer();
      assert.equal(into.buffer, ram.buffer);
      assert.deepEqual([into.byteOffset, into.length], [firstPage * PAGE, pages * PAGE]);
      feed(recv, bytes.subarray(at, at + pages * PAGE), () => Infinity);
      at += pages * PAGE;
      assert.ok(ram.subarray(firstPage * PAGE, (firstPage + pages) * PAGE).equals(src.subarray(firstPage * PAGE, (firstPage + pages) * PAGE)));
    }
    assert.ok(recv.atPacketBoundary);
  });

  it('reads a packet of short runs into one reused scratch buffer, not guest RAM, and places its pages once it is complete', () => {
    const ram = Buffer.from(new SharedArrayBuffer(src.length));
    const recv = new MultifdReceiver(() => ram);
    // Runs of 5 and 2 pages: under MULTIFD_DIRECT_RUN_PAGES on average.
    const short = [...[10, 11, 12, 13, 14], ...[40, 41]].map((p) => p * PAGE);
    const bytes = Buffer.concat([init(0), packet('pc.ram', short, src), packet('pc.ram', short, src, 0, 2)]);
    const firstPages = MULTIFD_INIT_LENGTH + MULTIFD_PACKET_HEADER_LENGTH;
    feed(recv, bytes.subarray(0, firstPages), () => Infinity);
    const first = recv.nextBuffer();
    assert.notEqual(first.buffer, ram.buffer);
    assert.equal(first.length, short.length * PAGE);
    // All but the last byte of the pages: nothing lands in RAM before the packet is complete.
    feed(recv, bytes.subarray(firstPages, firstPages + short.length * PAGE - 1), () => Infinity);
    assert.ok(ram.every((x) => x === 0));
    feed(recv, bytes.subarray(firstPages + short.length * PAGE - 1, firstPages + short.length * PAGE + MULTIFD_PACKET_HEADER_LENGTH), () => Infinity);
    for (const o of short) assert.ok(ram.subarray(o, o + PAGE).equals(src.subarray(o, o + PAGE)));
    const second = recv.nextBuffer();
    assert.equal(second.buffer, first.buffer);
    assert.equal(second.byteOffset, first.byteOffset);
  });

  it('checks every offset before a byte lands in RAM', () => {
    const ram = Buffer.alloc(src.length);
    const recv = new MultifdReceiver(() => ram);
    const bad = packet('pc.ram', [0, PAGE, 5000 * PAGE], Buffer.alloc(5001 * PAGE, 9));
    assert.throws(() => feed(recv, Buffer.concat([init(0), bad]), () => Infinity), (err: { code?: string; message: string }) => {
      assert.equal(err.code, 'LM_ERR_BAD_MULTIFD');
      assert.match(err.message, /page offset 0x1388000 is not a page inside the block \(4194304 bytes\)/);
      return true;
    });
    assert.ok(ram.every((x) => x === 0));
  });
});

describe('MultifdReceiver on hostile bytes', () => {
  it('random bytes after a valid init (and bit flips of a valid packet) end in LM_ERR_BAD_MULTIFD or keep reading, never another error', () => {
    let seed = 777;
    const rnd = (): number => (seed = (seed * 1103515245 + 12345) >>> 0);
    const src = Buffer.alloc(64 * PAGE, 5);
    const valid = packet('pc.ram', Array.from({ length: 64 }, (_, i) => i * PAGE), src, MULTIFD_FLAG_SYNC, 9);
    for (let k = 0; k < 300; k++) {
      let body: Buffer;
      if (k % 2 === 0) body = Buffer.from(Array.from({ length: 1 + (rnd() % 6000) }, () => rnd() & 0xff));
      else {
        body = Buffer.from(valid);
        for (let f = 0; f < 1 + (k % 5); f++) body[rnd() % MULTIFD_PACKET_HEADER_LENGTH]! ^= 1 << (rnd() % 8);
      }
      const recv = new MultifdReceiver((name) => (name === 'pc.ram' ? Buffer.alloc(64 * PAGE) : undefined));
      try {
        feed(recv, Buffer.concat([init(0), body]), () => 1 + (rnd() % 5000));
      } catch (err) {
        assert.equal((err as { code?: string }).code, 'LM_ERR_BAD_MULTIFD', (err as Error).stack);
      }
    }
  });
});

describe('MultifdReceiver, QEMU 9.0+ packets', () => {
  it('zero pages listed after the normal ones (be32 zero_pages at byte 32) are zeroed in RAM, with no data on the wire', () => {
    const mem = Buffer.alloc(8 * PAGE, 0xab);
    const src = Buffer.alloc(8 * PAGE, 0x5c);
    const h = Buffer.alloc(MULTIFD_PACKET_HEADER_LENGTH);
    // Two normal pages (1, 2), then three zero pages (4, 6, 0).
    writeMultifdPacketHeader(h, { flags: 0, packetNum: 9, block: 'm0' }, [PAGE, 2 * PAGE], 2);
    h.writeUInt32BE(3, 32);
    for (const [i, page] of [4, 6, 0].entries()) h.writeBigUInt64BE(BigInt(page * PAGE), 320 + 8 * (2 + i));
    const wire = Buffer.concat([init(0), h, src.subarray(PAGE, 3 * PAGE)]);
    const recv = new MultifdReceiver((name) => (name === 'm0' ? mem : undefined));
    const events = feed(recv, wire, () => 777);
    assert.deepEqual(events.map((e) => e.kind), ['init', 'packet']);
    assert.equal(recv.pages, 2);
    assert.equal(recv.zeroPages, 3);
    for (let p = 0; p < 8; p++) {
      const want = p === 1 || p === 2 ? 0x5c : p === 0 || p === 4 || p === 6 ? 0 : 0xab;
      assert.ok(mem.subarray(p * PAGE, (p + 1) * PAGE).every((b) => b === want), `page ${p} holds 0x${want.toString(16)}`);
    }
  });

  it('more normal and zero pages than allocated is refused before RAM is touched', () => {
    const mem = Buffer.alloc(8 * PAGE, 0xab);
    const h = Buffer.alloc(MULTIFD_PACKET_HEADER_LENGTH);
    writeMultifdPacketHeader(h, { flags: 0, packetNum: 1, block: 'm0' }, [0], 1);
    h.writeUInt32BE(128, 32);
    const recv = new MultifdReceiver(() => mem);
    assert.throws(() => feed(recv, Buffer.concat([init(0), h]), () => 4096), (err: { code?: string; message?: string }) => err.code === 'LM_ERR_BAD_MULTIFD' && /1 normal and 128 zero pages but 128 allocated/.test(err.message ?? ''));
    assert.ok(mem.every((b) => b === 0xab));
  });
});
