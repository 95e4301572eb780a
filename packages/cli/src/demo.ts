// `livemig demo` (the README's main job, `pnpm start`): start a destination and a source as two
// processes on loopback, migrate a running guest with a live progress bar, then prove the result:
// the paused destination holds exactly the stopped source's memory, and once continued it runs on
// with a consistent incrementer pattern.

import { type ChildProcess, spawn } from 'node:child_process';
import { rmSync } from 'node:fs';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { checkTimeline, formatGiB, formatGiBps, preparingLine, type Progress, progressLine, type Timeline, TtyProgress } from '@livemig/machine';
import type { ConvergencePolicySettings } from '@livemig/protocol';
import { QmpClient } from '@livemig/runtime';
import { renderReport } from './report.ts';

export const SOURCE_MAIN = fileURLToPath(new URL('../../source/dist/main.js', import.meta.url));
export const DESTINATION_MAIN = fileURLToPath(new URL('../../destination/dist/main.js', import.meta.url));

/**
 * The demo could not run its migration: a child process exited, its QMP socket or the
 * destination's listener did not come up in time, or the migration did not end within 10 minutes.
 */
export class DemoError extends Error {
  readonly code = 'LM_ERR_DEMO';
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'DemoError';
  }
}

/** `livemig demo`'s exit status when verified but the downtime exceeded its limit. */
export const EXIT_DOWNTIME_OVER = 3;

/**
 * The demo's last line and exit status: FAIL (1) when the destination does not hold the source
 * guest or does not run on; OVER (3) when it does but the downtime broke its limit, a promise
 * the migration did not keep; PASS (0) only when both hold.
 */
export function demoVerdict(verified: boolean, downtimeMs: number, limitMs: number): { line: string; status: number } {
  if (!verified) return { line: 'VERDICT: FAIL', status: 1 };
  if (downtimeMs > limitMs) {
    return {
      line: `VERDICT: OVER — downtime ${downtimeMs} ms exceeded the ${limitMs} ms limit by ${downtimeMs - limitMs} ms (the destination holds exactly the source guest and runs on)`,
      status: EXIT_DOWNTIME_OVER,
    };
  }
  return { line: `VERDICT: PASS — the destination holds exactly the source guest and runs on, downtime ${downtimeMs} ms within the ${limitMs} ms limit`, status: 0 };
}

export interface DemoOptions {
  memory: string;
  workload: string;
  vcpus: number;
  transport: 'tcp' | 'unix';
  /** Bytes per second; 0 = unlimited. */
  maxBandwidth: number;
  downtimeLimitMs: number;
  /** multifd channels (0: one stream, QEMU's default). */
  multifdChannels: number;
  /** The convergence policy (off while both timeouts are 0); last step postcopy turns postcopy-ram on. */
  convergence: ConvergencePolicySettings;
  out: NodeJS.WriteStream;
}

interface Digest {
  blocks: { idstr: string; length: number; sha256: string }[];
  pattern: { consistent: boolean | null; boundary: number | null; badPages: number[] };
  devices: { clockNs: string; appSha256: string | null; vfioSha256: string | null; vcpus: { position: number }[] };
}

export interface Child {
  name: string;
  proc: ChildProcess;
  /** The last lines it printed (for error messages). */
  log: string[];
}

/** Start a livemig process (SOURCE_MAIN or DESTINATION_MAIN) with its output kept for errors. */
/** `nodeArgs`: flags for node itself, before the script (--cpu-prof in benchmarks). */
export function startProcess(name: string, main: string, args: string[], nodeArgs: readonly string[] = []): Child {
  return keepOutput(name, spawn(process.execPath, [...nodeArgs, main, ...args], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, LIVEMIG_LOG_LEVEL: 'warn' } }));
}

// Enough of a child's output to say why it failed; older output is dropped as it comes.
const OUTPUT_CHUNKS_KEPT = 200;

