// KeepalivePings: the PINGs the machine asked for, and the round trip of each that is answered.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { BatchWriter, KEEPALIVE_PING_BASE } from '@livemig/protocol';
import { KeepalivePings } from '../src/keepalive-pings.ts';

function written(w: BatchWriter): Buffer {
  return Buffer.concat(w.flush());
}

test('each due PING is written once, with the next value; a timed one gives its round trip once', () => {
  const p = new KeepalivePings();
  const w = new BatchWriter();
  p.add();
  p.add();
  p.writeDue(w, 1_000);
  assert.equal(p.pending, false);
  const bytes = written(w);
  // Two MIG_CMD_PING commands: QEMU_VM_COMMAND, be16 cmd, be16 length 4, be32 value.
  assert.equal(bytes.length, 2 * 9);
  assert.equal(bytes.readUInt32BE(5), KEEPALIVE_PING_BASE);
  assert.equal(bytes.readUInt32BE(14), KEEPALIVE_PING_BASE + 1);
  assert.equal(p.answered(KEEPALIVE_PING_BASE + 1, 1_012), 12);
  assert.equal(p.answered(KEEPALIVE_PING_BASE + 1, 1_020), undefined, 'answered once');
  assert.equal(p.answered(4, 1_020), undefined, "a PONG to someone else's PING");
});

test('PINGs written without a time are not timed, and only the last 8 are remembered', () => {
  const p = new KeepalivePings();
  const w = new BatchWriter();
  p.add();
  p.writeDue(w);
  assert.equal(p.answered(KEEPALIVE_PING_BASE, 5), undefined);
  for (let i = 1; i <= 9; i++) {
    p.add();
    p.writeDue(w, i);
  }
  assert.equal(p.answered(KEEPALIVE_PING_BASE + 1, 100), undefined, 'the oldest was forgotten');
  assert.equal(p.answered(KEEPALIVE_PING_BASE + 2, 100), 98);
});
