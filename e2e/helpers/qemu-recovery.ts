// Postcopy recovery with a real QEMU (7.2 or 10.0, chosen by the importing test file as for
// qemu-interop.ts), both directions: a postcopy migration whose link breaks (a TcpProxy in the
// middle is cut, or `migrate-pause`), both sides in postcopy-paused, then `migrate-recover` on
// the destination and `migrate resume=true` on the source; the migration completes and the
// destination's RAM equals the source's byte for byte. With and without postcopy-preempt (whose
// channel is re-opened on recovery: 7.2's destination waits for it before it resumes).
//
// Run: pnpm build && node --import tsx --test --test-name-pattern recovery e2e/qemu-7.2-interop.test.ts

import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { test, type TestContext } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { digest, MiB, queryMigrate, queryStatus, setCapabilities, waitForStatus } from './migration.ts';
import { TcpProxy, waitForNthMigrationEvent } from './postcopy.ts';
import { type Child, listeningAddress, unusedPort, withHarness } from './processes.ts';
import { PAGE, QEMU_LABEL, qemuM0, qemuSkip, ramImage, sha256, startQemu, writeRamImage } from './qemu.ts';

const SIZE = 16 * MiB;
const M0_GUEST = ['--block', 'm0:16M', '--machine', 'none', '--qemu-devices-only'];
const IS_10 = QEMU_LABEL === 'QEMU 10.0';
const LIVEMIG_DIALECT = IS_10 ? ['--qemu-version', '10.0'] : [];
const opts = { skip: qemuSkip(), timeout: 120_000 };
const IMAGE = ramImage(SIZE, { stride: 2, dataEnd: 8 * MiB });
const IMAGE_SHA = sha256(IMAGE);
/** Postcopy at 1 MiB/s: 16 MiB take far longer than the break and the recovery. */
const POSTCOPY_RATE = 1 * MiB;

const log = (t: TestContext, msg: string): void => t.diagnostic(msg);

type Break = 'cut' | 'migrate-pause';

/**
 * Break the link of a migration in postcopy: cut every connection through `proxy`, or
 * `migrate-pause` (out-of-band, as management tools send it) on `pauser`.
 */
async function breakLink(how: Break, proxy: TcpProxy, pauser: Child): Promise<void> {
  if (how === 'cut') proxy.cut();
  else assert.deepEqual(await pauser.qmp.execute('migrate-pause', undefined, { oob: true, timeoutMs: 10_000 }), {});
}

/** Both ends report postcopy-paused (each within 20 s). */
async function waitPaused(src: Child, dst: Child): Promise<void> {
  await Promise.all([waitForStatus(src, 'postcopy-paused', { timeoutMs: 20_000, intervalMs: 20 }), waitForStatus(dst, 'postcopy-paused', { timeoutMs: 20_000, intervalMs: 20 })]);
}

/** destination migrate-recover on a fresh port, then source migrate resume=true to it. */
async function recoverOn(src: Child, dst: Child): Promise<string> {
  const uri = `tcp:127.0.0.1:${await unusedPort()}`;
  assert.deepEqual(await dst.qmp.execute('migrate-recover', { uri }, { oob: true, timeoutMs: 10_000 }), {});
  assert.deepEqual(await src.execute('migrate', { uri, resume: true }), {});
  return uri;
}

const CASES: { preempt: boolean; how: Break }[] = [
  { preempt: false, how: 'cut' },
  { preempt: true, how: 'migrate-pause' },
];

// ─── QEMU source → livemig destination ──────────────────────────────────────────────────────

for (const { preempt, how } of CASES) {
  test(`${QEMU_LABEL} source → livemig destination, postcopy recovery${preempt ? ' with postcopy-preempt' : ''} after ${how === 'cut' ? 'the link is cut' : "migrate-pause on QEMU"}: both pause, migrate-recover + resume, RAM equals the image`, opts, (t) =>
    withHarness(async (h) => {
      const img = h.path('m0.img');
      await writeRamImage(img, IMAGE);
      const qemu = await startQemu(h, 'qemu-src', qemuM0({ file: img }, SIZE));
      const caps = preempt ? ['events', 'postcopy-ram', 'postcopy-preempt'] : ['events', 'postcopy-ram'];
      const dst = await h.destination({ incoming: 'tcp', guest: [...M0_GUEST, '--workload', 'scan:50'], capabilities: caps });
      const proxy = await TcpProxy.start(dst.incomingUri);
      try {
        await qemu.execute('cont');
        await setCapabilities(qemu, caps);
        await qemu.execute('migrate-set-parameters', { 'max-bandwidth': 1048576, 'max-postcopy-bandwidth': POSTCOPY_RATE });
        await qemu.execute('migrate', { uri: proxy.uri });
        await sleep(500);
        assert.equal((await queryMigrate(qemu)).status, 'active', 'still in precopy when postcopy is started');
        await qemu.execute('migrate-start-postcopy');
        await waitForStatus(dst, 'postcopy-active', { timeoutMs: 15_000, intervalMs: 20 });
        await waitForStatus(qemu, 'postcopy-active', { timeoutMs: 15_000, intervalMs: 20 });
        await sleep(300);

        await breakLink(how, proxy, qemu);
        await waitPaused(qemu, dst);
        const pausedAt = (await queryMigrate(qemu)).ram?.transferred ?? 0;
        assert.ok(pausedAt < SIZE, `QEMU had sent ${pausedAt} B of ${SIZE} when the link broke`);

        const uri = await recoverOn(qemu, dst);
        const q = await waitForStatus(qemu, 'completed', { timeoutMs: 60_000 });
        const d = await waitForStatus(dst, 'completed', { timeoutMs: 15_000 });
        await waitForNthMigrationEvent(dst, 'postcopy-recover', 1);
        assert.ok(qemu.migrationEvents().includes('postcopy-recover'), `QEMU MIGRATION events ${qemu.migrationEvents()}`);
        assert.equal(await queryStatus(dst), 'running', 'destination guest runs after the recovered postcopy');
        await dst.execute('stop');
        const dg = await digest(dst);
        assert.equal(dg.blocks[0]!.sha256, IMAGE_SHA, 'destination m0 = the QEMU RAM image');
        log(t, `recovered over ${uri}; QEMU events ${qemu.migrationEvents().join(' → ')}; destination events ${dst.migrationEvents().join(' → ')}`);
        log(t, `QEMU total-time ${q['total-time']} ms, postcopy-requests ${q.ram?.['postcopy-requests']}; destination postcopy-faults ${(d as { 'postcopy-faults'?: number })['postcopy-faults']}`);
      } finally {
        await proxy.close();
      }
    }),
  );
}

