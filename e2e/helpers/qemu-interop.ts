// Interop with a real QEMU (7.2 or 10.0: qemu-7.2-interop.test.ts and qemu-10.0-interop.test.ts
// import this with the binary chosen) in both directions, precopy and postcopy, and the failures a
// mismatched peer must produce. QEMU runs `-machine none` with one RAM block
// "m0" (no vCPU, so its RAM is a reliable oracle: ../shared/spec/qemu-interop.md); livemig runs
// the same layout (`--block m0:16M --machine none --qemu-devices-only`).
//
// Locally a missing QEMU skips these tests; under CI=true it fails them.
// Run: pnpm build && node --import tsx --test e2e/qemu-7.2-interop.test.ts e2e/qemu-10.0-interop.test.ts

import assert from 'node:assert/strict';
import { readFile, writeFile } from 'node:fs/promises';
import { test, type TestContext } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { digest, MiB, queryMigrate, queryStatus, setCapabilities, waitForMigration, waitForStatus } from './migration.ts';
import { type Harness, listeningAddress, withHarness } from './processes.ts';
import { makePskDir, makeX509Dirs, randomPskKey, type X509Dirs } from './tls.ts';
import { PAGE, pollFinal, QEMU_LABEL, qemuM0, qemuSkip, qemuVersion, ramImage, sha256, sha256File, startQemu, writeRamImage } from './qemu.ts';

const SIZE = 16 * MiB;
/** livemig's side of QEMU's `-machine none,memory-backend=m0` with a 16 MiB m0. */
const M0_GUEST = ['--block', 'm0:16M', '--machine', 'none', '--qemu-devices-only'];
const TEST_TIMEOUT_MS = 90_000;
const opts = { skip: qemuSkip(), timeout: TEST_TIMEOUT_MS };
/**
 * A QEMU 10.0 destination of a `-machine none` guest expects multifd flushed once per round
 * (RAM_SAVE_FLAG_MULTIFD_FLUSH records, SYNCs only there); a livemig source flushes per section,
 * as QEMU 7.2 and machine types up to 8.0 do. QEMU 10.0 speaks that dialect too when told
 * (hw_compat_8_0's multifd-flush-after-each-section=on), which is how it is tested here.
 */
const PER_SECTION_FLUSH = QEMU_LABEL === 'QEMU 10.0' ? ['-global', 'migration.multifd-flush-after-each-section=on'] : [];

/** The known image: every other page of the first 8 MiB is sha256-derived data, the rest zero. */
const IMAGE = ramImage(SIZE, { stride: 2, dataEnd: 8 * MiB });
const IMAGE_SHA = sha256(IMAGE);

/** Figures worth keeping from a run (shown by the test reporter under the test). */
const log = (t: TestContext, msg: string): void => t.diagnostic(msg);

// ─── QEMU source → livemig destination ──────────────────────────────────────────────────────

for (const { transport, returnPath } of [
  { transport: 'tcp', returnPath: true },
  { transport: 'unix', returnPath: false },
] as const) {
  test(`${QEMU_LABEL} source → livemig destination, precopy over ${transport}${returnPath ? ' with return-path' : ''}: destination RAM equals the QEMU RAM image`, opts, (t) =>
    withHarness(async (h) => {
      const img = h.path('m0.img');
      await writeRamImage(img, IMAGE);
      const qemu = await startQemu(h, 'qemu-src', [...qemuM0({ file: img }, SIZE), '-S']);
      log(t, `QEMU: ${qemuVersion()}`);
      const dst = await h.destination({ incoming: transport, paused: true, guest: M0_GUEST, capabilities: ['events'] });
      await setCapabilities(qemu, returnPath ? ['events', 'return-path'] : ['events']);

      await qemu.execute('migrate', { uri: dst.incomingUri });
      const q = await waitForStatus(qemu, 'completed', { timeoutMs: 30_000 });
      const d = await waitForStatus(dst, 'completed', { timeoutMs: 10_000 });
      assert.equal(d.status, 'completed');
      assert.equal(q.ram?.total, SIZE, 'QEMU ram.total = m0');
      assert.equal(await queryStatus(qemu), 'postmigrate');
      assert.equal(await queryStatus(dst), 'paused', 'destination -S stays paused');

      const dg = await digest(dst);
      assert.deepEqual(dg.blocks.map((b) => [b.idstr, b.length]), [['m0', SIZE]]);
      assert.equal(dg.blocks[0]!.sha256, IMAGE_SHA, 'destination m0 = the QEMU RAM image');
      log(t, `QEMU total-time ${q['total-time']} ms, transferred ${q.ram?.transferred} B`);
    }),
  );
}

