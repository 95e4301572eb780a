// Guest.keepWarm: its reader thread starts only after the first period, so a migration that comes
// at once never shares the cores with a thread's start-up, and a stop before then means no thread
// at all. Threads are counted in /proc/self/task (each worker is one).

import assert from 'node:assert/strict';
import { readdirSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { test } from 'node:test';
import { Guest, parseWorkload } from '../src/index.ts';

const threads = (): number => readdirSync('/proc/self/task').length;

/** Poll until `ok()` holds; false once `ms` have passed. */
async function until(ok: () => boolean, ms: number): Promise<boolean> {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    if (ok()) return true;
    await sleep(20);
  }
  return ok();
}

/** The thread count once it has stayed the same for 300 ms (the guest's vCPU thread booting). */
async function settledThreads(): Promise<number> {
  let last = threads();
  let since = Date.now();
  const end = Date.now() + 10_000;
  while (Date.now() < end && Date.now() - since < 300) {
    await sleep(20);
    const now = threads();
    if (now !== last) {
      last = now;
      since = Date.now();
    }
  }
  return last;
}

test('keepWarm: no thread during the first period, none at all when stopped before it, one after it until stopped', { timeout: 60_000 }, async () => {
  const guest = new Guest({ blocks: [{ idstr: 'm', length: 2 ** 20 }], vcpus: 1, workload: parseWorkload('idle'), fill: 'zero', livemigDevices: false });
  try {
    const base = await settledThreads();

    const stopEarly = guest.keepWarm(1000);
    await sleep(300);
    assert.equal(threads(), base, 'a thread started within the first period');
    stopEarly();
    await sleep(1500);
    assert.equal(threads(), base, 'a thread started after keepWarm was stopped');

    const stop = guest.keepWarm(100);
    assert.ok(await until(() => threads() > base, 10_000), 'no reader thread 10 s after a 100 ms period');
    stop();
    assert.ok(await until(() => threads() === base, 10_000), 'the reader thread still runs 10 s after stop');
  } finally {
    await guest.destroy();
  }
});
