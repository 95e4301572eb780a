// The README's `pnpm livemig …` as a user types it: stdout carries only the command's own output
// (no run banner, so `--json` stays one JSON document), and npm has nothing to warn about in the
// project's config (there was `reporter=silent` in .npmrc, a pnpm-only key npm warned on).

import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { test } from 'node:test';
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
