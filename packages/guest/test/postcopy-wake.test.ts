// Postcopy wake-ups: pages are placed with setReceived (no wake per page) and vCPUs are woken by
// wakeWaiters once per read. A vCPU must wake as soon as its own page is there (well before its
// 100 ms wait timeout) and must not run on while it is missing. Real vCPU worker threads.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { GuestRam, parseWorkload, VcpuSet } from '../src/index.ts';

const PAGES = 256;

async function until(cond: () => boolean, ms: number): Promise<number> {
  const t0 = performance.now();
  while (!cond()) {
    if (performance.now() - t0 > ms) throw new Error(`condition not met within ${ms} ms`);
    await sleep(1);
  }
  return performance.now() - t0;
}

test('a faulted vCPU sleeps while other pages arrive and wakes within milliseconds once its own page is set', { timeout: 30_000 }, async () => {
  const ram = new GuestRam([{ idstr: 'm', length: PAGES * 4096 }]);
  ram.waiterSlots = 1;
  const vcpus = new VcpuSet(1, ram.blocks[0]!, parseWorkload('incrementer'));
  vcpus.setPostcopy(true);
  try {
    await vcpus.cont();
    // The incrementer starts at page 0: it faults there and waits.
    await vcpus.waitForFault(5_000);
    const faults = new Uint32Array(16);
    assert.equal(vcpus.drainFaults(faults), 1);
    const page = faults[0]!;
    await until(() => Atomics.load(ram.blocks[0]!.waiting, 0) === page + 1, 2_000);

    // Every other page of its word arrives, with wake-ups: the vCPU keeps waiting.
    for (let p = (page & ~31); p < (page & ~31) + 32; p++) if (p !== page) ram.setReceived(0, p);
    ram.wakeWaiters(0);
    await sleep(30);
    assert.equal(vcpus.blockTime(0).faults, 0, 'still blocked on its page');
    assert.equal(Atomics.load(ram.blocks[0]!.waiting, 0), page + 1);

    // Its page arrives: woken by the next wakeWaiters, far sooner than the 100 ms wait timeout.
    ram.setReceived(0, page);
    const t0 = performance.now();
    ram.wakeWaiters(0);
    const waited = await until(() => vcpus.blockTime(0).faults >= 1, 2_000);
    assert.ok(performance.now() - t0 < 50, `woken after ${waited.toFixed(1)} ms`);
    // It runs through the pages it has (the rest of the word) and faults on the next missing one.
    await vcpus.waitForFault(2_000);
    assert.equal(vcpus.drainFaults(faults), 1);
    assert.equal(faults[0], (page & ~31) + 32, 'the next fault is the first page of the next word');
  } finally {
    ram.markAllReceived();
    await vcpus.exit();
  }
});

test('a paced vCPU earns no credit while blocked: after a stall it runs on at its pace, not in a catch-up burst', { timeout: 30_000 }, async () => {
  const pages = 4096;
  const ram = new GuestRam([{ idstr: 'm', length: pages * 4096 }]);
  ram.waiterSlots = 1;
  // 4.096 MB/s: one page a millisecond.
  const vcpus = new VcpuSet(1, ram.blocks[0]!, parseWorkload('incrementer:4.096'));
  vcpus.setPostcopy(true);
  try {
    await vcpus.cont();
    await vcpus.waitForFault(5_000);
    const stalledMs = 500;
    await sleep(stalledMs);
    assert.equal(vcpus.readState(0).position, 0, 'blocked on page 0');
    ram.markAllReceived();
    const t0 = performance.now();
    ram.wakeWaiters(0);
    await sleep(50);
    const ran = performance.now() - t0;
    const touched = vcpus.readState(0).position;
    // Credit for the stall would let it touch ~500 pages at once; its pace allows ~1 per ms.
    assert.ok(touched >= 1, 'it runs again');
    assert.ok(touched < ran + 150, `${touched} pages touched in ${ran.toFixed(0)} ms after a ${stalledMs} ms stall`);
  } finally {
    ram.markAllReceived();
    await vcpus.exit();
  }
});
