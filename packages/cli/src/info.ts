// `livemig info --qmp ADDR [--completed] [--json]`: a migration's job info, as `virsh
// domjobinfo` shows it, read from a livemig process's (or QEMU's) QMP socket with query-migrate.
//
//   running migration    → Job type: Unbounded, its figures so far
//   ended migration      → with --completed: Job type: Completed | Failed | Cancelled and the
//                          final figures (query-migrate keeps them after the end); without it:
//                          Job type: None, as virsh shows once the job is over
//   no migration         → Job type: None

import { formatGiB, formatGiBps } from '@livemig/machine';
import { parseAddress, QmpClient } from '@livemig/runtime';

/** What `livemig info` was asked. */
export interface InfoOptions {
  qmp: string;
  completed: boolean;
  json: boolean;
  timeoutMs?: number;
}

/** The subset of query-migrate the table shows (QEMU's field names). */
export interface QueryMigrate {
  status?: string;
  'error-desc'?: string;
  'total-time'?: number;
  'setup-time'?: number;
  downtime?: number;
  /** livemig: the limit the switchover was planned for, and by how much the downtime exceeded it (ms). */
  'x-downtime-limit'?: number;
  'x-downtime-overshoot'?: number;
  'expected-downtime'?: number;
  'cpu-throttle-percentage'?: number;
  ram?: {
    transferred: number;
    remaining: number;
    total: number;
    duplicate: number;
    normal: number;
    'normal-bytes': number;
    'dirty-pages-rate': number;
    mbps: number;
    'dirty-sync-count': number;
    'postcopy-requests': number;
    'page-size': number;
    'multifd-bytes'?: number;
  };
  'x-progress'?: { fraction: number; 'eta-ms': number | null; basis: string };
  /** livemig: the convergence policy's state, while it is on or once it has decided. */
  'x-livemig-convergence'?: { step: string; reason?: string; decisions: number; 'downtime-limit': number };
}

/** The connection or the command failed: one line for the user (exit status 1). */
export class InfoError extends Error {
  readonly code = 'LM_ERR_INFO';
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'InfoError';
  }
}

const RUNNING = new Set(['setup', 'active', 'postcopy-active', 'postcopy-paused', 'postcopy-recover', 'cancelling', 'pre-switchover', 'device', 'wait-unplug']);
const ENDED: Record<string, string> = { completed: 'Completed', failed: 'Failed', cancelled: 'Cancelled' };

/** virsh's job types: Unbounded while a migration runs; with --completed, how the last one ended. */
export function jobType(info: QueryMigrate, completed: boolean): string {
  const s = info.status;
  if (s === undefined) return 'None';
  if (completed) return ENDED[s] ?? 'None';
  return RUNNING.has(s) ? 'Unbounded' : 'None';
}

/** Why a QMP connection failed, in a few words (the errno stays for searching). */
function connectFailure(err: Error): string {
  const errno = ((err.cause as NodeJS.ErrnoException | undefined)?.code ?? (err as NodeJS.ErrnoException).code ?? '') as string;
  const hints: Record<string, string> = {
    ECONNREFUSED: 'connection refused (ECONNREFUSED): is a livemig process or QEMU serving QMP there?',
    ENOENT: 'no such socket (ENOENT): is a livemig process or QEMU serving QMP there?',
    EACCES: 'permission denied (EACCES)',
    ENOTFOUND: 'the host name does not resolve (ENOTFOUND)',
    ETIMEDOUT: 'timed out (ETIMEDOUT)',
  };
  // Connected, but nobody spoke: QEMU serves one client per -qmp socket and greets the next only
  // when the first leaves.
  if ((err as { code?: unknown }).code === 'LM_ERR_QMP_TIMEOUT') return `${err.message} (QEMU serves one client per -qmp socket: is another client connected? add a second -qmp)`;
  return hints[errno] ?? err.message;
}

function ms(v: number | undefined): string {
  return v === undefined ? '-' : `${v} ms`;
}

