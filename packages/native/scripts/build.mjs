// Builds the addon (build/Release/livemig_native.node) with node-gyp, as `pnpm install` runs it.
// Node's headers come from this Node's own install (include/node beside bin/node) when they are
// there, so no download is needed. A failed build is reported but does not fail the install:
// livemig then runs without it (plain SharedArrayBuffer RAM, pages copied into slabs before they
// are sent; mode cpr-exec is refused).

import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(dirname(fileURLToPath(import.meta.url)));
const strict = process.argv.includes('--strict');

/** node-gyp: the one pnpm or npm puts on PATH for install scripts, else npm's own copy. */
function nodeGyp() {
  if (process.env.npm_config_node_gyp && existsSync(process.env.npm_config_node_gyp)) return [process.execPath, process.env.npm_config_node_gyp];
  const npmCopy = join(dirname(dirname(process.execPath)), 'lib', 'node_modules', 'npm', 'node_modules', 'node-gyp', 'bin', 'node-gyp.js');
  if (existsSync(npmCopy)) return [process.execPath, npmCopy];
  try {
    return [process.execPath, createRequire(import.meta.url).resolve('node-gyp/bin/node-gyp.js')];
  } catch {
    return ['node-gyp'];
  }
}

const prefix = dirname(dirname(process.execPath));
const args = ['rebuild'];
if (existsSync(join(prefix, 'include', 'node', 'node.h'))) args.push(`--nodedir=${prefix}`);
const [command, ...first] = nodeGyp();
const run = spawnSync(command, [...first, ...args], { cwd: here, stdio: 'inherit' });
if (run.status !== 0) {
  const why = run.error !== undefined ? run.error.message : `node-gyp exited with status ${run.status}`;
  process.stderr.write(
    `@livemig/native: the addon did not build (${why}). livemig runs without it (the source then copies each page it sends into a slab), but mode cpr-exec needs it: install g++, make and python3, then run \`node packages/native/scripts/build.mjs\`.\n`,
  );
  process.exit(strict ? 1 : 0);
}
