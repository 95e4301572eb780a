// livemig beside real QEMU (7.2, and 10.0 where installed), precopy over tcp loopback, the same
// guest for each engine, in interleaved rounds: QEMU 7.2, QEMU 10.0, livemig, then the next round.
// Each figure is a ratio taken within its round (the machine is shared: only same-round ratios
// mean anything), and the row prints the median of those ratios:
//   1. one stream, random guest: livemig GiB/s ÷ QEMU's (goal ≥ 1.3) and ÷ the Node loopback
//      ceiling measured in the same round (goal ≥ 0.95);
//   2. multifd, 2 and 4 channels, the same guest: livemig ÷ QEMU with the same count (goal ≥ 1.2);
//   3. all-zero guest: livemig total-time ÷ QEMU's (goal ≤ 1.0);
//   4. a small dirtying guest: each engine's downtime ÷ downtime-limit (goal ≤ 1.0);
//   5. livemig alone: ms per GiB at 256 MiB / 4 GiB (goal: flat within ±15 %) and each
//      process's peak RSS above a bare Node process (goal ≤ RAM + 64 MiB).
//
// The guests. QEMU runs `-machine none` with one RAM block "m0" (no vCPU, nothing but RAM to
// move), livemig the same layout (`--block m0:256M --machine none --qemu-devices-only`; the size is
// LIVEMIG_BENCH_GUEST). Random content: QEMU's m0 maps a file of random bytes in /dev/shm, livemig fills m0 with random
// bytes; both are incompressible and hold no zero page, so each engine moves the same page count.
// Every destination RAM is touched before the migration (QEMU: prealloc=on; livemig prefaults),
// and so is the random source's. The dirtying guest is a 128 MiB `-M pc` whose firmware is a
// 92-byte ROM written below (QEMU), and livemig's incrementer workload at 60 MB/s (about the
// ROM's nominal rate; livemig's pages are all distinct, the ROM's are 144 pages over and over).
// (256 MiB before the default run was cut to a few minutes).
//
// Throughput is guest RAM bytes ÷ total-time for every engine (transferred bytes differ by a
// few headers). Rounds: LIVEMIG_BENCH_ROUNDS (default 3, the least that gives a median); with
// two QEMUs a round runs 15 migrations. The guest is 256 MiB by default (LIVEMIG_BENCH_GUEST=1G),
// and livemig's random and zero sources are started once
// and kept (KeptSource): what makes the default run a few minutes. The sizes are 256 MiB (the
// one-stream row's runs) and 4 GiB, one run (LIVEMIG_BENCH_SIZES=256M,1G,4G adds 1 GiB,
// LIVEMIG_BENCH_SIZES=256M,1G skips 4 GiB on a small machine; empty skips the sweep).
// LIVEMIG_BENCH_ROWS=stream,multifd2,multifd4 runs only those rows (keys: stream, multifd2,
// multifd4, zero, downtime). LIVEMIG_BENCH_CPU_PROF=DIR writes a --cpu-prof profile of every
// livemig process into DIR.

import { execFileSync, spawn } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { existsSync, openSync, closeSync, writeSync, readFileSync } from 'node:fs';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import type { QmpClient } from '../packages/runtime/src/index.ts';
import { type Child, connectQmp, DESTINATION_MAIN, incomingAddress, keepOutput, SOURCE_MAIN, startProcess } from '../packages/cli/src/demo.ts';
import { contiguousCeiling, loopbackCeiling } from './migration.bench.ts';
import { summarize } from './ceilings.ts';
import { type RoundRatio, roundRatio } from './round-ratio.ts';
import { wantRow } from './rows.ts';

const GiB = 2 ** 30;
const MiB = 2 ** 20;
const ROUNDS = Number(process.env['LIVEMIG_BENCH_ROUNDS'] ?? 3);
/** The ends of the range by default (256 MiB from the rows, 4 GiB one run); LIVEMIG_BENCH_SIZES=256M,1G,4G adds the middle. */
const SIZES = (process.env['LIVEMIG_BENCH_SIZES'] ?? '256M,4G').split(',').filter((s) => s !== '');
/** A folder for --cpu-prof profiles of every livemig process the bench starts (off when unset). */
const CPU_PROF_DIR = process.env['LIVEMIG_BENCH_CPU_PROF'];
const NODE_ARGS = CPU_PROF_DIR === undefined ? [] : ['--cpu-prof', `--cpu-prof-dir=${CPU_PROF_DIR}`];
/**
 * The random and all-zero guests' size: 256 MiB by default, so that three rounds of every row fit
 * in a few minutes on a loaded two-core machine (one 1 GiB livemig run took 40 s there, most of it
 * starting processes); LIVEMIG_BENCH_GUEST=1G for the size the issue's figures were taken at.
 */
