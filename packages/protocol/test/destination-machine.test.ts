// The destination machine, exhaustively: every (status, event type) pair has a row saying what
// happens (next status and actions) or that it is refused (LM_ERR_WRONG_STATE). A status or an
// event added without rows fails here (and does not compile). The clock is a number passed in.
// docs/state-machines/destination.md must draw exactly the status-changing rows.

import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { describe, it } from 'node:test';
import {
  type DestinationAction,
  type DestinationConfig,
  type DestinationEvent,
  type DestinationEventType,
  type DestinationState,
  type DestinationStatus,
  DESTINATION_EVENT_TYPES,
  DESTINATION_STATUSES,
  destinationStep,
  ErrorCode,
  initialDestinationState,
  KEEPALIVE_TIMEOUT_MS,
  ProtocolError,
  readsStream,
  reportedStatus,
  showsPostcopyFigures,
  StateError,
  TransportError,
} from '../src/index.ts';

const CONFIG: DestinationConfig = { postcopyRam: true, preempt: true, multifd: true };
/** The injected clock: far enough past every sample's last byte for the keepalive to fire. */
const NOW_MS = 10_000;
const LOST = TransportError.lost('main', 'connection reset');
const BROKEN = new ProtocolError(ErrorCode.TRUNCATED, 'stream ended inside a record');

const EVENTS: { [T in DestinationEventType]: Extract<DestinationEvent, { type: T }> } = {
  configured: { type: 'configured', config: { postcopyRam: true, preempt: false, multifd: false, stallTimeoutMs: 2_000 } },
  listenStarted: { type: 'listenStarted' },
  connectionAccepted: { type: 'connectionAccepted' },
  returnPathOpened: { type: 'returnPathOpened', streamOffset: 20 },
  pingReceived: { type: 'pingReceived', streamOffset: 30, value: 7, livemigHello: false },
  initDataLoaded: { type: 'initDataLoaded', streamOffset: 35, idstr: '0000:00:04.0/vfio' },
  postcopyAdviseReceived: { type: 'postcopyAdviseReceived', streamOffset: 40, postcopyRam: true },
  discardReceived: { type: 'discardReceived', streamOffset: 50, discard: { block: 'pc.ram', ranges: [{ start: 0, length: 4096 }] } },
  listenReceived: { type: 'listenReceived', streamOffset: 60 },
  runReceived: { type: 'runReceived', streamOffset: 70 },
  recvBitmapRequested: { type: 'recvBitmapRequested', streamOffset: 80, block: 'pc.ram' },
  resumeReceived: { type: 'resumeReceived', streamOffset: 90 },
  eofReceived: { type: 'eofReceived', streamOffset: 100 },
  vmdescriptionReceived: { type: 'vmdescriptionReceived', streamOffset: 101 },
  ramSectionEnded: { type: 'ramSectionEnded', streamOffset: 110, channelsSynced: false },
  multifdSynced: { type: 'multifdSynced' },
  sourceEnded: { type: 'sourceEnded', streamOffset: 120 },
  channelLost: { type: 'channelLost', error: LOST },
  keepaliveTicked: { type: 'keepaliveTicked', lastByteAtMs: 0 },
  preemptAccepted: { type: 'preemptAccepted' },
  faultThreadEnded: { type: 'faultThreadEnded', reason: 'preempt channel: reset' },
  pauseRequested: { type: 'pauseRequested' },
  recoverRequested: { type: 'recoverRequested' },
  recoveryAccepted: { type: 'recoveryAccepted' },
  loadFinished: { type: 'loadFinished' },
  loadFailed: { type: 'loadFailed', error: BROKEN },
};

