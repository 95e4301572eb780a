// Real QEMU (qemu-system-x86_64: 7.2 on Debian 12, or 10.0 unpacked beside it) as the other end of a livemig migration.
// Recipes: ../shared/spec/qemu-interop.md. QEMU runs with `-machine none` (no vCPU: a running
// TCG guest is no RAM oracle) and one RAM block "m0", driven over its own QMP socket with the
// same QmpClient the livemig processes use. A QEMU process is a Child of the test's Harness, so
// Harness.cleanup kills it by pid (SIGTERM, then SIGKILL) with the livemig processes.
//
// Availability: locally a missing qemu-system-x86_64 skips the QEMU tests (`qemuSkip()`); under
// CI=true the tests run anyway and fail in startQemu with a message saying QEMU is required.

import { execFileSync, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { readFile, writeFile } from 'node:fs/promises';
import { setTimeout as sleep } from 'node:timers/promises';
import type { MigrationInfo } from './migration.ts';
import { Child, connectQmp, type Harness } from './processes.ts';

export const QEMU_BINARY = process.env['LIVEMIG_QEMU'] ?? 'qemu-system-x86_64';
/** A QEMU unpacked beside the system's (QEMU 10.0: .ci/install-qemu-10.0) needs its firmware folder (`-L`). */
const QEMU_DATA_DIR = process.env['LIVEMIG_QEMU_DATA'];
/** How test names call this QEMU ("QEMU 7.2", "QEMU 10.0"). */
export const QEMU_LABEL = process.env['LIVEMIG_QEMU_LABEL'] ?? 'QEMU 7.2';
/** Bound on QEMU's QMP socket accepting after spawn. */
const QEMU_START_MS = 15_000;

let versionCache: string | null | undefined;

/** `qemu-system-x86_64 --version`'s first line, or null when it cannot be run. */
export function qemuVersion(): string | null {
  if (versionCache !== undefined) return versionCache;
  try {
    const out = execFileSync(QEMU_BINARY, ['--version'], { timeout: 10_000, stdio: ['ignore', 'pipe', 'ignore'] }).toString();
    versionCache = out.split('\n')[0]!.trim();
  } catch {
    versionCache = null;
  }
  return versionCache;
}

export const QEMU_MISSING = `${QEMU_BINARY} not installed`;

/**
 * node:test `skip` option for a QEMU test: false when QEMU is there; the reason to skip when it
 * is missing locally; false under CI=true (the test then runs and fails in requireQemu).
 */
export function qemuSkip(): string | false {
  if (qemuVersion() !== null) return false;
  return process.env['CI'] === 'true' ? false : QEMU_MISSING;
}

/** Throws when QEMU cannot be run (under CI=true a missing QEMU is a failure, not a skip). */
export function requireQemu(): string {
  const v = qemuVersion();
  if (v === null) {
    throw new Error(`${QEMU_MISSING}${process.env['CI'] === 'true' ? ' (CI=true: the QEMU interop tests require it; .ci/run installs QEMU 7.2 and 10.0)' : ''}`);
  }
  return v;
}

/** QEMU's RAM-block and machine flags for one block "m0" of `size` bytes (`-machine none`). */
export function qemuM0(backend: { file: string } | 'memfd', size: number): string[] {
  const sz = `${size / 2 ** 20}M`;
  const object =
    backend === 'memfd'
      ? `memory-backend-memfd,id=m0,size=${sz}`
      : `memory-backend-file,id=m0,size=${sz},mem-path=${backend.file},share=on`;
  return ['-object', object, '-machine', 'none,memory-backend=m0'];
}

/**
 * Start qemu-system-x86_64 with `args` plus `-nodefaults -display none` and a QMP socket in the
 * harness dir; resolves once QMP accepted (events are recorded in child.events).
 */
export async function startQemu(h: Harness, name: string, args: string[]): Promise<Child> {
  requireQemu();
  const qmpPath = h.path(`${name}.qmp`);
  const data = QEMU_DATA_DIR === undefined ? [] : ['-L', QEMU_DATA_DIR];
  const proc = spawn(QEMU_BINARY, [...data, '-nodefaults', '-display', 'none', ...args, '-qmp', `unix:${qmpPath},server=on,wait=off`], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const child = new Child(name, proc, `unix:${qmpPath}`);
  h.children.push(child);
  child.qmp = await connectQmp(child, QEMU_START_MS);
  void (async () => {
    for await (const e of child.qmp.events({ idleTimeoutMs: Infinity })) child.events.push(e);
  })().catch(() => {});
  return child;
}

const FINAL = new Set(['completed', 'failed', 'cancelled']);

/**
 * Poll query-migrate every `intervalMs` until a final status (completed / failed / cancelled)
 * and return that answer. Made for peers that exit soon after failing (a livemig destination
 * exits 200 ms after a failed incoming migration, QEMU's at once): a closed QMP connection before
 * a final status is reported with the last answer seen.
 */
export async function pollFinal(c: Child, { timeoutMs = 30_000, intervalMs = 10 }: { timeoutMs?: number; intervalMs?: number } = {}): Promise<MigrationInfo> {
  const deadline = Date.now() + timeoutMs;
  let last: MigrationInfo = {};
  for (;;) {
    try {
      last = await c.execute<MigrationInfo>('query-migrate', undefined, 5_000);
    } catch (err) {
      throw new Error(`${c.name}: query-migrate failed before a final status (last: ${JSON.stringify(last)}): ${(err as Error).message}`, { cause: err });
    }
    if (last.status !== undefined && FINAL.has(last.status)) return last;
    if (Date.now() > deadline) throw new Error(`${c.name}: no final migration status within ${timeoutMs} ms; last: ${JSON.stringify(last)}`);
    await sleep(intervalMs);
  }
}

export const PAGE = 4096;

/**
 * A guest RAM image of `size` bytes with known content: every `stride`-th page below `dataEnd`
 * holds sha256-derived bytes (page i: sha256("livemig-qemu-interop:" + i + ":" + k) for k = 0…127),
 * everything else is zero. Returns the bytes.
 */
export function ramImage(size: number, { stride = 2, dataEnd = size / 2 }: { stride?: number; dataEnd?: number } = {}): Buffer {
  const img = Buffer.alloc(size);
  for (let page = 0; page * PAGE < dataEnd; page += stride) {
    for (let k = 0; k < PAGE / 32; k++) {
      createHash('sha256').update(`livemig-qemu-interop:${page}:${k}`).digest().copy(img, page * PAGE + k * 32);
    }
  }
  return img;
}

export async function writeRamImage(file: string, img: Buffer): Promise<string> {
  await writeFile(file, img);
  return sha256(img);
}

export function sha256(b: Buffer | Uint8Array): string {
  return createHash('sha256').update(b).digest('hex');
}

export async function sha256File(file: string): Promise<string> {
  return sha256(await readFile(file));
}
