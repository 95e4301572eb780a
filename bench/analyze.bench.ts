// `livemig analyze` of a 512 MiB stream: throughput and peak RSS, next to
//   - the ceilings measured in the same run: a Node process reading the file in 1 MiB reads
//     (what `--dump state`, which hashes nothing, must do at least), and reading and hashing all
//     of it with sha256 (what the default analysis, which verifies every byte, must do at least);
//   - QEMU's scripts/analyze-migration.py on the same file doing the same job (its default
//     `-d state`, which skips page payloads), when it is found (LIVEMIG_ANALYZE_MIGRATION_PY, or an
//     `apt-get source qemu` tree in the temp directory);
//   - Node's own start-up (`node -e 0`) and `livemig --help`, which every run pays;
//   - reading only the record headers: one 16-byte pread per 4,104-byte page record (what seeking
//     past page payloads, as the script does, costs in Node), against reading every byte.
// NODE_EXTRA_CA_CERTS, when set, makes every Node process parse that certificate file before it runs
// any JavaScript. `livemig` is run as users run it, through the bin, which drops that variable for
// `analyze`, and so are the ceilings it is set against; Node's start-up and `node dist/main.cjs
// analyze --dump state` (the same but for parsing that file) are measured with it too, and said so.
// The stream is QEMU 7.2's `migrate exec:cat > FILE` of a stopped 512 MiB guest of random bytes
// (so the script can read it too), or livemig's own `file:` migration when QEMU is missing.
// LIVEMIG_BENCH_STREAM=FILE analyzes that file instead of making one. A livemig stream of a
// 512 MiB guest with its VFIO device's data (MiB-sized sections) is analyzed too, for its peak
// RSS (LIVEMIG_BENCH_VFIO=0 skips it).
//
// Each command runs as a child of a small python3 wrapper that reports the wall time, the child's
// CPU time and its peak RSS (getrusage RUSAGE_CHILDREN: exact, no polling). The commands of a
// comparison run in turn, rep by rep, so that a change in the machine's load falls on all of them.

