// The destination machine's vocabulary: its states (QEMU's statuses, each with the data valid in
// it), the events it takes, the actions it returns, and questions the adapter asks of a state.
// The transitions are in destination-machine.ts.

import type { MigrationError } from './errors.ts';

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
  /** Capability switchover-ack (QEMU 8.1+): SWITCHOVER_ACK goes to the source once every device that asks has its initial data. */
  switchoverAck?: boolean;
  /** Devices that ask for the ack (QEMU's switchover_ack_needed: a VFIO device with precopy). */
  ackDevices?: number;
  /**
   * False when the fault thread cannot read the preempt channel (TLS: only the main thread's TLS
   * socket can decrypt it), so postcopy's fault path stays on the main thread. Default true.
   */
  faultThread?: boolean;
}

/** Where the postcopy fault path runs: the main thread's event loop, or the fault thread (a livemig source with preempt). */
export type FaultPath = 'main-thread' | 'fault-thread';
/** A preempt connection: none yet, accepted but held until postcopy listens, or in use. */
export type PreemptChannel = 'none' | 'held' | 'taken';

/** What is known while the main channel is read (active, postcopy-active, postcopy-recover). */
export interface DestinationStream {
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
export interface DestinationPostcopy extends DestinationStream {
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
  | (DestinationStream & {
      status: 'active';
      /** QEMU's postcopy incoming state before LISTEN. */
      postcopy: 'none' | 'advised' | 'discarding';
      /** ADVISE carried page sizes (the source has postcopy-ram): query-migrate shows postcopy figures. */
      postcopyRamAdvised: boolean;
      /** EOF seen (precopy ends at VMDESCRIPTION or at the source's end of stream). */
      eofSeen: boolean;
      /** The stall deadline's baseline: the later of the last byte and the connection (ms). */
      lastByteAtMs: number;
      /** switchover-ack: devices whose initial data has still to load (the ack goes out at 0, once). */
      acksPending: number;
      /** SWITCHOVER_ACK was sent. */
      switchoverAcked: boolean;
    })
  | (DestinationPostcopy & { status: 'postcopy-active' })
  | (DestinationPostcopy & { status: 'postcopy-recover' })
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
  /**
   * migrate-set-capabilities / -parameters before the stream: the new settings. The adapter
   * refuses them itself once a connection has brought its first byte (still `setup` here).
   */
  | { type: 'configured'; config: DestinationConfig }
  | { type: 'listenStarted' }
  | { type: 'connectionAccepted' }
  | { type: 'returnPathOpened'; streamOffset: number }
  | { type: 'pingReceived'; streamOffset: number; value: number; livemigHello: boolean }
  /** A device's marker that its initial data is all sent (VFIO's INIT_DATA_SENT), loaded. */
  | { type: 'initDataLoaded'; streamOffset: number; idstr: string }
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
  'configured',
  'listenStarted',
  'connectionAccepted',
  'returnPathOpened',
  'pingReceived',
  'initDataLoaded',
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
  /** switchover-ack: the source may switch over as far as this side's devices go. */
  | { type: 'sendSwitchoverAck' }
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
