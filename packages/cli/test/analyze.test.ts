// `livemig analyze` as a real process (the built dist/main.js) on the real QEMU 7.2 streams:
//   - the RAM digests it prints, reading files in place without rebuilding RAM, are the
//     manifests' expected sha256, and --extract writes those same bytes;
//   - `--dump state` prints exactly what QEMU 7.2's scripts/analyze-migration.py printed for the
//     same streams (expectations in fixtures/analyze-migration-7.2, generated as its README says),
//     from a file and from standard input.
// Needs `npx tsc -b` first. Every child is bounded by a timeout that kills it.

import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { createReadStream, existsSync, mkdtempSync, readFileSync, rmSync, statSync, utimesSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { after, describe, it } from 'node:test';
import { fileURLToPath } from 'node:url';
import { gunzipSync } from 'node:zlib';
import { fixtureDir, fixtureNames, fixturesMissing, countSkippedWithoutFixtures, loadFixture } from '../../protocol/test/fixtures.ts';

const here = dirname(fileURLToPath(import.meta.url));
const MAIN = resolve(here, '../dist/main.js');
const EXPECTED_DIR = join(here, 'fixtures', 'analyze-migration-7.2');
const CHILD_TIMEOUT_MS = 120_000;

interface Ran {
  status: number | null;
  stdout: string;
  stderr: string;
}

/** Run `livemig ARGS` (stdin from a file when given), bounded by CHILD_TIMEOUT_MS. */
function livemig(args: string[], stdinFile?: string): Promise<Ran> {
  return new Promise((resolvePromise, reject) => {
    const child = spawn(process.execPath, [MAIN, ...args], { stdio: [stdinFile === undefined ? 'ignore' : 'pipe', 'pipe', 'pipe'] });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout.on('data', (c: Buffer) => out.push(c));
    child.stderr.on('data', (c: Buffer) => err.push(c));
    const timer = setTimeout(() => child.kill('SIGKILL'), CHILD_TIMEOUT_MS);
    if (stdinFile !== undefined) createReadStream(stdinFile).pipe(child.stdin!);
    child.on('error', reject);
    child.on('close', (status) => {
      clearTimeout(timer);
      resolvePromise({ status, stdout: Buffer.concat(out).toString('utf8'), stderr: Buffer.concat(err).toString('utf8') });
    });
  });
}

function expectedState(name: string): string | undefined {
  const plain = join(EXPECTED_DIR, `${name}.state.json`);
  if (existsSync(plain)) return readFileSync(plain, 'utf8');
  const gz = `${plain}.gz`;
  return existsSync(gz) ? gunzipSync(readFileSync(gz)).toString('utf8') : undefined;
}

const STATE_FIXTURES = ['none-m0-64m', 'pc-i440fx-7.2-64m', 'pc-q35-7.2-64m'];
const tmp = mkdtempSync(join(tmpdir(), 'livemig-analyze-test-'));
after(() => rmSync(tmp, { recursive: true, force: true }));

describe('livemig analyze on the QEMU 7.2 streams', { skip: fixturesMissing() }, () => {
  for (const name of fixtureNames()) {
    it(`${name}: block digests (file read in place) and --extract bytes equal the manifest's`, async () => {
      const f = loadFixture(name);
      // A gzip fixture is unpacked first: a plain file is what is read in place (gzip is rebuilt in memory).
      const file = f.path.endsWith('.gz') ? join(tmp, `${name}.mig`) : f.path;
      if (file !== f.path) writeFileSync(file, f.stream);
      const dir = join(tmp, `${name}.blocks`);
      const r = await livemig(['analyze', file, '--json', '--extract', dir]);
      assert.equal(r.status, 0, r.stderr);
      const report = JSON.parse(r.stdout) as { ramBlocks: { idstr: string; sha256: string }[] };
      const want = (f.manifest.ram_blocks as { idstr: string; expected_sha256: string }[]).map((b) => [b.idstr, b.expected_sha256]);
      assert.deepEqual(report.ramBlocks.map((b) => [b.idstr, b.sha256]), want);
      for (const [idstr, sha] of want) {
        const bytes = readFileSync(join(dir, idstr!.replace(/[^A-Za-z0-9._@-]/g, (c) => `%${c.charCodeAt(0).toString(16).toUpperCase().padStart(2, '0')}`)));
        assert.equal(createHash('sha256').update(bytes).digest('hex'), sha, `extracted ${idstr}`);
      }
    });
  }

  for (const name of STATE_FIXTURES) {
    const expected = expectedState(name);
    it(`${name}: --dump state prints what analyze-migration.py printed, from the file and from stdin`, { skip: expected === undefined ? 'no expectation file' : false }, async () => {
      const file = join(fixtureDir, `${name}.mig`);
      const fromFile = await livemig(['analyze', file, '--dump', 'state']);
      assert.equal(fromFile.status, 0, fromFile.stderr);
      // Field by field first (a readable diff), then the exact text.
      assert.deepEqual(JSON.parse(fromFile.stdout), JSON.parse(expected!));
      assert.equal(fromFile.stdout, expected);
      // Standard input: device sections found by their footers, decoded once the VMDESCRIPTION arrives.
      const fromStdin = await livemig(['analyze', '-', '--dump', 'state'], file);
      assert.equal(fromStdin.status, 0, fromStdin.stderr);
      assert.equal(fromStdin.stdout, expected);
    });
  }

  const script = process.env['LIVEMIG_ANALYZE_MIGRATION_PY'];
  for (const name of STATE_FIXTURES) {
    it(`${name}: --dump state equals QEMU's analyze-migration.py run now`, { skip: script === undefined ? 'LIVEMIG_ANALYZE_MIGRATION_PY not set' : false }, async () => {
      const file = join(fixtureDir, `${name}.mig`);
      const py = await new Promise<string>((res, rej) =>
        execFile('python3', [script!, '-f', file], { timeout: CHILD_TIMEOUT_MS, maxBuffer: 64 << 20 }, (e, out) => (e === null ? res(out) : rej(e))),
      );
      const ours = await livemig(['analyze', file, '--dump', 'state']);
      assert.equal(ours.stdout, py);
    });
  }

  it('the one-file build of analyze (dist/analyze-bundle.js, what the command loads) prints what its ES modules print', async () => {
    assert.ok(existsSync(resolve(here, '../dist/analyze-bundle.js')), 'tsc -b writes dist/analyze-bundle.js');
    const file = join(fixtureDir, 'pc-q35-7.2-64m.mig');
    // The ES modules, imported in a child of their own.
    const viaModules = (dumpState: boolean): Promise<string> => {
      const script = `import { analyzeInput, humanReport, jsonReport, stateDumpText } from ${JSON.stringify(resolve(here, '../dist/analyze.js'))};
        const r = await analyzeInput({ input: process.argv[1], dumpState: ${dumpState} });
        process.stdout.write(${dumpState} ? stateDumpText(r.state) : humanReport(r.report, process.argv[1]) + JSON.stringify(jsonReport(r.report)) + '\\n');
        r.close();`;
      return new Promise((res, rej) =>
        execFile(process.execPath, ['--input-type=module', '-e', script, file], { timeout: CHILD_TIMEOUT_MS, maxBuffer: 64 << 20 }, (e, out) => (e === null ? res(out) : rej(e))),
      );
    };
    const state = await livemig(['analyze', file, '--dump', 'state']);
    assert.equal(state.status, 0, state.stderr);
    assert.equal(state.stdout, await viaModules(true));
    const human = await livemig(['analyze', file]);
    const json = await livemig(['analyze', file, '--json']);
    assert.equal(human.status, 0, human.stderr);
    assert.equal(human.stdout + json.stdout, await viaModules(false));
  });

  it('the one-file build is left for the ES modules when a source it holds is newer than its last build', async () => {
    const buildInfo = resolve(here, '../dist/analyze-bundle.tsbuildinfo');
    assert.ok(existsSync(buildInfo), 'tsc -b writes the one-file build and its build info');
    // A preload that says when the command runs the one-file build (main.cts hands it to vm).
    const preload = join(tmp, 'show-bundle.cjs');
    writeFileSync(
      preload,
      "const vm = require('node:vm'); const run = vm.runInThisContext;\n" +
        "vm.runInThisContext = function (code, options) { if (String(options && options.filename).endsWith('analyze-bundle.js')) process.stderr.write('one-file build loaded\\n'); return run.apply(this, arguments); };\n",
    );
    const file = join(fixtureDir, 'none-m0-64m.mig');
    const run = (): Promise<Ran> =>
      new Promise((res, rej) =>
        execFile(process.execPath, ['--require', preload, MAIN, 'analyze', file, '--dump', 'state'], { timeout: CHILD_TIMEOUT_MS, maxBuffer: 64 << 20 }, (e, stdout, stderr) =>
          e !== null && typeof e.code !== 'number' ? rej(e) : res({ status: e === null ? 0 : (e.code as number), stdout, stderr }),
        ),
      );
    const fresh = await run();
    assert.equal(fresh.status, 0, fresh.stderr);
    assert.match(fresh.stderr, /^one-file build loaded$/m, 'a fresh build is used');
    const { atime, mtime } = statSync(buildInfo);
    try {
      // As if the sources had changed since its last build (tsc -b of one package alone).
      utimesSync(buildInfo, atime, new Date(0));
      const stale = await run();
      assert.equal(stale.status, 0, stale.stderr);
      assert.doesNotMatch(stale.stderr, /one-file build loaded/, 'a stale build is not used');
      assert.equal(stale.stdout, fresh.stdout);
    } finally {
      utimesSync(buildInfo, atime, mtime);
    }
  });

  it('the livemig bin runs analyze without NODE_EXTRA_CA_CERTS and every other command with it, --help unchanged', async () => {
    const bin = resolve(here, '../bin/livemig.js');
    const preload = join(tmp, 'show-extra-ca.cjs');
    writeFileSync(preload, "process.stderr.write('NODE_EXTRA_CA_CERTS=' + (process.env.NODE_EXTRA_CA_CERTS ?? '(unset)') + '\\n');\n");
    const run = (args: string[]): Promise<Ran> =>
      new Promise((res, rej) =>
        execFile(bin, args, { timeout: CHILD_TIMEOUT_MS, env: { ...process.env, NODE_EXTRA_CA_CERTS: join(tmp, 'no-such-ca.pem'), NODE_OPTIONS: `--require ${preload}` } }, (e, stdout, stderr) =>
          e !== null && typeof e.code !== 'number' ? rej(e) : res({ status: e === null ? 0 : (e.code as number), stdout, stderr }),
        ),
      );
    const analyze = await run(['analyze', join(fixtureDir, 'none-m0-64m.mig'), '--dump', 'state']);
    assert.equal(analyze.status, 0, analyze.stderr);
    assert.match(analyze.stderr, /^NODE_EXTRA_CA_CERTS=\(unset\)$/m);
    assert.equal(analyze.stdout, (await livemig(['analyze', join(fixtureDir, 'none-m0-64m.mig'), '--dump', 'state'])).stdout);
    const help = await run(['--help']);
    assert.equal(help.status, 0, help.stderr);
    assert.match(help.stderr, new RegExp(`^NODE_EXTRA_CA_CERTS=${join(tmp, 'no-such-ca.pem').replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}$`, 'm'));
    assert.equal(help.stdout, (await livemig(['--help'])).stdout);
  });

  it('--dump state of a stream without VMDESCRIPTION: one line naming the problem, exit 2', async () => {
    const r = await livemig(['analyze', join(fixtureDir, 'live-tcp-postcopy-requests-32m.mig'), '--dump', 'state']);
    assert.equal(r.status, 2);
    assert.equal(r.stdout, '');
    assert.match(r.stderr, /^livemig: .*live-tcp-postcopy-requests-32m\.mig: LM_ERR_BAD_VMDESCRIPTION: the stream has no VMDESCRIPTION .* \(at stream offset 1992795\)\n$/);
  });

  it('--dump with anything but "state": a usage error, exit 1', async () => {
    const r = await livemig(['analyze', join(fixtureDir, 'none-m0-64m.mig'), '--dump', 'desc']);
    assert.equal(r.status, 1);
    assert.match(r.stderr, /^livemig: analyze: --dump desc: only "state" is known/);
  });
});

countSkippedWithoutFixtures('livemig analyze on the QEMU 7.2 streams');
