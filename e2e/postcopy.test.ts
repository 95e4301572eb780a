// End-to-end postcopy between two livemig processes (wire-format.md §§5, 7.2–7.3, 8): the
// destination guest runs after the switchover and its vCPU faults pull missing pages from the
// source over the return path; a broken or paused link pauses both sides and migrate-recover +
// migrate resume=true carry on over a new connection.
//
// Run: pnpm build && node --import tsx --test --test-concurrency=1 e2e/postcopy.test.ts

import assert from 'node:assert/strict';
import { test, type TestContext } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { assertSameRam, MiB, queryMigrate, queryStatus, setCapabilities, waitForMigration, waitForStatus } from './helpers/migration.ts';
import {
  assertQmpError,
  fifoThreads,
  migrateIntoPostcopy,
  postcopyPair,
  recover,
  SLOW_POSTCOPY,
  stopAndCheckPattern,
  TcpProxy,
  waitBothCompleted,
  waitBothPaused,
  waitForNthMigrationEvent,
} from './helpers/postcopy.ts';
import { type Child, unusedPort, withHarness } from './helpers/processes.ts';

/** A last-resort bound per test (every wait inside is bounded far below it). */
const T = { timeout: 90_000 };
const GUEST = ['-m', '64M', '--workload', 'incrementer:200'];

const log = (t: TestContext, msg: string): void => t.diagnostic(msg);

/** `sub` appears in `seq` in this order (other entries may come between). */
function assertSubsequence(seq: string[], sub: string[], what: string): void {
  let i = 0;
  for (const s of seq) if (s === sub[i]) i++;
  assert.equal(i, sub.length, `${what}: ${JSON.stringify(sub)} in order within ${JSON.stringify(seq)}`);
}

/** A direct recovery from postcopy-paused that completes: a consistent pattern, the source's events in order. */
async function recoverToCompletion(src: Child, dst: Child): Promise<void> {
  await recover(src, dst);
  await waitBothCompleted(src, dst);
  await stopAndCheckPattern(dst);
  assertSubsequence(src.migrationEvents(), ['postcopy-active', 'postcopy-paused', 'postcopy-recover', 'postcopy-active', 'completed'], 'source MIGRATION events');
}

async function waitMigrationEvent(c: Child, status: string, timeoutMs = 5_000): Promise<void> {
  await c.waitForEvent('MIGRATION', (e) => e.data?.['status'] === status, timeoutMs);
}

