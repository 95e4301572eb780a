// Issue 14 ("Trust"): a migration that survives a broken network and lets no stranger in, on
// real processes and sockets. Every wait is bounded; no assertion is about time.
//
// Run: pnpm build && node --import tsx --test --test-concurrency=1 e2e/trust.test.ts

import assert from 'node:assert/strict';
import { writeFile } from 'node:fs/promises';
import net from 'node:net';
import { test } from 'node:test';
import { assertSameRam, digest, MiB, queryMigrate, queryStatus, waitForMigration, waitForStatus } from './helpers/migration.ts';
import { TcpProxy } from './helpers/postcopy.ts';
import { type Child, listeningAddress, withHarness, within } from './helpers/processes.ts';
import { pollFinal, qemuM0, qemuSkip, ramImage, sha256File, startQemu, writeRamImage } from './helpers/qemu.ts';

/** A last-resort bound per test (every wait inside is bounded far below it). */
const T = { timeout: 120_000 };
/** The stall deadline both sides get in these tests (the parameter's minimum is 1000 ms). */
const STALL_MS = 2_000;
/** Bound on noticing a dead link: the deadline, a keepalive tick, the 5 s thread-stop bound, and a loaded machine. */
const NOTICE_MS = 20_000;

/** The destination exits non-zero and its output names the silent link. */
async function assertDestinationGaveUp(dst: Child): Promise<void> {
  const exit = await dst.waitForExit(NOTICE_MS);
  assert.notEqual(exit.code, 0, `the destination exits non-zero (code ${exit.code}, signal ${exit.signal})`);
  assert.match(dst.output(), /LM_ERR_PEER_SILENT/, 'its log names the cause');
  assert.match(dst.output(), /no data from the source for \d+ ms in precopy/);
}

for (const returnPath of [true, false]) {
  test(`precopy, silent link during the first pass${returnPath ? ' (return-path: PINGs unanswered)' : ' (no return-path: the kernel takes no more bytes)'}: the source fails with LM_ERR_PEER_SILENT and its guest runs on; the destination exits non-zero; a re-migration completes`, T, () =>
    withHarness(async (h) => {
      const guest = ['-m', '64M', '--workload', 'incrementer'];
      const params = `x-livemig-stall-timeout=${STALL_MS}`;
      const dst = await h.destination({ incoming: 'tcp', guest, capabilities: ['events'], args: ['--parameters', params] });
      // A slow first pass (4 MiB/s for 64 MiB): the freeze lands while iterating.
      const src = await h.source({
        guest,
        args: ['--capabilities', returnPath ? 'events,return-path' : 'events,return-path=off', '--parameters', `${params},max-bandwidth=${4 * MiB}`],
      });
      const proxy = await TcpProxy.start(dst.incomingUri);
      try {
        await src.execute('migrate', { uri: proxy.uri });
        await waitForMigration(src, (i) => i.status === 'active' && (i.ram?.transferred ?? 0) > MiB, 'a first MiB sent', { timeoutMs: 30_000 });
        proxy.freeze();
        const failed = await waitForStatus(src, 'failed', { timeoutMs: NOTICE_MS });
        const desc = failed['error-desc'] ?? '';
        assert.match(desc, /for \d+ ms during iterating \(x-livemig-stall-timeout 2000 ms\): link presumed broken/, desc);
        assert.match(desc, returnPath ? /nothing on the return path/ : /^no bytes taken by the link/);
        assert.equal(await queryStatus(src), 'running', 'the source guest runs on');
        await assertDestinationGaveUp(dst);
      } finally {
        await proxy.close();
      }
      // The source is intact: a fresh destination takes the guest.
      const again = await h.destination({ incoming: 'tcp', paused: true, guest, name: 'dst2' });
      await src.execute('migrate-set-parameters', { 'max-bandwidth': 0 });
      await src.execute('migrate', { uri: again.incomingUri });
      await waitForStatus(src, 'completed');
      await waitForStatus(again, 'completed', { timeoutMs: 10_000 });
      await assertSameRam(src, again);
    }));
}

