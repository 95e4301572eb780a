// Postcopy recovery with a real QEMU (7.2 or 10.0, chosen by the importing test file as for
// qemu-interop.ts), both directions: a postcopy migration whose link breaks (a TcpProxy in the
// middle is cut, or `migrate-pause`), both sides in postcopy-paused, then `migrate-recover` on
// the destination and `migrate resume=true` on the source; the migration completes and the
// destination's RAM equals the source's byte for byte. With and without postcopy-preempt, whose
// channel is set up as the dialect says (StreamDialect.preemptSetup): QEMU 7.2's setup opens it
// with the main channel and again right after the recovery's main channel (7.2's destination
// waits for both before it resumes), the 8.0 setup at the switch to postcopy and, on recovery,
// after the received bitmaps. Every connection goes through a TcpProxy, which counts them.
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
import { parseQemuVersion, streamDialect } from '@livemig/protocol';

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

/**
 * MIGRATION events from the first postcopy-paused on. QEMU's differ by version: 10.0's source
 * passes postcopy-recover-setup (9.1+) while it connects, and 10.0's destination no longer
 * reports setup on migrate-recover. livemig reports as 7.2 does, whatever dialect it speaks.
 */
function fromPause(c: Child): string[] {
  const all = c.migrationEvents();
  return all.slice(all.indexOf('postcopy-paused'));
}
const QEMU_SOURCE_RECOVERY = IS_10
  ? ['postcopy-paused', 'postcopy-recover-setup', 'postcopy-recover', 'postcopy-active', 'completed']
  : ['postcopy-paused', 'postcopy-recover', 'postcopy-active', 'completed'];
const QEMU_DESTINATION_RECOVERY = IS_10
  ? ['postcopy-paused', 'postcopy-recover', 'postcopy-active', 'completed']
  : ['postcopy-paused', 'setup', 'postcopy-recover', 'postcopy-active', 'completed'];
const LIVEMIG_SOURCE_RECOVERY = ['postcopy-paused', 'postcopy-recover', 'postcopy-active', 'completed'];
const LIVEMIG_DESTINATION_RECOVERY = ['postcopy-paused', 'setup', 'postcopy-recover', 'postcopy-active', 'completed'];

/** Both ends report postcopy-paused (each within 20 s). */
async function waitPaused(src: Child, dst: Child): Promise<void> {
  await Promise.all([waitForStatus(src, 'postcopy-paused', { timeoutMs: 20_000, intervalMs: 20 }), waitForStatus(dst, 'postcopy-paused', { timeoutMs: 20_000, intervalMs: 20 })]);
}

/** RAM_SAVE_FLAG_EOS as a bare be64 word: how QEMU 7.2's preempt setup ends the preempt channel. */
const PREEMPT_EOS = Buffer.from([0, 0, 0, 0, 0, 0, 0, 0x10]);

/**
 * destination migrate-recover on a fresh port, then source migrate resume=true to a proxy in
 * front of it (the caller closes the proxy). `tails`: the last 8 bytes the source sent on each
 * connection, in accept order.
 */
async function recoverVia(src: Child, dst: Child): Promise<{ proxy: TcpProxy; tails: Buffer[] }> {
  const uri = `tcp:127.0.0.1:${await unusedPort()}`;
  assert.deepEqual(await dst.qmp.execute('migrate-recover', { uri }, { oob: true, timeoutMs: 10_000 }), {});
  const proxy = await TcpProxy.start(uri);
  const tails: Buffer[] = [];
  proxy.onAccept(({ client }) => {
    const i = tails.push(Buffer.alloc(0)) - 1;
    client.on('data', (chunk: Buffer) => {
      tails[i] = Buffer.concat([tails[i]!, chunk.subarray(-8)]).subarray(-8);
    });
  });
  assert.deepEqual(await src.execute('migrate', { uri: proxy.uri, resume: true }), {});
  return { proxy, tails };
}

