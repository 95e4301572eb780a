// Two-process precopy benchmarks, each printed next to a ceiling measured in the same run:
//   1. 1 GiB random-content guest, unthrottled, tcp loopback, destination prefaulted:
//      throughput vs loopback-limit.mjs (cork:256 → copy-onread-prefault);
//   2. 1 GiB all-zero guest: total time (QEMU 7.2 took ~75 ms on this machine kind);
//   3. throttle accuracy at 64 MiB/s, sampled each second by a receiver of our own;
//   4. downtime vs downtime-limit for a converging dirtying guest;
//   5. (with 1) the same guest over TLS (x509, one stream) against plaintext, as a ratio.

import { execFileSync } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { setTimeout as sleep } from 'node:timers/promises';
import type { QmpClient } from '../packages/runtime/src/index.ts';
import { type Child, connectQmp, DESTINATION_MAIN, incomingAddress, SOURCE_MAIN, startProcess } from '../packages/cli/src/demo.ts';
import { makeX509Dirs } from '../e2e/helpers/tls.ts';
import { fmt, type Figure, sharedBench, summarize } from './ceilings.ts';

const GiB = 2 ** 30;
const MiB = 2 ** 20;
const reps = Number(process.env['LIVEMIG_BENCH_REPS'] ?? 3);

interface MigrateResult {
  totalMs: number;
  downtimeMs: number;
  transferred: number;
  status: string;
}

/** One migration between two fresh processes; returns the source's final query-migrate figures. */
async function migrateOnce(
  guest: string[],
  params: Record<string, unknown>,
  caps: string[] = ['return-path'],
  destinationCaps: string[] = [],
  extra: { source: string[]; destination: string[] } = { source: [], destination: [] },
): Promise<MigrateResult> {
  const dir = await mkdtemp(join(tmpdir(), 'livemig-bench-'));
  const children: Child[] = [];
  const clients: QmpClient[] = [];
  try {
    const dstCaps = destinationCaps.length > 0 ? ['--capabilities', destinationCaps.join(',')] : [];
    const dst = startProcess('destination', DESTINATION_MAIN, ['--incoming', 'tcp:127.0.0.1:0', '-S', '--qmp', `unix:${join(dir, 'd')}`, ...dstCaps, ...guest, ...extra.destination]);
    const src = startProcess('source', SOURCE_MAIN, ['--qmp', `unix:${join(dir, 's')}`, ...guest, ...extra.source]);
    children.push(dst, src);
    const dq = await connectQmp(dst, `unix:${join(dir, 'd')}`, 60_000);
    const sq = await connectQmp(src, `unix:${join(dir, 's')}`, 60_000);
    clients.push(dq, sq);
    const uri = await incomingAddress(dq, 120_000);
    await sleep(300);
    await sq.execute('migrate-set-capabilities', { capabilities: caps.map((capability) => ({ capability, state: true })) });
    await sq.execute('migrate-set-parameters', params);
    await sq.execute('migrate', { uri });
    const deadline = Date.now() + 300_000;
    for (;;) {
      const info = (await sq.execute('query-migrate')) as {
        status: string;
        'total-time'?: number;
        downtime?: number;
        'error-desc'?: string;
        ram?: { transferred: number };
      };
      if (info.status === 'completed') {
        return { status: info.status, totalMs: info['total-time']!, downtimeMs: info.downtime!, transferred: info.ram!.transferred };
      }
      if (info.status === 'failed' || info.status === 'cancelled') throw new Error(`migration ${info.status}: ${info['error-desc'] ?? ''}`);
      if (Date.now() > deadline) throw new Error('migration did not complete within 300 s');
      await sleep(20);
    }
  } finally {
    for (const c of clients) await c.close().catch(() => {});
    for (const c of children) if (c.proc.exitCode === null) c.proc.kill('SIGKILL');
    await rm(dir, { recursive: true, force: true });
  }
}