for (const preempt of [false, true]) {
test(`${QEMU_LABEL} source → livemig destination, postcopy${preempt ? ' with postcopy-preempt (pages on the second connection, placed by our main thread)' : ''}: a scanning vCPU faults, pages are pulled from QEMU (REQ_PAGES), RAM equals the image`, opts, (t) =>
  withHarness(async (h) => {
    const img = h.path('m0.img');
    await writeRamImage(img, IMAGE);
    const qemu = await startQemu(h, 'qemu-src', qemuM0({ file: img }, SIZE));
    const caps = preempt ? ['events', 'postcopy-ram', 'postcopy-preempt'] : ['events', 'postcopy-ram'];
    // No -S: the QEMU runstate must be running, or the destination (correctly) does not start the guest.
    const dst = await h.destination({ incoming: 'tcp', guest: [...M0_GUEST, '--workload', 'scan:50'], capabilities: caps });
    await qemu.execute('cont');
    assert.equal(await queryStatus(qemu), 'running');
    await setCapabilities(qemu, caps);
    await qemu.execute('migrate-set-parameters', { 'max-bandwidth': 1048576, 'max-postcopy-bandwidth': 2097152 });

    await qemu.execute('migrate', { uri: dst.incomingUri });
    await sleep(500);
    assert.equal((await queryMigrate(qemu)).status, 'active', 'still in precopy when postcopy is started');
    await qemu.execute('migrate-start-postcopy');

    const q = await waitForStatus(qemu, 'completed', { timeoutMs: 30_000 });
    const d = await waitForStatus(dst, 'completed', { timeoutMs: 10_000 });
    const requests = q.ram?.['postcopy-requests'] ?? 0;
    assert.ok(requests >= 1, `QEMU ram.postcopy-requests ${requests} ≥ 1`);
    assert.ok(qemu.migrationEvents().includes('postcopy-active'), `QEMU MIGRATION events ${qemu.migrationEvents()}`);
    assert.ok(dst.migrationEvents().includes('postcopy-active'), `destination MIGRATION events ${dst.migrationEvents()}`);

    const pc = d as { 'postcopy-faults'?: number; 'postcopy-latency'?: number; 'postcopy-latency-dist'?: number[] };
    const faults = pc['postcopy-faults'];
    const latency = pc['postcopy-latency'];
    const dist = pc['postcopy-latency-dist'];
    assert.ok(typeof faults === 'number' && faults >= 1, `destination postcopy-faults ${faults} ≥ 1`);
    assert.ok(typeof latency === 'number' && latency > 0, `destination postcopy-latency ${latency} ns`);
    assert.ok(Array.isArray(dist) && dist.reduce((a, b) => a + b, 0) === faults, `postcopy-latency-dist ${JSON.stringify(dist)} sums to the faults`);
    log(
      t,
      `page-request round trip QEMU→livemig (destination vCPU fault → REQ_PAGES → page from QEMU): ` +
        `${faults} faults, average postcopy-latency ${(latency / 1e6).toFixed(2)} ms (${latency} ns), ` +
        `postcopy-latency-dist [2^i µs buckets] ${JSON.stringify(dist)}; QEMU postcopy-requests ${requests}, total-time ${q['total-time']} ms`,
    );

    if (preempt) {
      const placed = (d as { 'x-postcopy-preempt-pages'?: number })['x-postcopy-preempt-pages'] ?? 0;
      assert.ok(placed >= 1, `pages placed from QEMU's preempt channel: ${placed}`);
    }
    assert.equal(await queryStatus(dst), 'running', 'destination guest runs after postcopy');
    await dst.execute('stop');
    const dg = await digest(dst);
    assert.equal(dg.blocks[0]!.sha256, IMAGE_SHA, 'destination m0 = the QEMU RAM image');
  }),
);
}

