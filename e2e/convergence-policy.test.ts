// The convergence policy (README "Convergence policy") on real livemig processes, with guests
// that cannot converge: they dirty all of their RAM faster than max-bandwidth sends it. Each of
// its steps fires, in order, seen as LIVEMIG_CONVERGENCE events, in query-migrate's
// x-livemig-convergence and query-migrate-parameters, the timeline and the log: downtime-limit
// stepped up to its max, then postcopy (completes, RAM verified) or cancel (the source guest runs
// on, its memory intact); the completion timeout fires on its own too, and goes on counting while
// the source waits for the destination's switchover ack or is held in pre-switchover (where the
// no-progress clock stands still). LIVEMIG_CONVERGENCE needs capability events, as MIGRATION does;
// a destination takes the policy's parameters and says they act on the source. Nothing here depends on
// how long anything takes: only on order and presence.
//
// Run: pnpm build && node --import tsx --test --test-concurrency=1 e2e/convergence-policy.test.ts

import assert from 'node:assert/strict';
import { readFile, writeFile } from 'node:fs/promises';
import { test } from 'node:test';
import { assertSameRam, type MigrationInfo, MiB, queryMigrate, queryStatus, setCapabilities, waitForMigration, waitForStatus } from './helpers/migration.ts';
import { stopAndCheckPattern, waitBothCompleted } from './helpers/postcopy.ts';
import { type Child, livemig, withHarness } from './helpers/processes.ts';

/** A last-resort bound per test (every wait inside is bounded below it). */
const T = { timeout: 120_000 };
/** 16 MiB + 4 MiB vga.vram; the incrementer rewrites every page of pc.ram many times a second. */
const GUEST = ['-m', '16M', '--workload', 'incrementer:400'];
/**
 * 16 MiB/s with a 10 ms limit: a pass takes over a second and every pass finds pc.ram dirty
 * again, so the switchover threshold (bandwidth × limit, ≤ 1 MiB even at 50 ms) is never met.
 */
const STUCK = { 'max-bandwidth': 16 * MiB, 'downtime-limit': 10 };
/** Longer than one pass (the policy sees progress once a pass, at its dirty sync). */
const NO_PROGRESS_MS = 2_000;
const WAIT_MS = 90_000;

interface Convergence {
  step: string;
  reason: string;
  'downtime-limit': number;
  remaining: number;
  pass: number;
  'elapsed-ms': number;
  'postcopy-unavailable'?: boolean;
}

interface ConvergenceInfo {
  step: string;
  reason?: string;
  decisions: number;
  'downtime-limit': number;
  'no-progress-ms': number;
  'completion-deadline-ms'?: number;
}

function decisions(c: Child): Convergence[] {
  return c.events.filter((e) => e.event === 'LIVEMIG_CONVERGENCE').map((e) => e.data as unknown as Convergence);
}

/** The order of MIGRATION statuses and convergence steps as the QMP client received them. */
function eventOrder(c: Child): string[] {
  return c.events
    .filter((e) => e.event === 'MIGRATION' || e.event === 'LIVEMIG_CONVERGENCE')
    .map((e) => (e.event === 'MIGRATION' ? `status ${String(e.data?.['status'])}` : `policy ${String(e.data?.['step'])}`));
}

function convergenceIn(info: MigrationInfo): ConvergenceInfo | undefined {
  return (info as { 'x-livemig-convergence'?: ConvergenceInfo })['x-livemig-convergence'];
}

async function convergenceOf(c: Child): Promise<ConvergenceInfo | undefined> {
  return convergenceIn(await queryMigrate(c));
}

interface TimelineDoc {
  events: { kind: string; step?: string; reason?: string; downtimeLimitMs?: number }[];
}