const GUEST = process.env['LIVEMIG_BENCH_GUEST'] ?? '256M';
const DOWNTIME_LIMIT_MS = 100;
/** Bound on one migration (a 4 GiB guest on a loaded machine included). */
const MIGRATION_MS = 300_000;
/**
 * Bound on a process's QMP socket: a livemig source fills and touches its RAM before it listens,
 * a destination prefaults before it listens for the migration (a minute per GiB on a busy machine).
 */
const START_MS = 300_000;

interface Qemu {
  label: string;
  binary: string;
  /** Firmware folder flags for a QEMU unpacked beside the system's. */
  dataDir: string[];
  version: string;
}

/** The QEMUs installed here, each with its `--version` line; a missing one is said, not fatal. */
function findQemus(): { found: Qemu[]; missing: string[] } {
  const candidates = [
    { label: 'QEMU 7.2', binary: process.env['LIVEMIG_QEMU_7_2'] ?? 'qemu-system-x86_64', dataDir: [] as string[] },
    {
      label: 'QEMU 10.0',
      binary: process.env['LIVEMIG_QEMU_10_0'] ?? '/opt/qemu-10.0/usr/bin/qemu-system-x86_64',
      dataDir: ['-L', process.env['LIVEMIG_QEMU_10_0_DATA'] ?? '/opt/qemu-10.0/usr/share/qemu'],
    },
  ];
  const found: Qemu[] = [];
  const missing: string[] = [];
  for (const c of candidates) {
    try {
      const version = execFileSync(c.binary, ['--version'], { timeout: 10_000, stdio: ['ignore', 'pipe', 'ignore'] }).toString().split('\n')[0]!.trim();
      found.push({ ...c, version });
    } catch {
      missing.push(`${c.label} (${c.binary}) is not installed: its rows print livemig alone`);
    }
  }
  return { found, missing };
}

// ─── the dirtying guest's firmware ────────────────────────────────────────────────────────────
//
// 16-bit real mode, mapped at 0xF0000 (the 64 KiB -bios image's alias below 1 MiB); the reset
// vector at 0xFFFF0 jumps to its start. It routes the PIC through the local APIC (LINT0 as
// ExtINT, as SeaBIOS does; real mode reaches 0xFEE00000 with a 32-bit address), sets the PIT to
// 100 Hz, then forever: increment one byte in each 4 KiB page from 0x10000 to 0x9FFFF, hlt until
// the next tick. A hlt-paced guest leaves the CPU to the migration (a spinning TCG vCPU would take
// a whole core of this two-core machine).
//
//   cli; xor ax,ax; mov ss,ax; mov sp,0x7c00; mov ds,ax
//   mov dword [0xfee000f0], 0x1ff      ; APIC software-enabled
//   mov dword [0xfee00350], 0x700      ; LINT0: ExtINT
//   mov word [0x20], handler; mov word [0x22], 0xf000   ; IRQ0 → vector 8 → iret
//   PIC: ICW1 0x11, ICW2 0x08, ICW3 0x04, ICW4 0x01, mask all but IRQ0
//   PIT: channel 0, mode 2, 11932 (100 Hz)
// sweep: for ds = 0x1000 … 0x9f00 step 0x100: inc byte [0]
//   sti; hlt; cli; EOI; jmp sweep
// handler: iret
const DIRTYING_ROM_CODE = Buffer.from(
  'fa31c08ed0bc007c8ed86766c705f000e0feff0100006766c7055003e0fe00070000c70620006800c706220000f0' +
    'b011e620b008e621b004e621b001e621b0fee621b034e643b09ce640b02ee640b800108ed8fe0600000500013d' +
    '00a072f2fbf4fab020e620ebe6cf',
  'hex',
);

function dirtyingRom(): Buffer {
  const rom = Buffer.alloc(64 * 1024);
  DIRTYING_ROM_CODE.copy(rom, 0);
  // Reset vector (0xFFFFFFF0 = offset 0xFFF0): jmp far 0xF000:0x0000.
  Buffer.from([0xea, 0x00, 0x00, 0x00, 0xf0]).copy(rom, 0xfff0);
  return rom;
}

// ─── one migration each ───────────────────────────────────────────────────────────────────────

interface MigrationFigures {
  totalMs: number;
  downtimeMs: number;
  /** Peak RSS (VmHWM) of the source and the destination, bytes. */
  sourcePeakRss: number;
  destinationPeakRss: number;
  /**
   * livemig: CPU time of each process's main thread from the migrate command to completion (ms),
   * a figure that other processes' load on a shared machine moves far less than total-time.
   */
  sourceCpuMs?: number;
  destinationCpuMs?: number;
  /** The same for all of each process's threads (the channels' writer and reader threads too; 10 ms ticks). */
  sourceAllCpuMs?: number;
  destinationAllCpuMs?: number;
}