const ACTIVE: Extract<DestinationState, { status: 'active' }> = {
  status: 'active',
  config: CONFIG,
  returnPath: true,
  peerIsLivemig: true,
  preempt: 'none',
  ramSectionsEnded: 0,
  awaitingSync: false,
  finishing: false,
  postcopy: 'advised',
  postcopyRamAdvised: true,
  eofSeen: false,
  lastByteAtMs: 0,
  acksPending: 0,
  switchoverAcked: false,
};
const POSTCOPY: Extract<DestinationState, { status: 'postcopy-active' }> = {
  status: 'postcopy-active',
  config: CONFIG,
  returnPath: true,
  peerIsLivemig: true,
  preempt: 'taken',
  ramSectionsEnded: 0,
  awaitingSync: false,
  finishing: false,
  running: false,
  faults: 'fault-thread',
  lastByteAtMs: 0,
};
const PAUSED: Extract<DestinationState, { status: 'postcopy-paused' }> = {
  status: 'postcopy-paused',
  config: CONFIG,
  peerIsLivemig: true,
  running: true,
  faults: 'fault-thread',
  preempt: 'none',
  ramSectionsEnded: 0,
  recoveryListening: true,
  reason: LOST,
};

/** Refused: StateError. */
const X = 'illegal';
type Row = typeof X | readonly [DestinationStatus, readonly DestinationAction['type'][]];
type Rows = Record<DestinationEventType, Row>;

const FAIL_WITH_RP = ['fail', 'stopKeepalive', 'emitStatus', 'sendErrorReport', 'sendShut', 'closeChannels'] as const;
const FAIL_NO_RP = ['fail', 'stopKeepalive', 'emitStatus', 'closeChannels'] as const;
const PAUSE = ['dropLink', 'emitStatus'] as const;
const COMPLETE = ['stopKeepalive', 'emitStatus', 'complete', 'sendShut', 'closeChannels'] as const;

/** Every event refused, but for the rows given. */
function only(rows: Partial<Rows>): Rows {
  const out = {} as Rows;
  for (const t of DESTINATION_EVENT_TYPES) out[t] = rows[t] ?? X;
  return out;
}

