// End-to-end precopy: a real livemig-source and livemig-destination (the built dist processes)
// migrating over real sockets, driven over QMP as QEMU's migration tests drive QEMU.
//
// Run: pnpm build && node --import tsx --test --test-concurrency=1 e2e/*.test.ts

import assert from 'node:assert/strict';
import { existsSync, readFileSync, statSync } from 'node:fs';
import net from 'node:net';
import { test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { native } from '@livemig/native';
import {
  assertSameRam,
  blockShas,
  digest,
  type MigrationInfo,
  MiB,
  queryMigrate,
  queryStatus,
  setCapabilities,
  waitForMigration,
  waitForStatus,
} from './helpers/migration.ts';
import { analyzeFile, type AnalyzeReport, type Child, type Harness, unusedPort, withHarness } from './helpers/processes.ts';

const GUEST_64M = ['-m', '64M'];

/**
 * Whether guest RAM goes in transparent huge pages here: the kernel gives them to memory that asks
 * ("always" or "madvise"), and the native addon (which asks) is built.
 */
const HUGE_PAGE_RAM = ((): boolean => {
  if (!native.available) return false;
  try {
    return !/\[never\]/.test(readFileSync('/sys/kernel/mm/transparent_hugepage/enabled', 'utf8'));
  } catch {
    return false;
  }
})();

/** A process's RAM in transparent huge pages (AnonHugePages of /proc/PID/smaps_rollup), bytes. */
function anonHugeBytes(pid: number): number {
  return Number(/AnonHugePages:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/smaps_rollup`, 'utf8'))![1]) * 1024;
}
/** A last-resort bound per test (every wait inside is bounded far below it). */
const T = { timeout: 120_000 };

for (const transport of ['tcp', 'unix'] as const) {
  for (const workload of ['idle', 'incrementer'] as const) {
    // tcp runs with return-path (the destination confirms with SHUT), unix without (the source
    // ends the stream and the destination completes on VMDESCRIPTION): both completions covered.
    const returnPath = transport === 'tcp';
    test(`precopy over ${transport}${transport === 'tcp' ? ' (port 0)' : ''}, ${workload} guest${returnPath ? ', return-path' : ''}: paused destination holds the stopped source's RAM and runs on`, T, () =>
      withHarness(async (h) => {
        const guest = [...GUEST_64M, '--workload', workload];
        const dst = await h.destination({ incoming: transport, paused: true, guest, capabilities: ['events'] });
        if (transport === 'tcp') assert.match(dst.incomingUri, /^tcp:127\.0\.0\.1:[1-9][0-9]*$/, 'port 0 resolved to a real port');
        else assert.equal(dst.incomingUri, `unix:${h.path('dst.mig')}`);
        const src = await h.source({ guest, args: ['--capabilities', returnPath ? 'events,return-path' : 'events,return-path=off'] });
        assert.equal(await queryStatus(src), 'running');
        await sleep(300); // let the workload dirty memory first

        await src.execute('migrate', { uri: dst.incomingUri });
        const info = await waitForStatus(src, 'completed');

        // query-migrate on the source, QEMU's field names.
        assert.equal(info.status, 'completed');
        assert.ok(typeof info['total-time'] === 'number' && info['total-time'] > 0, `total-time ${info['total-time']}`);
        assert.ok(typeof info.downtime === 'number' && info.downtime >= 0, `downtime ${info.downtime}`);
        assert.ok(typeof info['setup-time'] === 'number', 'setup-time');
        const ram = info.ram!;
        assert.ok(ram.transferred > 0, `ram.transferred ${ram.transferred}`);
        assert.equal(ram.total, 64 * 2 ** 20 + 4 * 2 ** 20, 'ram.total = pc.ram + vga.vram');
        assert.ok(ram['dirty-sync-count'] >= 2, `dirty-sync-count ${ram['dirty-sync-count']} ≥ 2 (setup + final)`);
        assert.equal(ram.remaining, 0);
        assert.ok(ram.normal > 0 && ram.duplicate > 0, `normal ${ram.normal}, duplicate ${ram.duplicate} (mixed fill)`);

        // The source stopped its guest at switchover; the destination (-S) holds it paused.
        assert.equal(await queryStatus(src), 'postmigrate');
        await waitForStatus(dst, 'completed', { timeoutMs: 10_000 });
        assert.equal(await queryStatus(dst), 'paused');
        const { destination: before } = await assertSameRam(src, dst);
        if (workload === 'incrementer') assert.equal(before.pattern.consistent, true, `pattern ${JSON.stringify(before.pattern)}`);
        if (HUGE_PAGE_RAM) {
          // Guest RAM in 2 MiB pages (the kernel copies pages into and out of them faster): the
          // destination's prefaulted 68 MiB, all but a few, and the source's filled pc.ram.
          for (const c of [src, dst]) {
            const huge = anonHugeBytes(c.pid);
            assert.ok(huge >= 56 * MiB, `${c.name}: ${huge / MiB} MiB of RAM in huge pages`);
          }
        }

        // Events (capability "events" on both sides).
        await src.waitForEvent('MIGRATION', (e) => e.data?.['status'] === 'completed', 5_000);
        await dst.waitForEvent('MIGRATION', (e) => e.data?.['status'] === 'completed', 5_000);
        assert.deepEqual(src.migrationEvents(), ['setup', 'active', 'completed'], 'source MIGRATION events');
        const dstEvents = dst.migrationEvents();
        // The destination's "setup" may come before our QMP connection; the rest must be there.
        assert.deepEqual(dstEvents.filter((s) => s !== 'setup'), ['active', 'completed'], `destination MIGRATION events ${dstEvents}`);
        const passes = src.events.filter((e) => e.event === 'MIGRATION_PASS').map((e) => e.data?.['pass']);
        assert.deepEqual(passes, passes.map((_, i) => i + 1), `MIGRATION_PASS 1, 2, … (${passes})`);
        assert.ok(passes.length >= 2);
        assert.ok(src.events.some((e) => e.event === 'STOP'), 'source STOP at switchover');

        // cont: the destination guest runs on from where the source stopped.
        await dst.execute('cont');
        assert.equal(await queryStatus(dst), 'running');
        await dst.waitForEvent('RESUME', undefined, 5_000);
        if (workload === 'incrementer') {
          await sleep(1000);
          const running = await digest(dst);
          assert.notEqual(running.blocks[0]!.sha256, before.blocks[0]!.sha256, 'destination memory keeps changing after cont');
          await dst.execute('stop');
          assert.equal(await queryStatus(dst), 'paused');
          const stopped = await digest(dst);
          assert.equal(stopped.pattern.consistent, true, `incrementer pattern after running on: ${JSON.stringify(stopped.pattern)}`);
        }
        // The source stays stopped; its query-migrate stays completed.
        assert.equal(await queryStatus(src), 'postmigrate');
        assert.equal((await queryMigrate(src)).status, 'completed');
      }));
  }
}

