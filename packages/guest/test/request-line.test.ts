// The fault request line: page requests written straight to a connection's descriptor by the
// threads that fault, serialized by a lock word. Real TCP loopback connections; real worker
// threads for the concurrent case.

import assert from 'node:assert/strict';
import { once } from 'node:events';
import { writeSync } from 'node:fs';
import net from 'node:net';
import { test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { Worker } from 'node:worker_threads';
import { bitmapWords, createRequestLine, LINE_OWNER, LineFailure, LineResult, RequestLine } from '../src/index.ts';

const PAGES = 4096;
// Templates: [kind, 0, 0, 0][8-byte address][tail]. The line knows only the address's place.
const NAMING = Uint8Array.from([0x4e, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x6e, 0x61, 0x6d, 0x65]);
const PLAIN = Uint8Array.from([0x50, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
const ADDRESS_AT = 4;

interface Pair {
  /** The writing end, whose descriptor is published. */
  client: net.Socket;
  fd: number;
  /** What the other end has read so far. */
  received: () => Buffer;
  peer: net.Socket;
  close: () => void;
}

async function tcpPair(): Promise<Pair> {
  const server = net.createServer();
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const { port } = server.address() as net.AddressInfo;
  const client = net.connect(port, '127.0.0.1');
  const [peer] = (await once(server, 'connection')) as [net.Socket];
  await once(client, 'connect');
  const chunks: Buffer[] = [];
  peer.on('data', (c: Buffer) => chunks.push(c));
  client.on('error', () => {});
  peer.on('error', () => {});
  const fd = (client as unknown as { _handle: { fd: number } })._handle.fd;
  return {
    client,
    fd,
    peer,
    received: () => Buffer.concat(chunks),
    close: () => {
      client.destroy();
      peer.destroy();
      server.close();
    },
  };
}

/** Parse requests written with NAMING / PLAIN: [kind letter, page] in order. */
function parse(bytes: Buffer): [string, number][] {
  const out: [string, number][] = [];
  let off = 0;
  while (off < bytes.length) {
    const kind = String.fromCharCode(bytes[off]!);
    const len = kind === 'N' ? NAMING.length : kind === 'P' ? PLAIN.length : -1;
    assert.notEqual(len, -1, `unknown request kind ${bytes[off]} at byte ${off}`);
    assert.ok(off + len <= bytes.length, `a request cut short at byte ${off}`);
    const address = bytes.readUInt32BE(off + ADDRESS_AT) * 2 ** 32 + bytes.readUInt32BE(off + ADDRESS_AT + 4);
    assert.equal(address % 4096, 0);
    if (kind === 'N') assert.deepEqual([...bytes.subarray(off + 12, off + 16)], [...NAMING.subarray(12)]);
    out.push([kind, address / 4096]);
    off += len;
  }
  return out;
}

async function settle(pair: Pair, bytes: number): Promise<void> {
  const t0 = Date.now();
  while (pair.received().length < bytes) {
    if (Date.now() - t0 > 5_000) throw new Error(`expected ${bytes} bytes, got ${pair.received().length}`);
    await sleep(2);
  }
}

function newLine(): { line: SharedArrayBuffer; requested: SharedArrayBuffer; received: Int32Array } {
  return {
    line: createRequestLine(),
    requested: new SharedArrayBuffer(bitmapWords(PAGES) * 4),
    received: new Int32Array(new SharedArrayBuffer(bitmapWords(PAGES) * 4)),
  };
}

test('a request names the block first, once per connection; a page asked for or here already is not asked again; a closed line takes nothing', async () => {
  const pair = await tcpPair();
  try {
    const l = newLine();
    const owner = new RequestLine(l.line, l.requested, l.received.buffer as SharedArrayBuffer, LINE_OWNER);
    const vcpu = new RequestLine(l.line, l.requested, l.received.buffer as SharedArrayBuffer, 0);
    // A new line is closed: the fault goes some other way.
    assert.equal(vcpu.requestPage(5), LineResult.UNAVAILABLE);
    owner.publish(pair.fd, NAMING, PLAIN, ADDRESS_AT);
    assert.equal(vcpu.requestPage(5), LineResult.SENT);
    assert.equal(vcpu.requestPage(5), LineResult.DUPLICATE);
    assert.equal(owner.requestPage(5), LineResult.DUPLICATE);
    // Page 2^20 + 7: an address above 4 GiB is written whole (both 32-bit halves).
    const high = 2 ** 20 + 7;
    const big = new RequestLine(l.line, new SharedArrayBuffer(bitmapWords(high + 1) * 4), new SharedArrayBuffer(bitmapWords(high + 1) * 4), 1);
    assert.equal(big.requestPage(high), LineResult.SENT);
    Atomics.or(l.received, 9 >> 5, 1 << 9);
    assert.equal(vcpu.requestPage(9), LineResult.DUPLICATE);
    assert.equal(owner.requestPage(10), LineResult.SENT);
    await settle(pair, NAMING.length + 2 * PLAIN.length);
    assert.deepEqual(parse(pair.received()), [
      ['N', 5],
      ['P', high],
      ['P', 10],
    ]);
    assert.deepEqual(RequestLine.written(l.line), { requests: 3, bytes: NAMING.length + 2 * PLAIN.length });

    // Retracted: nothing more is written to the descriptor.
    owner.retract();
    assert.equal(vcpu.requestPage(11), LineResult.UNAVAILABLE);
    // Published again (a new connection after a recovery): it names the block again and asks
    // again for pages asked for on the old one.
    owner.publish(pair.fd, NAMING, PLAIN, ADDRESS_AT);
    assert.equal(vcpu.requestPage(5), LineResult.SENT);
    await settle(pair, 2 * NAMING.length + 2 * PLAIN.length);
    assert.deepEqual(parse(pair.received()).slice(3), [['N', 5]]);

    // Shut (the owner is about to be ended): nothing is written, and a publish does not reopen it.
    assert.equal(RequestLine.shut(l.line), true);
    assert.equal(vcpu.requestPage(12), LineResult.UNAVAILABLE);
    owner.publish(pair.fd, NAMING, PLAIN, ADDRESS_AT);
    assert.equal(vcpu.requestPage(12), LineResult.UNAVAILABLE);
    // An owner ended while it held the lock: reopen frees it for the next owner.
    Atomics.store(new Int32Array(l.line), 0, LINE_OWNER + 1);
    RequestLine.reopen(l.line);
    assert.equal(vcpu.requestPage(12), LineResult.UNAVAILABLE, 'reopened, but nothing published yet');
    const t0 = performance.now();
    owner.publish(pair.fd, NAMING, PLAIN, ADDRESS_AT);
    assert.ok(performance.now() - t0 < 500, 'the lock was free: no wait to take it over');
    assert.equal(vcpu.requestPage(12), LineResult.SENT);
    await settle(pair, 3 * NAMING.length + 2 * PLAIN.length);
    assert.deepEqual(parse(pair.received()).slice(4), [['N', 12]]);
  } finally {
    pair.close();
  }
});

test('threads writing at once: every request arrives whole, and a page several threads fault on is asked for once', { timeout: 60_000 }, async () => {
  const pair = await tcpPair();
  const workers: Worker[] = [];
  try {
    const l = newLine();
    const owner = new RequestLine(l.line, l.requested, l.received.buffer as SharedArrayBuffer, LINE_OWNER);
    owner.publish(pair.fd, NAMING, PLAIN, ADDRESS_AT);
    const THREADS = 4;
    const OWN = 400; // pages only this thread asks for
    const SHARED = 100; // pages every thread asks for
    const url = new URL('../dist/request-line.js', import.meta.url).href;
    const code = `
      const { workerData, parentPort } = require('node:worker_threads');
      import(${JSON.stringify(url)}).then(({ RequestLine, LineResult }) => {
        const { line, requested, received, index, own, shared } = workerData;
        const me = new RequestLine(line, requested, received, index);
        let sent = 0;
        const handedOver = [];
        for (let i = 0; i < own + shared; i++) {
          const page = i < own ? 1000 + index * own + i : i - own;
          const r = me.requestPage(page);
          if (r === LineResult.SENT) sent++;
          // The lock was busy too long (a holder descheduled): as a vCPU does, hand it to the owner.
          else if (r === LineResult.UNAVAILABLE) handedOver.push(page);
        }
        parentPort.postMessage({ sent, handedOver });
      });`;
    const results: Promise<{ sent: number; handedOver: number[] }>[] = [];
    for (let i = 0; i < THREADS; i++) {
      const w = new Worker(code, { eval: true, workerData: { line: l.line, requested: l.requested, received: l.received.buffer, index: i, own: OWN, shared: SHARED } });
      workers.push(w);
      results.push(once(w, 'message').then(([m]) => m as { sent: number; handedOver: number[] }));
    }
    const done = await Promise.all(results);
    let sent = done.reduce((a, b) => a + b.sent, 0);
    for (const page of done.flatMap((d) => d.handedOver)) if (owner.requestPage(page) === LineResult.SENT) sent++;
    const total = THREADS * OWN + SHARED;
    assert.equal(sent, total);
    await settle(pair, NAMING.length + (total - 1) * PLAIN.length);
    const requests = parse(pair.received());
    assert.equal(requests.length, total);
    assert.equal(requests[0]![0], 'N');
    assert.ok(requests.slice(1).every(([k]) => k === 'P'));
    const pages = requests.map(([, p]) => p).sort((a, b) => a - b);
    const expected = [...Array.from({ length: SHARED }, (_, i) => i), ...Array.from({ length: THREADS * OWN }, (_, i) => 1000 + i)];
    assert.deepEqual(pages, expected);
  } finally {
    for (const w of workers) await w.terminate();
    pair.close();
  }
});

test('a connection that takes no bytes for LINE_WRITE_TIMEOUT_MS: the request gives the line up (stalled), and nothing more is written', { timeout: 30_000 }, async () => {
  const pair = await tcpPair();
  try {
    // The peer stops reading; fill both socket buffers.
    pair.peer.pause();
    const filler = Buffer.alloc(1 << 16);
    for (let stuck = 0; stuck < 50; ) {
      try {
        writeSync(pair.fd, filler);
      } catch {
        stuck++;
        await sleep(5);
      }
    }
    const l = newLine();
    const owner = new RequestLine(l.line, l.requested, l.received.buffer as SharedArrayBuffer, LINE_OWNER);
    const vcpu = new RequestLine(l.line, l.requested, l.received.buffer as SharedArrayBuffer, 0);
    owner.publish(pair.fd, NAMING, PLAIN, ADDRESS_AT);
    const t0 = performance.now();
    assert.equal(vcpu.requestPage(3), LineResult.UNAVAILABLE);
    const took = performance.now() - t0;
    assert.ok(took >= 900 && took < 5_000, `gave up after ${took.toFixed(0)} ms`);
    assert.equal(owner.failure, LineFailure.STALLED);
    assert.equal(vcpu.requestPage(4), LineResult.UNAVAILABLE);
    assert.deepEqual(RequestLine.written(l.line), { requests: 0, bytes: 0 });
  } finally {
    pair.close();
  }
});

test('a connection the peer has reset: the request fails with a write error and the line is given up', async () => {
  const pair = await tcpPair();
  try {
    // This end neither reads nor closes: the descriptor stays ours while the peer resets.
    pair.client.pause();
    pair.peer.resetAndDestroy();
    await sleep(50);
    const l = newLine();
    const owner = new RequestLine(l.line, l.requested, l.received.buffer as SharedArrayBuffer, LINE_OWNER);
    owner.publish(pair.fd, NAMING, PLAIN, ADDRESS_AT);
    let result: number = LineResult.SENT;
    for (let page = 0; page < 10 && result === LineResult.SENT; page++) result = owner.requestPage(page);
    assert.equal(result, LineResult.UNAVAILABLE);
    assert.equal(owner.failure, LineFailure.WRITE_ERROR);
  } finally {
    pair.close();
  }
});
