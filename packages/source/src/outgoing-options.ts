// What an outgoing migration is given and what it reports: its options, the events and log it
// writes to, and query-migrate's RAM figures (the types; migration.ts does the work).

import type { Duplex } from 'node:stream';
import type { Capabilities, ConvergenceDecision, MigrationParameters, MigrationStatus as QmpMigrationStatus, StreamDialect } from '@livemig/protocol';
import type { Guest } from '@livemig/guest';

/** The statuses a livemig source reports (QEMU's names). */
export type MigrationStatus = Extract<
  QmpMigrationStatus,
  'none' | 'setup' | 'active' | 'pre-switchover' | 'device' | 'postcopy-active' | 'postcopy-paused' | 'postcopy-recover' | 'cancelling' | 'cancelled' | 'completed' | 'failed'
>;

export interface MigrationEvents {
  status(status: MigrationStatus): void;
  pass(pass: number): void;
  stop(): void;
  resume(): void;
  /** auto-converge set the vCPU throttle to `percent` (a convergence decision). */
  throttled?(percent: number): void;
  /** The convergence policy decided (before it is carried out): QMP event, timeline, settings. */
  convergence?(decision: ConvergenceDecision): void;
}

export interface MigrationLog {
  info(obj: object, msg?: string): void;
  warn(obj: object, msg?: string): void;
  debug(obj: object, msg?: string): void;
}

export interface OutgoingOptions {
  guest: Guest;
  capabilities: Capabilities;
  parameters: MigrationParameters;
  /** The connected channel. */
  channel: Duplex;
  /** With postcopy-preempt in QEMU 7.2's setup: a second connection, opened with the main one, that carries only requested pages. */
  preempt?: Duplex;
  /**
   * With postcopy-preempt in the 8.0 setup (`dialect.preemptSetup`): how to open that connection,
   * which happens at the switch to postcopy and on each recovery before POSTCOPY_RESUME.
   */
  connectPreempt?: () => Promise<Duplex>;
  /** With multifd: the multifd channels (connected after the main one), in channel-id order. */
  multifd?: readonly Duplex[];
  /** The multifd channels' init packets were written as each was connected. */
  multifdInitSent?: boolean;
  /** Machine type sent in the configuration record. */
  machineType: string;
  /** What the stream looks like for that machine type (default: as QEMU 7.2 writes it). */
  dialect?: StreamDialect;
  /** --uuid: with capability validate-uuid, sent as configuration/uuid (QEMU's vmstate_uuid_needed). */
  uuid?: string;
  /** The page server thread under SCHED_FIFO (--realtime-postcopy). */
  realtimePostcopy?: boolean;
  /** migrate-start-postcopy came while the channel was still connecting. */
  postcopyRequested?: boolean;
  /**
   * Mode cpr-exec: RAM is not sent (it stays in shared memory) and, once the state is written,
   * `exec` replaces this process's image; it returns only by throwing why it could not.
   */
  cprExec?: { exec(): never };
  events: MigrationEvents;
  log: MigrationLog;
  now?: () => number;
  /**
   * When `migrate` was issued (on `now`'s clock), before the channels were connected: total-time
   * counts from here, as QEMU's does (migrate_init). Default: when this object is made.
   */
  requestedAt?: number;
}

export interface MigrationInfoRam {
  transferred: number;
  remaining: number;
  total: number;
  duplicate: number;
  skipped: number;
  normal: number;
  'normal-bytes': number;
  'dirty-pages-rate': number;
  mbps: number;
  'dirty-sync-count': number;
  'postcopy-requests': number;
  /** livemig: page requests a livemig destination made on the preempt channel (part of postcopy-requests). */
  'x-postcopy-preempt-requests': number;
  'page-size': number;
  'multifd-bytes': number;
  'pages-per-second': number;
  'precopy-bytes': number;
  'downtime-bytes': number;
  'postcopy-bytes': number;
  'dirty-sync-missed-zero-copy': number;
}