test('QEMU recipe: a dirtying guest that cannot converge completes once downtime-limit and max-bandwidth are raised', T, () =>
  withHarness(async (h) => {
    // QEMU's migration-test: migrate_ensure_non_converge (tiny downtime-limit, small bandwidth),
    // wait for a pass that re-sent dirtied pages, then migrate_ensure_converge.
    const guest = ['-m', '64M', '--workload', 'incrementer:400'];
    const dst = await h.destination({ incoming: 'tcp', paused: true, guest });
    const src = await h.source({
      guest,
      args: ['--capabilities', 'return-path,events', '--parameters', `max-bandwidth=${32 * MiB},downtime-limit=1`],
    });
    await src.execute('migrate', { uri: dst.incomingUri });
    const stuck = await waitForMigration(src, (i) => i.status === 'active' && (i.ram?.['dirty-sync-count'] ?? 0) >= 3, 'dirty-sync-count ≥ 3 while active');
    const r = stuck.ram!;
    assert.ok(r.remaining > 0, `still pages to send at pass ${r['dirty-sync-count']}`);
    assert.ok(r.transferred > r.total, `a sent page was re-dirtied and sent again: transferred ${r.transferred} > total ${r.total}`);
    await sleep(300);
    const later = await queryMigrate(src);
    assert.equal(later.status, 'active', 'does not converge with downtime-limit 1 ms');
    assert.ok(later.ram!.transferred > r.transferred, 'still sending');

    await src.execute('migrate-set-parameters', { 'downtime-limit': 60_000, 'max-bandwidth': 0 });
    const p = await src.execute<Record<string, unknown>>('query-migrate-parameters');
    assert.equal(p['downtime-limit'], 60_000);
    assert.equal(p['max-bandwidth'], 0);
    const done = await waitForStatus(src, 'completed');
    assert.ok(done.ram!['dirty-sync-count'] >= 4, `dirty-sync-count ${done.ram!['dirty-sync-count']}`);
    await waitForStatus(dst, 'completed', { timeoutMs: 10_000 });
    const { destination } = await assertSameRam(src, dst);
    assert.equal(destination.pattern.consistent, true, `pattern ${JSON.stringify(destination.pattern)}`);
    const passes = src.events.filter((e) => e.event === 'MIGRATION_PASS').length;
    assert.equal(passes, done.ram!['dirty-sync-count'], 'one MIGRATION_PASS per dirty sync');
  }));