test('no progress: downtime-limit stepped up to its max, then postcopy; the migration completes with RAM verified', T, () =>
  withHarness(async (h) => {
    const caps = ['postcopy-ram', 'events'];
    // Paused after the switchover: the destination's RAM must equal the stopped source's.
    const dst = await h.destination({ incoming: 'tcp', paused: true, guest: GUEST, capabilities: caps });
    const src = await h.source({ guest: GUEST });
    await setCapabilities(src, caps);
    await src.execute('migrate-set-parameters', {
      ...STUCK,
      'x-livemig-no-progress-timeout': NO_PROGRESS_MS,
      'x-livemig-downtime-limit-step': 20,
      'x-livemig-downtime-limit-max': 50,
      'x-livemig-convergence-last-step': 'postcopy',
    });
    const params = await src.execute<Record<string, unknown>>('query-migrate-parameters');
    assert.equal(params['x-livemig-convergence-last-step'], 'postcopy');
    assert.equal(params['x-livemig-downtime-limit-max'], 50);
    const events = await src.execute<{ name: string }[]>('query-events');
    assert.ok(events.some((e) => e.name === 'LIVEMIG_CONVERGENCE'), 'LIVEMIG_CONVERGENCE is declared');

    await src.execute('migrate', { uri: dst.incomingUri });
    // Once connected, query-migrate shows the policy watching (or, on a very slow machine, past its first step).
    const watching = convergenceIn(await waitForMigration(src, (i) => convergenceIn(i) !== undefined, 'x-livemig-convergence', { timeoutMs: WAIT_MS }))!;
    assert.ok(watching.step === 'watching' ? watching.decisions === 0 : watching.decisions > 0, JSON.stringify(watching));

    // The first step: downtime-limit 10 → 30, in the event, query-migrate and the parameters.
    const first = await src.waitForEvent('LIVEMIG_CONVERGENCE', () => true, WAIT_MS);
    assert.deepEqual([first.data?.['step'], first.data?.['reason'], first.data?.['downtime-limit']], ['downtime-limit', 'no-progress', 30]);
    const stepped = await src.execute<Record<string, unknown>>('query-migrate-parameters');
    assert.ok((stepped['downtime-limit'] as number) >= 30, `query-migrate-parameters shows the stepped limit: ${String(stepped['downtime-limit'])}`);
    const during = await convergenceOf(src);
    assert.ok(during !== undefined && during.decisions >= 1 && during['downtime-limit'] >= 30, JSON.stringify(during));

    const { src: done } = await waitBothCompleted(src, dst, WAIT_MS);
    const seen = decisions(src);
    assert.deepEqual(
      seen.map((d) => [d.step, d.reason, d['downtime-limit']]),
      [
        ['downtime-limit', 'no-progress', 30],
        ['downtime-limit', 'no-progress', 50],
        ['postcopy', 'no-progress', 50],
      ],
    );
    // Each decision came with the measurements it was made on, later ones later.
    for (let i = 1; i < seen.length; i++) assert.ok(seen[i]!['elapsed-ms'] > seen[i - 1]!['elapsed-ms'], JSON.stringify(seen));
    assert.ok(seen.every((d) => d.remaining > 0 && d.pass >= 2), JSON.stringify(seen));
    // Postcopy started because of the last step: the policy's event comes before postcopy-active.
    const order = eventOrder(src);
    assert.ok(order.indexOf('policy postcopy') >= 0 && order.indexOf('policy postcopy') < order.indexOf('status postcopy-active'), JSON.stringify(order));
    assert.ok(!order.slice(0, order.indexOf('policy postcopy')).includes('status postcopy-active'), JSON.stringify(order));

    const info = (done as { 'x-livemig-convergence'?: ConvergenceInfo })['x-livemig-convergence'];
    assert.deepEqual([info?.step, info?.reason, info?.decisions, info?.['downtime-limit']], ['postcopy', 'no-progress', 3, 50]);
    // The steps served that migration: the operator's limit is back for the next one.
    assert.equal((await src.execute<Record<string, unknown>>('query-migrate-parameters'))['downtime-limit'], 10);

    assert.equal(await queryStatus(src), 'postmigrate');
    const { destination } = await assertSameRam(src, dst);
    assert.equal(destination.pattern.consistent, true, `pattern ${JSON.stringify(destination.pattern)}`);

    // The timeline has the same decisions, and the log a line for each.
    const timeline = await src.execute<TimelineDoc>('x-query-migration-timeline');
    assert.deepEqual(
      timeline.events.filter((e) => e.kind === 'convergence').map((e) => [e.step, e.reason, e.downtimeLimitMs]),
      seen.map((d) => [d.step, d.reason, d['downtime-limit']]),
    );
    // livemig report lists them and marks them on its charts.
    const file = h.path('timeline.json');
    await writeFile(file, JSON.stringify(timeline));
    const page = h.path('report.html');
    const rep = await livemig(['report', file, '-o', page]);
    assert.equal(rep.code, 0, rep.stderr);
    const html = await readFile(page, 'utf8');
    for (const text of ['convergence policy (no-progress): downtime-limit 30 ms', 'convergence policy (no-progress): downtime-limit 50 ms', 'convergence policy (no-progress): last step postcopy']) {
      assert.ok(html.includes(text), `the report lists "${text}"`);
    }
    assert.equal(html.match(/class="marker convergence"/g)?.length ?? 0, 2 * 3, 'a marker per decision on each of the two charts');
    const log = src.output();
    assert.match(log, /convergence policy: no new minimum of remaining for 2000 ms; downtime-limit raised from 10 to 30 ms/);
    assert.match(log, /convergence policy: no new minimum of remaining for 2000 ms; downtime-limit raised from 30 to 50 ms/);
    assert.match(log, /convergence policy: no new minimum of remaining for 2000 ms; last step: switching to postcopy/);
  }));

