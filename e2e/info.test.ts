// `livemig info --qmp ADDR` against a real source process: the job while it migrates, none once
// it is over, the finished one with --completed (query-migrate keeps its final figures), --json,
// and one clear line when nothing serves QMP at the address.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { MiB, queryMigrate, waitForStatus } from './helpers/migration.ts';
import { livemig, withHarness } from './helpers/processes.ts';
import { pollFinal, qemuSkip, startQemu } from './helpers/qemu.ts';

const T = { timeout: 180_000 };

/** `Label: value` lines of the table. */
function table(text: string): Record<string, string> {
  return Object.fromEntries(
    text
      .trimEnd()
      .split('\n')
      .map((l) => {
        const m = /^([A-Za-z ]+):\s+(.*)$/.exec(l);
        assert.ok(m !== null, `a "Label: value" line: ${JSON.stringify(l)}`);
        return [m[1]!, m[2]!];
      }),
  );
}

test('livemig info: the running job, none once it is over, the finished one with --completed and --json', T, (t) =>
  withHarness(async (h) => {
    const guest = ['-m', '64M', '--workload', 'incrementer:20'];
    const dst = await h.destination({ incoming: 'tcp', guest });
    // 8 MiB/s: several seconds, so it is surely still running when asked.
    const src = await h.source({ guest, args: ['--capabilities', 'return-path', '--parameters', `max-bandwidth=${8 * MiB},downtime-limit=300`] });
    const qmp = src.qmpAddress;

    const before = await livemig(['info', '--qmp', qmp]);
    assert.equal(before.code, 0, before.stderr);
    assert.deepEqual(table(before.stdout), { 'Job type': 'None' });

    await src.execute('migrate', { uri: dst.incomingUri });
    await waitForStatus(src, 'active');
    const running = await livemig(['info', '--qmp', qmp]);
    assert.equal(running.code, 0, running.stderr);
    const r = table(running.stdout);
    t.diagnostic(`running: ${running.stdout.trim().replace(/\n/g, ' | ')}`);
    assert.equal(r['Job type'], 'Unbounded');
    assert.equal(r['Status'], 'active');
    assert.match(r['Time elapsed']!, /^\d+ ms$/);
    assert.match(r['Data processed']!, /^\d+\.\d\d GiB$/);
    assert.match(r['Data remaining']!, /^\d+\.\d\d GiB$/);
    assert.equal(r['Data total'], '0.07 GiB', '64 MiB + 4 MiB of vga.vram');
    assert.match(r['Memory bandwidth']!, /^\d+\.\d\d GiB\/s$/);
    assert.match(r['Dirty rate']!, /^\d+ pages\/s \(\d+\.\d\d GiB\/s\)$/);
    assert.match(r['Iteration']!, /^\d+$/);
    assert.match(r['Expected downtime']!, /^\d+ ms$/);
    assert.match(r['Setup time']!, /^\d+ ms$/);
    assert.equal(r['Postcopy requests'], '0');
    assert.match(r['Progress']!, /^\d+ %, /);
    assert.equal(r['Total downtime'], undefined, 'no downtime before the end');
    // --completed while it runs: no finished job to show.
    assert.deepEqual(table((await livemig(['info', '--qmp', qmp, '--completed'])).stdout), { 'Job type': 'None' });

    await src.execute('migrate-set-parameters', { 'max-bandwidth': 0 });
    await waitForStatus(src, 'completed', { timeoutMs: 90_000 });
    const final = await queryMigrate(src);
    const after = await livemig(['info', '--qmp', qmp]);
    assert.deepEqual(table(after.stdout), { 'Job type': 'None' }, 'as virsh domjobinfo: no job once it is over');

    const done = await livemig(['info', '--qmp', qmp, '--completed']);
    assert.equal(done.code, 0, done.stderr);
    const c = table(done.stdout);
    t.diagnostic(`--completed: ${done.stdout.trim().replace(/\n/g, ' | ')}`);
    assert.equal(c['Job type'], 'Completed');
    assert.equal(c['Status'], 'completed');
    assert.equal(c['Time elapsed'], `${final['total-time']} ms`);
    assert.equal(c['Total downtime'], `${final.downtime} ms`);
    // Kept or not is a timing on a loaded machine; the row must agree with the figures.
    assert.equal(c['Downtime limit'], final.downtime! > 300 ? `300 ms (OVER by ${final.downtime! - 300} ms)` : '300 ms (kept)');
    assert.equal(c['Iteration'], String(final.ram!['dirty-sync-count']));
    assert.equal(c['Data remaining'], '0.00 GiB');
    assert.equal(c['Progress'], '100 %, ETA 0.0 s');

    // query-migrate keeps the final figures: asked again later, the same answer.
    await sleep(300);
    const json = await livemig(['info', '--qmp', qmp, '--completed', '--json']);
    assert.equal(json.code, 0, json.stderr);
    const parsed = JSON.parse(json.stdout) as { 'job-type': string; 'query-migrate': unknown };
    assert.equal(parsed['job-type'], 'Completed');
    assert.deepEqual(parsed['query-migrate'], final, 'the same final figures, asked again later');
  }),
);