test('postcopy with the destination guest running: its vCPU faults pull pages on demand; completes with a consistent pattern', T, (t) =>
  withHarness(async (h) => {
    const { src, dst } = await postcopyPair(h, { guest: GUEST });
    await sleep(300); // let the workload dirty memory first
    await migrateIntoPostcopy(src, dst, dst.incomingUri);
    // The guest starts at POSTCOPY_RUN, a moment after postcopy-active (LISTEN): its RESUME says so.
    await dst.waitForEvent('RESUME', undefined, 10_000);
    assert.equal(await queryStatus(dst), 'running', 'the destination guest runs during postcopy (no -S)');
    const { src: s, dst: d } = await waitBothCompleted(src, dst);

    const ram = s.ram!;
    assert.ok((ram['postcopy-requests'] ?? 0) > 0, `source ram.postcopy-requests ${ram['postcopy-requests']} > 0`);
    assert.equal(ram.remaining, 0);
    assert.ok((ram['postcopy-bytes'] ?? 0) > 0, `ram.postcopy-bytes ${ram['postcopy-bytes']}`);
    const faults = d['postcopy-faults'] ?? 0;
    assert.ok(faults > 0, `destination postcopy-faults ${faults} > 0`);
    assert.ok((d['postcopy-blocktime'] ?? -1) > 0, `postcopy-blocktime ${d['postcopy-blocktime']} ms`);
    assert.equal(d['postcopy-vcpu-blocktime']?.length, 1, 'one vCPU, one blocktime');
    assert.ok((d['postcopy-latency'] ?? 0) > 0, `postcopy-latency ${d['postcopy-latency']} ns`);
    const dist = d['postcopy-latency-dist'] ?? [];
    assert.equal(dist.reduce((a, b) => a + b, 0), faults, `latency histogram ${JSON.stringify(dist)} counts every fault`);
    // Every fault was an access; the guest ran on between them.
    const accesses = d['x-postcopy-guest-accesses'] ?? 0;
    assert.ok(accesses >= faults, `x-postcopy-guest-accesses ${accesses} ≥ faults ${faults}`);
    log(t, `postcopy-requests ${ram['postcopy-requests']}, faults ${faults}, blocktime ${d['postcopy-blocktime']} ms, mean latency ${((d['postcopy-latency'] ?? 0) / 1000).toFixed(0)} µs, total ${s['total-time']} ms, downtime ${s.downtime} ms`);

    assert.equal(await queryStatus(src), 'postmigrate');
    assert.equal(await queryStatus(dst), 'running');
    await stopAndCheckPattern(dst);

    // Events (capability "events" on both sides).
    await waitMigrationEvent(src, 'completed');
    await waitMigrationEvent(dst, 'completed');
    assert.deepEqual(src.migrationEvents(), ['setup', 'active', 'postcopy-active', 'completed'], 'source MIGRATION events');
    assert.deepEqual(dst.migrationEvents().filter((x) => x !== 'setup'), ['active', 'postcopy-active', 'completed'], 'destination MIGRATION events');
    assert.ok(src.events.some((e) => e.event === 'STOP'), 'source STOP at the switchover');
    assert.ok(dst.events.some((e) => e.event === 'RESUME'), 'destination RESUME (guest started by POSTCOPY_RUN)');
  }));

test('postcopy with postcopy-preempt: the destination\'s vCPUs ask on the second connection themselves and the source\'s page server answers there; faults pull pages, the pattern is consistent', T, (t) =>
  withHarness(async (h) => {
    const { src, dst } = await postcopyPair(h, { guest: GUEST, preempt: true });
    await sleep(300);
    await migrateIntoPostcopy(src, dst, dst.incomingUri);
    const { src: s, dst: d } = await waitBothCompleted(src, dst);
    const ram = s.ram!;
    const faults = d['postcopy-faults'] ?? 0;
    assert.ok((ram['postcopy-requests'] ?? 0) > 0, `source ram.postcopy-requests ${ram['postcopy-requests']} > 0`);
    assert.ok(faults > 0, `destination postcopy-faults ${faults} > 0`);
    // Requested pages came on the preempt connection.
    const viaPreempt = d['x-postcopy-preempt-pages'] ?? 0;
    assert.ok(viaPreempt > 0, `pages placed from the preempt channel: ${viaPreempt}`);
    // Between livemig peers the requests went that way too (not on the return path).
    const asked = ram['x-postcopy-preempt-requests'] ?? 0;
    assert.ok(asked > 0 && asked === ram['postcopy-requests'], `requests on the preempt channel: ${asked} of ${ram['postcopy-requests']}`);
    // One page a request, each asked for once: as many as the destination wrote.
    assert.equal(d['x-postcopy-request-pages'], asked, 'pages the destination asked for');
    assert.equal(ram.remaining, 0);
    // Each byte counts once: the RAM sections' bytes, the VFIO device's, each requested page
    // once more on the preempt channel with its record header (≤ 8 + 1 + 255 bytes), and 1 MiB
    // for the rest (other devices, commands, framing).
    const vfio = (s as { 'x-vfio'?: Record<string, number> })['x-vfio'] ?? {};
    const vfioBytes = (vfio['precopy-bytes'] ?? 0) + (vfio['stop-copy-bytes'] ?? 0) + (vfio['config-bytes'] ?? 0);
    const bound = ram['precopy-bytes'] + ram['downtime-bytes'] + (ram['postcopy-bytes'] ?? 0) + vfioBytes + asked * (4096 + 264) + MiB;
    assert.ok(ram.transferred >= ram['normal-bytes'] && ram.transferred <= bound, `ram.transferred ${ram.transferred} within [${ram['normal-bytes']}, ${bound}]`);
    log(t, `transferred ${ram.transferred} of at most ${bound}`);
    log(t, `preempt: postcopy-requests ${ram['postcopy-requests']}, faults ${faults}, mean latency ${((d['postcopy-latency'] ?? 0) / 1000).toFixed(0)} µs, dist ${JSON.stringify(d['postcopy-latency-dist'])}`);
    assert.equal(await queryStatus(src), 'postmigrate');
    await stopAndCheckPattern(dst);
  }));