test('bad destination: connection refused → failed with the error, the source guest runs on, a later migration succeeds', T, () =>
  withHarness(async (h) => {
    const guest = ['-m', '64M', '--workload', 'incrementer'];
    const src = await h.source({ guest, args: ['--capabilities', 'events,return-path'] });
    const port = await unusedPort();
    const uri = `tcp:127.0.0.1:${port}`;
    await src.execute('migrate', { uri });
    const failed = await waitForStatus(src, 'failed', { timeoutMs: 15_000 });
    const desc = failed['error-desc'] ?? '';
    assert.match(desc, /connect|refused/i, `error-desc names the connection failure: ${desc}`);
    assert.ok(desc.includes(String(port)), `error-desc names the address: ${desc}`);
    assert.ok(desc.includes('ECONNREFUSED') || /refused/i.test(desc), `error-desc says refused: ${desc}`);
    assert.equal(await queryStatus(src), 'running', 'the source guest keeps running');
    await src.waitForEvent('MIGRATION', (e) => e.data?.['status'] === 'failed', 5_000);
    assert.deepEqual(src.migrationEvents(), ['setup', 'failed']);

    // The guest still dirties memory, and a migration to a real destination now succeeds.
    const d1 = await digest(src);
    await sleep(200);
    assert.notEqual((await digest(src)).blocks[0]!.sha256, d1.blocks[0]!.sha256, 'source guest still runs');
    const dst = await h.destination({ incoming: 'tcp', paused: true, guest });
    await src.execute('migrate', { uri: dst.incomingUri });
    await waitForStatus(src, 'completed');
    await waitForStatus(dst, 'completed', { timeoutMs: 10_000 });
    const { destination } = await assertSameRam(src, dst);
    assert.equal(destination.pattern.consistent, true);
  }));

test('cancel matrix: with no migration, while active, after completion; re-migration after a cancel', T, () =>
  withHarness(async (h) => {
    const guest = ['-m', '64M', '--workload', 'incrementer'];
    const src = await h.source({ guest, args: ['--capabilities', 'events,return-path'] });

    // No migration ever started: migrate_cancel succeeds and nothing changes.
    assert.deepEqual(await src.execute('migrate_cancel'), {});
    const idle = await queryMigrate(src);
    assert.ok(idle.status === undefined || idle.status === 'none', `query-migrate with no migration: ${JSON.stringify(idle)}`);
    assert.equal(await queryStatus(src), 'running');

    // While active: a slow max-bandwidth keeps it active; cancel → cancelled, guest runs on.
    await src.execute('migrate-set-parameters', { 'max-bandwidth': 4 * MiB });
    const dst1 = await h.destination({ incoming: 'tcp', guest, name: 'dst1' });
    await src.execute('migrate', { uri: dst1.incomingUri });
    await waitForMigration(src, (i) => i.status === 'active' && (i.ram?.transferred ?? 0) > 0, 'active with bytes sent');
    assert.deepEqual(await src.execute('migrate_cancel'), {});
    const cancelled = await waitForStatus(src, 'cancelled', { timeoutMs: 10_000 });
    assert.equal(cancelled['error-desc'], undefined);
    assert.equal(await queryStatus(src), 'running', 'the source guest runs on after a cancel');
    await src.waitForEvent('MIGRATION', (e) => e.data?.['status'] === 'cancelled', 5_000);
    assert.deepEqual(src.migrationEvents(), ['setup', 'active', 'cancelling', 'cancelled']);
    // QEMU's destination exits when its incoming migration fails (here: the source went away).
    const exit1 = await dst1.waitForExit(15_000);
    assert.notEqual(exit1.code, 0, `destination exit ${JSON.stringify(exit1)}`);
    // A second cancel is harmless.
    await src.execute('migrate_cancel');
    assert.equal((await queryMigrate(src)).status, 'cancelled');

    // Re-migration to a fresh destination succeeds.
    await src.execute('migrate-set-parameters', { 'max-bandwidth': 0 });
    const dst2 = await h.destination({ incoming: 'tcp', paused: true, guest, name: 'dst2' });
    await src.execute('migrate', { uri: dst2.incomingUri });
    const completed = await waitForStatus(src, 'completed');
    await waitForStatus(dst2, 'completed', { timeoutMs: 10_000 });
    const { destination } = await assertSameRam(src, dst2);
    assert.equal(destination.pattern.consistent, true);

    // After completion: migrate_cancel keeps it completed, the source stays postmigrate.
    await src.execute('migrate_cancel');
    const after = await queryMigrate(src);
    assert.equal(after.status, 'completed');
    assert.equal(after['total-time'], completed['total-time']);
    assert.equal(await queryStatus(src), 'postmigrate');
  }));

