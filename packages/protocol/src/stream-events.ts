// What a StreamDecoder reports (wire-format.md §§2–6, 10): its events, the section and
// configuration records they carry, and its options.

import type { CommandInfo } from './command.ts';
import type { PostcopyStateValue, SectionKind } from './constants.ts';
import type { PagePlacer } from './page-runs.ts';
import type { RamBlockInfo } from './ram.ts';
import type { MultifdFlushEvent, RamBlocksEvent, RamSectionStats, RamTarget } from './ram-record-decoder.ts';
import type { VfioSectionSummary } from './vfio-framing.ts';
import type { VmdescVmsd } from './vmdesc.ts';

export interface SectionIdentity {
  sectionId: number;
  idstr: string;
  instanceId: number;
  versionId: number;
}

export interface SectionRecord extends SectionIdentity {
  sectionKind: SectionKind;
  /** Offset of the type byte. */
  offset: number;
  dataOffset: number;
  dataLength: number;
  /** Offset of the footer, or -1 when the stream has no footers. */
  footerOffset: number;
  /** Offset after the footer. */
  end: number;
  depth: number;
  /** RAM sections: record counts. */
  ram?: RamSectionStats;
  /** Device sections: a copy of the data (lent, with lendDeviceData). */
  data?: Buffer;
  /** How a device section's length was found ('vfio-framing': by its VFIO markers). */
  layout?: 'declared' | 'footer-scan' | 'vfio-framing' | 'recorded-vmsd';
  /** Device sections in QEMU's VFIO framing: what the markers say. */
  vfio?: VfioSectionSummary;
}

export interface ConfigurationRecord {
  offset: number;
  end: number;
  machineType: string;
  subsections: { offset: number; name: string; version: number }[];
  capabilities?: string[];
  uuid?: string;
  targetPageBits?: number;
}

export type DecoderEvent =
  | { kind: 'header'; offset: number; version: number }
  | ({ kind: 'configuration' } & ConfigurationRecord)
  | { kind: 'sectionStart'; section: SectionIdentity; sectionKind: SectionKind; offset: number; dataOffset: number; depth: number }
  | RamBlocksEvent
  | MultifdFlushEvent
  | ({ kind: 'sectionEnd' } & SectionRecord)
  | { kind: 'command'; offset: number; depth: number; command: CommandInfo }
  | { kind: 'packageEnd'; offset: number; reason: 'eof' | 'run' | 'exhausted' }
  | { kind: 'eof'; offset: number; depth: number }
  | { kind: 'vmdescription'; offset: number; length: number; json: string };

/** A VFIO device's sections: QEMU's markers delimit them; a config section holds `configBytes`. */
export interface VfioLayout {
  framing: 'vfio';
  configBytes: number;
}

/** A QEMU device livemig does not emulate: walked by the VMDESCRIPTION recorded for its machine type. */
export interface VmsdLayout {
  framing: 'vmsd';
  description: VmdescVmsd;
}

/**
 * How long a device section's data is: a length; 'be32-prefixed': a be32 length and that many
 * bytes (livemig's own variable-size devices); a VfioLayout: as its VFIO markers say; a
 * VmsdLayout: as its recorded description and the subsections present say.
 */
export type SectionLayout = number | 'be32-prefixed' | VfioLayout | VmsdLayout;

/**
 * The layout of a device section when it is known (a VMDESCRIPTION, or a device of ours);
 * undefined: a section whose data starts with a VFIO marker is measured by its markers (unless
 * FULL), any other by scanning for its footer.
 */
export type DeviceLayout = (section: SectionIdentity, kind: SectionKind) => SectionLayout | undefined;

export interface StreamDecoderOptions {
  ram?: RamTarget;
  deviceLayout?: DeviceLayout;
  /**
   * Sections carry footers (machine types from 2.4; default true). 'auto': as the stream shows it —
   * with a configuration record footers are required; without one (machine types up to 2.3 have
   * neither) the byte after the first section's data tells (a footer's 0x7e starts no record).
   */
  expectFooters?: boolean | 'auto';
  /** Largest device section data accepted, bytes. Default 16 MiB. */
  maxSectionBytes?: number;
  /**
   * Device section data is lent, not copied: a view of the pushed chunk when it lies in one
   * (valid until that chunk's memory is reused), else a copy. Default false (a copy).
   */
  lendDeviceData?: boolean;
  /** Largest VMDESCRIPTION accepted, bytes. Default 16 MiB. */
  maxVmdescBytes?: number;
  /** Largest total RAM a block list may announce, bytes. Default 1 TiB. */
  maxRamBytes?: number;
  /** Most RAM blocks in a block list. Default 1024. */
  maxRamBlocks?: number;
  /** Most distinct sections. Default 65536. */
  maxSections?: number;
  /** First command number refused: 11 for QEMU 7.2 (default), 12 to accept SWITCHOVER_START. */
  maxCommand?: number;
  /** Capability x-ignore-shared (else learned from the configuration record). */
  ignoreShared?: boolean;
  /**
   * Start without header and configuration (a postcopy recovery channel), in this postcopy
   * state, with these already known sections and blocks.
   */
  resume?: { postcopyState: PostcopyStateValue; sections: readonly SectionIdentity[]; blocks: readonly RamBlockInfo[] };
  /** Offset of the first byte pushed (for a resumed channel). Default 0. */
  startOffset?: number;
  /**
   * The memory attachBlocks returns is all zero to begin with (a fresh destination): a ZERO
   * record for a page this stream never wrote is then skipped instead of clearing 4 KiB.
   */
  zeroedMemory?: boolean;
  /**
   * Call the target's acceptPage/pagePlaced only once this stream's postcopy state is LISTENING
   * (a destination: precopy pays nothing per page for them). Default false: for every page.
   */
  postcopyPageHooks?: boolean;
  /** Copies runs of CONTINUE PAGE records at once where no page hook runs (RamRecordDecoderOptions.placePages). */
  placePages?: PagePlacer | undefined;
}