test('--realtime-postcopy: in postcopy the destination\'s vCPUs (priority 1) and fault thread (2) and the source\'s page server (2) run under SCHED_FIFO; afterwards no destination thread does, and the pattern is consistent', {
  ...T,
  skip: process.getuid?.() === 0 ? false : 'needs root (SCHED_FIFO needs CAP_SYS_NICE)',
}, (t) =>
  withHarness(async (h) => {
    const { src, dst } = await postcopyPair(h, { guest: GUEST, preempt: true, args: ['--realtime-postcopy'] });
    // Before postcopy nothing runs under real time on the destination.
    await sleep(300);
    assert.deepEqual(fifoThreads(dst.pid).filter((x) => x.priority === 1), [], 'no real-time vCPU before postcopy');
    await migrateIntoPostcopy(src, dst, dst.incomingUri);
    let seen = { dst: [] as { tid: number; priority: number }[], src: [] as { tid: number; priority: number }[] };
    const deadline = performance.now() + 10_000;
    for (;;) {
      seen = { dst: fifoThreads(dst.pid), src: fifoThreads(src.pid) };
      const done = (await queryMigrate(dst)).status === 'completed';
      if (seen.dst.some((x) => x.priority === 1) || done || performance.now() > deadline) break;
      await sleep(20);
    }
    const priorities = seen.dst.map((x) => x.priority).sort();
    assert.deepEqual(priorities, [1, 2], `destination SCHED_FIFO threads in postcopy (one vCPU, the fault thread): ${JSON.stringify(seen.dst)}`);
    assert.deepEqual(seen.src.map((x) => x.priority), [2], `source SCHED_FIFO threads in postcopy (the page server): ${JSON.stringify(seen.src)}`);
    const { dst: d } = await waitBothCompleted(src, dst);
    assert.ok((d['postcopy-faults'] ?? 0) > 0, 'vCPU faults pulled pages');
    // The vCPU goes back to the normal policy at its next step; the fault thread has ended.
    const after = performance.now() + 5_000;
    while (fifoThreads(dst.pid).length > 0 && performance.now() < after) await sleep(20);
    assert.deepEqual(fifoThreads(dst.pid), [], 'no destination thread under SCHED_FIFO after postcopy');
    log(t, `realtime: faults ${d['postcopy-faults']}, mean latency ${((d['postcopy-latency'] ?? 0) / 1000).toFixed(0)} µs, dist ${JSON.stringify(d['postcopy-latency-dist'])}`);
    await stopAndCheckPattern(dst);
  }));

test('postcopy into a paused destination (-S): nothing faults; it holds the stopped source\'s RAM', T, () =>
  withHarness(async (h) => {
    // Nothing faults, so the background transfer may run at full speed.
    const { src, dst } = await postcopyPair(h, { guest: GUEST, paused: true, parameters: { ...SLOW_POSTCOPY, 'max-postcopy-bandwidth': 0 } });
    await sleep(300);
    await migrateIntoPostcopy(src, dst, dst.incomingUri);
    const { src: s, dst: d } = await waitBothCompleted(src, dst);
    assert.equal(s.ram!['postcopy-requests'], 0, 'no page requested');
    assert.equal(d['postcopy-faults'] ?? 0, 0, 'no fault on a paused destination');
    assert.equal(await queryStatus(src), 'postmigrate');
    assert.equal(await queryStatus(dst), 'paused');
    const { destination } = await assertSameRam(src, dst);
    assert.equal(destination.pattern.consistent, true, `pattern ${JSON.stringify(destination.pattern)}`);
    // cont: the guest runs on from where the source stopped.
    await dst.execute('cont');
    assert.equal(await queryStatus(dst), 'running');
    await sleep(200);
    await stopAndCheckPattern(dst);
  }));

