// StreamOut.writeBatch over real sockets: batches with guest pages by reference arrive byte for
// byte in order, through the native writev while Node has nothing queued (a full socket waited
// for by Node's write of one chunk, then the native writev again), through Node's own write when
// it has bytes queued or when the stream is not a plain socket.

import assert from 'node:assert/strict';
import { randomFillSync } from 'node:crypto';
import type net from 'node:net';
import { PassThrough } from 'node:stream';
import { test } from 'node:test';
import { native } from '@livemig/native';
import { BatchWriter } from '@livemig/protocol';
import { StreamOut } from '../src/stream-out.ts';
import { socketPair } from './socket-pair.ts';

const TIMEOUT_MS = 60_000;
const PAGE = 4096;
const nativeSkip = native.available || process.env['CI'] === 'true' ? false : `the native addon is not built (${native.unavailableReason})`;

/** Everything the peer reads until `n` bytes have come. */
function collect(peer: net.Socket, n: number): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const parts: Buffer[] = [];
    let got = 0;
    peer.on('data', (chunk: Buffer) => {
      parts.push(chunk);
      got += chunk.length;
      if (got >= n) resolve(Buffer.concat(parts));
    });
    peer.on('error', reject);
  });
}

/** Equal bytes, or the first offset where they differ (deepEqual's diff of MiBs takes minutes). */
function assertSameBytes(actual: Buffer, expected: Buffer): void {
  if (actual.equals(expected)) return;
  let at = 0;
  while (at < actual.length && at < expected.length && actual[at] === expected[at]) at++;
  assert.fail(`${actual.length} bytes received, ${expected.length} expected; they first differ at byte ${at}`);
}

/** Page records as the main channel encodes them: a header word, then the page by reference. */
function encodePages(w: BatchWriter, ram: Buffer, first: number, count: number, expected: Buffer[]): void {
  for (let p = first; p < first + count; p++) {
    w.be64(p * PAGE + 0x08);
    w.view(ram, p * PAGE, PAGE);
    const header = Buffer.alloc(8);
    header.writeBigUInt64BE(BigInt(p * PAGE + 0x08));
    expected.push(header, Buffer.from(ram.subarray(p * PAGE, (p + 1) * PAGE)));
  }
}

test('writeBatch: pages by reference arrive in order through the native writev; on a full socket Node waits for room and the native writev goes on', { skip: nativeSkip, timeout: TIMEOUT_MS }, async () => {
  const [client, peer] = await socketPair();
  try {
    const pages = 8192; // 32 MiB: the first batch overfills loopback's buffers while the peer does not read
    const ram = Buffer.from(new SharedArrayBuffer(pages * PAGE));
    randomFillSync(ram);
    const out = new StreamOut(client, 'main');
    assert.equal(out.takesRefs, true);
    const w = new BatchWriter();
    const expected: Buffer[] = [];
    peer.pause();
    encodePages(w, ram, 0, pages / 2, expected);
    let writtenCalls = 0;
    const first = w.flushRefs();
    const firstWritten = out.writeBatch(first, 1, () => {
      writtenCalls++;
      w.recycle(first.pieces);
    });
    assert.ok(out.nativeBytes > 0 && out.nativeBytes < first.bytes, `the native writev took the start of the batch (${out.nativeBytes} bytes)`);
    assert.equal(out.nativePartial, 1, 'and stopped where the socket was full');
    assert.equal(writtenCalls, 0, 'not written yet');
    const total = Buffer.concat(expected).length + (pages / 2) * (PAGE + 8);
    const received = collect(peer, total);
    peer.resume();
    await firstWritten;
    assert.equal(writtenCalls, 1);
    // Node wrote one chunk (a header or a page) each time the socket was full; the native writev the rest.
    assert.ok(out.nativeBytes >= first.bytes - out.nativePartial * PAGE, `${out.nativeBytes} of ${first.bytes} bytes native over ${out.nativePartial} waits`);
    // Later batches, one at a time, as precopy writes them.
    for (let p = pages / 2; p < pages; p += 256) {
      encodePages(w, ram, p, 256, expected);
      const batch = w.flushRefs();
      await out.writeBatch(batch, 1, () => {
        writtenCalls++;
        w.recycle(batch.pieces);
      });
    }
    await out.settle();
    const want = Buffer.concat(expected);
    assert.equal(want.length, total);
    assertSameBytes(await received, want);
    assert.equal(writtenCalls, 1 + pages / 2 / 256, 'every batch said it was written');
    assert.equal(out.written, total);
    assert.equal(out.accepted, total);
  } finally {
    client.destroy();
    peer.destroy();
  }
});