interface MigrationInfo {
  status: string;
  'total-time'?: number;
  downtime?: number;
  'error-desc'?: string;
}

/** CPU time a process's main thread has run so far (ms; NaN when it is gone). */
function mainThreadCpuMs(pid: number | undefined): number {
  if (pid === undefined) return NaN;
  try {
    // The first field is nanoseconds on a CPU.
    return Number(readFileSync(`/proc/${pid}/task/${pid}/schedstat`, 'utf8').split(' ')[0]) / 1e6;
  } catch {
    return NaN;
  }
}

/** CPU time all of a process's threads have run so far, those gone included (ms, in 10 ms ticks; NaN when it is gone). */
function processCpuMs(pid: number | undefined): number {
  if (pid === undefined) return NaN;
  try {
    // After the command's closing parenthesis: utime and stime are the 12th and 13th fields, in ticks of 10 ms.
    const fields = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]!.split(' ');
    return (Number(fields[11]) + Number(fields[12])) * 10;
  } catch {
    return NaN;
  }
}

function peakRss(pid: number | undefined): number {
  if (pid === undefined) return 0;
  try {
    const m = /VmHWM:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m === null ? 0 : Number(m[1]) * 1024;
  } catch {
    return 0;
  }
}

const FINAL = new Set(['completed', 'failed', 'cancelled']);

/**
 * Wait for the source's MIGRATION event with a final status (capability "events"), then read its
 * figures once. Not a query-migrate poll: livemig answers QMP on the thread that migrates (QEMU
 * on another), so polling would tax one engine more than the other.
 */
async function untilCompleted(source: QmpClient, children: Child[]): Promise<{ totalMs: number; downtimeMs: number }> {
  await source.waitForEvent('MIGRATION', (e) => FINAL.has(String(e.data?.['status'])), MIGRATION_MS);
  const info = (await source.execute('query-migrate')) as MigrationInfo;
  // An absent figure stays absent (NaN), never 0: the report leaves that round's ratio out and says why.
  if (info.status === 'completed') return { totalMs: info['total-time'] ?? NaN, downtimeMs: info.downtime ?? NaN };
  throw new Error(`migration ${info.status}: ${info['error-desc'] ?? ''}\n${children.map((c) => `${c.name}: ${c.log.join('').slice(-2000)}`).join('\n')}`);
}

/** Close the QMP clients, then stop each child: SIGTERM, SIGKILL after 3 s, each wait bounded. */
export async function stopAll(children: Child[], clients: QmpClient[]): Promise<void> {
  for (const c of clients) await c.close().catch(() => {});
  for (const c of children) {
    if (c.proc.exitCode !== null || c.proc.signalCode !== null) continue;
    const exited = new Promise((r) => c.proc.once('exit', r));
    // SIGTERM first: a livemig process then exits on its own (writing a --cpu-prof profile).
    c.proc.kill('SIGTERM');
    if ((await Promise.race([exited.then(() => true), sleep(3_000).then(() => false)])) === false) {
      c.proc.kill('SIGKILL');
      await Promise.race([exited, sleep(5_000)]);
    }
  }
}

