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
import { DEFAULT_STALL_TIMEOUT_MS } from './migration-config.ts';
import {
  DestinationFailedError,
  ErrorCode,
  type MigrationError,
  ProtocolError,
  StateError,
  TransportError,
} from './errors.ts';
import type { LivemigErrorReport } from './livemig-ext.ts';
import type { MigrationStatus } from './migration-config.ts';

/** How long a failure on a broken connection waits for the destination's reason on the return path. */
export const DESTINATION_REASON_WAIT_MS = 500;

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

/** Whether postcopy has begun: the destination owns the guest, the source never runs it again. */
function postcopyBegun(s: SourceState): boolean {
  return s.status === 'postcopy-active' || s.status === 'postcopy-paused' || s.status === 'postcopy-recover';
}

const PAGE_SIZE = 4096;
const same = (state: SourceState): SourceTransition => ({ state, actions: [] });

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

/** The fields every variant shares, without the variant's own. */
function common(s: SourceState): SourceCommon {
  return {
    returnPath: s.returnPath,
    guestWasRunning: s.guestWasRunning,
    blocks: s.blocks,
    postcopyRequested: s.postcopyRequested,
    destinationReport: s.destinationReport,
    runConfirmedAt: s.runConfirmedAt,
    stallTimeoutMs: s.stallTimeoutMs,
    execAfterSave: s.execAfterSave,
    pauseBeforeSwitchover: s.pauseBeforeSwitchover,
    switchoverAck: s.switchoverAck,
    switchoverAcked: s.switchoverAcked,
  };
}

/**
 * Setup and precopy: no progress for stallTimeoutMs fails the migration (the source guest runs
 * again, even in stop-copy). With a return path, a PING goes out at the next section boundary
 * while iterating: its PONG (a QEMU destination echoes it too) proves the link end to end when
 * the kernel could still be taking bytes into its buffers. Never in stop-copy (the RAM END
 * section cannot be split) nor after EOF (a destination reads nothing after it).
 */
function precopyTicked(s: SourceState & { status: 'setup' | 'active' | 'pre-switchover' | 'device' }, lastProgressAt: number, now: number): SourceTransition {
  // The state is saved and the exec is under way: no link left to stall.
  if (s.status === 'active' && s.phase === 'exec-pending') return same(s);
  // Held for the client: nothing is sent, so silence is expected unless PINGs can prove the link.
  if (s.status === 'pre-switchover' && !s.returnPath) return same(s);
  const silentMs = now - lastProgressAt;
  if (silentMs > s.stallTimeoutMs) {
    const where = s.status === 'active' || s.status === 'device' ? s.phase : s.status;
    const channel = s.returnPath ? 'return-path' : 'main';
    const heard = s.returnPath ? 'nothing on the return path and no bytes taken by the link' : 'no bytes taken by the link';
    return faulted(
      s,
      new TransportError(ErrorCode.PEER_SILENT, channel, `${heard} for ${Math.round(silentMs)} ms during ${where} (x-livemig-stall-timeout ${s.stallTimeoutMs} ms): link presumed broken`),
      now,
    );
  }
  // pre-switchover: between sections, so the PING can go (its PONG keeps both ends' deadlines).
  if (s.returnPath && ((s.status === 'active' && s.phase === 'iterating') || s.status === 'pre-switchover')) return { state: s, actions: [{ type: 'sendKeepalivePing' }] };
  return same(s);
}

function complete(s: SourceState): SourceTransition {
  return {
    state: { ...common(s), status: 'completed' },
    actions: [{ type: 'stopKeepalive' }, { type: 'closeChannels' }, { type: 'cleanUp' }, { type: 'emitStatus', status: 'completed' }],
  };
}

/** Postcopy: a broken or paused link waits for `migrate resume=true` (the destination guest runs on). */
function pause(s: SourceState & { status: 'postcopy-active' | 'postcopy-recover' }, reason: MigrationError): SourceTransition {
  return {
    state: { ...common(s), status: 'postcopy-paused', reason },
    actions: [{ type: 'stopPostcopyPaging' }, { type: 'closeChannels' }, { type: 'emitStatus', status: 'postcopy-paused' }],
  };
}

