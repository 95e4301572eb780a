// The source machine: every (state, event) pair with its outcome, scenarios with an injected
// clock, and the diagram in docs/state-machines/source.md checked against the machine.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import {
  DESTINATION_REASON_WAIT_MS,
  ErrorCode,
  initialSourceState,
  KEEPALIVE_TIMEOUT_MS,
  maySwitchOver,
  sourceReportedStatus,
  SOURCE_EVENT_TYPES,
  SOURCE_STATUSES,
  type SourceAction,
  type SourceEvent,
  type SourceState,
  sourceStep,
  TransportError,
} from '../src/index.ts';
import { describeStep, EVENTS, STATES, T0 } from './source-machine.samples.ts';

/**
 * Expected outcome of each event in each sample state (test/source-machine.table.json):
 * `next-status[.phase] actions…`, or `x CODE` for a refusal. A sample state or event without its
 * entry fails the first test.
 */
const TABLE = (JSON.parse(readFileSync(new URL('./source-machine.table.json', import.meta.url), 'utf8')) as { table: Record<string, Record<string, string>> }).table;

test('source machine: every (state, event) pair has its outcome, legal ones with their actions, illegal ones LM_ERR_WRONG_STATE', () => {
  assert.deepEqual(new Set(Object.keys(TABLE)), new Set(Object.keys(STATES)), 'a row per sample state');
  assert.deepEqual(new Set(Object.values(STATES).map((s) => s.status)), new Set(SOURCE_STATUSES), 'a sample state per status');
  assert.deepEqual(new Set(Object.values(EVENTS).map((e) => e.type)), new Set(SOURCE_EVENT_TYPES), 'a sample event per event type');
  for (const [stateName, state] of Object.entries(STATES)) {
    const row = TABLE[stateName]!;
    assert.deepEqual(new Set(Object.keys(row)), new Set(Object.keys(EVENTS)), `row "${stateName}" names every event`);
    for (const [eventName, event] of Object.entries(EVENTS)) {
      assert.equal(describeStep(() => sourceStep(state, event, T0 + 100)), row[eventName], `${stateName} + ${eventName}`);
    }
  }
});

test('source machine: a refusal names the status and the event', () => {
  try {
    sourceStep(STATES['setup']!, { type: 'resumeAckReceived' }, T0);
    assert.fail('refused');
  } catch (err) {
    const e = err as { code: string; state: string; event: string };
    assert.equal(e.code, ErrorCode.WRONG_STATE);
    assert.equal(e.state, 'setup');
    assert.equal(e.event, 'resumeAckReceived');
  }
  assert.throws(() => sourceStep(STATES['active']!, { type: 'pauseRequested' }, T0), /migrate-pause needs a postcopy migration \(status is active\)/);
  // `failing` is shown as the status it failed from.
  assert.throws(() => sourceStep(STATES['failing.restoring']!, { type: 'setupSent' }, T0), (e: { state?: string }) => e.state === 'active');
});

/** Run events from `state`, collecting every action; the clock is whatever each event says. */
function run(state: SourceState, steps: [SourceEvent, number][]): { state: SourceState; actions: SourceAction[] } {
  const actions: SourceAction[] = [];
  for (const [event, now] of steps) {
    const t = sourceStep(state, event, now);
    state = t.state;
    actions.push(...t.actions);
  }
  return { state, actions };
}

const blocks = [
  { idstr: 'pc.ram', length: 64 * 4096 },
  { idstr: 'vga.vram', length: 16 * 4096 },
];

test('precopy with a return path: setup → active → stop-copy → SHUT(0) completes; the guest stays stopped', () => {
  const r = run(initialSourceState({ returnPath: true, guestWasRunning: true, blocks }), [
    [{ type: 'setupSent' }, 1],
    [{ type: 'switchoverStarted', postcopy: false }, 2],
    [{ type: 'finalStateSent' }, 3],
    [{ type: 'shutReceived', status: 0 }, 4],
  ]);
  assert.equal(r.state.status, 'completed');
  assert.deepEqual(
    r.actions.filter((a) => a.type === 'emitStatus').map((a) => (a as { status: string }).status),
    ['active', 'completed'],
  );
  assert.equal(r.actions.some((a) => a.type === 'restoreGuest'), false);
});

test('precopy without a return path: the stream written out is the end', () => {
  const r = run(initialSourceState({ returnPath: false, guestWasRunning: true, blocks }), [
    [{ type: 'setupSent' }, 1],
    [{ type: 'switchoverStarted', postcopy: false }, 2],
    [{ type: 'finalStateSent' }, 3],
  ]);
  assert.equal(r.state.status, 'completed');
});