function startQemu(q: Qemu, name: string, qmpPath: string, args: string[]): Child {
  const proc = spawn(q.binary, [...q.dataDir, '-nodefaults', '-display', 'none', ...args, '-qmp', `unix:${qmpPath},server=on,wait=off`], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  return keepOutput(`${q.label} ${name}`, proc);
}

export interface Run {
  /** QEMU: machine and RAM flags of the source and of the destination (without -incoming). */
  qemuSource: string[];
  qemuDestination: string[];
  /** livemig: guest flags, the same on both sides except --fill (the source's only). */
  livemigGuest: string[];
  livemigFill: string;
  multifdChannels: number;
  downtimeLimitMs?: number;
}

export async function qemuMigrate(q: Qemu, run: Run): Promise<MigrationFigures> {
  const dir = await mkdtemp(join(tmpdir(), 'livemig-qemu-bench-'));
  const children: Child[] = [];
  const clients: QmpClient[] = [];
  try {
    const caps = run.multifdChannels > 0 ? ['multifd'] : [];
    const dst = startQemu(q, 'destination', join(dir, 'd'), [...run.qemuDestination, '-incoming', 'defer']);
    children.push(dst);
    const dq = await connectQmp(dst, `unix:${join(dir, 'd')}`, START_MS);
    clients.push(dq);
    if (caps.length > 0) await dq.execute('migrate-set-capabilities', { capabilities: caps.map((capability) => ({ capability, state: true })) });
    if (run.multifdChannels > 0) await dq.execute('migrate-set-parameters', { 'multifd-channels': run.multifdChannels });
    await dq.execute('migrate-incoming', { uri: 'tcp:127.0.0.1:0' });
    const uri = await incomingAddress(dq, 30_000);

    const src = startQemu(q, 'source', join(dir, 's'), run.qemuSource);
    children.push(src);
    const sq = await connectQmp(src, `unix:${join(dir, 's')}`, START_MS);
    clients.push(sq);
    await sq.execute('migrate-set-capabilities', { capabilities: ['events', 'return-path', ...caps].map((capability) => ({ capability, state: true })) });
    const params: Record<string, unknown> = { 'max-bandwidth': 0 };
    if (run.multifdChannels > 0) params['multifd-channels'] = run.multifdChannels;
    if (run.downtimeLimitMs !== undefined) params['downtime-limit'] = run.downtimeLimitMs;
    await sq.execute('migrate-set-parameters', params);
    // A running guest dirties from the start: let it run a few ticks first, as livemig's does.
    if (run.downtimeLimitMs !== undefined) await sleep(300);
    await sq.execute('migrate', { uri });
    const t = await untilCompleted(sq, children);
    return { ...t, sourcePeakRss: peakRss(src.proc.pid), destinationPeakRss: peakRss(dst.proc.pid) };
  } finally {
    await stopAll(children, clients);
    await rm(dir, { recursive: true, force: true });
  }
}

/**
 * A livemig source kept for several migrations of one guest: filling and touching its RAM (random
 * bytes) takes longer than migrating it on a loaded machine, and a source migrates again from
 * postmigrate as QEMU's does, sending all of RAM each time. Only total-time and downtime are
 * compared, neither of which includes the start; its peak RSS is the highest over its migrations.
 */
export class KeptSource {
  readonly run: Run;
  readonly dir: Promise<string>;
  #started: Promise<{ child: Child; sq: QmpClient }> | undefined;

  constructor(run: Run) {
    this.run = run;
    this.dir = mkdtemp(join(tmpdir(), 'livemig-qemu-bench-'));
  }

  /** Started at the first migration, then the same process. */
  start(): Promise<{ child: Child; sq: QmpClient }> {
    this.#started ??= this.dir.then(async (dir) => {
      const child = startProcess('source', SOURCE_MAIN, ['--qmp', `unix:${join(dir, 's')}`, ...this.run.livemigGuest, '--fill', this.run.livemigFill], NODE_ARGS);
      try {
        return { child, sq: await connectQmp(child, `unix:${join(dir, 's')}`, START_MS) };
      } catch (err) {
        await stopAll([child], []);
        throw err;
      }
    });
    return this.#started;
  }

  async close(): Promise<void> {
    const started = await this.#started?.catch(() => undefined);
    if (started !== undefined) await stopAll([started.child], [started.sq]);
    await rm(await this.dir, { recursive: true, force: true });
  }
}