// ─── livemig source → ${QEMU_LABEL} destination ──────────────────────────────────────────────────────

for (const { transport, returnPath } of [
  { transport: 'tcp', returnPath: true },
  { transport: 'unix', returnPath: false },
] as const) {
  test(`livemig source → ${QEMU_LABEL} destination, precopy over ${transport}${returnPath ? ' with return-path' : ''}: QEMU's RAM equals the source digest`, opts, (t) =>
    withHarness(async (h) => {
      const dstImg = h.path('dst.img');
      await writeFile(dstImg, Buffer.alloc(SIZE));
      const qemu = await startQemu(h, 'qemu-dst', [...qemuM0({ file: dstImg }, SIZE), '-S', '-incoming', 'defer']);
      const caps = returnPath ? ['events', 'return-path'] : ['events'];
      await setCapabilities(qemu, caps);
      await qemu.execute('migrate-incoming', { uri: transport === 'tcp' ? 'tcp:127.0.0.1:0' : `unix:${h.path('qemu.mig')}` });
      const uri = await listeningAddress(qemu, 10_000);

      const src = await h.source({ guest: [...M0_GUEST, '-S', '--fill', 'mixed'], args: ['--capabilities', caps.join(',')] });
      const before = await digest(src);
      await src.execute('migrate', { uri });
      const s = await waitForStatus(src, 'completed', { timeoutMs: 30_000 });
      await waitForStatus(qemu, 'completed', { timeoutMs: 10_000 });
      assert.equal(s.ram?.total, SIZE);
      assert.equal(await sha256File(dstImg), before.blocks[0]!.sha256, "QEMU's m0 = the livemig source's RAM");
      assert.equal((await digest(src)).blocks[0]!.sha256, before.blocks[0]!.sha256, 'the paused source did not change');
      log(t, `livemig source total-time ${s['total-time']} ms, transferred ${s.ram?.transferred} B`);
    }),
  );
}

// ─── multifd, both directions (wire-format.md §7.6) ─────────────────────────────────────────