/** The human table: `Label:  value` lines, virsh's labels, livemig's units (GiB, GiB/s). */
export function infoTable(info: QueryMigrate, completed: boolean): string {
  const rows: [string, string][] = [['Job type', jobType(info, completed)]];
  const type = rows[0]![1];
  if (type !== 'None') {
    const r = info.ram;
    rows.push(['Status', info.status ?? '-']);
    if (info['error-desc'] !== undefined) rows.push(['Error', info['error-desc']]);
    rows.push(['Time elapsed', ms(info['total-time'])]);
    if (r !== undefined) {
      const pageSize = r['page-size'] || 4096;
      rows.push(
        ['Data processed', formatGiB(r.transferred)],
        ['Data remaining', formatGiB(r.remaining)],
        ['Data total', formatGiB(r.total)],
        ['Memory bandwidth', formatGiBps((r.mbps * 1e6) / 8)],
        ['Dirty rate', `${r['dirty-pages-rate']} pages/s (${formatGiBps(r['dirty-pages-rate'] * pageSize)})`],
        ['Page size', `${pageSize} bytes`],
        ['Iteration', String(r['dirty-sync-count'])],
        ['Postcopy requests', String(r['postcopy-requests'])],
        ['Constant pages', String(r.duplicate)],
        ['Normal pages', String(r.normal)],
        ['Normal data', formatGiB(r['normal-bytes'])],
      );
    }
    if (info.downtime !== undefined) rows.push(['Total downtime', ms(info.downtime)]);
    if (info['x-downtime-limit'] !== undefined) {
      const over = info['x-downtime-overshoot'];
      rows.push(['Downtime limit', `${ms(info['x-downtime-limit'])}${over === undefined ? ' (kept)' : ` (OVER by ${ms(over)})`}`]);
    }
    if (info['expected-downtime'] !== undefined) rows.push(['Expected downtime', ms(info['expected-downtime'])]);
    rows.push(['Setup time', ms(info['setup-time'])]);
    if (info['cpu-throttle-percentage'] !== undefined) rows.push(['Auto converge throttle', `${info['cpu-throttle-percentage']} %`]);
    const p = info['x-progress'];
    if (p !== undefined) {
      const eta = p['eta-ms'] === null ? `no ETA (${p.basis})` : `ETA ${(p['eta-ms'] / 1000).toFixed(1)} s`;
      rows.push(['Progress', `${Math.floor(p.fraction * 100)} %, ${eta}`]);
    }
    const c = info['x-livemig-convergence'];
    if (c !== undefined) {
      const last = c.step === 'watching' ? 'watching' : `${c.step} (${c.reason ?? '-'})`;
      rows.push(['Convergence policy', `${last}, ${c.decisions} decision(s), downtime-limit ${c['downtime-limit']} ms`]);
    }
  }
  const width = Math.max(...rows.map(([k]) => k.length)) + 2;
  return rows.map(([k, v]) => `${`${k}:`.padEnd(width)}${v}\n`).join('');
}

/** Connect, ask query-migrate, close; the text to print. Throws InfoError with one line. */
export async function runInfo(o: InfoOptions): Promise<string> {
  let address;
  try {
    address = parseAddress(o.qmp);
  } catch (err) {
    throw new InfoError(`--qmp ${o.qmp}: ${(err as Error).message}`, { cause: err });
  }
  if (address.transport !== 'unix' && address.transport !== 'tcp') throw new InfoError(`--qmp ${o.qmp}: a QMP socket is unix:PATH or tcp:HOST:PORT`);
  const timeoutMs = o.timeoutMs ?? 5_000;
  let client: QmpClient;
  try {
    client = await QmpClient.connect(address, { timeoutMs });
  } catch (err) {
    throw new InfoError(`cannot reach QMP at ${o.qmp}: ${connectFailure(err as Error)}`, { cause: err });
  }
  try {
    const info = (await client.execute('query-migrate')) as QueryMigrate;
    if (o.json) return `${JSON.stringify({ 'job-type': jobType(info, o.completed), 'query-migrate': info })}\n`;
    return infoTable(info, o.completed);
  } catch (err) {
    throw new InfoError(`query-migrate at ${o.qmp} failed: ${(err as Error).message}`, { cause: err });
  } finally {
    await client.close().catch(() => {});
  }
}
