// The outgoing migration's state machine, pure: `sourceStep(state, event, now)` returns the next
// state and what the adapter (packages/source) must do. It reads no clock, owns no socket and
// never awaits; the adapter feeds it what happened (a return-path message, a QMP command, a
// channel failure, a timer) and carries out its actions. docs/state-machines/source.md has the
// diagram, which the tests keep equal to this code.
//
//   setup ─setupSent→ active ─postcopyStarted→ postcopy-active ⇄ postcopy-paused → postcopy-recover
//                       │ iterating → stop-copy → awaiting-shut ─shutReceived(0)→ completed
//                       │ cpr-exec: iterating → stop-copy → exec-pending (the process execs its new image)
//                       └ pause-before-switchover: ─switchoverStarted→ pre-switchover ─continueRequested→
//                         device (stop-copy → awaiting-shut → completed), or postcopy-active
//   any running state ─faulted→ failing ─(destination's reason or 500 ms)→ restore guest → failed
//   any running state ─cancelRequested→ cancelling ─guestRestored→ cancelled
//   setup, active ─keepaliveTicked (no progress for stallTimeoutMs)→ failing (LM_ERR_PEER_SILENT)
//   switchover-ack: switchoverAckReceived marks the state; maySwitchOver() gates the thread's switchover
//
// Statuses are QEMU's MigrationStatus names, so query-migrate reports them as they are. One state
// is livemig's own: `failing`, the short wrap-up of a failure (waiting for the destination's
// reason, then running the source guest again); query-migrate shows the status it failed from
// (sourceReportedStatus), so a client that sees `failed` finds the source guest running already.

import { KEEPALIVE_TIMEOUT_MS } from './constants.ts';
import { ErrorCode, ProtocolError, StateError, TransportError } from './errors.ts';
import {
  isSourceFinal,
  type SourceAction,
  type SourceEvent,
  type SourceState,
  type SourceTransition,
  sourceReportedStatus,
} from './source-state.ts';
import { common, complete, failureOf, faulted, pause, postcopyBegun, precopyTicked, restore, same, shutReceived } from './source-transitions.ts';

export * from './source-state.ts';
export { DESTINATION_REASON_WAIT_MS } from './source-transitions.ts';

const PAGE_SIZE = 4096;