test('writeBatch: while Node still holds earlier bytes, a batch goes through Node after them', { skip: nativeSkip, timeout: TIMEOUT_MS }, async () => {
  const [client, peer] = await socketPair();
  try {
    const ram = Buffer.from(new SharedArrayBuffer(64 * PAGE));
    randomFillSync(ram);
    const out = new StreamOut(client, 'main');
    peer.pause();
    // 16 MiB through Node first: loopback's buffers fill and Node queues the rest.
    const plain = randomFillSync(Buffer.alloc(16 * 1024 * 1024));
    void out.write([plain], 2);
    assert.ok(client.writableLength > 0, 'Node holds bytes it could not write yet');
    const w = new BatchWriter();
    const expected: Buffer[] = [plain];
    encodePages(w, ram, 0, 64, expected);
    const received = collect(peer, Buffer.concat(expected).length);
    peer.resume();
    await out.writeBatch(w.flushRefs(), 2);
    await out.settle();
    assert.equal(out.nativeBytes, 0, 'the native writev kept out while Node had bytes queued');
    assertSameBytes(await received, Buffer.concat(expected));
  } finally {
    client.destroy();
    peer.destroy();
  }
});

test('writeBatch on a stream that is not a plain socket: refs go out as views, the same bytes', { timeout: TIMEOUT_MS }, async () => {
  const stream = new PassThrough();
  const out = new StreamOut(stream, 'main');
  assert.equal(out.takesRefs, false);
  const ram = Buffer.from(new SharedArrayBuffer(16 * PAGE));
  randomFillSync(ram);
  const w = new BatchWriter();
  const expected: Buffer[] = [];
  encodePages(w, ram, 0, 16, expected);
  const chunks: Buffer[] = [];
  stream.on('data', (c: Buffer) => chunks.push(c));
  await out.writeBatch(w.flushRefs());
  await out.settle();
  assertSameBytes(Buffer.concat(chunks), Buffer.concat(expected));
  assert.equal(out.nativeBytes, 0);
});

test('writerThread: batches go out in order through the channel\'s own thread, each said written once the thread wrote it; end() waits for it', { skip: nativeSkip, timeout: TIMEOUT_MS }, async () => {
  const [client, peer] = await socketPair();
  try {
    const pages = 4096;
    const ram = Buffer.from(new SharedArrayBuffer(pages * PAGE));
    randomFillSync(ram);
    const out = new StreamOut(client, 'multifd', { writerThread: true });
    const w = new BatchWriter();
    const expected: Buffer[] = [];
    const total = pages * (PAGE + 8);
    const received = collect(peer, total);
    let writtenCalls = 0;
    for (let p = 0; p < pages; p += 512) {
      encodePages(w, ram, p, 512, expected);
      const batch = w.flushRefs();
      await out.writeBatch(batch, 1, () => {
        writtenCalls++;
        w.recycle(batch.pieces);
      });
    }
    await out.end();
    assertSameBytes(await received, Buffer.concat(expected));
    assert.equal(writtenCalls, pages / 512, 'every batch said it was written');
    assert.deepEqual([out.written, out.accepted, out.nativeBytes], [total, total, total], 'all of it by the thread');
  } finally {
    client.destroy();
    peer.destroy();
  }
});

test('writerThread: a peer that ends the connection while the thread still holds batches fails the stream (Node, with nothing of its own left to write, takes it for a clean end)', { skip: nativeSkip, timeout: TIMEOUT_MS }, async () => {
  const [client, peer] = await socketPair();
  try {
    const pages = 8192; // 32 MiB: more than loopback's buffers hold while the peer does not read
    const ram = Buffer.from(new SharedArrayBuffer(pages * PAGE));
    const out = new StreamOut(client, 'multifd', { writerThread: true });
    const w = new BatchWriter();
    peer.pause();
    encodePages(w, ram, 0, pages / 2, []);
    const first = w.flushRefs();
    const firstWritten = out.writeBatch(first, 1);
    encodePages(w, ram, pages / 2, pages / 2, []);
    const second = out.writeBatch(w.flushRefs(), 1);
    await new Promise((resolve) => setTimeout(resolve, 50));
    // A FIN while it reads nothing: the source's Node socket ends and closes cleanly.
    peer.end();
    await assert.rejects(Promise.all([firstWritten, second]), (err: { code?: string; message: string }) => {
      assert.equal(err.code, 'LM_ERR_CHANNEL_LOST');
      assert.match(err.message, /multifd channel/);
      return true;
    });
    assert.ok(out.error !== undefined);
    // A later write is refused at once, not sent into nothing.
    await assert.rejects(out.write([Buffer.from('late')]), (err: { code?: string }) => err.code === 'LM_ERR_CHANNEL_LOST');
  } finally {
    client.destroy();
    peer.destroy();
  }
});
