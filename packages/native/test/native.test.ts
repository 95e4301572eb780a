// The addon on its own: memfd RAM as a SharedArrayBuffer that worker threads share and a second
// mapping sees; private RAM that huge pages back when asked; execve that keeps a memfd open across the exec (same PID, same bytes), and a
// failed execve that throws with its errno and leaves the process as it was; writeRefs (pieces
// with refs inserted, onto a real socket, as much as it takes); and the fallback when the addon
// is not built.
//
// Run: node --import tsx --test packages/native/test/native.test.ts (after the install built it)

import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { closeSync, copyFileSync, mkdirSync, mkdtempSync, openSync, readdirSync, readFileSync, readlinkSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { once } from 'node:events';
import net from 'node:net';
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

/** A worker thread adds `delta` to word `index` of `memory` (posted to it), then ends. */
async function addInWorker(memory: SharedArrayBuffer, index: number, delta: number): Promise<void> {
  const worker = new Worker('const { parentPort, workerData } = require("node:worker_threads"); parentPort.once("message", (m) => { Atomics.add(new Int32Array(m), workerData.index, workerData.delta); parentPort.postMessage("done"); });', {
    eval: true,
    workerData: { index, delta },
  });
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
}

test('createSharedRam: a SharedArrayBuffer over a memfd, shared with a worker and seen by a second mapping', { skip }, async () => {
  const length = 1 << 20;
  const { fd, memory } = native.createSharedRam('test.ram', length);
  assert.ok(memory instanceof SharedArrayBuffer);
  assert.equal(memory.byteLength, length);
  assert.ok(cloexec(fd), 'close-on-exec until an exec asks otherwise');
  const words = new Int32Array(memory);
  words[1] = 7;
  await addInWorker(memory, 1, 35);
  assert.equal(Atomics.load(words, 1), 42, 'the worker wrote the same memory');
  const again = new Int32Array(native.mapSharedRam(fd, length));
  assert.equal(again[1], 42, 'a second mapping of the memfd sees it');
  assert.throws(() => native.mapSharedRam(fd, 2 * length), (e: { code?: string }) => e.code === 'LM_ERR_SHARED_MEMORY');
  native.closeFd(fd);
});

/** AnonHugePages of this process (bytes), from /proc/self/smaps_rollup. */
function anonHugeBytes(): number {
  return Number(/AnonHugePages:\s+(\d+) kB/.exec(readFileSync('/proc/self/smaps_rollup', 'utf8'))![1]) * 1024;
}

/** Whether this kernel gives transparent huge pages to memory that asks for them ("always" or "madvise"). */
function hugePagesOnRequest(): boolean {
  try {
    return !/\[never\]/.test(readFileSync('/sys/kernel/mm/transparent_hugepage/enabled', 'utf8'));
  } catch {
    return false;
  }
}

test('createPrivateRam: zeroed RAM a worker shares; with hugePages the kernel backs it with 2 MiB pages, without it not', { skip }, async () => {
  const length = 16 << 20;
  const plain = native.createPrivateRam('plain', length, false);
  const huge = native.createPrivateRam('huge', length, true);
  for (const memory of [plain, huge]) {
    assert.ok(memory instanceof SharedArrayBuffer);
    assert.equal(memory.byteLength, length);
  }
  // Touch one byte a page (as a destination's prefault does), then see what the kernel mapped.
  const touch = (memory: SharedArrayBuffer): number => {
    const before = anonHugeBytes();
    const b = new Uint8Array(memory);
    for (let i = 0; i < length; i += 4096) b[i] = 1;
    return anonHugeBytes() - before;
  };
  // Written before anything reads it: a read would map the shared zero page, which some kernels
  // split into 4 KiB pages at the first write.
  const plainHuge = touch(plain);
  const hugeHuge = touch(huge);
  const bytes = new Uint8Array(huge);
  assert.ok(
    bytes.every((b, i) => b === (i % 4096 === 0 ? 1 : 0)),
    'fresh RAM held zeros: after the touch, only each page\'s first byte is set',
  );
  if (hugePagesOnRequest()) {
    // Aligned to 2 MiB, every 2 MiB of it can be a huge page (allowing for two the kernel could not find).
    assert.ok(hugeHuge >= length - (4 << 20), `hugePages: ${hugeHuge} bytes of ${length} in huge pages`);
    assert.ok(plainHuge < 2 << 20, `without hugePages: ${plainHuge} bytes in huge pages`);
  }
  const words = new Int32Array(huge);
  words[3] = 1;
  await addInWorker(huge, 3, 41);
  assert.equal(Atomics.load(words, 3), 42, 'the worker wrote the same memory');
  assert.throws(() => native.createPrivateRam('empty', 0, true), (e: { code?: string }) => e.code === 'LM_ERR_SHARED_MEMORY');
  assert.throws(() => native.createPrivateRam('pc.ram', 2 ** 50, true), (e: { code?: string; errno?: string; message: string }) => e.code === 'LM_ERR_SHARED_MEMORY' && e.errno === 'ENOMEM' && e.message.startsWith('RAM block "pc.ram" (1125899906842624 bytes): mmap'));
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

/** A connected TCP loopback pair: the writer's descriptor, and the reader. */
async function socketPair(): Promise<{ writer: net.Socket; reader: net.Socket; fd: number; close: () => void }> {
  const server = net.createServer();
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const writer = net.connect((server.address() as net.AddressInfo).port, '127.0.0.1');
  const [reader] = (await once(server, 'connection')) as [net.Socket];
  await once(writer, 'connect');
  server.close();
  // A peer that goes away resets the other end: an error the tests expect, not a crash.
  writer.on('error', () => {});
  reader.on('error', () => {});
  const fd = (writer as unknown as { _handle: { fd: number } })._handle.fd;
  return { writer, reader, fd, close: () => (writer.destroy(), reader.destroy()) };
}

async function readExactly(reader: net.Socket, n: number): Promise<Buffer> {
  const parts: Buffer[] = [];
  let got = 0;
  for await (const chunk of reader) {
    parts.push(chunk as Buffer);
    got += (chunk as Buffer).length;
    if (got >= n) break;
  }
  return Buffer.concat(parts);
}

test('writeRefs: the pieces with each ref inserted where it says, in one writev, onto a socket', { skip }, async () => {
  const { reader, fd, close } = await socketPair();
  try {
    const ram = Buffer.from(new SharedArrayBuffer(3 * 4096));
    for (let i = 0; i < ram.length; i++) ram[i] = (i * 31) & 0xff;
    const other = Buffer.from('other source');
    const headers = Buffer.from('h0h1h2|tail');
    const second = Buffer.from('second piece');
    // After h0: page 2; after h1: page 0; after h2: 5 bytes of `other`; before `second`'s byte 0: page 1.
    const refs = new Float64Array([0, 2, 0, 8192, 4096, 0, 4, 0, 0, 4096, 0, 6, 1, 6, 5, 1, 0, 0, 4096, 4096]);
    const expected = Buffer.concat([
      headers.subarray(0, 2), ram.subarray(8192), headers.subarray(2, 4), ram.subarray(0, 4096), headers.subarray(4, 6),
      other.subarray(6, 11), headers.subarray(6), ram.subarray(4096, 8192), second,
    ]);
    const written = native.writeRefs(fd, [headers, second], refs, 4, [ram, other]);
    assert.equal(written, expected.length);
    assert.deepEqual(await readExactly(reader, expected.length), expected);
  } finally {
    close();
  }
});

test('writeRefs: stops where a full socket would block and says how much it took; skip goes on from there', { skip, timeout: 30_000 }, async () => {
  const { reader, fd, close } = await socketPair();
  try {
    reader.pause();
    const pages = 4096; // 16 MiB: more than loopback buffers hold unread
    const ram = Buffer.from(new SharedArrayBuffer(pages * 4096));
    for (let p = 0; p < pages; p++) ram.fill(p & 0xff, p * 4096, (p + 1) * 4096);
    const headers = Buffer.alloc(pages * 8);
    const refs = new Float64Array(pages * 5);
    for (let p = 0; p < pages; p++) {
      headers.writeUInt32BE(p, p * 8 + 4);
      refs.set([0, (p + 1) * 8, 0, p * 4096, 4096], p * 5);
    }
    const total = headers.length + ram.length;
    const written = native.writeRefs(fd, [headers], refs, pages, [ram]);
    assert.ok(written > 0 && written < total, `took ${written} of ${total} bytes`);
    const expected = Buffer.alloc(total);
    for (let p = 0; p < pages; p++) {
      headers.copy(expected, p * 4104, p * 8, p * 8 + 8);
      ram.copy(expected, p * 4104 + 8, p * 4096, (p + 1) * 4096);
    }
    // The rest from where it stopped (skip), as the socket drains.
    const received = readExactly(reader, total);
    let done = written;
    while (done < total) {
      await new Promise((resolve) => setTimeout(resolve, 1));
      done += native.writeRefs(fd, [headers], refs, pages, [ram], done);
    }
    assert.equal(done, total);
    assert.ok((await received).equals(expected), 'every byte once, in order');
    assert.throws(() => native.writeRefs(fd, [headers], refs, pages, [ram], total + 1), RangeError, 'a skip past the end');
  } finally {
    close();
  }
});

test('writeRefs: a ref outside its source or piece, or out of order, is refused before anything is written', { skip }, async () => {
  const { reader, fd, close } = await socketPair();
  try {
    const src = Buffer.alloc(100);
    const piece = Buffer.alloc(10);
    const refused = (refs: number[], count: number): void =>
      assert.throws(() => native.writeRefs(fd, [piece], new Float64Array(refs), count, [src]), RangeError, JSON.stringify(refs));
    refused([0, 0, 0, 90, 20], 1); // past the source's end
    refused([0, 11, 0, 0, 10], 1); // past the piece's end
    refused([0, 5, 0, 0, 10, 0, 4, 0, 0, 10], 2); // out of order
    refused([0, 0, 1, 0, 10], 1); // no such source
    refused([1, 0, 0, 0, 10], 1); // no such piece
    refused([0, 0, 0, 0, 10], 2); // more refs than given
    assert.throws(() => native.writeRefs(fd, [piece], [0, 0, 0, 0, 1] as unknown as Float64Array, 1, [src]), TypeError);
    // Nothing went out: the next bytes the reader sees are these.
    assert.equal(native.writeRefs(fd, [Buffer.from('ok')], new Float64Array(0), 0, []), 2);
    assert.equal((await readExactly(reader, 2)).toString(), 'ok');
  } finally {
    close();
  }
});

test('writeRefs: a write error throws with its errno name', { skip }, () => {
  // A descriptor just closed: EBADF.
  const fd = openSync('/dev/null', 'w');
  closeSync(fd);
  assert.throws(() => native.writeRefs(fd, [Buffer.from('x')], new Float64Array(0), 0, []), (e: { errno?: string; message: string }) => e.errno === 'EBADF' && /writev/.test(e.message));
});

function isOpen(fd: number): boolean {
  try {
    readlinkSync(`/proc/self/fd/${fd}`);
    return true;
  } catch {
    return false;
  }
}

/** Wait (bounded) until `check` holds, on the event loop. */
async function until(check: () => boolean, what: string, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > deadline) assert.fail(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 1));
  }
}