/**
 * The preempt channel ends in an EOS in QEMU 7.2's setup only: checked on QEMU as the source,
 * the oracle for dialect.ts's preemptSetup.
 */
function assertPreemptEnd(c: RecoveryCase, tails: Buffer[], who: string): void {
  if (c.preempt === undefined) return;
  const tail = tails[1]!;
  if (c.preempt.setup === '7.2') assert.ok(tail.equals(PREEMPT_EOS), `${who} ended its preempt channel with an EOS (7.2 setup): ${tail.toString('hex')}`);
  else assert.ok(!tail.equals(PREEMPT_EOS), `${who} wrote no EOS at the end of its preempt channel (8.0 setup): ${tail.toString('hex')}`);
}

/** The preempt setup of `-machine none` (unversioned: the running QEMU's own) for this QEMU. */
const OWN_SETUP = streamDialect('none', parseQemuVersion(IS_10 ? '10.0' : '7.2')).preemptSetup;

interface RecoveryCase {
  how: Break;
  /** postcopy-preempt, and the setup both sides use. */
  preempt?: { setup: '7.2' | '8.0'; livemig: string[]; qemu: string[]; name: string };
}

const CASES: RecoveryCase[] = [
  { how: 'cut' },
  { how: 'migrate-pause', preempt: { setup: OWN_SETUP, livemig: LIVEMIG_DIALECT, qemu: [], name: `postcopy-preempt (${OWN_SETUP} setup)` } },
  // QEMU 10.0 keeps 7.2's setup for machine types up to 7.2 (hw_compat_7_2: x-preempt-pre-7-2);
  // livemig speaking 7.2 uses it too.
  ...(IS_10 ? [{ how: 'cut' as const, preempt: { setup: '7.2' as const, livemig: [], qemu: ['-global', 'migration.x-preempt-pre-7-2=on'], name: "postcopy-preempt (7.2 setup, QEMU told so)" } }] : []),
];

/**
 * Connections through `proxy` while precopy runs (and the main one was accepted) and once
 * postcopy runs: the preempt channel comes with the main one in 7.2's setup, at postcopy in 8.0's.
 */
function preemptConnectionsAt(c: RecoveryCase, phase: 'precopy' | 'postcopy'): number {
  if (c.preempt === undefined) return 1;
  return phase === 'postcopy' || c.preempt.setup === '7.2' ? 2 : 1;
}

// ─── QEMU source → livemig destination ──────────────────────────────────────────────────────