for (const { transport, channels } of [
  { transport: 'tcp', channels: 2 },
  { transport: 'unix', channels: 3 },
] as const) {
  test(`${QEMU_LABEL} source → livemig destination, multifd (${channels} channels) over ${transport}: destination RAM equals the QEMU RAM image`, opts, (t) =>
    withHarness(async (h) => {
      const img = h.path('m0.img');
      await writeRamImage(img, IMAGE);
      const qemu = await startQemu(h, 'qemu-src', [...qemuM0({ file: img }, SIZE), '-S']);
      const dst = await h.destination({
        incoming: transport,
        paused: true,
        guest: M0_GUEST,
        capabilities: ['events', 'multifd'],
        args: ['--parameters', `multifd-channels=${channels}`],
      });
      await setCapabilities(qemu, ['events', 'return-path', 'multifd']);
      await qemu.execute('migrate-set-parameters', { 'multifd-channels': channels });
      await qemu.execute('migrate', { uri: dst.incomingUri });
      const q = await waitForStatus(qemu, 'completed', { timeoutMs: 30_000 });
      await waitForStatus(dst, 'completed', { timeoutMs: 10_000 });
      assert.ok((q.ram?.['multifd-bytes'] ?? 0) >= 4 * MiB, `QEMU sent its pages over multifd (multifd-bytes ${q.ram?.['multifd-bytes']})`);
      const dg = await digest(dst);
      assert.equal(dg.blocks[0]!.sha256, IMAGE_SHA, 'destination m0 = the QEMU RAM image');
      log(t, `QEMU total-time ${q['total-time']} ms, multifd-bytes ${q.ram?.['multifd-bytes']} of ${q.ram?.transferred} B`);
    }),
  );

  test(`livemig source → ${QEMU_LABEL} destination, multifd (${channels} channels) over ${transport}: QEMU's RAM equals the source digest`, opts, (t) =>
    withHarness(async (h) => {
      const dstImg = h.path('dst.img');
      await writeFile(dstImg, Buffer.alloc(SIZE));
      const qemu = await startQemu(h, 'qemu-dst', [...qemuM0({ file: dstImg }, SIZE), ...PER_SECTION_FLUSH, '-S', '-incoming', 'defer']);
      await setCapabilities(qemu, ['events', 'return-path', 'multifd']);
      await qemu.execute('migrate-set-parameters', { 'multifd-channels': channels });
      await qemu.execute('migrate-incoming', { uri: transport === 'tcp' ? 'tcp:127.0.0.1:0' : `unix:${h.path('qemu.mig')}` });
      const uri = await listeningAddress(qemu, 10_000);

      const src = await h.source({
        guest: [...M0_GUEST, '-S', '--fill', 'mixed'],
        args: ['--capabilities', 'events,return-path,multifd', '--parameters', `multifd-channels=${channels}`],
      });
      const before = await digest(src);
      await src.execute('migrate', { uri });
      const s = await waitForStatus(src, 'completed', { timeoutMs: 30_000 });
      await waitForStatus(qemu, 'completed', { timeoutMs: 10_000 });
      assert.ok((s.ram?.['multifd-bytes'] ?? 0) > 0, 'pages went over multifd');
      assert.equal(await sha256File(dstImg), before.blocks[0]!.sha256, "QEMU's m0 = the livemig source's RAM");
      log(t, `livemig source total-time ${s['total-time']} ms, multifd-bytes ${s.ram?.['multifd-bytes']} of ${s.ram?.transferred} B`);
    }),
  );
}

