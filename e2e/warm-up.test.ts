// End-to-end: a destination decodes a migration with the code its start-up warm-up optimised,
// without throwing that code away. A path of the decoder that the warm-up never took (a record
// kind, a record split across reads) makes V8 deoptimise the function it is in the first time
// the migration takes it, then run it unoptimised and compile it again (readRecords: ~20 ms of
// compiling) while the pages stream in. The destination runs with V8's --trace-deopt-verbose;
// no deoptimisation may name the decoder's or the destination's code once the migration started.
//
// Run: pnpm build && node --import tsx --test --test-concurrency=1 e2e/warm-up.test.ts

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { assertSameRam, waitForStatus } from './helpers/migration.ts';
import { withHarness } from './helpers/processes.ts';

const GUEST = ['--block', 'm0:64M', '--machine', 'none', '--qemu-devices-only'];

for (const fill of ['random', 'mixed']) {
  test(`a 64 MiB ${fill} guest migrates into a destination without deoptimising its warmed-up decoder`, { timeout: 180_000 }, () =>
    withHarness(async (h) => {
      const src = await h.source({ guest: [...GUEST, '--fill', fill], args: ['-S'] });
      const dst = await h.destination({ incoming: 'tcp', paused: true, guest: GUEST, nodeArgs: ['--trace-deopt-verbose'] });
      const before = dst.output().length;
      await src.execute('migrate', { uri: dst.incomingUri });
      await waitForStatus(src, 'completed', { timeoutMs: 120_000 });
      await waitForStatus(dst, 'completed', { timeoutMs: 60_000 });
      await assertSameRam(src, dst);
      // Everything the destination printed since the migration began (its output stays far
      // below the 64 KiB the harness keeps: a few trace lines at start-up, a few log lines).
      const during = dst.output().slice(before);
      assert.ok(dst.output().length < 60 * 1024, 'the destination printed too much to be sure of the window');
      const ours = during.split('\n').filter((line) => /deoptimize at <file:[^>]*packages\/(protocol|destination)\/dist\//.test(line));
      assert.deepEqual(ours, [], `deoptimised during the migration:\n${during.slice(0, 4000)}`);
    }));
}
