// One progress model, seen through query-migrate's x-progress on a real migration of a guest
// that keeps dirtying memory: the fraction never decreases (even when a new pass finds pages
// dirty again, which is when 1 - remaining/total goes back), ends at exactly 1, and comes with an
// ETA whose basis is the measured bandwidth and dirty rate.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { withHarness } from './helpers/processes.ts';

interface Info {
  status: string;
  ram?: { remaining: number; total: number; 'dirty-sync-count': number };
  'x-progress'?: { fraction: number; 'eta-ms': number | null; basis: string };
}

test('x-progress: the fraction never decreases over a dirtying migration, and ends at 1', { timeout: 120_000 }, (t) =>
  withHarness(async (h) => {
    // 64 MiB at 64 MiB/s while the guest dirties ~20 MB/s: a few passes, then it converges.
    const guest = ['-m', '64M', '--workload', 'incrementer:20'];
    const dst = await h.destination({ incoming: 'tcp', guest });
    const src = await h.source({ guest, args: ['--parameters', `max-bandwidth=${64 * 2 ** 20},downtime-limit=300`] });
    await src.execute('migrate', { uri: dst.incomingUri });
    const samples: Info[] = [];
    const deadline = Date.now() + 90_000;
    for (;;) {
      const info = await src.execute<Info>('query-migrate');
      samples.push(info);
      if (info.status === 'completed' || info.status === 'failed' || info.status === 'cancelled') break;
      if (Date.now() > deadline) assert.fail(`no end within 90 s; last ${JSON.stringify(info)}`);
      await sleep(20);
    }
    const last = samples.at(-1)!;
    assert.equal(last.status, 'completed', JSON.stringify(last));
    assert.ok(last.ram!['dirty-sync-count'] >= 2, `more than one pass (${last.ram!['dirty-sync-count']})`);
    const fractions = samples.map((s) => s['x-progress']?.fraction);
    assert.ok(fractions.every((f) => typeof f === 'number' && f >= 0 && f <= 1), JSON.stringify(fractions));
    for (let i = 1; i < fractions.length; i++) {
      assert.ok(fractions[i]! >= fractions[i - 1]!, `sample ${i}: ${fractions[i]} < ${fractions[i - 1]} (${JSON.stringify(fractions)})`);
    }
    assert.deepEqual(last['x-progress'], { fraction: 1, 'eta-ms': 0, basis: 'completed' });
    assert.ok(
      samples.some((s) => s.status === 'active' && s['x-progress']?.basis === 'bandwidth-and-dirty-rate' && typeof s['x-progress']['eta-ms'] === 'number'),
      'an ETA on the measured bandwidth and dirty rate while active',
    );
    assert.ok(samples.filter((s) => s.status === 'active').every((s) => s['x-progress']!.fraction < 1), 'below 1 until completed');
    // What the old bar showed, for the record: 1 - remaining/total goes back when a pass re-dirties.
    const naive = samples.filter((s) => s.ram !== undefined && s.status === 'active').map((s) => 1 - s.ram!.remaining / s.ram!.total);
    const wentBack = naive.some((v, i) => i > 0 && v < naive[i - 1]!);
    t.diagnostic(`${samples.length} samples, ${last.ram!['dirty-sync-count']} passes; 1 - remaining/total went back: ${wentBack}`);
  }),
);
