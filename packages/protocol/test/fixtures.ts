// Access to the real QEMU 7.2 streams in ../shared/fixtures/qemu-7.2 (beside the checkout).
// Outside CI a missing shared/ skips the fixture tests; under CI=true it fails them loudly.

import { existsSync, readFileSync, readdirSync } from 'node:fs';
import { test } from 'node:test';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { gunzipSync } from 'node:zlib';

const here = dirname(fileURLToPath(import.meta.url));
export const repoRoot = resolve(here, '../../..');
export const sharedDir = resolve(process.env['LIVEMIG_SHARED'] ?? join(repoRoot, '..', 'shared'));
export const fixtureDir = join(sharedDir, 'fixtures', 'qemu-7.2');

/** undefined when the fixtures are present; else the reason (throws under CI). */
export function fixturesMissing(): string | undefined {
  if (existsSync(join(fixtureDir, 'README.md'))) return undefined;
  const why = `QEMU 7.2 fixtures not found at ${fixtureDir} (set LIVEMIG_SHARED to the shared/ folder)`;
  if (process.env['CI'] === 'true') throw new Error(why);
  return why;
}

/**
 * Without the fixtures a suite of per-fixture tests would have no tests at all, and the summary
 * would not show it: this registers one skipped test naming the reason, so it counts as skipped.
 */
export function countSkippedWithoutFixtures(what: string): void {
  const why = fixturesMissing();
  if (why !== undefined) test(`${what}: not run`, { skip: why }, () => {});
}

export interface Fixture {
  name: string;
  manifest: any;
  stream: Buffer;
  /** The file as stored (gzip for .gz). */
  path: string;
  returnPath?: Buffer;
}

export function fixtureNames(): string[] {
  if (fixturesMissing() !== undefined) return [];
  return readdirSync(fixtureDir)
    .filter((f) => f.endsWith('.json'))
    .map((f) => f.slice(0, -5))
    .sort();
}

export function loadFixture(name: string): Fixture {
  const manifest = JSON.parse(readFileSync(join(fixtureDir, `${name}.json`), 'utf8'));
  const path = join(fixtureDir, manifest.stream_file as string);
  const raw = readFileSync(path);
  const stream = manifest.stream_gzip === true || path.endsWith('.gz') ? gunzipSync(raw) : raw;
  const f: Fixture = { name, manifest, stream, path };
  if (typeof manifest.return_path_file === 'string') f.returnPath = readFileSync(join(fixtureDir, manifest.return_path_file));
  return f;
}

/** Offsets where a fixture's record headers, length fields and type bytes live (from its manifest): where mutations bite. */
export function interestingOffsets(manifest: any, length: number): number[] {
  const out: number[] = [0, 4, 8, 12];
  if (manifest.configuration !== null) for (let k = manifest.configuration.offset; k < manifest.configuration.end; k++) out.push(k);
  const walk = (records: any[]): void => {
    for (const r of records) {
      for (let d = 0; d < 16; d++) out.push(r.offset + d);
      if (r.footer_offset !== undefined) for (let d = 0; d < 5; d++) out.push(r.footer_offset + d);
      if (r.ram?.mem_size !== undefined) for (let d = 0; d < 96; d++) out.push(r.ram.mem_size.offset + d);
      if (r.ram?.eos_offset !== undefined) for (let d = 0; d < 8; d++) out.push(r.ram.eos_offset + d);
      if (r.data_offset !== undefined) for (let d = 0; d < 24; d++) out.push(r.data_offset + d);
      if (r.package !== undefined) walk(r.package);
    }
  };
  walk(manifest.records);
  if (manifest.vmdescription !== null) for (let d = -1; d < 16; d++) out.push(manifest.vmdescription.offset + d);
  return out.filter((k) => k >= 0 && k < length);
}
