// End-to-end: both processes run a migration with the code their start-up warm-ups optimised,
// without throwing that code away. A path the warm-up never took (a record kind, a record split
// across reads, a new writer's first batch, a new deadline closure) makes V8 deoptimise the
// function it is in the first time the migration takes it, then run it unoptimised and compile
// it again (the decoder's readRecords: ~20 ms of compiling) while the pages stream. Source and
// destination run with V8's --trace-opt and --trace-deopt-verbose: before the migration the
// per-page loops of both are optimised already (the warm-ups did it), and no deoptimisation may
// name livemig's code (protocol, source, destination) once the source's first migration started,
// one stream or multifd. And processes that wait keep that code through V8's full GCs.
//
// Run: pnpm build && node --import tsx --test --test-concurrency=1 e2e/warm-up.test.ts

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { assertSameRam, waitForStatus } from './helpers/migration.ts';
import { type Child, withHarness } from './helpers/processes.ts';

const GUEST = ['--block', 'm0:64M', '--machine', 'none', '--qemu-devices-only'];
const TRACE = ['--trace-opt', '--trace-deopt-verbose'];
/**
 * Functions each side's warm-up must have had V8 optimise before any migration: the per-batch
 * and per-packet loops (what they call is often inlined into them, not compiled on its own).
 */
const WARMED = {
  source: ['iterate'],
  destination: ['readRecords', 'parseHeader', 'skipStillZeroRun'],
};
/**
 * Per-page functions of each side's warm-up that V8 compiles on their own (not only inlined), whose
 * code must outlive the warm-up's objects: a GC that collected those threw all of these away.
 */
const KEPT = {
  source: ['iterate', 'findDirty', 'sendPage', 'queuePage', 'isZeroPage', 'knownZeroRun'],
  destination: ['readRecords', 'parseHeader', 'copyOut', 'skipStillZeroRun'],
};
/**
 * Each process prints into a file: V8's traces are ~50 KiB before the migration, all of it is read
 * (untilOptimised), and through a pipe the test reads late (a loaded machine) V8 loses lines,
 * among them a "completed optimizing" or a deoptimisation (see Harness outputToFile).
 */
const TRACED = { nodeArgs: TRACE, outputToFile: true };

