// DirtyRateSample (page sampling) on a real GuestRam: pages written between start and finish
// count, untouched ones do not, and the dirty log is left exactly as it was.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { DirtyRateSample, GuestRam } from '../src/index.ts';

const PAGE = 4096;

test('page sampling: every sampled page rewritten → the whole block per second; nothing written → 0', () => {
  const ram = new GuestRam([{ idstr: 'pc.ram', length: 4 * 2 ** 20 }]);
  const quiet = DirtyRateSample.start(ram, 16384, 0);
  assert.equal(quiet.finish(1000), 0);
  const busy = DirtyRateSample.start(ram, 16384, 0);
  // Every page changes: whatever was sampled changed, so the estimate is the block's size (4 MiB) per second.
  const bytes = ram.blocks[0]!.bytes;
  for (let p = 0; p < ram.blocks[0]!.pageCount; p++) bytes[p * PAGE + 7] = bytes[p * PAGE + 7]! ^ 0xff;
  assert.equal(busy.finish(2000), 2, '4 MiB dirtied over 2 s');
});

test('page sampling reads RAM only: the dirty log a migration relies on is left as it was', () => {
  const ram = new GuestRam([{ idstr: 'pc.ram', length: 2 ** 20 }]);
  ram.markDirty(0, 3);
  ram.markDirty(0, 200);
  const before = Int32Array.from(ram.blocks[0]!.dirtyLog);
  const s = DirtyRateSample.start(ram, 512, 0);
  assert.ok(s.sampledPages >= 1, 'a small block still gets a sampled page');
  s.finish(1000);
  assert.deepEqual(Int32Array.from(ram.blocks[0]!.dirtyLog), before);
});
