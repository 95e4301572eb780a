// The e2e harness itself: whatever a test body does, its processes do not outlive it.

import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { test } from 'node:test';
import { type Child, withHarness } from './helpers/processes.ts';

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
