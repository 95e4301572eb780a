// Where a record is, for the decoders' errors and bounds: its stream offset and the section it
// is in. Shared by the stream decoder and the RAM record decoder, which read the same bytes.

import { ErrorCode, type ErrorCodeValue, ProtocolError } from './errors.ts';
import type { ByteReader } from './reader.ts';

/** The section a record belongs to, as errors name it. */
export interface SectionPlace {
  sectionId: number;
  idstr: string;
}

export function recordPlace(streamOffset: number, section: SectionPlace | undefined): { streamOffset: number; sectionId?: number; idstr?: string } {
  return section === undefined ? { streamOffset } : { streamOffset, sectionId: section.sectionId, idstr: section.idstr };
}

/**
 * True when `n` more bytes are buffered in `r`. A record that would run past the end of the
 * PACKAGED blob it is in (`packageEnd`, a stream offset) is refused before anything waits for it.
 */
export function haveBytes(r: ByteReader, n: number, packageEnd: number, section: SectionPlace | undefined): boolean {
  if (r.streamOffset + n > packageEnd) {
    throw new ProtocolError(ErrorCode.PACKAGE_OVERRUN, `record runs past the end of its PACKAGED blob (blob ends at ${packageEnd})`, recordPlace(r.streamOffset, section));
  }
  return r.available >= n;
}

/** Throw a ProtocolError at `relOffset` bytes past the reader's position, in `section`. */
export function failAt(
  code: ErrorCodeValue,
  message: string,
  r: ByteReader,
  section: SectionPlace | undefined,
  relOffset = 0,
  extra: { block?: string; pageOffset?: number } = {},
): never {
  throw new ProtocolError(code, message, { ...recordPlace(r.streamOffset + relOffset, section), ...extra });
}


