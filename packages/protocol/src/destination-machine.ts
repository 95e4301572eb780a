// The incoming migration's state machine: pure, no sockets, timers, workers or logging. The
// destination adapter feeds it what arrived (a connection, a decoded stream command, a lost
// channel, a QMP command, a keepalive tick) with the time, and performs the actions it returns.
// It is called per control event, never per page. docs/state-machines/destination.md has the
// diagram (a test keeps it equal to the transitions below).
//
//   none → setup (listening) → active ─┬─ VMDESCRIPTION / end of stream after EOF ─→ completed
//                                      └─ POSTCOPY_LISTEN → postcopy-active ⇄ postcopy-paused → postcopy-recover
//   any error while loading → failed (in postcopy, once POSTCOPY_RUN is in, a lost link or a stream
//   that cannot be loaded is a pause instead)
//   active ─keepaliveTicked (silent past x-livemig-stall-timeout)→ failed (LM_ERR_PEER_SILENT)
//
// The statuses are QEMU's (MigrationStatus). Precopy ends with EOF and VMDESCRIPTION (or EOF and
// the source's end of stream); postcopy ends with EOF. Ending takes the adapter some time (the
// fault thread's last pages, starting the guest): `finishing` marks that stretch, and the adapter
// reports `loadFinished` when it is done.

import { KEEPALIVE_TIMEOUT_MS } from './constants.ts';
import { DEFAULT_STALL_TIMEOUT_MS } from './migration-config.ts';
import { ConfigError, ErrorCode, type MigrationError, ProtocolError, StateError, TransportError } from './errors.ts';
import type { DestinationAction, DestinationEvent, DestinationState, DestinationStep, FaultPath } from './destination-state.ts';
import { peerIsLivemig, reportedStatus, returnPathOpen, showsPostcopyFigures } from './destination-state.ts';

export * from './destination-state.ts';