// ─── livemig source → QEMU destination ──────────────────────────────────────────────────────

for (const { preempt, how } of CASES) {
  test(`livemig source → ${QEMU_LABEL} destination, postcopy recovery${preempt ? ' with postcopy-preempt' : ''} after ${how === 'cut' ? 'the link is cut' : 'migrate-pause on QEMU'}: both pause, migrate-recover + resume, QEMU's RAM equals the source`, opts, (t) =>
    withHarness(async (h) => {
      // Postcopy destinations need anonymous/memfd RAM (userfaultfd on a regular file fails in 7.2).
      const qemu = await startQemu(h, 'qemu-dst', [...qemuM0('memfd', SIZE), '-S', '-incoming', 'defer']);
      const caps = preempt ? ['events', 'postcopy-ram', 'postcopy-preempt'] : ['events', 'postcopy-ram'];
      await setCapabilities(qemu, caps);
      await qemu.execute('migrate-incoming', { uri: 'tcp:127.0.0.1:0' });
      const proxy = await TcpProxy.start(await listeningAddress(qemu, 10_000));
      try {
        const src = await h.source({
          guest: [...M0_GUEST, ...LIVEMIG_DIALECT, '-S', '--fill', 'mixed'],
          args: ['--capabilities', caps.join(','), '--parameters', `max-bandwidth=2097152,max-postcopy-bandwidth=${POSTCOPY_RATE}`],
        });
        const before = await digest(src);
        await src.execute('migrate', { uri: proxy.uri });
        await sleep(500);
        assert.equal((await queryMigrate(src)).status, 'active', 'still in precopy when postcopy is started');
        await src.execute('migrate-start-postcopy');
        await waitForStatus(qemu, 'postcopy-active', { timeoutMs: 15_000, intervalMs: 20 });
        await waitForStatus(src, 'postcopy-active', { timeoutMs: 15_000, intervalMs: 20 });
        await sleep(300);

        await breakLink(how, proxy, qemu);
        await waitPaused(src, qemu);
        const pausedAt = (await queryMigrate(src)).ram?.transferred ?? 0;
        assert.ok(pausedAt < SIZE, `the source had sent ${pausedAt} B of ${SIZE} when the link broke`);

        // A page far beyond what was sent: QEMU asks for it again once recovered.
        const FAULT_AT = 15 * MiB;
        const uri = await recoverOn(src, qemu);
        await qemu.execute('pmemsave', { val: FAULT_AT, size: PAGE, filename: h.path('page.bin') }, 30_000);
        const s = await waitForStatus(src, 'completed', { timeoutMs: 60_000 });
        await waitForStatus(qemu, 'completed', { timeoutMs: 15_000 });
        await waitForNthMigrationEvent(src, 'postcopy-recover', 1);
        assert.ok(qemu.migrationEvents().includes('postcopy-recover'), `QEMU MIGRATION events ${qemu.migrationEvents()}`);
        const all = h.path('all.bin');
        await qemu.execute('pmemsave', { val: 0, size: SIZE, filename: all }, 20_000);
        const ram = await readFile(all);
        assert.equal(sha256(ram), before.blocks[0]!.sha256, "QEMU's m0 = the livemig source's RAM");
        assert.ok((await readFile(h.path('page.bin'))).equals(ram.subarray(FAULT_AT, FAULT_AT + PAGE)), 'the page faulted on after recovery holds the final bytes');
        log(t, `recovered over ${uri}; source events ${src.migrationEvents().join(' → ')}; QEMU events ${qemu.migrationEvents().join(' → ')}`);
        log(t, `livemig source total-time ${s['total-time']} ms, postcopy-requests ${s.ram?.['postcopy-requests']}`);
      } finally {
        await proxy.close();
      }
    }),
  );
}
