// livemig beside real QEMU in the same run (issue 17): postcopy with preempt on loopback, and
// precopy over an emulated WAN. Rounds are interleaved (QEMU 7.2, QEMU 10.0, livemig, then again)
// and every ratio is taken within its round: the machine is shared, so only same-round ratios
// mean anything.
//
// Postcopy: a 128 MiB guest that touches every page in order, started into postcopy after 200 ms
// of 8 MiB/s precopy, background pages unthrottled. QEMU's guest is the boot sector below (a
// real x86 program under TCG: QEMU runs no JavaScript), livemig's its `incrementer:max` vCPU.
//   - blocked share: the time the vCPU spent stalled on missing pages over the postcopy phase,
//     one measure on both sides, as the guest itself saw it. livemig's is its `postcopy-blocktime`,
//     which its vCPU worker measures around each touch of a missing page (from finding the page
//     absent to seeing it placed, its own wait for a near page included). QEMU's is taken from its
//     guest's TSC histogram (below): the slowest N touches, N its postcopy-requests, each counted
//     at its log2 bucket's lower edge, so QEMU's stalls are never overstated. QEMU's own
//     `postcopy-blocktime` is printed beside it but not compared: in 7.2 and 10.0 alike it counts,
//     in whole ms of its realtime clock, from when its fault thread reads a vCPU's userfault to
//     when the page is placed (UFFDIO_COPY), for faults whose thread id is a vCPU's and whose page
//     had not arrived by the time the fault thread looked; the wait before the fault thread wakes,
//     the vCPU's wait to run again after the copy, and faults the stream resolved first are not in
//     it (28 faults with a TSC p50 of 1.4 ms came to 2 ms of blocktime in one run).
//     The phase, on both sides: from the guest running on the destination (livemig: RUN; QEMU:
//     its RESUME event there) to the stream's end (livemig: x-postcopy-run-time; QEMU: its
//     MIGRATION `completed` event, after its postcopy cleanup, a few ms later than livemig's end).
//   - fault latency p50 / p99: livemig reports a histogram (postcopy-latency-dist). QEMU 7.2 and
//     10.0 report no per-fault latency (10.0's query-migrate has postcopy-blocktime and
//     postcopy-vcpu-blocktime only; the latency fields came in 10.1), so the guest measures
//     itself: it reads the TSC around every page touch and counts the touch in a log2 histogram
//     in its own RAM. The slowest N touches of the destination, N being the source's
//     postcopy-requests (one request per faulting touch: one vCPU, nothing else faults), are
//     QEMU's faults. Ticks become µs by the guest's TSC rate, read from its RAM twice on the
//     running source.
// WAN: two network namespaces joined by e2e/helpers/wan-link.py (20 ms RTT, 1 % seeded loss,
// 1 Gbit/s): this kernel has no sch_netem, so the link is a packet forwarder between two TUN
// devices instead of veth + tc netem. A random guest migrates by precopy with return-path; the
// figures are the stream's throughput (RAM bytes over total time) and the downtime against the
// 300 ms limit. QEMU's guest is `-machine none` with its RAM in a file of random bytes.

import { type ChildProcess, spawn } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdtemp, open, rm, writeFile } from 'node:fs/promises';
import { loadavg } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { QmpClient, type QmpEvent } from '../packages/runtime/src/index.ts';
import { DESTINATION_MAIN, SOURCE_MAIN } from '../packages/cli/src/demo.ts';
import { WanLink, type WanOptions, wanUnavailable } from '../e2e/helpers/wan.ts';
import { postcopyOnce, quantileEstimate } from './postcopy.bench.ts';
import { type RoundRatio, roundRatio } from './round-ratio.ts';
import { wantRow } from './rows.ts';

const MiB = 2 ** 20;
const POSTCOPY_GUEST_MIB = 128;
/** 2 by default (3 before): each round runs both paces on every engine, 6 postcopy migrations with two QEMUs. */
const POSTCOPY_ROUNDS = Number(process.env['LIVEMIG_BENCH_POSTCOPY_ROUNDS'] ?? 2);
/** 64 MiB by default (256 MiB before): a run's transfer over the forwarder's link takes a quarter of the time. */
const WAN_GUEST_MIB = Number(process.env['LIVEMIG_BENCH_WAN_MIB'] ?? 64);
const WAN_ROUNDS = Number(process.env['LIVEMIG_BENCH_WAN_ROUNDS'] ?? 2);
const WAN_DOWNTIME_LIMIT_MS = 300;
const WAN: WanOptions = { delayMs: 10, loss: 0.01, rateBps: 1e9, seed: 1705 };
const QMP_START_MS = 15_000;
const MIGRATION_MS = 180_000;