for (const c of CASES) {
  const { how, preempt } = c;
  test(`${QEMU_LABEL} source → livemig destination, postcopy recovery${preempt ? ` with ${preempt.name}` : ''} after ${how === 'cut' ? 'the link is cut' : 'migrate-pause on QEMU'}: both pause, migrate-recover + resume, RAM equals the image`, opts, (t) =>
    withHarness(async (h) => {
      const img = h.path('m0.img');
      await writeRamImage(img, IMAGE);
      const qemu = await startQemu(h, 'qemu-src', [...qemuM0({ file: img }, SIZE), ...(preempt?.qemu ?? [])]);
      const caps = preempt ? ['events', 'postcopy-ram', 'postcopy-preempt'] : ['events', 'postcopy-ram'];
      const dst = await h.destination({ incoming: 'tcp', guest: [...M0_GUEST, '--workload', 'scan:50'], capabilities: caps });
      const proxy = await TcpProxy.start(dst.incomingUri);
      let recovery: TcpProxy | undefined;
      try {
        await qemu.execute('cont');
        await setCapabilities(qemu, caps);
        await qemu.execute('migrate-set-parameters', { 'max-bandwidth': 1048576, 'max-postcopy-bandwidth': POSTCOPY_RATE });
        await qemu.execute('migrate', { uri: proxy.uri });
        await sleep(500);
        assert.equal((await queryMigrate(qemu)).status, 'active', 'still in precopy when postcopy is started');
        await proxy.waitForConnections(preemptConnectionsAt(c, 'precopy'));
        assert.equal(proxy.pairs.length, preemptConnectionsAt(c, 'precopy'), 'connections from QEMU in precopy');
        await qemu.execute('migrate-start-postcopy');
        await waitForStatus(dst, 'postcopy-active', { timeoutMs: 15_000, intervalMs: 20 });
        await waitForStatus(qemu, 'postcopy-active', { timeoutMs: 15_000, intervalMs: 20 });
        await sleep(300);
        await proxy.waitForConnections(preemptConnectionsAt(c, 'postcopy'));
        assert.equal(proxy.pairs.length, preemptConnectionsAt(c, 'postcopy'), 'connections from QEMU in postcopy');

        await breakLink(how, proxy, qemu);
        await waitPaused(qemu, dst);
        const paused = await queryMigrate(dst);
        const placedBefore = (paused as { 'x-postcopy-preempt-pages'?: number })['x-postcopy-preempt-pages'] ?? 0;

        const resumed = await recoverVia(qemu, dst);
        recovery = resumed.proxy;
        const q = await waitForStatus(qemu, 'completed', { timeoutMs: 60_000 });
        const d = await waitForStatus(dst, 'completed', { timeoutMs: 15_000 });
        await waitForNthMigrationEvent(dst, 'completed', 1);
        await waitForNthMigrationEvent(qemu, 'completed', 1);
        assert.deepEqual(fromPause(qemu), QEMU_SOURCE_RECOVERY, 'QEMU MIGRATION events from the pause on');
        assert.deepEqual(fromPause(dst), LIVEMIG_DESTINATION_RECOVERY, 'destination MIGRATION events from the pause on');
        assert.equal(recovery.pairs.length, preempt ? 2 : 1, 'connections from QEMU on recovery: a new main channel (and a new preempt channel)');
        assertPreemptEnd(c, resumed.tails, 'QEMU');
        assert.ok(recovery.forwarded.up > 0, 'QEMU sent over the recovery connection');
        assert.equal(await queryStatus(dst), 'running', 'destination guest runs after the recovered postcopy');
        await dst.execute('stop');
        const dg = await digest(dst);
        assert.equal(dg.blocks[0]!.sha256, IMAGE_SHA, 'destination m0 = the QEMU RAM image');
        const placed = (d as { 'x-postcopy-preempt-pages'?: number })['x-postcopy-preempt-pages'] ?? 0;
        if (preempt) assert.ok(placed > placedBefore, `pages placed from QEMU's new preempt channel after the recovery: ${placed - placedBefore}`);
        log(t, `QEMU events ${qemu.migrationEvents().join(' → ')}; destination events ${dst.migrationEvents().join(' → ')}`);
        log(
          t,
          `QEMU total-time ${q['total-time']} ms, postcopy-requests ${q.ram?.['postcopy-requests']}; destination postcopy-faults ${(d as { 'postcopy-faults'?: number })['postcopy-faults']}; ` +
            `pages placed from the preempt channel ${placedBefore} before the break, ${placed} in all; ${recovery.forwarded.up} B from QEMU after the recovery`,
        );
      } finally {
        await proxy.close();
        await recovery?.close();
      }
    }),
  );
}

// ─── livemig source → QEMU destination ──────────────────────────────────────────────────────

