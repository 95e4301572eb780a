// The native multifd reader on real sockets, against @livemig/protocol's MultifdReceiver as the
// oracle: the same packets give the same RAM and counts, and every malformed header gives the
// same message at the same stream offset, with nothing of its packet in RAM. Also: the peer's
// end at a packet boundary and in the middle of one, SYNCs reported as they come, and close
// while the thread waits for bytes.
//
// Run: node --import tsx --test packages/native/test/multifd-reader.test.ts (after the install built it)

import assert from 'node:assert/strict';
import { once } from 'node:events';
import net from 'node:net';
import { test } from 'node:test';
import {
  MULTIFD_FLAG_SYNC,
  MULTIFD_INIT_LENGTH,
  MULTIFD_PACKET_HEADER_LENGTH,
  MultifdReceiver,
  writeMultifdInit,
  writeMultifdPacketHeader,
} from '../../protocol/src/index.ts';
import { type MultifdReaderReport, native } from '../src/index.ts';

const skip = native.available || process.env['CI'] === 'true' ? false : `the native addon is not built (${native.unavailableReason})`;
const PAGE = 4096;

/** A connected loopback pair: the sender, and the receiving socket's descriptor (Node does not read it). */
async function pair(): Promise<{ sender: net.Socket; receiver: net.Socket; fd: number; close: () => void }> {
  const server = net.createServer({ pauseOnConnect: true });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const sender = net.connect((server.address() as net.AddressInfo).port, '127.0.0.1');
  const [receiver] = (await once(server, 'connection')) as [net.Socket];
  await once(sender, 'connect');
  server.close();
  const fd = (receiver as unknown as { _handle: { fd: number } })._handle.fd;
  return { sender, receiver, fd, close: () => (sender.destroy(), receiver.destroy()) };
}

function packet(block: string, offsets: number[], src: Buffer, opts: { flags?: number; zero?: number[]; packetNum?: number } = {}): Buffer {
  const h = Buffer.alloc(MULTIFD_PACKET_HEADER_LENGTH);
  const zero = opts.zero ?? [];
  writeMultifdPacketHeader(h, { flags: opts.flags ?? 0, packetNum: opts.packetNum ?? 0, block }, offsets, offsets.length, zero, zero.length);
  return Buffer.concat([h, ...offsets.map((o) => src.subarray(o, o + PAGE))]);
}

/** Read `bytes` (packets, from a packet boundary) with a native reader into fresh blocks; resolves with its final report. */
async function readNative(bytes: Buffer, sizes: Record<string, number>, fill = 0): Promise<{ report: MultifdReaderReport; reports: MultifdReaderReport[]; ram: Record<string, Buffer> }> {
  const { sender, fd, close } = await pair();
  const ram = Object.fromEntries(Object.entries(sizes).map(([name, size]) => [name, Buffer.from(new SharedArrayBuffer(size)).fill(fill)]));
  const reports: MultifdReaderReport[] = [];
  let ended!: (r: MultifdReaderReport) => void;
  const end = new Promise<MultifdReaderReport>((resolve) => (ended = resolve));
  const reader = native.openMultifdReader(fd, MULTIFD_INIT_LENGTH, Object.entries(ram).map(([name, memory]) => ({ name, memory })), (r) => {
    reports.push(r);
    if (r.end !== 0) ended(r);
  });
  try {
    sender.end(bytes);
    const timer = setTimeout(() => ended({ end: 2, message: 'timed out' } as MultifdReaderReport), 20_000);
    const report = await end;
    clearTimeout(timer);
    return { report, reports, ram };
  } finally {
    reader.close();
    close();
  }
}

/** The same bytes through MultifdReceiver (after an init packet): its RAM, counts, and error if any. */
function readJs(bytes: Buffer, sizes: Record<string, number>, fill = 0): { ram: Record<string, Buffer>; recv: MultifdReceiver; error?: { message: string; streamOffset?: number; block?: string } } {
  const ram = Object.fromEntries(Object.entries(sizes).map(([name, size]) => [name, Buffer.alloc(size, fill)]));
  const recv = new MultifdReceiver((name) => ram[name]);
  const init = Buffer.alloc(MULTIFD_INIT_LENGTH);
  writeMultifdInit(init, { uuid: new Uint8Array(16), channelId: 0 });
  const all = Buffer.concat([init, bytes]);
  try {
    for (let at = 0; at < all.length; ) {
      const into = recv.nextBuffer();
      const n = all.copy(into, 0, at);
      at += n;
      recv.advance(n);
    }
  } catch (err) {
    const e = err as { message: string; streamOffset?: number; block?: string };
    return { ram, recv, error: { message: e.message, streamOffset: e.streamOffset, block: e.block } };
  }
  return { ram, recv };
}