/**
 * QEMU's guest, a 512-byte boot sector (`-M pc`, SeaBIOS loads it at 0x7c00): enter 32-bit
 * protected mode with flat segments, zero a 32-entry histogram at 0x600, then forever walk RAM
 * from 1 MiB to the top (`memtop`, patched per run), and for each page: rdtsc (stored at 0x508:
 * the clock the bench reads), spin until the deadline, increment the page's first byte, rdtsc
 * again, set the next deadline `interval` ticks later (a paced guest: time blocked earns no
 * credit, as livemig's vCPU paces itself) and count the touch's ticks in
 * histogram[floor(log2(ticks))]. 0x504 counts passes. Assembled (GNU as, --32) from:
 *
 *     cli; xor ax,ax; mov ds,ax; lgdt [gdtdesc]; cr0 |= 1; jmp 08:pm
 *   pm: ds=es=ss=0x10; edi=0x600; ecx=32; eax=0; rep stosd; ebp=[interval]; rdtsc; edi=eax
 *   outer: esi=0x100000
 *   inner: rdtsc; ecx=eax; [0x508]=eax; [0x50c]=edx; ebx=eax; ebx-=edi; js inner
 *          inc byte [esi]; rdtsc; edi=eax; edi+=ebp; eax-=ecx
 *          bsr eax,eax; jz 1f; inc dword [0x600+eax*4]
 *   1:     esi+=4096; cmp esi,[memtop]; jb inner; inc dword [0x504]; jmp outer
 *   gdt: null, code 0x00cf9a000000ffff, data 0x00cf92000000ffff; gdtdesc: 23, gdt; memtop; interval
 */
const BOOT_SECTOR_HEX =
  'fa31c08ed8660f0116a07c0f20c00c010f22c066ea1b7c00000800' + // 0x00 real mode → protected mode
  '66b810008ed88ec08ed0bf00060000b92000000031c0f3ab' + // 0x1b segments; zero the histogram
  '8b2daa7c00000f3189c7' + // 0x33 ebp = interval; edi = deadline = now
  'be00001000' + // 0x3d outer: esi = 1 MiB
  '0f3189c1a30805000089150c05000089c329fb78eb' + // 0x42 inner: rdtsc, stored at 0x508; spin until the deadline
  'fe060f3189c701ef29c80fbdc07407ff048500060000' + // 0x57 touch; rdtsc; deadline; count log2(ticks)
  '81c6001000003b35a67c000072c7ff0504050000ebba' + // 0x6d next page, next pass
  '8d74260090' + // 0x83 pad
  '0000000000000000ffff0000009acf00ffff00000092cf00' + // 0x88 gdt
  '1700887c0000' + // 0xa0 gdtdesc
  '00000008' + // 0xa6 memtop (little-endian, patched)
  '00000000'; // 0xaa interval in TSC ticks (patched; 0: no pace)
const BOOT_MEMTOP_OFFSET = 0xa6;
const BOOT_INTERVAL_OFFSET = 0xaa;
const HISTOGRAM_ADDRESS = 0x600;
const TSC_ADDRESS = 0x508;

/** The boot sector for a guest of `memoryBytes`, touching a page every `intervalTicks` TSC ticks at most (0: as fast as it can). */
function bootSector(memoryBytes: number, intervalTicks: number): Buffer {
  const code = Buffer.from(BOOT_SECTOR_HEX, 'hex');
  const sector = Buffer.alloc(512);
  code.copy(sector);
  sector.writeUInt32LE(memoryBytes, BOOT_MEMTOP_OFFSET);
  sector.writeUInt32LE(Math.round(intervalTicks), BOOT_INTERVAL_OFFSET);
  sector[510] = 0x55;
  sector[511] = 0xaa;
  return sector;
}

interface QemuBuild {
  label: string;
  argv: string[];
}

/** The QEMUs installed here: 7.2 on the PATH, 10.0 unpacked under /opt. */
function qemuBuilds(): QemuBuild[] {
  const builds: QemuBuild[] = [];
  const system = process.env['LIVEMIG_QEMU'] ?? 'qemu-system-x86_64';
  if (onPath(system)) builds.push({ label: 'QEMU 7.2', argv: [system] });
  const q10 = '/opt/qemu-10.0/usr/bin/qemu-system-x86_64';
  if (existsSync(q10)) builds.push({ label: 'QEMU 10.0', argv: [q10, '-L', '/opt/qemu-10.0/usr/share/qemu'] });
  return builds;
}

function onPath(file: string): boolean {
  if (file.includes('/')) return existsSync(file);
  return (process.env['PATH'] ?? '').split(':').some((d) => existsSync(join(d, file)));
}

interface Proc {
  name: string;
  proc: ChildProcess;
  log: string[];
  qmp: QmpClient;
}

