// calc-dirty-rate / query-dirty-rate (QEMU 7.2's QMP, mode page-sampling) on real livemig
// processes: a guest running the incrementer dirties memory (rate > 0), an idle one does not
// (rate 0), QEMU's refusals come with QEMU's wording, and measuring beside a running migration
// takes nothing from it (the destination still ends up with exactly the source's RAM).

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { assertSameRam, MiB, waitForStatus } from './helpers/migration.ts';
import { type Child, withHarness } from './helpers/processes.ts';
import { qemuSkip, startQemu } from './helpers/qemu.ts';

const T = { timeout: 120_000 };

interface DirtyRateInfo {
  status: string;
  'sample-pages': number;
  'dirty-rate'?: number;
  mode: string;
  'start-time': number;
  'calc-time': number;
}

/**
 * calc-dirty-rate, then query-dirty-rate until measured (bounded). `qemu`: QEMU's calc-dirty-rate
 * returns before the thread it starts has set "measuring", so right after it QEMU may still say
 * "unstarted"; livemig says "measuring" from the command's answer on.
 */
async function measure(c: Child, args: Record<string, unknown>, { qemu = false } = {}): Promise<DirtyRateInfo> {
  assert.deepEqual(await c.execute('calc-dirty-rate', args), {});
  const during = await c.execute<DirtyRateInfo>('query-dirty-rate');
  if (qemu) assert.ok(during.status === 'measuring' || during.status === 'unstarted', JSON.stringify(during));
  else assert.equal(during.status, 'measuring');
  assert.equal(during['dirty-rate'], undefined, 'no rate while measuring (as QEMU)');
  const deadline = Date.now() + 30_000 + (args['calc-time'] as number) * 1000;
  for (;;) {
    const info = await c.execute<DirtyRateInfo>('query-dirty-rate');
    if (info.status === 'measured') return info;
    if (Date.now() > deadline) assert.fail(`not measured in time: ${JSON.stringify(info)}`);
    await sleep(100);
  }
}

async function errorOf(c: Child, command: string, args: Record<string, unknown>): Promise<string | undefined> {
  return c.execute(command, args).then(
    () => undefined,
    (e: { desc?: string }) => e.desc,
  );
}

test('calc-dirty-rate: an incrementer guest dirties memory (rate > 0), an idle one does not (0)', T, (t) =>
  withHarness(async (h) => {
    const busy = await h.source({ name: 'busy', guest: ['-m', '64M', '--workload', 'incrementer:20'] });
    const idle = await h.source({ name: 'idle', guest: ['-m', '64M', '--workload', 'idle'] });
    assert.deepEqual(await busy.execute('query-dirty-rate'), { status: 'unstarted', 'sample-pages': 0, mode: 'page-sampling', 'start-time': 0, 'calc-time': 0 });
    const [b, i] = await Promise.all([measure(busy, { 'calc-time': 1 }), measure(idle, { 'calc-time': 1, 'sample-pages': 1024 })]);
    t.diagnostic(`incrementer:20 → ${b['dirty-rate']} MB/s, idle → ${i['dirty-rate']} MB/s`);
    assert.equal(b.mode, 'page-sampling');
    assert.equal(b['calc-time'], 1);
    assert.equal(b['sample-pages'], 512, "QEMU's default");
    assert.equal(i['sample-pages'], 1024);
    assert.ok(typeof b['start-time'] === 'number' && b['start-time'] > 0, 'start-time in seconds on the monotonic clock');
    assert.ok(b['dirty-rate']! > 0, `the incrementer dirties memory: ${JSON.stringify(b)}`);
    assert.equal(i['dirty-rate'], 0, `an idle guest dirties nothing: ${JSON.stringify(i)}`);
  }),
);

test("calc-dirty-rate refuses what QEMU 7.2 refuses, with QEMU's words, and one measurement at a time", T, () =>
  withHarness(async (h) => {
    const src = await h.source({ guest: ['-m', '64M'] });
    assert.equal(await errorOf(src, 'calc-dirty-rate', { 'calc-time': 0 }), 'calc-time is out of range[1, 60].');
    assert.equal(await errorOf(src, 'calc-dirty-rate', { 'calc-time': 61 }), 'calc-time is out of range[1, 60].');
    assert.equal(await errorOf(src, 'calc-dirty-rate', { 'calc-time': 1, 'sample-pages': 5 }), 'sample-pages is out of range[128, 16384].');
    assert.equal(await errorOf(src, 'calc-dirty-rate', { 'calc-time': 1, mode: 'dirty-ring' }), 'mode dirty-ring is not enabled, use other method instead.');
    assert.match((await errorOf(src, 'calc-dirty-rate', { 'calc-time': 1, mode: 'dirty-bitmap' }))!, /dirty-bitmap is not supported by livemig/);
    assert.equal(await errorOf(src, 'calc-dirty-rate', { 'calc-time': 1, mode: 'fast' }), "Parameter 'mode' does not accept value 'fast'");
    assert.deepEqual(await src.execute('calc-dirty-rate', { 'calc-time': 2 }), {});
    assert.equal(await errorOf(src, 'calc-dirty-rate', { 'calc-time': 1 }), 'the dirty rate is already being measured.');
  }),
);

test('calc-dirty-rate beside a running migration: measured, and the migration still delivers exactly the source RAM', T, (t) =>
  withHarness(async (h) => {
    const guest = ['-m', '64M', '--workload', 'incrementer:20'];
    const dst = await h.destination({ incoming: 'tcp', paused: true, guest });
    // 16 MiB/s: the migration is still running through the 1 s measurement.
    const src = await h.source({ guest, args: ['--capabilities', 'return-path', '--parameters', `max-bandwidth=${16 * MiB},downtime-limit=300`] });
    await src.execute('migrate', { uri: dst.incomingUri });
    await waitForStatus(src, 'active');
    const info = await measure(src, { 'calc-time': 1 });
    const during = await src.execute<{ status: string }>('query-migrate');
    t.diagnostic(`dirty rate during the migration: ${info['dirty-rate']} MB/s (migration ${during.status} when measured)`);
    assert.ok(info['dirty-rate']! > 0, JSON.stringify(info));
    await src.execute('migrate-set-parameters', { 'max-bandwidth': 0 });
    await waitForStatus(src, 'completed', { timeoutMs: 90_000 });
    await assertSameRam(src, dst);
  }),
);

test('the same answers as a real QEMU 7.2: query-dirty-rate before any measurement, the refusals, the measured shape', { ...T, skip: qemuSkip() }, () =>
  withHarness(async (h) => {
    const qemu = await startQemu(h, 'qemu', ['-machine', 'pc', '-m', '64', '-S']);
    const src = await h.source({ guest: ['-m', '64M'] });
    assert.deepEqual(await src.execute('query-dirty-rate'), await qemu.execute('query-dirty-rate'));
    for (const args of [{ 'calc-time': 0 }, { 'calc-time': 61 }, { 'calc-time': 1, 'sample-pages': 5 }, { 'calc-time': 1, mode: 'fast' }]) {
      assert.equal(await errorOf(src, 'calc-dirty-rate', args), await errorOf(qemu, 'calc-dirty-rate', args), JSON.stringify(args));
    }
    const [ours, theirs] = await Promise.all([measure(src, { 'calc-time': 1 }), measure(qemu, { 'calc-time': 1 }, { qemu: true })]);
    assert.deepEqual(Object.keys(ours).sort(), Object.keys(theirs).sort(), 'the same members once measured');
    assert.equal(ours['dirty-rate'], theirs['dirty-rate'], 'a stopped guest dirties nothing, in both');
  }),
);