/** One step of the machine. Throws StateError for an event that does not belong in `state`. */
export function sourceStep(state: SourceState, event: SourceEvent, now: number): SourceTransition {
  const s = state;
  const illegal = (): never => {
    throw new StateError(sourceReportedStatus(s), event.type);
  };
  switch (event.type) {
    case 'setupSent':
      if (s.status !== 'setup') return illegal();
      return { state: { ...s, status: 'active', phase: 'iterating' }, actions: [{ type: 'emitStatus', status: 'active' }] };

    case 'switchoverStarted':
      // The guest has stopped. With pause-before-switchover nothing more goes out until migrate-continue.
      if (s.status !== 'active' || s.phase !== 'iterating') return illegal();
      if (s.pauseBeforeSwitchover) {
        const then = event.postcopy ? 'postcopy' : 'device';
        return { state: { ...common(s), status: 'pre-switchover', then, continued: false }, actions: [{ type: 'emitStatus', status: 'pre-switchover' }] };
      }
      return same({ ...s, phase: 'stop-copy' });

    case 'continueRequested':
      // QEMU's check and text; a continue in the state it names, but not pre-switchover, does nothing.
      if (event.state !== sourceReportedStatus(s)) {
        throw new StateError(sourceReportedStatus(s), event.type, `Migration not in expected state: ${sourceReportedStatus(s)}`);
      }
      if (s.status !== 'pre-switchover') return same(s);
      // Postcopy goes straight to postcopy-active at postcopyStarted (QEMU 7.2 shows no `device` there).
      if (s.then === 'postcopy') return same({ ...s, continued: true });
      return { state: { ...common(s), status: 'device', phase: 'stop-copy' }, actions: [{ type: 'emitStatus', status: 'device' }] };

    case 'finalStateSent':
      if ((s.status !== 'active' && s.status !== 'device') || s.phase !== 'stop-copy') return illegal();
      // cpr-exec: the new image takes over in this very process; a failed exec is a fault.
      if (s.execAfterSave && !s.returnPath) {
        return { state: { ...common(s), status: 'active', phase: 'exec-pending' }, actions: [{ type: 'stopKeepalive' }, { type: 'closeChannels' }, { type: 'execNewImage' }] };
      }
      // Without a return path nothing will confirm: the stream is out, and that is all we can know.
      if (!s.returnPath) return complete(s);
      return same({ ...s, phase: 'awaiting-shut' });

    case 'postcopyStarted': {
      const mayStart = (s.status === 'active' && s.phase !== 'awaiting-shut' && s.phase !== 'exec-pending') || (s.status === 'pre-switchover' && s.then === 'postcopy' && s.continued);
      if (!mayStart) return illegal();
      return {
        state: { ...common(s), status: 'postcopy-active', lastHeardAt: now, ending: false },
        actions: [{ type: 'emitStatus', status: 'postcopy-active' }, { type: 'startPostcopyPaging' }, { type: 'startKeepalive' }],
      };
    }

    case 'postcopyStreamEnded':
      if (s.status !== 'postcopy-active' || s.ending) return illegal();
      return same({ ...s, ending: true });

    case 'faulted':
      return faulted(s, event.error, now);

    case 'returnPathHeard':
      if (s.status === 'postcopy-active' || s.status === 'postcopy-recover') return same({ ...s, lastHeardAt: now });
      return same(s);

    case 'shutReceived':
      return shutReceived(s, event.status, now);

    case 'pongReceived':
      // PING 4 follows POSTCOPY_RUN: its PONG says the destination runs the guest.
      if (event.value === 4 && s.runConfirmedAt === undefined && !isSourceFinal(s)) return same({ ...s, runConfirmedAt: now });
      return same(s);

    case 'destinationReported': {
      if (isSourceFinal(s)) return same(s);
      const next = { ...s, destinationReport: event.report };
      // The reason a failure was waiting for.
      if (next.status === 'failing' && next.reasonUntil !== undefined) return restore(next);
      return same(next);
    }

    case 'pageRequested': {
      // A QEMU destination asks only once postcopy runs; asking earlier is a protocol error.
      if (s.status !== 'postcopy-active' && s.status !== 'postcopy-recover') return illegal();
      const blockIndex = s.blocks.findIndex((b) => b.idstr === event.block);
      const block = s.blocks[blockIndex];
      if (block === undefined) {
        throw new ProtocolError(ErrorCode.UNKNOWN_BLOCK, `page request for unknown block "${event.block}"`, { block: event.block });
      }
      if (event.start + event.length > block.length || event.start % PAGE_SIZE !== 0 || event.length % PAGE_SIZE !== 0) {
        throw new ProtocolError(
          ErrorCode.ILLEGAL_RAM_OFFSET,
          `page request 0x${event.start.toString(16)}+0x${event.length.toString(16)} is outside "${event.block}" (0x${block.length.toString(16)} bytes)`,
          { block: event.block, pageOffset: event.start },
        );
      }
      return { state: s, actions: [{ type: 'servePages', blockIndex, firstPage: event.start / PAGE_SIZE, pageCount: event.length / PAGE_SIZE }] };
    }

    case 'recvBitmapReceived': {
      if (s.status !== 'postcopy-recover') return illegal();
      if (!s.bitmapsAwaited.includes(event.block)) {
        return pause(s, new ProtocolError(ErrorCode.UNKNOWN_BLOCK, `RECV_BITMAP for unknown or repeated block "${event.block}"`, { block: event.block }));
      }
      const bitmapsAwaited = s.bitmapsAwaited.filter((b) => b !== event.block);
      const actions: SourceAction[] = [{ type: 'applyReceivedBitmap', block: event.block, bitmap: event.bitmap }];
      if (bitmapsAwaited.length === 0) actions.push({ type: 'sendPostcopyResume' });
      return { state: { ...s, bitmapsAwaited }, actions };
    }

    case 'resumeAckReceived':
      if (s.status !== 'postcopy-recover') return illegal();
      if (s.bitmapsAwaited.length > 0) {
        return pause(s, new StateError('postcopy-recover', event.type, 'RESUME_ACK came before every RECV_BITMAP arrived'));
      }
      return {
        state: { ...common(s), status: 'postcopy-active', lastHeardAt: now, ending: false },
        actions: [{ type: 'emitStatus', status: 'postcopy-active' }, { type: 'startPostcopyPaging' }],
      };

    case 'switchoverAckReceived':
      // QEMU's source notes it whenever it comes (its destination sends it once, early).
      if (isSourceFinal(s) || s.switchoverAcked) return same(s);
      return same({ ...s, switchoverAcked: true });

    case 'postcopyRequested':
      // QEMU answers {} whenever postcopy-ram is on; it matters only before the switchover (the
      // choice between precopy's end and postcopy is made before pre-switchover).
      if (s.status === 'setup' || (s.status === 'active' && s.phase === 'iterating')) return same({ ...s, postcopyRequested: true });
      return same(s);

    case 'cancelRequested':
      if (isSourceFinal(s) || s.status === 'cancelling' || s.status === 'failing') return same(s);
      return {
        state: { ...common(s), status: 'cancelling', postcopyStarted: postcopyBegun(s) },
        actions: [
          { type: 'emitStatus', status: 'cancelling' },
          { type: 'stopKeepalive' },
          { type: 'stopPostcopyPaging' },
          { type: 'closeChannels' },
          // Once postcopy has started the destination owns the guest: never run it here again.
          { type: 'restoreGuest', run: s.guestWasRunning && !postcopyBegun(s) },
        ],
      };

    case 'pauseRequested':
      if (s.status !== 'postcopy-active' && s.status !== 'postcopy-recover') {
        throw new StateError(sourceReportedStatus(s), event.type, `migrate-pause needs a postcopy migration (status is ${sourceReportedStatus(s)})`);
      }
      return pause(s, new TransportError(ErrorCode.CHANNEL_LOST, 'main', 'paused by migrate-pause'));

    case 'resumeRequested':
      if (s.status !== 'postcopy-paused') {
        throw new StateError(sourceReportedStatus(s), event.type, `migrate with resume=true needs a paused postcopy migration (status is ${sourceReportedStatus(s)})`);
      }
      return {
        state: { ...common(s), status: 'postcopy-recover', lastHeardAt: now, bitmapsAwaited: s.blocks.map((b) => b.idstr) },
        actions: [{ type: 'emitStatus', status: 'postcopy-recover' }, { type: 'requestReceivedBitmaps', blocks: s.blocks.map((b) => b.idstr) }],
      };

    case 'keepaliveTicked':
      if (s.status === 'setup' || s.status === 'active' || s.status === 'pre-switchover' || s.status === 'device') return precopyTicked(s, event.lastProgressAt, now);
      if (s.status === 'postcopy-paused') return same(s);
      if (s.status !== 'postcopy-active' && s.status !== 'postcopy-recover') return illegal();
      if (now - s.lastHeardAt > KEEPALIVE_TIMEOUT_MS) {
        const silentMs = Math.round(now - s.lastHeardAt);
        return pause(s, new TransportError(ErrorCode.PEER_SILENT, 'return-path', `no return-path traffic for ${silentMs} ms: link presumed broken`));
      }
      return { state: s, actions: [{ type: 'sendKeepalivePing' }] };

    case 'reasonTimerFired':
      if (s.status === 'failing') return s.reasonUntil === undefined ? same(s) : restore(s);
      if (s.status === 'failed' || s.status === 'cancelling' || s.status === 'cancelled') return same(s);
      return illegal();

    case 'guestRestored':
      if (s.status === 'failing' && s.reasonUntil === undefined) {
        const error = failureOf(s);
        return { state: { ...common(s), status: 'failed', error }, actions: [{ type: 'cleanUp' }, { type: 'emitStatus', status: 'failed' }] };
      }
      if (s.status === 'cancelling') {
        return { state: { ...common(s), status: 'cancelled' }, actions: [{ type: 'cleanUp' }, { type: 'emitStatus', status: 'cancelled' }] };
      }
      return illegal();
  }
}