// Over tcp the first page request after the switch to postcopy often takes 30-45 ms and the next
// ones ~2-3 ms; over unix all take ~1-3 ms. QEMU's small return-path writes are subject to Nagle
// (seen with strace: QEMU's PONG 3 reached livemig 40 ms after QEMU wrote it, right behind an
// unacknowledged PONG 4), so a REQ_PAGES written then waits for our kernel's delayed ACK while
// the rate-limited source has nothing to send. livemig answers a request within ~1 ms of reading
// it. Both pmemsave figures are recorded.
for (const { transport, preempt } of [
  { transport: 'tcp', preempt: false },
  { transport: 'unix', preempt: false },
  { transport: 'tcp', preempt: true },
] as const) {
  test(`livemig source → ${QEMU_LABEL} destination, postcopy over ${transport}${preempt ? ' with postcopy-preempt (requests from the return path, pages from our page server thread)' : ''}: QEMU's pmemsave of unsent pages makes QEMU request them from livemig; RAM equals the source`, opts, (t) =>
    withHarness(async (h) => {
      // Postcopy destinations need anonymous/memfd RAM (userfaultfd on a regular file fails in 7.2).
      const qemu = await startQemu(h, 'qemu-dst', [...qemuM0('memfd', SIZE), '-S', '-incoming', 'defer']);
      const caps = preempt ? ['events', 'postcopy-ram', 'postcopy-preempt'] : ['events', 'postcopy-ram'];
      await setCapabilities(qemu, caps);
      await qemu.execute('migrate-incoming', { uri: transport === 'tcp' ? 'tcp:127.0.0.1:0' : `unix:${h.path('qemu.mig')}` });
      const uri = await listeningAddress(qemu, 10_000);

      const src = await h.source({
        guest: [...M0_GUEST, '-S', '--fill', 'mixed'],
        args: ['--capabilities', caps.join(','), '--parameters', 'max-bandwidth=2097152,max-postcopy-bandwidth=1048576'],
      });
      const before = await digest(src);
      await src.execute('migrate', { uri });
      await sleep(500);
      assert.equal((await queryMigrate(src)).status, 'active', 'still in precopy when postcopy is started');
      await src.execute('migrate-start-postcopy');
      await waitForStatus(qemu, 'postcopy-active', { timeoutMs: 10_000, intervalMs: 10 });

      // 15 and 14 MiB are far beyond what was sent (≈1 MiB/s from the start of m0): QEMU's fault
      // thread requests each page and pmemsave (holding QEMU's main loop) blocks until livemig
      // has answered.
      const FAULTS_AT = [15 * MiB, 14 * MiB];
      const took: number[] = [];
      for (const [i, at] of FAULTS_AT.entries()) {
        const t0 = performance.now();
        await qemu.execute('pmemsave', { val: at, size: PAGE, filename: h.path(`page${i}.bin`) }, 20_000);
        took.push(performance.now() - t0);
      }
      const mid = await queryMigrate(src);
      const requests = mid.ram?.['postcopy-requests'] ?? 0;
      assert.equal(mid.status, 'postcopy-active', 'source still in postcopy after the page requests were answered');
      assert.ok(requests >= FAULTS_AT.length, `livemig source ram.postcopy-requests ${requests} ≥ ${FAULTS_AT.length}`);
      log(
        t,
        `page-request round trip livemig→QEMU over ${transport} (QEMU pmemsave fault → REQ_PAGES → page from livemig): ` +
          FAULTS_AT.map((at, i) => `pmemsave of the page at ${at / MiB} MiB took ${took[i]!.toFixed(2)} ms`).join(', ') +
          `; livemig source postcopy-requests ${requests}`,
      );

      // The measurement is done: lift the postcopy rate limit so the rest goes at full speed.
      await src.execute('migrate-set-parameters', { 'max-postcopy-bandwidth': 0 });
      const s = await waitForStatus(src, 'completed', { timeoutMs: 40_000 });
      await waitForStatus(qemu, 'completed', { timeoutMs: 10_000 });
      assert.ok(src.migrationEvents().includes('postcopy-active'), `source MIGRATION events ${src.migrationEvents()}`);
      const all = h.path('all.bin');
      await qemu.execute('pmemsave', { val: 0, size: SIZE, filename: all }, 20_000);
      const ram = await readFile(all);
      assert.equal(sha256(ram), before.blocks[0]!.sha256, "QEMU's m0 = the livemig source's RAM");
      for (const [i, at] of FAULTS_AT.entries()) {
        assert.ok((await readFile(h.path(`page${i}.bin`))).equals(ram.subarray(at, at + PAGE)), `the faulted page at ${at} read by pmemsave holds the final bytes`);
      }
      log(t, `livemig source total-time ${s['total-time']} ms, final postcopy-requests ${s.ram?.['postcopy-requests']}`);
    }),
  );
}

// ─── mismatches ─────────────────────────────────────────────────────────────────────────────