/** Spawn `argv` (in `netns` if given) with a QMP socket at `qmpPath`; resolves once QMP accepts. */
async function startWithQmp(name: string, argv: string[], qmpPath: string, procs: Proc[], netns?: string): Promise<Proc> {
  const [file, args] = netns === undefined ? [argv[0]!, argv.slice(1)] : ['ip', ['netns', 'exec', netns, ...argv]];
  const proc = spawn(file, args, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, LIVEMIG_LOG_LEVEL: 'warn' } });
  const p: Proc = { name, proc, log: [], qmp: undefined as unknown as QmpClient };
  procs.push(p);
  const keep = (b: Buffer): void => {
    p.log.push(b.toString());
    if (p.log.length > 100) p.log.shift();
  };
  proc.stdout!.on('data', keep);
  proc.stderr!.on('data', keep);
  const until = Date.now() + QMP_START_MS;
  for (;;) {
    if (proc.exitCode !== null) throw new Error(`${name} exited ${proc.exitCode}: ${p.log.join('').trim()}`);
    try {
      p.qmp = await QmpClient.connect(`unix:${qmpPath}`, { timeoutMs: 10_000 });
      return p;
    } catch (err) {
      if (Date.now() > until) throw new Error(`${name}: no QMP within ${QMP_START_MS} ms: ${(err as Error).message}`, { cause: err });
      await sleep(50);
    }
  }
}

async function stopAll(procs: Proc[]): Promise<void> {
  for (const p of procs) await p.qmp?.close().catch(() => {});
  for (const p of procs) if (p.proc.exitCode === null && p.proc.signalCode === null) p.proc.kill('SIGKILL');
}

async function setCaps(q: QmpClient, names: string[]): Promise<void> {
  await q.execute('migrate-set-capabilities', { capabilities: names.map((capability) => ({ capability, state: true })) });
}

function hmp(q: QmpClient, line: string): Promise<string> {
  return q.execute('human-monitor-command', { 'command-line': line }) as Promise<string>;
}

/** `xp /Nwx ADDR` of a QEMU's guest RAM as dwords. */
async function readDwords(q: QmpClient, address: number, count: number): Promise<number[]> {
  const out = await hmp(q, `xp /${count}wx 0x${address.toString(16)}`);
  const words = [...out.matchAll(/0x([0-9a-f]{8})(?!:)/g)].map((m) => Number.parseInt(m[1]!, 16));
  if (words.length !== count) throw new Error(`xp printed ${words.length} dwords, not ${count}: ${out}`);
  return words;
}

async function readTsc(q: QmpClient): Promise<number> {
  const [lo, hi] = await readDwords(q, TSC_ADDRESS, 2);
  return hi! * 2 ** 32 + lo!;
}

/** Wait until query-migrate on `q` says `status`. */
async function waitStatus(q: QmpClient, status: string, timeoutMs = MIGRATION_MS): Promise<Record<string, unknown>> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const info = (await q.execute('query-migrate')) as Record<string, unknown> & { status?: string; 'error-desc'?: string };
    const s = info.status ?? 'none';
    if (s === status) return info;
    if (s === 'failed' || s === 'cancelled') throw new Error(`migration ${s}: ${info['error-desc'] ?? JSON.stringify(info)}`);
    if (Date.now() > deadline) throw new Error(`no "${status}" within ${timeoutMs} ms (last: ${JSON.stringify(info)})`);
    await sleep(5);
  }
}

export interface PostcopyFigures {
  faults: number;
  p50Us: number;
  p99Us: number;
  blockedMs: number;
  phaseMs: number;
  /** QEMU's own figure: postcopy-blocktime over page requests (µs); livemig's postcopy-latency. */
  meanUs: number;
  /** QEMU's own postcopy-blocktime (ms), printed beside the guest's view for reference; livemig: none. */
  ownBlockedMs?: number;
  /** Pages the guest touched on the destination in the postcopy phase (its speed there). */
  touches: number;
}

/**
 * p-quantile (µs) of the slowest `n` touches in a log2-of-ticks histogram, each bucket spread
 * evenly on a log scale as quantileEstimate does for livemig's µs histogram.
 */
function slowestQuantileUs(hist: number[], n: number, q: number, ticksPerUs: number): number {
  // The top `n` touches, as a histogram of their own.
  const top = new Array<number>(hist.length).fill(0);
  let left = n;
  for (let i = hist.length - 1; i >= 0 && left > 0; i--) {
    top[i] = Math.min(hist[i]!, left);
    left -= top[i]!;
  }
  const total = n - left;
  let seen = 0;
  for (let i = 0; i < top.length; i++) {
    const c = top[i]!;
    if (c > 0 && seen + c >= q * total) return 2 ** (i + (q * total - seen) / c) / ticksPerUs;
    seen += c;
  }
  return NaN;
}

/**
 * The time (µs) the slowest `n` touches took, from a log2-of-ticks histogram: each counted at its
 * bucket's lower edge (2^i ticks), so the estimate of QEMU's stalls is never larger than they were.
 */
function slowestLowerEdgeSumUs(hist: number[], n: number, ticksPerUs: number): number {
  let left = n;
  let ticks = 0;
  for (let i = hist.length - 1; i >= 0 && left > 0; i--) {
    const taken = Math.min(hist[i]!, left);
    ticks += taken * 2 ** i;
    left -= taken;
  }
  return ticks / ticksPerUs;
}

/** A QMP event's own timestamp (QEMU's wall clock), in ms. */
const eventMs = (e: QmpEvent): number => e.timestamp.seconds * 1000 + e.timestamp.microseconds / 1000;

/** How fast the guests touch pages: `mbPerSecond` (10^6 bytes of pages per second, livemig's unit) or as fast as they can. */
interface Pace {
  label: string;
  livemigWorkload: string;
  mbPerSecond: number | undefined;
}

