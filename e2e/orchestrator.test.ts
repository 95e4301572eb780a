// What an orchestrator (libvirt) uses besides plain migrate, between real livemig processes:
// pause-before-switchover with migrate-continue and migrate_cancel, capabilities set on a
// destination that already listens, and migrate / migrate-incoming given `channels` instead of `uri`.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import net from 'node:net';
import { assertSameRam, MiB, queryStatus, setCapabilities, waitForStatus } from './helpers/migration.ts';
import { migrateIntoPostcopy, SLOW_POSTCOPY, stopAndCheckPattern, waitBothCompleted } from './helpers/postcopy.ts';
import { withHarness } from './helpers/processes.ts';

const GUEST = ['-m', '32M', '--workload', 'incrementer'];
/** A last-resort bound per test (every wait inside is bounded far below it). */
const T = { timeout: 120_000 };
/** Short stall deadlines on both sides: the hold below outlasts them, so only keepalive traffic keeps the link. */
const STALL = ['--parameters', 'x-livemig-stall-timeout=2000'];

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
    // Held well past the stall deadline: the source's PINGs and the destination's PONGs keep both ends alive.
    await new Promise((r) => setTimeout(r, 5_000));
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

test('a listening destination takes capabilities (postcopy-ram, return-path) set after it started, and a postcopy migration uses them', T, () =>
  withHarness(async (h) => {
    const guest = ['-m', '64M', '--workload', 'incrementer:200'];
    // As libvirt does: start listening first, configure afterwards.
    const dst = await h.destination({ incoming: 'tcp', guest });
    assert.ok((await dst.execute<{ 'socket-address'?: unknown }>('query-migrate'))['socket-address'] !== undefined, 'listening');
    await setCapabilities(dst, ['postcopy-ram', 'return-path', 'events']);
    const caps = await dst.execute<{ capability: string; state: boolean }[]>('query-migrate-capabilities');
    assert.deepEqual(caps.filter((c) => c.state).map((c) => c.capability).sort(), ['events', 'postcopy-ram', 'return-path']);
    const src = await h.source({ guest, args: ['--capabilities', 'postcopy-ram,return-path,events'] });
    await src.execute('migrate-set-parameters', SLOW_POSTCOPY);
    await migrateIntoPostcopy(src, dst, dst.incomingUri);
    await waitBothCompleted(src, dst);
    await stopAndCheckPattern(dst);
    // Set after the listen, so only the new settings can have sent this event.
    assert.ok(dst.migrationEvents().includes('postcopy-active'), `destination MIGRATION events ${JSON.stringify(dst.migrationEvents())}`);
    // The migration is over: settings change again, as they do on QEMU.
    assert.deepEqual(await dst.execute('migrate-set-capabilities', { capabilities: [{ capability: 'xbzrle', state: true }] }), {});
  }),
);

test('a listening destination takes multifd and multifd-channels set after it started; once a byte has come it refuses with QEMU\'s text', T, () =>
  withHarness(async (h) => {
    // Dirtying at well under max-bandwidth, so it converges under the switchover plan's margin.
    const guest = ['-m', '32M', '--workload', 'incrementer:20'];
    const dst = await h.destination({ incoming: 'tcp', paused: true, guest, capabilities: ['events'] });
    await setCapabilities(dst, ['multifd']);
    await dst.execute('migrate-set-parameters', { 'multifd-channels': 3 });
    const src = await h.source({ guest, args: ['--capabilities', 'return-path,multifd', '--parameters', `multifd-channels=3,max-bandwidth=${64 * MiB}`] });
    await src.execute('migrate', { uri: dst.incomingUri });
    await waitForStatus(dst, 'active');
    const refused = await dst.execute('migrate-set-capabilities', { capabilities: [{ capability: 'postcopy-ram', state: true }] }).then(
      () => 'accepted',
      (e: { desc?: string }) => String(e.desc),
    );
    assert.equal(refused, "There's a migration process in progress");
    await waitForStatus(src, 'completed');
    await waitForStatus(dst, 'completed');
    assert.ok(((await waitForStatus(src, 'completed')).ram?.['multifd-bytes'] ?? 0) > 0, 'pages went over the multifd channels');
    await assertSameRam(src, dst);
  }),
);