/** One sample state per status, with a row for every event type. */
const BASE: Record<DestinationStatus, { state: DestinationState; rows: Rows }> = {
  none: { state: initialDestinationState(CONFIG), rows: only({ configured: ['none', []], listenStarted: ['setup', ['emitStatus']] }) },
  setup: {
    state: { status: 'setup', config: CONFIG },
    rows: only({
      // Listening, no stream yet: settings still change (the adapter refuses once a byte came).
      configured: ['setup', []],
      connectionAccepted: ['active', ['beginLoad', 'startKeepalive', 'emitStatus']],
      channelLost: ['failed', FAIL_NO_RP],
      loadFailed: ['failed', FAIL_NO_RP],
      faultThreadEnded: ['setup', []],
    }),
  },
  active: {
    state: ACTIVE,
    rows: {
      configured: X,
      listenStarted: X,
      connectionAccepted: X,
      returnPathOpened: ['active', []],
      pingReceived: ['active', ['sendPong']],
      // No switchover-ack here: the marker fails the load, as QEMU's VFIO loader does.
      initDataLoaded: ['failed', FAIL_WITH_RP],
      postcopyAdviseReceived: X, // advised already
      discardReceived: ['active', ['markPrecopyReceived', 'discardPages']],
      listenReceived: ['postcopy-active', ['startPostcopyFaults', 'startKeepalive', 'emitStatus']],
      runReceived: X,
      recvBitmapRequested: X,
      resumeReceived: ['active', []], // QEMU ignores it outside postcopy-recover
      eofReceived: ['active', []],
      vmdescriptionReceived: ['active', ['finish']],
      ramSectionEnded: ['active', ['awaitMultifdSync']],
      multifdSynced: X,
      sourceEnded: ['failed', FAIL_WITH_RP], // before EOF
      channelLost: ['failed', FAIL_WITH_RP],
      keepaliveTicked: ['failed', FAIL_WITH_RP], // silent for NOW_MS: past the default x-livemig-stall-timeout
      preemptAccepted: ['active', ['holdPreempt']],
      faultThreadEnded: ['active', []],
      pauseRequested: X,
      recoverRequested: X,
      recoveryAccepted: X,
      loadFinished: X, // not finishing
      loadFailed: ['failed', FAIL_WITH_RP],
    },
  },
  'postcopy-active': {
    state: POSTCOPY,
    rows: {
      configured: X,
      listenStarted: X,
      connectionAccepted: X,
      returnPathOpened: ['postcopy-active', []],
      pingReceived: ['postcopy-active', ['sendPong']],
      initDataLoaded: X,
      postcopyAdviseReceived: X,
      discardReceived: X,
      listenReceived: X,
      runReceived: ['postcopy-active', ['startGuestInPostcopy']],
      recvBitmapRequested: X,
      resumeReceived: ['postcopy-active', []],
      eofReceived: ['postcopy-active', ['finish']],
      vmdescriptionReceived: X,
      ramSectionEnded: ['postcopy-active', ['awaitMultifdSync']],
      multifdSynced: X,
      // Before POSTCOPY_RUN (this sample): a lost link fails, the package cannot be resent.
      sourceEnded: ['failed', FAIL_WITH_RP],
      channelLost: ['failed', FAIL_WITH_RP],
      keepaliveTicked: ['failed', FAIL_WITH_RP], // silent for NOW_MS
      preemptAccepted: X, // one is taken already
      faultThreadEnded: ['failed', FAIL_WITH_RP],
      pauseRequested: ['postcopy-paused', PAUSE],
      recoverRequested: X,
      recoveryAccepted: X,
      loadFinished: X,
      loadFailed: ['failed', FAIL_WITH_RP],
    },
  },
  'postcopy-paused': {
    state: PAUSED,
    rows: only({
      channelLost: ['postcopy-paused', []],
      sourceEnded: ['postcopy-paused', []],
      keepaliveTicked: ['postcopy-paused', []],
      faultThreadEnded: ['postcopy-paused', []],
      recoverRequested: ['postcopy-paused', ['emitStatus']],
      recoveryAccepted: ['postcopy-recover', ['adoptRecoveryChannel', 'emitStatus']],
      preemptAccepted: ['postcopy-paused', ['holdPreempt']],
      loadFailed: ['failed', FAIL_NO_RP],
    }),
  },
  'postcopy-recover': {
    state: { ...POSTCOPY, status: 'postcopy-recover', running: true },
    rows: only({
      returnPathOpened: ['postcopy-recover', []],
      pingReceived: ['postcopy-recover', ['sendPong']],
      recvBitmapRequested: ['postcopy-recover', ['sendRecvBitmap']],
      resumeReceived: ['postcopy-active', ['emitStatus', 'sendResumeAck', 'rerequestAwaitedPages']],
      eofReceived: ['postcopy-recover', ['finish']],
      ramSectionEnded: ['postcopy-recover', ['awaitMultifdSync']],
      sourceEnded: ['postcopy-paused', PAUSE],
      channelLost: ['postcopy-paused', PAUSE],
      keepaliveTicked: ['postcopy-recover', []], // only postcopy-active watches for silence
      faultThreadEnded: ['postcopy-paused', PAUSE],
      pauseRequested: ['postcopy-paused', PAUSE],
      loadFailed: ['postcopy-paused', PAUSE], // a garbled recovery stream: paused again, as QEMU
    }),
  },
  completed: {
    state: { status: 'completed', config: CONFIG, postcopyFigures: false },
    rows: only({
      channelLost: ['completed', []],
      sourceEnded: ['completed', []],
      keepaliveTicked: ['completed', []],
      faultThreadEnded: ['completed', []],
      loadFailed: ['completed', []],
    }),
  },
  failed: {
    state: { status: 'failed', config: CONFIG, postcopyFigures: false, error: BROKEN },
    rows: only({
      channelLost: ['failed', []],
      sourceEnded: ['failed', []],
      keepaliveTicked: ['failed', []],
      faultThreadEnded: ['failed', []],
      loadFailed: ['failed', []],
    }),
  },
};

/** `active` before OPEN_RETURN_PATH and POSTCOPY_ADVISE: what changes from the base rows. */
const BEFORE_RP: Partial<Rows> = {
  pingReceived: ['failed', FAIL_NO_RP], // PING before OPEN_RETURN_PATH
  initDataLoaded: ['failed', FAIL_NO_RP],
  postcopyAdviseReceived: ['active', []],
  discardReceived: X,
  listenReceived: X,
  sourceEnded: ['failed', FAIL_NO_RP],
  channelLost: ['failed', FAIL_NO_RP],
  keepaliveTicked: ['failed', FAIL_NO_RP], // silent past the stall deadline, no return path to report on
  loadFailed: ['failed', FAIL_NO_RP],
};
const ACK: DestinationConfig = { ...CONFIG, switchoverAck: true, ackDevices: 1 };

