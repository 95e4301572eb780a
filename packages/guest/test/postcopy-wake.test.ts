// Postcopy wake-ups: pages are placed with setReceived (no wake per page) and vCPUs are woken by
// wakeWaiters once per read, or by wakeWaiterOf as the very page one waits for is placed. A vCPU must wake as soon as its own page is there (well before its
// 100 ms wait timeout) and must not run on while it is missing. Real vCPU worker threads.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { Worker } from 'node:worker_threads';
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

/** One vCPU in postcopy fault mode, running `workload` until its first fault (on page 0). */
async function faultedVcpu(pages: number, workload: string): Promise<{ ram: GuestRam; vcpus: VcpuSet }> {
  const ram = new GuestRam([{ idstr: 'm', length: pages * 4096 }]);
  ram.waiterSlots = 1;
  const vcpus = new VcpuSet(1, ram.blocks[0]!, parseWorkload(workload));
  vcpus.setPostcopy(true);
  await vcpus.cont();
  await vcpus.waitForFault(5_000);
  return { ram, vcpus };
}

test('a faulted vCPU sleeps while other pages arrive and wakes within milliseconds once its own page is set', { timeout: 30_000 }, async () => {
  // The incrementer starts at page 0: it faults there and waits.
  const { ram, vcpus } = await faultedVcpu(PAGES, 'incrementer');
  try {
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
  // 4.096 MB/s: one page a millisecond.
  const { ram, vcpus } = await faultedVcpu(4096, 'incrementer:4.096');
  try {
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

test('claimPage: two threads placing the same pages each win a page at most once, and never a page already received', { timeout: 30_000 }, async () => {
  const pages = 1 << 16;
  const ram = new GuestRam([{ idstr: 'm', length: pages * 4096 }]);
  const b = ram.blocks[0]!;
  // Every 7th page was received before: nobody may claim it.
  for (let p = 0; p < pages; p += 7) ram.setReceived(0, p);
  // The workers run the shipped claimPage (the compiled module).
  const code = `
    const { workerData, parentPort } = require('node:worker_threads');
    import(workerData.ram).then(({ claimPage }) => {
      const claimed = new Int32Array(workerData.claimed), received = new Int32Array(workerData.received);
      const won = new Uint8Array(workerData.pages);
      for (let p = 0; p < workerData.pages; p++) if (claimPage(claimed, received, p)) won[p] = 1;
      parentPort.postMessage(won);
    });`;
  const { Worker } = await import('node:worker_threads');
  const ramModule = new URL('../dist/page-bitmap.js', import.meta.url).href;
  const run = (): Promise<Uint8Array> =>
    new Promise((resolve, reject) => {
      const w = new Worker(code, { eval: true, workerData: { claimed: b.claimedMemory, received: b.receivedMemory, pages, ram: ramModule } });
      w.once('message', resolve);
      w.once('error', reject);
    });
  const probe = new GuestRam([{ idstr: 'p', length: 64 * 4096 }]);
  probe.setReceived(0, 3);
  assert.equal(probe.claim(0, 3), false, 'a received page cannot be claimed');
  assert.equal(probe.claim(0, 4), true, 'a missing page can be claimed once');
  assert.equal(probe.claim(0, 4), false, 'and not twice');
  probe.releaseClaims();
  assert.equal(probe.claim(0, 4), true, 'released (not received): claimable again');

  const [a, c] = await Promise.all([run(), run(), ram.claim(0, 1)]);
  let both = 0;
  let none = 0;
  for (let p = 0; p < pages; p++) {
    const n = a[p]! + c[p]! + (p === 1 ? 1 : 0);
    if (n > 1) both++;
    if (p % 7 === 0 ? n !== 0 : n !== 1) none++;
  }
  assert.equal(both, 0, 'no page claimed twice');
  assert.equal(none, 0, 'every missing page claimed exactly once, no received one');
});

test('wakeWaiterOf wakes the thread waiting for that very page, and no one for another page of its word', { timeout: 30_000 }, async () => {
  const ram = new GuestRam([{ idstr: 'm', length: 64 * 4096 }]);
  ram.waiterSlots = 1;
  const b = ram.blocks[0]!;
  const page = 37;
  Atomics.store(b.waiting, 0, page + 1);
  // Both pages are placed first: the thread then sleeps on the word as it is, with no timeout,
  // and only a notify wakes it.
  ram.setReceived(0, page + 1);
  ram.setReceived(0, page);
  const sleeper = new Worker(
    `const { workerData: r, parentPort } = require('node:worker_threads'); parentPort.postMessage(Atomics.wait(r, ${page >> 5}, Atomics.load(r, ${page >> 5})));`,
    { eval: true, workerData: b.received },
  );
  try {
    const woke = new Promise((resolve) => sleeper.once('message', resolve));
    assert.equal(ram.wakeWaiterOf(0, page + 1), 0, 'nobody waits for the neighbour');
    // Until the thread is asleep there is nobody to wake: ask again until the wake reaches it.
    const until = Date.now() + 10_000;
    while (ram.wakeWaiterOf(0, page) === 0) {
      assert.ok(Date.now() < until, 'the wake never reached the sleeping thread');
      await sleep(5);
    }
    assert.equal(await woke, 'ok', 'woken by the notify');
  } finally {
    await sleeper.terminate();
  }
});
