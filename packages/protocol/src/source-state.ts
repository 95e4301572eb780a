// The source machine's vocabulary: its states (QEMU's statuses, each with the data valid in it),
// the events it takes, the actions it returns, and questions the adapter asks of a state. The
// transitions are in source-machine.ts, the outcomes they share in source-transitions.ts.

import { DEFAULT_STALL_TIMEOUT_MS } from './migration-config.ts';
import type { MigrationError } from './errors.ts';
import type { LivemigErrorReport } from './livemig-ext.ts';
import type { MigrationStatus } from './migration-config.ts';

/** What every state knows: fixed at the start, or learnt once. */
export interface SourceCommon {
  /** Capability return-path or postcopy-ram: the destination answers on the main channel. */
  readonly returnPath: boolean;
  /** The guest ran when the migration started: a failure before postcopy runs it again. */
  readonly guestWasRunning: boolean;
  /** RAM blocks (names and byte lengths), to check page requests and recovery bitmaps. */
  readonly blocks: readonly { readonly idstr: string; readonly length: number }[];
  /** migrate-start-postcopy was asked for. */
  readonly postcopyRequested: boolean;
  /** The destination's own report of why it failed (livemig peers send it before SHUT). */
  readonly destinationReport: LivemigErrorReport | undefined;
  /** When the destination answered PING 4, sent right after POSTCOPY_RUN (the end of postcopy's downtime). */
  readonly runConfirmedAt: number | undefined;
  /** x-livemig-stall-timeout: setup and precopy fail after this long without progress (ms). */
  readonly stallTimeoutMs: number;
  /** Mode cpr-exec: once the state is saved, this process execs its new image (no return path). */
  readonly execAfterSave: boolean;
  /** Capability pause-before-switchover: the stopped guest waits in pre-switchover for migrate-continue. */
  readonly pauseBeforeSwitchover: boolean;
  /** Capability switchover-ack: a running guest is not switched over before the destination's SWITCHOVER_ACK. */
  readonly switchoverAck: boolean;
  /** SWITCHOVER_ACK arrived (the destination has loaded every device's initial data). */
  readonly switchoverAcked: boolean;
}

/** Statuses in which the migration is still under way. */
export type RunningStatus = 'setup' | 'active' | 'pre-switchover' | 'device' | 'postcopy-active' | 'postcopy-paused' | 'postcopy-recover';

export type SourceState =
  | (SourceCommon & { readonly status: 'setup' })
  /**
   * Precopy: iterating, then the guest stopped (stop-copy), then waiting for the destination's SHUT;
   * or, with cpr-exec, the state saved and the exec under way (`faulted` if it fails).
   */
  | (SourceCommon & { readonly status: 'active'; readonly phase: 'iterating' | 'stop-copy' | 'awaiting-shut' | 'exec-pending' })
  /**
   * pause-before-switchover: the guest is stopped, nothing more is sent until migrate-continue.
   * `then`: where the switchover goes; `continued`: postcopy's continue came (the status stays
   * until postcopy starts, as QEMU 7.2 goes straight from pre-switchover to postcopy-active).
   */
  | (SourceCommon & { readonly status: 'pre-switchover'; readonly then: 'device' | 'postcopy'; readonly continued: boolean })
  /** After migrate-continue (QEMU 7.2 reports `device` only then): the final device state, then SHUT. */
  | (SourceCommon & { readonly status: 'device'; readonly phase: 'stop-copy' | 'awaiting-shut' })
  /** `ending`: END, EOF sent; waiting for SHUT. `lastHeardAt`: the return path's last byte (keepalive). */
  | (SourceCommon & { readonly status: 'postcopy-active'; readonly lastHeardAt: number; readonly ending: boolean })
  | (SourceCommon & { readonly status: 'postcopy-paused'; readonly reason: MigrationError })
  /** A new channel: RECV_BITMAP asked for every block, these still to come; then RESUME, RESUME_ACK. */
  | (SourceCommon & { readonly status: 'postcopy-recover'; readonly lastHeardAt: number; readonly bitmapsAwaited: readonly string[] })
  /**
   * A failure being wrapped up. `reasonUntil`: waiting until then for the destination's reason
   * (the channels stay open to read it); undefined once the guest is being restored.
   */
  | (SourceCommon & {
      readonly status: 'failing';
      readonly from: RunningStatus;
      readonly error: MigrationError;
      readonly shutStatus: number | undefined;
      readonly reasonUntil: number | undefined;
    })
  | (SourceCommon & { readonly status: 'cancelling'; readonly postcopyStarted: boolean })
  | (SourceCommon & { readonly status: 'completed' })
  | (SourceCommon & { readonly status: 'cancelled' })
  | (SourceCommon & { readonly status: 'failed'; readonly error: MigrationError });