test('migrate_cancel in the same write as migrate (channels still connecting): cancelled, nothing migrates, the guest runs on; the destination drops the aborted connection and takes a later migration', T, () =>
  withHarness(async (h) => {
    const guest = ['-m', '64M', '--workload', 'incrementer'];
    const dst = await h.destination({ incoming: 'tcp', guest });
    const src = await h.source({ guest, args: ['--capabilities', 'events,return-path'] });
    const [migrated, cancelled] = await Promise.all([src.execute('migrate', { uri: dst.incomingUri }), src.execute('migrate_cancel')]);
    assert.deepEqual([migrated, cancelled], [{}, {}]);
    await waitForStatus(src, 'cancelled', { timeoutMs: 10_000 });
    await src.waitForEvent('MIGRATION', (e) => e.data?.['status'] === 'cancelled', 5_000);
    assert.deepEqual(src.migrationEvents(), ['setup', 'cancelling', 'cancelled']);
    assert.equal(await queryStatus(src), 'running', 'the source guest runs on');
    // Still cancelled a moment later: the migration did not go ahead behind the cancel.
    await sleep(1000);
    assert.equal((await queryMigrate(src)).status, 'cancelled');
    // The incoming port is not captured by a connection that brings no stream (issue 14): the
    // destination drops it and still waits for a source, which then migrates.
    for (const deadline = Date.now() + 15_000; !/closed before it sent a stream header/.test(dst.output()); await sleep(50)) {
      if (Date.now() > deadline) throw new Error('the aborted connection was not dropped within 15 s');
    }
    assert.equal(dst.alive, true, 'the destination still listens');
    await src.execute('migrate', { uri: dst.incomingUri });
    await waitForStatus(src, 'completed');
    await waitForStatus(dst, 'completed', { timeoutMs: 10_000 });
  }));

test('destination config mismatch (-m differs): the destination\'s error comes back on the return path, it exits, the source runs on', T, () =>
  withHarness(async (h) => {
    const dst = await h.destination({ incoming: 'tcp', guest: ['-m', '128M'] });
    const src = await h.source({ guest: ['-m', '64M', '--workload', 'incrementer'], args: ['--capabilities', 'return-path,events'] });
    await src.execute('migrate', { uri: dst.incomingUri });
    const failed = await waitForStatus(src, 'failed', { timeoutMs: 15_000 });
    const desc = failed['error-desc'] ?? '';
    assert.match(desc, /pc\.ram/, `source error-desc names the RAM block: ${desc}`);
    assert.match(desc, /destination/i, `source error-desc says the destination failed: ${desc}`);
    assert.match(desc, /67108864|134217728/, `source error-desc carries the destination's sizes: ${desc}`);
    const exit = await dst.waitForExit(15_000);
    assert.notEqual(exit.code, 0, `destination exit ${JSON.stringify(exit)}`);
    assert.equal(await queryStatus(src), 'running', 'the source guest keeps running');
  }));

test('max-bandwidth raised mid-migration takes effect: the transfer rate rises accordingly', T, () =>
  withHarness(async (h) => {
    // All pages random so every page costs a full 4 KiB and the 128 MiB outlast both samples.
    const guest = ['-m', '128M', '--fill', 'random'];
    const dst = await h.destination({ incoming: 'tcp', guest });
    const src = await h.source({ guest, args: ['--parameters', `max-bandwidth=${16 * MiB}`] });
    await src.execute('migrate', { uri: dst.incomingUri });
    await waitForMigration(src, (i) => i.status === 'active' && (i.ram?.transferred ?? 0) > 0, 'active');
    const rate = async (ms: number): Promise<number> => {
      const a = (await queryMigrate(src)).ram!.transferred;
      const t0 = performance.now();
      await sleep(ms);
      const b = (await queryMigrate(src)).ram!.transferred;
      return (b - a) / ((performance.now() - t0) / 1000);
    };
    await sleep(300); // past the first window's burst
    const slow = await rate(1000);
    await src.execute('migrate-set-parameters', { 'max-bandwidth': 64 * MiB });
    await sleep(200);
    const fast = await rate(1000);
    const info = await queryMigrate(src);
    assert.equal(info.status, 'active', `still active after the samples (${JSON.stringify(info.ram)})`);
    const mibs = (x: number): string => `${(x / MiB).toFixed(1)} MiB/s`;
    assert.ok(slow > 4 * MiB && slow < 24 * MiB, `rate at max-bandwidth 16 MiB/s: ${mibs(slow)}`);
    assert.ok(fast >= 2 * slow, `rate at 64 MiB/s (${mibs(fast)}) at least twice the rate at 16 MiB/s (${mibs(slow)})`);
    assert.ok(fast < 96 * MiB, `rate at max-bandwidth 64 MiB/s stays near it: ${mibs(fast)}`);
    await src.execute('migrate-set-parameters', { 'max-bandwidth': 0 });
    await waitForStatus(src, 'completed');
  }));