test('precopy, silent link during stop-and-copy: the paused source guest runs again (no unbounded downtime), the source fails with LM_ERR_PEER_SILENT, the destination exits non-zero', T, () =>
  withHarness(async (h) => {
    // 256 MiB of random pages and a downtime limit of 10 minutes: after one throttled section
    // (8 MiB/s) the whole RAM goes in stop-and-copy, so the 64th MiB through is inside it.
    const guest = ['-m', '256M', '--fill', 'random', '--workload', 'incrementer'];
    const params = `x-livemig-stall-timeout=${STALL_MS}`;
    const dst = await h.destination({ incoming: 'tcp', guest, capabilities: ['events'], args: ['--parameters', params] });
    const src = await h.source({
      guest,
      args: ['--capabilities', 'events,return-path', '--parameters', `${params},max-bandwidth=${8 * MiB},downtime-limit=600000`],
    });
    const proxy = await TcpProxy.start(dst.incomingUri);
    try {
      proxy.freezeAfter(64 * MiB);
      await src.execute('migrate', { uri: proxy.uri });
      const failed = await waitForStatus(src, 'failed', { timeoutMs: 60_000 });
      const desc = failed['error-desc'] ?? '';
      assert.match(desc, /during stop-copy \(x-livemig-stall-timeout 2000 ms\): link presumed broken/, desc);
      assert.ok(src.events.some((e) => e.event === 'STOP'), 'the source guest was stopped for the switchover');
      assert.ok(src.events.some((e) => e.event === 'RESUME'), 'and resumed after the failure');
      assert.equal(await queryStatus(src), 'running', 'the source guest runs again');
      const info = await queryMigrate(src);
      assert.equal(info.status, 'failed');
      await assertDestinationGaveUp(dst);
    } finally {
      await proxy.close();
    }
  }));

/** A client of the incoming port that is not a source: connected, and `closed` once the destination drops it. */
async function stranger(uri: string, send?: Buffer): Promise<{ socket: net.Socket; closed: Promise<void> }> {
  const m = /^tcp:([^:]+):(\d+)$/.exec(uri);
  if (m === null) throw new Error(`not a tcp address: ${uri}`);
  const socket = net.connect(Number(m[2]), m[1]);
  socket.on('error', () => {});
  socket.resume();
  const closed = new Promise<void>((resolve) => socket.once('close', () => resolve()));
  await within(new Promise<void>((resolve) => socket.once('connect', () => resolve())), 'the stranger to connect', 10_000);
  if (send !== undefined) socket.write(send);
  return { socket, closed };
}

for (const multifd of [false, true]) {
  test(`incoming port${multifd ? ' with multifd (the extra connections follow the main one)' : ''}: a silent client and a garbage client are dropped with a logged reason, and the real source, coming after a silent one, migrates`, T, () =>
    withHarness(async (h) => {
      const guest = ['-m', '64M', '--workload', 'incrementer'];
      const dst = await h.destination({
        incoming: 'tcp',
        paused: true,
        guest,
        capabilities: multifd ? ['events', 'multifd'] : ['events'],
        args: ['--handshake-timeout', '1000', ...(multifd ? ['--parameters', 'multifd-channels=3'] : [])],
      });
      const src = await h.source({
        guest,
        args: ['--capabilities', multifd ? 'events,return-path,multifd' : 'events,return-path', ...(multifd ? ['--parameters', 'multifd-channels=3'] : [])],
      });
      const strangers: net.Socket[] = [];
      try {
        // Silent past the deadline: dropped, and the port is still open.
        const silent = await stranger(dst.incomingUri);
        strangers.push(silent.socket);
        await within(silent.closed, 'the silent client to be dropped', 15_000);
        // Not a migration stream: dropped at once.
        const garbage = await stranger(dst.incomingUri, Buffer.from('GET / HTTP/1.1\r\nHost: x\r\n\r\n'));
        strangers.push(garbage.socket);
        await within(garbage.closed, 'the garbage client to be dropped', 15_000);
        // Connected first and silent while the source comes: the source still wins the port.
        const early = await stranger(dst.incomingUri);
        strangers.push(early.socket);
        await src.execute('migrate', { uri: dst.incomingUri });
        await waitForStatus(src, 'completed');
        await waitForStatus(dst, 'completed', { timeoutMs: 10_000 });
        await within(early.closed, 'the early silent client to be dropped', 15_000);
        await assertSameRam(src, dst);
        const log = dst.output();
        assert.match(log, /dropped a connection from 127\.0\.0\.1:\d+ that is not a migration source: sent nothing within the handshake deadline \(x-livemig-handshake-timeout 1000 ms\) \[LM_ERR_PEER_SILENT\]/);
        assert.match(log, /dropped a connection from 127\.0\.0\.1:\d+ that is not a migration source: not a QEMU migration stream: magic 0x47455420, expected 0x5145564d [^\n]*\[LM_ERR_BAD_MAGIC\]/);
        assert.match(log, /connected before the source and sent no stream header before it did/);
        if (multifd) {
          const info = await queryMigrate(src);
          assert.ok((info.ram?.['multifd-bytes'] ?? 0) > 0, 'pages went on the multifd channels');
        }
      } finally {
        for (const s of strangers) s.destroy();
      }
    }));
}