/** The deoptimisations of livemig's code in what `child` printed since `mark`. */
function ourDeopts(child: Child, mark: number): string[] {
  return child
    .outputSince(mark)
    .split('\n')
    .filter((line) => /deoptimize at <file:[^>]*packages\/(protocol|source|destination)\/dist\//.test(line));
}

/** Migrate `src` into `dst`: the RAM must arrive whole, and neither may deoptimise livemig's code meanwhile. */
async function migrateWithoutDeopts(src: Child, dst: Child & { incomingUri: string }): Promise<void> {
  const [srcBefore, dstBefore] = [src.outputMark(), dst.outputMark()];
  await src.execute('migrate', { uri: dst.incomingUri });
  await waitForStatus(src, 'completed', { timeoutMs: 120_000 });
  await waitForStatus(dst, 'completed', { timeoutMs: 60_000 });
  await assertSameRam(src, dst);
  assert.deepEqual(ourDeopts(src, srcBefore), [], `the source deoptimised during the migration:\n${src.outputSince(srcBefore).slice(0, 4000)}`);
  assert.deepEqual(ourDeopts(dst, dstBefore), [], `the destination deoptimised during the migration:\n${dst.outputSince(dstBefore).slice(0, 4000)}`);
}

/**
 * Wait (bounded) until V8 says it optimised each of `names` in `child`. Compiles run on a
 * background thread, but V8 installs the finished code (and prints "completed optimizing") only
 * when the main thread next runs JS: on a loaded machine the compile can end after the warm-up
 * did, and an idle process would then never say so. A QMP query each round runs JS there, as
 * any operator's query or the migration itself would.
 */
async function untilOptimised(child: Child, names: string[]): Promise<void> {
  const deadline = Date.now() + 30_000;
  for (;;) {
    const output = child.output();
    const missing = names.filter((n) => !new RegExp(`completed optimizing [^\\n]*<JSFunction ${n} `).test(output));
    if (missing.length === 0) return;
    if (Date.now() > deadline) {
      // What V8 said about them (marked, compiled, aborted, deoptimised), so a failure tells why.
      const said = output
        .split('\n')
        .filter((line) => missing.some((n) => line.includes(`<JSFunction ${n} `)))
        .slice(-20);
      assert.fail(`${child.name}: not optimised before the migration: ${missing.join(', ')}; V8 said of them:\n${said.join('\n')}`);
    }
    await child.execute('query-status');
    await sleep(50);
  }
}

/** V8's GC trace lines (--trace-gc) in `text`: `[pid:isolate]    N ms: …`. */
const gcLines = (text: string): string[] => text.split('\n').filter((line) => /^\[\d+:0x[0-9a-f]+\] +\d+ ms: /.test(line));

/** The `[pid:isolate]` that printed the most GC lines in `output`: the main thread's (it allocates the most). */
function busiestIsolate(output: string): string | undefined {
  const counts = new Map<string, number>();
  for (const line of gcLines(output)) {
    const isolate = line.slice(0, line.indexOf(']') + 1);
    counts.set(isolate, (counts.get(isolate) ?? 0) + 1);
  }
  return [...counts].sort((a, b) => b[1] - a[1])[0]?.[0];
}

const CASES = [
  { fill: 'random', channels: 0 },
  { fill: 'mixed', channels: 0 },
  { fill: 'random', channels: 2 },
  { fill: 'zero', channels: 0 },
];

for (const { fill, channels } of CASES) {
  const how = channels === 0 ? 'one stream' : `multifd, ${channels} channels`;
  test(`a 64 MiB ${fill} guest's first migration (${how}) deoptimises none of the code both warm-ups optimised`, { timeout: 180_000 }, () =>
    withHarness(async (h) => {
      const multifd = channels === 0 ? [] : ['--capabilities', 'multifd', '--parameters', `multifd-channels=${channels}`];
      const src = await h.source({ guest: [...GUEST, '--fill', fill], args: ['-S', ...multifd], ...TRACED });
      const dst = await h.destination({ incoming: 'tcp', paused: true, guest: GUEST, args: multifd, ...TRACED });
      // A source whose RAM was never written warms its scan on known-zero runs only (its
      // per-page path is not what such a migration uses); the destination's are checked alike.
      if (fill !== 'zero') await untilOptimised(src, WARMED.source);
      await untilOptimised(dst, WARMED.destination);
      await migrateWithoutDeopts(src, dst);
    }));
}

// A source kept for several migrations: a one-stream migration after a multifd one once found
// objects whose maps the multifd migration had changed (a field only a real channel flush wrote).
test('a kept source migrates by multifd, then in one stream, and the second migration deoptimises none of its code', { timeout: 180_000 }, () =>
  withHarness(async (h) => {
    const multifd = ['--capabilities', 'multifd', '--parameters', 'multifd-channels=2'];
    const src = await h.source({ guest: [...GUEST, '--fill', 'random'], args: ['-S', ...multifd], ...TRACED });
    const first = await h.destination({ incoming: 'tcp', paused: true, guest: GUEST, args: multifd });
    await src.execute('migrate', { uri: first.incomingUri });
    await waitForStatus(first, 'completed', { timeoutMs: 120_000 });
    await waitForStatus(src, 'completed', { timeoutMs: 60_000 });
    await src.execute('migrate-set-capabilities', { capabilities: [{ capability: 'multifd', state: false }] });
    const second = await h.destination({ incoming: 'tcp', paused: true, guest: GUEST });
    const mark = src.outputMark();
    await src.execute('migrate', { uri: second.incomingUri });
    await waitForStatus(second, 'completed', { timeoutMs: 120_000 });
    await waitForStatus(src, 'completed', { timeoutMs: 60_000 });
    await assertSameRam(src, second);
    assert.deepEqual(ourDeopts(src, mark), [], `the source deoptimised during its second migration:\n${src.outputSince(mark).slice(0, 4000)}`);
  }));

// A process waits for its migration (seconds to hours): once a full GC collects what a warm-up
// made, V8 throws away the code optimised on it ("marking dependent code … reason: weak
// objects") and the migration compiles it again. Polled over QMP as an operator's tools poll, an
// idle process here runs its memory reducer's full GCs ~8 s after start.
test('a source and a destination that wait through memory-reducing GCs keep the code their warm-ups optimised', { timeout: 180_000 }, () =>
  withHarness(async (h) => {
    const gcTraced = { nodeArgs: [...TRACE, '--trace-gc'], outputToFile: true };
    const src = await h.source({ guest: [...GUEST, '--fill', 'random'], args: ['-S'], ...gcTraced });
    const dst = await h.destination({ incoming: 'tcp', paused: true, guest: GUEST, ...gcTraced });
    await untilOptimised(src, WARMED.source);
    await untilOptimised(dst, WARMED.destination);
    // From here on (the code optimised): each main thread's isolate runs a memory-reducing GC.
    const optimisedAt = new Map([
      [src, src.outputMark()],
      [dst, dst.outputMark()],
    ]);
    const deadline = Date.now() + 60_000;
    for (const [child, mark] of optimisedAt) {
      for (;;) {
        // One read of the file a round: the isolate is judged on all of it, the GCs after the mark.
        const output = child.output();
        const isolate = busiestIsolate(output);
        const since = gcLines(output.slice(mark));
        if (isolate !== undefined && since.some((line) => line.startsWith(isolate) && line.includes('Mark-Compact (reduce)'))) break;
        assert.ok(Date.now() < deadline, `${child.name}: no memory-reducing GC on its main thread (${isolate}) within 60 s; GCs since its code was optimised:\n${since.slice(-30).join('\n')}`);
        await src.execute('query-status');
        await dst.execute('query-status');
        await sleep(50);
      }
    }
    for (const [child, names] of [
      [src, KEPT.source],
      [dst, KEPT.destination],
    ] as const) {
      const thrownAway = child
        .outputSince(optimisedAt.get(child)!)
        .split('\n')
        .filter((line) => line.includes('marking dependent code') && names.some((n) => line.includes(`<SharedFunctionInfo ${n}>`)));
      assert.deepEqual(thrownAway, [], `${child.name} threw away code its warm-up optimised while it waited`);
    }
    await migrateWithoutDeopts(src, dst);
  }));
