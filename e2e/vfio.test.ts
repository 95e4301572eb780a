// End-to-end: the VFIO device behind a v1 migration region (`livemig/vfio`, created by the guest
// unless --qemu-devices-only) moves between two livemig processes in QEMU 7.2's VFIO section
// framing, with pre-copy iterations while it keeps dirtying its own memory.
//
// Run: pnpm build && node --import tsx --test --test-concurrency=1 e2e/vfio.test.ts

import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { assertSameRam, digest, type MigrationInfo, MiB, queryMigrate, queryStatus, waitForStatus } from './helpers/migration.ts';
import { analyzeFile, livemig, withHarness } from './helpers/processes.ts';

const T = { timeout: 120_000 };
/** 20 MiB of RAM at 16 MiB/s: active for about a second, long enough to watch (an idle guest, so RAM converges; the device dirties its own memory). */
const GUEST = ['-m', '16M', '--workload', 'idle'];
const SLOW = ['--parameters', `max-bandwidth=${16 * MiB}`];

interface XVfio {
  'precopy-iterations': number;
  'precopy-bytes': number;
  'stop-copy-bytes': number;
  'config-bytes': number;
  pending: number;
  'device-state': number;
}
type VfioInfo = MigrationInfo & { vfio?: { transferred: number }; 'x-vfio'?: XVfio };
type VfioDigest = { memorySha256: string; registersSha256: string; deviceState: number };

/** Poll query-migrate until a final status; returns every answer seen while active, and the last. */
async function watch(c: Parameters<typeof queryMigrate>[0]): Promise<{ active: VfioInfo[]; last: VfioInfo }> {
  const active: VfioInfo[] = [];
  const deadline = Date.now() + 60_000;
  for (;;) {
    const info = (await queryMigrate(c)) as VfioInfo;
    if (info.status === 'active') active.push(info);
    if (info.status === 'completed' || info.status === 'failed' || info.status === 'cancelled') return { active, last: info };
    if (Date.now() > deadline) throw new Error(`no final status: ${JSON.stringify(info)}`);
    await sleep(20);
  }
}

test('VFIO v1 device: pre-copy iterations in query-migrate while active; destination device memory, registers and state equal the source', T, () =>
  withHarness(async (h) => {
    const dst = await h.destination({ incoming: 'unix', paused: true, guest: GUEST });
    const src = await h.source({ guest: GUEST, args: ['--capabilities', 'return-path', ...SLOW] });
    await sleep(200); // the device dirties its memory while it runs
    const before = (await digest(src)).devices['vfio'] as VfioDigest;
    assert.equal(before.deviceState, 1, 'source device _RUNNING');

    await src.execute('migrate', { uri: dst.incomingUri });
    const { active, last } = await watch(src);
    assert.equal(last.status, 'completed', JSON.stringify(last));

    // While active, pre-copy iterations of the device show up (with _SAVING|_RUNNING).
    const seen = active.filter((i) => (i['x-vfio']?.['precopy-iterations'] ?? 0) > 0);
    assert.ok(seen.length > 0, `no pre-copy iteration visible while active: ${JSON.stringify(active.map((i) => i['x-vfio']))}`);
    assert.ok(active.some((i) => i['x-vfio']?.['device-state'] === 3), 'device in _SAVING|_RUNNING while active');
    const x = last['x-vfio']!;
    // 4 MiB of device memory in buffers of at most 1 MiB: several iterations, and every chunk sent at least once.
    assert.ok(x['precopy-iterations'] >= 2, `precopy-iterations ${x['precopy-iterations']}`);
    assert.ok(x['precopy-bytes'] > 0, `precopy-bytes ${x['precopy-bytes']}`);
    assert.ok(last.vfio!.transferred >= 4 * MiB, `vfio.transferred ${last.vfio!.transferred}`);
    assert.equal(last.vfio!.transferred, x['precopy-bytes'] + x['stop-copy-bytes'], 'QEMU\'s vfio.transferred = pre-copy + stop-copy device data');
    assert.equal(x['config-bytes'], 256);
    assert.equal(x.pending, 0);
    assert.equal(x['device-state'], 0, 'source device _STOP after the save');

    await waitForStatus(dst, 'completed', { timeoutMs: 10_000 });
    const { source, destination } = await assertSameRam(src, dst);
    const s = source.devices['vfio'] as VfioDigest;
    const d = destination.devices['vfio'] as VfioDigest;
    assert.equal(d.memorySha256, s.memorySha256, 'device memory equal');
    assert.equal(d.registersSha256, s.registersSha256, 'device registers equal');
    assert.notEqual(s.memorySha256, before.memorySha256, 'the device wrote its memory during the migration');
    assert.equal(d.deviceState, 4, 'paused destination device _RESUMING');

    await dst.execute('cont');
    assert.equal(await queryStatus(dst), 'running');
    const after = (await digest(dst)).devices['vfio'] as VfioDigest;
    assert.equal(after.deviceState, 1, 'destination device _RUNNING once the guest runs');
  }));

