// What an orchestrator (libvirt) uses besides plain migrate, between real livemig processes:
// pause-before-switchover with migrate-continue and migrate_cancel, capabilities set on a
// destination that already listens, and migrate / migrate-incoming given `channels` instead of `uri`.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { assertSameRam, queryStatus, setCapabilities, waitForStatus } from './helpers/migration.ts';
import { withHarness } from './helpers/processes.ts';

const GUEST = ['-m', '32M', '--workload', 'incrementer'];
/** A last-resort bound per test (every wait inside is bounded far below it). */
const T = { timeout: 120_000 };
/** Short stall deadlines on both sides: the hold below outlasts them, so only keepalive traffic keeps the link. */
const STALL = ['--parameters', 'x-livemig-stall-timeout=1000'];

test('pause-before-switchover: the source stops its guest in pre-switchover, holds past both stall deadlines, and goes on at migrate-continue', T, () =>
  withHarness(async (h) => {
    const dst = await h.destination({ incoming: 'tcp', paused: true, guest: GUEST, capabilities: ['events'], args: STALL });
    const src = await h.source({ guest: GUEST, args: ['--capabilities', 'events,return-path,pause-before-switchover', ...STALL] });
    const refused = (state: string): Promise<string> =>
      src.execute('migrate-continue', { state }).then(
        () => assert.fail('migrate-continue accepted'),
        (e: { desc?: string }) => String(e.desc),
      );
    assert.equal(await refused('pre-switchover'), 'Migration not in expected state: none', 'QEMU text before any migration');
    await src.execute('migrate', { uri: dst.incomingUri });
    await waitForStatus(src, 'pre-switchover');
    assert.equal(await queryStatus(src), 'finish-migrate', 'the guest is stopped while held');
    // Held three times the stall deadline: the source's PINGs and the destination's PONGs keep both ends alive.
    await new Promise((r) => setTimeout(r, 3_000));
    assert.equal((await waitForStatus(src, 'pre-switchover')).status, 'pre-switchover');
    assert.equal((await waitForStatus(dst, 'active')).status, 'active', 'the destination still waits for the rest');
    assert.equal(await refused('active'), 'Migration not in expected state: pre-switchover');
    assert.deepEqual(await src.execute('migrate-continue', { state: 'pre-switchover' }), {});
    await waitForStatus(src, 'completed');
    await waitForStatus(dst, 'completed');
    assert.deepEqual(src.migrationEvents(), ['setup', 'active', 'pre-switchover', 'device', 'completed']);
    await assertSameRam(src, dst);
  }),
);

test('pause-before-switchover: migrate_cancel in pre-switchover cancels, and the source guest runs again', T, () =>
  withHarness(async (h) => {
    const dst = await h.destination({ incoming: 'tcp', guest: GUEST, capabilities: ['events'] });
    const src = await h.source({ guest: GUEST, args: ['--capabilities', 'events,pause-before-switchover'] });
    await src.execute('migrate', { uri: dst.incomingUri });
    await waitForStatus(src, 'pre-switchover');
    await src.execute('migrate_cancel');
    await waitForStatus(src, 'cancelled');
    assert.equal(await queryStatus(src), 'running');
    assert.deepEqual(src.migrationEvents(), ['setup', 'active', 'pre-switchover', 'cancelling', 'cancelled']);
    await waitForStatus(dst, 'failed');
  }),
);