for (const mismatch of ['block', 'machine'] as const) {
  const guest = mismatch === 'block' ? ['--block', 'pc.ram:16M', '--machine', 'none', '--qemu-devices-only'] : ['--block', 'm0:16M', '--machine', 'pc-i440fx-7.2', '--qemu-devices-only'];
  test(`${QEMU_LABEL} source → livemig destination with a different ${mismatch === 'block' ? 'RAM block layout' : 'machine type'}: both fail, the destination names it and exits non-zero`, opts, (t) =>
    withHarness(async (h) => {
      const img = h.path('m0.img');
      await writeRamImage(img, IMAGE);
      const qemu = await startQemu(h, 'qemu-src', [...qemuM0({ file: img }, SIZE), '-S']);
      const dst = await h.destination({ incoming: 'tcp', paused: true, guest });
      // return-path: QEMU waits for the destination's verdict instead of completing on its own.
      await setCapabilities(qemu, ['return-path']);

      await qemu.execute('migrate', { uri: dst.incomingUri });
      const d = await pollFinal(dst, { timeoutMs: 20_000, intervalMs: 10 });
      assert.equal(d.status, 'failed', `destination: ${JSON.stringify(d)}`);
      const desc = d['error-desc'] ?? '';
      if (mismatch === 'block') assert.match(desc, /\bm0\b/, `error-desc names the unknown block: ${desc}`);
      else {
        assert.match(desc, /\bnone\b/, `error-desc names the machine received: ${desc}`);
        assert.match(desc, /pc-i440fx-7\.2/, `error-desc names the local machine: ${desc}`);
      }
      const exit = await dst.waitForExit(10_000);
      assert.ok(exit.code !== 0 && exit.code !== null, `destination exit ${JSON.stringify(exit)} is non-zero`);
      const q = await waitForMigration(qemu, (i) => i.status === 'failed', 'status failed', { timeoutMs: 20_000 });
      assert.equal(q.status, 'failed');
      log(t, `destination error-desc: ${desc}; exit ${exit.code}; QEMU error-desc: ${JSON.stringify(q['error-desc'] ?? '')}`);
    }),
  );
}

test(`livemig source → ${QEMU_LABEL} destination with a different RAM block layout: QEMU exits, the source fails and its guest keeps running`, opts, (t) =>
  withHarness(async (h) => {
    const qemu = await startQemu(h, 'qemu-dst', [...qemuM0('memfd', SIZE), '-S', '-incoming', 'defer']);
    await setCapabilities(qemu, ['return-path']);
    await qemu.execute('migrate-incoming', { uri: 'tcp:127.0.0.1:0' });
    const uri = await listeningAddress(qemu, 10_000);

    // No -S: the guest runs, and must go on running after the failed migration.
    const src = await h.source({ guest: ['--block', 'pc.ram:16M', '--machine', 'none', '--qemu-devices-only', '--workload', 'incrementer'], args: ['--capabilities', 'events,return-path'] });
    assert.equal(await queryStatus(src), 'running');
    await src.execute('migrate', { uri });
    const exit = await qemu.waitForExit(20_000);
    assert.equal(exit.code, 1, `QEMU exit ${JSON.stringify(exit)}`);
    assert.match(qemu.output(), /pc\.ram/, `QEMU names the unknown block: ${qemu.output()}`);
    const s = await waitForMigration(src, (i) => i.status === 'failed', 'status failed', { timeoutMs: 20_000 });
    assert.ok((s['error-desc'] ?? '').length > 0, `source error-desc: ${JSON.stringify(s)}`);
    assert.equal(await queryStatus(src), 'running', 'the source guest keeps running after the failed migration');
    log(t, `QEMU: ${qemu.output().trim()}; livemig source error-desc: ${s['error-desc']}`);
  }),
);

// ─── TLS, both directions (x509 and PSK; QEMU's -object tls-creds-*, parameter tls-creds) ────

