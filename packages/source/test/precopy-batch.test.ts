// Precopy's RAM batch size (ramBatchBytes): what the link moves in a few ms at its measured rate,
// between 1 MiB and 4 MiB (8 MiB with multifd), and never less than two multifd packets per channel.
//
// Run: node --import tsx --test packages/source/test/precopy-batch.test.ts

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { MULTIFD_PACKET_HEADER_LENGTH, MULTIFD_PAGES_PER_PACKET, TARGET_PAGE_SIZE } from '@livemig/protocol';
import { BATCH_BYTES, ramBatchBytes } from '../src/batch-size.ts';

const MiB = 2 ** 20;
const PACKET = MULTIFD_PACKET_HEADER_LENGTH + MULTIFD_PAGES_PER_PACKET * TARGET_PAGE_SIZE;

test('ramBatchBytes: 1 MiB before the link is measured and on a slow link; 4 MiB on loopback; in between, 5 ms of the link', () => {
  assert.equal(BATCH_BYTES, MiB);
  assert.equal(ramBatchBytes(0, 0), MiB, 'nothing measured yet');
  // 100 Mbit/s: 12.5 kB a ms; a 4 MiB batch would take a third of a second to drain.
  assert.equal(ramBatchBytes(12_500, 0), MiB);
  // 5 Gbit/s: 625 kB a ms, 3.125 MB in 5 ms.
  assert.equal(ramBatchBytes(625_000, 0), 3_125_000);
  // Loopback here: 2-4 GiB/s.
  assert.equal(ramBatchBytes(3 * 2 ** 30 / 1000, 0), 4 * MiB);
  assert.equal(ramBatchBytes(Number.MAX_VALUE, 0), 4 * MiB);
  assert.ok(Number.isInteger(ramBatchBytes(1_234_567.891, 0)));
});

test('ramBatchBytes: with multifd up to 8 MiB, and at least two packets per channel whatever the rate', () => {
  assert.equal(ramBatchBytes(0, 2), Math.max(MiB, 4 * PACKET));
  assert.equal(ramBatchBytes(12_500, 4), 8 * PACKET, 'a slow link: two packets a channel');
  assert.equal(ramBatchBytes(3 * 2 ** 30 / 1000, 2), 8 * MiB);
  assert.equal(ramBatchBytes(3 * 2 ** 30 / 1000, 4), 8 * MiB);
  assert.equal(ramBatchBytes(3 * 2 ** 30 / 1000, 16), 32 * PACKET, '16 channels need more than 8 MiB for two packets each');
});