for (const fault of ['link cut (both ends see the close)', 'destination killed -9 (the source sees a reset)'] as const) {
  test(`ordinary network errors are coded, never LM_ERR_INTERNAL: ${fault} during precopy → LM_ERR_CHANNEL_LOST, the source guest runs on`, T, () =>
    withHarness(async (h) => {
      const guest = ['-m', '64M', '--workload', 'incrementer'];
      const dst = await h.destination({ incoming: 'tcp', guest, capabilities: ['events'] });
      const src = await h.source({ guest, args: ['--capabilities', 'events,return-path', '--parameters', `max-bandwidth=${4 * MiB}`] });
      const proxy = await TcpProxy.start(dst.incomingUri);
      try {
        await src.execute('migrate', { uri: proxy.uri });
        await waitForMigration(src, (i) => i.status === 'active' && (i.ram?.transferred ?? 0) > MiB, 'a first MiB sent', { timeoutMs: 30_000 });
        if (fault.startsWith('link cut')) proxy.cut();
        else process.kill(dst.pid, 'SIGKILL');
        await waitForStatus(src, 'failed', { timeoutMs: NOTICE_MS });
        assert.equal(await queryStatus(src), 'running', 'the source guest runs on');
        const exit = await dst.waitForExit(NOTICE_MS);
        assert.notEqual(exit.code, 0);
        const srcLog = src.output();
        assert.match(srcLog, /"code":"LM_ERR_CHANNEL_LOST"[^\n]*migration failed/, 'the source logs the failure with its transport code');
        for (const c of [src, dst]) assert.doesNotMatch(c.output(), /LM_ERR_INTERNAL/, `${c.name} never reports a network error as internal`);
        // The destination's verdict on a stream cut mid-record is the decoder's (LM_ERR_TRUNCATED) or the link's.
        if (fault.startsWith('link cut')) assert.match(dst.output(), /"code":"LM_ERR_(CHANNEL_LOST|TRUNCATED)"[^\n]*incoming migration failed/, 'the destination logs it with its code');
      } finally {
        await proxy.close();
      }
    }));
}

