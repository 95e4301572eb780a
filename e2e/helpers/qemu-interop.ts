// Interop with a real QEMU (7.2 or 10.0: qemu-7.2-interop.test.ts and qemu-10.0-interop.test.ts
// import this with the binary chosen) in both directions, precopy and postcopy, and the failures a
// mismatched peer must produce. QEMU runs `-machine none` with one RAM block
// "m0" (no vCPU, so its RAM is a reliable oracle: ../shared/spec/qemu-interop.md); livemig runs
// the same layout (`--block m0:16M --machine none --qemu-devices-only`).
//
// Locally a missing QEMU skips these tests; under CI=true it fails them.
// Run: pnpm build && node --import tsx --test e2e/qemu-7.2-interop.test.ts e2e/qemu-10.0-interop.test.ts

import assert from 'node:assert/strict';
import { readFile, stat, writeFile } from 'node:fs/promises';
import { test, type TestContext } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { digest, MiB, queryMigrate, queryStatus, setCapabilities, waitForMigration, waitForStatus } from './migration.ts';
import { analyzeFile, type Harness, listeningAddress, withHarness } from './processes.ts';
import { machineTypeVersion } from '@livemig/protocol';
import { makePskDir, makeX509Dirs, randomPskKey, type X509Dirs } from './tls.ts';
import { PAGE, pollFinal, QEMU_LABEL, qemuM0, qemuSkip, qemuVersion, ramImage, sha256, sha256File, startQemu, writeRamImage } from './qemu.ts';

const SIZE = 16 * MiB;
/** livemig's side of QEMU's `-machine none,memory-backend=m0` with a 16 MiB m0. */
const M0_GUEST = ['--block', 'm0:16M', '--machine', 'none', '--qemu-devices-only'];
const TEST_TIMEOUT_MS = 90_000;
const opts = { skip: qemuSkip(), timeout: TEST_TIMEOUT_MS };
/**
 * livemig speaks as QEMU 7.2 unless told otherwise; for `-machine none` (unversioned) the QEMU
 * running it sets the stream's dialect, so against QEMU 10.0 livemig is told `--qemu-version 10.0`
 * (multifd synced once per round with RAM_SAVE_FLAG_MULTIFD_FLUSH, zero pages in the multifd
 * packets, SWITCHOVER_START before the final state).
 */
const IS_10 = QEMU_LABEL === 'QEMU 10.0';
const LIVEMIG_DIALECT = IS_10 ? ['--qemu-version', '10.0'] : [];
/**
 * Multifd dialects a livemig source is tested in against this QEMU: its own, and on QEMU 10.0
 * also 7.2's (flush per section) with QEMU told so (hw_compat_8_0's multifd-flush-after-each-section=on).
 */