export function destinationStep(state: DestinationState, event: DestinationEvent, now: number): DestinationStep {
  const illegal = (): never => {
    throw new StateError(state.status, event.type);
  };
  const stay = (): DestinationStep => ({ state, actions: [] });

  // Events that mean the same in every state that takes them.
  switch (event.type) {
    case 'pauseRequested':
      if (state.status !== 'postcopy-active' && state.status !== 'postcopy-recover') return refusePause(state);
      break;
    case 'recoverRequested':
      if (state.status !== 'postcopy-paused') return refuseRecover(state);
      break;
    case 'returnPathOpened':
      // QEMU 8.1+: with switchover-ack and no device asking for it, the ack follows the return path's opening.
      if (state.status === 'active' && !state.returnPath) return maybeAck({ ...state, returnPath: true });
      if (readsStreamNow(state)) return { state: { ...state, returnPath: true }, actions: [] };
      break;
    case 'pingReceived':
      if (readsStreamNow(state)) return ping(state, event);
      break;
    case 'ramSectionEnded':
      if (readsStreamNow(state)) return awaitSync(state, event.channelsSynced);
      break;
    case 'multifdSynced':
      if (readsStreamNow(state)) return synced(state, illegal);
      break;
    case 'configured':
      // Settings count until the stream starts (QEMU 7.2 takes them on a listening destination too).
      if (state.status === 'none' || state.status === 'setup') return { state: { ...state, config: event.config }, actions: [] };
      throw new StateError(state.status, event.type, "There's a migration process in progress");
    default:
      break;
  }

  switch (state.status) {
    // ---- before the stream ------------------------------------------------------------------
    case 'none':
      switch (event.type) {
        case 'listenStarted':
          return { state: { status: 'setup', config: state.config }, actions: [{ type: 'emitStatus', status: 'setup' }] };
        default:
          return illegal();
      }

    case 'setup':
      switch (event.type) {
        case 'connectionAccepted': {
          const next: DestinationState = {
            status: 'active',
            config: state.config,
            returnPath: false,
            peerIsLivemig: false,
            preempt: 'none',
            ramSectionsEnded: 0,
            awaitingSync: false,
            finishing: false,
            postcopy: 'none',
            postcopyRamAdvised: false,
            eofSeen: false,
            lastByteAtMs: now,
            acksPending: state.config.switchoverAck === true ? (state.config.ackDevices ?? 0) : 0,
            switchoverAcked: false,
          };
          return { state: next, actions: [{ type: 'beginLoad' }, { type: 'startKeepalive' }, { type: 'emitStatus', status: 'active' }] };
        }
        // The listener failed, or a multifd channel gave up before the main channel came.
        case 'channelLost':
        case 'loadFailed':
          return fail(state, event.error);
        // A fault thread (started with the listener) that holds no connection: a new one is made when needed.
        case 'faultThreadEnded':
          return stay();
        default:
          return illegal();
      }

    // ---- precopy --------------------------------------------------------------------------
    case 'active':
      switch (event.type) {
        case 'postcopyAdviseReceived':
          if (state.postcopy !== 'none') return illegal();
          return { state: { ...state, postcopy: 'advised', postcopyRamAdvised: event.postcopyRam }, actions: [] };
        case 'discardReceived': {
          if (state.postcopy === 'none') return illegal();
          const actions: DestinationAction[] = state.postcopy === 'advised' ? [{ type: 'markPrecopyReceived' }] : [];
          actions.push({ type: 'discardPages', discard: event.discard, streamOffset: event.streamOffset });
          return { state: { ...state, postcopy: 'discarding' }, actions };
        }
        case 'listenReceived': {
          if (state.postcopy === 'none') return illegal();
          const faults: FaultPath = state.peerIsLivemig && state.config.preempt && state.config.faultThread !== false ? 'fault-thread' : 'main-thread';
          const next: DestinationState = {
            status: 'postcopy-active',
            config: state.config,
            returnPath: state.returnPath,
            peerIsLivemig: state.peerIsLivemig,
            preempt: state.preempt === 'held' ? 'taken' : state.preempt,
            ramSectionsEnded: state.ramSectionsEnded,
            awaitingSync: state.awaitingSync,
            finishing: false,
            running: false,
            faults,
            lastByteAtMs: now,
          };
          const actions: DestinationAction[] = [
            { type: 'startPostcopyFaults', faults, markPrecopyReceived: state.postcopy === 'advised' },
            { type: 'startKeepalive' },
            { type: 'emitStatus', status: 'postcopy-active' },
          ];
          if (state.preempt === 'held') actions.push({ type: 'takePreempt', faults });
          return { state: next, actions };
        }
        case 'resumeReceived':
          // QEMU ignores POSTCOPY_RESUME outside postcopy-recover.
          return stay();
        case 'initDataLoaded':
          // QEMU's VFIO loader and qemu_loadvm_approve_switchover: a marker nobody awaits fails the load.
          if (state.config.switchoverAck !== true) {
            return fail(state, new ProtocolError(ErrorCode.BAD_VFIO_FRAME, `${event.idstr}: INIT_DATA_SENT, but switchover-ack is not on here`, { streamOffset: event.streamOffset }));
          }
          if (state.acksPending === 0) {
            return fail(state, new ProtocolError(ErrorCode.BAD_VFIO_FRAME, `${event.idstr}: INIT_DATA_SENT with no device's initial data awaited`, { streamOffset: event.streamOffset }));
          }
          return maybeAck({ ...state, acksPending: state.acksPending - 1 });
        case 'eofReceived':
          return { state: { ...state, eofSeen: true }, actions: [] };
        case 'vmdescriptionReceived':
          return finishPrecopy(state);
        case 'sourceEnded':
          if (state.finishing) return stay();
          // EOF without a VMDESCRIPTION (a source that sends none) completes the stream.
          if (state.eofSeen && event.error === undefined) return finishPrecopy(state);
          return fail(state, event.error ?? TransportError.lost('main', `the source ended the stream at offset ${event.streamOffset} before EOF`));
        case 'channelLost':
          return state.finishing ? stay() : fail(state, event.error);
        case 'keepaliveTicked': {
          // Every wait bounded: a precopy source (livemig or QEMU) writes without pause until EOF
          // (a livemig source PINGs between sections too), so a stream silent past the deadline
          // is a dead link. A QEMU source held in pre-switchover longer needs a larger deadline.
          const lastByteAtMs = Math.max(state.lastByteAtMs, event.lastByteAtMs);
          const silentMs = now - lastByteAtMs;
          const limitMs = state.config.stallTimeoutMs ?? DEFAULT_STALL_TIMEOUT_MS;
          if (!state.finishing && silentMs > limitMs) {
            return fail(
              state,
              new TransportError(ErrorCode.PEER_SILENT, 'main', `no data from the source for ${Math.round(silentMs)} ms in precopy (x-livemig-stall-timeout ${limitMs} ms): link presumed broken`),
            );
          }
          return lastByteAtMs === state.lastByteAtMs ? stay() : { state: { ...state, lastByteAtMs }, actions: [] };
        }
        case 'preemptAccepted':
          if (state.preempt !== 'none') return illegal();
          return { state: { ...state, preempt: 'held' }, actions: [{ type: 'holdPreempt' }] };
        case 'faultThreadEnded':
          return stay();
        case 'loadFinished':
          if (!state.finishing) return illegal();
          return complete(state, state.postcopyRamAdvised);
        case 'loadFailed':
          return fail(state, event.error);
        default:
          return illegal();
      }

    // ---- postcopy ---------------------------------------------------------------------------
    case 'postcopy-active':
    case 'postcopy-recover':
      switch (event.type) {
        case 'runReceived':
          if (state.status !== 'postcopy-active' || state.running) return illegal();
          return { state: { ...state, running: true }, actions: [{ type: 'startGuestInPostcopy' }] };
        case 'recvBitmapRequested':
          // QEMU answers RECV_BITMAP only while recovering.
          if (state.status !== 'postcopy-recover') return illegal();
          return { state, actions: state.returnPath ? [{ type: 'sendRecvBitmap', block: event.block, streamOffset: event.streamOffset }] : [] };
        case 'resumeReceived': {
          if (state.status !== 'postcopy-recover') return stay(); // QEMU ignores it outside postcopy-recover
          const actions: DestinationAction[] = [{ type: 'emitStatus', status: 'postcopy-active' }];
          if (state.returnPath) actions.push({ type: 'sendResumeAck' }, { type: 'rerequestAwaitedPages' });
          return { state: { ...state, status: 'postcopy-active', lastByteAtMs: now }, actions };
        }
        case 'eofReceived':
          // Postcopy streams end at EOF (no VMDESCRIPTION): every page has been sent.
          if (state.finishing) return illegal();
          return {
            state: { ...state, finishing: true },
            actions: [{ type: 'finish', postcopy: true, awaitFaultThread: state.faults === 'fault-thread' && state.preempt === 'taken' }],
          };
        case 'sourceEnded':
          if (state.finishing) return stay();
          // A closed link is a pause, not the end (the final EOF ends it).
          return pauseOrFailBeforeRun(state, TransportError.lost('main', `the source closed the connection at stream offset ${event.streamOffset}`));
        case 'channelLost':
          return state.finishing ? stay() : pauseOrFailBeforeRun(state, event.error);
        case 'keepaliveTicked': {
          const lastByteAtMs = Math.max(state.lastByteAtMs, event.lastByteAtMs);
          const silentMs = now - lastByteAtMs;
          // A livemig source PINGs at least every 500 ms while postcopy runs; a QEMU source sends no keepalive.
          if (state.status === 'postcopy-active' && !state.finishing && state.peerIsLivemig && silentMs > KEEPALIVE_TIMEOUT_MS) {
            return pauseOrFailBeforeRun(state, new TransportError(ErrorCode.PEER_SILENT, 'main', `no data from the source for ${Math.round(silentMs)} ms: link presumed broken`));
          }
          return lastByteAtMs === state.lastByteAtMs ? stay() : { state: { ...state, lastByteAtMs }, actions: [] };
        }
        case 'preemptAccepted':
          if (state.preempt !== 'none' || state.finishing) return illegal();
          return { state: { ...state, preempt: 'taken' }, actions: [{ type: 'takePreempt', faults: state.faults }] };
        case 'faultThreadEnded':
          // Only a thread that owns the preempt connection carries the link.
          if (state.finishing || state.faults !== 'fault-thread' || state.preempt !== 'taken') return stay();
          return pauseOrFailBeforeRun(state, TransportError.lost('preempt', event.reason));
        case 'pauseRequested':
          if (state.finishing) return refusePause(state);
          return pause(state, TransportError.lost('main', 'paused by migrate-pause'));
        case 'loadFinished':
          if (!state.finishing) return illegal();
          return complete(state, true);
        case 'loadFailed':
          // As QEMU: once the guest runs here, a stream that cannot be loaded (garbled on the
          // way, say) pauses instead of failing, so the pages only this side has are kept and a
          // recovery can go on. A bug (internal, wrong state) still fails.
          if (state.running && !state.finishing && event.error.code !== ErrorCode.INTERNAL && event.error.code !== ErrorCode.WRONG_STATE) {
            return pause(state, event.error);
          }
          return fail(state, event.error);
        default:
          return illegal();
      }

    case 'postcopy-paused':
      switch (event.type) {
        // The link is already down; the keepalive waits for the recovery.
        case 'channelLost':
        case 'sourceEnded':
        case 'keepaliveTicked':
        case 'faultThreadEnded':
          return stay();
        case 'recoverRequested':
          // QEMU sends the setup event again for the recovery listener; the status stays postcopy-paused.
          return { state: { ...state, recoveryListening: true }, actions: [{ type: 'emitStatus', status: 'setup' }] };
        case 'recoveryAccepted': {
          if (!state.recoveryListening) return illegal();
          const next: DestinationState = {
            status: 'postcopy-recover',
            config: state.config,
            // The recovery channel carries a return path from the start.
            returnPath: true,
            peerIsLivemig: state.peerIsLivemig,
            preempt: state.preempt === 'held' ? 'taken' : 'none',
            ramSectionsEnded: state.ramSectionsEnded,
            awaitingSync: false,
            finishing: false,
            running: state.running,
            faults: state.faults,
            lastByteAtMs: now,
          };
          const actions: DestinationAction[] = [{ type: 'adoptRecoveryChannel' }, { type: 'emitStatus', status: 'postcopy-recover' }];
          if (state.preempt === 'held') actions.push({ type: 'takePreempt', faults: state.faults });
          return { state: next, actions };
        }
        case 'preemptAccepted':
          if (state.preempt !== 'none') return illegal();
          return { state: { ...state, preempt: 'held' }, actions: [{ type: 'holdPreempt' }] };
        case 'loadFailed':
          return fail(state, event.error);
        default:
          return illegal();
      }

    // ---- the end ----------------------------------------------------------------------------
    case 'completed':
    case 'failed':
      switch (event.type) {
        // Connections closing (ours or the peer's) and late failures after the end change nothing: the first outcome stands.
        case 'channelLost':
        case 'sourceEnded':
        case 'keepaliveTicked':
        case 'faultThreadEnded':
        case 'loadFailed':
          return stay();
        default:
          return illegal();
      }
  }
}

