// QEMU's side of the VFIO v1 device (VfioDevice): a whole save into QEMU 7.2's section framing,
// loaded by a second device, with the device state moving as QEMU moves it; no processes.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { BatchWriter, readVfioSection } from '@livemig/protocol';
import { VfioDevice, VfioV1State } from '../src/index.ts';

const CHUNK = 1024;
const RECORD = 4 + CHUNK;
const options = { memoryBytes: 32 * CHUNK, chunkBytes: CHUNK, dataAreaBytes: 4 * RECORD, seed: 3 };

function section(build: (w: BatchWriter) => unknown): Buffer {
  const w = new BatchWriter();
  build(w);
  return w.flushConcat();
}

test('setup, pre-copy iterations while the device runs, stop-and-copy, config: the destination ends equal', () => {
  const src = new VfioDevice(options);
  const dst = new VfioDevice({ ...options, seed: 99 });
  assert.notDeepEqual(dst.memory, src.memory);
  const sections: Buffer[] = [];

  sections.push(section((w) => src.saveSetup(w)));
  assert.equal(src.region.deviceState, VfioV1State.SAVING | VfioV1State.RUNNING);
  assert.equal(src.pendingEstimate(), 32 * RECORD);
  let iterations = 0;
  while (src.pendingEstimate() > 2 * RECORD && iterations < 100) {
    sections.push(section((w) => src.saveIterate(w, 2 ** 20)));
    src.region.tick(1); // the device keeps working
    iterations++;
  }
  assert.ok(iterations >= 8, `${iterations} iterations`);
  assert.equal(src.stats.precopyIterations, iterations);
  // The guest stops: pre-copy becomes stop-and-copy.
  src.stop();
  assert.equal(src.region.deviceState, VfioV1State.SAVING);
  assert.equal(src.pendingExact(), src.region.dirtyChunks * RECORD, 'a stopped device is asked for the exact figure');
  sections.push(
    section((w) => {
      while (!src.saveComplete(w, RECORD)) {
        // the caller flushes between calls
      }
    }),
  );
  assert.equal(src.region.deviceState, VfioV1State.STOP);
  sections.push(section((w) => src.saveState(w)));
  assert.equal(sections.at(-1)!.length, src.stateLength);

  const phases = sections.map((s) => readVfioSection(s, 0, s.length).phase);
  assert.equal(phases[0], 'setup');
  assert.equal(phases.at(-1), 'config');
  assert.equal(src.stats.transferredBytes, src.stats.precopyBytes + src.stats.stopCopyBytes);

  for (const s of sections) dst.loadState(s, 1);
  assert.equal(dst.region.deviceState, VfioV1State.RESUMING);
  assert.deepEqual(dst.memory, src.memory);
  assert.deepEqual(dst.registers, src.registers);
  assert.equal(dst.digest(), src.digest());
  dst.start();
  assert.equal(dst.region.deviceState, VfioV1State.RUNNING);
  dst.stop();
  src.cleanup();
  assert.equal(src.region.deviceState, VfioV1State.STOP);
});

test('an iteration with nothing pending is DATA | 0 | END; the estimate is refreshed only when it can matter', () => {
  const dev = new VfioDevice(options);
  section((w) => dev.saveSetup(w));
  while (dev.pendingEstimate() > 0) section((w) => dev.saveIterate(w, 2 ** 20));
  const empty = section((w) => dev.saveIterate(w, 2 ** 20));
  assert.equal(empty.toString('hex'), 'ffffffffef100004' + '0000000000000000' + 'ffffffffef100001');
  dev.region.tick(3);
  assert.equal(dev.pendingEstimate(), 0, 'the estimate does not touch the device');
  assert.ok(dev.pendingExact() > 0, 'a low estimate is re-read');
  dev.cleanup();
  assert.equal(dev.region.deviceState, VfioV1State.RUNNING, 'a cancelled save leaves the device running');
});

test('a cancel after the guest stopped leaves the device stopped until the guest runs again', () => {
  const dev = new VfioDevice(options);
  section((w) => dev.saveSetup(w));
  dev.stop();
  dev.cleanup();
  assert.equal(dev.region.deviceState, VfioV1State.STOP);
  dev.start();
  assert.equal(dev.region.deviceState, VfioV1State.RUNNING);
  dev.stop();
});

test('resume data the device cannot apply: DeviceLoadError with the region error as its cause, device in the error state', () => {
  const dev = new VfioDevice(options);
  dev.loadState(section((w) => w.be32(0xffffffff).be32(0xef100003).be32(0xffffffff).be32(0xef100001)), 1);
  const bad = section((w) => w.be32(0xffffffff).be32(0xef100004).be64(3).bytes(Buffer.from([1, 2, 3])).be32(0xffffffff).be32(0xef100001));
  assert.throws(
    () => dev.loadState(bad, 1),
    (err: { code?: string; cause?: { code?: string } }) => err.code === 'LM_ERR_DEVICE_LOAD' && err.cause?.code === 'LM_ERR_VFIO_DEVICE_ERROR',
  );
  assert.equal(dev.region.deviceState, VfioV1State.SAVING | VfioV1State.RESUMING);
  dev.start(); // the vCPUs may run; the broken device stays as it is
  dev.stop();
  assert.equal(dev.region.deviceState, VfioV1State.SAVING | VfioV1State.RESUMING);
  assert.throws(() => dev.loadState(bad, 2), (err: { code?: string }) => err.code === 'LM_ERR_DEVICE_LOAD');
});