/** loopback-limit.mjs tcp cork:256 → copy-onread-prefault: the Node loopback ceiling, GiB/s. */
export function loopbackCeiling(runs = reps, size = '1G'): Figure {
  const out = execFileSync(
    process.execPath,
    [join(sharedBench, 'loopback-limit.mjs'), '--size', size, '--transport', 'tcp', '--send', 'cork:256', '--recv', 'copy-onread-prefault', '--reps', String(runs), '--json'],
    { encoding: 'utf8', maxBuffer: 16 << 20 },
  );
  const rows = out
    .split('\n')
    .filter((l) => l.startsWith('{'))
    .map((l) => JSON.parse(l) as { gibps?: Figure; median?: number });
  const row = rows.find((r) => r.gibps !== undefined);
  if (row?.gibps === undefined) throw new Error(`loopback-limit.mjs printed no figure:\n${out}`);
  return row.gibps;
}

/**
 * bench/loopback-contiguous.mjs: Node over loopback writing 1 MiB contiguous buffers into a
 * reader that copies into prefaulted RAM, the ceiling for a sender that writes slabs.
 */
export function contiguousCeiling(runs = reps, size = '1G'): Figure {
  const script = fileURLToPath(new URL('./loopback-contiguous.mjs', import.meta.url));
  const out = execFileSync(process.execPath, [script, '--size', size, '--reps', String(runs), '--json'], { encoding: 'utf8', maxBuffer: 1 << 20 });
  const line = out.split('\n').find((l) => l.startsWith('{'));
  if (line === undefined) throw new Error(`loopback-contiguous.mjs printed no figure:\n${out}`);
  return (JSON.parse(line) as { gibps: Figure }).gibps;
}

/** A receiver of our own: counts the bytes of each 1 s window from the first byte. */
async function throttleAccuracy(rateBytes: number, seconds: number): Promise<{ windows: number[]; mean: number }> {
  const dir = await mkdtemp(join(tmpdir(), 'livemig-bench-'));
  const server = net.createServer();
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const port = (server.address() as net.AddressInfo).port;
  const counts: number[] = [];
  let first = 0;
  const done = new Promise<void>((resolve) => {
    server.once('connection', (sock) => {
      sock.on('data', (chunk: Buffer) => {
        const now = performance.now();
        if (first === 0) first = now;
        const win = Math.floor((now - first) / 1000);
        if (win >= seconds) {
          sock.destroy();
          resolve();
          return;
        }
        counts[win] = (counts[win] ?? 0) + chunk.length;
      });
      sock.on('close', () => resolve());
    });
  });
  const src = startProcess('source', SOURCE_MAIN, ['--qmp', `unix:${join(dir, 's')}`, '-m', '1G', '--fill', 'random']);
  let sq: QmpClient | undefined;
  try {
    sq = await connectQmp(src, `unix:${join(dir, 's')}`, 60_000);
    await sq.execute('migrate-set-parameters', { 'max-bandwidth': rateBytes, 'downtime-limit': 1 });
    await sq.execute('migrate', { uri: `tcp:127.0.0.1:${port}` });
    await Promise.race([done, sleep((seconds + 30) * 1000)]);
  } finally {
    await sq?.close().catch(() => {});
    if (src.proc.exitCode === null) src.proc.kill('SIGKILL');
    server.close();
    await rm(dir, { recursive: true, force: true });
  }
  const windows = counts.slice(0, seconds).map((c) => c / rateBytes);
  return { windows, mean: windows.reduce((a, b) => a + b, 0) / windows.length };
}

/**
 * Figure 5 alone (`pnpm bench tls`): one stream over TLS (x509, certificates made here by
 * openssl) against the same guest in plaintext, runs alternating; printed as TLS / plaintext.
 */
