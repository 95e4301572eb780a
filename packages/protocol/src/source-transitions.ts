// The outcomes sourceStep's cases share: completing, pausing postcopy, failing (waiting for the
// destination's reason, then giving the source guest back) and precopy's stall check on a
// keepalive tick. Pure like the machine: time comes in as `now`.

import {
  DestinationFailedError,
  ErrorCode,
  type MigrationError,
  StateError,
  TransportError,
} from './errors.ts';
import { type SourceCommon, type SourceState, type SourceTransition, sourceReportedStatus } from './source-state.ts';

/** How long a failure on a broken connection waits for the destination's reason on the return path. */
export const DESTINATION_REASON_WAIT_MS = 500;

/** Whether postcopy has begun: the destination owns the guest, the source never runs it again. */
export function postcopyBegun(s: SourceState): boolean {
  return s.status === 'postcopy-active' || s.status === 'postcopy-paused' || s.status === 'postcopy-recover';
}

/** No change of state, nothing to do. */
export const same = (state: SourceState): SourceTransition => ({ state, actions: [] });

/** The fields every variant shares, without the variant's own. */
export function common(s: SourceState): SourceCommon {
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
export function precopyTicked(s: SourceState & { status: 'setup' | 'active' | 'pre-switchover' | 'device' }, lastProgressAt: number, now: number): SourceTransition {
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

export function complete(s: SourceState): SourceTransition {
  return {
    state: { ...common(s), status: 'completed' },
    actions: [{ type: 'stopKeepalive' }, { type: 'closeChannels' }, { type: 'cleanUp' }, { type: 'emitStatus', status: 'completed' }],
  };
}

/** Postcopy: a broken or paused link waits for `migrate resume=true` (the destination guest runs on). */
export function pause(s: SourceState & { status: 'postcopy-active' | 'postcopy-recover' }, reason: MigrationError): SourceTransition {
  return {
    state: { ...common(s), status: 'postcopy-paused', reason },
    actions: [{ type: 'stopPostcopyPaging' }, { type: 'closeChannels' }, { type: 'emitStatus', status: 'postcopy-paused' }],
  };
}

/** A destination's reset often outruns its reason, which it wrote on the return path first. */
function mayHaveReasonComing(s: SourceState, error: MigrationError): boolean {
  if (!s.returnPath || s.destinationReport !== undefined) return false;
  // Only another channel's loss: once the return path itself has ended, nothing more can come on it.
  if (error.code !== ErrorCode.CHANNEL_LOST || returnPathLost(error)) return false;
  const errno = (error as TransportError).errno;
  return errno === 'ECONNRESET' || errno === 'EPIPE' || errno === undefined;
}

/**
 * The return path's own loss. Matched by code, not instanceof (a class may be loaded twice): the
 * fields are TransportError's.
 */
function returnPathLost(error: MigrationError): boolean {
  return error.code === ErrorCode.CHANNEL_LOST && (error as TransportError).channel === 'return-path';
}

export function faulted(s: SourceState, error: MigrationError, now: number): SourceTransition {
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
      // The reason can no longer come: the return path broke too. Other connections breaking
      // (every multifd channel gets its EPIPE as the destination goes) say nothing of it.
      if (s.reasonUntil !== undefined && (returnPathLost(error) || error.code === ErrorCode.PEER_SILENT)) return restore(s);
      return same(s);
    default:
      // Paused already, or ending: a late failure of a connection we closed.
      return same(s);
  }
}

export function shutReceived(s: SourceState, shutStatus: number, now: number): SourceTransition {
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
export function restore(s: SourceState & { status: 'failing' }): SourceTransition {
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
export function failureOf(s: SourceState & { status: 'failing' }): MigrationError {
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
