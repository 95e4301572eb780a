// Two judgements the stream decoder makes about records, kept apart from its byte handling:
// the order of postcopy's commands on the destination (QEMU's postcopy incoming state), and the
// footer-scan heuristic that finds where a device section of unknown layout ends.

import { checkCommandHeader, type CommandInfo } from './command.ts';
import { MigCmd, PostcopyState, type PostcopyStateValue, RecordType } from './constants.ts';
import { ErrorCode, ProtocolError } from './errors.ts';
import { NEED_MORE, type NeedMore } from './ram-record-decoder.ts';
import type { ByteReader } from './reader.ts';
import { FOOTER_LENGTH } from './stream.ts';

const POSTCOPY_STATE_NAMES = ['NONE', 'ADVISE', 'DISCARD', 'LISTENING', 'RUNNING', 'END'] as const;

/** The destination's postcopy sub-state after command `c` (QEMU's order: ADVISE, DISCARD*, LISTEN, RUN); a command out of order is refused. */
export function nextPostcopyState(s: PostcopyStateValue, c: CommandInfo, offset: number): PostcopyStateValue {
  const refuse = (): never => {
    throw new ProtocolError(
      ErrorCode.UNEXPECTED_COMMAND,
      `${c.name} is not allowed in postcopy state ${POSTCOPY_STATE_NAMES[s]}`,
      { streamOffset: offset },
    );
  };
  switch (c.cmd) {
    case MigCmd.POSTCOPY_ADVISE:
      if (s !== PostcopyState.NONE) refuse();
      return PostcopyState.ADVISE;
    case MigCmd.POSTCOPY_RAM_DISCARD:
      if (s !== PostcopyState.ADVISE && s !== PostcopyState.DISCARD) refuse();
      return PostcopyState.DISCARD;
    case MigCmd.POSTCOPY_LISTEN:
      if (s !== PostcopyState.ADVISE && s !== PostcopyState.DISCARD) refuse();
      return PostcopyState.LISTENING;
    case MigCmd.POSTCOPY_RUN:
      if (s !== PostcopyState.LISTENING) refuse();
      return PostcopyState.RUNNING;
    default:
      return s;
  }
}

/**
 * Find the footer of a device section whose layout is unknown: the length of its data, or
 * NEED_MORE (`scan.scanFrom` keeps how far the buffered bytes were searched). `limit`: the most
 * data bytes allowed before the footer.
 */
export function scanForFooter(
  r: ByteReader,
  scan: { sectionId: number; idstr: string; scanFrom: number },
  limit: number,
  packageEnd: number,
  sections: ReadonlyMap<number, unknown>,
  maxCommand: number,
): number | NeedMore {
  for (;;) {
    const at = r.indexOf(RecordType.SECTION_FOOTER, scan.scanFrom);
    if (at < 0 || at > limit) {
      const scanned = at < 0 ? r.available : at;
      if (scanned > limit) {
        throw new ProtocolError(ErrorCode.FOOTER_NOT_FOUND, `no footer for section ${scan.sectionId} "${scan.idstr}" within ${limit} bytes of its data`, {
          streamOffset: r.streamOffset,
          sectionId: scan.sectionId,
          idstr: scan.idstr,
        });
      }
      scan.scanFrom = r.available;
      return NEED_MORE;
    }
    if (r.available < at + FOOTER_LENGTH) {
      scan.scanFrom = at;
      return NEED_MORE;
    }
    if (r.be32(at + 1) === scan.sectionId) {
      const verdict = looksLikeRecord(r, at + FOOTER_LENGTH, packageEnd, sections, maxCommand);
      if (verdict === NEED_MORE) {
        scan.scanFrom = at;
        return NEED_MORE;
      }
      if (verdict) return at;
    }
    scan.scanFrom = at + 1;
  }
}

/**
 * Does a plausible record start k bytes ahead? The second half of the footer-scan heuristic: a
 * device section of unknown layout ends at a footer naming it that is followed by a record.
 */
function looksLikeRecord(r: ByteReader, k: number, packageEnd: number, sections: ReadonlyMap<number, unknown>, maxCommand: number): boolean | NeedMore {
  if (r.streamOffset + k === packageEnd) return true;
  if (r.available < k + 1) return NEED_MORE;
  switch (r.u8(k)) {
    case RecordType.EOF:
      return true;
    case RecordType.SECTION_START:
    case RecordType.SECTION_FULL: {
      if (r.available < k + 6) return NEED_MORE;
      const n = r.u8(k + 5);
      if (n === 0) return false;
      if (r.available < k + 6 + n + 8) return NEED_MORE;
      for (let i = 0; i < n; i++) {
        const ch = r.u8(k + 6 + i);
        if (ch < 0x20 || ch > 0x7e) return false;
      }
      return r.be32(k + 10 + n) < 0x10000;
    }
    case RecordType.SECTION_PART:
    case RecordType.SECTION_END:
      if (r.available < k + 5) return NEED_MORE;
      return sections.has(r.be32(k + 1));
    case RecordType.COMMAND: {
      if (r.available < k + 5) return NEED_MORE;
      try {
        checkCommandHeader(r.be16(k + 1), r.be16(k + 3), 0, maxCommand);
        return true;
      } catch {
        return false;
      }
    }
    default:
      return false;
  }
}