/** Other data in a status that changes what its events do: the base rows with these overrides. */
const VARIANTS: { name: string; state: DestinationState; overrides: Partial<Rows> }[] = [
  {
    name: 'active before OPEN_RETURN_PATH and ADVISE',
    state: { ...ACTIVE, returnPath: false, peerIsLivemig: false, postcopy: 'none', postcopyRamAdvised: false },
    overrides: BEFORE_RP,
  },
  {
    // QEMU 8.1+: no device asks for the ack, so it follows OPEN_RETURN_PATH at once.
    name: 'active with switchover-ack and no device asking, before OPEN_RETURN_PATH',
    state: { ...ACTIVE, config: { ...ACK, ackDevices: 0 }, returnPath: false, peerIsLivemig: false, postcopy: 'none', postcopyRamAdvised: false },
    overrides: { ...BEFORE_RP, returnPathOpened: ['active', ['sendSwitchoverAck']] },
  },
  {
    name: 'active with switchover-ack, one device\'s initial data awaited',
    state: { ...ACTIVE, config: ACK, acksPending: 1 },
    overrides: { initDataLoaded: ['active', ['sendSwitchoverAck']] },
  },
  {
    name: 'active with switchover-ack, acknowledged',
    state: { ...ACTIVE, config: ACK, acksPending: 0, switchoverAcked: true },
    overrides: {},
  },
  {
    name: 'active, waiting for the multifd SYNCs',
    state: { ...ACTIVE, awaitingSync: true, ramSectionsEnded: 1 },
    overrides: { multifdSynced: ['active', ['resumeMainChannel']], ramSectionEnded: X },
  },
  {
    name: 'active, finishing (VMDESCRIPTION seen)',
    state: { ...ACTIVE, eofSeen: true, finishing: true },
    // Starting the guest is not silence: the stall deadline does not apply once the stream is complete.
    overrides: { vmdescriptionReceived: X, sourceEnded: ['active', []], channelLost: ['active', []], keepaliveTicked: ['active', []], loadFinished: ['completed', COMPLETE] },
  },
  {
    name: 'postcopy-active after POSTCOPY_RUN',
    state: { ...POSTCOPY, running: true },
    overrides: {
      runReceived: X,
      sourceEnded: ['postcopy-paused', PAUSE],
      channelLost: ['postcopy-paused', PAUSE],
      keepaliveTicked: ['postcopy-paused', PAUSE],
      faultThreadEnded: ['postcopy-paused', PAUSE],
      loadFailed: ['postcopy-paused', PAUSE], // the guest runs here: keep its pages, as QEMU
    },
  },
  {
    name: 'postcopy-active, finishing (EOF seen)',
    state: { ...POSTCOPY, finishing: true },
    overrides: {
      eofReceived: X,
      sourceEnded: ['postcopy-active', []],
      channelLost: ['postcopy-active', []],
      keepaliveTicked: ['postcopy-active', []],
      faultThreadEnded: ['postcopy-active', []],
      pauseRequested: X,
      loadFinished: ['completed', COMPLETE],
    },
  },
  {
    name: 'postcopy-recover, finishing (EOF seen)',
    state: { ...POSTCOPY, status: 'postcopy-recover', running: true, finishing: true },
    overrides: {
      loadFailed: ['failed', FAIL_WITH_RP],
      eofReceived: X,
      sourceEnded: ['postcopy-recover', []],
      channelLost: ['postcopy-recover', []],
      faultThreadEnded: ['postcopy-recover', []],
      pauseRequested: X,
      loadFinished: ['completed', COMPLETE],
    },
  },
  {
    name: 'postcopy-paused before migrate-recover',
    state: { ...PAUSED, recoveryListening: false },
    overrides: { recoveryAccepted: X },
  },
];

interface Case {
  name: string;
  state: DestinationState;
  rows: Rows;
}

const CASES: Case[] = [
  ...DESTINATION_STATUSES.map((s) => ({ name: s, state: BASE[s].state, rows: BASE[s].rows })),
  ...VARIANTS.map((v) => ({ name: v.name, state: v.state, rows: { ...BASE[v.state.status].rows, ...v.overrides } })),
];