test('a guest dirtying faster than max-bandwidth: precopy alone never converges; migrate-start-postcopy completes it', T, (t) =>
  withHarness(async (h) => {
    // 16 MiB + 4 MiB vga.vram at 8 MiB/s: a pass takes ~2.5 s, the guest re-dirties all of it.
    const guest = ['-m', '16M', '--workload', 'incrementer:400'];
    // Default downtime-limit (300 ms); only max-bandwidth is low.
    const { src, dst } = await postcopyPair(h, { guest, parameters: { 'max-bandwidth': 8 * MiB } });
    await src.execute('migrate', { uri: dst.incomingUri });
    const first = await waitForMigration(src, (i) => i.status === 'active' && (i.ram?.['dirty-sync-count'] ?? 0) >= 2, 'a second dirty sync while active', { timeoutMs: 20_000 });
    // Over the next ≥ 2 s: always active, and at least one more dirty sync.
    const since = performance.now();
    let later = first;
    for (;;) {
      await sleep(100);
      later = await queryMigrate(src);
      assert.equal(later.status, 'active', `precopy alone stays active: ${JSON.stringify(later)}`);
      const elapsed = performance.now() - since;
      if (elapsed >= 2_000 && later.ram!['dirty-sync-count'] > first.ram!['dirty-sync-count']) break;
      assert.ok(elapsed < 8_000, `dirty-sync-count still ${later.ram!['dirty-sync-count']} after ${elapsed.toFixed(0)} ms`);
    }
    const syncs = [first.ram!['dirty-sync-count'], later.ram!['dirty-sync-count']];
    assert.ok(later.ram!.transferred > later.ram!.total, 'pages re-dirtied after being sent went again');
    assert.ok(later.ram!.remaining > 0);
    log(t, `precopy: dirty-sync-count ${syncs.join(' → ')} over ${(performance.now() - since).toFixed(0)} ms, transferred ${(later.ram!.transferred / MiB).toFixed(1)} MiB of ${(later.ram!.total / MiB).toFixed(0)} MiB`);

    assert.deepEqual(await src.execute('migrate-start-postcopy'), {});
    await waitMigrationEvent(src, 'postcopy-active', 10_000);
    await waitBothCompleted(src, dst);
    await stopAndCheckPattern(dst);
  }));

for (const side of ['source', 'destination'] as const) {
  test(`postcopy recovery after migrate-pause on the ${side}: both sides pause, the guest stays up, migrate-recover + resume complete it`, T, (t) =>
    withHarness(async (h) => {
      const { src, dst } = await postcopyPair(h, { guest: GUEST });
      await migrateIntoPostcopy(src, dst, dst.incomingUri);
      await sleep(500); // faults in flight
      const pauser = side === 'source' ? src : dst;
      assert.deepEqual(await pauser.qmp.execute('migrate-pause', undefined, { oob: true, timeoutMs: 5_000 }), {});
      const paused = await waitBothPaused(src, dst);
      assert.ok(paused.src.ram!.remaining > 0, `pages still to send at the pause (${paused.src.ram!.remaining})`);
      assert.equal(await queryStatus(dst), 'running', 'the destination guest stays up while paused');
      // As QEMU: the source stays in finish-migrate through postcopy, never restarted.
      assert.equal(await queryStatus(src), 'finish-migrate', 'the source guest is never restarted after the switchover');
      // A second pause while paused is refused.
      await assertQmpError(src.execute('migrate-pause'), /postcopy/);

      await recover(src, dst);
      const { src: s, dst: d } = await waitBothCompleted(src, dst);
      log(t, `postcopy-requests ${s.ram!['postcopy-requests']}, faults ${d['postcopy-faults']}`);
      await stopAndCheckPattern(dst);

      await waitMigrationEvent(src, 'completed');
      await waitMigrationEvent(dst, 'completed');
      assertSubsequence(src.migrationEvents(), ['postcopy-active', 'postcopy-paused', 'postcopy-recover', 'postcopy-active', 'completed'], 'source MIGRATION events');
      assertSubsequence(dst.migrationEvents(), ['postcopy-active', 'postcopy-paused', 'setup', 'postcopy-recover', 'postcopy-active', 'completed'], 'destination MIGRATION events');
    }));
}

