// End-to-end multifd (wire-format.md §7.6): pages travel on extra connections in QEMU 7.2's packet
// format and land straight in the destination's guest RAM; each RAM section's SYNC keeps a page
// re-sent in a later pass from being overtaken by its older copy.

import assert from 'node:assert/strict';
import { readdirSync } from 'node:fs';
import { test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { assertSameRam, digest, MiB, type MigrationInfo, queryMigrate, queryStatus, waitForStatus } from './helpers/migration.ts';
import { withHarness } from './helpers/processes.ts';

const T = { timeout: 120_000 };

for (const { transport, machine } of [
  { transport: 'tcp', machine: undefined },
  { transport: 'unix', machine: undefined },
  // The 8.1+ dialect: SYNCs once per scan of RAM behind MULTIFD_FLUSH; 9.0+: zero pages in the packets.
  { transport: 'tcp', machine: 'pc-q35-10.0' },
] as const) {
  const dialect = machine === undefined ? 'synced per section' : `${machine}: synced per round, zero pages in the packets`;
  test(`multifd over ${transport} (${dialect}), 3 channels, a dirtying guest over several passes: the paused destination holds the stopped source's RAM and runs on`, T, () =>
    withHarness(async (h) => {
      const guest = ['-m', '64M', '--workload', 'incrementer:20', ...(machine === undefined ? [] : ['--machine', machine])];
      const dst = await h.destination({
        incoming: transport,
        paused: true,
        guest,
        capabilities: ['multifd'],
        args: ['--parameters', 'multifd-channels=3'],
      });
      const src = await h.source({
        guest,
        // Throttled, so the pages dirtied meanwhile are sent again in later passes.
        args: ['--capabilities', 'return-path,multifd', '--parameters', `multifd-channels=3,max-bandwidth=${64 * MiB},downtime-limit=50`],
      });
      await sleep(300);
      await src.execute('migrate', { uri: dst.incomingUri });
      const info = await waitForStatus(src, 'completed');
      const ram = info.ram!;
      assert.ok(ram['dirty-sync-count'] >= 3, `dirty-sync-count ${ram['dirty-sync-count']} ≥ 3: pages were re-sent after a SYNC`);
      const guestPages = (64 + 4) * 256;
      assert.ok(ram.normal + ram.duplicate > guestPages, `pages sent (${ram.normal} normal, ${ram.duplicate} zero) exceed the guest's ${guestPages}: some went twice`);
      // Normal pages go on the channels: headers (1344 B per ≤ 128 pages) + page data.
      const pageBytes = ram.normal * 4096;
      assert.ok(ram['multifd-bytes'] >= pageBytes && ram['multifd-bytes'] < pageBytes * 1.05, `multifd-bytes ${ram['multifd-bytes']} for ${ram.normal} normal pages`);
      // The main channel keeps sections, ZERO records and device state, but no page data.
      assert.ok(ram.transferred - ram['multifd-bytes'] < pageBytes / 4, `the main channel carried ${ram.transferred - ram['multifd-bytes']} bytes`);

      await waitForStatus(dst, 'completed', { timeoutMs: 10_000 });
      assert.equal(await queryStatus(dst), 'paused');
      const { destination } = await assertSameRam(src, dst);
      assert.equal(destination.pattern.consistent, true, `pattern ${JSON.stringify(destination.pattern)}`);

      await dst.execute('cont');
      await sleep(800);
      await dst.execute('stop');
      const after = await digest(dst);
      assert.notEqual(after.blocks[0]!.sha256, destination.blocks[0]!.sha256, 'the destination guest ran on');
      assert.equal(after.pattern.consistent, true, `pattern after running on: ${JSON.stringify(after.pattern)}`);
    }));
}

test('multifd: a source with more channels than the destination expects fails with the reason, and its guest runs on', T, () =>
  withHarness(async (h) => {
    const guest = ['-m', '32M', '--workload', 'incrementer'];
    const dst = await h.destination({ incoming: 'tcp', guest, capabilities: ['multifd'], args: ['--parameters', 'multifd-channels=2'] });
    const src = await h.source({ guest, args: ['--capabilities', 'return-path,multifd', '--parameters', 'multifd-channels=4'] });
    const before = await digest(src);
    await src.execute('migrate', { uri: dst.incomingUri });
    const info = await waitForStatus(src, ['failed', 'completed'], { timeoutMs: 30_000 });
    assert.equal(info.status, 'failed');
    assert.match(info['error-desc'] ?? '', /destination failed: multifd channel id [23], but multifd-channels is 2 here \[LM_ERR_BAD_MULTIFD\]/, `error-desc: ${info['error-desc']}`);
    assert.equal(await queryStatus(src), 'running');
    await sleep(300);
    const after = await digest(src);
    assert.notEqual(after.blocks[0]!.sha256, before.blocks[0]!.sha256, 'the source guest keeps running');
    const exit = await dst.waitForExit(10_000);
    assert.notEqual(exit.code, 0, 'the destination exits non-zero, as QEMU does after a failed incoming migration');
  }));

test('multifd: a destination without the capability refuses the extra connections; the source fails cleanly and runs on', T, () =>
  withHarness(async (h) => {
    const guest = ['-m', '32M', '--workload', 'incrementer'];
    const dst = await h.destination({ incoming: 'unix', guest });
    const src = await h.source({ guest, args: ['--capabilities', 'return-path,multifd'] });
    await src.execute('migrate', { uri: dst.incomingUri });
    const info = await waitForStatus(src, ['failed', 'completed'], { timeoutMs: 30_000 });
    assert.equal(info.status, 'failed', 'never completes with pages the destination did not read');
    assert.equal(await queryStatus(src), 'running');
    assert.notEqual((await queryMigrate(dst)).status, 'completed');
  }));

test('multifd is refused with postcopy-ram and with a compression method, naming why', T, () =>
  withHarness(async (h) => {
    const src = await h.source({ guest: ['-m', '32M'], args: ['--capabilities', 'multifd,postcopy-ram'] });
    await assert.rejects(src.execute('migrate', { uri: 'tcp:127.0.0.1:1' }), /multifd together with postcopy-ram/);
    await src.execute('migrate-set-capabilities', { capabilities: [{ capability: 'postcopy-ram', state: false }] });
    await src.execute('migrate-set-parameters', { 'multifd-compression': 'zlib' });
    await assert.rejects(src.execute('migrate', { uri: 'tcp:127.0.0.1:1' }), /multifd-compression 'zlib' is not supported/);
    await assert.rejects(src.execute('migrate', { uri: `exec:cat > ${h.path('x')}` }), /multifd is not supported by current protocol/);
    assert.equal(await queryStatus(src), 'running');
  }));

test('multifd: max-bandwidth holds for the channels too; a cancel leaves the source running, and a new multifd migration to a fresh destination completes', T, () =>
  withHarness(async (h) => {
    const guest = ['-m', '128M', '--workload', 'incrementer:20'];
    const first = await h.destination({ incoming: 'tcp', guest, capabilities: ['multifd'], name: 'dst1' });
    const rate = 32 * MiB;
    const src = await h.source({ guest, args: ['--capabilities', 'return-path,multifd', '--parameters', `max-bandwidth=${rate}`] });
    await src.execute('migrate', { uri: first.incomingUri });
    await waitForStatus(src, 'active', { timeoutMs: 10_000 });
    const a = await queryMigrate(src);
    await sleep(1500);
    const b = await queryMigrate(src);
    const seconds = (b['total-time']! - a['total-time']!) / 1000;
    const rateSeen = (b.ram!.transferred - a.ram!.transferred) / seconds;
    assert.ok(Math.abs(rateSeen / rate - 1) < 0.15, `transfer rate ${(rateSeen / MiB).toFixed(1)} MiB/s under max-bandwidth 32 MiB/s`);
    assert.ok(b.ram!['multifd-bytes'] > rate / 2, `the pages went over multifd (${b.ram!['multifd-bytes']} B)`);

    await src.execute('migrate_cancel');
    await waitForStatus(src, 'cancelled', { timeoutMs: 10_000 });
    assert.equal(await queryStatus(src), 'running');
    const exit = await first.waitForExit(10_000);
    assert.notEqual(exit.code, 0, 'the first destination gives up');

    const second = await h.destination({ incoming: 'tcp', paused: true, guest, capabilities: ['multifd'], name: 'dst2' });
    await src.execute('migrate-set-parameters', { 'max-bandwidth': 0 });
    await src.execute('migrate', { uri: second.incomingUri });
    await waitForStatus(src, 'completed');
    await waitForStatus(second, 'completed', { timeoutMs: 10_000 });
    const { destination } = await assertSameRam(src, second);
    assert.equal(destination.pattern.consistent, true, `pattern ${JSON.stringify(destination.pattern)}`);
  }));

/** Open descriptors and threads of a process, from /proc. */
function fdsAndThreads(pid: number): { fds: number; threads: number } {
  return { fds: readdirSync(`/proc/${pid}/fd`).length, threads: readdirSync(`/proc/${pid}/task`).length };
}

/** Wait (bounded) until `check` holds. */
async function until(check: () => boolean | Promise<boolean>, what: string, timeoutMs = 15_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) assert.fail(`timed out waiting for ${what}`);
    await sleep(50);
  }
}