test('VFIO v1 device in a stream file: livemig analyze shows setup, pre-copy iterations, stop-copy and config with their bytes', T, () =>
  withHarness(async (h) => {
    const file = h.path('vfio.mig');
    const src = await h.source({ guest: GUEST, args: SLOW });
    await sleep(200);
    await src.execute('migrate', { uri: `file:${file}` });
    const info = (await waitForStatus(src, 'completed')) as VfioInfo;
    const deadline = Date.now() + 20_000;
    let r = await analyzeFile(file);
    while ((r.code !== 0 || r.report === undefined) && Date.now() < deadline) {
      await sleep(100);
      if (existsSync(file)) r = await analyzeFile(file);
    }
    assert.equal(r.code, 0, r.stderr);
    const devices = r.report!['vfioDevices'] as { idstr: string; setupSections: number; precopyIterations: number; precopyBytes: number; stopCopyBytes: number; completeSections: number; configBytes: number }[];
    assert.equal(devices.length, 1, JSON.stringify(devices));
    const v = devices[0]!;
    assert.equal(v.idstr, 'livemig/vfio');
    assert.equal(v.setupSections, 1);
    assert.equal(v.completeSections, 1);
    assert.equal(v.configBytes, 256);
    const x = info['x-vfio']!;
    assert.equal(v.precopyIterations, x['precopy-iterations']);
    assert.equal(v.precopyBytes, x['precopy-bytes']);
    assert.equal(v.stopCopyBytes, x['stop-copy-bytes']);
    const sections = r.report!['sections'] as { idstr: string; type: string; vfio?: { phase: string } }[];
    const phases = sections.filter((s) => s.idstr === 'livemig/vfio').map((s) => s.vfio?.phase);
    assert.equal(phases[0], 'setup');
    assert.deepEqual(phases.slice(-2), ['complete', 'config']);
    assert.ok(phases.slice(1, -2).every((p) => p === 'iterate'), phases.join(','));
    // --dump state decodes the config section by the device's description; its setup, pre-copy
    // and stop-copy sections are VFIO framing, which the description does not describe.
    const dump = await livemig(['analyze', file, '--dump', 'state']);
    assert.equal(dump.code, 0, dump.stderr);
    const state = JSON.parse(dump.stdout) as Record<string, Record<string, unknown>>;
    const config = sections.find((s) => s.idstr === 'livemig/vfio' && s.vfio?.phase === 'config') as unknown as { sectionId: number; dataLength: number };
    const fields = state[`livemig/vfio (${config.sectionId})`];
    assert.ok(fields !== undefined, Object.keys(state).join(', '));
    const bytes = Object.values(fields).reduce<number>((n, v) => n + (typeof v === 'string' && v.includes(' ') ? v.split(' ').length : 0), 0);
    assert.equal(bytes, config.dataLength, JSON.stringify(fields).slice(0, 200));
  }));

test('VFIO v1 device with switchover-ack: its INIT_DATA_SENT (after what was pending at setup) is what the destination acknowledges; device state equal', T, () =>
  withHarness(async (h) => {
    const dst = await h.destination({ incoming: 'unix', paused: true, guest: GUEST, capabilities: ['return-path', 'switchover-ack'] });
    const src = await h.source({ guest: GUEST, args: ['--capabilities', 'return-path,switchover-ack', ...SLOW] });
    await src.execute('migrate', { uri: dst.incomingUri });
    const { last } = await watch(src);
    assert.equal(last.status, 'completed', JSON.stringify(last));
    // The device's 4 MiB went out in pre-copy before the switchover was allowed.
    assert.ok(last['x-vfio']!['precopy-bytes'] >= 4 * MiB, `precopy-bytes ${last['x-vfio']!['precopy-bytes']}`);
    await waitForStatus(dst, 'completed', { timeoutMs: 10_000 });
    assert.match(dst.output(), /"ackDevices":1,[^\n]*switchover acknowledged/, 'the ack waited for the one device that asks');
    const { source, destination } = await assertSameRam(src, dst);
    assert.deepEqual(destination.devices['vfio'], { ...(source.devices['vfio'] as VfioDigest), deviceState: 4 });
  }));