for (const kind of ['x509', 'psk'] as const) {
  const credsFor = (h: Harness, endpoint: 'server' | 'client'): { object: string; livemig: string[] } => {
    const dirs = tlsDirs(h);
    const object =
      kind === 'x509'
        ? `tls-creds-x509,id=tls0,dir=${endpoint === 'server' ? dirs.x509.server : dirs.x509.client},endpoint=${endpoint}`
        : `tls-creds-psk,id=tls0,dir=${dirs.psk},endpoint=${endpoint}`;
    return { object, livemig: ['--object', object] };
  };
  // The certificate names localhost (and 127.0.0.1): QEMU and livemig check tls-hostname against it.
  const clientParams = kind === 'x509' ? { 'tls-creds': 'tls0', 'tls-hostname': 'localhost' } : { 'tls-creds': 'tls0' };

  test(`${QEMU_LABEL} source → livemig destination over TLS (${kind}): destination RAM equals the QEMU RAM image`, opts, (t) =>
    withHarness(async (h) => {
      const img = h.path('m0.img');
      await writeRamImage(img, IMAGE);
      const qemu = await startQemu(h, 'qemu-src', [...qemuM0({ file: img }, SIZE), '-S', '-object', credsFor(h, 'client').object]);
      const dst = await h.destination({ incoming: 'tcp', paused: true, guest: M0_GUEST, capabilities: ['events'], args: [...credsFor(h, 'server').livemig, '--parameters', 'tls-creds=tls0'] });
      await setCapabilities(qemu, ['events', 'return-path']);
      await qemu.execute('migrate-set-parameters', clientParams);
      await qemu.execute('migrate', { uri: dst.incomingUri });
      const q = await waitForStatus(qemu, 'completed', { timeoutMs: 30_000 });
      await waitForStatus(dst, 'completed', { timeoutMs: 10_000 });
      const dg = await digest(dst);
      assert.equal(dg.blocks[0]!.sha256, IMAGE_SHA, 'destination m0 = the QEMU RAM image');
      const session = /TLS connection from [^"]* authenticated \(([^)]*)\)/.exec(dst.output());
      assert.ok(session !== null, 'the destination logged the authenticated TLS session');
      if (kind === 'psk') assert.match(session[1]!, /^TLSv1\.2 \S*PSK/, 'PSK: a TLS 1.2 PSK suite');
      log(t, `QEMU over TLS (${kind}): negotiated ${session[1]}; total-time ${q['total-time']} ms, transferred ${q.ram?.transferred} B`);
    }),
  );

  test(`livemig source → ${QEMU_LABEL} destination over TLS (${kind}): QEMU's RAM equals the source digest`, opts, (t) =>
    withHarness(async (h) => {
      const dstImg = h.path('dst.img');
      await writeFile(dstImg, Buffer.alloc(SIZE));
      const qemu = await startQemu(h, 'qemu-dst', [...qemuM0({ file: dstImg }, SIZE), '-S', '-incoming', 'defer', '-object', credsFor(h, 'server').object]);
      await setCapabilities(qemu, ['events', 'return-path']);
      await qemu.execute('migrate-set-parameters', { 'tls-creds': 'tls0' });
      await qemu.execute('migrate-incoming', { uri: 'tcp:127.0.0.1:0' });
      const uri = await listeningAddress(qemu, 10_000);
      const src = await h.source({ guest: [...M0_GUEST, '-S', '--fill', 'mixed'], args: [...credsFor(h, 'client').livemig, '--capabilities', 'events,return-path'] });
      await src.execute('migrate-set-parameters', clientParams);
      const before = await digest(src);
      await src.execute('migrate', { uri });
      const s = await waitForStatus(src, 'completed', { timeoutMs: 30_000 });
      await waitForStatus(qemu, 'completed', { timeoutMs: 10_000 });
      assert.equal(await sha256File(dstImg), before.blocks[0]!.sha256, "QEMU's m0 = the livemig source's RAM");
      log(t, `livemig source over TLS (${kind}): total-time ${s['total-time']} ms, transferred ${s.ram?.transferred} B`);
    }),
  );
}

test(`${QEMU_LABEL} source → livemig destination, multifd (2 channels) over TLS (x509): every channel passes the handshake; RAM equals the image`, opts, (t) =>
  withHarness(async (h) => {
    const { x509 } = tlsDirs(h);
    const img = h.path('m0.img');
    await writeRamImage(img, IMAGE);
    const qemu = await startQemu(h, 'qemu-src', [...qemuM0({ file: img }, SIZE), '-S', '-object', `tls-creds-x509,id=tls0,dir=${x509.client},endpoint=client`]);
    const dst = await h.destination({
      incoming: 'tcp',
      paused: true,
      guest: M0_GUEST,
      capabilities: ['events', 'multifd'],
      args: ['--object', `tls-creds-x509,id=tls0,dir=${x509.server},endpoint=server`, '--parameters', 'multifd-channels=2,tls-creds=tls0'],
    });
    await setCapabilities(qemu, ['events', 'return-path', 'multifd']);
    await qemu.execute('migrate-set-parameters', { 'multifd-channels': 2, 'tls-creds': 'tls0', 'tls-hostname': 'localhost' });
    await qemu.execute('migrate', { uri: dst.incomingUri });
    const q = await waitForStatus(qemu, 'completed', { timeoutMs: 30_000 });
    await waitForStatus(dst, 'completed', { timeoutMs: 10_000 });
    assert.ok((q.ram?.['multifd-bytes'] ?? 0) >= 4 * MiB, `QEMU sent its pages over multifd (multifd-bytes ${q.ram?.['multifd-bytes']})`);
    assert.equal((dst.output().match(/TLS connection from [^"]* authenticated/g) ?? []).length, 3, 'main + 2 multifd connections authenticated');
    const dg = await digest(dst);
    assert.equal(dg.blocks[0]!.sha256, IMAGE_SHA, 'destination m0 = the QEMU RAM image');
    log(t, `QEMU multifd over TLS: total-time ${q['total-time']} ms, multifd-bytes ${q.ram?.['multifd-bytes']} of ${q.ram?.transferred} B`);
  }),
);

test(`livemig source → ${QEMU_LABEL} destination, multifd (2 channels) over TLS (x509): QEMU's RAM equals the source digest`, opts, (t) =>
  withHarness(async (h) => {
    const { x509 } = tlsDirs(h);
    const dstImg = h.path('dst.img');
    await writeFile(dstImg, Buffer.alloc(SIZE));
    const qemu = await startQemu(h, 'qemu-dst', [...qemuM0({ file: dstImg }, SIZE), ...PER_SECTION_FLUSH, '-S', '-incoming', 'defer', '-object', `tls-creds-x509,id=tls0,dir=${x509.server},endpoint=server`]);
    await setCapabilities(qemu, ['events', 'return-path', 'multifd']);
    await qemu.execute('migrate-set-parameters', { 'multifd-channels': 2, 'tls-creds': 'tls0' });
    await qemu.execute('migrate-incoming', { uri: 'tcp:127.0.0.1:0' });
    const uri = await listeningAddress(qemu, 10_000);
    const src = await h.source({
      guest: [...M0_GUEST, '-S', '--fill', 'mixed'],
      args: ['--object', `tls-creds-x509,id=tls0,dir=${x509.client},endpoint=client`, '--capabilities', 'events,return-path,multifd', '--parameters', 'multifd-channels=2,tls-creds=tls0,tls-hostname=localhost'],
    });
    const before = await digest(src);
    await src.execute('migrate', { uri });
    const s = await waitForStatus(src, 'completed', { timeoutMs: 30_000 });
    await waitForStatus(qemu, 'completed', { timeoutMs: 10_000 });
    assert.ok((s.ram?.['multifd-bytes'] ?? 0) > 0, 'pages went over multifd');
    assert.equal(await sha256File(dstImg), before.blocks[0]!.sha256, "QEMU's m0 = the livemig source's RAM");
    log(t, `livemig source multifd over TLS: total-time ${s['total-time']} ms, multifd-bytes ${s.ram?.['multifd-bytes']} of ${s.ram?.transferred} B`);
  }),
);

/** Credentials for the TLS interop tests, made once per harness dir. */
const tlsDirCache = new Map<string, { x509: X509Dirs; psk: string }>();
function tlsDirs(h: Harness): { x509: X509Dirs; psk: string } {
  let d = tlsDirCache.get(h.dir);
  if (d === undefined) {
    d = { x509: makeX509Dirs(h.dir), psk: makePskDir(`${h.dir}/psk`, { qemu: randomPskKey() }) };
    tlsDirCache.set(h.dir, d);
  }
  return d;
}