type StreamState = Extract<DestinationState, { status: 'active' | 'postcopy-active' | 'postcopy-recover' }>;

/** A state in which the main channel's stream is being read. */
/** switchover-ack: once nothing is awaited and the return path is open, SWITCHOVER_ACK (once). */
function maybeAck(state: Extract<DestinationState, { status: 'active' }>): DestinationStep {
  if (state.config.switchoverAck !== true || state.acksPending > 0 || !state.returnPath || state.switchoverAcked) return { state, actions: [] };
  return { state: { ...state, switchoverAcked: true }, actions: [{ type: 'sendSwitchoverAck' }] };
}

function readsStreamNow(state: DestinationState): state is StreamState {
  return state.status === 'active' || state.status === 'postcopy-active' || state.status === 'postcopy-recover';
}

function ping(state: StreamState, event: Extract<DestinationEvent, { type: 'pingReceived' }>): DestinationStep {
  if (!state.returnPath) {
    return fail(state, new ConfigError(ErrorCode.UNEXPECTED_COMMAND, 'PING before OPEN_RETURN_PATH', { streamOffset: event.streamOffset }));
  }
  return {
    state: event.livemigHello ? { ...state, peerIsLivemig: true } : state,
    actions: [{ type: 'sendPong', value: event.value }],
  };
}