/** Keep the last of a child's stdout and stderr (spawned with both piped) for error messages. */
export function keepOutput(name: string, proc: ChildProcess): Child {
  const child: Child = { name, proc, log: [] };
  const keep = (b: Buffer): void => {
    child.log.push(b.toString());
    if (child.log.length > OUTPUT_CHUNKS_KEPT) child.log.shift();
  };
  proc.stdout!.on('data', keep);
  proc.stderr!.on('data', keep);
  return child;
}

/** Connect to a child's QMP socket once it accepts (bounded). */
export async function connectQmp(child: Child, address: string, timeoutMs: number): Promise<QmpClient> {
  const until = Date.now() + timeoutMs;
  for (;;) {
    if (child.proc.exitCode !== null) throw new DemoError(`${child.name} exited (${child.proc.exitCode}):\n${child.log.join('')}`);
    try {
      return await QmpClient.connect(address, { timeoutMs: 10_000 });
    } catch (err) {
      if (Date.now() > until) throw new DemoError(`${child.name}: no QMP on ${address} within ${timeoutMs} ms: ${(err as Error).message}`, { cause: err });
      await sleep(50);
    }
  }
}

/** The destination listens once its RAM is prefaulted: its address from query-migrate. */
export async function incomingAddress(dq: QmpClient, timeoutMs: number): Promise<string> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const info = (await dq.execute('query-migrate')) as { 'socket-address'?: { type: string; host?: string; port?: string; path?: string }[] };
    const a = info['socket-address']?.[0];
    if (a !== undefined) return a.type === 'inet' ? `tcp:${a.host}:${a.port}` : `unix:${a.path}`;
    if (Date.now() > deadline) throw new DemoError(`the destination did not start listening within ${timeoutMs} ms`);
    await sleep(100);
  }
}

const gib = formatGiB;

/**
 * The source's timeline of the migration (x-query-migration-timeline, once it holds the result),
 * kept in a directory of its own that outlives the demo, with its HTML report beside it.
 */
async function saveTimeline(sq: QmpClient): Promise<{ timeline: string; report: string }> {
  const deadline = Date.now() + 10_000;
  let doc: Timeline;
  for (;;) {
    doc = checkTimeline(await sq.execute('x-query-migration-timeline'));
    if (doc.result !== null) break;
    if (Date.now() > deadline) throw new DemoError('the source did not finish the migration timeline within 10 s');
    await sleep(50);
  }
  const dir = await mkdtemp(join(tmpdir(), 'livemig-timeline-'));
  const timeline = join(dir, 'timeline.json');
  const report = join(dir, 'report.html');
  await writeFile(timeline, `${JSON.stringify(doc)}\n`);
  await writeFile(report, renderReport(doc));
  return { timeline, report };
}

