// The e2e harness itself: whatever a test body does, its processes do not outlive it.

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { closeSync, existsSync, openSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { Child, withHarness } from './helpers/processes.ts';

const T = { timeout: 60_000 };

test('a failing body: every child is killed, the temp dir removed, the error carries their output', T, async () => {
  let children: Child[] = [];
  let dir = '';
  await assert.rejects(
    withHarness(async (h) => {
      dir = h.dir;
      const src = await h.source({ guest: ['-m', '16M'] });
      const dst = await h.destination({ incoming: 'unix', guest: ['-m', '16M'] });
      children = [src, dst];
      assert.ok(src.alive && dst.alive);
      throw new Error('boom');
    }),
    (err: Error) => {
      assert.match(err.message, /^boom/);
      assert.match(err.message, /--- src \(pid \d+, running\) ---/);
      assert.match(err.message, /--- dst \(pid \d+, running\) ---/);
      assert.match(err.message, /QMP listening/, 'the children’s log lines are in the message');
      return true;
    },
  );
  assert.equal(children.length, 2);
  for (const c of children) {
    assert.equal(c.alive, false, `${c.name} is gone`);
    // SIGTERM is enough for a healthy process: it exits through its own handler.
    assert.equal((await c.exited).signal, null, `${c.name} exited on SIGTERM: ${JSON.stringify(await c.exited)}`);
  }
  assert.equal(existsSync(dir), false, 'temp dir removed');
});

test('a child that ignores SIGTERM (stopped) is SIGKILLed after the bounded grace', T, async () => {
  let stopped: Child | undefined;
  await assert.rejects(
    withHarness(async (h) => {
      stopped = await h.destination({ incoming: 'defer', guest: ['-m', '16M'] });
      process.kill(stopped.pid, 'SIGSTOP');
      throw new Error('boom');
    }),
    /boom/,
  );
  assert.ok(stopped !== undefined);
  assert.deepEqual(await stopped.exited, { code: null, signal: 'SIGKILL' });
});

/** Wait (at most 10 s) until `child` printed `chars` characters: its first burst. */
async function untilPrinted(child: Child, chars: number): Promise<void> {
  const deadline = Date.now() + 10_000;
  while (child.outputMark() < chars) {
    assert.ok(Date.now() < deadline, 'the first burst came');
    await sleep(10);
  }
}

test('outputSince gives what a child printed after a mark, and refuses once part of it is no longer kept', T, async () => {
  // Two bursts, the second once told on stdin: the mark goes between them.
  const script = "process.stdout.write('a'.repeat(3000)); process.stdin.once('data', () => { process.stdout.write('b'.repeat(3000)); process.exit(0); });";
  for (const keep of [4096, 2048]) {
    const proc = spawn(process.execPath, ['-e', script], { stdio: ['pipe', 'pipe', 'pipe'] });
    try {
      const child = new Child('printer', proc, 'unix:/nonexistent', { keepBytes: keep });
      await untilPrinted(child, 3000);
      const mark = child.outputMark();
      proc.stdin!.write('go\n');
      await child.waitForExit();
      assert.equal(child.outputMark(), 6000);
      if (keep >= 3000) assert.equal(child.outputSince(mark), 'b'.repeat(3000));
      else assert.throws(() => child.outputSince(mark), /952 characters printed after the mark are no longer kept/);
    } finally {
      proc.kill('SIGKILL');
    }
  }
});

test('a child printing into a file (as outputToFile has it): output, marks and outputSince read the file, all of it kept', T, async () => {
  const dir = await mkdtemp(join(tmpdir(), 'lm-harness-'));
  let proc: ReturnType<typeof spawn> | undefined;
  try {
    const file = join(dir, 'printer.out');
    // More than the 64 KiB kept from pipes, on stdout, then more on stderr.
    const script = "process.stdout.write('a'.repeat(70000)); process.stdin.once('data', () => { process.stderr.write('b'.repeat(3000)); process.exit(0); });";
    const fd = openSync(file, 'a');
    try {
      proc = spawn(process.execPath, ['-e', script], { stdio: ['pipe', fd, fd] });
    } finally {
      closeSync(fd);
    }
    const child = new Child('printer', proc, 'unix:/nonexistent', { file });
    await untilPrinted(child, 70000);
    const mark = child.outputMark();
    proc.stdin!.write('go\n');
    await child.waitForExit();
    assert.equal(child.output(), 'a'.repeat(70000) + 'b'.repeat(3000));
    assert.equal(child.outputSince(mark), 'b'.repeat(3000));
    assert.throws(() => child.outputSince(80_000), /fewer than the mark/);
  } finally {
    proc?.kill('SIGKILL');
    await rm(dir, { recursive: true, force: true });
  }
});
