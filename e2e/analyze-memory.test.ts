// End-to-end: `livemig analyze` of a stream file holds no copy of the guest's RAM. A stopped
// 192 MiB source migrates to file:PATH; the analysis must report the source's own block digests
// with a peak RSS below the RAM size (rebuilding RAM, as analyze once did, needs more than that
// by itself). Peak RSS comes from getrusage(RUSAGE_CHILDREN) in a python3 wrapper: exact, no polling.
//
// Run: pnpm build && node --import tsx --test --test-concurrency=1 e2e/analyze-memory.test.ts

import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { test } from 'node:test';
import { blockShas, digest, MiB, waitForStatus } from './helpers/migration.ts';
import { CLI_MAIN, withHarness } from './helpers/processes.ts';

const GUEST_MIB = 192;

/** Prints "maxrss_kib status" of argv[1:] (its stdout goes to ours). */
const PEAK_RSS_PY = `
import resource, subprocess, sys
r = subprocess.run(sys.argv[1:])
sys.stderr.write("peak-rss-kib %d status %d\\n" % (resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode))
`;

test(`livemig analyze of a ${GUEST_MIB} MiB guest's stream file: the source's block digests, peak RSS below the RAM size`, { timeout: 300_000 }, () =>
  withHarness(async (h) => {
    const file = h.path('stream.mig');
    const src = await h.source({ guest: ['-m', `${GUEST_MIB}M`, '--fill', 'random', '--qemu-devices-only'], args: ['-S'], name: 'src' });
    await src.execute('migrate', { uri: `file:${file}` });
    await waitForStatus(src, 'completed', { timeoutMs: 120_000 });
    const want = blockShas(await digest(src));

    const { stdout, stderr } = await new Promise<{ stdout: string; stderr: string }>((resolve, reject) =>
      execFile('python3', ['-c', PEAK_RSS_PY, process.execPath, CLI_MAIN, 'analyze', file, '--json'], { timeout: 120_000, maxBuffer: 64 * MiB }, (err, out, errOut) =>
        err === null ? resolve({ stdout: out, stderr: errOut }) : reject(err),
      ),
    );
    const m = /peak-rss-kib (\d+) status (\d+)/.exec(stderr);
    assert.ok(m !== null, stderr);
    assert.equal(Number(m[2]), 0, stderr);
    const report = JSON.parse(stdout) as { ramBlocks: { idstr: string; length: number; sha256: string }[] };
    assert.deepEqual(Object.fromEntries(report.ramBlocks.map((b) => [b.idstr, b.sha256])), want);
    assert.ok(report.ramBlocks.some((b) => b.length === GUEST_MIB * MiB));
    const peakMiB = Number(m[1]) / 1024;
    assert.ok(peakMiB < GUEST_MIB, `peak RSS ${peakMiB.toFixed(0)} MiB, guest RAM ${GUEST_MIB} MiB`);
  }));