// The preempt channel's setup follows the dialect: QEMU 7.2's (with the main channel, EOS at the
// end) by default, 8.0's (at the switch to postcopy, and on recovery after the received bitmaps)
// when both speak as QEMU 10.0. A proxy in front of the destination counts the connections.
for (const { setup, args } of [
  { setup: '7.2', args: [] as string[] },
  { setup: '8.0', args: ['--qemu-version', '10.0'] },
] as const) {
test(`postcopy-preempt recovery (${setup} setup): after migrate-pause and recovery, requested pages come on a new preempt connection`, T, (t) =>
  withHarness(async (h) => {
    const { src, dst } = await postcopyPair(h, { guest: GUEST, preempt: true, args });
    const proxy = await TcpProxy.start(dst.incomingUri);
    t.after(() => proxy.close());
    await src.execute('migrate', { uri: proxy.uri });
    await waitForMigration(src, (i) => i.status === 'active' && (i.ram?.transferred ?? 0) > 0, 'precopy active with bytes sent', { timeoutMs: 15_000 });
    await sleep(300);
    await proxy.waitForConnections(setup === '7.2' ? 2 : 1);
    assert.equal(proxy.pairs.length, setup === '7.2' ? 2 : 1, 'connections in precopy');
    assert.equal((await queryMigrate(src)).status, 'active', 'still in precopy');
    assert.deepEqual(await src.execute('migrate-start-postcopy'), {});
    await waitForStatus(src, 'postcopy-active', { timeoutMs: 15_000 });
    await waitForStatus(dst, 'postcopy-active', { timeoutMs: 15_000 });
    await proxy.waitForConnections(2);
    // Pages on the first preempt connection before the pause (bounded, not timed: the source's
    // page server thread may take a second or more to boot on a loaded machine).
    await waitForMigration(dst, (i) => ((i as { 'x-postcopy-preempt-pages'?: number })['x-postcopy-preempt-pages'] ?? 0) > 0, 'a page placed from the first preempt connection', { timeoutMs: 20_000 });
    assert.deepEqual(await dst.qmp.execute('migrate-pause', undefined, { oob: true, timeoutMs: 5_000 }), {});
    await waitBothPaused(src, dst);
    const before = (await queryMigrate(dst))['x-postcopy-preempt-pages'] as number;
    assert.ok(before > 0, `pages on the first preempt connection: ${before}`);

    let recovery: TcpProxy | undefined;
    t.after(() => recovery?.close());
    await recover(src, dst, {
      via: async (uri) => {
        recovery = await TcpProxy.start(uri);
        return recovery.uri;
      },
    });
    await waitForStatus(dst, 'postcopy-active', { timeoutMs: 10_000 });
    const { dst: d } = await waitBothCompleted(src, dst);
    assert.equal(recovery!.pairs.length, 2, 'connections on recovery: main and preempt');
    const after = d['x-postcopy-preempt-pages'] ?? 0;
    log(t, `preempt pages: ${before} before the pause, ${after} in all`);
    assert.ok(after > before, `requested pages came on the new preempt connection (${before} → ${after})`);
    await stopAndCheckPattern(dst);
  }));
}