export type SourceStatus = SourceState['status'];

/** Every status, for tests and the diagram. */
export const SOURCE_STATUSES = [
  'setup',
  'active',
  'pre-switchover',
  'device',
  'postcopy-active',
  'postcopy-paused',
  'postcopy-recover',
  'failing',
  'cancelling',
  'completed',
  'cancelled',
  'failed',
] as const satisfies readonly SourceStatus[];

export type SourceEvent =
  // the migration thread
  | { readonly type: 'setupSent' }
  /** The guest stopped for the switchover; `postcopy`: postcopy follows rather than precopy's end. */
  | { readonly type: 'switchoverStarted'; readonly postcopy: boolean }
  | { readonly type: 'finalStateSent' }
  | { readonly type: 'postcopyStarted' }
  | { readonly type: 'postcopyStreamEnded' }
  /** Anything that went wrong on our side or with a channel (a write failed, a connection closed …). */
  | { readonly type: 'faulted'; readonly error: MigrationError }
  // the return path
  | { readonly type: 'returnPathHeard' }
  | { readonly type: 'shutReceived'; readonly status: number }
  | { readonly type: 'pongReceived'; readonly value: number }
  | { readonly type: 'destinationReported'; readonly report: LivemigErrorReport }
  | { readonly type: 'pageRequested'; readonly block: string; readonly start: number; readonly length: number }
  | { readonly type: 'recvBitmapReceived'; readonly block: string; readonly bitmap: Uint8Array }
  | { readonly type: 'resumeAckReceived' }
  | { readonly type: 'switchoverAckReceived' }
  // QMP
  | { readonly type: 'postcopyRequested' }
  | { readonly type: 'cancelRequested' }
  | { readonly type: 'pauseRequested' }
  | { readonly type: 'resumeRequested' }
  /** migrate-continue: `state` is the status the client expects the migration to be in. */
  | { readonly type: 'continueRequested'; readonly state: string }
  // timers and the adapter's own completions
  /**
   * The keepalive timer (every KEEPALIVE_INTERVAL_MS, from the start). `lastProgressAt`: the
   * adapter's last sign of a live link, a return-path byte or bytes the kernel took on a
   * migration connection (precopy's stall deadline; postcopy counts return-path bytes only).
   */
  | { readonly type: 'keepaliveTicked'; readonly lastProgressAt: number }
  | { readonly type: 'reasonTimerFired' }
  | { readonly type: 'guestRestored' };

export type SourceEventType = SourceEvent['type'];

/** Every event type, for tests: the exhaustive (status, event) table is checked against it. */
export const SOURCE_EVENT_TYPES = [
  'setupSent',
  'switchoverStarted',
  'finalStateSent',
  'postcopyStarted',
  'postcopyStreamEnded',
  'faulted',
  'returnPathHeard',
  'shutReceived',
  'pongReceived',
  'destinationReported',
  'pageRequested',
  'recvBitmapReceived',
  'resumeAckReceived',
  'switchoverAckReceived',
  'postcopyRequested',
  'cancelRequested',
  'pauseRequested',
  'resumeRequested',
  'continueRequested',
  'keepaliveTicked',
  'reasonTimerFired',
  'guestRestored',
] as const satisfies readonly SourceEventType[];

// Both lists are complete: a status or event type missing from them does not compile.
type Missing<All, Listed> = Exclude<All, Listed> extends never ? true : never;
export const SOURCE_LISTS_COMPLETE: Missing<SourceStatus, (typeof SOURCE_STATUSES)[number]> & Missing<SourceEventType, (typeof SOURCE_EVENT_TYPES)[number]> = true;

