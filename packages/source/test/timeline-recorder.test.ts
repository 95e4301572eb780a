// TimelineRecorder over a stand-in migration with an injected clock: events in time order (the
// switchover, seen at the next sample, lands at its own earlier time), the result once the
// migration ends, bounded memory by halving, and a document checkTimeline accepts.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { checkTimeline } from '@livemig/machine';
import type { OutgoingMigration } from '../src/migration.ts';
import { TIMELINE_MAX_SAMPLES, TimelineRecorder } from '../src/timeline-recorder.ts';

/** The fields the recorder reads, settable by the test. */
function fakeMigration() {
  let end!: () => void;
  const f = {
    clock: 1000,
    now: () => f.clock,
    startTime: 1000,
    status: 'active',
    stopTime: 0,
    totalTime: 0,
    setupTime: 3,
    downtime: 0,
    expectedDowntime: 0,
    downtimeLimitMs: 300,
    throttlePercent: 0,
    errorDesc: undefined as string | undefined,
    transferred: 0,
    guest: { ram: { totalBytes: 1 << 20 } },
    o: { parameters: { 'downtime-limit': 300 } },
    ram: { stats: { dirtySyncCount: 1 } },
    done: new Promise<void>((resolve) => (end = resolve)),
    end: () => end(),
    ramInfo: () => ({ transferred: f.transferred, remaining: 4096, mbps: 8, 'dirty-pages-rate': 10, 'page-size': 4096, 'dirty-sync-count': f.ram.stats.dirtySyncCount }),
  };
  return f;
}

const OPTIONS = { uri: 'tcp:127.0.0.1:1', capabilities: ['return-path'], parameters: { 'downtime-limit': 300 }, intervalMs: 3_600_000 };

test('events in time order, the downtime window and the result once the migration ends', async () => {
  const m = fakeMigration();
  const r = new TimelineRecorder(m as unknown as OutgoingMigration, OPTIONS);
  m.clock = 1100;
  m.transferred = 1000;
  r.sample();
  m.clock = 1150;
  r.passStarted(2);
  m.stopTime = 1160; // the switchover: seen at the next sample, after a later event
  m.clock = 1170;
  m.throttlePercent = 20;
  r.passStarted(3);
  r.throttled(20);
  r.sample();
  m.clock = 1200;
  m.status = 'completed';
  m.totalTime = 200;
  m.downtime = 30;
  r.statusChanged('completed');
  m.end();
  const doc = checkTimeline(await r.finished);
  assert.deepEqual(
    doc.events.map((e) => [e.t, e.kind]),
    [
      [0, 'status'],
      [150, 'pass'],
      [160, 'switchover-start'],
      [170, 'pass'],
      [170, 'throttle'],
      [190, 'downtime-end'],
      [200, 'status'],
    ],
  );
  assert.deepEqual(doc.result, {
    status: 'completed',
    totalTimeMs: 200,
    setupTimeMs: 3,
    downtimeMs: 30,
    downtimeLimitMs: 300,
    transferredBytes: 1000,
    passes: 1,
    errorDesc: null,
  });
  assert.deepEqual(
    doc.samples.map((s) => [s.t, s.status, s.bytesPerSecond, s.dirtyBytesPerSecond, s.throttlePercent]),
    [
      [100, 'active', 1_000_000, 40960, 0],
      [170, 'active', 1_000_000, 40960, 20],
      [200, 'completed', 1_000_000, 40960, 20],
    ],
  );
});

test('at TIMELINE_MAX_SAMPLES every second sample goes and the interval doubles; the newest stays', async () => {
  const m = fakeMigration();
  const r = new TimelineRecorder(m as unknown as OutgoingMigration, OPTIONS);
  for (let i = 1; i <= TIMELINE_MAX_SAMPLES; i++) {
    m.clock = 1000 + i;
    r.sample();
  }
  const doc = r.document();
  assert.equal(doc.intervalMs, OPTIONS.intervalMs * 2);
  assert.ok(doc.samples.length <= TIMELINE_MAX_SAMPLES / 2 + 1, `${doc.samples.length} samples kept`);
  assert.equal(doc.samples.at(-1)!.t, TIMELINE_MAX_SAMPLES, 'the newest sample is kept');
  assert.equal(doc.samples[0]!.t, 1);
  m.status = 'failed';
  m.errorDesc = 'link lost';
  m.end();
  const done = checkTimeline(await r.finished);
  assert.equal(done.result?.downtimeMs, null);
  assert.equal(done.result?.errorDesc, 'link lost');
});

test('convergence policy decisions are timeline events checkTimeline accepts (and a malformed one it names)', async () => {
  const m = fakeMigration();
  const r = new TimelineRecorder(m as unknown as OutgoingMigration, OPTIONS);
  const decision = { reason: 'no-progress', elapsedMs: 0, remainingBytes: 4096, pass: 3, postcopyUnavailable: false } as const;
  m.clock = 1400;
  r.convergenceDecided({ ...decision, step: 'downtime-limit', downtimeLimitMs: 350 });
  m.clock = 1600;
  r.convergenceDecided({ ...decision, step: 'cancel', downtimeLimitMs: 350 });
  m.status = 'cancelled';
  r.statusChanged('cancelled');
  m.end();
  const doc = checkTimeline(await r.finished);
  assert.deepEqual(
    doc.events.filter((e) => e.kind === 'convergence'),
    [
      { t: 400, kind: 'convergence', step: 'downtime-limit', reason: 'no-progress', downtimeLimitMs: 350 },
      { t: 600, kind: 'convergence', step: 'cancel', reason: 'no-progress', downtimeLimitMs: 350 },
    ],
  );
  const bad = JSON.parse(JSON.stringify(doc)) as { events: Record<string, unknown>[] };
  const i = bad.events.findIndex((e) => e['kind'] === 'convergence');
  delete bad.events[i]!['downtimeLimitMs'];
  assert.throws(() => checkTimeline(bad), new RegExp(`events\\[${i}\\]\\.downtimeLimitMs is not a number`));
});
