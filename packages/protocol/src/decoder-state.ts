// The stream decoder's own states and the section it has open, and how an unfinished record is
// named when a stream ends early. Kept apart from stream-decoder.ts's byte handling.

import type { SectionKind } from './constants.ts';
import type { RamSectionStats } from './ram-record-decoder.ts';
import type { SectionIdentity } from './stream-events.ts';
import type { VmdescVmsd } from './vmdesc.ts';

/** Decoder states. */
export const S = { HEADER: 0, CONFIG: 1, RECORD: 2, RAM: 3, DEVICE: 4, FOOTER: 5, SKIP_PACKAGE: 6, AFTER_EOF: 7, DONE: 8 } as const;
export type S = (typeof S)[keyof typeof S];

export interface OpenSection extends SectionIdentity {
  sectionKind: SectionKind;
  offset: number;
  dataOffset: number;
  isRam: boolean;
  stats: RamSectionStats | undefined;
  declaredLength: number | undefined;
  /** The data starts with its own be32 length (declaredLength is set once that is read). */
  prefixed: boolean;
  layout: 'declared' | 'footer-scan' | 'vfio-framing' | 'recorded-vmsd';
  scanFrom: number;
  /** QEMU's VFIO framing: 'yes' (a device of ours), 'detect' (look at the first 8 bytes), 'no'. */
  vfio: 'yes' | 'detect' | 'no';
  configBytes: number | undefined;
  vfioFrom: number;
  vfioCloseNext: boolean;
  /** A QEMU device walked by its recorded description (foreign-devices.ts). */
  vmsd: VmdescVmsd | undefined;
}

/** What a stream that ends now was in the middle of, for LM_ERR_TRUNCATED's message. */
export function describeUnfinished(state: S, depth: number, cur: OpenSection | undefined): string {
  switch (state) {
    case S.HEADER:
      return 'the stream header';
    case S.CONFIG:
      return 'the configuration record';
    case S.RECORD:
      return depth > 0 ? 'a record of a PACKAGED blob' : 'a record (no EOF seen)';
    case S.RAM:
      return `a RAM record of section ${cur?.sectionId} "${cur?.idstr}"`;
    case S.DEVICE:
      return `the data of section ${cur?.sectionId} "${cur?.idstr}"`;
    case S.FOOTER:
      return `the footer of section ${cur?.sectionId} "${cur?.idstr}"`;
    case S.SKIP_PACKAGE:
      return 'a PACKAGED blob';
    default:
      return 'the VMDESCRIPTION';
  }
}