test('max-bandwidth holds after the destination stalls: no catch-up burst', T, () =>
  withHarness(async (h) => {
    // QEMU's budget is per 100 ms window and does not carry over: time the source spent blocked
    // on a stalled destination is not banked as credit to send faster afterwards.
    const guest = ['-m', '128M', '--fill', 'random'];
    const dst = await h.destination({ incoming: 'tcp', paused: true, guest });
    const src = await h.source({ guest, args: ['--parameters', `max-bandwidth=${16 * MiB}`] });
    await src.execute('migrate', { uri: dst.incomingUri });
    await waitForMigration(src, (i) => i.status === 'active' && (i.ram?.transferred ?? 0) > 0, 'active');
    await sleep(500);
    let after: number;
    process.kill(dst.pid, 'SIGSTOP');
    try {
      await sleep(2000);
      const stalled = await queryMigrate(src);
      process.kill(dst.pid, 'SIGCONT');
      const t0 = performance.now();
      await sleep(1000);
      const resumed = await queryMigrate(src);
      after = (resumed.ram!.transferred - stalled.ram!.transferred) / ((performance.now() - t0) / 1000);
    } finally {
      process.kill(dst.pid, 'SIGCONT');
    }
    assert.ok(after < 24 * MiB, `rate over the second after the stall: ${(after / MiB).toFixed(1)} MiB/s (limit 16 MiB/s)`);
    await src.execute('migrate-set-parameters', { 'max-bandwidth': 0 });
    await waitForStatus(src, 'completed');
    await waitForStatus(dst, 'completed', { timeoutMs: 10_000 });
    await assertSameRam(src, dst);
  }));

/** `livemig analyze FILE --json`, retried while the writer may still be flushing (bounded). */
async function analyzeWhenComplete(file: string, timeoutMs = 20_000): Promise<AnalyzeReport> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const r = existsSync(file) ? await analyzeFile(file) : undefined;
    if (r !== undefined && r.code === 0 && r.report !== undefined) return r.report;
    if (Date.now() > deadline) throw new Error(`livemig analyze ${file} did not succeed within ${timeoutMs} ms: ${r === undefined ? 'no file' : `exit ${r.code}: ${r.stderr}`}`);
    await sleep(100);
  }
}

function reportShas(report: AnalyzeReport): Record<string, string> {
  return Object.fromEntries(report.ramBlocks.map((b) => [b.idstr, b.sha256]));
}

test('migrate to exec:cat > FILE and to file:PATH: the stream file decodes to the stopped source\'s RAM', T, () =>
  withHarness(async (h) => {
    const guest = ['-m', '64M', '--workload', 'incrementer'];
    // exec: from a source started with -S (the guest never runs, so its memory is fixed).
    const execFile = h.path('exec.mig');
    const a = await h.source({ guest, args: ['-S'], name: 'srcA' });
    assert.equal(await queryStatus(a), 'prelaunch');
    await a.execute('migrate', { uri: `exec:cat > ${execFile}` });
    const infoA = await waitForStatus(a, 'completed');
    assert.ok(infoA.ram!.transferred > 0);
    const reportA = await analyzeWhenComplete(execFile);
    assert.deepEqual(reportShas(reportA), blockShas(await digest(a)), 'exec: stream RAM = source RAM');
    assert.equal(await queryStatus(a), 'postmigrate');

    // file: from a running source stopped before migrating.
    const file = h.path('file.mig');
    const b = await h.source({ guest, name: 'srcB' });
    await sleep(200);
    await b.execute('stop');
    assert.equal(await queryStatus(b), 'paused');
    await b.execute('migrate', { uri: `file:${file}` });
    const infoB = await waitForStatus(b, 'completed');
    const reportB = await analyzeWhenComplete(file);
    assert.deepEqual(reportShas(reportB), blockShas(await digest(b)), 'file: stream RAM = source RAM');
    // The file holds exactly what query-migrate says was transferred.
    assert.equal(statSync(file).size, infoB.ram!.transferred, 'file size = ram.transferred');
  }));