import { execFileSync, spawn } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { closeSync, existsSync, openSync, readdirSync, statSync, writeSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import type { QmpClient } from '../packages/runtime/src/index.ts';
import { type Child, connectQmp, SOURCE_MAIN } from '../packages/cli/src/demo.ts';
import { fmt, type Figure, repoRoot, summarize } from './ceilings.ts';

const MiB = 2 ** 20;
const GiB = 2 ** 30;
const GUEST_BYTES = 512 * MiB;
const reps = Number(process.env['LIVEMIG_BENCH_REPS'] ?? 3);
const CLI_MAIN = join(repoRoot, 'packages/cli/dist/main.cjs');
/** The `livemig` command as pnpm links it (sh, then Node: see the file). */
const CLI_BIN = join(repoRoot, 'packages/cli/bin/livemig.js');
const QEMU = process.env['LIVEMIG_QEMU'] ?? 'qemu-system-x86_64';
const RUN_TIMEOUT_MS = 600_000;

/**
 * Runs argv[1:] once, prints "wall_s maxrss_kib status cpu_s" (RUSAGE_CHILDREN: that child alone;
 * the CPU time of children python3 itself may have started and reaped before, taken off).
 */
const MEASURE_PY = `
import resource, subprocess, sys, time
b = resource.getrusage(resource.RUSAGE_CHILDREN)
t = time.monotonic()
r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL)
w = time.monotonic() - t
u = resource.getrusage(resource.RUSAGE_CHILDREN)
print(w, u.ru_maxrss, r.returncode, u.ru_utime + u.ru_stime - b.ru_utime - b.ru_stime)
`;

/** Read a file in 1 MiB reads into one buffer: the floor of an analysis that hashes nothing. */
const READ_JS = `
const { openSync, readSync } = require('node:fs');
const fd = openSync(process.argv[1], 'r');
const buf = Buffer.allocUnsafeSlow(1 << 20);
let total = 0;
for (let pos = 0, n; (n = readSync(fd, buf, 0, buf.length, pos)) > 0; pos += n) total += n;
console.log(total);
`;

/** Read a file in 1 MiB reads into one buffer and sha256 all of it: the default analysis's floor. */
const CEILING_JS = `
const { openSync, readSync } = require('node:fs');
const hash = require('node:crypto').createHash('sha256');
const fd = openSync(process.argv[1], 'r');
const buf = Buffer.allocUnsafeSlow(1 << 20);
for (let pos = 0, n; (n = readSync(fd, buf, 0, buf.length, pos)) > 0; pos += n) hash.update(n === buf.length ? buf : buf.subarray(0, n));
console.log(hash.digest('hex'));
`;

/** One 16-byte pread per 4,104-byte record (a page record's size), as a header-only reader would make. */
const PREAD_HEADERS_JS = `
const { openSync, readSync, fstatSync } = require('node:fs');
const fd = openSync(process.argv[1], 'r');
const size = fstatSync(fd).size;
const buf = Buffer.allocUnsafeSlow(16);
let calls = 0;
for (let pos = 0; pos + 16 <= size; pos += 4104) calls += readSync(fd, buf, 0, 16, pos) > 0 ? 1 : 0;
console.log(calls);
`;

interface Measured {
  seconds: Figure;
  cpuSeconds: Figure;
  peakRssMiB: Figure;
}

/** A command line, run with NODE_EXTRA_CA_CERTS removed from its environment. */
const WITHOUT_EXTRA_CA = ['env', '-u', 'NODE_EXTRA_CA_CERTS'];

function runOnce(label: string, argv: string[]): [number, number, number] {
  const out = execFileSync('python3', ['-c', MEASURE_PY, ...argv], { encoding: 'utf8', timeout: RUN_TIMEOUT_MS, stdio: ['ignore', 'pipe', 'inherit'] });
  const [s, kib, status, cpuS] = out.trim().split(/\s+/).map(Number);
  if (status !== 0) throw new Error(`${label} exited with status ${status}: ${argv.join(' ')}`);
  return [s!, cpuS!, kib! / 1024];
}

/** Each command `reps` times, in turn (one run of each per round). A command that fails is left out of the result. */
function measureInTurn(commands: Record<string, string[]>): Record<string, Measured | Error> {
  const samples: Record<string, [number, number, number][] | Error> = {};
  for (const label of Object.keys(commands)) samples[label] = [];
  for (let i = 0; i < reps; i++) {
    for (const [label, argv] of Object.entries(commands)) {
      const got = samples[label]!;
      if (got instanceof Error) continue;
      try {
        got.push(runOnce(label, argv));
      } catch (err) {
        samples[label] = err as Error;
      }
    }
  }
  const out: Record<string, Measured | Error> = {};
  for (const [label, got] of Object.entries(samples)) {
    out[label] =
      got instanceof Error
        ? got
        : { seconds: summarize(got.map((x) => x[0])), cpuSeconds: summarize(got.map((x) => x[1])), peakRssMiB: summarize(got.map((x) => x[2])) };
  }
  return out;
}

/** analyze-migration.py: LIVEMIG_ANALYZE_MIGRATION_PY, else an `apt-get source qemu` tree up to two levels down in the temp directory. */
function findAnalyzeMigrationPy(): string | undefined {
  const given = process.env['LIVEMIG_ANALYZE_MIGRATION_PY'];
  if (given !== undefined) return existsSync(given) ? given : undefined;
  const tmp = tmpdir();
  const dirs = [tmp];
  for (const a of safeList(tmp)) dirs.push(join(tmp, a));
  for (const d of dirs) {
    for (const e of safeList(d)) {
      const p = join(d, e, 'scripts', 'analyze-migration.py');
      if (e.startsWith('qemu-') && existsSync(p)) return p;
    }
  }
  return undefined;
}

function safeList(dir: string): string[] {
  try {
    return readdirSync(dir).filter((e) => {
      try {
        return statSync(join(dir, e)).isDirectory();
      } catch {
        return false;
      }
    });
  } catch {
    return [];
  }
}

function qemuAvailable(): boolean {
  try {
    execFileSync(QEMU, ['--version'], { stdio: 'ignore', timeout: 10_000 });
    return true;
  } catch {
    return false;
  }
}

/** A RAM image of random bytes, written in 4 MiB pieces (the bench itself stays small). */
function writeRandomImage(file: string, bytes: number): void {
  const fd = openSync(file, 'w');
  try {
    const piece = Buffer.allocUnsafeSlow(4 * MiB);
    for (let done = 0; done < bytes; done += piece.length) {
      randomFillSync(piece);
      writeSync(fd, piece, 0, Math.min(piece.length, bytes - done));
    }
  } finally {
    closeSync(fd);
  }
}

async function waitCompleted(q: QmpClient, what: string): Promise<void> {
  const deadline = Date.now() + 300_000;
  for (;;) {
    const info = (await q.execute('query-migrate')) as { status?: string; 'error-desc'?: string };
    if (info.status === 'completed') return;
    if (info.status === 'failed' || info.status === 'cancelled') throw new Error(`${what}: migration ${info.status}: ${info['error-desc'] ?? ''}`);
    if (Date.now() > deadline) throw new Error(`${what}: migration did not complete within 300 s`);
    await sleep(100);
  }
}

/** QEMU 7.2: a stopped 512 MiB `-machine none` guest saved with migrate exec:cat > FILE. */
async function qemuStream(dir: string, file: string): Promise<void> {
  const image = join(dir, 'ram.img');
  writeRandomImage(image, GUEST_BYTES);
  const qmp = join(dir, 'qemu.qmp');
  const proc = spawn(
    QEMU,
    ['-object', `memory-backend-file,id=m0,size=${GUEST_BYTES},mem-path=${image},share=on`, '-machine', 'none,memory-backend=m0', '-m', `${GUEST_BYTES / MiB}M`, '-nodefaults', '-display', 'none', '-accel', 'tcg', '-S', '-qmp', `unix:${qmp},server=on,wait=off`],
    { stdio: ['ignore', 'pipe', 'pipe'] },
  );
  const child: Child = { name: 'qemu', proc, log: [] };
  proc.stdout!.on('data', (b: Buffer) => child.log.push(b.toString()));
  proc.stderr!.on('data', (b: Buffer) => child.log.push(b.toString()));
  let q: QmpClient | undefined;
  try {
    q = await connectQmp(child, `unix:${qmp}`, 30_000);
    await q.execute('migrate', { uri: `exec:cat > ${file}` });
    await waitCompleted(q, 'QEMU');
  } finally {
    await q?.close().catch(() => {});
    if (proc.exitCode === null && proc.pid !== undefined) process.kill(proc.pid, 'SIGKILL');
    await rm(image, { force: true });
  }
}

/** livemig's own: a paused 512 MiB source migrated to file:FILE. */
function livemigStream(file: string): void {
  execFileSync(process.execPath, [SOURCE_MAIN, '-m', '512M', '--fill', 'random', '-S', '--migrate', `file:${file}`, '--exit-after-migrate'], {
    stdio: 'ignore',
    timeout: 300_000,
    env: { ...process.env, LIVEMIG_LOG_LEVEL: 'warn' },
  });
}

function line(label: string, m: Measured, bytes: number, extra = ''): void {
  const gibps = summarize([bytes / GiB / m.seconds.max, bytes / GiB / m.seconds.median, bytes / GiB / m.seconds.min]);
  console.log(`  ${label.padEnd(34)} ${fmt(gibps)} GiB/s  ${m.seconds.median.toFixed(2)} s (CPU ${m.cpuSeconds.median.toFixed(2)} s)  peak RSS ${m.peakRssMiB.median.toFixed(0)} MiB (max ${m.peakRssMiB.max.toFixed(0)})${extra}`);
}

function pct(ceiling: Measured, m: Measured): string {
  return `  = ${((100 * ceiling.seconds.median) / m.seconds.median).toFixed(0)} % of its ceiling`;
}

/** Peak RSS bound of `livemig analyze` (issue #15): said next to the figure, not asserted. */
const RSS_BOUND_MIB = 64;

export async function analyzeBench(): Promise<void> {
  const dir = await mkdtemp(join(tmpdir(), 'livemig-bench-analyze-'));
  try {
    let file = process.env['LIVEMIG_BENCH_STREAM'];
    let origin = 'given by LIVEMIG_BENCH_STREAM';
    if (file === undefined) {
      file = join(dir, 'stream.mig');
      if (qemuAvailable()) {
        await qemuStream(dir, file);
        origin = 'QEMU 7.2 migrate exec:cat of a stopped 512 MiB guest';
      } else {
        livemigStream(file);
        origin = 'livemig file: migration of a paused 512 MiB guest (QEMU not found)';
      }
    }
    const bytes = statSync(file).size;
    const py = findAnalyzeMigrationPy();
    const extraCa = process.env['NODE_EXTRA_CA_CERTS'] !== undefined;
    console.log(`analyze: ${(bytes / MiB).toFixed(0)} MiB stream (${origin}), median of ${reps} [min-max], all commands run in turn`);
    const noCa = extraCa ? WITHOUT_EXTRA_CA : [];
    const commands: Record<string, string[]> = {
      node: [process.execPath, '-e', '0'],
      python: ['python3', '-c', '0'],
      help: [CLI_BIN, '--help'],
      read: [...noCa, process.execPath, '-e', READ_JS, file],
      preads: [...noCa, process.execPath, '-e', PREAD_HEADERS_JS, file],
      ceiling: [...noCa, process.execPath, '-e', CEILING_JS, file],
      state: [CLI_BIN, 'analyze', file, '--dump', 'state'],
      analyze: [CLI_BIN, 'analyze', file],
      ...(py === undefined ? {} : { py: ['python3', py, '-f', file] }),
      ...(extraCa ? { nodeNoCa: [...WITHOUT_EXTRA_CA, process.execPath, '-e', '0'], stateCa: [process.execPath, CLI_MAIN, 'analyze', file, '--dump', 'state'] } : {}),
    };
    const m = measureInTurn(commands);
    const got = (label: string): Measured => {
      const r = m[label]!;
      if (r instanceof Error) throw r;
      return r;
    };
    const up = (label: string): string => `${got(label).seconds.median.toFixed(3)} s (CPU ${got(label).cpuSeconds.median.toFixed(3)} s)`;
    console.log(`  start-up: node -e 0 ${up('node')}, livemig --help ${up('help')} (peak RSS ${got('help').peakRssMiB.median.toFixed(0)} MiB), python3 -c 0 ${up('python')}`);
    line('ceiling: read in Node', got('read'), bytes);
    line('header preads (16 B per record)', got('preads'), bytes, '  (why a file is read whole)');
    line('livemig analyze --dump state', got('state'), bytes, pct(got('read'), got('state')));
    line('ceiling: read + sha256 in Node', got('ceiling'), bytes);
    line('livemig analyze (sha256 of all)', got('analyze'), bytes, pct(got('ceiling'), got('analyze')));
    const worst = Math.max(got('state').peakRssMiB.max, got('analyze').peakRssMiB.max);
    console.log(`  peak RSS of livemig analyze: at most ${worst.toFixed(0)} MiB (bound ${RSS_BOUND_MIB} MiB: ${worst <= RSS_BOUND_MIB ? 'within' : 'OVER'})`);
    if (py === undefined) {
      console.log('  analyze-migration.py: not found (set LIVEMIG_ANALYZE_MIGRATION_PY, or unpack `apt-get source qemu` in the temp directory)');
    } else if (m['py'] instanceof Error) {
      console.log(`  analyze-migration.py: cannot read this stream (${m['py'].message.split('\n')[0]})`);
    } else {
      const theirs = got('py');
      line('analyze-migration.py -d state', theirs, bytes);
      const x = (mm: Measured): string =>
        `${(theirs.seconds.median / mm.seconds.median).toFixed(1)}× faster [${(theirs.seconds.min / mm.seconds.max).toFixed(1)}-${(theirs.seconds.max / mm.seconds.min).toFixed(1)}] (CPU time ${(theirs.cpuSeconds.median / mm.cpuSeconds.median).toFixed(1)}×), ${(mm.peakRssMiB.median / theirs.peakRssMiB.median).toFixed(1)}× its RSS`;
      console.log(`  vs analyze-migration.py: --dump state (the same job, the same output) ${x(got('state'))}`);
      console.log(`                           analyze (also hashes every page) ${x(got('analyze'))}`);
    }
    if (extraCa) {
      console.log(`  NODE_EXTRA_CA_CERTS is set: every Node process parses it at start-up (the bin drops it for analyze). Without it: node -e 0 ${up('nodeNoCa')}`);
      line('node main.cjs --dump state, CA parsed', got('stateCa'), bytes, py === undefined || m['py'] instanceof Error ? '' : `  = ${(got('py').seconds.median / got('stateCa').seconds.median).toFixed(1)}× faster than analyze-migration.py (CPU ${(got('py').cpuSeconds.median / got('stateCa').cpuSeconds.median).toFixed(1)}×)`);
    }
    if (process.env['LIVEMIG_BENCH_VFIO'] !== '0') {
      const lm = join(dir, 'livemig-vfio.mig');
      livemigStream(lm);
      const lmBytes = statSync(lm).size;
      const v = measureInTurn({ analyze: [CLI_BIN, 'analyze', lm], json: [CLI_BIN, 'analyze', lm, '--json'] });
      console.log(`analyze: ${(lmBytes / MiB).toFixed(0)} MiB livemig stream of a paused 512 MiB guest with its VFIO device's data`);
      for (const [label, r] of Object.entries(v)) {
        if (r instanceof Error) console.log(`  livemig analyze ${label}: ${r.message.split('\n')[0]}`);
        else line(`livemig analyze${label === 'json' ? ' --json' : ''}`, r, lmBytes);
      }
    }
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}