export async function livemigMigrate(run: Run, kept?: KeptSource): Promise<MigrationFigures> {
  const dir = await mkdtemp(join(tmpdir(), 'livemig-qemu-bench-'));
  const children: Child[] = [];
  const clients: QmpClient[] = [];
  try {
    const multifd = run.multifdChannels > 0 ? ['--capabilities', 'multifd', '--parameters', `multifd-channels=${run.multifdChannels}`] : [];
    const dst = startProcess('destination', DESTINATION_MAIN, ['--incoming', 'tcp:127.0.0.1:0', '-S', '--qmp', `unix:${join(dir, 'd')}`, ...multifd, ...run.livemigGuest], NODE_ARGS);
    children.push(dst);
    // Both prepare their RAM at once (a kept source only the first time).
    const fresh = kept === undefined ? startProcess('source', SOURCE_MAIN, ['--qmp', `unix:${join(dir, 's')}`, ...run.livemigGuest, '--fill', run.livemigFill], NODE_ARGS) : undefined;
    const keptStarted = kept?.start();
    if (fresh !== undefined) children.push(fresh);
    const dq = await connectQmp(dst, `unix:${join(dir, 'd')}`, START_MS);
    clients.push(dq);
    const { child: src, sq } = fresh === undefined ? await keptStarted! : { child: fresh, sq: await connectQmp(fresh, `unix:${join(dir, 's')}`, START_MS) };
    if (fresh !== undefined) clients.push(sq);
    const uri = await incomingAddress(dq, START_MS);
    // Every capability set each time: a kept source may carry multifd over from its last migration.
    await sq.execute('migrate-set-capabilities', {
      capabilities: [
        { capability: 'events', state: true },
        { capability: 'return-path', state: true },
        { capability: 'multifd', state: run.multifdChannels > 0 },
      ],
    });
    const params: Record<string, unknown> = { 'max-bandwidth': 0 };
    if (run.multifdChannels > 0) params['multifd-channels'] = run.multifdChannels;
    if (run.downtimeLimitMs !== undefined) params['downtime-limit'] = run.downtimeLimitMs;
    await sq.execute('migrate-set-parameters', params);
    if (run.downtimeLimitMs !== undefined) await sleep(300);
    const cpuBefore = [mainThreadCpuMs(src.proc.pid), mainThreadCpuMs(dst.proc.pid), processCpuMs(src.proc.pid), processCpuMs(dst.proc.pid)];
    await sq.execute('migrate', { uri });
    const t = await untilCompleted(sq, [...children, src]);
    const sourceCpuMs = mainThreadCpuMs(src.proc.pid) - cpuBefore[0]!;
    const sourceAllCpuMs = processCpuMs(src.proc.pid) - cpuBefore[2]!;
    // The destination's peak comes once it has loaded everything: wait for it to say completed.
    const until = Date.now() + 30_000;
    while (((await dq.execute('query-migrate')) as MigrationInfo).status !== 'completed' && Date.now() < until) await sleep(10);
    const destinationCpuMs = mainThreadCpuMs(dst.proc.pid) - cpuBefore[1]!;
    const destinationAllCpuMs = processCpuMs(dst.proc.pid) - cpuBefore[3]!;
    return { ...t, sourcePeakRss: peakRss(src.proc.pid), destinationPeakRss: peakRss(dst.proc.pid), sourceCpuMs, destinationCpuMs, sourceAllCpuMs, destinationAllCpuMs };
  } finally {
    await stopAll(children, clients);
    await rm(dir, { recursive: true, force: true });
  }
}

/** Peak RSS of a bare Node process: what every livemig process pays before its guest. */
function nodeBaseline(): number {
  const out = execFileSync(process.execPath, ['-e', "process.stdout.write(/VmHWM:\\s+(\\d+)/.exec(require('fs').readFileSync('/proc/self/status','utf8'))[1])"], {
    encoding: 'utf8',
  });
  return Number(out) * 1024;
}

/** A file of `size` random bytes (QEMU's m0 for the random guest); /dev/shm keeps it in RAM. */
function randomImage(path: string, size: number): void {
  const fd = openSync(path, 'w');
  try {
    const chunk = Buffer.allocUnsafe(64 * MiB);
    for (let off = 0; off < size; off += chunk.length) writeSync(fd, randomFillSync(chunk));
  } finally {
    closeSync(fd);
  }
}

// ─── rows ─────────────────────────────────────────────────────────────────────────────────────

interface Row {
  /** For LIVEMIG_BENCH_ROWS. */
  key: 'stream' | 'multifd2' | 'multifd4' | 'zero' | 'downtime';
  title: string;
  run: Run;
  /** The figure compared: GiB/s (higher is better) or ms (lower is better). */
  figure: (f: MigrationFigures) => number;
  unit: string;
  /** livemig's source kept across this row's migrations (and other rows' with the same guest). */
  keep?: KeptSource;
}

const f2 = (x: number): string => x.toFixed(2);
function median(xs: number[]): string {
  const s = summarize(xs);
  return `${f2(s.median)} [${f2(s.min)}-${f2(s.max)}]`;
}

/** An engine's figures over the rounds: the median of those it has, and how many it lacks. */
function medianOfFigures(xs: number[]): string {
  const have = xs.filter((x) => Number.isFinite(x));
  if (have.length === 0) return 'n/a (no round gave a figure)';
  return `${median(have)}${have.length < xs.length ? ` (${xs.length - have.length} of ${xs.length} rounds without a figure)` : ''}`;
}

/**
 * One ratio line: the median of the rounds' ratios, each round without one (a zero or absent
 * figure) named with its reason and left out of the median.
 */
function ratioLine(label: string, ratios: RoundRatio[], goal: string, met: (median: number) => boolean): void {
  const values: number[] = [];
  for (const [i, r] of ratios.entries()) {
    if ('value' in r) values.push(r.value);
    else console.log(`    ${label}: round ${i + 1} left out: ${r.skipped}`);
  }
  if (values.length === 0) {
    console.log(`    ${label}: n/a (no round gave a ratio)  ${goal}: not judged`);
    return;
  }
  const over = values.length < ratios.length ? ` over ${values.length} of ${ratios.length} rounds` : '';
  console.log(`    ${label}: ${median(values)}${over}  ${goal}: ${met(summarize(values).median) ? 'met' : 'NOT met'}`);
}