/** The status-changing legal pairs, as `from --> to : event`. */
function transitions(): Set<string> {
  const out = new Set<string>();
  for (const c of CASES) {
    for (const t of DESTINATION_EVENT_TYPES) {
      const row = c.rows[t];
      if (row !== X && row[0] !== c.state.status) out.add(`${c.state.status} --> ${row[0]} : ${t}`);
    }
  }
  return out;
}

describe('destination machine: every (status, event) pair', () => {
  it('has a row for every status and every event type, and nothing else', () => {
    assert.deepEqual(Object.keys(BASE).sort(), [...DESTINATION_STATUSES].sort());
    for (const s of DESTINATION_STATUSES) {
      assert.equal(BASE[s].state.status, s);
      assert.deepEqual(Object.keys(BASE[s].rows).sort(), [...DESTINATION_EVENT_TYPES].sort(), `rows of ${s}`);
    }
    assert.deepEqual(Object.keys(EVENTS).sort(), [...DESTINATION_EVENT_TYPES].sort());
  });

  for (const c of CASES) {
    describe(c.name, () => {
      for (const t of DESTINATION_EVENT_TYPES) {
        const row = c.rows[t];
        if (row === X) {
          it(`${t}: refused with LM_ERR_WRONG_STATE`, () => {
            assert.throws(
              () => destinationStep(c.state, EVENTS[t], NOW_MS),
              (err: { code?: string; state?: string; event?: string }) => err.code === ErrorCode.WRONG_STATE && err.state === c.state.status && err.event === t,
            );
          });
        } else {
          it(`${t} → ${row[0]} [${row[1].join(', ')}]`, () => {
            const step = destinationStep(c.state, EVENTS[t], NOW_MS);
            assert.equal(step.state.status, row[0]);
            assert.deepEqual(
              step.actions.map((a) => a.type),
              row[1],
            );
          });
        }
      }
    });
  }
});

