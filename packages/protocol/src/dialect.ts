// What a stream looks like for a given QEMU version and machine type: QEMU keeps old machine
// types migratable by switching stream features off per machine type (its hw_compat_X_Y tables
// of "migration" properties). The same facts, as data:
//
//   feature                         on from machine type   QEMU property (off/legacy before)
//   configuration record, footers   2.4                    send-configuration, send-section-footer
//   postcopy-preempt, 8.0 setup     8.0                    x-preempt-pre-7-2
//   multifd flush once per round    8.1                    multifd-flush-after-each-section
//   zero pages inside multifd       9.0                    zero-page-detection=legacy
//   MIG_CMD_SWITCHOVER_START        10.0                   send-switchover-start
//
// A machine type without a version (none, pc, q35, isapc, microvm, livemig-pc) speaks the dialect
// of the QEMU that runs it; for livemig that is the QEMU version it is told to be (default 7.2).

import { ErrorCode, MigrationError } from './errors.ts';

export interface QemuVersion {
  major: number;
  minor: number;
}

export type MultifdFlush = 'per-section' | 'per-round';

export interface StreamDialect {
  /** The version whose defaults apply: the machine type's, or the QEMU's for an unversioned type. */
  version: QemuVersion;
  /** A configuration record after the header (QEMU's send-configuration). */
  configuration: boolean;
  /** Each section ends in a footer (send-section-footer). */
  sectionFooters: boolean;
  /** Multifd pages are synced at each RAM section's end, or once per scan of RAM with RAM_SAVE_FLAG_MULTIFD_FLUSH. */
  multifdFlush: MultifdFlush;
  /** With multifd, zero pages travel inside the multifd packets (zero-page-detection=multifd), not as ZERO records. */
  multifdZeroPages: boolean;
  /** MIG_CMD_SWITCHOVER_START before the final state (send-switchover-start). */
  switchoverStart: boolean;
  /**
   * The postcopy-preempt channel is set up as QEMU 7.2 did it (opened with the main channel and
   * right after a recovery's, EOS at the end), or as 8.0 and later do (opened at the switch to
   * postcopy and, on recovery, after the received bitmaps). A livemig source follows it; a
   * livemig destination takes either.
   */
  preemptSetup: '7.2' | '8.0';
}

/** The QEMU version livemig speaks as, unless told otherwise. */
export const DEFAULT_QEMU_VERSION: QemuVersion = { major: 7, minor: 2 };

/** QEMU versions whose dialects are known here, oldest first. */
export const KNOWN_QEMU_VERSIONS: readonly QemuVersion[] = [
  { major: 7, minor: 2 },
  { major: 10, minor: 0 },
];

const atLeast = (v: QemuVersion, major: number, minor: number): boolean => v.major > major || (v.major === major && v.minor >= minor);

/** "10.0" → {10, 0}; throws INVALID_ARGUMENT with what was wrong. */
export function parseQemuVersion(text: string): QemuVersion {
  const m = /^(\d{1,2})\.(\d{1,2})(?:\.\d+)?$/.exec(text.trim());
  if (m === null) throw new MigrationError(ErrorCode.INVALID_ARGUMENT, `QEMU version "${text}" is not MAJOR.MINOR (e.g. 7.2 or 10.0)`);
  const v = { major: Number(m[1]), minor: Number(m[2]) };
  if (!KNOWN_QEMU_VERSIONS.some((k) => k.major === v.major && k.minor === v.minor)) {
    throw new MigrationError(ErrorCode.INVALID_ARGUMENT, `QEMU version ${formatQemuVersion(v)} is not one livemig speaks (${KNOWN_QEMU_VERSIONS.map(formatQemuVersion).join(', ')})`);
  }
  return v;
}

export function formatQemuVersion(v: QemuVersion): string {
  return `${v.major}.${v.minor}`;
}

/**
 * The version in a versioned machine type ("pc-q35-10.0", "pc-i440fx-2.3", "pc-1.3",
 * "xenfv-4.2"), or undefined for an unversioned one ("none", "pc", "q35", "livemig-pc").
 */
export function machineTypeVersion(machineType: string): QemuVersion | undefined {
  const m = /-(\d{1,2})\.(\d{1,2})$/.exec(machineType);
  if (m === null) return undefined;
  return { major: Number(m[1]), minor: Number(m[2]) };
}

/** The dialect of `machineType` as QEMU `qemu` writes and expects it. */
export function streamDialect(machineType: string, qemu: QemuVersion = DEFAULT_QEMU_VERSION): StreamDialect {
  const version = machineTypeVersion(machineType) ?? qemu;
  // A machine type newer than the QEMU named can only be run by a QEMU at least that new.
  const runner = atLeast(version, qemu.major, qemu.minor) ? version : qemu;
  return {
    version,
    configuration: atLeast(version, 2, 4),
    sectionFooters: atLeast(version, 2, 4),
    multifdFlush: atLeast(version, 8, 1) ? 'per-round' : 'per-section',
    multifdZeroPages: atLeast(version, 9, 0),
    switchoverStart: atLeast(version, 10, 0),
    // A QEMU 7.2 only knows its own setup; newer ones keep it for machine types up to 7.2.
    preemptSetup: atLeast(runner, 8, 0) && atLeast(version, 8, 0) ? '8.0' : '7.2',
  };
}
