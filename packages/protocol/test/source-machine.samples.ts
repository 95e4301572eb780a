// Sample states and events for the source machine's tests: one state per status (and per
// sub-phase that changes what an event does), one event per event type (two for SHUT).
import {
  ErrorCode,
  initialSourceState,
  type SourceEvent,
  type SourceState,
  TransportError,
} from '../src/index.ts';

export const T0 = 10_000;
const setup = initialSourceState({
  returnPath: true,
  guestWasRunning: true,
  blocks: [
    { idstr: 'pc.ram', length: 64 * 4096 },
    { idstr: 'vga.vram', length: 16 * 4096 },
  ],
});
/** Mode cpr-exec to a file: no return path; the process execs its new image once the state is out. */
const cprExec = { ...setup, returnPath: false, execAfterSave: true };
const lost = TransportError.lost('main', 'the main channel failed: write ECONNRESET', Object.assign(new Error('write ECONNRESET'), { code: 'ECONNRESET' }));

export const STATES: Record<string, SourceState> = {
  setup,
  active: { ...setup, status: 'active', phase: 'iterating' },
  'active.stop-copy': { ...setup, status: 'active', phase: 'stop-copy' },
  'active.awaiting-shut': { ...setup, status: 'active', phase: 'awaiting-shut' },
  'active.stop-copy.cpr-exec': { ...cprExec, status: 'active', phase: 'stop-copy' },
  'active.exec-pending': { ...cprExec, status: 'active', phase: 'exec-pending' },
  // Capability switchover-ack: the switchover waits for the destination's SWITCHOVER_ACK.
  'active.awaiting-ack': { ...setup, switchoverAck: true, status: 'active', phase: 'iterating' },
  // Capability pause-before-switchover: the switchover waits for migrate-continue.
  'active.pausing': { ...setup, pauseBeforeSwitchover: true, status: 'active', phase: 'iterating' },
  'pre-switchover': { ...setup, pauseBeforeSwitchover: true, status: 'pre-switchover', then: 'device', continued: false },
  'pre-switchover.postcopy': { ...setup, pauseBeforeSwitchover: true, status: 'pre-switchover', then: 'postcopy', continued: false },
  'pre-switchover.postcopy-continued': { ...setup, pauseBeforeSwitchover: true, status: 'pre-switchover', then: 'postcopy', continued: true },
  device: { ...setup, pauseBeforeSwitchover: true, status: 'device', phase: 'stop-copy' },
  'device.awaiting-shut': { ...setup, pauseBeforeSwitchover: true, status: 'device', phase: 'awaiting-shut' },
  'postcopy-active': { ...setup, status: 'postcopy-active', lastHeardAt: T0, ending: false },
  'postcopy-active.ending': { ...setup, status: 'postcopy-active', lastHeardAt: T0, ending: true },
  'postcopy-active.silent': { ...setup, status: 'postcopy-active', lastHeardAt: T0 - 10_000, ending: false },
  'postcopy-paused': { ...setup, status: 'postcopy-paused', reason: lost },
  'postcopy-recover': { ...setup, status: 'postcopy-recover', lastHeardAt: T0, bitmapsAwaited: ['pc.ram', 'vga.vram'] },
  'postcopy-recover.bitmaps-in': { ...setup, status: 'postcopy-recover', lastHeardAt: T0, bitmapsAwaited: [] },
  'postcopy-recover.silent': { ...setup, status: 'postcopy-recover', lastHeardAt: T0 - 10_000, bitmapsAwaited: ['pc.ram'] },
  'failing.awaiting-reason': { ...setup, status: 'failing', from: 'active', error: lost, shutStatus: undefined, reasonUntil: T0 + 500 },
  'failing.restoring': { ...setup, status: 'failing', from: 'active', error: lost, shutStatus: undefined, reasonUntil: undefined },
  cancelling: { ...setup, status: 'cancelling', postcopyStarted: false },
  completed: { ...setup, status: 'completed' },
  cancelled: { ...setup, status: 'cancelled' },
  failed: { ...setup, status: 'failed', error: lost },
};

export const EVENTS: Record<string, SourceEvent> = {
  setupSent: { type: 'setupSent' },
  switchoverStarted: { type: 'switchoverStarted', postcopy: false },
  'switchoverStarted(postcopy)': { type: 'switchoverStarted', postcopy: true },
  finalStateSent: { type: 'finalStateSent' },
  postcopyStarted: { type: 'postcopyStarted' },
  postcopyStreamEnded: { type: 'postcopyStreamEnded' },
  faulted: { type: 'faulted', error: lost },
  returnPathHeard: { type: 'returnPathHeard' },
  'shutReceived(0)': { type: 'shutReceived', status: 0 },
  'shutReceived(1)': { type: 'shutReceived', status: 1 },
  'pongReceived(4)': { type: 'pongReceived', value: 4 },
  destinationReported: { type: 'destinationReported', report: { code: ErrorCode.CONFIG_MISMATCH, message: 'RAM block "pc.ram" differs', offset: 77 } },
  pageRequested: { type: 'pageRequested', block: 'pc.ram', start: 8192, length: 8192 },
  recvBitmapReceived: { type: 'recvBitmapReceived', block: 'pc.ram', bitmap: new Uint8Array(8) },
  resumeAckReceived: { type: 'resumeAckReceived' },
  switchoverAckReceived: { type: 'switchoverAckReceived' },
  postcopyRequested: { type: 'postcopyRequested' },
  cancelRequested: { type: 'cancelRequested' },
  pauseRequested: { type: 'pauseRequested' },
  resumeRequested: { type: 'resumeRequested' },
  'continueRequested(pre-switchover)': { type: 'continueRequested', state: 'pre-switchover' },
  'continueRequested(active)': { type: 'continueRequested', state: 'active' },
  keepaliveTicked: { type: 'keepaliveTicked', lastProgressAt: T0 },
  // No progress for 10 s: past the default x-livemig-stall-timeout (5 s) and postcopy's 3 s.
  'keepaliveTicked(stalled)': { type: 'keepaliveTicked', lastProgressAt: T0 - 10_000 },
  reasonTimerFired: { type: 'reasonTimerFired' },
  guestRestored: { type: 'guestRestored' },
};

/** A transition as one line: `next-status[.phase] | action action(arg) …`, or `x CODE` when refused. */
export function describeStep(step: () => { state: SourceState; actions: readonly { type: string }[] }): string {
  let t;
  try {
    t = step();
  } catch (err) {
    return `x ${(err as { code?: string }).code}`;
  }
  const s = t.state;
  const sub =
    s.status === 'active' || s.status === 'device'
      ? `.${s.phase}`
      : s.status === 'postcopy-active' && s.ending
        ? '.ending'
        : s.status === 'pre-switchover'
          ? `.${s.then}${s.continued ? '.continued' : ''}`
          : '';
  const actions = t.actions.map((a) => {
    const r = a as Record<string, unknown>;
    if (a.type === 'emitStatus') return `emitStatus(${String(r['status'])})`;
    if (a.type === 'restoreGuest') return `restoreGuest(${r['run'] === true ? 'run' : 'paused'})`;
    return a.type;
  });
  // switchover-ack: the destination's SWITCHOVER_ACK has been noted.
  const acked = s.switchoverAcked ? '+acked' : '';
  return [`${s.status}${sub}${acked}`, ...actions].join(' ');
}