test('last step cancel (set by --parameters): the migration is cancelled, the source guest runs on with its memory intact', T, () =>
  withHarness(async (h) => {
    const dst = await h.destination({ incoming: 'tcp', guest: GUEST });
    const policy = `x-livemig-no-progress-timeout=${NO_PROGRESS_MS},x-livemig-downtime-limit-step=15,x-livemig-downtime-limit-max=25,x-livemig-convergence-last-step=cancel`;
    const src = await h.source({
      guest: GUEST,
      args: ['--capabilities', 'events', '--parameters', `max-bandwidth=${STUCK['max-bandwidth']},downtime-limit=${STUCK['downtime-limit']},${policy}`],
    });
    await src.execute('migrate', { uri: dst.incomingUri });
    await waitForStatus(src, 'cancelled', { timeoutMs: WAIT_MS });
    assert.deepEqual(
      decisions(src).map((d) => [d.step, d.reason, d['downtime-limit']]),
      [
        ['downtime-limit', 'no-progress', 25],
        ['cancel', 'no-progress', 25],
      ],
    );
    const order = eventOrder(src);
    assert.ok(order.indexOf('policy cancel') < order.indexOf('status cancelling'), JSON.stringify(order));
    assert.ok(order.indexOf('status cancelling') < order.indexOf('status cancelled'), JSON.stringify(order));
    assert.deepEqual((await convergenceOf(src))?.step, 'cancel');
    // livemig info shows where the policy got to.
    const job = await livemig(['info', '--qmp', src.qmpAddress, '--completed']);
    assert.equal(job.code, 0, job.stderr);
    assert.match(job.stdout, /^Convergence policy: +cancel \(no-progress\), 2 decision\(s\), downtime-limit 25 ms$/m, job.stdout);
    // The source guest runs on, and every page holds what an uninterrupted run would have written.
    assert.equal(await queryStatus(src), 'running');
    await stopAndCheckPattern(src);
    assert.match(src.output(), /convergence policy: no new minimum of remaining for 2000 ms; last step: cancelling the migration/);
  }));

test('completion timeout per GiB: the last step once the budget for the guest RAM is spent, with no-progress off', T, () =>
  withHarness(async (h) => {
    const guest = ['-m', '16M', '--workload', 'random:400'];
    const dst = await h.destination({ incoming: 'tcp', guest });
    const src = await h.source({ guest, args: ['--capabilities', 'events'] });
    // 20 MiB of guest RAM at 150 s per GiB: about 2.9 s.
    const perGiB = 150_000;
    await src.execute('migrate-set-parameters', { ...STUCK, 'x-livemig-completion-timeout-per-gib': perGiB, 'x-livemig-convergence-last-step': 'cancel' });
    await src.execute('migrate', { uri: dst.incomingUri });
    const started = await waitForMigration(src, (i) => convergenceIn(i) !== undefined && i.ram !== undefined, 'x-livemig-convergence', { timeoutMs: WAIT_MS });
    const running = convergenceIn(started)!;
    const total = started.ram!.total;
    assert.ok(total > 0);
    assert.equal(running['completion-deadline-ms'], Math.round((perGiB * total) / 2 ** 30), JSON.stringify(running));
    await waitForStatus(src, 'cancelled', { timeoutMs: WAIT_MS });
    const seen = decisions(src);
    assert.deepEqual(seen.map((d) => [d.step, d.reason, d['downtime-limit']]), [['cancel', 'completion-timeout', 10]]);
    assert.ok(seen[0]!['elapsed-ms'] >= running['completion-deadline-ms']!, `not before the deadline: ${JSON.stringify(seen[0])}`);
    assert.equal(await queryStatus(src), 'running');
    assert.match(src.output(), /convergence policy: completion timeout passed \(150000 ms per GiB of 0\.020 GiB\); last step: cancelling the migration/);
  }));

/** An idle guest converges at once: what the policy then sees is the wait that follows. */
const IDLE = ['-m', '16M', '--workload', 'idle'];
/** 20 MiB of guest RAM at 150 s per GiB: about 2.9 s for the whole migration. */
const PER_GIB = 150_000;
/** Steps that would fire many times within that budget if the no-progress clock ran. */
const WOULD_STEP = { 'x-livemig-no-progress-timeout': 300, 'x-livemig-downtime-limit-step': 10, 'x-livemig-downtime-limit-max': 1000 };