const PACED_MB_PER_SECOND = 200;
const PACES: Pace[] = [
  { label: 'as fast as it can', livemigWorkload: 'incrementer:max', mbPerSecond: undefined },
  { label: `paced at ${PACED_MB_PER_SECOND} MB/s`, livemigWorkload: `incrementer:${PACED_MB_PER_SECOND}`, mbPerSecond: PACED_MB_PER_SECOND },
];

/** The guest's TSC ticks per µs, from the first run (the host's TSC: the same for every QEMU); a paced guest needs it to boot. */
let guestTicksPerUs: number | undefined;

/** One QEMU → QEMU postcopy with preempt on loopback, guest touching every page. */
async function qemuPostcopyOnce(build: QemuBuild, memMiB: number, pace: Pace): Promise<PostcopyFigures> {
  const dir = await mkdtemp(join('/tmp', 'lm-qpc-'));
  const procs: Proc[] = [];
  try {
    let intervalTicks = 0;
    if (pace.mbPerSecond !== undefined) {
      if (guestTicksPerUs === undefined) throw new Error('the guest\'s TSC rate is measured by an unpaced run first');
      intervalTicks = (guestTicksPerUs * 1e6 * 4096) / (pace.mbPerSecond * 1e6);
    }
    const sector = bootSector(memMiB * MiB, intervalTicks);
    const machine = (disk: string): string[] => ['-M', 'pc', '-nodefaults', '-display', 'none', '-m', `${memMiB}M`, '-smp', '1', '-drive', `file=${disk},format=raw,if=ide`];
    // Each QEMU its own copy of the disk: both open it read-write, and QEMU locks images.
    await writeFile(join(dir, 's.img'), sector);
    await writeFile(join(dir, 'd.img'), sector);
    const src = await startWithQmp(`${build.label} source`, [...build.argv, ...machine(join(dir, 's.img')), '-qmp', `unix:${join(dir, 's.qmp')},server=on,wait=off`], join(dir, 's.qmp'), procs);
    const dst = await startWithQmp(
      `${build.label} destination`,
      [...build.argv, ...machine(join(dir, 'd.img')), '-incoming', 'defer', '-qmp', `unix:${join(dir, 'd.qmp')},server=on,wait=off`],
      join(dir, 'd.qmp'),
      procs,
    );
    // The guest's clock rate: its TSC (as it stored it) over 300 ms of wall time.
    let tsc0 = 0;
    for (const until = Date.now() + 10_000; tsc0 === 0; await sleep(50)) {
      tsc0 = await readTsc(src.qmp);
      if (Date.now() > until) throw new Error(`${build.label}: the boot-sector guest did not start within 10 s`);
    }
    const t0 = performance.now();
    await sleep(300);
    const tsc1 = await readTsc(src.qmp);
    const ticksPerUs = (tsc1 - tsc0) / ((performance.now() - t0) * 1000);
    guestTicksPerUs ??= ticksPerUs;

    const caps = ['postcopy-ram', 'postcopy-preempt'];
    await setCaps(src.qmp, caps);
    // events: the destination's RESUME and MIGRATION events bound the postcopy phase (below).
    await setCaps(dst.qmp, [...caps, 'postcopy-blocktime', 'events']);
    const port = 20_000 + Math.floor(Math.random() * 30_000);
    await dst.qmp.execute('migrate-incoming', { uri: `tcp:127.0.0.1:${port}` });
    await src.qmp.execute('migrate-set-parameters', { 'max-bandwidth': 8 * MiB, 'downtime-limit': 1, 'max-postcopy-bandwidth': 0 });
    await src.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${port}` });
    await sleep(200);
    await src.qmp.execute('migrate-start-postcopy');
    await waitStatus(src.qmp, 'postcopy-active');
    // The source is stopped: its histogram is what the destination starts from.
    const before = await readDwords(src.qmp, HISTOGRAM_ADDRESS, 32);
    const d = (await waitStatus(dst.qmp, 'completed')) as { 'postcopy-blocktime'?: number };
    // Stop at once: touches after completion are fast ones, but a descheduled one would count.
    await dst.qmp.execute('stop');
    const after = await readDwords(dst.qmp, HISTOGRAM_ADDRESS, 32);
    const s = (await waitStatus(src.qmp, 'completed')) as { ram?: { 'postcopy-requests'?: number } };
    const hist = after.map((a, i) => (a - before[i]! + 2 ** 32) % 2 ** 32);
    const requests = s.ram?.['postcopy-requests'] ?? 0;
    // The phase as livemig's x-postcopy-run-time has it: from the guest running on the destination
    // (RUN: QEMU's RESUME event there) to the end of the stream (its MIGRATION event `completed`,
    // sent after QEMU's postcopy cleanup: a few ms later than livemig's end, so if anything it
    // lengthens QEMU's phase and lowers QEMU's share). QEMU's own timestamps, not a poll's.
    const resumed = await dst.qmp.waitForEvent('RESUME', undefined, 5_000);
    const completed = await dst.qmp.waitForEvent('MIGRATION', (e) => e.data?.['status'] === 'completed', 5_000);
    const phaseMs = eventMs(completed) - eventMs(resumed);
    const ownBlockedMs = d['postcopy-blocktime'] ?? NaN;
    return {
      faults: requests,
      p50Us: slowestQuantileUs(hist, requests, 0.5, ticksPerUs),
      p99Us: slowestQuantileUs(hist, requests, 0.99, ticksPerUs),
      blockedMs: slowestLowerEdgeSumUs(hist, requests, ticksPerUs) / 1000,
      phaseMs,
      meanUs: requests > 0 ? (ownBlockedMs * 1000) / requests : NaN,
      ownBlockedMs,
      touches: hist.reduce((a, b) => a + b, 0),
    };
  } finally {
    await stopAll(procs);
    await rm(dir, { recursive: true, force: true });
  }
}

async function livemigPostcopy(memMiB: number, pace: Pace): Promise<PostcopyFigures> {
  // QEMU's guest has only QEMU's devices: livemig's carries only those too (no app or VFIO device).
  const r = await postcopyOnce(pace.livemigWorkload, true, `${memMiB}M`, false, ['--qemu-devices-only']);
  return {
    faults: r.faults,
    p50Us: quantileEstimate(r.dist, 0.5),
    p99Us: quantileEstimate(r.dist, 0.99),
    blockedMs: r.blockedMs,
    phaseMs: r.postcopyMs,
    meanUs: r.latencyNs / 1000,
    touches: r.accesses,
  };
}

/** Blocked time over the postcopy phase; NaN (no figure) when either is absent or the phase took 0 ms. */
const share = (f: PostcopyFigures): number => (f.phaseMs > 0 ? f.blockedMs / f.phaseMs : NaN);
const us = (v: number): string => (Number.isFinite(v) ? `${v.toFixed(0)} µs` : 'n/a');
const percent = (x: number): string => (Number.isFinite(x) ? `${(100 * x).toFixed(1)} %` : 'n/a');
/** A round's ratio as printed on its line: the value, or why there is none. */
const shown = (r: RoundRatio): string => ('value' in r ? `${r.value.toFixed(2)}×` : `n/a (${r.skipped})`);
const load = (): string => `load average ${loadavg().map((l) => l.toFixed(2)).join(' ')}`;

/** Below this many faults a p99 is one or two samples: it is not printed, nor compared. */
const MIN_FAULTS_FOR_QUANTILES = 20;
const quantiles = (f: PostcopyFigures): { p50Us: number; p99Us: number } =>
  f.faults >= MIN_FAULTS_FOR_QUANTILES ? f : { p50Us: NaN, p99Us: NaN };

/** Ratios collected per row over the rounds, for the closing summary: row → values. */
class RatioLog {
  readonly rows = new Map<string, { values: number[]; rounds: number; goal: string; met: (median: number) => boolean }>();

  /** A round's ratio; one without a value is left out of the median (its reason is on the round's line) and counted. */
  add(row: string, ratio: RoundRatio, goal: string, met: (median: number) => boolean): void {
    const r = this.rows.get(row) ?? { values: [], rounds: 0, goal, met };
    r.rounds++;
    if ('value' in ratio) r.values.push(ratio.value);
    this.rows.set(row, r);
  }

  print(title: string): void {
    if (this.rows.size === 0) return;
    console.log(`  ${title}: median of the rounds' ratios [min–max], goal, met?`);
    for (const [row, r] of this.rows) {
      if (r.values.length === 0) {
        console.log(`    ${row.padEnd(52)} n/a: none of ${r.rounds} rounds gave a ratio (reasons on their lines)   ${r.goal}: not judged`);
        continue;
      }
      const v = [...r.values].sort((a, b) => a - b);
      const mid = v.length >> 1;
      const median = v.length % 2 === 1 ? v[mid]! : (v[mid - 1]! + v[mid]!) / 2;
      console.log(`    ${row.padEnd(52)} ${median.toFixed(2)}× [${v[0]!.toFixed(2)}–${v[v.length - 1]!.toFixed(2)}] over ${v.length}${v.length < r.rounds ? ` of ${r.rounds} rounds` : ''}   ${r.goal}: ${r.met(median) ? 'met' : 'not met'}`);
    }
  }
}