// The source writes each multifd channel from a thread of its own (StreamOut's writer thread): a
// destination that stops reading leaves those threads waiting for room. A cancel then, or the
// destination's death, must still end the migration at once, leave the guest running, and close
// every channel and thread the migration opened.
test('multifd: with the destination frozen (every channel full, its writer thread waiting for room), a cancel, and then a destination killed, each end the migration with the source running and its channels and threads closed; then a migration completes', T, () =>
  withHarness(async (h) => {
    const guest = ['-m', '256M', '--workload', 'incrementer:20'];
    const multifd = ['--parameters', 'multifd-channels=2'];
    const src = await h.source({ guest, args: ['--capabilities', 'return-path,multifd', ...multifd] });
    const before = fdsAndThreads(src.pid);
    for (const how of ['cancel', 'kill'] as const) {
      const dst = await h.destination({ incoming: 'tcp', guest, capabilities: ['multifd'], args: multifd, name: `dst-${how}` });
      await src.execute('migrate', { uri: dst.incomingUri });
      await waitForStatus(src, 'active', { timeoutMs: 10_000 });
      process.kill(dst.pid, 'SIGSTOP');
      // Every socket full: what the source has handed out stops growing.
      let last = -1;
      await until(async () => {
        const sent = (await queryMigrate(src)).ram?.transferred ?? 0;
        const stalled = sent === last;
        last = sent;
        return stalled;
      }, 'the channels to fill');
      assert.ok(last < 256 * MiB, `the frozen destination stopped the migration part-way (${last} bytes handed out)`);
      if (how === 'cancel') {
        await src.execute('migrate_cancel');
        await waitForStatus(src, 'cancelled', { timeoutMs: 10_000 });
        process.kill(dst.pid, 'SIGKILL');
      } else {
        process.kill(dst.pid, 'SIGKILL');
        const info = await waitForStatus(src, 'failed', { timeoutMs: 30_000 });
        assert.match(info['error-desc'] ?? '', /channel/, `the failure names a channel: ${info['error-desc']}`);
      }
      assert.equal(await queryStatus(src), 'running', `after the ${how}, the guest runs`);
      await until(() => {
        const now = fdsAndThreads(src.pid);
        return now.fds <= before.fds && now.threads <= before.threads;
      }, `the source's descriptors and threads back to ${JSON.stringify(before)} after the ${how} (now ${JSON.stringify(fdsAndThreads(src.pid))})`);
    }
    const dst = await h.destination({ incoming: 'tcp', paused: true, guest, capabilities: ['multifd'], args: multifd, name: 'dst-last' });
    await src.execute('migrate', { uri: dst.incomingUri });
    await waitForStatus(src, 'completed', { timeoutMs: 60_000 });
    await waitForStatus(dst, 'completed', { timeoutMs: 10_000 });
    const { destination } = await assertSameRam(src, dst);
    assert.equal(destination.pattern.consistent, true, `pattern ${JSON.stringify(destination.pattern)}`);
  }));