test('a connection that has sent a byte ends the time for settings, even before it is a whole stream header', T, () =>
  withHarness(async (h) => {
    const dst = await h.destination({ incoming: 'tcp', guest: ['-m', '16M'], args: ['--handshake-timeout', '20000'] });
    const [host, port] = dst.incomingUri.replace(/^tcp:/, '').split(':') as [string, string];
    const early = net.connect(Number(port), host);
    try {
      await new Promise<void>((resolve, reject) => early.once('connect', resolve).once('error', reject));
      // Connected but silent: still configurable.
      assert.deepEqual(await dst.execute('migrate-set-capabilities', { capabilities: [{ capability: 'postcopy-ram', state: true }] }), {});
      early.write(Buffer.from('QE'));
      const deadline = Date.now() + 10_000;
      let desc = '';
      while (Date.now() < deadline) {
        desc = await dst.execute('migrate-set-capabilities', { capabilities: [{ capability: 'events', state: true }] }).then(
          () => '',
          (e: { desc?: string }) => String(e.desc),
        );
        if (desc !== '') break;
        await new Promise((r) => setTimeout(r, 50));
      }
      assert.equal(desc, "There's a migration process in progress");
    } finally {
      early.destroy();
    }
  }),
);

test('channels instead of uri: migrate-incoming and migrate given QAPI MigrationChannel lists; both arguments at once get QEMU\'s refusal', T, () =>
  withHarness(async (h) => {
    const guest = ['-m', '32M', '--workload', 'incrementer'];
    const dst = await h.destination({ incoming: 'defer', paused: true, guest, capabilities: ['events'] });
    const path = h.path('chan.mig');
    const unix = [{ 'channel-type': 'main', addr: { transport: 'socket', type: 'unix', path } }];
    const desc = (c: typeof dst, command: string, args: Record<string, unknown>): Promise<string> =>
      c.execute(command, args).then(
        () => assert.fail(`${command} accepted`),
        (e: { desc?: string }) => String(e.desc),
      );
    assert.equal(await desc(dst, 'migrate-incoming', { uri: `unix:${path}`, channels: unix }), "need either 'uri' or 'channels' argument");
    assert.equal(await desc(dst, 'migrate-incoming', { channels: [{ 'channel-type': 'main', addr: { transport: 'socket', type: 'unix' } }] }), "Parameter 'channels[0].addr.path' is missing");
    assert.deepEqual(await dst.execute('migrate-incoming', { channels: unix }), {});
    const listening = await dst.execute<{ 'socket-address'?: unknown }>('query-migrate');
    assert.deepEqual(listening['socket-address'], [{ type: 'unix', path }]);

    const src = await h.source({ guest, args: ['--capabilities', 'events,return-path'] });
    assert.equal(await desc(src, 'migrate', {}), "need either 'uri' or 'channels' argument");
    assert.equal(await desc(src, 'migrate', { uri: `unix:${path}`, channels: unix }), "need either 'uri' or 'channels' argument");
    assert.deepEqual(await src.execute('query-migrate'), {}, 'a refused migrate starts nothing');
    assert.deepEqual(await src.execute('migrate', { channels: unix }), {});
    await waitForStatus(src, 'completed');
    await waitForStatus(dst, 'completed');
    await assertSameRam(src, dst);
  }),
);

