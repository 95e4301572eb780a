// One livemig source migrated again and again (to a fresh destination each time), alternating one
// stream, multifd 2 and multifd 4, printing after each migration what the source holds after a
// forced full GC: VmRSS, VmHWM, V8 heap used, external and ArrayBuffer bytes, active handles.
// What grows from one migration to the next is kept by something; what only VmHWM shows is a peak
// within one migration. Run (after `npx tsc -b`):
//   node --import tsx bench/source-memory-probe.ts [migrations=12] [guest=256M] [modes=0,2,4]
// LIVEMIG_MEMORY_PROBE_SNAPSHOTS=3,10 also writes heap snapshots after those migrations (their
// paths are printed) to compare in DevTools.

import { existsSync, readFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { setTimeout as sleep } from 'node:timers/promises';
import type { QmpClient } from '../packages/runtime/src/index.ts';
import { stopAll } from './qemu-compare.bench.ts';
import { type Child, connectQmp, DESTINATION_MAIN, incomingAddress, SOURCE_MAIN, startProcess } from '../packages/cli/src/demo.ts';

const MIGRATIONS = Number(process.argv[2] ?? 12);
const GUEST = process.argv[3] ?? '256M';
const MODES = (process.argv[4] ?? '0,2,4').split(',').map(Number);
const HOOK = fileURLToPath(new URL('./memory-probe-hook.mjs', import.meta.url));
const START_MS = 300_000;
const MIGRATION_MS = 300_000;
const MiB = 2 ** 20;

interface Sample {
  n: number;
  rssBeforeGcKiB: number;
  vmRssKiB: number;
  vmHwmKiB: number;
  heapUsed: number;
  external: number;
  arrayBuffers: number;
  /** The highest RSS sampled since the last sample (every 10 ms) and what made it up then. */
  peak?: { rss: number; heapTotal: number; heapUsed: number; external: number; arrayBuffers: number };
  handles: number;
  handleKinds: Record<string, number>;
  snapshot?: string;
}

/** Ask the source for one sample (SIGUSR2 → the hook appends a line) and wait for it (bounded). */
async function sample(src: Child, out: string, n: number): Promise<Sample> {
  src.proc.kill('SIGUSR2');
  const until = Date.now() + 60_000;
  for (;;) {
    const lines = existsSync(out) ? readFileSync(out, 'utf8').split('\n').filter((l) => l !== '') : [];
    if (lines.length >= n) return JSON.parse(lines[n - 1]!) as Sample;
    if (Date.now() > until) throw new Error(`no memory sample ${n} from the source within 60 s`);
    await sleep(50);
  }
}

async function migrateOnce(sq: QmpClient, channels: number, guestArgs: string[]): Promise<{ ms: number; slabs: string }> {
  const dir = await mkdtemp(join(tmpdir(), 'livemig-memory-probe-'));
  const children: Child[] = [];
  const clients: QmpClient[] = [];
  try {
    const multifd = channels > 0 ? ['--capabilities', 'multifd', '--parameters', `multifd-channels=${channels}`] : [];
    const dst = startProcess('destination', DESTINATION_MAIN, ['--incoming', 'tcp:127.0.0.1:0', '-S', '--qmp', `unix:${join(dir, 'd')}`, ...multifd, ...guestArgs]);
    children.push(dst);
    const dq = await connectQmp(dst, `unix:${join(dir, 'd')}`, START_MS);
    clients.push(dq);
    const uri = await incomingAddress(dq, START_MS);
    await sq.execute('migrate-set-capabilities', {
      capabilities: [
        { capability: 'events', state: true },
        { capability: 'return-path', state: true },
        { capability: 'multifd', state: channels > 0 },
      ],
    });
    await sq.execute('migrate-set-parameters', channels > 0 ? { 'max-bandwidth': 0, 'multifd-channels': channels } : { 'max-bandwidth': 0 });
    await sq.execute('migrate', { uri });
    await sq.waitForEvent('MIGRATION', (e) => ['completed', 'failed', 'cancelled'].includes(String(e.data?.['status'])), MIGRATION_MS);
    const info = (await sq.execute('query-migrate')) as Record<string, unknown>;
    if (info['status'] !== 'completed') throw new Error(`migration ${String(info['status'])}: ${String(info['error-desc'] ?? '')}`);
    const slabs = Object.entries((info['x-slabs'] ?? {}) as Record<string, number>).map(([k, v]) => `${k} ${v}`).join(', ');
    return { ms: Number(info['total-time']), slabs };
  } finally {
    await stopAll(children, clients);
    await rm(dir, { recursive: true, force: true });
  }
}

async function main(): Promise<void> {
  const dir = await mkdtemp(join(tmpdir(), 'livemig-memory-probe-'));
  const out = join(dir, 'samples.jsonl');
  process.env['LIVEMIG_MEMORY_PROBE_OUT'] = out;
  const guestArgs = ['--block', `m0:${GUEST}`, '--machine', 'none', '--qemu-devices-only'];
  const src = startProcess('source', SOURCE_MAIN, ['--qmp', `unix:${join(dir, 's')}`, ...guestArgs, '--fill', 'random'], ['--expose-gc', '--import', HOOK]);
  let sq: QmpClient | undefined;
  try {
    sq = await connectQmp(src, `unix:${join(dir, 's')}`, START_MS);
    const f = (b: number): string => (b / MiB).toFixed(1).padStart(7);
    const print = (label: string, s: Sample, m?: { ms: number; slabs: string }): void => {
      const kinds = Object.entries(s.handleKinds).map(([k, v]) => `${k}:${v}`).join(' ');
      const p = s.peak;
      const peak = p === undefined ? '' : `\n${''.padEnd(14)} peak rss ${f(p.rss)}: heap total ${f(p.heapTotal)} used ${f(p.heapUsed)}, ext ${f(p.external)} ab ${f(p.arrayBuffers)} MiB`;
      console.log(`${label.padEnd(14)} rss ${f(s.rssBeforeGcKiB * 1024)} →gc ${f(s.vmRssKiB * 1024)} hwm ${f(s.vmHwmKiB * 1024)} heap ${f(s.heapUsed)} ext ${f(s.external)} ab ${f(s.arrayBuffers)} MiB  handles ${s.handles} (${kinds})${m === undefined ? '' : `  ${m.ms} ms; slabs: ${m.slabs}`}${s.snapshot === undefined ? '' : `  snapshot ${s.snapshot}`}${peak}`);
    };
    print('before', await sample(src, out, 1));
    for (let i = 1; i <= MIGRATIONS; i++) {
      const channels = MODES[(i - 1) % MODES.length]!;
      const m = await migrateOnce(sq, channels, guestArgs);
      print(`${i} ${channels === 0 ? 'stream' : `multifd ${channels}`}`, await sample(src, out, i + 1), m);
    }
  } finally {
    await stopAll([src], sq === undefined ? [] : [sq]);
    if (process.env['LIVEMIG_MEMORY_PROBE_SNAPSHOTS'] === undefined) await rm(dir, { recursive: true, force: true });
    else console.log(`samples and snapshots kept in ${dir}`);
  }
}

await main();
