// The README's `pnpm livemig …` as a user types it: stdout carries only the command's own output
// (no run banner, so `--json` stays one JSON document), and npm has nothing to warn about in the
// project's config (there was `reporter=silent` in .npmrc, a pnpm-only key npm warned on). And
// `pnpm start` (the demo) interrupted with Ctrl-C does not end with status 0.

import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import { test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';

const ROOT = fileURLToPath(new URL('..', import.meta.url));

test('npx -y pnpm@9 livemig help: the usage on stdout, no banner, no npm warning', { timeout: 90_000 }, async () => {
  const { code, stdout, stderr } = await new Promise<{ code: number; stdout: string; stderr: string }>((resolve) => {
    execFile('npx', ['-y', 'pnpm@9', 'livemig', 'help'], { cwd: ROOT, timeout: 80_000, killSignal: 'SIGKILL' }, (err, stdout, stderr) => {
      resolve({ code: err === null ? 0 : typeof err.code === 'number' ? err.code : -1, stdout, stderr });
    });
  });
  assert.equal(code, 0, stderr);
  assert.match(stdout, /^usage: livemig <command>/, 'the first byte on stdout is the command’s own');
  assert.doesNotMatch(stderr, /Unknown (project|user) config/);
});

test('npx -y pnpm@9 start, then Ctrl-C (SIGINT to the whole process group, as a terminal sends it): ends non-zero', { timeout: 120_000 }, async () => {
  const child = spawn('npx', ['-y', 'pnpm@9', 'start', '--memory', '64M', '--max-bandwidth', '8000000'], { cwd: ROOT, detached: true, stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  child.stdout.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr.on('data', (d: Buffer) => (out += d.toString()));
  const exited = new Promise<[number | null, NodeJS.Signals | null]>((resolve) => child.on('exit', (code, signal) => resolve([code, signal])));
  try {
    const deadline = Date.now() + 90_000;
    while (!/listening on/.test(out)) {
      if (Date.now() > deadline || child.exitCode !== null) assert.fail(`the demo did not get to migrating: ${out}`);
      await sleep(50);
    }
    process.kill(-child.pid!, 'SIGINT');
    const [code, signal] = await exited;
    assert.ok(signal === 'SIGINT' || (code !== null && code !== 0), `ended by ${signal ?? `exit ${code}`}: ${out}`);
    assert.match(out, /interrupted by SIGINT/);
  } finally {
    try {
      process.kill(-child.pid!, 'SIGKILL');
    } catch {
      // already gone
    }
  }
});