test('switchover-ack: the destination acknowledges at OPEN_RETURN_PATH (no device asks); a source whose destination never acknowledges does not switch over', T, () =>
  withHarness(async (h) => {
    // No VFIO device (it asks for the ack: e2e/vfio.test.ts), and its INIT_DATA_SENT would fail a
    // destination without the capability, as QEMU's loader does.
    const guest = ['-m', '32M', '--workload', 'incrementer', '--qemu-devices-only'];
    const dst = await h.destination({ incoming: 'tcp', paused: true, guest, capabilities: ['events', 'return-path', 'switchover-ack'] });
    const src = await h.source({ guest, args: ['--capabilities', 'events,return-path,switchover-ack'] });
    await src.execute('migrate', { uri: dst.incomingUri });
    await waitForStatus(src, 'completed');
    await waitForStatus(dst, 'completed');
    await assertSameRam(src, dst);
    assert.match(dst.output(), /"ackDevices":0,[^\n]*switchover acknowledged/);

    // A destination without the capability sends no ack: the source converges and keeps iterating.
    const silent = await h.destination({ name: 'dst-noack', incoming: 'tcp', guest, capabilities: ['events'] });
    const waiting = await h.source({ name: 'src-noack', guest, args: ['--capabilities', 'events,return-path,switchover-ack'] });
    await waiting.execute('migrate', { uri: silent.incomingUri });
    await waitForStatus(waiting, 'active');
    const before = await waitForStatus(waiting, 'active');
    await new Promise((r) => setTimeout(r, 3_000));
    const after = await waitForStatus(waiting, 'active');
    assert.equal(after.status, 'active', 'no switchover without SWITCHOVER_ACK');
    assert.ok((after.ram?.['dirty-sync-count'] ?? 0) > (before.ram?.['dirty-sync-count'] ?? 0), 'still iterating');
    assert.equal(await queryStatus(waiting), 'running', 'the guest was never stopped');
    await waiting.execute('migrate_cancel');
    await waitForStatus(waiting, 'cancelled');
  }),
);

test('switchover-ack needs return-path (QEMU\'s text)', T, () =>
  withHarness(async (h) => {
    // livemig-source has return-path on by default: turned off here to meet QEMU's check.
    const src = await h.source({ guest: ['-m', '16M'], args: ['--capabilities', 'return-path=off'] });
    const desc = await src.execute('migrate-set-capabilities', { capabilities: [{ capability: 'switchover-ack', state: true }] }).then(
      () => 'accepted',
      (e: { desc?: string }) => String(e.desc),
    );
    assert.equal(desc, "Capability 'switchover-ack' requires capability 'return-path'");
  }),
);

test('pause-before-switchover with postcopy: held in pre-switchover at migrate-start-postcopy\'s switch, then straight to postcopy-active (as QEMU 7.2)', T, () =>
  withHarness(async (h) => {
    const guest = ['-m', '64M', '--workload', 'incrementer:200'];
    const dst = await h.destination({ incoming: 'tcp', guest, capabilities: ['postcopy-ram', 'events'] });
    const src = await h.source({ guest, args: ['--capabilities', 'postcopy-ram,events,pause-before-switchover'] });
    await src.execute('migrate-set-parameters', SLOW_POSTCOPY);
    await src.execute('migrate', { uri: dst.incomingUri });
    await waitForStatus(src, 'active');
    await src.execute('migrate-start-postcopy');
    await waitForStatus(src, 'pre-switchover');
    assert.equal(await queryStatus(src), 'finish-migrate');
    assert.equal((await waitForStatus(dst, 'active')).status, 'active', 'the destination has not started listening');
    await src.execute('migrate-continue', { state: 'pre-switchover' });
    await waitBothCompleted(src, dst);
    await stopAndCheckPattern(dst);
    assert.deepEqual(src.migrationEvents(), ['setup', 'active', 'pre-switchover', 'postcopy-active', 'completed']);
  }),
);

test('migrate-continue on a destination: its outgoing migration is none, as QEMU says', T, () =>
  withHarness(async (h) => {
    const dst = await h.destination({ incoming: 'defer', guest: ['-m', '16M'] });
    const desc = await dst.execute('migrate-continue', { state: 'pre-switchover' }).then(() => 'accepted', (e: { desc?: string }) => String(e.desc));
    assert.equal(desc, 'Migration not in expected state: none');
    const bad = await dst.execute('migrate-continue', { state: 'paused' }).then(() => 'accepted', (e: { desc?: string }) => String(e.desc));
    assert.equal(bad, "Parameter 'state' does not accept value 'paused'");
  }),
);
