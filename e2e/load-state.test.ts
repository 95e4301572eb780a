// `livemig-source --load-state FILE` with QEMU 10.0's own streams (fixtures/qemu-10.0, no QEMU
// needed): a source of a recorded QEMU machine type starts from the file with RAM equal to the
// fixture's manifest and every QEMU device carried; a file that does not fit is one line naming
// it, exit status 1 (LM_ERR_BAD_STATE_FILE).

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { test } from 'node:test';
import { gunzipSync } from 'node:zlib';
import { digest } from './helpers/migration.ts';
import { type Harness, SOURCE_MAIN, withHarness } from './helpers/processes.ts';

const FIXTURES = fileURLToPath(new URL('../fixtures/qemu-10.0/', import.meta.url));
const T = { timeout: 90_000 };

function fixtureStream(h: Harness, name: string): { file: string; manifest: { expected_sha256: string; pattern_block: string } } {
  const manifest = JSON.parse(readFileSync(`${FIXTURES}${name}.json`, 'utf8'));
  const file = h.path(`${name}.mig`);
  writeFileSync(file, gunzipSync(readFileSync(`${FIXTURES}${manifest.stream_file}`)));
  return { file, manifest };
}

/** Run livemig-source to its end (killed by pid after 30 s). */
function runSource(args: string[]): Promise<{ code: number | null; stderr: string }> {
  const child = spawn(process.execPath, [SOURCE_MAIN, ...args], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  return new Promise((resolve) => {
    const timer = setTimeout(() => child.kill('SIGKILL'), 30_000);
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stderr });
    });
  });
}

for (const machine of ['pc-q35-10.0', 'pc-i440fx-10.0']) {
  test(`--machine ${machine} --load-state of QEMU 10.0's ${machine} stream: pc.ram = the fixture's image, every QEMU device carried from the file`, T, () =>
    withHarness(async (h) => {
      const { file, manifest } = fixtureStream(h, `${machine}-16m`);
      const src = await h.source({ guest: ['--machine', machine, '-m', '16M', '--qemu-devices-only'], args: ['-S', '--load-state', file] });
      const d = await digest(src);
      assert.equal(d.blocks.find((b) => b.idstr === manifest.pattern_block)?.sha256, manifest.expected_sha256);
      const carried = d.devices['carried'] as { idstr: string; loaded: boolean }[];
      assert.ok(carried.length >= 20, `${carried.length} carried devices`);
      assert.deepEqual(carried.filter((c) => !c.loaded).map((c) => c.idstr), [], 'every carried device came from the file');
    }),
  );
}

test('--load-state that does not fit: one line naming the file and what is wrong, exit status 1', T, () =>
  withHarness(async (h) => {
    const { file } = fixtureStream(h, 'pc-q35-10.0-16m');
    const cases = [
      { args: ['--machine', 'pc-q35-10.0', '-m', '32M', '--qemu-devices-only', '--load-state', file], pattern: /RAM block "pc\.ram" of 16777216 bytes is not in this guest/ },
      { args: ['--machine', 'pc-i440fx-10.0', '-m', '16M', '--qemu-devices-only', '--load-state', file], pattern: /machine type 'pc-q35-10\.0' in the file, 'pc-i440fx-10\.0' here/ },
      { args: ['--machine', 'pc-q35-10.0', '-m', '16M', '--qemu-devices-only', '--load-state', h.path('missing.mig')], pattern: /ENOENT/ },
    ];
    for (const c of cases) {
      const r = await runSource(['-S', ...c.args]);
      const lines = r.stderr.split('\n').filter((l) => l !== '' && !l.startsWith('{'));
      assert.equal(lines.length, 1, `one line: ${r.stderr}`);
      assert.match(lines[0]!, /^livemig-source: --load-state \S+: /);
      assert.match(lines[0]!, c.pattern);
      assert.doesNotMatch(r.stderr, /^\s+at /m, 'no stack trace');
      assert.equal(r.code, 1);
    }
  }),
);

test('x-livemig-save-state before a completed incoming migration is refused, naming the status', T, () =>
  withHarness(async (h) => {
    const dst = await h.destination({ incoming: 'defer', paused: true, guest: ['--machine', 'pc-q35-10.0', '-m', '16M', '--qemu-devices-only'] });
    await assert.rejects(dst.execute('x-livemig-save-state', { filename: h.path('held.mig') }), (err: Error & { desc?: string }) =>
      /needs a completed incoming migration \(status: none\)/.test(err.desc ?? err.message),
    );
  }),
);