const src = Buffer.alloc(512 * PAGE);
for (let i = 0; i < src.length; i += 4) src.writeUInt32LE((i * 2654435761) >>> 0, i);
const small = Buffer.alloc(16 * PAGE);
for (let i = 0; i < small.length; i += 4) small.writeUInt32LE((i * 40503) >>> 0, i);
const SIZES = { 'pc.ram': src.length, vga: small.length };

test('multifd reader: packets of runs, scattered pages, zero pages, two blocks and SYNCs land as MultifdReceiver puts them', { skip, timeout: 60_000 }, async () => {
  const contiguous = Array.from({ length: 128 }, (_, i) => (256 + i) * PAGE);
  const stream = Buffer.concat([
    packet('', [], src, { flags: MULTIFD_FLAG_SYNC }),
    packet('pc.ram', contiguous, src, { packetNum: 1 }),
    packet('pc.ram', [7, 100, 3, 500].map((p) => p * PAGE), src, { packetNum: 2, zero: [8, 9, 10].map((p) => p * PAGE) }),
    packet('vga', [0, 15 * PAGE], small, { packetNum: 3 }),
    ...Array.from({ length: 40 }, (_, k) => packet('pc.ram', Array.from({ length: 64 }, (_, i) => ((k * 7 + i) % 512) * PAGE), src, { packetNum: 4 + k })),
    packet('pc.ram', [], src, { flags: MULTIFD_FLAG_SYNC, packetNum: 44, zero: [11 * PAGE] }),
  ]);
  // RAM that is not zero to begin with: the zero pages must be zeroed.
  const native_ = await readNative(stream, SIZES, 0xee);
  const js = readJs(stream, SIZES, 0xee);
  assert.equal(js.error, undefined);
  assert.equal(native_.report.end, 1, `the peer's end at a packet boundary: ${JSON.stringify(native_.report)}`);
  assert.deepEqual(
    { pages: native_.report.pages, zeroPages: native_.report.zeroPages, syncs: native_.report.syncs, bytes: native_.report.bytes },
    { pages: js.recv.pages, zeroPages: js.recv.zeroPages, syncs: js.recv.syncs, bytes: js.recv.streamOffset },
  );
  for (const name of Object.keys(SIZES)) assert.ok(native_.ram[name]!.equals(js.ram[name]!), `block ${name} as MultifdReceiver leaves it`);
  assert.ok(native_.reports.every((r, i) => i === 0 || r.syncs >= native_.reports[i - 1]!.syncs), 'counts only grow');
});

test('multifd reader: reports wake the main thread at most every 10 ms between SYNCs, each SYNC at once, the last with every count', { skip, timeout: 60_000 }, async () => {
  // 3,000 one-page packets (tens of thousands a second on loopback): a report each would be thousands.
  const packets = 3000;
  const stream = Buffer.concat([
    ...Array.from({ length: packets }, (_, k) => packet('pc.ram', [(k % 512) * PAGE], src, { packetNum: k })),
    packet('', [], src, { flags: MULTIFD_FLAG_SYNC, packetNum: packets }),
  ]);
  const started = performance.now();
  const { report, reports } = await readNative(stream, SIZES);
  const elapsedMs = performance.now() - started;
  assert.equal(report.end, 1, JSON.stringify(report));
  assert.deepEqual({ pages: report.pages, syncs: report.syncs, bytes: report.bytes }, { pages: packets, syncs: 1, bytes: MULTIFD_INIT_LENGTH + stream.length });
  // One for the SYNC, one for the end, and at most one a 10 ms between (the first packet's included).
  const bound = 3 + Math.ceil(elapsedMs / 10);
  assert.ok(reports.length <= bound, `${reports.length} reports in ${elapsedMs.toFixed(0)} ms for ${packets} packets (at most ${bound})`);
});