test('migrate to fd:3, an inherited socket connected to the destination', T, () =>
  withHarness(async (h) => {
    const guest = ['-m', '64M', '--workload', 'incrementer'];
    const dst = await h.destination({ incoming: 'tcp', paused: true, guest });
    const m = /^tcp:(.*):(\d+)$/.exec(dst.incomingUri)!;
    const socket = net.connect({ host: m[1]!, port: Number(m[2]) });
    await new Promise<void>((resolve, reject) => {
      socket.once('connect', resolve).once('error', reject);
    });
    let src: Child;
    try {
      // stdio[3] = the socket: the child gets a duplicate of its descriptor as fd 3.
      src = await h.source({ guest, args: ['--capabilities', 'return-path'], extraStdio: [socket] });
    } finally {
      // Close our copy (no shutdown: the child's descriptor keeps the connection up), so that
      // only the source reads the return path.
      socket.destroy();
    }
    await sleep(200);
    await src.execute('migrate', { uri: 'fd:3' });
    await waitForStatus(src, 'completed');
    await waitForStatus(dst, 'completed', { timeoutMs: 10_000 });
    assert.equal(await queryStatus(dst), 'paused');
    const { destination } = await assertSameRam(src, dst);
    assert.equal(destination.pattern.consistent, true);
  }));

interface Sample {
  transferred: number;
  /** Non-zero pages sent: full pages plus xbzrle-encoded ones. */
  pagesSent: number;
  syncs: number;
}

function sample(i: MigrationInfo): Sample {
  return {
    transferred: i.ram!.transferred,
    pagesSent: i.ram!.normal + (i['xbzrle-cache']?.pages ?? 0),
    syncs: i.ram!['dirty-sync-count'],
  };
}

/**
 * One hot-set migration, with or without xbzrle, under the same hold policy: 16 MiB/s and
 * downtime-limit 1 ms (no pass can fit), held until 1.5 s after dirty sync 3 (sync 2 ends the
 * bulk pass, pass 2 resends the hot set — with xbzrle as cache misses that fill the cache — and
 * from pass 3 on a resent page can be a cache hit), then downtime-limit 60 s / unlimited bandwidth
 * to converge. With xbzrle a resend pass is so cheap that it may converge on its own before that
 * (a dirty sync that finds nothing new: pending 0), which is xbzrle doing its job.
 * Returns `bulk`, the counters at the first poll after sync 2, and the completed query-migrate.
 */
async function hotsetRun(h: Harness, xbzrle: boolean): Promise<{ bulk: Sample; final: MigrationInfo; convergedAlone: boolean }> {
  const guest = ['-m', '64M', '--workload', 'hotset:8:200'];
  const tag = xbzrle ? 'x' : 'p';
  const dst = await h.destination({ incoming: 'tcp', paused: true, guest, name: `dst${tag}` });
  const caps = xbzrle ? 'return-path,xbzrle' : 'return-path';
  const src = await h.source({ guest, name: `src${tag}`, args: ['--capabilities', caps, '--parameters', `max-bandwidth=${16 * MiB},downtime-limit=1`] });
  await sleep(200);
  await src.execute('migrate', { uri: dst.incomingUri });
  const bulk = sample(await waitForMigration(src, (i) => i.status === 'active' && (i.ram?.['dirty-sync-count'] ?? 0) >= 2, 'dirty-sync-count ≥ 2'));
  let holdUntil = Infinity;
  let info = await queryMigrate(src);
  const deadline = Date.now() + 60_000;
  while (info.status === 'active' && Date.now() < holdUntil) {
    if (holdUntil === Infinity && info.ram!['dirty-sync-count'] >= 3) holdUntil = Date.now() + 1500;
    assert.ok(Date.now() < deadline, `${tag}: no dirty sync 3 within 60 s: ${JSON.stringify(info)}`);
    await sleep(50);
    info = await queryMigrate(src);
  }
  const convergedAlone = info.status === 'completed';
  if (!convergedAlone) {
    assert.equal(info.status, 'active', `${tag}: ${JSON.stringify(info)}`);
    await src.execute('migrate-set-parameters', { 'downtime-limit': 60_000, 'max-bandwidth': 0 });
  }
  const final = await waitForStatus(src, 'completed');
  await waitForStatus(dst, 'completed', { timeoutMs: 10_000 });
  await assertSameRam(src, dst);
  return { bulk, final, convergedAlone };
}