test('validate-uuid, QEMU 7.2\'s cases: no UUID sent, the same UUID, a different one (refused, naming both), none at the destination; the capability off sends none', T, () =>
  withHarness(async (h) => {
    const A = '9b1deb4d-3b7d-4bad-9bdd-2b0d7b3dcb6d';
    const B = '1b4e28ba-2fa1-11d2-883f-0016d3cca427';
    const guest = ['-m', '16M', '--workload', 'incrementer'];
    const cases = [
      { name: 'source without a UUID', src: [], dst: ['--uuid', A], validate: true, ok: true },
      { name: 'the same UUID', src: ['--uuid', A.toUpperCase()], dst: ['--uuid', A], validate: true, ok: true },
      { name: 'a different UUID', src: ['--uuid', B], dst: ['--uuid', A], validate: true, ok: false },
      { name: 'no UUID at the destination', src: ['--uuid', B], dst: [], validate: true, ok: true },
      { name: 'validate-uuid off at the source', src: ['--uuid', B], dst: ['--uuid', A], validate: false, ok: true },
    ] as const;
    for (const c of cases) {
      const dst = await h.destination({ incoming: 'tcp', paused: true, guest, capabilities: ['events', 'validate-uuid'], args: [...c.dst], name: 'dst' });
      const src = await h.source({ guest, args: ['--capabilities', c.validate ? 'events,return-path,validate-uuid' : 'events,return-path', ...c.src], name: 'src' });
      await src.execute('migrate', { uri: dst.incomingUri });
      const end = await waitForStatus(src, ['completed', 'failed']);
      if (c.ok) {
        assert.equal(end.status, 'completed', `${c.name}: ${end['error-desc'] ?? ''}`);
        await waitForStatus(dst, 'completed', { timeoutMs: 10_000 });
        await assertSameRam(src, dst);
      } else {
        assert.equal(end.status, 'failed', c.name);
        // The configuration record comes before OPEN_RETURN_PATH (QEMU's order): the destination
        // cannot tell the source why, it closes the connection (as a QEMU destination does).
        assert.match(end['error-desc'] ?? '', /closed|reset/, `${c.name}: ${end['error-desc']}`);
        assert.equal(await queryStatus(src), 'running', `${c.name}: the source guest runs on`);
        const exit = await dst.waitForExit(15_000);
        assert.equal(exit.code, 1, `${c.name}: the destination exits 1`);
        assert.match(dst.output(), /"code":"LM_ERR_CONFIG_MISMATCH"[^\n]*UUID received is 1b4e28ba-2fa1-11d2-883f-0016d3cca427 and local is 9b1deb4d-3b7d-4bad-9bdd-2b0d7b3dcb6d \(at stream offset 8\)/, 'the destination names both UUIDs, with its code');
      }
    }
  }));

// ─── QEMU 7.2 ────────────────────────────────────────────────────────────────────────────────

const QEMU_SIZE = 16 * MiB;
/** livemig's side of QEMU's `-machine none,memory-backend=m0` (e2e/qemu-7.2-interop.test.ts). */
const M0_GUEST = ['--block', 'm0:16M', '--machine', 'none', '--qemu-devices-only'];
const Q = { skip: qemuSkip(), timeout: 90_000 };

test('QEMU 7.2 destination: a slow livemig precopy with return-path sends keepalive PINGs mid-stream; QEMU answers them and the migration completes', Q, () =>
  withHarness(async (h) => {
    const dstImg = h.path('dst.img');
    await writeFile(dstImg, Buffer.alloc(QEMU_SIZE));
    const qemu = await startQemu(h, 'qemu-dst', [...qemuM0({ file: dstImg }, QEMU_SIZE), '-S', '-incoming', 'defer']);
    await qemu.execute('migrate-set-capabilities', { capabilities: [{ capability: 'return-path', state: true }] });
    await qemu.execute('migrate-incoming', { uri: 'tcp:127.0.0.1:0' });
    const uri = await listeningAddress(qemu, 10_000);
    // 16 MiB of mixed pages at 2 MiB/s: a few seconds of PART sections, a PING before each after a tick.
    const src = await h.source({ guest: [...M0_GUEST, '-S', '--fill', 'mixed'], args: ['--capabilities', 'return-path', '--parameters', `max-bandwidth=${2 * MiB}`] });
    const before = await digest(src);
    await src.execute('migrate', { uri });
    await waitForMigration(src, (i) => (i.ram?.['dirty-sync-count'] ?? 0) >= 1 && (i['total-time'] ?? 0) > 1_500, 'over a second and a half of precopy', { timeoutMs: 30_000 });
    const s = await waitForStatus(src, 'completed', { timeoutMs: 60_000 });
    await waitForStatus(qemu, 'completed', { timeoutMs: 10_000 });
    assert.equal(s.status, 'completed');
    assert.equal(await sha256File(dstImg), before.blocks[0]!.sha256, "QEMU's m0 = the livemig source's RAM");
  }));