for (const preempt of [false, true]) {
test(`postcopy recovery after a silent link break (a proxy stops forwarding, nothing closes)${preempt ? ', with postcopy-preempt (the fault and page server threads let go of their frozen connection)' : ''}: keepalive pauses both sides; direct recovery completes`, T, (t) =>
  withHarness(async (h) => {
    const { src, dst } = await postcopyPair(h, { guest: GUEST, preempt });
    const proxy = await TcpProxy.start(dst.incomingUri);
    try {
      await migrateIntoPostcopy(src, dst, proxy.uri);
      assert.equal(proxy.pairs.length, preempt ? 2 : 1, 'the migration went through the proxy');
      await sleep(500);
      proxy.freeze();
      const frozenAt = performance.now();
      await waitBothPaused(src, dst, 6_000);
      const ms = performance.now() - frozenAt;
      log(t, `both sides postcopy-paused ${ms.toFixed(0)} ms after the freeze`);
      assert.equal(await queryStatus(dst), 'running', 'the destination guest stays up while paused');

      await recoverToCompletion(src, dst);
    } finally {
      await proxy.close();
    }
  }));
}

test('a link cut just before the end of the stream, with the source waiting for SHUT: both sides pause instead of failing; recovery completes', T, (t) =>
  withHarness(async (h) => {
    const { src, dst } = await postcopyPair(h, { guest: GUEST, parameters: { ...SLOW_POSTCOPY, 'max-postcopy-bandwidth': 32 * MiB } });
    const proxy = await TcpProxy.start(dst.incomingUri);
    try {
      // The last 19 bytes of a postcopy stream: RAM's END section header, its EOS, its footer, EOF.
      // The source writes them all and waits for SHUT; the destination never gets them.
      proxy.cutBefore(Buffer.from('0300000002' + '0000000000000010' + '7e00000002' + '00', 'hex'));
      await migrateIntoPostcopy(src, dst, proxy.uri);
      const paused = await waitBothPaused(src, dst, 30_000);
      log(t, `paused after ${paused.src.ram?.transferred ?? 0} bytes; the destination lacked the stream's end`);
      assert.equal(await queryStatus(dst), 'running', 'the destination guest stays up while paused');
      assert.equal(await queryStatus(src), 'finish-migrate', 'the source guest is never restarted after the switchover');

      await recoverToCompletion(src, dst);
    } finally {
      await proxy.close();
    }
  }));