test('openChannelWriter: batches written in order by its own thread, a full socket waited for, each reported once written', { skip, timeout: 30_000 }, async () => {
  const { reader, fd, close } = await socketPair();
  const reports: number[] = [];
  const writer = native.openChannelWriter(fd, (written, errno) => {
    assert.equal(errno, undefined);
    reports.push(written);
  });
  try {
    reader.pause();
    const pages = 2048;
    const ram = Buffer.from(new SharedArrayBuffer(pages * 4096));
    for (let p = 0; p < pages; p++) ram.fill(p & 0xff, p * 4096, (p + 1) * 4096);
    // Four batches of 512 pages (8 MiB in all: more than the loopback buffers hold unread), each
    // page after an 8-byte header of its own; then a batch of plain bytes.
    const expected: Buffer[] = [];
    let bytes = 0;
    for (let b = 0; b < 4; b++) {
      const headers = Buffer.alloc(512 * 8);
      const refs = new Float64Array(512 * 5);
      for (let i = 0; i < 512; i++) {
        const p = b * 512 + i;
        headers.writeUInt32BE(p, i * 8 + 4);
        refs.set([0, (i + 1) * 8, 0, p * 4096, 4096], i * 5);
        expected.push(headers.subarray(i * 8, i * 8 + 8), ram.subarray(p * 4096, (p + 1) * 4096));
      }
      bytes += writer.push([headers], refs, 512, [ram]);
    }
    const tail = Buffer.from('the end');
    bytes += writer.push([tail], new Float64Array(0), 0, []);
    expected.push(tail);
    const all = Buffer.concat(expected);
    assert.equal(bytes, all.length);
    // The reader has not read yet: the thread waits for room, nothing is lost or reordered.
    await new Promise((resolve) => setTimeout(resolve, 50));
    assert.ok(reports.length === 0 || reports.at(-1)! < 5, `not all written before the reader read (${reports.join(',')})`);
    reader.resume();
    const received = await readExactly(reader, all.length);
    assert.ok(received.equals(all), 'every byte once, in order');
    await until(() => reports.at(-1) === 5, 'the fifth batch reported');
    assert.deepEqual(reports, [...reports].sort((a, b) => a - b), 'counts only grow');
  } finally {
    writer.close();
    close();
  }
});

