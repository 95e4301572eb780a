// docs/errors.md and the code agree (style.md §3.4): every code a source file can raise has a
// row in one of the page's code tables, and every row names a code that some source defines.
// Codes are found two ways: every 'LM_ERR_…' string literal in packages/*/src, and every value
// of every exported `…ErrorCode` table of each package.

import assert from 'node:assert/strict';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { fileURLToPath } from 'node:url';

const ROOT = fileURLToPath(new URL('../../../', import.meta.url));
const PACKAGES = join(ROOT, 'packages');
const CODE = /^LM_ERR_[A-Z0-9_]+$/;

/** Codes in the first column of the page's tables whose first header cell is "code". */
function documentedCodes(markdown: string): Set<string> {
  const out = new Set<string>();
  let inCodeTable = false;
  for (const line of markdown.split('\n')) {
    if (!line.startsWith('|')) {
      inCodeTable = false;
      continue;
    }
    const first = line.split('|')[1]?.trim() ?? '';
    if (first === 'code') inCodeTable = true;
    else if (inCodeTable) {
      const m = /^`(LM_ERR_[A-Z0-9_]+)`$/.exec(first);
      if (m !== null) out.add(m[1]!);
    }
  }
  return out;
}

/** Every quoted 'LM_ERR_…' literal in a source text (a bare prefix such as 'LM_ERR_' is not a code). */
function literalCodes(source: string): string[] {
  return [...source.matchAll(/['"`](LM_ERR_[A-Z0-9_]+)['"`]/g)].map((m) => m[1]!);
}

function sourceFiles(dir: string): string[] {
  const out: string[] = [];
  for (const entry of readdirSync(dir, { withFileTypes: true })) {
    const path = join(dir, entry.name);
    if (entry.isDirectory()) out.push(...sourceFiles(path));
    else if (entry.name.endsWith('.ts')) out.push(path);
  }
  return out;
}

const packageNames = readdirSync(PACKAGES, { withFileTypes: true })
  .filter((d) => d.isDirectory())
  .map((d) => d.name);

/** code → the source files that spell it. */
function codesInSources(): Map<string, string[]> {
  const out = new Map<string, string[]>();
  for (const pkg of packageNames) {
    const src = join(PACKAGES, pkg, 'src');
    if (!existsSync(src)) continue;
    for (const file of sourceFiles(src)) {
      for (const code of literalCodes(readFileSync(file, 'utf8'))) {
        const where = out.get(code) ?? [];
        where.push(file.slice(ROOT.length));
        out.set(code, where);
      }
    }
  }
  return out;
}

/** Values of every exported object named `…ErrorCode` in each package's index. */
async function codesInTables(): Promise<Map<string, string>> {
  const out = new Map<string, string>();
  for (const pkg of packageNames) {
    const index = join(PACKAGES, pkg, 'src', 'index.ts');
    if (!existsSync(index)) continue;
    const mod = (await import(index)) as Record<string, unknown>;
    for (const [name, value] of Object.entries(mod)) {
      if (!name.endsWith('ErrorCode') || typeof value !== 'object' || value === null) continue;
      for (const code of Object.values(value)) {
        assert.match(String(code), CODE, `${pkg} ${name} holds ${String(code)}, not an LM_ERR_ code`);
        out.set(code as string, `${pkg} ${name}`);
      }
    }
  }
  return out;
}

const docs = readFileSync(join(ROOT, 'docs', 'errors.md'), 'utf8');

describe('docs/errors.md lists every error code', () => {
  it('reads codes from the code tables only, and quoted literals only', () => {
    const page = [
      '| class | package | extra fields |',
      '|---|---|---|',
      '| `LM_ERR_NOT_A_CODE_ROW` | x | y |',
      '',
      '| code | meaning |',
      '|---|---|',
      '| `LM_ERR_ONE` | first |',
      '| `LM_ERR_TWO_2` | mentions `LM_ERR_THREE` |',
      'text `LM_ERR_FOUR`',
      '| `LM_ERR_FIVE` | a table without a code header |',
    ].join('\n');
    assert.deepEqual([...documentedCodes(page)].sort(), ['LM_ERR_ONE', 'LM_ERR_TWO_2']);
    const src = `const a = 'LM_ERR_A'; x.startsWith('LM_ERR_'); // LM_ERR_COMMENT\nthrow f("LM_ERR_B", \`LM_ERR_C\`);`;
    assert.deepEqual(literalCodes(src), ['LM_ERR_A', 'LM_ERR_B', 'LM_ERR_C']);
  });

  it('finds the codes in the sources and the code tables', async () => {
    const literals = codesInSources();
    const tables = await codesInTables();
    // A cross-check on the scan itself: a few codes we know each way.
    for (const code of ['LM_ERR_TRUNCATED', 'LM_ERR_BAD_ADDRESS', 'LM_ERR_USAGE', 'LM_ERR_BAD_PARAMETER', 'LM_ERR_DEVICE_LOAD']) {
      assert.ok(literals.has(code), `${code} found in a source literal`);
    }
    for (const code of ['LM_ERR_TRUNCATED', 'LM_ERR_WRONG_STATE', 'LM_ERR_QMP_TIMEOUT', 'LM_ERR_BAD_GUEST_CONFIG']) {
      assert.ok(tables.has(code), `${code} found in a code table`);
    }
  });

  it('has a row for every code a source defines', async () => {
    const documented = documentedCodes(docs);
    const missing: string[] = [];
    for (const [code, files] of codesInSources()) if (!documented.has(code)) missing.push(`${code} (${files.join(', ')})`);
    for (const [code, table] of await codesInTables()) if (!documented.has(code)) missing.push(`${code} (${table})`);
    assert.deepEqual(missing, [], 'codes without a row in docs/errors.md');
  });

  it('lists no code that no source defines', async () => {
    const defined = new Set([...codesInSources().keys(), ...(await codesInTables()).keys()]);
    const stale = [...documentedCodes(docs)].filter((code) => !defined.has(code));
    assert.deepEqual(stale, [], 'rows in docs/errors.md for codes nothing raises');
  });

  it('documents each code once (one meaning per code)', () => {
    const rows = docs.split('\n').filter((l) => /^\| `LM_ERR_[A-Z0-9_]+` \|/.test(l));
    const seen = new Map<string, number>();
    for (const row of rows) {
      const code = /`(LM_ERR_[A-Z0-9_]+)`/.exec(row)![1]!;
      seen.set(code, (seen.get(code) ?? 0) + 1);
    }
    // LM_ERR_INVALID_ARGUMENT is shared by two packages' tables; the runtime row points at the protocol one.
    const twice = [...seen].filter(([code, n]) => n > 1 && code !== 'LM_ERR_INVALID_ARGUMENT');
    assert.deepEqual(twice, []);
  });
});
