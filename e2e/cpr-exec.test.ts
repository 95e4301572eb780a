// End-to-end: cpr-exec live update. A livemig-source with --shared-ram saves its device state to
// a file and execs its new image (cpr-exec-command) in the same process: same PID, guest RAM kept
// in place (memfds handed over, never written to the file), vCPUs and devices loaded, the
// incrementer running on. A failed exec leaves the old image running the guest.
//
// Run: pnpm build && node --import tsx --test --test-concurrency=1 e2e/cpr-exec.test.ts

import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { readFileSync, statSync } from 'node:fs';
import { test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { native } from '@livemig/native';
import { blockShas, digest, type GuestDigest, MiB, queryMigrate, queryStatus, waitForStatus } from './helpers/migration.ts';
import { assertQmpError } from './helpers/postcopy.ts';
import { analyzeFile, type Child, connectQmp, type Harness, SOURCE_MAIN, withHarness } from './helpers/processes.ts';

const T = { timeout: 120_000 };
const RAM_MIB = 128;
const GUEST = ['-m', `${RAM_MIB}M`, '--workload', 'incrementer:20', '--vcpus', '2'];
/** Bound on the new image coming up (exec, load, QMP listening). */
const EXEC_WAIT_MS = 30_000;

// Under CI the addon must be there (the install builds it); elsewhere its absence skips.
const skip = native.available || process.env['CI'] === 'true' ? false : `the native addon is not built (${native.unavailableReason})`;

function cmdline(pid: number): string[] {
  return readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').filter((a) => a.length > 0);
}

/** The new image's argv: this very node, the source's main, the same guest flags. */
function newImage(c: Child, stateFile: string): string[] {
  return [process.execPath, SOURCE_MAIN, ...GUEST, '--incoming-cpr', stateFile, '--qmp', c.qmpAddress];
}

/** After the exec: wait (bounded) for the process to be the new image loading `stateFile`, then reconnect QMP. */
async function reconnectAfterExec(c: Child, stateFile: string): Promise<void> {
  const deadline = Date.now() + EXEC_WAIT_MS;
  while (!cmdline(c.pid).includes(stateFile)) {
    assert.ok(c.alive, `${c.name} exited during cpr-exec`);
    assert.ok(Date.now() < deadline, `${c.name} (pid ${c.pid}) did not exec its new image within ${EXEC_WAIT_MS} ms`);
    await sleep(20);
  }
  await c.qmp.close().catch(() => {});
  c.qmp = await connectQmp(c, EXEC_WAIT_MS);
  c.events.length = 0;
  void (async () => {
    for await (const e of c.qmp.events({ idleTimeoutMs: Infinity })) c.events.push(e);
  })().catch(() => {});
}

/** vCPU progress: each vCPU's passes and position, as one comparable number per vCPU. */
function progress(d: GuestDigest): number[] {
  const vcpus = d.devices['vcpus'] as { position: number; passes: number }[];
  return vcpus.map((v) => v.passes * 2 ** 32 + v.position);
}

/** Wait (bounded) until every vCPU has moved past `before`. */
async function waitForProgress(c: Child, before: number[]): Promise<GuestDigest> {
  const deadline = Date.now() + 30_000;
  for (;;) {
    const d = await digest(c);
    if (progress(d).every((p, i) => p > before[i]!)) return d;
    assert.ok(Date.now() < deadline, `${c.name}: vCPUs did not advance from ${JSON.stringify(before)} (now ${JSON.stringify(progress(d))})`);
    await sleep(100);
  }
}

async function startSource(h: Harness): Promise<Child> {
  const src = await h.source({ guest: GUEST, args: ['--shared-ram'] });
  // The workload has written something before anything is saved.
  await waitForProgress(src, [0, 0]);
  return src;
}

test('cpr-exec: same PID, RAM kept in place and not in the state file, devices and vCPUs loaded, the incrementer runs on (twice)', { ...T, skip }, () =>
  withHarness(async (h) => {
    const src = await startSource(h);
    const pid = src.pid;
    // Paused first, so that what is saved can be compared exactly with what the new image has.
    await src.execute('stop');
    const before = await digest(src);
    assert.equal(before.pattern.consistent, true, `pattern before ${JSON.stringify(before.pattern)}`);

    const stateFile = h.path('state-1');
    await src.execute('migrate-set-parameters', { mode: 'cpr-exec', 'cpr-exec-command': newImage(src, stateFile) });
    const p = await src.execute<Record<string, unknown>>('query-migrate-parameters');
    assert.equal(p['mode'], 'cpr-exec');
    assert.deepEqual(p['cpr-exec-command'], newImage(src, stateFile));
    await src.execute('migrate', { uri: `file:${stateFile}` });
    await reconnectAfterExec(src, stateFile);

    assert.equal(src.pid, pid, 'the same process');
    assert.ok(src.alive);
    // The new image's guest RAM is the old image's memfds, mapped shared (not a fresh allocation).
    const maps = readFileSync(`/proc/${pid}/maps`, 'utf8');
    for (const block of ['pc.ram', 'vga.vram']) assert.match(maps, new RegExp(` rw-s .*/memfd:${block.replace('.', '\\.')} \\(deleted\\)`), `${block} mapped from its memfd`);
    // Paused when saved: the new image keeps it paused, with exactly the same RAM and devices.
    assert.equal(await queryStatus(src), 'paused');
    const after = await digest(src);
    assert.deepEqual(blockShas(after), blockShas(before), 'guest RAM identical');
    assert.deepEqual(progress(after), progress(before), 'vCPU state loaded');
    assert.equal(after.devices['appSha256'], before.devices['appSha256'], 'application device loaded');

    assert.equal(after.devices['vfioSha256'], before.devices['vfioSha256'], 'VFIO device loaded');

    // RAM was not re-transferred: the file holds the block list and device state, no page. (Most
    // of its ~4 MiB is the VFIO device's own memory, device state that any migration carries.)
    const ramBytes = after.blocks.reduce((a, b) => a + b.length, 0);
    const fileBytes = statSync(stateFile).size;
    assert.ok(fileBytes < ramBytes / 20, `state file ${fileBytes} bytes for ${ramBytes} bytes of RAM`);
    const analyzed = await analyzeFile(stateFile);
    assert.equal(analyzed.code, 0, analyzed.stderr);
    for (const b of analyzed.report!.ramBlocks) assert.equal(b.normalPages + b.zeroPages + b.xbzrlePages, 0, `no page of ${b.idstr} in the state file`);

    // The workload runs on from where it was, over the same memory.
    await src.execute("cont");
    const running = await waitForProgress(src, progress(after));
    assert.equal(running.pattern.consistent, true, `pattern after ${JSON.stringify(running.pattern)}`);

    // Again, this time while running: the new image runs the guest on at once. (It started with
    // default parameters, as a new QEMU does: mode is normal again.)
    const stateFile2 = h.path('state-2');
    assert.equal((await src.execute<Record<string, unknown>>('query-migrate-parameters'))['mode'], 'normal');
    await src.execute('migrate-set-parameters', { mode: 'cpr-exec', 'cpr-exec-command': newImage(src, stateFile2) });
    const beforeSecond = progress(await digest(src));
    await src.execute('migrate', { uri: `file:${stateFile2}` });
    await reconnectAfterExec(src, stateFile2);
    assert.equal(src.pid, pid);
    assert.equal(await queryStatus(src), 'running');
    const second = await waitForProgress(src, beforeSecond);
    assert.equal(second.pattern.consistent, true, `pattern after the second exec ${JSON.stringify(second.pattern)}`);
    assert.ok(statSync(stateFile2).size < ramBytes / 20);
  }),
);

test('cpr-exec of a missing program: status failed with the reason, the old image runs the guest on, RAM intact', { ...T, skip }, () =>
  withHarness(async (h) => {
    const src = await startSource(h);
    const pid = src.pid;
    await src.execute('migrate-set-parameters', { mode: 'cpr-exec', 'cpr-exec-command': ['/nonexistent/livemig-new-image', '--incoming-cpr', 'x'] });
    const start = progress(await digest(src));
    await src.execute('migrate', { uri: `file:${h.path('state')}` });
    const info = await waitForStatus(src, ['completed', 'failed', 'cancelled'], { timeoutMs: 30_000 });
    assert.equal(info.status, 'failed');
    assert.match(String(info['error-desc']), /cannot exec "\/nonexistent\/livemig-new-image": No such file or directory/);
    assert.equal(src.pid, pid);
    assert.equal(await queryStatus(src), 'running', 'the guest runs again');
    assert.ok(!cmdline(pid).includes('--incoming-cpr'), 'still the old image');
    const d = await waitForProgress(src, start);
    assert.equal(d.pattern.consistent, true, `pattern ${JSON.stringify(d.pattern)}`);

    // Stopped, the RAM is whole and stays so across a second failed attempt.
    await src.execute('stop');
    const before = await digest(src);
    await src.execute('migrate', { uri: `file:${h.path('state-again')}` });
    assert.equal((await waitForStatus(src, ['completed', 'failed', 'cancelled'], { timeoutMs: 30_000 })).status, 'failed');
    assert.equal(await queryStatus(src), 'paused', 'a guest paused before stays paused');
    assert.deepEqual(blockShas(await digest(src)), blockShas(before));
  }),
);

test('cpr-exec refusals: no command, not a file: URI, RAM not shared; each a clear error and nothing started', { ...T, skip }, () =>
  withHarness(async (h) => {
    const shared = await h.source({ guest: ['-m', '16M'], args: ['--shared-ram'] });
    await shared.execute('migrate-set-parameters', { mode: 'cpr-exec' });
    await assertQmpError(shared.execute('migrate', { uri: `file:${h.path('s')}` }), /mode cpr-exec needs the new image's command: set parameter cpr-exec-command/);
    await shared.execute('migrate-set-parameters', { 'cpr-exec-command': ['true'] });
    await assertQmpError(shared.execute('migrate', { uri: 'tcp:127.0.0.1:1' }), /mode cpr-exec saves the state to a file: use a file: URI, not tcp:/);
    await assertQmpError(shared.execute('migrate-set-parameters', { mode: 'cpr-reboot' }), /Mode 'cpr-reboot' is not supported by livemig/);
    await assertQmpError(shared.execute('migrate-set-parameters', { 'cpr-exec-command': 'true' }), /Parameter 'cpr-exec-command' expects a list of strings/);
    assert.deepEqual(await queryMigrate(shared), {}, 'no migration started');
    assert.equal(await queryStatus(shared), 'running');

    const plain = await h.source({ guest: ['-m', '16M'] });
    await plain.execute('migrate-set-parameters', { mode: 'cpr-exec', 'cpr-exec-command': ['true'] });
    await assertQmpError(plain.execute('migrate', { uri: `file:${h.path('p')}` }), /mode cpr-exec needs guest RAM in shared memory: start livemig-source with --shared-ram/);
  }),
);

/** Run livemig-source to its exit (bounded); resolves with its status and stderr. */
function runSource(args: string[], env: NodeJS.ProcessEnv): Promise<{ code: number | null; stderr: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, [SOURCE_MAIN, ...args], { env, timeout: 60_000, killSignal: 'SIGKILL' }, (err, _stdout, stderr) => {
      resolve({ code: err === null ? 0 : typeof err.code === 'number' ? err.code : null, stderr });
    });
  });
}

test('--incoming-cpr started by hand, or with other guest flags than the old image: one clear line, exit 1', { ...T, skip }, async () => {
  const env = { ...process.env };
  delete env['LIVEMIG_CPR_RAM'];
  const notHandedOver = await runSource(['-m', '16M', '--incoming-cpr', '/nonexistent/state'], env);
  assert.equal(notHandedOver.code, 1);
  assert.match(notHandedOver.stderr, /^livemig-source: --incoming-cpr: no guest RAM was handed over \(LIVEMIG_CPR_RAM is not set\): start this only as a cpr-exec-command\n$/);

  const otherBlocks = await runSource(['-m', '16M', '--incoming-cpr', '/nonexistent/state'], { ...env, LIVEMIG_CPR_RAM: JSON.stringify([{ idstr: 'pc.ram', length: 8 * MiB, fd: 0 }]) });
  assert.equal(otherBlocks.code, 1);
  assert.match(otherBlocks.stderr, /^livemig-source: --incoming-cpr: the guest flags give RAM blocks pc\.ram:16777216, vga\.vram:4194304 but the old image had pc\.ram:8388608: pass the same guest flags\n$/);
});