test('openChannelWriter: a peer that goes away is reported once with its errno; close stops a thread waiting for room at once', { skip, timeout: 30_000 }, async () => {
  const first = await socketPair();
  let failure: string | undefined;
  let reports = 0;
  const writer = native.openChannelWriter(first.fd, (_written, errno) => {
    reports++;
    failure = errno;
  });
  const big = Buffer.alloc(8 * 1024 * 1024, 7);
  try {
    writer.push([big], new Float64Array(0), 0, []);
    first.reader.destroy();
    await until(() => failure !== undefined, 'the write error');
    assert.match(failure!, /^(EPIPE|ECONNRESET)$/);
    await new Promise((resolve) => setTimeout(resolve, 20));
    assert.equal(reports, 1, 'reported once');
  } finally {
    assert.equal(typeof writer.close(), 'number', 'the batches it wrote');
    assert.equal(writer.close(), undefined, 'twice: nothing');
    first.close();
  }
  // A reader that never reads: the thread waits in poll() until close, which returns at once.
  const second = await socketPair();
  try {
    second.reader.pause();
    const stuck = native.openChannelWriter(second.fd, () => assert.fail('nothing is reported after close'));
    stuck.push([big], new Float64Array(0), 0, []);
    await new Promise((resolve) => setTimeout(resolve, 20));
    const t0 = performance.now();
    stuck.close();
    assert.ok(performance.now() - t0 < 1000, 'close does not wait for the socket');
    await new Promise((resolve) => setTimeout(resolve, 20));
  } finally {
    second.close();
  }
});