test('double failure: recovery attempts that break during the handshake (connection cut: both sides pause again; link frozen: the destination never takes the silent connection, the source is paused) end in postcopy-paused; a further recovery completes', T, () =>
  withHarness(async (h) => {
    const { src, dst } = await postcopyPair(h, { guest: GUEST });
    const proxies: TcpProxy[] = [];
    const via = (setup: (p: TcpProxy) => void) => async (recoverUri: string): Promise<string> => {
      const p = await TcpProxy.start(recoverUri);
      proxies.push(p);
      setup(p);
      return p.uri;
    };
    try {
      await migrateIntoPostcopy(src, dst, dst.incomingUri);
      await sleep(300);
      await src.qmp.execute('migrate-pause', undefined, { oob: true, timeoutMs: 5_000 });
      await waitBothPaused(src, dst);

      // Attempt 1 through a proxy that drops the destination's answers (RECV_BITMAP replies):
      // both sides enter postcopy-recover, then the connection is cut mid-handshake.
      await recover(src, dst, { via: via((p) => p.dropReplies()) });
      await Promise.all([waitForNthMigrationEvent(src, 'postcopy-recover', 1), waitForNthMigrationEvent(dst, 'postcopy-recover', 1)]);
      assert.ok(proxies[0]!.forwarded.up > 0, 'the source started the handshake (RECV_BITMAP requests went through)');
      proxies[0]!.cut();
      await waitBothPaused(src, dst);
      await waitForNthMigrationEvent(src, 'postcopy-paused', 2);
      await waitForNthMigrationEvent(dst, 'postcopy-paused', 2);

      // Attempt 2 through a link that connects and then carries nothing: the source enters
      // postcopy-recover; the destination never gets the recovery channel's first record
      // (RECV_BITMAP), so it does not take the connection: it stays postcopy-paused, drops the
      // silent client after its handshake deadline and keeps the recovery port open.
      // migrate-pause (allowed in postcopy-recover) returns the source to postcopy-paused.
      await recover(src, dst, { via: via((p) => p.freeze()) });
      await waitForNthMigrationEvent(src, 'postcopy-recover', 2);
      // (The source's own keepalive would give up after 3 s of silence; a slow run may see that.)
      await src.qmp.execute('migrate-pause', undefined, { oob: true, timeoutMs: 5_000 }).catch(async (err: Error) => {
        if ((await queryMigrate(src)).status !== 'postcopy-paused') throw err;
      });
      await waitForStatus(src, 'postcopy-paused', { timeoutMs: 6_000 });
      assert.equal((await queryMigrate(dst)).status, 'postcopy-paused', 'the destination did not take a silent connection as its recovery channel');
      assert.equal(dst.migrationEvents().filter((s) => s === 'postcopy-recover').length, 1);
      assert.equal(await queryStatus(dst), 'running', 'the destination guest is still up');

      // Attempt 3, direct: completes.
      await recover(src, dst);
      await waitBothCompleted(src, dst);
      await stopAndCheckPattern(dst);
      const twice = ['postcopy-paused', 'postcopy-recover', 'postcopy-paused', 'postcopy-recover', 'postcopy-paused', 'postcopy-recover', 'postcopy-active', 'completed'];
      assertSubsequence(src.migrationEvents(), ['postcopy-active', ...twice], 'source MIGRATION events');
      assertSubsequence(dst.migrationEvents(), ['postcopy-active', 'postcopy-paused', 'postcopy-recover', 'postcopy-paused', 'postcopy-recover', 'postcopy-active', 'completed'], 'destination MIGRATION events');
    } finally {
      for (const p of proxies) await p.close();
    }
  }));

test('recovery after a pause longer than the keepalive timeout, over a slow return path (replies 800 ms late): the handshake completes', T, (t) =>
  withHarness(async (h) => {
    const { src, dst } = await postcopyPair(h, { guest: GUEST });
    let proxy: TcpProxy | undefined;
    try {
      await migrateIntoPostcopy(src, dst, dst.incomingUri);
      await sleep(300);
      await dst.qmp.execute('migrate-pause', undefined, { oob: true, timeoutMs: 5_000 });
      await waitBothPaused(src, dst);
      await sleep(3_500); // longer than the 3 s keepalive timeout: the old link's silence must not count
      await recover(src, dst, {
        via: async (recoverUri) => {
          proxy = await TcpProxy.start(recoverUri);
          proxy.delayReplies(800);
          return proxy.uri;
        },
      });
      await waitForStatus(src, ['postcopy-active', 'completed'], { timeoutMs: 10_000 });
      // Faster now, so the slow link does not make the rest of the transfer long.
      await src.execute('migrate-set-parameters', { 'max-postcopy-bandwidth': 0 });
      await waitBothCompleted(src, dst);
      await stopAndCheckPattern(dst);
      const events = src.migrationEvents();
      t.diagnostic(`source MIGRATION events ${JSON.stringify(events)}`);
      assert.equal(events.filter((s) => s === 'postcopy-recover').length, 1, 'one recovery attempt was enough');
    } finally {
      await proxy?.close();
    }
  }));