/** How fast the guest ran in the postcopy phase: the work each side did, beside its blocked share. */
const touchedThere = (f: PostcopyFigures): string =>
  `its guest touched ${f.touches} pages there${f.phaseMs > 0 ? ` (${reachedMbPerSecond(f).toFixed(0)} MB/s)` : ''}`;

function postcopyLine(label: string, f: PostcopyFigures, own: string): string {
  return (
    `    ${label.padEnd(9)} ${String(f.faults).padStart(5)} faults, ` +
    (f.faults >= MIN_FAULTS_FOR_QUANTILES ? `p50 ${us(f.p50Us)}, p99 ${us(f.p99Us)}, ` : `p50/p99 not given (under ${MIN_FAULTS_FOR_QUANTILES} faults), `) +
    `blocked ${percent(share(f))} of ${f.phaseMs.toFixed(0)} ms (${f.blockedMs.toFixed(0)} ms)${own}`
  );
}

async function postcopyRows(builds: QemuBuild[]): Promise<void> {
  console.log(`\npostcopy with preempt, ${POSTCOPY_GUEST_MIB} MiB guest touching every page in order, loopback (${POSTCOPY_ROUNDS} interleaved rounds)`);
  console.log("  blocked share: the guest's own stalls over the postcopy phase (RUN to the stream's end); QEMU's from its TSC histogram (slowest N touches at their bucket's lower edge, N = postcopy-requests), livemig's vCPU's own waits");
  console.log("  QEMU p50/p99: the guest's own TSC around each touch (QEMU 7.2 and 10.0 report no per-fault latency); QEMU's own postcopy-blocktime beside, for reference");
  if (builds.length === 0) console.log('  QEMU is not installed here: livemig\'s figures alone');
  const log = new RatioLog();
  for (let round = 1; round <= POSTCOPY_ROUNDS; round++) {
    /** Each QEMU's unpaced run of this round: the speed its guest reached, for the matched-pace row. */
    const unpaced: { label: string; f: PostcopyFigures }[] = [];
    for (const pace of PACES) {
      console.log(`  round ${round}, guest ${pace.label} (${load()})`);
      const qemu: { label: string; f: PostcopyFigures }[] = [];
      for (const b of builds) {
        try {
          const f = await qemuPostcopyOnce(b, POSTCOPY_GUEST_MIB, pace);
          qemu.push({ label: b.label, f });
          if (pace.mbPerSecond === undefined) unpaced.push({ label: b.label, f });
          console.log(postcopyLine(b.label, f, `; QEMU's own postcopy-blocktime ${f.ownBlockedMs} ms (${us(f.meanUs)} per request); ${touchedThere(f)}`));
        } catch (err) {
          console.log(`    ${b.label}: failed: ${(err as Error).message}`);
        }
      }
      const l = await livemigPostcopy(POSTCOPY_GUEST_MIB, pace);
      console.log(postcopyLine('livemig', l, `; mean ${us(l.meanUs)}; ${touchedThere(l)}`));
      for (const { label, f } of qemu) {
        const quantile = (q: 'p50Us' | 'p99Us'): RoundRatio => {
          const few = [['livemig', l] as const, [label, f] as const].filter(([, x]) => x.faults < MIN_FAULTS_FOR_QUANTILES);
          if (few.length > 0) return { skipped: few.map(([who, x]) => `${who} had ${x.faults} faults (under ${MIN_FAULTS_FOR_QUANTILES}: no quantile)`).join(', ') };
          return roundRatio(quantiles(l)[q], quantiles(f)[q], `livemig's ${q.slice(0, 3)}`, `${label}'s ${q.slice(0, 3)}`, 'µs');
        };
        const [p50, p99] = [quantile('p50Us'), quantile('p99Us')];
        const blocked = roundRatio(share(l), share(f), "livemig's blocked share", `${label}'s blocked share`);
        console.log(`    livemig / ${label}: p50 ${shown(p50)}, p99 ${shown(p99)}, blocked share ${shown(blocked)}   (goal: p99 and blocked share ≤ 1.00×)`);
        const atMost = (m: number): boolean => m <= 1;
        log.add(`${label}, ${pace.label}: p99 fault latency`, p99, '≤ 1.00×', atMost);
        log.add(`${label}, ${pace.label}: blocked share`, blocked, '≤ 1.00×', atMost);
      }
    }
    // The same work: livemig's guest paced to the speed QEMU's unpaced guest reached in its
    // postcopy phase this round, so both walk RAM equally fast while pages arrive.
    for (const { label, f } of unpaced) {
      const mbPerSecond = reachedMbPerSecond(f);
      if (!(mbPerSecond > 0)) {
        console.log(`  round ${round}, livemig paced to ${label}'s guest: n/a (${label}'s guest touched ${f.touches} pages in ${f.phaseMs.toFixed(0)} ms)`);
        continue;
      }
      console.log(`  round ${round}, livemig paced to ${label}'s unpaced guest, ${mbPerSecond.toFixed(1)} MB/s (${load()})`);
      const l = await livemigPostcopy(POSTCOPY_GUEST_MIB, { label: `paced to ${label}`, livemigWorkload: `incrementer:${mbPerSecond.toFixed(3)}`, mbPerSecond });
      console.log(postcopyLine('livemig', l, `; mean ${us(l.meanUs)}; ${touchedThere(l)}`));
      const few = [['livemig', l] as const, [label, f] as const].filter(([, x]) => x.faults < MIN_FAULTS_FOR_QUANTILES);
      const p99: RoundRatio =
        few.length > 0
          ? { skipped: few.map(([who, x]) => `${who} had ${x.faults} faults (under ${MIN_FAULTS_FOR_QUANTILES}: no quantile)`).join(', ') }
          : roundRatio(l.p99Us, f.p99Us, "livemig's p99", `${label}'s p99`, 'µs');
      const blocked = roundRatio(share(l), share(f), "livemig's blocked share", `${label}'s blocked share`);
      console.log(`    livemig / ${label} (as fast as it can, above): p99 ${shown(p99)}, blocked share ${shown(blocked)}   (goal: p99 and blocked share ≤ 1.00×)`);
      const atMost = (m: number): boolean => m <= 1;
      log.add(`${label}, livemig paced to its speed: p99 fault latency`, p99, '≤ 1.00×', atMost);
      log.add(`${label}, livemig paced to its speed: blocked share`, blocked, '≤ 1.00×', atMost);
    }
  }
  log.print('livemig / QEMU');
}

