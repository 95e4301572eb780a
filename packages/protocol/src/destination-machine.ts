// The incoming migration's state machine: pure, no sockets, timers, workers or logging. The
// destination adapter feeds it what arrived (a connection, a decoded stream command, a lost
// channel, a QMP command, a keepalive tick) with the time, and performs the actions it returns.
// It is called per control event, never per page. docs/state-machines/destination.md has the
// diagram (a test keeps it equal to the transitions below).
//
//   none → setup (listening) → active ─┬─ VMDESCRIPTION / end of stream after EOF ─→ completed
//                                      └─ POSTCOPY_LISTEN → postcopy-active ⇄ postcopy-paused → postcopy-recover
//   any error while loading → failed (a lost link in postcopy is a pause instead)
//   active ─keepaliveTicked (silent past x-livemig-stall-timeout)→ failed (LM_ERR_PEER_SILENT)
//
// The statuses are QEMU's (MigrationStatus). Precopy ends with EOF and VMDESCRIPTION (or EOF and
// the source's end of stream); postcopy ends with EOF. Ending takes the adapter some time (the
// fault thread's last pages, starting the guest): `finishing` marks that stretch, and the adapter
// reports `loadFinished` when it is done.

import { KEEPALIVE_TIMEOUT_MS } from './constants.ts';
import { DEFAULT_STALL_TIMEOUT_MS } from './migration-config.ts';
import { ConfigError, ErrorCode, type MigrationError, StateError, TransportError } from './errors.ts';

/** What this destination was configured with (capabilities); fixed for the migration. */
export interface DestinationConfig {
  /** Capability postcopy-ram. */
  postcopyRam: boolean;
  /** Capability postcopy-preempt: a second connection carries requested pages. */
  preempt: boolean;
  /** Capability multifd: RAM sections end only once every channel sent its SYNC. */
  multifd: boolean;
  /** Parameter x-livemig-stall-timeout: a precopy stream silent this long fails (ms; default 5000). */
  stallTimeoutMs?: number;
}

/** Where the postcopy fault path runs: the main thread's event loop, or the fault thread (a livemig source with preempt). */
export type FaultPath = 'main-thread' | 'fault-thread';
/** A preempt connection: none yet, accepted but held until postcopy listens, or in use. */
export type PreemptChannel = 'none' | 'held' | 'taken';

/** What is known while the main channel is read (active, postcopy-active, postcopy-recover). */
interface Stream {
  config: DestinationConfig;
  /** OPEN_RETURN_PATH seen (postcopy-recover: the recovery channel is one). */
  returnPath: boolean;
  /** A PING carried livemig's hello: the source reads livemig's return-path extensions. */
  peerIsLivemig: boolean;
  preempt: PreemptChannel;
  /** Multifd: RAM sections the main channel has ended (each needs a SYNC from every channel). */
  ramSectionsEnded: number;
  /** Multifd: the main channel waits at a RAM section end for the channels' SYNCs. */
  awaitingSync: boolean;
  /** The stream is complete; the adapter is placing the last pages or starting the guest. */
  finishing: boolean;
}

/** Postcopy, listening (postcopy-active, postcopy-recover). */
interface Postcopy extends Stream {
  /** POSTCOPY_RUN seen: the guest runs here. */
  running: boolean;
  faults: FaultPath;
  /** The keepalive's baseline: the later of the last byte and when the link (re)started (ms). */
  lastByteAtMs: number;
}

export type DestinationState =
  | { status: 'none'; config: DestinationConfig }
  /** Listening for the main connection. */
  | { status: 'setup'; config: DestinationConfig }
  | (Stream & {
      status: 'active';
      /** QEMU's postcopy incoming state before LISTEN. */
      postcopy: 'none' | 'advised' | 'discarding';
      /** ADVISE carried page sizes (the source has postcopy-ram): query-migrate shows postcopy figures. */
      postcopyRamAdvised: boolean;
      /** EOF seen (precopy ends at VMDESCRIPTION or at the source's end of stream). */
      eofSeen: boolean;
      /** The stall deadline's baseline: the later of the last byte and the connection (ms). */
      lastByteAtMs: number;
    })
  | (Postcopy & { status: 'postcopy-active' })
  | (Postcopy & { status: 'postcopy-recover' })
  | {
      status: 'postcopy-paused';
      config: DestinationConfig;
      peerIsLivemig: boolean;
      running: boolean;
      faults: FaultPath;
      preempt: Exclude<PreemptChannel, 'taken'>;
      ramSectionsEnded: number;
      /** migrate-recover listens for the source's recovery connection. */
      recoveryListening: boolean;
      /** Why the link broke. */
      reason: MigrationError;
    }
  | { status: 'completed'; config: DestinationConfig; postcopyFigures: boolean }
  | { status: 'failed'; config: DestinationConfig; postcopyFigures: boolean; error: MigrationError };