export async function qemuCompareBench(): Promise<void> {
  const { found: qemus, missing } = findQemus();
  const kept: KeptSource[] = [];
  /** livemig's one-stream runs: the size sweep's figure at the rows' guest size. */
  const oneStream: MigrationFigures[] = [];
  console.log(`\nlivemig vs QEMU, precopy over tcp loopback, ${ROUNDS} interleaved rounds (load average ${loadavg().map(f2).join(' ')})`);
  for (const q of qemus) console.log(`  ${q.label}: ${q.version}`);
  for (const m of missing) console.log(`  ${m}`);

  const shm = existsSync('/dev/shm') ? '/dev/shm' : tmpdir();
  const work = await mkdtemp(join(shm, 'livemig-qemu-bench-'));
  try {
    const guestBytes = parseSize(GUEST);
    const guestMiB = guestBytes / MiB;
    const guestLabel = guestBytes >= GiB ? `${guestBytes / GiB} GiB` : `${guestMiB} MiB`;
    const image = join(work, 'random.img');
    if (qemus.length > 0) randomImage(image, guestBytes);
    const rom = join(work, 'dirtying.rom');
    await writeFile(rom, dirtyingRom());

    const m0 = (backend: string): string[] => ['-object', backend, '-machine', 'none,memory-backend=m0', '-S'];
    const preallocDst = m0(`memory-backend-ram,id=m0,size=${guestMiB}M,prealloc=on`);
    const livemigM0 = ['--block', `m0:${GUEST}`, '--machine', 'none', '--qemu-devices-only'];
    const random = (multifdChannels: number): Run => ({
      qemuSource: m0(`memory-backend-file,id=m0,size=${guestMiB}M,mem-path=${image},share=on,prealloc=on`),
      qemuDestination: preallocDst,
      livemigGuest: livemigM0,
      livemigFill: 'random',
      multifdChannels,
    });
    // NaN (no figure) when the total-time is 0 or absent, not Infinity.
    const gibps = (f: MigrationFigures): number => (f.totalMs > 0 ? guestBytes / GiB / (f.totalMs / 1000) : NaN);
    // One livemig source for the three random rows, all rounds, and one for the zero row
    // (KeptSource); QEMU starts in a second, fresh each run.
    const zero: Run = { qemuSource: m0(`memory-backend-ram,id=m0,size=${guestMiB}M`), qemuDestination: preallocDst, livemigGuest: livemigM0, livemigFill: 'zero', multifdChannels: 0 };
    const keptRandom = new KeptSource(random(0));
    const keptZero = new KeptSource(zero);
    kept.push(keptRandom, keptZero);
    const allRows: Row[] = [
      { key: 'stream', title: `one stream, ${guestLabel} random guest: GiB/s`, run: random(0), figure: gibps, unit: 'GiB/s', keep: keptRandom },
      { key: 'multifd2', title: `multifd 2 channels, ${guestLabel} random guest: GiB/s`, run: random(2), figure: gibps, unit: 'GiB/s', keep: keptRandom },
      { key: 'multifd4', title: `multifd 4 channels, ${guestLabel} random guest: GiB/s`, run: random(4), figure: gibps, unit: 'GiB/s', keep: keptRandom },
      {
        key: 'zero',
        title: `${guestLabel} all-zero guest: total-time ms`,
        // Neither source touches a zero guest's RAM (livemig's --fill zero leaves it untouched).
        run: zero,
        figure: (f) => f.totalMs,
        unit: 'ms',
        keep: keptZero,
      },
      {
        // 128 MiB (256 MiB before the run was cut to a few minutes): the size changes the first
        // pass, not what the switchover has left to send (what the firmware and workload dirty).
        key: 'downtime',
        title: `dirtying 128 MiB guest, downtime-limit ${DOWNTIME_LIMIT_MS} ms: downtime ms`,
        run: {
          qemuSource: ['-M', 'pc', '-m', '128M', '-bios', rom],
          qemuDestination: ['-M', 'pc', '-m', '128M', '-bios', rom],
          livemigGuest: ['-m', '128M', '--workload', 'incrementer:60'],
          livemigFill: 'zero',
          multifdChannels: 0,
          downtimeLimitMs: DOWNTIME_LIMIT_MS,
        },
        figure: (f) => f.downtimeMs,
        unit: 'ms',
      },
    ];
    const rows = allRows.filter((row) => wantRow(row.key));

    // samples[row][engine][round]; engine index: QEMUs in order, then livemig.
    const samples = rows.map(() => [...qemus, null].map(() => [] as number[]));
    const ceilings: number[] = [];
    /** bench/loopback-contiguous.mjs: 1 MiB contiguous writes, as our source's slabs go out. */
    const contiguousCeilings: number[] = [];
    /** Wall time each row took over all rounds, starts and stops included (s). */
    const rowSeconds = rows.map(() => 0);
    const t0 = performance.now();
    for (let round = 0; round < ROUNDS; round++) {
      ceilings.push(loopbackCeiling(1, GUEST).median);
      contiguousCeilings.push(contiguousCeiling(1, GUEST).median);
      for (const [r, row] of rows.entries()) {
        const started = performance.now();
        for (const [e, q] of [...qemus, null].entries()) {
          const f = q === null ? await livemigMigrate(row.run, row.keep) : await qemuMigrate(q, row.run);
          samples[r]![e]!.push(row.figure(f));
          if (q === null && row.key === 'stream') oneStream.push(f);
        }
        rowSeconds[r]! += (performance.now() - started) / 1000;
      }
      console.log(`  round ${round + 1} done (${((performance.now() - t0) / 1000).toFixed(0)} s, load average ${loadavg().map(f2).join(' ')})`);
    }

    console.log(`  wall time per row over the rounds: ${rows.map((row, r) => `${row.title.split(':')[0]} ${rowSeconds[r]!.toFixed(0)} s`).join(', ')}`);
    const lm = qemus.length;
    console.log(`  Node loopback ceiling, one view per page (loopback-limit.mjs tcp cork:256 → copy-onread-prefault), GiB/s: ${median(ceilings)}`);
    console.log(`  Node loopback ceiling, 1 MiB contiguous writes (bench/loopback-contiguous.mjs → onread copy into prefaulted RAM), GiB/s: ${median(contiguousCeilings)}`);
    for (const [r, row] of rows.entries()) {
      const s = samples[r]!;
      console.log(`  ${row.title}`);
      for (const [e, q] of qemus.entries()) console.log(`    ${q.label.padEnd(9)} ${medianOfFigures(s[e]!)} ${row.unit}`);
      console.log(`    livemig   ${medianOfFigures(s[lm]!)} ${row.unit}`);
      const perRound = (e: number, name: string): RoundRatio[] => s[lm]!.map((x, i) => {
        const figure = row.unit === 'GiB/s' ? 'GiB/s' : 'total-time';
        return roundRatio(x, s[e]![i]!, `livemig's ${figure}`, `${name}'s ${figure}`, row.unit);
      });
      if (row.key === 'stream') {
        const vsCeiling = s[lm]!.map((x, i) => roundRatio(x, ceilings[i]!, "livemig's GiB/s", "the loopback ceiling's GiB/s", 'GiB/s'));
        ratioLine('livemig ÷ loopback ceiling, one view per page (same round)', vsCeiling, 'goal ≥ 0.95', (m) => m >= 0.95);
        const vsContiguous = s[lm]!.map((x, i) => roundRatio(x, contiguousCeilings[i]!, "livemig's GiB/s", "the contiguous-write ceiling's GiB/s", 'GiB/s'));
        ratioLine('livemig ÷ loopback ceiling, 1 MiB contiguous writes (same round)', vsContiguous, 'goal ≥ 0.95', (m) => m >= 0.95);
      }
      if (row.key === 'stream' || row.key === 'multifd2' || row.key === 'multifd4') {
        const goal = row.key === 'stream' ? 1.3 : 1.2;
        for (const [e, q] of qemus.entries()) ratioLine(`livemig ÷ ${q.label} (same round)`, perRound(e, q.label), `goal ≥ ${goal}`, (m) => m >= goal);
      } else if (row.key === 'zero') {
        for (const [e, q] of qemus.entries()) ratioLine(`livemig time ÷ ${q.label}'s (same round)`, perRound(e, q.label), 'goal ≤ 1.0', (m) => m <= 1.0);
      } else {
        for (const [e, label] of [...qemus.map((q) => q.label), 'livemig'].entries()) {
          const x = s[e]!.map((d) => roundRatio(d, DOWNTIME_LIMIT_MS, `${label}'s downtime`, 'downtime-limit', 'ms'));
          ratioLine(`${label} downtime ÷ limit`, x, 'goal ≤ 1.0', (m) => m <= 1.0);
        }
      }
    }
  } finally {
    for (const k of kept) await k.close();
    await rm(work, { recursive: true, force: true });
  }

  if (SIZES.length > 0) {
    const sweepStarted = performance.now();
    await sizeSweep({ size: GUEST, figures: oneStream });
    console.log(`  (size sweep: ${((performance.now() - sweepStarted) / 1000).toFixed(0)} s wall)`);
  }
}