/** The speed a guest reached in the postcopy phase, in MB/s (10^6 bytes of pages per second); NaN without a phase. */
const reachedMbPerSecond = (f: PostcopyFigures): number => (f.phaseMs > 0 ? (f.touches * 4096) / 1e3 / f.phaseMs : NaN);

export interface WanFigures {
  bytes: number;
  totalMs: number;
  downtimeMs: number;
}

/** NaN (no figure) when the total-time is 0 or absent, not Infinity. */
const mibps = (f: WanFigures): number => (f.totalMs > 0 ? f.bytes / MiB / (f.totalMs / 1000) : NaN);

/** Precopy of a random `memMiB` guest from namespace A to B, QEMU → QEMU (`-machine none`, RAM from `image`). */
async function qemuWanOnce(build: QemuBuild, wan: WanLink, image: string, memMiB: number, dir: string): Promise<WanFigures> {
  const procs: Proc[] = [];
  try {
    const machine = (backend: string): string[] => ['-nodefaults', '-display', 'none', '-object', backend, '-machine', 'none,memory-backend=m0'];
    const src = await startWithQmp(
      `${build.label} source`,
      [...build.argv, ...machine(`memory-backend-file,id=m0,size=${memMiB}M,mem-path=${image},share=on`), '-qmp', `unix:${join(dir, 'qs.qmp')},server=on,wait=off`],
      join(dir, 'qs.qmp'),
      procs,
      wan.nsA,
    );
    const dst = await startWithQmp(
      `${build.label} destination`,
      [...build.argv, ...machine(`memory-backend-ram,id=m0,size=${memMiB}M`), '-incoming', 'defer', '-qmp', `unix:${join(dir, 'qd.qmp')},server=on,wait=off`],
      join(dir, 'qd.qmp'),
      procs,
      wan.nsB,
    );
    const uri = `tcp:${wan.addressB}:${20_000 + Math.floor(Math.random() * 30_000)}`;
    await setCaps(src.qmp, ['return-path']);
    await setCaps(dst.qmp, ['return-path']);
    await dst.qmp.execute('migrate-incoming', { uri });
    await src.qmp.execute('migrate-set-parameters', { 'max-bandwidth': 0, 'downtime-limit': WAN_DOWNTIME_LIMIT_MS });
    await src.qmp.execute('migrate', { uri });
    const s = (await waitStatus(src.qmp, 'completed')) as { 'total-time': number; downtime: number; ram: { transferred: number } };
    return { bytes: s.ram.transferred, totalMs: s['total-time'] ?? NaN, downtimeMs: s.downtime ?? NaN };
  } finally {
    await stopAll(procs);
  }
}