test('a reset waits up to 500 ms for the destination\'s reason; the reason ends the wait and becomes the error', () => {
  const reset = TransportError.lost('multifd', 'the multifd channel failed: read ECONNRESET', Object.assign(new Error('x'), { code: 'ECONNRESET' }));
  let r = run(STATES['active']!, [[{ type: 'faulted', error: reset }, 1000]]);
  assert.equal(r.state.status, 'failing');
  assert.equal(sourceReportedStatus(r.state), 'active', 'query-migrate still says active while the reason may come');
  assert.deepEqual(r.actions, [{ type: 'startReasonTimer', ms: DESTINATION_REASON_WAIT_MS }]);
  r = run(r.state, [
    [{ type: 'destinationReported', report: { code: 'LM_ERR_CONFIG_MISMATCH', message: 'RAM block "pc.ram" is 64 MiB here', offset: 99 } }, 1100],
    [{ type: 'shutReceived', status: 1 }, 1101],
    [{ type: 'guestRestored' }, 1102],
  ]);
  assert.equal(r.state.status, 'failed');
  if (r.state.status === 'failed') {
    const e = r.state.error as unknown as { code: string; remoteCode: string; remoteOffset: number; shutStatus: number; message: string };
    assert.equal(e.code, ErrorCode.DESTINATION_FAILED);
    assert.equal(e.remoteCode, 'LM_ERR_CONFIG_MISMATCH');
    assert.equal(e.remoteOffset, 99);
    assert.equal(e.shutStatus, 1);
    assert.equal(e.message, 'destination failed: RAM block "pc.ram" is 64 MiB here [LM_ERR_CONFIG_MISMATCH]');
  }
  assert.deepEqual(
    r.actions.map((a) => a.type),
    ['stopKeepalive', 'stopPostcopyPaging', 'closeChannels', 'restoreGuest', 'cleanUp', 'emitStatus'],
  );
});

test('a failure with no reason coming: the timer ends the wait and the original error stays', () => {
  const reset = TransportError.lost('main', 'the main channel failed: write EPIPE', Object.assign(new Error('x'), { code: 'EPIPE' }));
  const r = run(STATES['active.awaiting-shut']!, [
    [{ type: 'faulted', error: reset }, 0],
    [{ type: 'reasonTimerFired' }, DESTINATION_REASON_WAIT_MS],
    [{ type: 'guestRestored' }, DESTINATION_REASON_WAIT_MS + 1],
  ]);
  assert.equal(r.state.status === 'failed' && r.state.error, reset);
  assert.deepEqual(r.actions.find((a) => a.type === 'restoreGuest'), { type: 'restoreGuest', run: true });
});

test('the return path ending cuts the wait short; a failure that is not a reset does not wait', () => {
  const reset = TransportError.lost('multifd', 'reset', Object.assign(new Error('x'), { code: 'ECONNRESET' }));
  const rpGone = TransportError.lost('return-path', 'the main channel was closed');
  const r = run(STATES['active']!, [
    [{ type: 'faulted', error: reset }, 0],
    [{ type: 'faulted', error: rpGone }, 5],
  ]);
  assert.equal(r.state.status === 'failing' && r.state.reasonUntil, undefined);
  assert.ok(r.actions.some((a) => a.type === 'restoreGuest'));
  const noWait = sourceStep(STATES['active']!, { type: 'faulted', error: rpGone }, 0);
  assert.equal(noWait.actions.some((a) => a.type === 'startReasonTimer'), false);
});

test('while waiting for the reason, other connections breaking (every multifd channel gets its EPIPE) do not end the wait', () => {
  const epipe = (channel: 'multifd' | 'main'): TransportError => TransportError.lost(channel, `the ${channel} channel failed: write EPIPE`, Object.assign(new Error('x'), { code: 'EPIPE' }));
  const r = run(STATES['active']!, [
    [{ type: 'faulted', error: epipe('multifd') }, 0],
    [{ type: 'faulted', error: epipe('multifd') }, 1],
    [{ type: 'faulted', error: epipe('main') }, 2],
  ]);
  assert.equal(r.state.status, 'failing');
  assert.equal(r.state.status === 'failing' && r.state.reasonUntil, DESTINATION_REASON_WAIT_MS);
  assert.equal(r.actions.some((a) => a.type === 'restoreGuest'), false, 'still waiting for the reason');
});