function awaitSync(state: StreamState, channelsSynced: boolean): DestinationStep {
  if (!state.config.multifd || state.awaitingSync) throw new StateError(state.status, 'ramSectionEnded');
  const ramSectionsEnded = state.ramSectionsEnded + 1;
  // Pages sent before this section's EOS travel on the channels: read on only when all are in.
  if (channelsSynced) return { state: { ...state, ramSectionsEnded }, actions: [] };
  return { state: { ...state, ramSectionsEnded, awaitingSync: true }, actions: [{ type: 'awaitMultifdSync', ramSectionsEnded }] };
}

function synced(state: StreamState, illegal: () => never): DestinationStep {
  if (!state.awaitingSync) return illegal();
  return { state: { ...state, awaitingSync: false }, actions: [{ type: 'resumeMainChannel' }] };
}

function finishPrecopy(state: Extract<DestinationState, { status: 'active' }>): DestinationStep {
  if (state.finishing) throw new StateError(state.status, 'vmdescriptionReceived');
  return { state: { ...state, finishing: true }, actions: [{ type: 'finish', postcopy: false, awaitFaultThread: false }] };
}

function complete(state: StreamState, postcopyFigures: boolean): DestinationStep {
  const actions: DestinationAction[] = [{ type: 'stopKeepalive' }, { type: 'emitStatus', status: 'completed' }, { type: 'complete' }];
  if (state.returnPath) actions.push({ type: 'sendShut', shutStatus: 0 });
  actions.push({ type: 'closeChannels', failed: false });
  return { state: { status: 'completed', config: state.config, postcopyFigures }, actions };
}