export type DestinationStatus = DestinationState['status'];

export const DESTINATION_STATUSES = [
  'none',
  'setup',
  'active',
  'postcopy-active',
  'postcopy-paused',
  'postcopy-recover',
  'completed',
  'failed',
] as const satisfies readonly DestinationStatus[];

/** A RAM discard range list (POSTCOPY_RAM_DISCARD), passed through to the adapter. */
export interface DiscardRanges {
  block: string;
  ranges: readonly { start: number; length: number }[];
}

/** What arrived. Stream commands carry the stream offset of their record. */
export type DestinationEvent =
  | { type: 'listenStarted' }
  | { type: 'connectionAccepted' }
  | { type: 'returnPathOpened'; streamOffset: number }
  | { type: 'pingReceived'; streamOffset: number; value: number; livemigHello: boolean }
  | { type: 'postcopyAdviseReceived'; streamOffset: number; postcopyRam: boolean }
  | { type: 'discardReceived'; streamOffset: number; discard: DiscardRanges }
  | { type: 'listenReceived'; streamOffset: number }
  | { type: 'runReceived'; streamOffset: number }
  | { type: 'recvBitmapRequested'; streamOffset: number; block: string }
  | { type: 'resumeReceived'; streamOffset: number }
  | { type: 'eofReceived'; streamOffset: number }
  | { type: 'vmdescriptionReceived'; streamOffset: number }
  /**
   * Multifd: the main channel ended a RAM section. `channelsSynced`: every channel has already
   * delivered this section's SYNC (else the main channel waits for `multifdSynced`).
   */
  | { type: 'ramSectionEnded'; streamOffset: number; channelsSynced: boolean }
  /** Multifd: every channel delivered the SYNC of each RAM section ended so far. */
  | { type: 'multifdSynced' }
  /** The source half-closed the main connection; `error`: the decoder's verdict on where the stream stopped. */
  | { type: 'sourceEnded'; streamOffset: number; error?: MigrationError }
  | { type: 'channelLost'; error: MigrationError }
  /** The adapter's keepalive timer; `lastByteAtMs`: when the main channel last brought bytes. */
  | { type: 'keepaliveTicked'; lastByteAtMs: number }
  | { type: 'preemptAccepted' }
  /** The fault thread's connection broke, or the thread itself failed. */
  | { type: 'faultThreadEnded'; reason: string }
  /** QMP migrate-pause. */
  | { type: 'pauseRequested' }
  /**
   * QMP migrate-recover, once the recovery listener is up (the adapter first tries the step on
   * the current state, so a refused command opens no listener).
   */
  | { type: 'recoverRequested' }
  | { type: 'recoveryAccepted' }
  /** The adapter placed the last pages and started the guest (after a `finish` action). */
  | { type: 'loadFinished' }
  /** Decoding or loading failed (a coded error: ProtocolError, ConfigError, TransportError …). */
  | { type: 'loadFailed'; error: MigrationError };

export type DestinationEventType = DestinationEvent['type'];

export const DESTINATION_EVENT_TYPES = [
  'listenStarted',
  'connectionAccepted',
  'returnPathOpened',
  'pingReceived',
  'postcopyAdviseReceived',
  'discardReceived',
  'listenReceived',
  'runReceived',
  'recvBitmapRequested',
  'resumeReceived',
  'eofReceived',
  'vmdescriptionReceived',
  'ramSectionEnded',
  'multifdSynced',
  'sourceEnded',
  'channelLost',
  'keepaliveTicked',
  'preemptAccepted',
  'faultThreadEnded',
  'pauseRequested',
  'recoverRequested',
  'recoveryAccepted',
  'loadFinished',
  'loadFailed',
] as const satisfies readonly DestinationEventType[];