test('cancel before postcopy runs the source guest again; after postcopy started it never does', () => {
  for (const [name, run] of [
    ['setup', true],
    ['active.stop-copy', true],
    ['postcopy-active', false],
    ['postcopy-paused', false],
  ] as const) {
    const t = sourceStep(STATES[name]!, { type: 'cancelRequested' }, 0);
    assert.deepEqual(t.actions.find((a) => a.type === 'restoreGuest'), { type: 'restoreGuest', run }, name);
  }
  const notRunning = initialSourceState({ returnPath: true, guestWasRunning: false, blocks });
  assert.deepEqual(sourceStep(notRunning, { type: 'cancelRequested' }, 0).actions.find((a) => a.type === 'restoreGuest'), { type: 'restoreGuest', run: false });
});

test('postcopy keepalive: a tick pings; silence past the timeout pauses with LM_ERR_PEER_SILENT', () => {
  const started = run(STATES['active']!, [[{ type: 'postcopyStarted' }, 0]]);
  assert.deepEqual(sourceStep(started.state, { type: 'keepaliveTicked', lastProgressAt: 0 }, KEEPALIVE_TIMEOUT_MS).actions, [{ type: 'sendKeepalivePing' }]);
  const heard = sourceStep(started.state, { type: 'returnPathHeard' }, 2000).state;
  assert.deepEqual(sourceStep(heard, { type: 'keepaliveTicked', lastProgressAt: 0 }, 2000 + KEEPALIVE_TIMEOUT_MS).actions, [{ type: 'sendKeepalivePing' }]);
  const silent = sourceStep(heard, { type: 'keepaliveTicked', lastProgressAt: 0 }, 2001 + KEEPALIVE_TIMEOUT_MS);
  assert.equal(silent.state.status, 'postcopy-paused');
  if (silent.state.status === 'postcopy-paused') {
    assert.equal(silent.state.reason.code, ErrorCode.PEER_SILENT);
    assert.match(silent.state.reason.message, /no return-path traffic for 3001 ms/);
  }
});

test('precopy stall deadline: ticks ping while iterating with a return path; no progress past x-livemig-stall-timeout fails with LM_ERR_PEER_SILENT and runs the guest again, in every phase', () => {
  const tick = (lastProgressAt: number): SourceEvent => ({ type: 'keepaliveTicked', lastProgressAt });
  const withRp = initialSourceState({ returnPath: true, guestWasRunning: true, blocks, stallTimeoutMs: 2000 });
  const iterating = sourceStep(withRp, { type: 'setupSent' }, 0).state;
  assert.deepEqual(sourceStep(iterating, tick(1000), 3000).actions, [{ type: 'sendKeepalivePing' }], 'progress 2000 ms ago: within the deadline');
  // No PING in stop-copy (the RAM END section cannot be split) nor after EOF (awaiting SHUT).
  const stopCopy = sourceStep(iterating, { type: 'switchoverStarted', postcopy: false }, 0).state;
  assert.deepEqual(sourceStep(stopCopy, tick(1000), 3000).actions, []);
  const awaitingShut = sourceStep(stopCopy, { type: 'finalStateSent' }, 0).state;
  assert.deepEqual(sourceStep(awaitingShut, tick(1000), 3000).actions, []);
  for (const [name, state] of [['setup', withRp], ['iterating', iterating], ['stop-copy', stopCopy], ['awaiting-shut', awaitingShut]] as const) {
    const r = run(state, [[tick(1000), 3001], [{ type: 'guestRestored' }, 3002]]);
    assert.equal(r.state.status, 'failed', name);
    assert.deepEqual(r.actions.map((a) => a.type), ['stopKeepalive', 'stopPostcopyPaging', 'closeChannels', 'restoreGuest', 'cleanUp', 'emitStatus'], name);
    assert.deepEqual(r.actions.find((a) => a.type === 'restoreGuest'), { type: 'restoreGuest', run: true }, `${name}: the source guest runs again`);
    if (r.state.status === 'failed') {
      const e = r.state.error as TransportError;
      assert.equal(e.code, ErrorCode.PEER_SILENT, name);
      assert.equal(e.channel, 'return-path');
      assert.match(e.message, new RegExp(`for 2001 ms during ${name} \\(x-livemig-stall-timeout 2000 ms\\)`));
    }
  }
  // Without a return path: write progress only, and never a PING (QEMU fails a PING without one).
  const noRp = sourceStep(initialSourceState({ returnPath: false, guestWasRunning: true, blocks, stallTimeoutMs: 2000 }), { type: 'setupSent' }, 0).state;
  assert.deepEqual(sourceStep(noRp, tick(1000), 3000).actions, []);
  const failing = sourceStep(noRp, tick(1000), 3001).state;
  assert.equal(failing.status === 'failing' && (failing.error as TransportError).channel, 'main');
  // Postcopy keeps its own keepalive (return-path bytes only): write progress does not count.
  const postcopy = sourceStep(iterating, { type: 'postcopyStarted' }, 0).state;
  assert.equal(sourceStep(postcopy, tick(5000), 5000).state.status, 'postcopy-paused');
});