function pause(state: Extract<DestinationState, { status: 'postcopy-active' | 'postcopy-recover' }>, reason: MigrationError): DestinationStep {
  return {
    state: {
      status: 'postcopy-paused',
      config: state.config,
      peerIsLivemig: state.peerIsLivemig,
      running: state.running,
      faults: state.faults,
      // The preempt channel goes with the main one; a recovery brings a new one.
      preempt: 'none',
      ramSectionsEnded: state.ramSectionsEnded,
      recoveryListening: false,
      reason,
    },
    actions: [{ type: 'dropLink', reason }, { type: 'emitStatus', status: 'postcopy-paused' }],
  };
}

/**
 * A lost link in postcopy-active pauses, unless POSTCOPY_RUN has not arrived yet: then the link
 * broke inside the postcopy package (LISTEN, the device state, RUN), which QEMU loads whole. The
 * device state here may be incomplete and a recovery resends RAM only, never the package, so a
 * recovered migration would end with a guest that was never told to run: fail instead, as a
 * QEMU destination does (it has not started listening before the whole package is in).
 */
function pauseOrFailBeforeRun(state: Extract<DestinationState, { status: 'postcopy-active' | 'postcopy-recover' }>, reason: MigrationError): DestinationStep {
  if (state.status !== 'postcopy-active' || state.running) return pause(state, reason);
  const error = new TransportError(
    reason.code === ErrorCode.PEER_SILENT ? ErrorCode.PEER_SILENT : ErrorCode.CHANNEL_LOST,
    reason instanceof TransportError ? reason.channel : 'main',
    `${reason.message}, inside the postcopy package before POSTCOPY_RUN: its device state may be incomplete and a recovery cannot resend it, so the migration cannot resume (the guest never ran here)`,
    { cause: reason },
  );
  return fail(state, error);
}

function fail(state: DestinationState, error: MigrationError): DestinationStep {
  const actions: DestinationAction[] = [{ type: 'fail', error }, { type: 'stopKeepalive' }, { type: 'emitStatus', status: 'failed' }];
  // A livemig source reads the reason first (the error report), then the SHUT.
  if (peerIsLivemig(state) && returnPathOpen(state)) actions.push({ type: 'sendErrorReport', error });
  if (returnPathOpen(state)) actions.push({ type: 'sendShut', shutStatus: 1 });
  actions.push({ type: 'closeChannels', failed: true });
  return { state: { status: 'failed', config: state.config, postcopyFigures: showsPostcopyFigures(state), error }, actions };
}

function refusePause(state: DestinationState): never {
  throw new StateError(state.status, 'pauseRequested', `migrate-pause needs a postcopy migration (status is ${reportedStatus(state)})`);
}

function refuseRecover(state: DestinationState): never {
  throw new StateError(state.status, 'recoverRequested', `migrate-recover needs a paused postcopy migration (status is ${reportedStatus(state)})`);
}