const MULTIFD_DIALECTS = IS_10
  ? [
      { name: 'per-round flush (QEMU 10.0 dialect)', livemig: LIVEMIG_DIALECT, qemu: [] as string[] },
      { name: 'per-section flush (7.2 dialect, QEMU told so)', livemig: [] as string[], qemu: ['-global', 'migration.multifd-flush-after-each-section=on'] },
    ]
  : [{ name: 'per-section flush', livemig: [] as string[], qemu: [] as string[] }];

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

      // livemig-source has return-path on by default: the case without it says so.
      const src = await h.source({ guest: [...M0_GUEST, ...LIVEMIG_DIALECT, '-S', '--fill', 'mixed'], args: ['--capabilities', returnPath ? caps.join(',') : 'events,return-path=off'] });
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

  for (const dialect of MULTIFD_DIALECTS) {
    test(`livemig source → ${QEMU_LABEL} destination, multifd (${channels} channels) over ${transport}, ${dialect.name}: QEMU's RAM equals the source digest`, opts, (t) =>
      withHarness(async (h) => {
        const dstImg = h.path('dst.img');
        await writeFile(dstImg, Buffer.alloc(SIZE));
        const qemu = await startQemu(h, 'qemu-dst', [...qemuM0({ file: dstImg }, SIZE), ...dialect.qemu, '-S', '-incoming', 'defer']);
        await setCapabilities(qemu, ['events', 'return-path', 'multifd']);
        await qemu.execute('migrate-set-parameters', { 'multifd-channels': channels });
        await qemu.execute('migrate-incoming', { uri: transport === 'tcp' ? 'tcp:127.0.0.1:0' : `unix:${h.path('qemu.mig')}` });
        const uri = await listeningAddress(qemu, 10_000);

        const src = await h.source({
          guest: [...M0_GUEST, ...dialect.livemig, '-S', '--fill', 'mixed'],
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
        guest: [...M0_GUEST, ...LIVEMIG_DIALECT, '-S', '--fill', 'mixed'],
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

// ─── machine types: the oldest this QEMU offers and its own newest ───────────────────────────

/**
 * Machine types up to 2.3 (QEMU 7.2 still offers pc-i440fx-1.4 … 2.3; 10.0 starts at 2.4) write
 * no configuration record and no section footers; versioned types from 2.4 on write both.
 */
const MACHINE_TYPES = IS_10 ? ['pc-i440fx-2.4', 'pc-q35-10.0', 'pc-i440fx-10.0'] : ['pc-i440fx-1.4', 'pc-i440fx-2.3', 'pc-q35-2.4', 'pc-q35-7.2'];

for (const machine of MACHINE_TYPES) {
  const old = (machineTypeVersion(machine)?.major ?? 99) < 2 || machine.endsWith('-2.3');
  test(`${QEMU_LABEL} -machine ${machine} stream (${old ? 'no configuration, no footers' : 'configuration and footers'}): livemig analyze decodes it, pc.ram equals the QEMU RAM image`, opts, (t) =>
    withHarness(async (h) => {
      const img = h.path('pc.ram.img');
      await writeRamImage(img, IMAGE);
      const qemu = await startQemu(h, 'qemu-src', [
        '-object', `memory-backend-file,id=pc.ram,size=${SIZE / MiB}M,mem-path=${img},share=on`,
        '-machine', `${machine},memory-backend=pc.ram,accel=tcg`, '-m', `${SIZE / MiB}M`, '-S',
      ]);
      const file = h.path(`${machine}.mig`);
      await qemu.execute('migrate', { uri: `exec:cat > ${file}` });
      await waitForStatus(qemu, 'completed', { timeoutMs: 30_000 });
      const r = await analyzeFile(file);
      assert.equal(r.code, 0, `analyze: ${r.stderr}`);
      const report = r.report!;
      const records = report['records'] as { record: string; footerOffset?: number }[];
      const sections = records.filter((x) => x.record === 'section');
      if (old) {
        assert.equal(report['configuration'], null, 'no configuration record');
        assert.ok(sections.every((s) => s.footerOffset === -1), 'no section has a footer');
      } else {
        assert.equal(report['machine'], machine, 'the configuration record names the machine type');
        assert.ok(sections.every((s) => (s.footerOffset ?? -1) > 0), 'every section has its footer');
      }
      // Machine types before 4.0 name a backend's block by its QOM path (x-use-canonical-path-for-ramblock-id).
      const ram = report.ramBlocks.find((b) => b.idstr === 'pc.ram' || b.idstr === '/objects/pc.ram');
      assert.equal(ram?.sha256, IMAGE_SHA, `pc.ram decodes to the image QEMU held (blocks: ${report.ramBlocks.map((b) => b.idstr).join(', ')})`);
      log(t, `${machine}: ${sections.length} sections, ${report.ramBlocks.length} RAM blocks, ${(await stat(file)).size} B`);
    }),
  );
}

// ─── stream files, mapped-ram included (QEMU 9.0+'s file: URI) ─────────────────────────────

for (const mappedRam of [false, true]) {
  const kind = mappedRam ? 'mapped-ram file' : 'stream file';
  test(`${QEMU_LABEL} → ${kind} → livemig destination (--incoming file:): destination RAM equals the QEMU RAM image`, { ...opts, skip: opts.skip || (IS_10 ? false : 'QEMU 7.2 has no file: URI or mapped-ram') }, (t) =>
    withHarness(async (h) => {
      const img = h.path('m0.img');
      await writeRamImage(img, IMAGE);
      const qemu = await startQemu(h, 'qemu-src', [...qemuM0({ file: img }, SIZE), '-S']);
      if (mappedRam) await setCapabilities(qemu, ['mapped-ram']);
      const file = h.path('stream.mig');
      await qemu.execute('migrate', { uri: `file:${file}` });
      await waitForStatus(qemu, 'completed', { timeoutMs: 30_000 });
      const dst = await h.destination({ incoming: `file:${file}`, paused: true, guest: [...M0_GUEST, ...LIVEMIG_DIALECT], capabilities: ['events'] });
      await waitForStatus(dst, 'completed', { timeoutMs: 20_000 });
      assert.equal((await digest(dst)).blocks[0]!.sha256, IMAGE_SHA, 'destination m0 = the QEMU RAM image');
      log(t, `${kind}: ${(await stat(file)).size} B`);
    }),
  );

  test(`livemig source → ${kind} → ${QEMU_LABEL} (migrate-incoming file:): QEMU's RAM equals the source digest`, { ...opts, skip: opts.skip || (IS_10 ? false : 'QEMU 7.2 has no file: URI or mapped-ram') }, (t) =>
    withHarness(async (h) => {
      const src = await h.source({ guest: [...M0_GUEST, ...LIVEMIG_DIALECT, '-S', '--fill', 'mixed'], args: mappedRam ? ['--capabilities', 'mapped-ram'] : [] });
      const before = await digest(src);
      const file = h.path('stream.mig');
      await src.execute('migrate', { uri: `file:${file}` });
      const s = await waitForStatus(src, 'completed', { timeoutMs: 30_000 });
      const dstImg = h.path('dst.img');
      await writeFile(dstImg, Buffer.alloc(SIZE));
      const qemu = await startQemu(h, 'qemu-dst', [...qemuM0({ file: dstImg }, SIZE), '-S', '-incoming', 'defer']);
      if (mappedRam) await setCapabilities(qemu, ['mapped-ram']);
      // The file is complete once the source has closed it: completed comes right before.
      await sleep(300);
      await qemu.execute('migrate-incoming', { uri: `file:${file}` });
      await waitForStatus(qemu, 'completed', { timeoutMs: 20_000 });
      assert.equal(await sha256File(dstImg), before.blocks[0]!.sha256, "QEMU's m0 = the livemig source's RAM");
      log(t, `${kind}: ${(await stat(file)).size} B, livemig transferred ${s.ram?.transferred} B`);
    }),
  );
}
// ─── what an orchestrator uses: pause-before-switchover, switchover-ack ─────────────────────

/** switchover-ack is QEMU 8.1+: the cases that need it run against QEMU 10.0 only. */
const ackOpts = { ...opts, skip: opts.skip !== false ? opts.skip : QEMU_LABEL === 'QEMU 7.2' ? 'QEMU 7.2 has no switchover-ack capability (QEMU 8.1+)' : false };

/** The MIGRATION statuses of `c` from `first` on, in order. */
const statusesFrom = (c: { migrationEvents(): string[] }, first: string): string[] => {
  const all = c.migrationEvents();
  return all.slice(all.indexOf(first));
};

test(`livemig source with pause-before-switchover → ${QEMU_LABEL} destination: held in pre-switchover (keepalive PINGs answered by QEMU), migrate-continue completes, QEMU's RAM equals the source`, opts, (t) =>
  withHarness(async (h) => {
    const dstImg = h.path('dst.img');
    await writeFile(dstImg, Buffer.alloc(SIZE));
    const qemu = await startQemu(h, 'qemu-dst', [...qemuM0({ file: dstImg }, SIZE), '-S', '-incoming', 'defer']);
    await setCapabilities(qemu, ['events', 'return-path']);
    await qemu.execute('migrate-incoming', { uri: 'tcp:127.0.0.1:0' });
    const uri = await listeningAddress(qemu, 10_000);

    // A short stall deadline: the hold outlasts it, so only PONGs from QEMU keep the migration alive.
    const src = await h.source({
      guest: [...M0_GUEST, '--fill', 'mixed'],
      args: ['--capabilities', 'events,return-path,pause-before-switchover', '--parameters', 'x-livemig-stall-timeout=2000'],
    });
    await src.execute('migrate', { uri });
    await waitForStatus(src, 'pre-switchover', { timeoutMs: 30_000 });
    assert.equal(await queryStatus(src), 'finish-migrate');
    await sleep(5_000);
    assert.equal((await queryMigrate(src)).status, 'pre-switchover', 'held past the stall deadline');
    assert.equal((await queryMigrate(qemu)).status, 'active', 'QEMU waits for the rest of the stream');
    await src.execute('migrate-continue', { state: 'pre-switchover' });
    await waitForStatus(src, 'completed', { timeoutMs: 30_000 });
    await waitForStatus(qemu, 'completed', { timeoutMs: 10_000 });
    const after = await digest(src);
    assert.equal(await sha256File(dstImg), after.blocks[0]!.sha256, "QEMU's m0 = the stopped livemig source's RAM");
    assert.deepEqual(statusesFrom(src, 'active'), ['active', 'pre-switchover', 'device', 'completed']);
    log(t, `livemig source MIGRATION events ${JSON.stringify(src.migrationEvents())}`);
  }),
);

test(`${QEMU_LABEL} source with pause-before-switchover → livemig destination: nothing shows on the wire; the destination waits out the hold and completes`, opts, (t) =>
  withHarness(async (h) => {
    const img = h.path('m0.img');
    await writeRamImage(img, IMAGE);
    const qemu = await startQemu(h, 'qemu-src', [...qemuM0({ file: img }, SIZE), '-S']);
    // A QEMU source held in pre-switchover sends nothing: the hold must stay under the stall deadline (5 s by default).
    const dst = await h.destination({ incoming: 'tcp', paused: true, guest: M0_GUEST, capabilities: ['events'], args: ['--parameters', 'x-livemig-stall-timeout=10000'] });
    await setCapabilities(qemu, ['events', 'return-path', 'pause-before-switchover']);
    await qemu.execute('migrate', { uri: dst.incomingUri });
    await waitForStatus(qemu, 'pre-switchover', { timeoutMs: 30_000 });
    await sleep(2_000);
    assert.equal((await queryMigrate(dst)).status, 'active', 'the destination still waits for the rest');
    // livemig's migrate-continue text is QEMU's: compare the refusal of a wrong state.
    const qemuRefusal = await qemu.execute('migrate-continue', { state: 'active' }).then(() => 'accepted', (e: { desc?: string }) => String(e.desc));
    assert.equal(qemuRefusal, 'Migration not in expected state: pre-switchover');
    await qemu.execute('migrate-continue', { state: 'pre-switchover' });
    await waitForStatus(qemu, 'completed', { timeoutMs: 30_000 });
    await waitForStatus(dst, 'completed', { timeoutMs: 10_000 });
    assert.equal((await digest(dst)).blocks[0]!.sha256, IMAGE_SHA, 'destination m0 = the QEMU RAM image');
    assert.deepEqual(statusesFrom(qemu, 'active'), ['active', 'pre-switchover', 'device', 'completed'], "QEMU's statuses, which a livemig source reports too");
    log(t, `QEMU MIGRATION events ${JSON.stringify(qemu.migrationEvents())}`);
  }),
);

test(`${QEMU_LABEL} source with switchover-ack → livemig destination: QEMU does not switch over without the ack, and completes once livemig sends it`, ackOpts, (t) =>
  withHarness(async (h) => {
    const img = h.path('m0.img');
    await writeRamImage(img, IMAGE);
    // Running (no -S): QEMU waits for the ack only for a running guest.
    const qemu = await startQemu(h, 'qemu-src', qemuM0({ file: img }, SIZE));
    await setCapabilities(qemu, ['events', 'return-path', 'switchover-ack']);

    // A destination without the capability sends no ack: QEMU keeps iterating.
    const silent = await h.destination({ name: 'dst-noack', incoming: 'tcp', guest: M0_GUEST, capabilities: ['events'], args: ['--parameters', 'x-livemig-stall-timeout=60000'] });
    await qemu.execute('migrate', { uri: silent.incomingUri });
    await waitForStatus(qemu, 'active', { timeoutMs: 10_000 });
    await sleep(3_000);
    assert.equal((await queryMigrate(qemu)).status, 'active', 'no switchover without SWITCHOVER_ACK');
    await qemu.execute('migrate_cancel');
    await waitForStatus(qemu, 'cancelled', { timeoutMs: 10_000 });
    assert.equal(await queryStatus(qemu), 'running');

    const dst = await h.destination({ incoming: 'tcp', paused: true, guest: M0_GUEST, capabilities: ['events', 'return-path', 'switchover-ack'] });
    await qemu.execute('migrate', { uri: dst.incomingUri });
    const q = await waitForStatus(qemu, 'completed', { timeoutMs: 30_000 });
    await waitForStatus(dst, 'completed', { timeoutMs: 10_000 });
    assert.match(dst.output(), /switchover acknowledged/);
    assert.equal((await digest(dst)).blocks[0]!.sha256, IMAGE_SHA, 'destination m0 = the QEMU RAM image');
    log(t, `QEMU total-time ${q['total-time']} ms with switchover-ack`);
  }),
);

test(`livemig source with switchover-ack → ${QEMU_LABEL} destination: the source waits for QEMU's ack (none from a QEMU without the capability), then completes`, ackOpts, (t) =>
  withHarness(async (h) => {
    // Running, idle guest (RAM does not change): the wait for the ack applies to a running guest only.
    const src = await h.source({ guest: [...M0_GUEST, '--fill', 'mixed'], args: ['--capabilities', 'events,return-path,switchover-ack'] });

    const silentImg = h.path('silent.img');
    await writeFile(silentImg, Buffer.alloc(SIZE));
    const silent = await startQemu(h, 'qemu-noack', [...qemuM0({ file: silentImg }, SIZE), '-S', '-incoming', 'defer']);
    await setCapabilities(silent, ['events', 'return-path']);
    await silent.execute('migrate-incoming', { uri: 'tcp:127.0.0.1:0' });
    await src.execute('migrate', { uri: await listeningAddress(silent, 10_000) });
    await waitForStatus(src, 'active', { timeoutMs: 10_000 });
    await sleep(3_000);
    assert.equal((await queryMigrate(src)).status, 'active', 'no switchover without SWITCHOVER_ACK');
    assert.equal(await queryStatus(src), 'running');
    await src.execute('migrate_cancel');
    await waitForStatus(src, 'cancelled', { timeoutMs: 10_000 });

    const dstImg = h.path('dst.img');
    await writeFile(dstImg, Buffer.alloc(SIZE));
    const qemu = await startQemu(h, 'qemu-dst', [...qemuM0({ file: dstImg }, SIZE), '-S', '-incoming', 'defer']);
    await setCapabilities(qemu, ['events', 'return-path', 'switchover-ack']);
    await qemu.execute('migrate-incoming', { uri: 'tcp:127.0.0.1:0' });
    await src.execute('migrate', { uri: await listeningAddress(qemu, 10_000) });
    const s = await waitForStatus(src, 'completed', { timeoutMs: 30_000 });
    await waitForStatus(qemu, 'completed', { timeoutMs: 10_000 });
    assert.equal(await sha256File(dstImg), (await digest(src)).blocks[0]!.sha256, "QEMU's m0 = the livemig source's RAM");
    log(t, `livemig source total-time ${s['total-time']} ms with switchover-ack`);
  }),
);

/** `channels` on migrate / migrate-incoming is QEMU 8.2+. */
const channelsOpts = { ...opts, skip: opts.skip !== false ? opts.skip : QEMU_LABEL === 'QEMU 7.2' ? 'QEMU 7.2 has no channels argument (QEMU 8.2+)' : false };

test(`${QEMU_LABEL} and livemig with channels instead of uri: QEMU migrates into a livemig destination given channels, and both refuse uri with channels in the same words`, channelsOpts, (t) =>
  withHarness(async (h) => {
    const img = h.path('m0.img');
    await writeRamImage(img, IMAGE);
    const qemu = await startQemu(h, 'qemu-src', [...qemuM0({ file: img }, SIZE), '-S']);
    const dst = await h.destination({ incoming: 'defer', paused: true, guest: M0_GUEST, capabilities: ['events'] });
    const path = h.path('chan.mig');
    const channels = [{ 'channel-type': 'main', addr: { transport: 'socket', type: 'unix', path } }];
    const refusal = (c: typeof qemu, command: string, args: Record<string, unknown>): Promise<string> =>
      c.execute(command, args).then(() => 'accepted', (e: { desc?: string }) => String(e.desc));
    const both = { uri: `unix:${path}`, channels };
    assert.equal(await refusal(dst, 'migrate-incoming', both), await refusal(qemu, 'migrate', both));
    const noPath = [{ 'channel-type': 'main', addr: { transport: 'socket', type: 'unix' } }];
    assert.equal(await refusal(dst, 'migrate-incoming', { channels: noPath }), await refusal(qemu, 'migrate', { channels: noPath }));
    await dst.execute('migrate-incoming', { channels });
    await setCapabilities(qemu, ['events', 'return-path']);
    await qemu.execute('migrate', { channels });
    await waitForStatus(qemu, 'completed', { timeoutMs: 30_000 });
    await waitForStatus(dst, 'completed', { timeoutMs: 10_000 });
    assert.equal((await digest(dst)).blocks[0]!.sha256, IMAGE_SHA, 'destination m0 = the QEMU RAM image');
    log(t, `refusal of uri with channels: ${await refusal(dst, 'migrate-incoming', both)}`);
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
    // QEMU's own multifd dialect (per-round flush on 10.0): livemig is told which QEMU it meets.
    const qemu = await startQemu(h, 'qemu-dst', [...qemuM0({ file: dstImg }, SIZE), '-S', '-incoming', 'defer', '-object', `tls-creds-x509,id=tls0,dir=${x509.server},endpoint=server`]);
    await setCapabilities(qemu, ['events', 'return-path', 'multifd']);
    await qemu.execute('migrate-set-parameters', { 'multifd-channels': 2, 'tls-creds': 'tls0' });
    await qemu.execute('migrate-incoming', { uri: 'tcp:127.0.0.1:0' });
    const uri = await listeningAddress(qemu, 10_000);
    const src = await h.source({
      guest: [...M0_GUEST, ...LIVEMIG_DIALECT, '-S', '--fill', 'mixed'],
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