async function livemigWanOnce(wan: WanLink, memMiB: number, dir: string): Promise<WanFigures> {
  const procs: Proc[] = [];
  try {
    // QEMU's layout (`-machine none`, one block m0): the same bytes to move, no livemig devices.
    const guest = ['--block', `m0:${memMiB}M`, '--machine', 'none', '--qemu-devices-only', '--fill', 'random'];
    const dst = await startWithQmp(
      'livemig destination',
      [process.execPath, DESTINATION_MAIN, '--incoming', `tcp:${wan.addressB}:0`, '--capabilities', 'return-path', ...guest, '--qmp', `unix:${join(dir, 'ld.qmp')}`],
      join(dir, 'ld.qmp'),
      procs,
      wan.nsB,
    );
    const src = await startWithQmp('livemig source', [process.execPath, SOURCE_MAIN, ...guest, '--qmp', `unix:${join(dir, 'ls.qmp')}`], join(dir, 'ls.qmp'), procs, wan.nsA);
    let uri: string | undefined;
    for (const until = Date.now() + 60_000; uri === undefined; await sleep(50)) {
      const info = (await dst.qmp.execute('query-migrate')) as { 'socket-address'?: { host?: string; port?: string }[] };
      const a = info['socket-address']?.[0];
      if (a !== undefined) uri = `tcp:${a.host}:${a.port}`;
      else if (Date.now() > until) throw new Error('the livemig destination did not listen within 60 s');
    }
    await setCaps(src.qmp, ['return-path']);
    await src.qmp.execute('migrate-set-parameters', { 'max-bandwidth': 0, 'downtime-limit': WAN_DOWNTIME_LIMIT_MS });
    await src.qmp.execute('migrate', { uri });
    const s = (await waitStatus(src.qmp, 'completed')) as { 'total-time': number; downtime: number; ram: { transferred: number } };
    return { bytes: s.ram.transferred, totalMs: s['total-time'] ?? NaN, downtimeMs: s.downtime ?? NaN };
  } finally {
    await stopAll(procs);
  }
}