test('postcopy recovery: RECV_BITMAP for each block, then RESUME, then RESUME_ACK runs postcopy again', () => {
  const r = run(STATES['postcopy-paused']!, [
    [{ type: 'resumeRequested' }, 0],
    [{ type: 'recvBitmapReceived', block: 'vga.vram', bitmap: new Uint8Array(8) }, 1],
    [{ type: 'recvBitmapReceived', block: 'pc.ram', bitmap: new Uint8Array(8) }, 2],
    [{ type: 'resumeAckReceived' }, 3],
  ]);
  assert.equal(r.state.status, 'postcopy-active');
  assert.deepEqual(
    r.actions.map((a) => a.type),
    ['emitStatus', 'requestReceivedBitmaps', 'applyReceivedBitmap', 'applyReceivedBitmap', 'sendPostcopyResume', 'emitStatus', 'startPostcopyPaging'],
  );
  assert.deepEqual(r.actions[1], { type: 'requestReceivedBitmaps', blocks: ['pc.ram', 'vga.vram'] });
  // A repeated bitmap breaks the recovery: paused again, waiting for another resume.
  const twice = run(STATES['postcopy-paused']!, [
    [{ type: 'resumeRequested' }, 0],
    [{ type: 'recvBitmapReceived', block: 'pc.ram', bitmap: new Uint8Array(8) }, 1],
    [{ type: 'recvBitmapReceived', block: 'pc.ram', bitmap: new Uint8Array(8) }, 2],
  ]);
  assert.equal(twice.state.status === 'postcopy-paused' && twice.state.reason.code, ErrorCode.UNKNOWN_BLOCK);
});

test('page requests are checked against the block list: unknown block, outside it, unaligned', () => {
  const s = STATES['postcopy-active']!;
  assert.deepEqual(sourceStep(s, { type: 'pageRequested', block: 'vga.vram', start: 4096, length: 12288 }, 0).actions, [
    { type: 'servePages', blockIndex: 1, firstPage: 1, pageCount: 3 },
  ]);
  const code = (e: SourceEvent): string | undefined => {
    try {
      sourceStep(s, e, 0);
      return undefined;
    } catch (err) {
      return (err as { code: string }).code;
    }
  };
  assert.equal(code({ type: 'pageRequested', block: 'nope', start: 0, length: 4096 }), ErrorCode.UNKNOWN_BLOCK);
  assert.equal(code({ type: 'pageRequested', block: 'vga.vram', start: 15 * 4096, length: 8192 }), ErrorCode.ILLEGAL_RAM_OFFSET);
  assert.equal(code({ type: 'pageRequested', block: 'pc.ram', start: 100, length: 4096 }), ErrorCode.ILLEGAL_RAM_OFFSET);
});

test('PONG 4 after POSTCOPY_RUN is remembered once: the end of postcopy\'s downtime', () => {
  const r = run(STATES['postcopy-active']!, [
    [{ type: 'pongReceived', value: 3 }, 5],
    [{ type: 'pongReceived', value: 4 }, 7],
    [{ type: 'pongReceived', value: 4 }, 9],
  ]);
  assert.equal(r.state.runConfirmedAt, 7);
});

test('docs/state-machines/source.md: its diagram has exactly the status changes the machine makes', () => {
  const doc = readFileSync(new URL('../../../docs/state-machines/source.md', import.meta.url), 'utf8');
  const mermaid = /```mermaid\n([\s\S]*?)```/.exec(doc)?.[1] ?? '';
  const drawn = new Set(
    [...mermaid.matchAll(/^\s*([\w-]+|\[\*\])\s*-->\s*([\w-]+|\[\*\])\s*:\s*(\w+)/gm)].filter((m) => m[1] !== '[*]' && m[2] !== '[*]').map((m) => `${m[1]} --> ${m[2]} : ${m[3]}`),
  );
  const made = new Set<string>();
  for (const state of Object.values(STATES)) {
    for (const event of Object.values(EVENTS)) {
      try {
        const next = sourceStep(state, event, T0 + 100).state;
        if (next.status !== state.status) made.add(`${state.status.replaceAll('-', '_')} --> ${next.status.replaceAll('-', '_')} : ${event.type}`);
      } catch {
        // refused: no edge
      }
    }
  }
  assert.deepEqual([...drawn].sort(), [...made].sort());
});

