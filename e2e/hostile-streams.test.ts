// Hostile streams against a running livemig-destination (issue 14): a real stream recorded from a
// livemig source, mutated from a fixed seed (bytes, huge words, truncation), each sent over TCP
// to a fresh destination process. Each must end in a completed load or a coded failure (exit
// status 1 with an LM_ERR_* code in the log; never LM_ERR_INTERNAL, never exit status 70), within
// a bound (no hang), and the process's peak RSS (VmHWM) must stay bounded.
//
// The guest's RAM is all zero pages, so its RAM records are nearly all headers; mutations aim at
// the stream's first 64 KiB and last 16 KiB (records, device sections) more than at the rest. The packages/protocol fuzz test runs 100,000 streams in-process; this is
// the sample that goes through the real process, its sockets and its guest RAM.
//
// Run: pnpm build && node --import tsx --test --test-concurrency=1 e2e/hostile-streams.test.ts

import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import net from 'node:net';
import { test } from 'node:test';
import { xorshift32 } from '../packages/protocol/test/prng.ts';
import { waitForStatus } from './helpers/migration.ts';
import { type Child, withHarness, within } from './helpers/processes.ts';

const SEED = Number(process.env['LIVEMIG_HOSTILE_SEED'] ?? 1405);
const COUNT = Number(process.env['LIVEMIG_HOSTILE_STREAMS'] ?? 50);
const GUEST = ['-m', '16M', '--fill', 'zero'];
/** Bound on a destination reaching its verdict after the stream (and its end) arrived. */
const VERDICT_MS = 20_000;
/** Peak RSS bound: node, 20 MiB of guest RAM, a stream of ~100 KiB; far below a leak's size. */
const RSS_LIMIT_BYTES = 400 * 2 ** 20;

/** xorshift32 from the seed and the stream index: stream i depends on nothing else. */
function randomFor(i: number): (n: number) => number {
  return xorshift32(Math.imul(SEED, 0x9e3779b1) ^ Math.imul(i + 1, 0x85ebca6b));
}

const WORDS = [0, 0xff, 0xffff, 0x7fffffff, 0xffffffff, 0x1000, 0x10000];

/** A mutated copy of `stream` and what was done to it. */
function hostile(stream: Buffer, i: number): { bytes: Buffer; what: string } {
  const rnd = randomFor(i);
  const s = Buffer.from(stream);
  // Mostly where the structure is: the first 64 KiB (header, configuration, the block list, RAM
  // records) and the last 16 KiB (device sections, EOF, VMDESCRIPTION); a fifth anywhere.
  const head = Math.min(s.length, 64 * 1024);
  const tail = Math.min(s.length, 16 * 1024);
  const at = (): number => {
    const where = rnd(5);
    if (where === 0) return rnd(s.length);
    return where <= 2 ? rnd(head) : s.length - 1 - rnd(tail);
  };
  switch (rnd(4)) {
    case 0: {
      const k = at();
      s[k] = s[k]! ^ (1 << rnd(8));
      return { bytes: s, what: `bit flip at ${k}` };
    }
    case 1: {
      const n = 1 + rnd(8);
      for (let j = 0; j < n; j++) s[at()] = rnd(256);
      return { bytes: s, what: `${n} random bytes` };
    }
    case 2: {
      const k = Math.min(at(), s.length - 4);
      const v = WORDS[rnd(WORDS.length)]!;
      s.writeUInt32BE(v >>> 0, k);
      return { bytes: s, what: `word 0x${v.toString(16)} at ${k}` };
    }
    default: {
      const k = at();
      s[at()] = rnd(256);
      return { bytes: s.subarray(0, k), what: `a random byte, truncated to ${k} bytes` };
    }
  }
}

/** The peak RSS of `pid` so far (VmHWM), or 0 once it is gone. */
function peakRss(pid: number): number {
  try {
    const m = /VmHWM:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m === null ? 0 : Number(m[1]) * 1024;
  } catch {
    return 0;
  }
}

