// cpr-exec live update: how long the guest is stopped when a source execs its new image, RAM
// kept in place, next to what moving the same RAM would cost (a normal migrate to a file:
// bytes and time). The stop is measured by a QMP client: from `migrate` to the new image
// answering query-status "running" (Node's start-up and module loading included).

import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { mkdtemp, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { QmpClient } from '../packages/runtime/src/index.ts';
import { SOURCE_MAIN } from '../packages/cli/src/demo.ts';

const MiB = 2 ** 20;
const reps = Number(process.env['LIVEMIG_BENCH_REPS'] ?? 3);
const GUEST = ['-m', '1G', '--workload', 'incrementer', '--vcpus', '1'];

async function connect(address: string, timeoutMs: number): Promise<QmpClient> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      return await QmpClient.connect(address, { timeoutMs: 5_000 });
    } catch (err) {
      if (Date.now() > deadline) throw err;
      await sleep(20);
    }
  }
}

async function status(q: QmpClient): Promise<string> {
  return ((await q.execute('query-status')) as { status: string }).status;
}

/** One cpr-exec of a running 1 GiB guest; returns the stop as the client saw it and the state file's size. */
async function cprOnce(): Promise<{ stopMs: number; stateBytes: number; normalMs: number; normalBytes: number }> {
  const dir = await mkdtemp(join(tmpdir(), 'livemig-cpr-'));
  const qmp = `unix:${join(dir, 'q')}`;
  const proc = spawn(process.execPath, [SOURCE_MAIN, ...GUEST, '--shared-ram', '--qmp', qmp], { stdio: 'ignore' });
  let q: QmpClient | undefined;
  try {
    q = await connect(qmp, 120_000);
    await sleep(500);
    const state = join(dir, 'state');
    await q.execute('migrate-set-parameters', { mode: 'cpr-exec', 'cpr-exec-command': [process.execPath, SOURCE_MAIN, ...GUEST, '--incoming-cpr', state, '--qmp', qmp] });
    const started = performance.now();
    await q.execute('migrate', { uri: `file:${state}` });
    await q.close().catch(() => {});
    // The old image's QMP goes away at the exec; the new image's answers once it runs the guest.
    while (!readFileSync(`/proc/${proc.pid}/cmdline`, 'utf8').includes('--incoming-cpr')) {
      if (performance.now() - started > 60_000) throw new Error('no exec within 60 s');
      await sleep(2);
    }
    let running = false;
    while (!running) {
      if (performance.now() - started > 60_000) throw new Error('the new image did not run the guest within 60 s');
      try {
        q = await QmpClient.connect(qmp, { timeoutMs: 2_000 });
        running = (await status(q)) === 'running';
        if (!running) await q.close();
      } catch {
        await sleep(5);
      }
    }
    const stopMs = performance.now() - started;
    const stateBytes = (await stat(state)).size;
    // The same guest moved the ordinary way, to a file: every page written.
    const file = join(dir, 'normal');
    await q!.execute('migrate-set-parameters', { 'max-bandwidth': 0 });
    const t0 = performance.now();
    await q!.execute('migrate', { uri: `file:${file}` });
    for (;;) {
      const info = (await q!.execute('query-migrate')) as { status: string };
      if (info.status === 'completed') break;
      if (info.status === 'failed' || performance.now() - t0 > 120_000) throw new Error(`normal migration: ${info.status}`);
      await sleep(20);
    }
    return { stopMs, stateBytes, normalMs: performance.now() - t0, normalBytes: (await stat(file)).size };
  } finally {
    await q?.close().catch(() => {});
    proc.kill('SIGKILL');
    await rm(dir, { recursive: true, force: true });
  }
}

export async function cprExecBench(): Promise<void> {
  const runs = [];
  for (let i = 0; i < reps; i++) runs.push(await cprOnce());
  const median = (xs: number[]): number => xs.sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
  const stop = median(runs.map((r) => r.stopMs));
  const normal = median(runs.map((r) => r.normalMs));
  const state = median(runs.map((r) => r.stateBytes));
  const bytes = median(runs.map((r) => r.normalBytes));
  console.log(`cpr-exec, 1 GiB incrementer guest (${reps} runs, medians):`);
  console.log(`  guest stopped (migrate → new image running, client-side): ${stop.toFixed(0)} ms (${runs.map((r) => r.stopMs.toFixed(0)).join(', ')})`);
  console.log(`  state file: ${(state / MiB).toFixed(2)} MiB   vs a normal migrate to file: ${(bytes / MiB).toFixed(0)} MiB in ${normal.toFixed(0)} ms`);
}
