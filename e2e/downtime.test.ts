// Downtime against its limit, reported where a person looks (README "Downtime"): query-migrate's
// downtime, x-downtime-limit and x-downtime-overshoot, the source's summary line, the timeline's
// result and `livemig report`, and the demo's verdict and exit status. The overshoot is forced
// by construction, not by timing: the source holds in pre-switchover (guest already stopped, so
// the downtime is running) for longer than the limit; the demo runs at a 0 ms limit.

import assert from 'node:assert/strict';
import { readFileSync, rmSync, writeFileSync } from 'node:fs';
import { dirname } from 'node:path';
import { test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { type MigrationInfo, queryMigrate, waitForStatus } from './helpers/migration.ts';
import { livemig, runDemo as demo, withHarness } from './helpers/processes.ts';

const T = { timeout: 180_000 };
const GUEST = ['-m', '32M', '--workload', 'idle'];
/** How long the test holds the stopped guest in pre-switchover: more than LIMIT_MS by construction. */
const HOLD_MS = 600;
const LIMIT_MS = 300;

type Info = MigrationInfo & { 'x-downtime-limit'?: number; 'x-downtime-overshoot'?: number; 'x-switchover'?: Record<string, number> };

test('a downtime over its limit: query-migrate, the summary line, the timeline and livemig report all say OVER, with the figures', T, () =>
  withHarness(async (h) => {
    const dst = await h.destination({ incoming: 'tcp', guest: GUEST });
    const src = await h.source({ guest: GUEST, args: ['--capabilities', 'return-path,pause-before-switchover', '--parameters', `downtime-limit=${LIMIT_MS}`] });
    await src.execute('migrate', { uri: dst.incomingUri });
    await waitForStatus(src, 'pre-switchover');
    // The guest stopped before pre-switchover was reported: the downtime is at least this hold.
    await sleep(HOLD_MS);
    await src.execute('migrate-continue', { state: 'pre-switchover' });
    const info = (await waitForStatus(src, 'completed')) as Info;
    const downtime = info.downtime!;
    assert.ok(downtime >= HOLD_MS, `downtime ${downtime} ms covers the ${HOLD_MS} ms hold`);
    assert.equal(info['x-downtime-limit'], LIMIT_MS);
    assert.equal(info['x-downtime-overshoot'], downtime - LIMIT_MS);
    const s = info['x-switchover']!;
    for (const k of ['expected-downtime', 'planned-stop', 'planned-round-trip', 'stopped', 'synced', 'ram-sent', 'devices-saved', 'all-sent']) {
      assert.equal(typeof s[k], 'number', `x-switchover.${k}`);
    }
    assert.ok(s['all-sent']! >= HOLD_MS && s['all-sent']! <= downtime, 'the steps lie inside the downtime, after the hold');
    assert.ok((s['device-state-bytes'] ?? 0) > 0, 'the device sections were measured before the switchover');
    // The source's summary line: the same figures, one unit family.
    await sleep(100);
    const summary = new RegExp(
      `migration completed in \\d+ ms: downtime ${downtime} ms, OVER the ${LIMIT_MS} ms limit by ${downtime - LIMIT_MS} ms; \\d+\\.\\d\\d GiB sent at \\d+\\.\\d\\d GiB/s, \\d+ passes`,
    );
    assert.match(src.output(), summary);
    // The timeline's result and the page livemig report draws from it.
    const doc = await src.execute<{ result: { downtimeMs: number; downtimeLimitMs: number } }>('x-query-migration-timeline');
    assert.deepEqual([doc.result.downtimeMs, doc.result.downtimeLimitMs], [downtime, LIMIT_MS]);
    const file = h.path('timeline.json');
    writeFileSync(file, JSON.stringify(doc));
    const r = await livemig(['report', file, '-o', h.path('report.html')]);
    assert.equal(r.code, 0, r.stderr);
    assert.match(readFileSync(h.path('report.html'), 'utf8'), new RegExp(`${downtime} ms of a ${LIMIT_MS} ms limit \\(OVER the limit\\)`));
  }),
);

test('a downtime within its limit: no overshoot field, and the summary line says within', T, () =>
  withHarness(async (h) => {
    // 60 s: only a minute-long stall of this machine inside the switchover would break it.
    const limit = 60_000;
    const dst = await h.destination({ incoming: 'tcp', guest: GUEST });
    const src = await h.source({ guest: GUEST, args: ['--capabilities', 'return-path', '--parameters', `downtime-limit=${limit}`] });
    await src.execute('migrate', { uri: dst.incomingUri });
    const info = (await waitForStatus(src, 'completed')) as Info;
    assert.equal(info['x-downtime-limit'], limit);
    assert.equal(info['x-downtime-overshoot'], undefined);
    assert.equal((await queryMigrate(src) as Info)['x-downtime-overshoot'], undefined, 'nor on a later query');
    await sleep(100);
    assert.match(src.output(), new RegExp(`migration completed in \\d+ ms: downtime ${info.downtime} ms, within the ${limit} ms limit;`));
  }),
);

test('livemig demo at a 0 ms limit: verified, but the verdict is OVER with the figures and the exit status 3', T, async () => {
  // An idle guest converges (nothing left to send), and no switchover takes 0 ms.
  const { code, out } = await demo(['--memory', '32M', '--workload', 'idle', '--downtime-limit', '0']);
  const timeline = /timeline +(\S+timeline\.json)/.exec(out)?.[1];
  try {
    const downtime = Number(/downtime +(\d+) ms of a 0 ms limit, OVER by (\d+) ms/.exec(out)?.[1]);
    assert.ok(downtime > 0, out);
    assert.match(out, new RegExp(`VERDICT: OVER — downtime ${downtime} ms exceeded the 0 ms limit by ${downtime} ms \\(the destination holds exactly the source guest and runs on\\)`));
    assert.doesNotMatch(out, /VERDICT: PASS/);
    assert.equal(code, 3, out);
  } finally {
    if (timeline !== undefined) rmSync(dirname(timeline), { recursive: true, force: true });
  }
});
