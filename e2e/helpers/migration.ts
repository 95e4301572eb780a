// Migration-level helpers over QMP: bounded polling of query-migrate, digests, capabilities.

import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import type { Child } from './processes.ts';

export interface RamInfo {
  transferred: number;
  remaining: number;
  total: number;
  duplicate: number;
  normal: number;
  'normal-bytes': number;
  mbps: number;
  'dirty-sync-count': number;
  'precopy-bytes': number;
  'downtime-bytes': number;
  [key: string]: number;
}

export interface MigrationInfo {
  status?: string;
  'error-desc'?: string;
  'total-time'?: number;
  'setup-time'?: number;
  downtime?: number;
  'expected-downtime'?: number;
  ram?: RamInfo;
  'xbzrle-cache'?: { 'cache-size': number; bytes: number; pages: number; 'cache-miss': number; 'cache-miss-rate': number; 'encoding-rate': number; overflow: number };
  'cpu-throttle-percentage'?: number;
  'socket-address'?: unknown[];
}

export interface GuestDigest {
  blocks: { idstr: string; length: number; sha256: string }[];
  pattern: { consistent: boolean | null; boundary: number | null; badPages: number[] };
  devices: Record<string, unknown>;
}

/** Default bound on a migration reaching a state. */
export const MIGRATION_WAIT_MS = 60_000;
const FINAL = new Set(['completed', 'failed', 'cancelled']);

export function queryMigrate(c: Child): Promise<MigrationInfo> {
  return c.execute<MigrationInfo>('query-migrate');
}

export async function queryStatus(c: Child): Promise<string> {
  return (await c.execute<{ status: string }>('query-status')).status;
}

export function digest(c: Child): Promise<GuestDigest> {
  return c.execute<GuestDigest>('x-query-guest-digest', undefined, 60_000);
}

export function blockShas(d: GuestDigest): Record<string, string> {
  return Object.fromEntries(d.blocks.map((b) => [b.idstr, b.sha256]));
}

/**
 * Poll query-migrate (every `intervalMs`) until `done(info)` holds; bounded by `timeoutMs`.
 * Reaching a final status (completed / failed / cancelled) for which `done` is false fails at
 * once, with the error-desc.
 */
export async function waitForMigration(
  c: Child,
  done: (info: MigrationInfo) => boolean,
  what: string,
  { timeoutMs = MIGRATION_WAIT_MS, intervalMs = 50 }: { timeoutMs?: number; intervalMs?: number } = {},
): Promise<MigrationInfo> {
  const deadline = Date.now() + timeoutMs;
  let info: MigrationInfo = {};
  for (;;) {
    info = await queryMigrate(c);
    if (done(info)) return info;
    if (info.status !== undefined && FINAL.has(info.status)) {
      throw new Error(`${c.name}: migration ended "${info.status}" while waiting for ${what}: ${JSON.stringify(info)}`);
    }
    if (Date.now() > deadline) throw new Error(`${c.name}: no ${what} within ${timeoutMs} ms; last query-migrate: ${JSON.stringify(info)}`);
    await sleep(intervalMs);
  }
}

/** Poll query-migrate until its status is one of `statuses` (bounded, default 60 s). */
export function waitForStatus(c: Child, statuses: string | string[], options: { timeoutMs?: number; intervalMs?: number } = {}): Promise<MigrationInfo> {
  const want = Array.isArray(statuses) ? statuses : [statuses];
  return waitForMigration(c, (i) => i.status !== undefined && want.includes(i.status), `status ${want.join('|')}`, options);
}

/** migrate-set-capabilities with every named capability on. */
export async function setCapabilities(c: Child, names: string[]): Promise<void> {
  await c.execute('migrate-set-capabilities', { capabilities: names.map((capability) => ({ capability, state: true })) });
}

/** The destination holds exactly the stopped source's RAM: every block's sha256 equal. */
export async function assertSameRam(src: Child, dst: Child): Promise<{ source: GuestDigest; destination: GuestDigest }> {
  const [source, destination] = await Promise.all([digest(src), digest(dst)]);
  assert.deepEqual(
    destination.blocks.map((b) => [b.idstr, b.length]),
    source.blocks.map((b) => [b.idstr, b.length]),
    'same RAM blocks on both sides',
  );
  assert.deepEqual(blockShas(destination), blockShas(source), 'every RAM block of the destination equals the stopped source');
  return { source, destination };
}

export const MiB = 2 ** 20;