test('multifd reader: each malformed header is refused with MultifdReceiver\'s message and offset, before any of its packet lands in RAM', { skip, timeout: 60_000 }, async () => {
  const good = packet('pc.ram', [PAGE, 2 * PAGE], src);
  const field = (at: number, value: number, base = packet('pc.ram', [4 * PAGE, 5 * PAGE], src)): Buffer => {
    const b = Buffer.from(base);
    b.writeUInt32BE(value >>> 0, at);
    return b;
  };
  const cases: [string, Buffer][] = [
    ['magic', field(0, 0xdeadbeef)],
    ['version', field(4, 2)],
    ['compression', field(8, 0x4)],
    ['pages allocated', field(12, 129)],
    ['normal pages over allocated', field(16, 200, field(12, 100))],
    ['normal and zero over allocated', field(32, 127)],
    ['unknown block', packet('nope', [PAGE], src)],
    ['offset past the block', packet('vga', [16 * PAGE], Buffer.alloc(17 * PAGE))],
    ['offset not page-aligned', field(320 + 4, PAGE + 8)],
  ];
  for (const [what, bad] of cases) {
    const stream = Buffer.concat([good, bad]);
    const js = readJs(stream, SIZES);
    assert.ok(js.error !== undefined, `${what}: MultifdReceiver refuses it`);
    const n = await readNative(stream, SIZES);
    assert.equal(n.report.end, 2, `${what}: refused`);
    // ProtocolError's message ends with where (its context), given apart here.
    assert.equal(`multifd channel 0: ${n.report.message}`, js.error.message.replace(/ \(at stream offset .*\)$/, ''), what);
    assert.equal(n.report.offset, js.error.streamOffset, `${what}: the offset`);
    assert.equal(n.report.block, js.error.block, `${what}: the block`);
    assert.equal(n.report.lost, false);
    assert.equal(n.report.pages, 2, `${what}: the good packet before it counted`);
    assert.ok(n.ram['pc.ram']!.subarray(4 * PAGE, 6 * PAGE).every((x) => x === 0), `${what}: nothing of the bad packet in RAM`);
  }
});

test('multifd reader: a packet that comes in pieces, with pauses, lands whole; its SYNC is reported while the channel stays open', { skip, timeout: 30_000 }, async () => {
  // The thread sleeps until its read's bytes (up to 256 KiB) have come: pieces far smaller than
  // that, each after a pause, must still end in a whole packet, and a SYNC be reported at once.
  const stream = Buffer.concat([packet('pc.ram', Array.from({ length: 128 }, (_, i) => i * PAGE), src), packet('', [], src, { flags: MULTIFD_FLAG_SYNC, packetNum: 1 })]);
  const { sender, fd, close } = await pair();
  const ram = Buffer.from(new SharedArrayBuffer(src.length));
  let synced!: (r: MultifdReaderReport) => void;
  const sync = new Promise<MultifdReaderReport>((resolve) => (synced = resolve));
  const reader = native.openMultifdReader(fd, MULTIFD_INIT_LENGTH, [{ name: 'pc.ram', memory: ram }, { name: 'vga', memory: Buffer.from(new SharedArrayBuffer(small.length)) }], (r) => {
    if (r.syncs > 0 || r.end !== 0) synced(r);
  });
  try {
    const cuts = [700, 5000, 100_000, 300_000, stream.length - 10, stream.length];
    let at = 0;
    for (const cut of cuts) {
      sender.write(stream.subarray(at, cut));
      at = cut;
      await new Promise((resolve) => setTimeout(resolve, 150));
    }
    const timer = setTimeout(() => synced({ end: 2, message: 'no report of the SYNC within 10 s' } as MultifdReaderReport), 10_000);
    const report = await sync;
    clearTimeout(timer);
    assert.deepEqual({ end: report.end, syncs: report.syncs, pages: report.pages, bytes: report.bytes }, { end: 0, syncs: 1, pages: 128, bytes: MULTIFD_INIT_LENGTH + stream.length }, JSON.stringify(report));
    assert.ok(ram.subarray(0, 128 * PAGE).equals(src.subarray(0, 128 * PAGE)), 'the pieces put together in RAM');
  } finally {
    reader.close();
    close();
  }
});

test('multifd reader: a peer gone in the middle of a packet is a lost link; close returns at once while the thread waits for bytes', { skip, timeout: 30_000 }, async () => {
  const whole = packet('pc.ram', [PAGE, 2 * PAGE], src);
  const cut = await readNative(whole.subarray(0, whole.length - 100), SIZES);
  assert.equal(cut.report.end, 2);
  assert.equal(cut.report.lost, true);
  assert.equal(cut.report.message, 'closed in the middle of a packet');

  const { sender, fd, close } = await pair();
  const reports: MultifdReaderReport[] = [];
  const reader = native.openMultifdReader(fd, 0, [{ name: 'pc.ram', memory: Buffer.from(new SharedArrayBuffer(src.length)) }], (r) => reports.push(r));
  try {
    sender.write(packet('', [], src, { flags: MULTIFD_FLAG_SYNC }));
    sender.write(whole.subarray(0, 500)); // part of a header: the thread waits for the rest
    const deadline = Date.now() + 10_000;
    while (!reports.some((r) => r.syncs === 1)) {
      if (Date.now() > deadline) assert.fail('the SYNC was not reported');
      await new Promise((resolve) => setTimeout(resolve, 2));
    }
    const t0 = performance.now();
    reader.close();
    assert.ok(performance.now() - t0 < 1000, 'close does not wait for bytes');
    const count = reports.length;
    await new Promise((resolve) => setTimeout(resolve, 20));
    assert.equal(reports.length, count, 'nothing reported after close');
  } finally {
    reader.close();
    close();
  }
});