test('xbzrle: a hot-set guest resends its pages as deltas, far fewer bytes than without; RAM equal', T, () =>
  withHarness(async (h) => {
    const plain = await hotsetRun(h, false);
    const x = await hotsetRun(h, true);
    const cache = x.final['xbzrle-cache'];
    assert.ok(cache !== undefined, 'query-migrate has xbzrle-cache with the capability');
    assert.ok(cache.pages > 0, `xbzrle-cache.pages ${cache.pages}`);
    assert.ok(cache.bytes > 0 && cache['cache-size'] === 64 * MiB, JSON.stringify(cache));
    assert.ok(cache['cache-miss'] > 0, 'the first resend pass fills the cache');
    assert.equal(plain.final['xbzrle-cache'], undefined, 'no xbzrle-cache without the capability');
    assert.equal(plain.convergedAlone, false, 'without xbzrle the hot set never fits a 1 ms downtime');

    // Comparison. Normalising by elapsed time says nothing here: both runs are held at the same
    // 16 MiB/s, so they send the same bytes per second by construction. What xbzrle changes is
    // what resending a dirtied page costs. So, for each run, over everything after the bulk pass
    // (from the first poll after dirty sync 2 to completion), we divide the bytes sent by the
    // non-zero pages sent (full + xbzrle-encoded). Both counters come from the same replies, so
    // polling jitter cancels out, and neither depends on how long a phase lasted. Without xbzrle a
    // resent page costs its 4 KiB; with it, the cache-filling pass still costs full pages but every
    // later pass (at least one: the hot set is re-dirtied while the 8 MiB miss pass is sent) costs
    // a delta of the few 8-byte writes since the last pass, so the average at least halves.
    // And under the same hold policy the xbzrle run's total ram.transferred is lower.
    const costPerPage = (r: { bulk: Sample; final: MigrationInfo }): number => {
      const end = sample(r.final);
      return (end.transferred - r.bulk.transferred) / Math.max(1, end.pagesSent - r.bulk.pagesSent);
    };
    const p = costPerPage(plain);
    const xc = costPerPage(x);
    const detail = JSON.stringify({ plain: { bulk: plain.bulk, end: sample(plain.final) }, xbzrle: { bulk: x.bulk, end: sample(x.final), cache } });
    assert.ok(sample(plain.final).pagesSent - plain.bulk.pagesSent >= 2048, `plain run resent the hot set: ${detail}`);
    assert.ok(p > 4096, `without xbzrle a resent page costs a full page: ${p.toFixed(0)} B; ${detail}`);
    assert.ok(xc < 0.6 * p, `with xbzrle a resent page costs far less: ${xc.toFixed(0)} B vs ${p.toFixed(0)} B; ${detail}`);
    assert.ok(
      x.final.ram!.transferred < plain.final.ram!.transferred,
      `ram.transferred with xbzrle ${x.final.ram!.transferred} < without ${plain.final.ram!.transferred}`,
    );
  }));

test('auto-converge: a guest that does not converge without it converges with it; throttle 30 → 50 → 70', T, () =>
  withHarness(async (h) => {
    // Random writes (not the incrementer: a sequential writer racing the sequential scan makes the
    // point of convergence erratic). With the dirty sync taken when pending falls below the
    // threshold T (= bandwidth × 300 ms = 9.6 MiB at 32 MiB/s), random page writes at rate r keep it
    // from converging exactly when r > B·N/(N − T) = 32 MiB/s · 32/22.4 ≈ 46 MiB/s (N = pc.ram).
    // random:120 is ~114 MiB/s ≈ 2.5× that: at 30 % and 50 % throttle (1.75×, 1.25×) it still
    // does not converge, at 70 % (0.75×) every pass shrinks and it converges.
    const guest = ['-m', '32M', '--workload', 'random:120'];
    const params = `max-bandwidth=${32 * MiB},cpu-throttle-initial=30,cpu-throttle-increment=20,max-cpu-throttle=70`;
    const src = await h.source({ guest, args: ['--capabilities', 'return-path', '--parameters', params] });

    // Control: without auto-converge it stays active and unthrottled for 3 s of passes.
    const dst1 = await h.destination({ incoming: 'tcp', guest, name: 'dst1' });
    await src.execute('migrate', { uri: dst1.incomingUri });
    await waitForStatus(src, 'active');
    const controlStart = Date.now();
    let control: MigrationInfo = {};
    while (Date.now() - controlStart < 3000) {
      control = await queryMigrate(src);
      assert.equal(control.status, 'active', `does not converge without auto-converge: ${JSON.stringify(control)}`);
      assert.equal(control['cpu-throttle-percentage'], undefined, 'no throttle without auto-converge');
      await sleep(100);
    }
    assert.ok(control.ram!['dirty-sync-count'] >= 3, `control made passes: ${JSON.stringify(control.ram)}`);
    assert.ok(control.ram!.transferred > control.ram!.total, 'control re-sent dirtied pages');
    await src.execute('migrate_cancel');
    await waitForStatus(src, 'cancelled', { timeoutMs: 10_000 });

    // The same guest, same parameters, with auto-converge.
    await setCapabilities(src, ['auto-converge']);
    const caps = await src.execute<{ capability: string; state: boolean }[]>('query-migrate-capabilities');
    assert.equal(caps.find((c) => c.capability === 'auto-converge')?.state, true);
    const dst2 = await h.destination({ incoming: 'tcp', paused: true, guest, name: 'dst2' });
    await src.execute('migrate', { uri: dst2.incomingUri });
    // Every distinct cpu-throttle-percentage seen while active, in order.
    const seen: number[] = [];
    await waitForMigration(
      src,
      (i) => {
        const p = i['cpu-throttle-percentage'];
        if (i.status === 'active' && p !== undefined && p !== seen[seen.length - 1]) seen.push(p);
        return i.status === 'completed';
      },
      'completion under auto-converge',
      { timeoutMs: 60_000, intervalMs: 50 },
    );
    assert.ok(seen.length >= 1, 'cpu-throttle-percentage appeared while active');
    assert.equal(seen[0], 30, `starts at cpu-throttle-initial: [${seen}]`);
    for (let i = 1; i < seen.length; i++) assert.equal(seen[i], seen[i - 1]! + 20, `rises by cpu-throttle-increment: [${seen}]`);
    assert.ok(Math.max(...seen) <= 70, `never above max-cpu-throttle: [${seen}]`);
    assert.deepEqual(seen, [30, 50, 70], 'converged only once throttled to the 70 % cap');
    await waitForStatus(dst2, 'completed', { timeoutMs: 10_000 });
    await assertSameRam(src, dst2);
  }));