/** What the adapter must do, in order. */
export type DestinationAction =
  /** Send QMP's MIGRATION event (and, for a status change, report it in query-migrate). */
  | { type: 'emitStatus'; status: DestinationStatus }
  /** The main connection arrived: guest to inmigrate, RAM may now be written by the stream. */
  | { type: 'beginLoad' }
  | { type: 'sendPong'; value: number }
  | { type: 'sendShut'; shutStatus: 0 | 1 }
  | { type: 'sendRecvBitmap'; block: string; streamOffset: number }
  | { type: 'sendResumeAck' }
  /** livemig's return-path error report (a livemig source only). */
  | { type: 'sendErrorReport'; error: MigrationError }
  /** After a recovery: request again every page still awaited (in-flight requests died with the link). */
  | { type: 'rerequestAwaitedPages' }
  /** The first discard: everything precopy sent has arrived; the discards name what has not. */
  | { type: 'markPrecopyReceived' }
  | { type: 'discardPages'; discard: DiscardRanges; streamOffset: number }
  /** POSTCOPY_LISTEN: vCPUs fault on missing pages; faults go to `faults`; late pages never overwrite. */
  | { type: 'startPostcopyFaults'; faults: FaultPath; markPrecopyReceived: boolean }
  /** POSTCOPY_RUN: the guest runs here (if the source's did and no -S). */
  | { type: 'startGuestInPostcopy' }
  | { type: 'startKeepalive' }
  | { type: 'stopKeepalive' }
  /** Keep the accepted preempt connection unread until postcopy listens. */
  | { type: 'holdPreempt' }
  /** Read the (held or just accepted) preempt connection: on the main thread, or hand it to the fault thread. */
  | { type: 'takePreempt'; faults: FaultPath }
  /** Multifd: stop reading the main channel until the channels' SYNCs for this many RAM sections are in. */
  | { type: 'awaitMultifdSync'; ramSectionsEnded: number }
  | { type: 'resumeMainChannel' }
  /** The stream is complete: place the last pages (postcopy) or start the guest (precopy), then report loadFinished. */
  | { type: 'finish'; postcopy: boolean; awaitFaultThread: boolean }
  /** Postcopy link lost: close the main and preempt connections, the fault thread lets go; vCPUs keep waiting. */
  | { type: 'dropLink'; reason: MigrationError }
  /** Read the recovery connection: a stream without header, in the postcopy state we were in. */
  | { type: 'adoptRecoveryChannel' }
  | { type: 'complete' }
  /** Record the error for query-migrate, pause the guest, log it. */
  | { type: 'fail'; error: MigrationError }
  /** Close every connection and listener (a failure lets extra connections linger: see the adapter). */
  | { type: 'closeChannels'; failed: boolean };

export interface DestinationStep {
  state: DestinationState;
  actions: DestinationAction[];
}

export function initialDestinationState(config: DestinationConfig): DestinationState {
  return { status: 'none', config };
}

/** The status query-migrate reports: QEMU 7.2 stays `none` until the connection (it only sends the `setup` event). */
export function reportedStatus(state: DestinationState): DestinationStatus {
  return state.status === 'setup' ? 'none' : state.status;
}

/** Whether the adapter should go on decoding the main channel's buffered records. */
export function readsStream(state: DestinationState): boolean {
  switch (state.status) {
    case 'active':
    case 'postcopy-active':
    case 'postcopy-recover':
      return !state.finishing && !state.awaitingSync;
    default:
      return false;
  }
}

/** Whether postcopy listens: pages arriving now wake vCPUs, and no page overwrites one the guest has. */
export function postcopyListening(state: DestinationState): boolean {
  return state.status === 'postcopy-active' || state.status === 'postcopy-recover' || state.status === 'postcopy-paused';
}

/** Whether query-migrate shows the postcopy figures (QEMU: once postcopy was advised and began). */
export function showsPostcopyFigures(state: DestinationState): boolean {
  switch (state.status) {
    case 'active':
      return state.postcopyRamAdvised && state.postcopy === 'discarding';
    case 'postcopy-active':
    case 'postcopy-paused':
    case 'postcopy-recover':
      return true;
    case 'completed':
    case 'failed':
      return state.postcopyFigures;
    default:
      return false;
  }
}

/** Whether a livemig source is on the other end (it reads livemig's return-path extensions). */
export function peerIsLivemig(state: DestinationState): boolean {
  return 'peerIsLivemig' in state && state.peerIsLivemig;
}

/** Whether the return path is open (messages may be written on the main connection). */
export function returnPathOpen(state: DestinationState): boolean {
  return 'returnPath' in state && state.returnPath;
}