describe('destination machine: data carried', () => {
  const step = (s: DestinationState, e: DestinationEvent, now = NOW_MS) => destinationStep(s, e, now);

  it('configured on a listening destination: the new settings are what the stream is read with', () => {
    const listening = step(step(initialDestinationState(CONFIG), EVENTS.configured).state, EVENTS.listenStarted).state;
    const s = step(listening, { type: 'configured', config: { postcopyRam: false, preempt: false, multifd: true, stallTimeoutMs: 3_000 } }).state;
    assert.deepEqual(s.config, { postcopyRam: false, preempt: false, multifd: true, stallTimeoutMs: 3_000 });
    const active = step(s, EVENTS.connectionAccepted).state;
    assert.equal(active.config.multifd, true, 'a RAM section end waits for the multifd SYNCs');
    assert.equal(step(active, EVENTS.ramSectionEnded).actions[0]?.type, 'awaitMultifdSync');
    assert.throws(() => step(active, EVENTS.configured), /There's a migration process in progress/);
  });

  it('a precopy run: listen, connection, return path, hello, EOF, VMDESCRIPTION, finished', () => {
    let s = initialDestinationState(CONFIG);
    s = step(s, EVENTS.listenStarted).state;
    assert.equal(reportedStatus(s), 'none', 'query-migrate says none until the connection, as QEMU 7.2');
    s = step(s, EVENTS.connectionAccepted).state;
    s = step(s, EVENTS.returnPathOpened).state;
    const pong = step(s, { ...EVENTS.pingReceived, value: 0x4c4d0001, livemigHello: true });
    assert.deepEqual(pong.actions, [{ type: 'sendPong', value: 0x4c4d0001 }]);
    s = pong.state;
    s = step(s, EVENTS.eofReceived).state;
    const fin = step(s, EVENTS.vmdescriptionReceived);
    assert.deepEqual(fin.actions, [{ type: 'finish', postcopy: false, awaitFaultThread: false }]);
    assert.equal(readsStream(fin.state), false, 'nothing is decoded while finishing');
    const done = step(fin.state, EVENTS.loadFinished);
    assert.deepEqual(done.actions.find((a) => a.type === 'sendShut'), { type: 'sendShut', shutStatus: 0 });
    assert.equal(done.state.status, 'completed');
  });

  it('the end of stream after EOF completes a precopy without VMDESCRIPTION; before EOF it fails with the decoder’s reason', () => {
    const fin = step({ ...ACTIVE, eofSeen: true }, EVENTS.sourceEnded);
    assert.deepEqual(fin.actions.map((a) => a.type), ['finish']);
    const failed = step({ ...ACTIVE, eofSeen: true }, { ...EVENTS.sourceEnded, error: BROKEN });
    assert.equal(failed.state.status, 'failed');
    assert.equal(failed.state.status === 'failed' && failed.state.error, BROKEN);
    const early = step(ACTIVE, EVENTS.sourceEnded);
    assert.equal(early.state.status === 'failed' && early.state.error.code, ErrorCode.CHANNEL_LOST);
  });

  it('a failure reports the error first to a livemig source, then SHUT(1)', () => {
    const { actions } = step(ACTIVE, EVENTS.loadFailed);
    assert.deepEqual(actions.slice(3, 5), [{ type: 'sendErrorReport', error: BROKEN }, { type: 'sendShut', shutStatus: 1 }]);
    const quiet = step({ ...ACTIVE, peerIsLivemig: false }, EVENTS.loadFailed);
    assert.deepEqual(quiet.actions.map((a) => a.type), ['fail', 'stopKeepalive', 'emitStatus', 'sendShut', 'closeChannels']);
  });

  it('PING before OPEN_RETURN_PATH fails with LM_ERR_UNEXPECTED_COMMAND at its offset', () => {
    const r = step({ ...ACTIVE, returnPath: false }, EVENTS.pingReceived);
    assert.equal(r.state.status === 'failed' && r.state.error.code, ErrorCode.UNEXPECTED_COMMAND);
    assert.equal(r.state.status === 'failed' && (r.state.error as ProtocolError).streamOffset, 30);
  });

  it('LISTEN: the fault thread serves faults only for a livemig source with preempt and without TLS; a held preempt channel is taken', () => {
    const a = step({ ...ACTIVE, preempt: 'held' }, EVENTS.listenReceived);
    assert.deepEqual(a.actions[0], { type: 'startPostcopyFaults', faults: 'fault-thread', markPrecopyReceived: true });
    assert.deepEqual(a.actions.at(-1), { type: 'takePreempt', faults: 'fault-thread' });
    assert.equal(a.state.status === 'postcopy-active' && a.state.preempt, 'taken');
    const q = step({ ...ACTIVE, peerIsLivemig: false, postcopy: 'discarding' }, EVENTS.listenReceived);
    assert.deepEqual(q.actions[0], { type: 'startPostcopyFaults', faults: 'main-thread', markPrecopyReceived: false });
    const noPreempt = step({ ...ACTIVE, config: { ...CONFIG, preempt: false } }, EVENTS.listenReceived);
    assert.equal(noPreempt.state.status === 'postcopy-active' && noPreempt.state.faults, 'main-thread');
    // TLS: no thread can read the preempt connection, so the main thread serves faults and takes it.
    const tls = step({ ...ACTIVE, preempt: 'held', config: { ...CONFIG, faultThread: false } }, EVENTS.listenReceived);
    assert.deepEqual(tls.actions[0], { type: 'startPostcopyFaults', faults: 'main-thread', markPrecopyReceived: true });
    assert.deepEqual(tls.actions.at(-1), { type: 'takePreempt', faults: 'main-thread' });
  });

  it('only the first discard marks what precopy delivered', () => {
    const first = step(ACTIVE, EVENTS.discardReceived);
    const second = step(first.state, EVENTS.discardReceived);
    assert.deepEqual(second.actions.map((a) => a.type), ['discardPages']);
  });

  it('precopy stall deadline: a stream silent past x-livemig-stall-timeout fails with LM_ERR_PEER_SILENT (any source); bytes or finishing do not', () => {
    const t0 = 1_000;
    const s: DestinationState = { ...ACTIVE, peerIsLivemig: false, config: { ...CONFIG, stallTimeoutMs: 2_000 }, lastByteAtMs: t0 };
    assert.equal(step(s, { type: 'keepaliveTicked', lastByteAtMs: t0 }, t0 + 2_000).state.status, 'active', 'exactly the deadline is not yet silence');
    const late = step(s, { type: 'keepaliveTicked', lastByteAtMs: t0 }, t0 + 2_001);
    assert.equal(late.state.status, 'failed');
    const err = late.state.status === 'failed' ? late.state.error : undefined;
    assert.equal(err?.code, ErrorCode.PEER_SILENT);
    assert.match(err?.message ?? '', /no data from the source for 2001 ms in precopy \(x-livemig-stall-timeout 2000 ms\)/);
    assert.deepEqual(late.actions.map((a) => a.type), ['fail', 'stopKeepalive', 'emitStatus', 'sendShut', 'closeChannels']);
    const fed = step(s, { type: 'keepaliveTicked', lastByteAtMs: t0 + 1_500 }, t0 + 2_001);
    assert.equal(fed.state.status === 'active' && fed.state.lastByteAtMs, t0 + 1_500);
    assert.equal(step({ ...s, finishing: true }, { type: 'keepaliveTicked', lastByteAtMs: t0 }, t0 + 60_000).state.status, 'active', 'starting the guest is not silence');
    // The connection starts the deadline (and the timer).
    const accepted = step({ status: 'setup', config: CONFIG }, EVENTS.connectionAccepted, 5_000);
    assert.equal(accepted.state.status === 'active' && accepted.state.lastByteAtMs, 5_000);
  });

  it('keepalive: silence past KEEPALIVE_TIMEOUT_MS from a livemig source pauses with LM_ERR_PEER_SILENT; bytes or a QEMU source do not', () => {
    const t0 = 1_000;
    const s: DestinationState = { ...POSTCOPY, running: true, lastByteAtMs: t0 };
    const quiet = step(s, { type: 'keepaliveTicked', lastByteAtMs: t0 }, t0 + KEEPALIVE_TIMEOUT_MS);
    assert.equal(quiet.state.status, 'postcopy-active', 'exactly the timeout is not yet silence');
    const late = step(s, { type: 'keepaliveTicked', lastByteAtMs: t0 }, t0 + KEEPALIVE_TIMEOUT_MS + 1);
    assert.equal(late.state.status, 'postcopy-paused');
    const drop = late.actions[0];
    assert.equal(drop?.type === 'dropLink' && drop.reason.code, ErrorCode.PEER_SILENT);
    const fed = step(s, { type: 'keepaliveTicked', lastByteAtMs: t0 + 2_000 }, t0 + KEEPALIVE_TIMEOUT_MS + 1);
    assert.equal(fed.state.status === 'postcopy-active' && fed.state.lastByteAtMs, t0 + 2_000);
    const qemu = step({ ...s, peerIsLivemig: false }, { type: 'keepaliveTicked', lastByteAtMs: t0 }, t0 + 60_000);
    assert.equal(qemu.state.status, 'postcopy-active');
  });

  it('a link lost before POSTCOPY_RUN fails (keeping the silence code) instead of pausing: the package cannot be resent', () => {
    const t0 = 1_000;
    const beforeRun: DestinationState = { ...POSTCOPY, running: false, lastByteAtMs: t0 };
    const silent = step(beforeRun, { type: 'keepaliveTicked', lastByteAtMs: t0 }, t0 + KEEPALIVE_TIMEOUT_MS + 1);
    assert.equal(silent.state.status, 'failed');
    assert.equal(silent.state.status === 'failed' && silent.state.error.code, ErrorCode.PEER_SILENT);
    const cut = step(beforeRun, EVENTS.sourceEnded, t0);
    assert.equal(cut.state.status === 'failed' && cut.state.error.code, ErrorCode.CHANNEL_LOST);
    assert.match(cut.state.status === 'failed' ? cut.state.error.message : '', /inside the postcopy package before POSTCOPY_RUN/);
    const afterRun = step({ ...beforeRun, running: true }, EVENTS.sourceEnded, t0);
    assert.equal(afterRun.state.status, 'postcopy-paused');
  });

  it('a load error after POSTCOPY_RUN pauses (the guest runs here), but a bug still fails', () => {
    const running: DestinationState = { ...POSTCOPY, running: true };
    assert.equal(step(running, EVENTS.loadFailed, 0).state.status, 'postcopy-paused');
    const bug = { type: 'loadFailed', error: new StateError('postcopy-active', 'listenReceived') } as const;
    assert.equal(step(running, bug, 0).state.status, 'failed');
  });

  it('a recovery: the keepalive restarts from the resume, the return path is the recovery channel', () => {
    const rec = step(PAUSED, EVENTS.recoveryAccepted, 5_000);
    assert.equal(rec.state.status === 'postcopy-recover' && rec.state.returnPath, true);
    assert.equal(rec.state.status === 'postcopy-recover' && rec.state.running, true, 'the guest keeps running');
    const back = step(rec.state, EVENTS.resumeReceived, 7_000);
    assert.equal(back.state.status === 'postcopy-active' && back.state.lastByteAtMs, 7_000);
    const held = step({ ...PAUSED, preempt: 'held' }, EVENTS.recoveryAccepted);
    assert.deepEqual(held.actions.at(-1), { type: 'takePreempt', faults: 'fault-thread' });
  });

  it('a fault thread that holds no connection ending changes nothing', () => {
    assert.equal(step({ ...POSTCOPY, preempt: 'none' }, EVENTS.faultThreadEnded).state.status, 'postcopy-active');
    assert.equal(step({ ...POSTCOPY, faults: 'main-thread' }, EVENTS.faultThreadEnded).state.status, 'postcopy-active');
  });

  it('multifd: a RAM section end whose SYNCs are all in already does not stop the main channel; without multifd it is refused', () => {
    const r = step(ACTIVE, { ...EVENTS.ramSectionEnded, channelsSynced: true });
    assert.deepEqual(r.actions, []);
    assert.equal(r.state.status === 'active' && r.state.ramSectionsEnded, 1);
    assert.equal(readsStream(r.state), true);
    assert.throws(() => step({ ...ACTIVE, config: { ...CONFIG, multifd: false } }, EVENTS.ramSectionEnded), { code: ErrorCode.WRONG_STATE });
  });

  it('RUN twice is refused', () => {
    const running = step(POSTCOPY, EVENTS.runReceived).state;
    assert.throws(() => step(running, EVENTS.runReceived), { code: ErrorCode.WRONG_STATE });
  });

  it('QMP refusals keep their messages', () => {
    assert.throws(() => step(ACTIVE, EVENTS.pauseRequested), { code: ErrorCode.WRONG_STATE, message: 'migrate-pause needs a postcopy migration (status is active)' });
    assert.throws(() => step({ status: 'setup', config: CONFIG }, EVENTS.recoverRequested), {
      message: 'migrate-recover needs a paused postcopy migration (status is none)',
    });
  });

  it('query-migrate shows postcopy figures once postcopy began (or completed after ADVISE)', () => {
    assert.equal(showsPostcopyFigures(ACTIVE), false);
    assert.equal(showsPostcopyFigures({ ...ACTIVE, postcopy: 'discarding' }), true);
    assert.equal(showsPostcopyFigures(POSTCOPY), true);
    const done = step({ ...ACTIVE, finishing: true }, EVENTS.loadFinished).state;
    assert.equal(showsPostcopyFigures(done), true);
    const plain = step({ ...ACTIVE, postcopyRamAdvised: false, finishing: true }, EVENTS.loadFinished).state;
    assert.equal(showsPostcopyFigures(plain), false);
  });
});

describe('docs/state-machines/destination.md', () => {
  it('draws exactly the status-changing transitions', () => {
    const text = readFileSync(new URL('../../../docs/state-machines/destination.md', import.meta.url), 'utf8');
    const block = /```mermaid\n([\s\S]*?)```/.exec(text)?.[1];
    assert.ok(block !== undefined && block.includes('stateDiagram-v2'), 'a mermaid stateDiagram-v2 block');
    const drawn = new Set<string>();
    for (const line of block.split('\n')) {
      const m = /^\s*(\w+)\s*-->\s*(\w+)\s*:\s*(\w+)\s*$/.exec(line);
      // Mermaid state ids cannot hold '-': postcopy_active is postcopy-active.
      if (m !== null) drawn.add(`${m[1]!.replaceAll('_', '-')} --> ${m[2]!.replaceAll('_', '-')} : ${m[3]}`);
    }
    assert.deepEqual([...drawn].sort(), [...transitions()].sort());
  });
});