test('pause-before-switchover: the stopped guest waits in pre-switchover; migrate-continue leads to device, then SHUT(0) completes', () => {
  const start = initialSourceState({ returnPath: true, guestWasRunning: true, blocks, pauseBeforeSwitchover: true });
  const held = run(start, [
    [{ type: 'setupSent' }, 1],
    [{ type: 'switchoverStarted', postcopy: false }, 2],
  ]);
  assert.equal(held.state.status, 'pre-switchover');
  assert.deepEqual(held.actions.at(-1), { type: 'emitStatus', status: 'pre-switchover' });
  // The wait is bounded by the link, not by the client: PINGs go out, their PONGs count as progress.
  assert.deepEqual(sourceStep(held.state, { type: 'keepaliveTicked', lastProgressAt: 1_000 }, 2_000).actions, [{ type: 'sendKeepalivePing' }]);
  // QEMU's refusal of a continue that names another status.
  assert.throws(() => sourceStep(held.state, { type: 'continueRequested', state: 'active' }, 3), /Migration not in expected state: pre-switchover/);
  const done = run(held.state, [
    [{ type: 'continueRequested', state: 'pre-switchover' }, 3],
    [{ type: 'finalStateSent' }, 4],
    [{ type: 'shutReceived', status: 0 }, 5],
  ]);
  assert.equal(done.state.status, 'completed');
  assert.deepEqual(
    done.actions.filter((a) => a.type === 'emitStatus').map((a) => (a as { status: string }).status),
    ['device', 'completed'],
  );
  assert.ok(!done.actions.some((a) => a.type === 'restoreGuest'), 'the guest stays stopped');
});

test('pause-before-switchover: migrate_cancel in pre-switchover runs the guest again; without a return path the hold has no deadline', () => {
  const held = run(initialSourceState({ returnPath: false, guestWasRunning: true, blocks, pauseBeforeSwitchover: true }), [
    [{ type: 'setupSent' }, 1],
    [{ type: 'switchoverStarted', postcopy: false }, 2],
  ]).state;
  // No PING possible and nothing to send: an hour of silence is the client's business.
  assert.deepEqual(sourceStep(held, { type: 'keepaliveTicked', lastProgressAt: 0 }, 3_600_000), { state: held, actions: [] });
  const r = run(held, [
    [{ type: 'cancelRequested' }, 3],
    [{ type: 'guestRestored' }, 4],
  ]);
  assert.equal(r.state.status, 'cancelled');
  assert.ok(r.actions.some((a) => a.type === 'restoreGuest' && a.run), 'the guest runs again');
});

test('pause-before-switchover with postcopy: pre-switchover stays until postcopy starts (QEMU 7.2 shows no device there)', () => {
  const held = run(initialSourceState({ returnPath: true, guestWasRunning: true, blocks, pauseBeforeSwitchover: true, postcopyRequested: true }), [
    [{ type: 'setupSent' }, 1],
    [{ type: 'switchoverStarted', postcopy: true }, 2],
  ]).state;
  assert.throws(() => sourceStep(held, { type: 'postcopyStarted' }, 3), (e: { code?: string }) => e.code === ErrorCode.WRONG_STATE, 'not before migrate-continue');
  const r = run(held, [
    [{ type: 'continueRequested', state: 'pre-switchover' }, 3],
    [{ type: 'postcopyStarted' }, 4],
  ]);
  assert.equal(r.state.status, 'postcopy-active');
  assert.deepEqual(
    r.actions.filter((a) => a.type === 'emitStatus').map((a) => (a as { status: string }).status),
    ['postcopy-active'],
  );
});

test('switchover-ack: a running guest is not switched over before SWITCHOVER_ACK; a stopped one need not wait', () => {
  const iterating = run(initialSourceState({ returnPath: true, guestWasRunning: true, blocks, switchoverAck: true }), [[{ type: 'setupSent' }, 1]]).state;
  assert.equal(maySwitchOver(iterating, true), false);
  assert.equal(maySwitchOver(iterating, false), true, "QEMU: no reason to wait for the ack if the guest is stopped");
  const acked = sourceStep(iterating, { type: 'switchoverAckReceived' }, 2).state;
  assert.equal(maySwitchOver(acked, true), true);
  assert.equal(maySwitchOver(run(initialSourceState({ returnPath: true, guestWasRunning: true, blocks }), [[{ type: 'setupSent' }, 1]]).state, true), true, 'without the capability');
});