for (const c of CASES) {
  const { how, preempt } = c;
  test(`livemig source → ${QEMU_LABEL} destination, postcopy recovery${preempt ? ` with ${preempt.name}` : ''} after ${how === 'cut' ? 'the link is cut' : 'migrate-pause on QEMU'}: both pause, migrate-recover + resume, QEMU's RAM equals the source`, opts, (t) =>
    withHarness(async (h) => {
      // Postcopy destinations need anonymous/memfd RAM (userfaultfd on a regular file fails in 7.2).
      const qemu = await startQemu(h, 'qemu-dst', [...qemuM0('memfd', SIZE), ...(preempt?.qemu ?? []), '-S', '-incoming', 'defer']);
      const caps = preempt ? ['events', 'postcopy-ram', 'postcopy-preempt'] : ['events', 'postcopy-ram'];
      await setCapabilities(qemu, caps);
      await qemu.execute('migrate-incoming', { uri: 'tcp:127.0.0.1:0' });
      const proxy = await TcpProxy.start(await listeningAddress(qemu, 10_000));
      let recovery: TcpProxy | undefined;
      try {
        const src = await h.source({
          guest: [...M0_GUEST, ...(preempt?.livemig ?? LIVEMIG_DIALECT), '-S', '--fill', 'mixed'],
          args: ['--capabilities', caps.join(','), '--parameters', `max-bandwidth=2097152,max-postcopy-bandwidth=${POSTCOPY_RATE}`],
        });
        const before = await digest(src);
        await src.execute('migrate', { uri: proxy.uri });
        await sleep(500);
        assert.equal((await queryMigrate(src)).status, 'active', 'still in precopy when postcopy is started');
        await proxy.waitForConnections(preemptConnectionsAt(c, 'precopy'));
        assert.equal(proxy.pairs.length, preemptConnectionsAt(c, 'precopy'), 'connections from livemig in precopy');
        await src.execute('migrate-start-postcopy');
        await waitForStatus(qemu, 'postcopy-active', { timeoutMs: 15_000, intervalMs: 20 });
        await waitForStatus(src, 'postcopy-active', { timeoutMs: 15_000, intervalMs: 20 });
        await sleep(300);
        await proxy.waitForConnections(preemptConnectionsAt(c, 'postcopy'));
        assert.equal(proxy.pairs.length, preemptConnectionsAt(c, 'postcopy'), 'connections from livemig in postcopy');

        await breakLink(how, proxy, qemu);
        await waitPaused(src, qemu);
        const pausedAt = (await queryMigrate(src)).ram?.transferred ?? 0;
        assert.ok(pausedAt < SIZE, `the source had sent ${pausedAt} B of ${SIZE} when the link broke`);

        // A page far beyond what was sent: QEMU asks for it again once recovered.
        const FAULT_AT = 15 * MiB;
        const resumed = await recoverVia(src, qemu);
        recovery = resumed.proxy;
        await qemu.execute('pmemsave', { val: FAULT_AT, size: PAGE, filename: h.path('page.bin') }, 30_000);
        const s = await waitForStatus(src, 'completed', { timeoutMs: 60_000 });
        await waitForStatus(qemu, 'completed', { timeoutMs: 15_000 });
        await waitForNthMigrationEvent(src, 'completed', 1);
        await waitForNthMigrationEvent(qemu, 'completed', 1);
        assert.deepEqual(fromPause(src), LIVEMIG_SOURCE_RECOVERY, 'source MIGRATION events from the pause on');
        assert.deepEqual(fromPause(qemu), QEMU_DESTINATION_RECOVERY, 'QEMU MIGRATION events from the pause on');
        assert.equal(recovery.pairs.length, preempt ? 2 : 1, 'connections from livemig on recovery: a new main channel (and a new preempt channel)');
        const all = h.path('all.bin');
        await qemu.execute('pmemsave', { val: 0, size: SIZE, filename: all }, 20_000);
        const ram = await readFile(all);
        assert.equal(sha256(ram), before.blocks[0]!.sha256, "QEMU's m0 = the livemig source's RAM");
        assert.ok((await readFile(h.path('page.bin'))).equals(ram.subarray(FAULT_AT, FAULT_AT + PAGE)), 'the page faulted on after recovery holds the final bytes');
        log(t, `source events ${src.migrationEvents().join(' → ')}; QEMU events ${qemu.migrationEvents().join(' → ')}`);
        log(t, `livemig source total-time ${s['total-time']} ms, postcopy-requests ${s.ram?.['postcopy-requests']}`);
      } finally {
        await proxy.close();
        await recovery?.close();
      }
    }),
  );
}