function wanLine(label: string, f: WanFigures): string {
  return (
    `    ${label.padEnd(9)} ${(Number.isFinite(mibps(f)) ? mibps(f).toFixed(1) : 'n/a').padStart(6)} MiB/s (${(f.bytes / MiB).toFixed(0)} MiB in ${f.totalMs} ms), ` +
    (Number.isFinite(f.downtimeMs) ? `downtime ${f.downtimeMs} ms of a ${WAN_DOWNTIME_LIMIT_MS} ms limit${f.downtimeMs <= WAN_DOWNTIME_LIMIT_MS ? '' : ' (over)'}` : 'no downtime figure')
  );
}

async function wanRows(builds: QemuBuild[]): Promise<void> {
  console.log(
    `\nprecopy over an emulated WAN (two network namespaces; ${WAN.delayMs * 2} ms RTT, ${WAN.loss * 100} % loss, ${WAN.rateBps / 1e9} Gbit/s ` +
      `by a TUN packet forwarder, as this kernel has no sch_netem), ${WAN_GUEST_MIB} MiB random guest, return-path (${WAN_ROUNDS} interleaved rounds)`,
  );
  const unavailable = await wanUnavailable();
  if (unavailable !== undefined) {
    console.log(`  skipped: ${unavailable}`);
    return;
  }
  if (builds.length === 0) console.log('  QEMU is not installed here: livemig\'s figures alone');
  const log = new RatioLog();
  /** Per migrator: runs, and runs whose downtime stayed within the limit. */
  const downtimes = new Map<string, { runs: number; within: number }>();
  const countDowntime = (label: string, f: WanFigures): void => {
    // A run without a downtime figure is no run for this count (its line says so).
    if (!Number.isFinite(f.downtimeMs)) return;
    const d = downtimes.get(label) ?? { runs: 0, within: 0 };
    d.runs++;
    if (f.downtimeMs <= WAN_DOWNTIME_LIMIT_MS) d.within++;
    downtimes.set(label, d);
  };
  const dir = await mkdtemp(join('/tmp', 'lm-qwan-'));
  try {
    const image = join(dir, 'ram.img');
    // QEMU's RAM: the same kind of content as livemig's --fill random, written once.
    const fh = await open(image, 'w');
    const chunk = Buffer.allocUnsafe(16 * MiB);
    for (let off = 0; off < WAN_GUEST_MIB * MiB; off += chunk.length) await fh.write(randomFillSync(chunk), 0, chunk.length, off);
    await fh.close();
    for (let round = 1; round <= WAN_ROUNDS; round++) {
      console.log(`  round ${round} (${load()})`);
      const qemu: { label: string; f: WanFigures }[] = [];
      for (const b of builds) {
        // A fresh link per run: the forwarder's queue and loss sequence start equal for each.
        const wan = await WanLink.create(WAN);
        try {
          const f = await qemuWanOnce(b, wan, image, WAN_GUEST_MIB, dir);
          qemu.push({ label: b.label, f });
          countDowntime(b.label, f);
          console.log(wanLine(b.label, f));
        } catch (err) {
          console.log(`    ${b.label}: failed: ${(err as Error).message}`);
        } finally {
          await wan.close();
        }
      }
      const wan = await WanLink.create(WAN);
      try {
        const l = await livemigWanOnce(wan, WAN_GUEST_MIB, dir);
        console.log(wanLine('livemig', l));
        countDowntime('livemig', l);
        for (const { label, f } of qemu) {
          const r = roundRatio(mibps(l), mibps(f), `livemig's MiB/s (total-time ${l.totalMs} ms)`, `${label}'s MiB/s (total-time ${f.totalMs} ms)`);
          console.log(`    livemig / ${label}: throughput ${shown(r)}   (goal: ≥ 1.00×, downtime ≤ limit)`);
          log.add(`${label}: throughput`, r, '≥ 1.00×', (m) => m >= 1);
        }
      } finally {
        await wan.close();
      }
    }
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
  log.print('livemig / QEMU');
  for (const [label, d] of downtimes) console.log(`    ${label}: downtime within the ${WAN_DOWNTIME_LIMIT_MS} ms limit in ${d.within} of ${d.runs} runs`);
}

export async function qemuPostcopyBench(): Promise<void> {
  const builds = qemuBuilds();
  if (wantRow('postcopy')) {
    const started = performance.now();
    await postcopyRows(builds);
    console.log(`  (postcopy rows: ${((performance.now() - started) / 1000).toFixed(0)} s wall)`);
  }
  if (wantRow('wan')) {
    const started = performance.now();
    await wanRows(builds);
    console.log(`  (WAN rows: ${((performance.now() - started) / 1000).toFixed(0)} s wall)`);
  }
}
