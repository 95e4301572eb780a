// MultifdSender over a real socket pair: what a MultifdReceiver reads off the other end is the
// guest RAM that was queued, and the channels' slabs are reused rather than allocated per packet.

import assert from 'node:assert/strict';
import { randomFillSync } from 'node:crypto';
import { test } from 'node:test';
import { MultifdReceiver, TARGET_PAGE_SIZE } from '@livemig/protocol';
import { MultifdSender } from '../src/multifd-sender.ts';
import { socketPair } from './socket-pair.ts';

const RAM_BYTES = 16 * 1024 * 1024;
const TIMEOUT_MS = 60_000;

test('pages queued on a multifd channel arrive intact, with SYNCs, and its slabs are reused', { timeout: TIMEOUT_MS }, async () => {
  const [client, peer] = await socketPair();
  try {
    const source = Buffer.from(new SharedArrayBuffer(RAM_BYTES));
    randomFillSync(source);
    const target = Buffer.alloc(RAM_BYTES);
    const recv = new MultifdReceiver((name) => (name === 'm0' ? target : undefined));
    let received = 0;
    const syncs = new Promise<void>((resolve, reject) => {
      peer.on('data', (chunk: Buffer) => {
        try {
          for (let at = 0; at < chunk.length; ) {
            const into = recv.nextBuffer();
            const n = chunk.copy(into, 0, at, at + Math.min(into.length, chunk.length - at));
            at += n;
            received += n;
            recv.advance(n);
          }
          if (recv.syncs === 2) resolve();
        } catch (err) {
          reject(err as Error);
        }
      });
    });

    const sender = new MultifdSender([client]);
    const passes = 2;
    for (let pass = 0; pass < passes; pass++) {
      // Every other page, so that packets carry several runs of contiguous pages.
      let queued = 0;
      for (const start of [0, TARGET_PAGE_SIZE]) {
        for (let off = start; off < RAM_BYTES; off += 2 * TARGET_PAGE_SIZE) {
          sender.queuePage('m0', source, off);
          // About one packet per write, as precopy does with a channel or two.
          if (++queued % 128 === 0) await sender.flush();
        }
      }
      await sender.sync();
      await sender.settle();
    }
    await syncs;

    assert.ok(target.equals(source), 'the receiver placed exactly the queued pages');
    assert.equal(recv.pages, (passes * RAM_BYTES) / TARGET_PAGE_SIZE);
    assert.equal(received, sender.written);
    // 64 packets' headers went through a few 64 KiB slabs: written ones are reused.
    assert.ok(sender.slabsAllocated <= 4, `${sender.slabsAllocated} slabs allocated for 64 packets`);
  } finally {
    client.destroy();
    peer.destroy();
  }
});