test('validate-uuid against QEMU 7.2, both directions: a different -uuid / --uuid is refused naming both; the same one migrates', Q, () =>
  withHarness(async (h) => {
    const A = '9b1deb4d-3b7d-4bad-9bdd-2b0d7b3dcb6d';
    const B = '1b4e28ba-2fa1-11d2-883f-0016d3cca427';
    const img = h.path('m0.img');
    await writeRamImage(img, ramImage(QEMU_SIZE, { stride: 2, dataEnd: 8 * MiB }));
    // QEMU source (-uuid B, validate-uuid) → livemig destination --uuid A: refused by livemig.
    const qemu = await startQemu(h, 'qemu-src', [...qemuM0({ file: img }, QEMU_SIZE), '-S', '-uuid', B]);
    // With return-path QEMU hears the refusal (SHUT 1); without it, whether QEMU's 16 MiB were
    // all in the socket before livemig closed it decides between failed and completed.
    await qemu.execute('migrate-set-capabilities', {
      capabilities: [
        { capability: 'validate-uuid', state: true },
        { capability: 'return-path', state: true },
      ],
    });
    const dst = await h.destination({ incoming: 'tcp', paused: true, guest: [...M0_GUEST, '--uuid', A] });
    await qemu.execute('migrate', { uri: dst.incomingUri });
    assert.equal((await pollFinal(qemu)).status, 'failed', 'QEMU fails');
    assert.equal((await dst.waitForExit(15_000)).code, 1, 'the livemig destination exits 1');
    assert.match(dst.output(), /"code":"LM_ERR_CONFIG_MISMATCH"[^\n]*UUID received is 1b4e28ba-2fa1-11d2-883f-0016d3cca427 and local is 9b1deb4d-3b7d-4bad-9bdd-2b0d7b3dcb6d/);
    // The same UUID: completes.
    const same = await h.destination({ incoming: 'tcp', paused: true, guest: [...M0_GUEST, '--uuid', B], name: 'dst-same' });
    await qemu.execute('migrate', { uri: same.incomingUri });
    assert.equal((await pollFinal(qemu)).status, 'completed');
    await waitForStatus(same, 'completed', { timeoutMs: 10_000 });

    // livemig source --uuid B with validate-uuid → QEMU destination -uuid A: QEMU refuses it.
    const dstImg = h.path('dst.img');
    await writeFile(dstImg, Buffer.alloc(QEMU_SIZE));
    const qdst = await startQemu(h, 'qemu-dst', [...qemuM0({ file: dstImg }, QEMU_SIZE), '-S', '-incoming', 'defer', '-uuid', A]);
    await qdst.execute('migrate-set-capabilities', { capabilities: [{ capability: 'return-path', state: true }] });
    await qdst.execute('migrate-incoming', { uri: 'tcp:127.0.0.1:0' });
    const uri = await listeningAddress(qdst, 10_000);
    const src = await h.source({ guest: [...M0_GUEST, '-S', '--uuid', B], args: ['--capabilities', 'return-path,validate-uuid'] });
    await src.execute('migrate', { uri });
    const end = await waitForStatus(src, ['failed', 'completed'], { timeoutMs: 30_000 });
    assert.equal(end.status, 'failed', 'the livemig source fails');
    const q = await qdst.waitForExit(15_000);
    assert.notEqual(q.code, 0, 'QEMU exits non-zero');
    assert.match(qdst.output(), /UUID received is 1b4e28ba-2fa1-11d2-883f-0016d3cca427 and local is 9b1deb4d-3b7d-4bad-9bdd-2b0d7b3dcb6d/, 'QEMU read our configuration/uuid');
  }));