test('openChannelWriter: its descriptor is a close-on-exec duplicate, closed with it; a bad batch is refused before it is queued', { skip }, async () => {
  const { reader, fd, close } = await socketPair();
  const before = new Set(readdirSync('/proc/self/fd'));
  const writer = native.openChannelWriter(fd, () => {});
  // (Each listing has an fd of its own, closed by the time it returns: only those still open count.)
  const added = readdirSync('/proc/self/fd').filter((f) => !before.has(f) && isOpen(Number(f))).map(Number);
  try {
    assert.ok(added.length >= 1, 'a descriptor of its own');
    for (const f of added) assert.ok(cloexec(f), `fd ${f} is close-on-exec`);
    assert.throws(() => writer.push([Buffer.alloc(4)], new Float64Array([0, 9, 0, 0, 1]), 1, [Buffer.alloc(1)]), RangeError);
    writer.push([Buffer.from('ok')], new Float64Array(0), 0, []);
    assert.equal((await readExactly(reader, 2)).toString(), 'ok');
  } finally {
    writer.close();
    close();
  }
  assert.deepEqual(added.filter(isOpen), [], 'its descriptors are closed with it');
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
    const { guestRamAllocator } = (await import(pathToFileURL(join(dir, 'dist', 'index.js')).href)) as typeof import('../src/index.ts');
    assert.equal(guestRamAllocator(), undefined, 'guests fall back to plain SharedArrayBuffers');
    for (const call of [() => missing.createSharedRam('x', 4096), () => missing.mapSharedRam(3, 4096), () => missing.createPrivateRam('x', 4096, true), () => missing.execImage('/bin/true', ['true'], [], [])]) {
      assert.throws(call, (e: { code?: string; message: string }) => e.code === 'LM_ERR_NATIVE_UNAVAILABLE' && /node packages\/native\/scripts\/build\.mjs/.test(e.message));
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