test('QMP errors: migrate-start-postcopy without the capability, resume / recover / pause outside postcopy-paused', T, () =>
  withHarness(async (h) => {
    const guest = ['-m', '32M', '--workload', 'incrementer:200'];
    // No postcopy-ram on the source: GenericError, whether or not a migration runs.
    const plain = await h.source({ guest, name: 'plain' });
    await assertQmpError(plain.execute('migrate-start-postcopy'), /postcopy/i);

    const dst = await h.destination({ incoming: 'tcp', guest, capabilities: ['postcopy-ram', 'events'] });
    const src = await h.source({ guest });
    // Nothing migrating yet.
    await assertQmpError(src.execute('migrate', { uri: dst.incomingUri, resume: true }), /paused/);
    await assertQmpError(dst.execute('migrate-recover', { uri: `tcp:127.0.0.1:${await unusedPort()}` }), /paused/);
    await assertQmpError(src.execute('migrate-pause'), /postcopy/);
    await assertQmpError(dst.execute('migrate-pause'), /postcopy/);
    await setCapabilities(src, ['postcopy-ram', 'events']);
    await assertQmpError(src.execute('migrate-start-postcopy'), /after migration has been started/);

    // In precopy (active): still refused.
    await src.execute('migrate-set-parameters', { 'max-bandwidth': 8 * MiB, 'downtime-limit': 1 });
    await src.execute('migrate', { uri: dst.incomingUri });
    await waitForStatus(src, 'active', { timeoutMs: 10_000 });
    await waitForStatus(dst, 'active', { timeoutMs: 10_000 });
    await assertQmpError(src.execute('migrate', { uri: dst.incomingUri, resume: true }), /paused/);
    await assertQmpError(dst.qmp.execute('migrate-recover', { uri: `tcp:127.0.0.1:${await unusedPort()}` }, { oob: true }), /paused/);
    await assertQmpError(src.execute('migrate-pause'), /postcopy/);
    await assertQmpError(dst.execute('migrate-pause'), /postcopy/);
    // Capabilities cannot change while a migration runs.
    await assertQmpError(src.execute('migrate-set-capabilities', { capabilities: [{ capability: 'postcopy-ram', state: false }] }), /./);

    // In postcopy-active: resume and recover still refused (the link is fine).
    await src.execute('migrate-start-postcopy');
    await waitForStatus(src, ['postcopy-active', 'completed'], { timeoutMs: 10_000 });
    if ((await queryMigrate(src)).status === 'postcopy-active') {
      await assertQmpError(src.execute('migrate', { uri: dst.incomingUri, resume: true }), /paused/);
    }
    await src.execute('migrate-set-parameters', { 'max-postcopy-bandwidth': 0 });
    await waitBothCompleted(src, dst);

    // After completion: resume / recover / pause refused; migrate-start-postcopy is harmless.
    await assertQmpError(src.execute('migrate', { uri: dst.incomingUri, resume: true }), /paused/);
    await assertQmpError(dst.execute('migrate-recover', { uri: `tcp:127.0.0.1:${await unusedPort()}` }), /paused/);
    await assertQmpError(src.execute('migrate-pause'), /postcopy/);
    assert.deepEqual(await src.execute('migrate-start-postcopy'), {});
    assert.equal((await queryMigrate(src)).status, 'completed');
    await stopAndCheckPattern(dst);
  }));

test('postcopy-ram on the source only: the destination refuses POSTCOPY_ADVISE, the migration fails, the source guest runs on', T, () =>
  withHarness(async (h) => {
    const guest = ['-m', '32M', '--workload', 'incrementer:200'];
    const dst = await h.destination({ incoming: 'tcp', guest });
    const src = await h.source({ guest });
    await setCapabilities(src, ['postcopy-ram']);
    await src.execute('migrate', { uri: dst.incomingUri });
    const failed = await waitForStatus(src, 'failed', { timeoutMs: 15_000 });
    assert.match(failed['error-desc'] ?? '', /postcopy|ADVISE/i, 'error-desc names the postcopy mismatch');
    const exit = await dst.waitForExit(15_000);
    assert.notEqual(exit.code, 0, `destination exit ${JSON.stringify(exit)}`);
    assert.equal(await queryStatus(src), 'running', 'a precopy-phase failure restarts nothing: the source guest runs on');
  }));