/**
 * livemig alone: time per GiB and peak RSS at each size, one run each (the 4 GiB one is long);
 * at the rows' guest size, the one-stream row's runs (median total-time, highest peaks) instead.
 */
async function sizeSweep(fromRows: { size: string; figures: MigrationFigures[] }): Promise<void> {
  const baseline = nodeBaseline();
  console.log(`  livemig time per GiB and peak RSS above a bare Node process (${(baseline / MiB).toFixed(0)} MiB), one stream, random guest, one run per size:`);
  const perGiB: number[] = [];
  for (const size of SIZES) {
    const bytes = parseSize(size);
    const reuse = parseSize(fromRows.size) === bytes && fromRows.figures.length > 0;
    const times = fromRows.figures.map((x) => x.totalMs).filter((x) => x > 0);
    const medianOf = (xs: (number | undefined)[]): number => {
      const have = xs.filter((x): x is number => x !== undefined && Number.isFinite(x));
      return have.length > 0 ? summarize(have).median : NaN;
    };
    const f: MigrationFigures = reuse
      ? {
          totalMs: times.length > 0 ? summarize(times).median : NaN,
          downtimeMs: NaN,
          sourcePeakRss: Math.max(...fromRows.figures.map((x) => x.sourcePeakRss)),
          destinationPeakRss: Math.max(...fromRows.figures.map((x) => x.destinationPeakRss)),
          sourceCpuMs: medianOf(fromRows.figures.map((x) => x.sourceCpuMs)),
          destinationCpuMs: medianOf(fromRows.figures.map((x) => x.destinationCpuMs)),
          sourceAllCpuMs: medianOf(fromRows.figures.map((x) => x.sourceAllCpuMs)),
          destinationAllCpuMs: medianOf(fromRows.figures.map((x) => x.destinationAllCpuMs)),
        }
      : await livemigMigrate({ qemuSource: [], qemuDestination: [], livemigGuest: ['--block', `m0:${size}`, '--machine', 'none', '--qemu-devices-only'], livemigFill: 'random', multifdChannels: 0 });
    const from = reuse ? ` (from the one-stream row's ${fromRows.figures.length} runs: median time and CPU; the kept source's peak covers its multifd runs too)` : '';
    const gib = bytes / GiB;
    const cpuPerGiB = (ms: number | undefined): string => (ms !== undefined && Number.isFinite(ms) ? (ms / gib).toFixed(0) : 'n/a');
    const cpu =
      `CPU per GiB, main thread / all threads: source ${cpuPerGiB(f.sourceCpuMs)} / ${cpuPerGiB(f.sourceAllCpuMs)} ms, ` +
      `destination ${cpuPerGiB(f.destinationCpuMs)} / ${cpuPerGiB(f.destinationAllCpuMs)} ms`;
    const over = (rss: number): string => {
      const above = rss - baseline - bytes;
      return `RAM ${above >= 0 ? '+' : '−'} ${(Math.abs(above) / MiB).toFixed(0)} MiB${above <= 64 * MiB ? '' : ' (over RAM + 64 MiB)'}`;
    };
    const rss = `source ${over(f.sourcePeakRss)}, destination ${over(f.destinationPeakRss)}`;
    const msPerGiB = f.totalMs / (bytes / GiB);
    // A total-time of 0 or none gives no time per GiB: said, and left out of the spread.
    if (!(f.totalMs > 0)) {
      console.log(`    ${size.padStart(4)}: no time per GiB (total-time ${Number.isNaN(f.totalMs) ? 'absent' : `${f.totalMs} ms`}), left out of the spread; ${rss}${from}`);
      continue;
    }
    perGiB.push(msPerGiB);
    console.log(`    ${size.padStart(4)}: ${msPerGiB.toFixed(0)} ms/GiB; ${cpu}; ${rss}${from}`);
  }
  if (perGiB.length < 2) {
    console.log(`    time per GiB across sizes: not judged (${perGiB.length} size(s) with a figure)`);
    return;
  }
  const mid = summarize(perGiB).median;
  const spread = Math.max(...perGiB.map((x) => Math.abs(x / mid - 1)));
  console.log(`    time per GiB within ±${(spread * 100).toFixed(0)} % of the median across sizes (goal ±15 %): ${spread <= 0.15 ? 'met' : 'NOT met'}`);
}

function parseSize(text: string): number {
  const m = /^(\d+)([MG])$/.exec(text);
  if (m === null) throw new Error(`LIVEMIG_BENCH_SIZES: "${text}" is not a size like 256M or 4G`);
  return Number(m[1]) * (m[2] === 'G' ? GiB : MiB);
}
