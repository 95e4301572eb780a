// Postcopy benchmarks, printed next to the plain TCP round trip measured in the same run:
//   1. fault latency p50 / p99 while background pages saturate the link, without and with the
//      preempt channel (goal with preempt: p50 ≤ 2× RTT, p99 ≤ 1 ms on loopback);
//   2. the share of the postcopy phase that vCPUs spend blocked, for a guest that touches every page.
// Both with preempt are also run with --realtime-postcopy (SCHED_FIFO fault path; root only).
// Next to the round trip: how often this machine takes a CPU away for over a millisecond, which
// bounds the p99 from below.

import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import net from 'node:net';
import { availableParallelism, tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { Worker } from 'node:worker_threads';
import type { QmpClient, QmpEvent } from '../packages/runtime/src/index.ts';
import { type Child, connectQmp, DESTINATION_MAIN, incomingAddress, SOURCE_MAIN, startProcess } from '../packages/cli/src/demo.ts';

/** Median and p99 of a loopback TCP round trip between two processes (64-byte ping-pong). */
async function tcpRtt(rounds = 2000): Promise<{ p50: number; p99: number }> {
  const code =
    "const s=require('net').createServer(c=>{c.setNoDelay(true);c.on('data',d=>c.write(d))}).listen(0,'127.0.0.1',()=>process.send(s.address().port))";
  const echo = spawn(process.execPath, ['-e', code], { stdio: ['ignore', 'ignore', 'ignore', 'ipc'] });
  try {
    const port = await new Promise<number>((r) => echo.once('message', (m) => r(m as number)));
    const sock = net.connect(port, '127.0.0.1');
    sock.setNoDelay(true);
    await new Promise((r) => sock.once('connect', r));
    const msg = Buffer.alloc(64, 1);
    const samples: number[] = [];
    for (let i = 0; i < rounds; i++) {
      const t0 = performance.now();
      sock.write(msg);
      let got = 0;
      await new Promise<void>((resolve) => {
        const on = (d: Buffer): void => {
          got += d.length;
          if (got >= 64) {
            sock.off('data', on);
            resolve();
          }
        };
        sock.on('data', on);
      });
      samples.push((performance.now() - t0) * 1000);
    }
    sock.destroy();
    samples.sort((a, b) => a - b);
    return { p50: samples[Math.floor(samples.length / 2)]!, p99: samples[Math.floor(samples.length * 0.99)]! };
  } finally {
    echo.kill('SIGKILL');
  }
}

/**
 * How often a thread that never sleeps loses its CPU for more than 1 ms: one spinner per CPU for
 * `ms`, each noting the gaps in its own clock. A fault's path crosses threads on every CPU, so a
 * stall rate like this one sets a floor under the fault latency's p99 that no code here can lower.
 */
async function cpuStalls(ms = 3000): Promise<{ perSecond: number; longestMs: number; stalledShare: number }> {
  const code =
    'const { parentPort, workerData } = require("node:worker_threads");' +
    'const end = process.hrtime.bigint() + BigInt(workerData) * 1000000n; let last = process.hrtime.bigint(); let n = 0, longest = 0, total = 0;' +
    'for (;;) { const now = process.hrtime.bigint(); if (now > end) break; const gap = Number(now - last) / 1e6;' +
    ' if (gap > 1) { n++; total += gap; if (gap > longest) longest = gap; } last = now; }' +
    'parentPort.postMessage({ n, longest, total });';
  const cpus = availableParallelism();
  const results = await Promise.all(
    Array.from({ length: cpus }, () => {
      const w = new Worker(code, { eval: true, workerData: ms });
      return new Promise<{ n: number; longest: number; total: number }>((resolve, reject) => w.once('message', resolve).once('error', reject));
    }),
  );
  const seconds = (ms / 1000) * cpus;
  return {
    perSecond: results.reduce((a, r) => a + r.n, 0) / seconds,
    longestMs: Math.max(...results.map((r) => r.longest)),
    stalledShare: results.reduce((a, r) => a + r.total, 0) / (ms * cpus),
  };
}

/** Whether this process may raise scheduling priorities (root, or CAP_SYS_NICE in its effective set). */
function isPrivileged(): boolean {
  if (process.getuid?.() === 0) return true;
  try {
    const eff = /CapEff:\s*([0-9a-f]+)/.exec(readFileSync('/proc/self/status', 'utf8'))?.[1];
    return eff !== undefined && (BigInt(`0x${eff}`) & (1n << 23n)) !== 0n;
  } catch {
    return false;
  }
}

/** p-quantile (µs) from a power-of-2 µs histogram: the upper edge of the bucket it falls in. */
function quantile(dist: number[], q: number): number {
  const total = dist.reduce((a, b) => a + b, 0);
  let seen = 0;
  for (let i = 0; i < dist.length; i++) {
    seen += dist[i]!;
    if (seen >= q * total) return 2 ** (i + 1);
  }
  return 2 ** dist.length;
}

/**
 * An estimate of the p-quantile (µs) inside its bucket, taking the bucket's faults as spread
 * evenly on a log scale between its edges (bucket 0 holds < 1 µs).
 */
export function quantileEstimate(dist: number[], q: number): number {
  const total = dist.reduce((a, b) => a + b, 0);
  let seen = 0;
  for (let i = 0; i < dist.length; i++) {
    const n = dist[i]!;
    if (seen + n >= q * total && n > 0) return i === 0 ? 1 : 2 ** (i + (q * total - seen) / n);
    seen += n;
  }
  return 2 ** dist.length;
}

export interface PostcopyRun {
  dist: number[];
  faults: number;
  blockedMs: number;
  postcopyMs: number;
  latencyNs: number;
  /** Pages the destination's vCPUs accessed in the postcopy phase. */
  accesses: number;
}

/** LIVEMIG_BENCH_CPU_PROF=DIR: a --cpu-prof profile of each livemig process into DIR, as in the qemu rows. */
const PROFILE_DIR = process.env['LIVEMIG_BENCH_CPU_PROF'];
const PROFILE_ARGS = PROFILE_DIR === undefined ? [] : ['--cpu-prof', `--cpu-prof-dir=${PROFILE_DIR}`];

/** `guestArgs`: more guest flags for both processes (e.g. `--qemu-devices-only` beside a QEMU guest). */
export async function postcopyOnce(workload: string, preempt: boolean, memory = '256M', realtime = false, guestArgs: readonly string[] = []): Promise<PostcopyRun> {
  const dir = await mkdtemp(join(tmpdir(), 'livemig-bench-'));
  const children: Child[] = [];
  const clients: QmpClient[] = [];
  const caps = preempt ? 'postcopy-ram,postcopy-preempt' : 'postcopy-ram';
  try {
    const rt = realtime ? ['--realtime-postcopy'] : [];
    const dst = startProcess('destination', DESTINATION_MAIN, ['--incoming', 'tcp:127.0.0.1:0', '--capabilities', caps, '--qmp', `unix:${join(dir, 'd')}`, '-m', memory, '--fill', 'random', '--workload', workload, ...rt, ...guestArgs], PROFILE_ARGS);
    const src = startProcess('source', SOURCE_MAIN, ['--qmp', `unix:${join(dir, 's')}`, '-m', memory, '--fill', 'random', '--workload', workload, ...rt, ...guestArgs], PROFILE_ARGS);
    children.push(dst, src);
    const dq = await connectQmp(dst, `unix:${join(dir, 'd')}`, 60_000);
    const sq = await connectQmp(src, `unix:${join(dir, 's')}`, 60_000);
    clients.push(dq, sq);
    const uri = await incomingAddress(dq, 120_000);
    // Events, not a query-migrate poll: livemig answers QMP on the thread that migrates (QEMU on
    // another), so polling every few ms would tax livemig's postcopy stream and not QEMU's.
    await sq.execute('migrate-set-capabilities', { capabilities: ['events', ...caps.split(',')].map((capability) => ({ capability, state: true })) });
    // Precopy barely starts; postcopy background pages are unlimited, so they saturate the link.
    await sq.execute('migrate-set-parameters', { 'max-bandwidth': 8 * 2 ** 20, 'downtime-limit': 1, 'max-postcopy-bandwidth': 0 });
    await sq.execute('migrate', { uri });
    await sleep(200);
    await sq.execute('migrate-start-postcopy');
    const at = (e: QmpEvent): number => e.timestamp.seconds * 1000 + e.timestamp.microseconds / 1000;
    const final = await sq.waitForEvent('MIGRATION', (e) => e.data?.['status'] === 'completed' || e.data?.['status'] === 'failed', 120_000);
    if (final.data?.['status'] === 'failed') {
      const info = (await sq.execute('query-migrate')) as { 'error-desc'?: string };
      throw new Error(`migration failed: ${info['error-desc']}`);
    }
    const started = await sq.waitForEvent('MIGRATION', (e) => e.data?.['status'] === 'postcopy-active', 1_000).catch(() => undefined);
    const doneAt = at(final);
    const postcopyAt = started === undefined ? doneAt : at(started);
    const d = (await dq.execute('query-migrate')) as {
      'postcopy-latency-dist': number[];
      'postcopy-faults': number;
      'postcopy-blocktime': number;
      'postcopy-latency': number;
      'x-postcopy-run-time': number;
      'x-postcopy-guest-accesses': number;
    };
    return {
      dist: d['postcopy-latency-dist'],
      faults: d['postcopy-faults'],
      blockedMs: d['postcopy-blocktime'],
      postcopyMs: d['x-postcopy-run-time'] > 0 ? d['x-postcopy-run-time'] : doneAt - postcopyAt,
      latencyNs: d['postcopy-latency'],
      accesses: d['x-postcopy-guest-accesses'],
    };
  } finally {
    // A profile is written at a clean exit only: ask each process to quit, then wait a bounded time.
    if (PROFILE_DIR !== undefined) {
      for (const c of clients) void c.execute('quit').catch(() => {});
      const until = Date.now() + 10_000;
      while (children.some((c) => c.proc.exitCode === null && c.proc.signalCode === null) && Date.now() < until) await sleep(50);
    }
    for (const c of clients) await c.close().catch(() => {});
    for (const c of children) if (c.proc.exitCode === null) c.proc.kill('SIGKILL');
    await rm(dir, { recursive: true, force: true });
  }
}

export async function postcopyBench(): Promise<void> {
  console.log('\npostcopy over tcp loopback (fresh processes per run)');
  const rtt = await tcpRtt();
  console.log(`  plain TCP round trip (64 B ping-pong between two processes): p50 ${rtt.p50.toFixed(0)} µs, p99 ${rtt.p99.toFixed(0)} µs`);
  const stalls = await cpuStalls();
  console.log(
    `  CPU stalls (a spinning thread on each of ${availableParallelism()} CPUs, 3 s): ${stalls.perSecond.toFixed(1)} per CPU-second over 1 ms, ` +
      `longest ${stalls.longestMs.toFixed(1)} ms, ${(stalls.stalledShare * 100).toFixed(2)} % of the time`,
  );
  const runs = [
    { preempt: false, realtime: false, label: 'without preempt' },
    { preempt: true, realtime: false, label: 'with preempt' },
    // Only a privileged process gets SCHED_FIFO; elsewhere this row equals the one above.
    { preempt: true, realtime: true, label: `with preempt and --realtime-postcopy${isPrivileged() ? '' : ' (refused here: not privileged)'}` },
  ];
  for (const { preempt, realtime, label } of runs) {
    const r = await postcopyOnce('random:100', preempt, '256M', realtime);
    console.log(
      `  fault latency, background pages unthrottled, ${label}: ${r.faults} faults, ` +
        `p50 ≤ ${quantile(r.dist, 0.5)} µs (≈ ${quantileEstimate(r.dist, 0.5).toFixed(0)} µs inside its bucket, ${(quantileEstimate(r.dist, 0.5) / rtt.p50).toFixed(1)}× RTT), ` +
        `p90 ≤ ${quantile(r.dist, 0.9)} µs, p99 ≤ ${quantile(r.dist, 0.99)} µs, mean ${(r.latencyNs / 1000).toFixed(0)} µs, ` +
        `postcopy phase ${r.postcopyMs.toFixed(0)} ms` +
        (preempt ? '   (goal: p50 ≤ 2× RTT, p99 ≤ 1000 µs)' : ''),
    );
  }
  for (const realtime of [false, true]) {
    for (const workload of ['incrementer:max', 'incrementer:400']) {
      const touch = await postcopyOnce(workload, true, '128M', realtime);
      console.log(
        `  vCPU blocked share, guest touching every page in order (${workload}, preempt${realtime ? ', --realtime-postcopy' : ''}): ` +
          `${((100 * touch.blockedMs) / touch.postcopyMs).toFixed(1)} % of a ${touch.postcopyMs.toFixed(0)} ms postcopy phase (${touch.faults} faults; QEMU 7.2 here: 31–35 %)`,
      );
    }
  }
}