test('livemig info: one line, exit status 1, when nothing serves QMP at the address or the address is not one', T, () =>
  withHarness(async (h) => {
    const missing = h.path('nobody.qmp');
    const a = await livemig(['info', '--qmp', `unix:${missing}`]);
    assert.equal(a.code, 1);
    assert.equal(a.stderr, `livemig: info: cannot reach QMP at unix:${missing}: no such socket (ENOENT): is a livemig process or QEMU serving QMP there?\n`);
    assert.equal(a.stdout, '');
    const b = await livemig(['info', '--qmp', 'file:/tmp/x']);
    assert.equal(b.code, 1);
    assert.equal(b.stderr, 'livemig: info: --qmp file:/tmp/x: a QMP socket is unix:PATH or tcp:HOST:PORT\n');
    const c = await livemig(['info']);
    assert.equal(c.code, 1);
    assert.match(c.stderr, /^livemig: info: --qmp ADDR is required/);
    const d = await livemig(['info', '--qmp', `unix:${missing}`, '--json']);
    assert.equal(d.code, 1);
    assert.equal(JSON.parse(d.stdout).error.code, 'LM_ERR_INFO');
    assert.equal(d.stderr.split('\n').length, 2, 'one line');
  }),
);

test("livemig info reads a real QEMU 7.2's query-migrate too: none before, its finished migration with --completed", { ...T, skip: qemuSkip() }, () =>
  withHarness(async (h) => {
    // QEMU serves one client per -qmp socket and the harness holds the first: a second for livemig info.
    const infoQmp = h.path('info.qmp');
    const qemu = await startQemu(h, 'qemu', ['-machine', 'pc', '-m', '64', '-S', '-qmp', `unix:${infoQmp},server=on,wait=off`]);
    const qmp = `unix:${infoQmp}`;
    assert.deepEqual(table((await livemig(['info', '--qmp', qmp])).stdout), { 'Job type': 'None' });
    await qemu.execute('migrate', { uri: 'exec:cat > /dev/null' });
    const final = await pollFinal(qemu);
    assert.equal(final.status, 'completed', JSON.stringify(final));
    const done = await livemig(['info', '--qmp', qmp, '--completed']);
    assert.equal(done.code, 0, done.stderr);
    const c = table(done.stdout);
    assert.equal(c['Job type'], 'Completed');
    assert.equal(c['Total downtime'], `${final.downtime} ms`);
    assert.equal(c['Downtime limit'], undefined, "QEMU's query-migrate has no limit in it");
    assert.equal(c['Time elapsed'], `${final['total-time']} ms`);
    assert.equal(c['Iteration'], String(final.ram!['dirty-sync-count']));
    assert.equal(c['Progress'], undefined, 'QEMU has no x-progress');
  }),
);