test('waiting for the switchover ack: no downtime-limit steps, the completion timeout cancels; the destination takes the policy parameters and says they act on the source only', T, () =>
  withHarness(async (h) => {
    // The destination's VFIO device waits for initial data from a source that has no such device
    // (--qemu-devices-only): the destination's SWITCHOVER_ACK never comes.
    const dst = await h.destination({ incoming: 'tcp', guest: IDLE, capabilities: ['return-path', 'switchover-ack'], args: ['--parameters', 'x-livemig-no-progress-timeout=300'] });
    const policy = { ...WOULD_STEP, 'x-livemig-completion-timeout-per-gib': PER_GIB, 'x-livemig-convergence-last-step': 'cancel' };
    await dst.execute('migrate-set-parameters', policy);
    await dst.execute('migrate-set-parameters', policy); // the same again: no second line
    const shown = await dst.execute<Record<string, unknown>>('query-migrate-parameters');
    for (const [name, value] of Object.entries(policy)) assert.equal(shown[name], value, `destination query-migrate-parameters ${name}`);
    const src = await h.source({ guest: [...IDLE, '--qemu-devices-only'], args: ['--capabilities', 'events,return-path,switchover-ack'] });
    await src.execute('migrate-set-parameters', policy);
    await src.execute('migrate', { uri: dst.incomingUri });
    await waitForStatus(src, 'cancelled', { timeoutMs: WAIT_MS });
    const seen = decisions(src);
    assert.deepEqual(
      seen.map((d) => [d.step, d.reason, (d as { phase?: string }).phase, d['downtime-limit']]),
      [['cancel', 'completion-timeout', 'awaiting-ack', 300]],
    );
    assert.equal(await queryStatus(src), 'running');
    assert.match(src.output(), /completion timeout passed \(150000 ms per GiB of 0\.020 GiB, waiting for the destination's switchover ack\); last step: cancelling/);
    // Two lines: one for --parameters, one for the change over QMP; none for the repeat.
    const noted = dst.output().match(/convergence policy parameters \(x-livemig-no-progress-timeout …\) kept: they act on the outgoing side \(livemig-source\) only/g) ?? [];
    assert.equal(noted.length, 2, dst.output());
  }));

test('held in pre-switchover, capability events off: nothing stepped, the completion timeout cancels the hold; no LIVEMIG_CONVERGENCE event, the log and query-migrate have the decision', T, () =>
  withHarness(async (h) => {
    const dst = await h.destination({ incoming: 'tcp', guest: IDLE });
    const src = await h.source({ guest: IDLE, args: ['--capabilities', 'return-path,pause-before-switchover'] });
    await src.execute('migrate-set-parameters', { ...WOULD_STEP, 'x-livemig-completion-timeout-per-gib': PER_GIB, 'x-livemig-convergence-last-step': 'postcopy' });
    await src.execute('migrate', { uri: dst.incomingUri });
    await waitForStatus(src, 'pre-switchover', { timeoutMs: WAIT_MS });
    // Postcopy cannot be had once the switchover has begun: the decision says so, the hold goes on.
    const none = convergenceIn(await waitForMigration(src, (i) => convergenceIn(i)?.decisions === 1, 'a decision', { timeoutMs: WAIT_MS }))!;
    assert.deepEqual([none.step, none.reason, none['downtime-limit']], ['none', 'completion-timeout', 300]);
    assert.equal((await queryMigrate(src)).status, 'pre-switchover');
    assert.match(src.output(), /last step postcopy skipped: the switchover has begun \(pre-switchover\); the migration waits for migrate-continue/);
    // migrate-continue still completes it.
    await src.execute('migrate-continue', { state: 'pre-switchover' });
    await waitForStatus(src, 'completed', { timeoutMs: WAIT_MS });
    assert.equal(src.events.filter((e) => e.event === 'LIVEMIG_CONVERGENCE' || e.event === 'MIGRATION' || e.event === 'MIGRATION_PASS').length, 0, 'capability events is off');

    // Again with last step cancel: the hold is cancelled and the source guest runs again.
    const dst2 = await h.destination({ incoming: 'tcp', guest: IDLE });
    const src2 = await h.source({ guest: IDLE, args: ['--capabilities', 'return-path,pause-before-switchover'] });
    await src2.execute('migrate-set-parameters', { ...WOULD_STEP, 'x-livemig-completion-timeout-per-gib': PER_GIB, 'x-livemig-convergence-last-step': 'cancel' });
    await src2.execute('migrate', { uri: dst2.incomingUri });
    await waitForStatus(src2, 'cancelled', { timeoutMs: WAIT_MS });
    assert.deepEqual([(await convergenceOf(src2))?.step, (await convergenceOf(src2))?.decisions], ['cancel', 1]);
    assert.match(src2.output(), /completion timeout passed \(150000 ms per GiB of 0\.020 GiB, held in pre-switchover\); last step: cancelling the migration/);
    assert.equal(await queryStatus(src2), 'running');
    assert.equal(src2.events.filter((e) => e.event === 'LIVEMIG_CONVERGENCE').length, 0);
  }));