export async function runDemo(o: DemoOptions): Promise<number> {
  // The bar lives on stderr (redrawn in place on a terminal); lines on stdout are printed above it.
  const bar = new TtyProgress(process.stderr);
  const say = (s: string): void => bar.print(o.out, s);
  const dir = await mkdtemp(join(tmpdir(), 'livemig-demo-'));
  const children: Child[] = [];
  const clients: QmpClient[] = [];
  // Ctrl-C (or a kill) ends the demo with 128 + the signal's number, as a shell reports it, after
  // stopping both processes: an interrupted demo did not verify anything, so it must not exit 0.
  const onSignal = (signal: NodeJS.Signals): void => {
    process.stderr.write(`\nlivemig demo: interrupted by ${signal}; stopping the source and the destination\n`);
    for (const c of children) if (c.proc.exitCode === null) c.proc.kill('SIGTERM');
    rmSync(dir, { recursive: true, force: true });
    process.exit(signal === 'SIGINT' ? 130 : 143);
  };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  try {
    const guest = ['-m', o.memory, '--workload', o.workload, '--vcpus', String(o.vcpus)];
    const incoming = o.transport === 'tcp' ? 'tcp:127.0.0.1:0' : `unix:${join(dir, 'migration.sock')}`;
    const multifd = o.multifdChannels > 0 ? ['--capabilities', 'multifd', '--parameters', `multifd-channels=${o.multifdChannels}`] : [];
    const policy = o.convergence;
    const postcopy = policy.lastStep === 'postcopy';
    const postcopyFlags = postcopy ? ['--capabilities', 'postcopy-ram'] : [];
    say(
      `livemig demo: ${o.memory} guest, ${o.vcpus} vCPU(s) running "${o.workload}", migrated over ${o.transport} loopback between two processes` +
        (o.multifdChannels > 0 ? ` (multifd, ${o.multifdChannels} channel${o.multifdChannels > 1 ? 's' : ''})` : ''),
    );
    const dst = startProcess('destination', DESTINATION_MAIN, ['--incoming', incoming, '-S', '--qmp', `unix:${join(dir, 'dst.qmp')}`, ...multifd, ...postcopyFlags, ...guest]);
    const src = startProcess('source', SOURCE_MAIN, ['--qmp', `unix:${join(dir, 'src.qmp')}`, ...guest]);
    children.push(dst, src);
    // Preparing (the source fills and touches its RAM, the destination prefaults its own) takes
    // seconds for a big guest: say so, with the time it has taken, instead of a silent screen.
    const preparingSince = Date.now();
    const preparing = `source filling ${o.memory} of guest RAM, destination prefaulting ${o.memory}`;
    if (bar.enabled) bar.update(preparingLine(preparing, 0));
    else process.stderr.write(`${preparingLine(preparing, 0)}\n`);
    const preparingTimer = setInterval(() => bar.update(preparingLine(preparing, Date.now() - preparingSince)), 250);
    let dq: QmpClient;
    let sq: QmpClient;
    let uri: string;
    try {
      dq = await connectQmp(dst, `unix:${join(dir, 'dst.qmp')}`, 30_000);
      clients.push(dq);
      sq = await connectQmp(src, `unix:${join(dir, 'src.qmp')}`, 120_000);
      clients.push(sq);
      uri = await incomingAddress(dq, 120_000);
    } finally {
      clearInterval(preparingTimer);
      bar.done();
    }
    say(`prepared in ${((Date.now() - preparingSince) / 1000).toFixed(1)} s`);
    say(`destination pid ${dst.proc.pid} listening on ${uri} (RAM prefaulted); source pid ${src.proc.pid} running the guest`);
    await sleep(500); // let the workload dirty some memory first

    await sq.execute('migrate-set-capabilities', {
      capabilities: [
        { capability: 'return-path', state: true },
        { capability: 'events', state: true },
        ...(o.multifdChannels > 0 ? [{ capability: 'multifd', state: true }] : []),
        ...(postcopy ? [{ capability: 'postcopy-ram', state: true }] : []),
      ],
    });
    await sq.execute('migrate-set-parameters', {
      'max-bandwidth': o.maxBandwidth,
      'downtime-limit': o.downtimeLimitMs,
      ...(o.multifdChannels > 0 ? { 'multifd-channels': o.multifdChannels } : {}),
      'x-livemig-no-progress-timeout': policy.noProgressTimeoutMs,
      'x-livemig-completion-timeout-per-gib': policy.completionTimeoutMsPerGiB,
      'x-livemig-downtime-limit-step': policy.downtimeLimitStepMs,
      'x-livemig-downtime-limit-max': policy.downtimeLimitMaxMs,
      'x-livemig-convergence-last-step': policy.lastStep,
    });
    await sq.execute('migrate', { uri });

    type Info = {
      status: string;
      'total-time'?: number;
      'setup-time'?: number;
      downtime?: number;
      'x-downtime-limit'?: number;
      'error-desc'?: string;
      ram?: { transferred: number; remaining: number; total: number; mbps: number; 'dirty-sync-count': number; duplicate: number; normal: number; 'multifd-bytes': number };
      'x-progress'?: { fraction: number; 'eta-ms': number | null; basis: Progress['basis'] };
      'x-livemig-convergence'?: { step: string; reason?: string; decisions: number; 'downtime-limit': number };
    };
    let info: Info;
    let lastLine = 0;
    let finalLine = '';
    let decisionsShown = 0;
    const deadline = Date.now() + 600_000;
    for (;;) {
      info = (await sq.execute('query-migrate')) as Info;
      const policyNow = info['x-livemig-convergence'];
      if (policyNow !== undefined && policyNow.decisions > decisionsShown) {
        // One line per decision seen (two within one poll show as the later one).
        decisionsShown = policyNow.decisions;
        say(`convergence policy (${policyNow.reason ?? ''}): ${policyNow.step === 'downtime-limit' ? `downtime-limit raised to ${policyNow['downtime-limit']} ms` : `last step ${policyNow.step}`}`);
      }
      const r = info.ram;
      const x = info['x-progress'];
      if (r !== undefined && x !== undefined) {
        // The source's own progress model (query-migrate's x-progress), so the bar never goes back.
        const line = progressLine({
          status: info.status,
          progress: { fraction: x.fraction, etaMs: x['eta-ms'], basis: x.basis },
          transferredBytes: r.transferred,
          remainingBytes: r.remaining,
          bytesPerSecond: (r.mbps * 1e6) / 8,
          passes: r['dirty-sync-count'],
        });
        finalLine = line;
        if (bar.enabled) bar.update(line);
        else if (Date.now() - lastLine >= 1000 || info.status === 'completed') {
          process.stderr.write(`${line}\n`);
          lastLine = Date.now();
        }
      }
      if (info.status === 'completed' || info.status === 'failed' || info.status === 'cancelled') break;
      if (Date.now() > deadline) throw new DemoError('the migration did not finish within 10 minutes');
      await sleep(100);
    }
    // The last bar stays on screen as a line of its own.
    bar.done();
    if (bar.enabled && finalLine !== '') process.stderr.write(`${finalLine}\n`);
    if (info.status !== 'completed') {
      const byPolicy = info.status === 'cancelled' && info['x-livemig-convergence']?.step === 'cancel';
      const desc = info['error-desc'];
      say(`migration ${info.status}${byPolicy ? ' by the convergence policy (the source guest runs on)' : ''}${desc === undefined ? '' : `: ${desc}`}`);
      return 1;
    }
    const r = info.ram!;
    const seconds = (info['total-time'] ?? 0) / 1000;
    say('');
    say('summary');
    say(`  total time        ${info['total-time']} ms (setup ${info['setup-time']} ms)`);
    const limitMs = info['x-downtime-limit'] ?? o.downtimeLimitMs;
    const downtimeMs = info.downtime ?? 0;
    say(`  downtime          ${downtimeMs} ms of a ${limitMs} ms limit${downtimeMs > limitMs ? `, OVER by ${downtimeMs - limitMs} ms` : ''} (source stopped → destination loaded and confirmed)`);
    say(`  transferred       ${gib(r.transferred)} for ${gib(r.total)} of RAM (${r.normal} pages, ${r.duplicate} zero pages)`);
    if (o.multifdChannels > 0) say(`  multifd           ${gib(r['multifd-bytes'])} of it on ${o.multifdChannels} channel(s)`);
    say(`  throughput        ${seconds > 0 ? formatGiBps(r.transferred / seconds) : '-'} average`);
    say(`  passes            ${r['dirty-sync-count']} dirty-bitmap syncs`);
    const policyEnd = info['x-livemig-convergence'];
    if (policyEnd !== undefined) {
      say(`  convergence       ${policyEnd.decisions} policy decision(s)${policyEnd.decisions > 0 ? `, the last: ${policyEnd.step} (${policyEnd.reason ?? ''}), downtime-limit ${policyEnd['downtime-limit']} ms` : ''}`);
    }
    const saved = await saveTimeline(sq);
    say(`  timeline          ${saved.timeline}`);
    say(`  report            ${saved.report} (livemig report draws any timeline)`);

    // Verification 1: the paused destination holds exactly the stopped source's memory.
    const [srcStatus, dstStatus] = (await Promise.all([sq.execute('query-status'), dq.execute('query-status')])) as { status: string }[];
    const [sd, dd] = (await Promise.all([sq.execute('x-query-guest-digest', undefined, { timeoutMs: 120_000 }), dq.execute('x-query-guest-digest', undefined, { timeoutMs: 120_000 })])) as Digest[];
    const same = sd!.blocks.length === dd!.blocks.length && sd!.blocks.every((b, i) => b.sha256 === dd!.blocks[i]!.sha256);
    say('');
    say('verification');
    say(`  source ${srcStatus!.status}, destination ${dstStatus!.status}`);
    for (const [i, b] of sd!.blocks.entries()) {
      say(`  ${b.idstr.padEnd(10)} source ${b.sha256.slice(0, 16)}…  destination ${dd!.blocks[i]?.sha256.slice(0, 16)}…  ${b.sha256 === dd!.blocks[i]?.sha256 ? 'equal' : 'DIFFERENT'}`);
    }
    const sdev = sd!.devices;
    const ddev = dd!.devices;
    const devicesSame =
      sdev.appSha256 === ddev.appSha256 &&
      sdev.vfioSha256 === ddev.vfioSha256 &&
      sdev.clockNs === ddev.clockNs &&
      JSON.stringify(sdev.vcpus) === JSON.stringify(ddev.vcpus);
    say(
      `  devices: app state ${sdev.appSha256 === ddev.appSha256 ? 'equal' : 'DIFFERENT'}, VFIO device memory and registers ${sdev.vfioSha256 === ddev.vfioSha256 ? 'equal' : 'DIFFERENT'}, guest clock ${sdev.clockNs === ddev.clockNs ? `continuous (${(Number(sdev.clockNs) / 1e9).toFixed(3)} s)` : 'DIFFERENT'}, vCPU state ${JSON.stringify(sdev.vcpus) === JSON.stringify(ddev.vcpus) ? 'equal' : 'DIFFERENT'}`,
    );
    const patternBefore = dd!.pattern;
    if (patternBefore.consistent !== null) {
      say(`  incrementer pattern on the destination: ${patternBefore.consistent ? `consistent (boundary at page ${patternBefore.boundary})` : `BROKEN at pages ${patternBefore.badPages.join(', ')}`}`);
    }
    // Verification 2: the destination guest runs on.
    await dq.execute('cont');
    await sleep(1000);
    await dq.execute('stop');
    const after = (await dq.execute('x-query-guest-digest', undefined, { timeoutMs: 120_000 })) as Digest;
    const changed = after.blocks[0]!.sha256 !== dd!.blocks[0]!.sha256 || o.workload === 'idle';
    const consistentAfter = after.pattern.consistent !== false;
    say(`  after cont, 1 s of running on the destination: memory ${o.workload === 'idle' ? 'idle guest' : changed ? 'kept changing' : 'DID NOT CHANGE'}, pattern ${after.pattern.consistent === null ? 'n/a' : consistentAfter ? 'consistent' : 'BROKEN'}`);
    const ok = same && devicesSame && patternBefore.consistent !== false && changed && consistentAfter;
    const verdict = demoVerdict(ok, downtimeMs, limitMs);
    say('');
    say(verdict.line);
    return verdict.status;
  } finally {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    for (const c of clients) await c.close().catch(() => {});
    for (const c of children) {
      if (c.proc.exitCode === null) c.proc.kill('SIGKILL');
    }
    await rm(dir, { recursive: true, force: true });
  }
}
