// The addon on its own: memfd RAM as a SharedArrayBuffer that worker threads share and a second
// mapping sees; execve that keeps a memfd open across the exec (same PID, same bytes), and a
// failed execve that throws with its errno and leaves the process as it was; and the fallback
// when the addon is not built.
//
// Run: node --import tsx --test packages/native/test/native.test.ts (after the install built it)

import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { Worker } from 'node:worker_threads';
import { native } from '../src/index.ts';

const skip = native.available || process.env['CI'] === 'true' ? false : `the native addon is not built (${native.unavailableReason})`;
const DIST = fileURLToPath(new URL('../dist/index.js', import.meta.url));

/** The close-on-exec flag of one of our fds, from /proc. */
function cloexec(fd: number): boolean {
  const flags = /flags:\s+(\d+)/.exec(readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8'))![1]!;
  return (parseInt(flags, 8) & 0o2000000) !== 0;
}

test('createSharedRam: a SharedArrayBuffer over a memfd, shared with a worker and seen by a second mapping', { skip }, async () => {
  const length = 1 << 20;
  const { fd, memory } = native.createSharedRam('test.ram', length);
  assert.ok(memory instanceof SharedArrayBuffer);
  assert.equal(memory.byteLength, length);
  assert.ok(cloexec(fd), 'close-on-exec until an exec asks otherwise');
  const words = new Int32Array(memory);
  words[1] = 7;
  const worker = new Worker('const { parentPort } = require("node:worker_threads"); parentPort.once("message", (m) => { Atomics.add(new Int32Array(m), 1, 35); parentPort.postMessage("done"); });', { eval: true });
  try {
    const done = new Promise((resolve, reject) => {
      worker.once('message', resolve);
      worker.once('error', reject);
    });
    worker.postMessage(memory);
    await done;
  } finally {
    await worker.terminate();
  }
  assert.equal(Atomics.load(words, 1), 42, 'the worker wrote the same memory');
  const again = new Int32Array(native.mapSharedRam(fd, length));
  assert.equal(again[1], 42, 'a second mapping of the memfd sees it');
  assert.throws(() => native.mapSharedRam(fd, 2 * length), (e: { code?: string }) => e.code === 'LM_ERR_SHARED_MEMORY');
  native.closeFd(fd);
});

test('execImage: a missing program throws LM_ERR_CPR_EXEC_FAILED (ENOENT) and the kept fd is close-on-exec again', { skip }, () => {
  const { fd } = native.createSharedRam('test.ram', 4096);
  assert.throws(
    () => native.execImage('/nonexistent/program', ['program'], [], [fd]),
    (e: { code?: string; errno?: string; message: string }) => e.code === 'LM_ERR_CPR_EXEC_FAILED' && e.errno === 'ENOENT' && /No such file/.test(e.message),
  );
  assert.ok(cloexec(fd));
  assert.ok(cloexec(1), 'stdio back as it was');
  native.closeFd(fd);
});

test('execImage: the process becomes the program, same PID, with the memfd open and its bytes intact', { skip, timeout: 30_000 }, async () => {
  // A child node writes into a memfd and execs a shell that reads it back through the kept fd.
  const script = `
    import { native } from ${JSON.stringify(DIST)};
    const { fd, memory } = native.createSharedRam('test.ram', 4096);
    Buffer.from(memory).write('kept across exec', 'latin1');
    process.stdout.write('pid ' + process.pid + '\\n');
    native.execImage('/bin/sh', ['sh', '-c', 'echo pid $$; head -c 16 /proc/self/fd/' + fd + '; echo'], ['PATH=/usr/bin:/bin'], [fd]);
  `;
  const out = await new Promise<string>((resolve, reject) => {
    execFile(process.execPath, ['--input-type=module', '-e', script], { timeout: 20_000 }, (err, stdout, stderr) => (err !== null ? reject(new Error(`${err.message}\n${stderr}`)) : resolve(stdout)));
  });
  const [before, after, bytes] = out.trim().split('\n');
  assert.match(before!, /^pid \d+$/);
  assert.equal(after, before, 'the same PID before and after the exec');
  assert.equal(bytes, 'kept across exec');
});

test('without the addon: available is false with the reason, and each call throws LM_ERR_NATIVE_UNAVAILABLE saying how to build it', async () => {
  // The built module copied where no build/Release is beside it: as on a machine whose install could not compile.
  const dir = mkdtempSync(join(tmpdir(), 'lm-native-'));
  try {
    mkdirSync(join(dir, 'dist'));
    for (const f of ['index.js', 'errors.js']) copyFileSync(fileURLToPath(new URL(`../dist/${f}`, import.meta.url)), join(dir, 'dist', f));
    writeFileSync(join(dir, 'package.json'), '{"type":"module"}');
    const { native: missing } = (await import(pathToFileURL(join(dir, 'dist', 'index.js')).href)) as typeof import('../src/index.ts');
    assert.equal(missing.available, false);
    assert.match(missing.unavailableReason, /Cannot find module/);
    for (const call of [() => missing.createSharedRam('x', 4096), () => missing.mapSharedRam(3, 4096), () => missing.execImage('/bin/true', ['true'], [], [])]) {
      assert.throws(call, (e: { code?: string; message: string }) => e.code === 'LM_ERR_NATIVE_UNAVAILABLE' && /node packages\/native\/scripts\/build\.mjs/.test(e.message));
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