test('a source migrated again and again (one stream, multifd 2, multifd 4, three times over) reuses its send slabs: what it allocates stops growing after the first round', { timeout: 300_000 }, () =>
  withHarness(async (h) => {
    const guest = ['--block', 'm0:32M', '--machine', 'none', '--qemu-devices-only'];
    const src = await h.source({ guest: [...guest, '--fill', 'random'], args: ['--capabilities', 'return-path'] });
    const allocatedAfterRound: { main: number; multifd: number }[] = [];
    for (let round = 0; round < 3; round++) {
      for (const channels of [0, 2, 4]) {
        const dst = await h.destination({
          incoming: 'tcp',
          guest,
          ...(channels > 0 ? { capabilities: ['multifd'], args: ['--parameters', `multifd-channels=${channels}`] } : {}),
        });
        await src.execute('migrate-set-capabilities', { capabilities: [{ capability: 'multifd', state: channels > 0 }] });
        if (channels > 0) await src.execute('migrate-set-parameters', { 'multifd-channels': channels });
        const before = (await src.execute<{ 'x-slabs'?: Record<string, number> }>('query-migrate'))['x-slabs'];
        await src.execute('migrate', { uri: dst.incomingUri });
        const info = (await waitForStatus(src, ['completed', 'failed'])) as MigrationInfo & { 'x-slabs'?: Record<string, number> };
        assert.equal(info.status, 'completed', `round ${round + 1}, ${channels} channels: ${info['error-desc']}`);
        if (channels > 0) assert.ok(info.ram!['multifd-bytes'] > 0, 'the pages went on the multifd channels');
        const slabs = info['x-slabs'];
        assert.ok(slabs !== undefined, `query-migrate has x-slabs: ${JSON.stringify(info)}`);
        // Slabs of the other kind were all back in their pool before this migration began.
        if (before !== undefined && channels === 0) assert.equal(before['multifd-free'], before['multifd-allocated'], 'every multifd slab was free between migrations');
        if (channels > 0) assert.equal(slabs['main-free'], slabs['main-allocated'], 'every main-channel slab is free once the migration is over');
        await waitForStatus(dst, 'completed', { timeoutMs: 30_000 });
        await dst.execute('quit').catch(() => {});
        await dst.waitForExit(15_000);
        if (channels === 4) allocatedAfterRound.push({ main: slabs['main-allocated']!, multifd: slabs['multifd-allocated']! });
      }
    }
    const [first, ...later] = allocatedAfterRound;
    assert.ok(first!.main > 0 && first!.multifd > 0, `slabs were used: ${JSON.stringify(first)}`);
    // A later round that backs up further than the first may take a slab or two more; a slab lost per
    // migration would take 6 more main slabs and 12 more multifd ones over the next two rounds.
    for (const [i, a] of later.entries()) {
      const seen = `after round ${i + 2}: ${JSON.stringify(a)}, after round 1: ${JSON.stringify(first)}`;
      assert.ok(a.main <= first!.main + 2, `main-channel slabs allocated stop growing (${seen})`);
      assert.ok(a.multifd <= first!.multifd + 4, `multifd slabs allocated stop growing (${seen})`);
    }
  }));
