// This machine's ceilings, measured by the dependency-free scripts in ../shared/bench in the same
// run as our figures (the machine is shared and noisy: only same-run ratios mean anything).

import { execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

export const repoRoot = resolve(fileURLToPath(new URL('..', import.meta.url)));
export const sharedBench = resolve(process.env['LIVEMIG_SHARED'] ?? join(repoRoot, '..', 'shared'), 'bench');

export interface Figure {
  median: number;
  min: number;
  max: number;
}

function script(name: string): string {
  const p = join(sharedBench, name);
  if (!existsSync(p)) throw new Error(`${p} not found: the ceilings come from ../shared/bench (set LIVEMIG_SHARED)`);
  return p;
}

/** mem-limit.mjs: GiB/s of one method (e.g. "copy/buf.copy 4K"). */
export function memLimit(method: string, size = '1G', reps = 3): Figure {
  const out = execFileSync(process.execPath, [script('mem-limit.mjs'), '--size', size, '--reps', String(reps), '--only', `^${method.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}$`, '--json'], {
    encoding: 'utf8',
    maxBuffer: 1 << 20,
  });
  const line = out.split('\n').find((l) => l.startsWith('{'));
  if (line === undefined) throw new Error(`mem-limit.mjs printed no figure for ${method}:\n${out}`);
  return (JSON.parse(line) as { gibps: Figure }).gibps;
}

export function fmt(f: Figure): string {
  return `${f.median.toFixed(2)} [${f.min.toFixed(2)}-${f.max.toFixed(2)}]`;
}

export function summarize(samples: number[]): Figure {
  const s = [...samples].sort((a, b) => a - b);
  return { median: s[Math.floor(s.length / 2)]!, min: s[0]!, max: s[s.length - 1]! };
}