async function send(uri: string, bytes: Buffer): Promise<void> {
  const m = /^tcp:([^:]+):(\d+)$/.exec(uri)!;
  const socket = net.connect(Number(m[2]), m[1]);
  socket.on('error', () => {});
  socket.resume(); // the return path, if the stream opens one
  await within(
    new Promise<void>((resolve) => {
      socket.once('connect', () => socket.end(bytes));
      socket.once('close', () => resolve());
      // The destination may keep the connection after the end (a completed load closes it; a
      // stream that ends mid-record is a verdict too): the write side ended is enough.
      socket.once('finish', () => resolve());
    }),
    'the hostile stream to be written',
    VERDICT_MS,
  );
  setTimeout(() => socket.destroy(), VERDICT_MS).unref();
}

/** Completed, or exited 1 naming a code; never internal. Returns the outcome's name and the peak RSS. */
async function verdict(dst: Child): Promise<{ outcome: string; rss: number }> {
  const deadline = Date.now() + VERDICT_MS;
  let rss = 0;
  for (;;) {
    rss = Math.max(rss, peakRss(dst.pid));
    if (!dst.alive) {
      const exit = await dst.waitForExit(5_000);
      assert.equal(exit.code, 1, `the destination exits 1 on a bad stream (code ${exit.code}, signal ${exit.signal})`);
      const m = /"code":"(LM_ERR_[A-Z_0-9]+)"[^\n]*incoming migration failed/.exec(dst.output());
      assert.ok(m !== null, 'its log names the failure with a code');
      return { outcome: m[1]!, rss };
    }
    try {
      const s = await dst.execute<{ status?: string }>('query-migrate', undefined, 5_000);
      if (s.status === 'completed') return { outcome: 'completed', rss };
    } catch {
      // exiting: the next round sees it
    }
    if (Date.now() > deadline) throw new Error(`no verdict within ${VERDICT_MS} ms (status ${JSON.stringify(await dst.execute('query-migrate').catch(() => 'gone'))})`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

test(`${COUNT} hostile streams (seed ${SEED}) against running destinations: each ends completed or with a coded failure, no hang, peak RSS bounded`, { timeout: 600_000 }, () =>
  withHarness(async (h) => {
    // The stream to mutate: a livemig source's own, to a file (no return path there).
    const file = h.path('good.mig');
    const src = await h.source({ guest: [...GUEST, '-S'] });
    await src.execute('migrate', { uri: `file:${file}` });
    await waitForStatus(src, 'completed', { timeoutMs: 30_000 });
    const good = readFileSync(file);
    const outcomes = new Map<string, number>();
    let peak = 0;
    for (let i = 0; i < COUNT; i++) {
      const { bytes, what } = hostile(good, i);
      const dst = await h.destination({ incoming: 'tcp', paused: true, guest: GUEST, name: 'dst', args: ['--log-level', 'warn'] });
      try {
        await send(dst.incomingUri, bytes);
        const v = await verdict(dst);
        assert.doesNotMatch(dst.output(), /LM_ERR_INTERNAL/, 'no internal error');
        assert.ok(v.rss < RSS_LIMIT_BYTES, `peak RSS ${v.rss} bytes`);
        peak = Math.max(peak, v.rss);
        outcomes.set(v.outcome, (outcomes.get(v.outcome) ?? 0) + 1);
      } catch (err) {
        throw new Error(`hostile stream ${i} (seed ${SEED}: ${what}; replay with LIVEMIG_HOSTILE_SEED=${SEED}): ${(err as Error).message}`, { cause: err });
      } finally {
        await within(dst.qmp.close(), 'QMP close', 2_000).catch(() => {});
        if (dst.alive) process.kill(dst.pid, 'SIGKILL');
        await dst.waitForExit(5_000).catch(() => {});
        h.children.splice(h.children.indexOf(dst), 1);
      }
    }
    const summary = [...outcomes].sort((a, b) => b[1] - a[1]).map(([k, n]) => `${k} ${n}`).join(', ');
    console.log(`hostile streams: ${COUNT} of a ${good.length}-byte stream; peak destination RSS ${(peak / 2 ** 20).toFixed(0)} MiB; outcomes: ${summary}`);
    assert.ok(outcomes.size >= 3, `the mutations reached only ${summary}`);
  }));