export function destinationStep(state: DestinationState, event: DestinationEvent, now: number): DestinationStep {
  const illegal = (): never => {
    throw new StateError(state.status, event.type);
  };
  const stay = (): DestinationStep => ({ state, actions: [] });

  switch (state.status) {
    // ---- before the stream ------------------------------------------------------------------
    case 'none':
      switch (event.type) {
        case 'listenStarted':
          return { state: { status: 'setup', config: state.config }, actions: [{ type: 'emitStatus', status: 'setup' }] };
        case 'pauseRequested':
          return refusePause(state);
        case 'recoverRequested':
          return refuseRecover(state);
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
        case 'pauseRequested':
          return refusePause(state);
        case 'recoverRequested':
          return refuseRecover(state);
        default:
          return illegal();
      }

    // ---- precopy --------------------------------------------------------------------------
    case 'active':
      switch (event.type) {
        case 'returnPathOpened':
          return { state: { ...state, returnPath: true }, actions: [] };
        case 'pingReceived':
          return ping(state, event);
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
          const faults: FaultPath = state.peerIsLivemig && state.config.preempt ? 'fault-thread' : 'main-thread';
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
        case 'eofReceived':
          return { state: { ...state, eofSeen: true }, actions: [] };
        case 'vmdescriptionReceived':
          return finishPrecopy(state);
        case 'ramSectionEnded':
          return awaitSync(state, event.channelsSynced);
        case 'multifdSynced':
          return synced(state, illegal);
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
        case 'pauseRequested':
          return refusePause(state);
        case 'recoverRequested':
          return refuseRecover(state);
        default:
          return illegal();
      }

    // ---- postcopy ---------------------------------------------------------------------------
    case 'postcopy-active':
    case 'postcopy-recover':
      switch (event.type) {
        case 'returnPathOpened':
          return { state: { ...state, returnPath: true }, actions: [] };
        case 'pingReceived':
          return ping(state, event);
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
        case 'ramSectionEnded':
          return awaitSync(state, event.channelsSynced);
        case 'multifdSynced':
          return synced(state, illegal);
        case 'sourceEnded':
          if (state.finishing) return stay();
          // A closed link is a pause, not the end (the final EOF ends it).
          return pause(state, TransportError.lost('main', `the source closed the connection at stream offset ${event.streamOffset}`));
        case 'channelLost':
          return state.finishing ? stay() : pause(state, event.error);
        case 'keepaliveTicked': {
          const lastByteAtMs = Math.max(state.lastByteAtMs, event.lastByteAtMs);
          const silentMs = now - lastByteAtMs;
          // A livemig source PINGs at least every 500 ms while postcopy runs; a QEMU source sends no keepalive.
          if (state.status === 'postcopy-active' && !state.finishing && state.peerIsLivemig && silentMs > KEEPALIVE_TIMEOUT_MS) {
            return pause(state, new TransportError(ErrorCode.PEER_SILENT, 'main', `no data from the source for ${Math.round(silentMs)} ms: link presumed broken`));
          }
          return lastByteAtMs === state.lastByteAtMs ? stay() : { state: { ...state, lastByteAtMs }, actions: [] };
        }
        case 'preemptAccepted':
          if (state.preempt !== 'none' || state.finishing) return illegal();
          return { state: { ...state, preempt: 'taken' }, actions: [{ type: 'takePreempt', faults: state.faults }] };
        case 'faultThreadEnded':
          // Only a thread that owns the preempt connection carries the link.
          if (state.finishing || state.faults !== 'fault-thread' || state.preempt !== 'taken') return stay();
          return pause(state, TransportError.lost('preempt', event.reason));
        case 'pauseRequested':
          if (state.finishing) return refusePause(state);
          return pause(state, TransportError.lost('main', 'paused by migrate-pause'));
        case 'recoverRequested':
          return refuseRecover(state);
        case 'loadFinished':
          if (!state.finishing) return illegal();
          return complete(state, true);
        case 'loadFailed':
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
        case 'pauseRequested':
          return refusePause(state);
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
        case 'pauseRequested':
          return refusePause(state);
        case 'recoverRequested':
          return refuseRecover(state);
        default:
          return illegal();
      }
  }
}

type StreamState = Extract<DestinationState, { status: 'active' | 'postcopy-active' | 'postcopy-recover' }>;

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