test('auto-converge: the throttle stops at max-cpu-throttle while the guest still out-dirties the link', T, () =>
  withHarness(async (h) => {
    // Same guest and link as above; the cap (40 %) is below what it needs to converge (70 %), so
    // the throttle goes 30 → 40 (30 + 20, clamped) and stays there through later dirty periods.
    const guest = ['-m', '32M', '--workload', 'random:120'];
    const params = `max-bandwidth=${32 * MiB},cpu-throttle-initial=30,cpu-throttle-increment=20,max-cpu-throttle=40`;
    const src = await h.source({ guest, args: ['--capabilities', 'return-path,auto-converge', '--parameters', params] });
    const dst = await h.destination({ incoming: 'tcp', paused: true, guest });
    await src.execute('migrate', { uri: dst.incomingUri });
    const seen: number[] = [];
    const record = (i: MigrationInfo): void => {
      const p = i['cpu-throttle-percentage'];
      if (i.status === 'active' && p !== undefined && p !== seen[seen.length - 1]) seen.push(p);
    };
    await waitForMigration(
      src,
      (i) => {
        record(i);
        return seen.includes(40);
      },
      'the throttle to reach max-cpu-throttle 40',
      { timeoutMs: 30_000 },
    );
    // Raising again takes two more dirty periods of ≥ 1 s: watch for 3 s that it does not.
    const until = Date.now() + 3000;
    while (Date.now() < until) {
      const i = await queryMigrate(src);
      assert.equal(i.status, 'active', `still not converging at 40 %: ${JSON.stringify(i)}`);
      record(i);
      await sleep(50);
    }
    assert.deepEqual(seen, [30, 40], 'initial 30, then +20 clamped to the cap, then no further');
    await src.execute('migrate-set-parameters', { 'max-bandwidth': 0 });
    await waitForStatus(src, 'completed');
    await waitForStatus(dst, 'completed', { timeoutMs: 10_000 });
    await assertSameRam(src, dst);
  }));

test('downtime-limit raised mid-migration takes effect at once (QEMU reads it live)', T, () =>
  withHarness(async (h) => {
    // As the QEMU recipe, but only downtime-limit changes: at an unchanged 32 MiB/s a 60 s limit
    // admits all of RAM, so the next loop turn must switch over.
    const guest = ['-m', '64M', '--workload', 'incrementer:400'];
    const dst = await h.destination({ incoming: 'tcp', paused: true, guest });
    const src = await h.source({ guest, args: ['--capabilities', 'return-path', '--parameters', `max-bandwidth=${32 * MiB},downtime-limit=1`] });
    await src.execute('migrate', { uri: dst.incomingUri });
    await waitForMigration(src, (i) => i.status === 'active' && (i.ram?.['dirty-sync-count'] ?? 0) >= 2, 'dirty-sync-count ≥ 2');
    await src.execute('migrate-set-parameters', { 'downtime-limit': 60_000 });
    // A pass at 32 MiB/s over 64 MiB takes ~2 s: completing within 1.5 s shows the new limit was used.
    await waitForStatus(src, 'completed', { timeoutMs: 1500, intervalMs: 50 });
    await waitForStatus(dst, 'completed', { timeoutMs: 10_000 });
    const { destination } = await assertSameRam(src, dst);
    assert.equal(destination.pattern.consistent, true);
  }));