export type SourceAction =
  /** Tell QMP (MIGRATION event) and the log: the status query-migrate now reports. */
  | { readonly type: 'emitStatus'; readonly status: MigrationStatus }
  /** Close every migration connection (main, preempt, multifd); the migration thread stops at its next write. */
  | { readonly type: 'closeChannels' }
  /** Call `reasonTimerFired` after `ms`. */
  | { readonly type: 'startReasonTimer'; readonly ms: number }
  /** Run `keepaliveTicked` every KEEPALIVE_INTERVAL_MS until stopKeepalive (the adapter starts it with the migration too). */
  | { readonly type: 'startKeepalive' }
  | { readonly type: 'stopKeepalive' }
  /** A keepalive PING is due on the main channel (at the next section boundary). */
  | { readonly type: 'sendKeepalivePing' }
  /** The source guest after a failure or cancel: `run` it again, or leave it paused; answer guestRestored. */
  | { readonly type: 'restoreGuest'; readonly run: boolean }
  /** Queue these pages (block index, first page, page count) ahead of background pages. */
  | { readonly type: 'servePages'; readonly blockIndex: number; readonly firstPage: number; readonly pageCount: number }
  /** Recovery over the new channel: ask for the received bitmap of these blocks. */
  | { readonly type: 'requestReceivedBitmaps'; readonly blocks: readonly string[] }
  /** Recovery: this block's received bitmap (just read) says what to send again. */
  | { readonly type: 'applyReceivedBitmap'; readonly block: string; readonly bitmap: Uint8Array }
  /** Recovery: every bitmap is in; send POSTCOPY_RESUME. */
  | { readonly type: 'sendPostcopyResume' }
  /** Postcopy runs (again): requested pages go through the page server, at postcopy's bandwidth. */
  | { readonly type: 'startPostcopyPaging' }
  /** The link broke or was paused: the page server lets go of its connection. */
  | { readonly type: 'stopPostcopyPaging' }
  /** A final state (before it is announced): free what the migration holds, settle the figures. */
  | { readonly type: 'cleanUp' }
  /** cpr-exec: the state is saved; replace this process's image (on failure, report `faulted`). */
  | { readonly type: 'execNewImage' };

export interface SourceTransition {
  readonly state: SourceState;
  readonly actions: readonly SourceAction[];
}

/** The state a migration starts in, once its channel is connected. */
export function initialSourceState(options: {
  returnPath: boolean;
  guestWasRunning: boolean;
  blocks: readonly { idstr: string; length: number }[];
  postcopyRequested?: boolean;
  stallTimeoutMs?: number;
  execAfterSave?: boolean;
  pauseBeforeSwitchover?: boolean;
  switchoverAck?: boolean;
}): SourceState {
  return {
    status: 'setup',
    returnPath: options.returnPath,
    guestWasRunning: options.guestWasRunning,
    blocks: options.blocks.map((b) => ({ idstr: b.idstr, length: b.length })),
    postcopyRequested: options.postcopyRequested ?? false,
    destinationReport: undefined,
    runConfirmedAt: undefined,
    stallTimeoutMs: options.stallTimeoutMs ?? DEFAULT_STALL_TIMEOUT_MS,
    execAfterSave: options.execAfterSave ?? false,
    pauseBeforeSwitchover: options.pauseBeforeSwitchover ?? false,
    switchoverAck: options.switchoverAck ?? false,
    switchoverAcked: false,
  };
}

/**
 * Whether the migration thread may switch over now (QEMU's migration_can_switchover): without
 * switchover-ack always; with it once SWITCHOVER_ACK came, or when the guest is not running
 * (nothing is gained by waiting then).
 */
export function maySwitchOver(state: SourceState, guestRunning: boolean): boolean {
  return !state.switchoverAck || state.switchoverAcked || !guestRunning;
}

/** What query-migrate and MIGRATION events call a state (`failing` shows the status it failed from). */
export function sourceReportedStatus(state: SourceState): MigrationStatus {
  return state.status === 'failing' ? state.from : state.status;
}

/** Whether the migration has ended (completed, failed or cancelled). */
export function isSourceFinal(state: SourceState): boolean {
  return state.status === 'completed' || state.status === 'failed' || state.status === 'cancelled';
}