/** A destination's reset often outruns its reason, which it wrote on the return path first. */
function mayHaveReasonComing(s: SourceState, error: MigrationError): boolean {
  if (!s.returnPath || s.destinationReport !== undefined) return false;
  if (error.code !== ErrorCode.CHANNEL_LOST) return false;
  // Matched by code, not instanceof (a class may be loaded twice): the fields are TransportError's.
  const e = error as TransportError;
  // The return path itself has ended: nothing more can come on it.
  if (e.channel === 'return-path') return false;
  return e.errno === 'ECONNRESET' || e.errno === 'EPIPE' || e.errno === undefined;
}

function faulted(s: SourceState, error: MigrationError, now: number): SourceTransition {
  switch (s.status) {
    case 'postcopy-active':
    case 'postcopy-recover':
      return pause(s, error);
    case 'setup':
    case 'active':
    case 'pre-switchover':
    case 'device': {
      const failing = { ...common(s), status: 'failing' as const, from: s.status, error, shutStatus: undefined, reasonUntil: undefined };
      if (mayHaveReasonComing(s, error)) {
        const reasonUntil = now + DESTINATION_REASON_WAIT_MS;
        return { state: { ...failing, reasonUntil }, actions: [{ type: 'startReasonTimer', ms: DESTINATION_REASON_WAIT_MS }] };
      }
      return restore(failing);
    }
    case 'failing':
      // The reason can no longer come (the return path broke too).
      if (s.reasonUntil !== undefined && (error.code === ErrorCode.CHANNEL_LOST || error.code === ErrorCode.PEER_SILENT)) return restore(s);
      return same(s);
    default:
      // Paused already, or ending: a late failure of a connection we closed.
      return same(s);
  }
}

function shutReceived(s: SourceState, shutStatus: number, now: number): SourceTransition {
  if (shutStatus === 0) {
    if (((s.status === 'active' || s.status === 'device') && s.phase === 'awaiting-shut') || (s.status === 'postcopy-active' && s.ending)) return complete(s);
    throw new StateError(sourceReportedStatus(s), 'shutReceived', `the destination sent SHUT(0) while the migration is ${sourceReportedStatus(s)}`);
  }
  switch (s.status) {
    case 'setup':
    case 'active':
    case 'pre-switchover':
    case 'device':
    case 'postcopy-active':
    case 'postcopy-recover':
      // The destination failed; its report (if any) came before SHUT.
      return restore({
        ...common(s),
        status: 'failing',
        from: s.status,
        error: new DestinationFailedError(`destination failed: it reported status ${shutStatus} on the return path`, { shutStatus }),
        shutStatus,
        reasonUntil: now,
      });
    case 'failing':
      return s.reasonUntil === undefined ? same({ ...s, shutStatus }) : restore({ ...s, shutStatus });
    default:
      return same(s);
  }
}

/** Stop waiting for a reason: close the connections and give the source guest back. */
function restore(s: SourceState & { status: 'failing' }): SourceTransition {
  const fromPostcopy = s.from === 'postcopy-active' || s.from === 'postcopy-paused' || s.from === 'postcopy-recover';
  return {
    state: { ...s, reasonUntil: undefined },
    actions: [
      { type: 'stopKeepalive' },
      { type: 'stopPostcopyPaging' },
      { type: 'closeChannels' },
      { type: 'restoreGuest', run: s.guestWasRunning && !fromPostcopy },
    ],
  };
}

/** The error a failed migration reports: the destination's own reason when it gave one. */
function failureOf(s: SourceState & { status: 'failing' }): MigrationError {
  const d = s.destinationReport;
  if (d !== undefined) {
    return new DestinationFailedError(`destination failed: ${d.message}${d.code !== undefined ? ` [${d.code}]` : ''}`, {
      remoteCode: d.code,
      ...(d.offset === undefined ? {} : { remoteOffset: d.offset }),
      ...(s.shutStatus === undefined ? {} : { shutStatus: s.shutStatus }),
    });
  }
  if (s.shutStatus !== undefined && s.shutStatus !== 0) {
    return new DestinationFailedError(`destination failed: it reported status ${s.shutStatus} on the return path`, { shutStatus: s.shutStatus });
  }
  return s.error;
}