export async function tlsBench(): Promise<void> {
  console.log('\nTLS vs plaintext, two-process precopy over tcp loopback (fresh processes per run)');
  const guest = ['-m', '1G', '--fill', 'random', '--workload', 'idle'];
  const dir = await mkdtemp(join(tmpdir(), 'livemig-bench-pki-'));
  try {
    const pki = makeX509Dirs(dir);
    const tls = {
      source: ['--object', `tls-creds-x509,id=tls0,dir=${pki.client},endpoint=client`, '--parameters', 'tls-creds=tls0'],
      destination: ['--object', `tls-creds-x509,id=tls0,dir=${pki.server},endpoint=server`, '--parameters', 'tls-creds=tls0'],
    };
    const plain: number[] = [];
    const secured: number[] = [];
    for (let i = 0; i < reps; i++) {
      const r = await migrateOnce(guest, { 'max-bandwidth': 0 });
      plain.push(r.transferred / GiB / (r.totalMs / 1000));
      const t = await migrateOnce(guest, { 'max-bandwidth': 0 }, ['return-path'], [], tls);
      secured.push(t.transferred / GiB / (t.totalMs / 1000));
    }
    const p = summarize(plain);
    const t = summarize(secured);
    console.log(`  1 GiB random guest, unthrottled, one stream, plaintext: GiB/s   ${fmt(p)}`);
    console.log(`  the same over TLS (x509, TLS 1.3, AES-GCM): GiB/s             ${fmt(t)}   ratio TLS/plaintext ${(t.median / p.median).toFixed(2)}`);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

/** Figure 1 alone (`pnpm bench throughput`): the ceiling and our runs alternate, so both see the same machine. */
export async function throughputBench(): Promise<void> {
  console.log('\ntwo-process precopy over tcp loopback (fresh processes per run)');
  await throughput();
}

async function throughput(): Promise<void> {
  const ceiling = loopbackCeiling();
  // One stream (QEMU's default) and multifd (2 channels, QEMU's default count), runs alternating.
  const single: number[] = [];
  const multi: number[] = [];
  const guest = ['-m', '1G', '--fill', 'random', '--workload', 'idle'];
  for (let i = 0; i < reps; i++) {
    const r = await migrateOnce(guest, { 'max-bandwidth': 0 });
    single.push(r.transferred / GiB / (r.totalMs / 1000));
    const m = await migrateOnce(guest, { 'max-bandwidth': 0 }, ['return-path', 'multifd'], ['multifd']);
    multi.push(m.transferred / GiB / (m.totalMs / 1000));
  }
  const t = summarize(single);
  const tm = summarize(multi);
  console.log(`  ceiling: loopback-limit.mjs tcp cork:256 → copy-onread-prefault     ${fmt(ceiling)}`);
  console.log(`  1 GiB random guest, unthrottled, one stream: GiB/s (bytes / total-time)   ${fmt(t)}   ratio ${(t.median / ceiling.median).toFixed(2)}`);
  console.log(`  the same with multifd (2 channels): ${fmt(tm)}   ratio ${(tm.median / ceiling.median).toFixed(2)} (goal ≥ 0.9)`);
}

export async function migrationBench(): Promise<void> {
  console.log('\ntwo-process precopy over tcp loopback (fresh processes per run)');
  await throughput();
  await tlsBench();

  const zero: number[] = [];
  for (let i = 0; i < reps; i++) zero.push((await migrateOnce(['-m', '1G', '--fill', 'zero'], { 'max-bandwidth': 0 })).totalMs);
  console.log(`  1 GiB all-zero guest: total-time ms   ${fmt(summarize(zero))}   (QEMU 7.2 here: ~75 ms; goal: no slower)`);

  const rate = 64 * MiB;
  const acc = await throttleAccuracy(rate, 5);
  const worst = Math.max(...acc.windows.map((w) => Math.abs(w - 1)));
  console.log(
    `  throttle at 64 MiB/s, receiver-side 1 s windows (share of the rate): ${acc.windows.map((w) => w.toFixed(3)).join(' ')}`,
  );
  console.log(`    mean ${(acc.mean * 100 - 100).toFixed(2)} % (goal within ±1 %), worst window ${(worst * 100).toFixed(2)} % (goal ±3 %, first included)`);

  for (const limit of [100, 300]) {
    const d: number[] = [];
    for (let i = 0; i < reps; i++) {
      const r = await migrateOnce(['-m', '1G', '--workload', 'incrementer:200'], { 'max-bandwidth': 0, 'downtime-limit': limit });
      d.push(r.downtimeMs);
    }
    const f: Figure = summarize(d);
    console.log(`  downtime, 1 GiB incrementer:200 guest, downtime-limit ${limit} ms: measured ms ${fmt(f)} (goal ≤ ${limit})`);
  }
}
