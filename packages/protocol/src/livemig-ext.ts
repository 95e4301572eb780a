// livemig's return-path extension messages (RP_LIVEMIG_EXT, wire-format.md §5), the one codec
// both sides use. A payload is at most 512 bytes and is one of:
//
//   0x01 …            a batch of page requests in compressed page indices (request-batch.ts)
//   msgpack map       { kind: 'error', code, message, offset? }: why the destination failed,
//                     sent before SHUT(1) so the source can report the reason
//
// msgpack maps start with 0x80–0x8f or 0xde/0xdf, never 0x01, so the first byte tells them apart.
// Anything else is ignored by the reader, as QEMU ignores what it does not need.

import { Packr } from 'msgpackr';
import { RP_MAX_PAYLOAD } from './constants.ts';
import { REQUEST_BATCH_KIND } from './request-batch.ts';

/** Plain maps, no shared record structures: each message must decode on its own. */
const packr = new Packr({ useRecords: false });

/** A destination's failure as it is reported to the source. */
export interface LivemigErrorReport {
  code: string;
  message: string;
  /** Stream offset of the record at fault, when there is one. */
  offset?: number;
}

export type LivemigExtMessage =
  | ({ kind: 'error' } & LivemigErrorReport)
  | { kind: 'request-batch' }
  | { kind: 'unknown' };

/** Longest message text kept when a report would not fit in one extension message. */
const SHORTENED_MESSAGE_CHARS = 400;

/** The payload of an error report; a message too long for one return-path message is shortened. */
export function encodeLivemigError(report: LivemigErrorReport): Buffer {
  const base = { kind: 'error', code: report.code, message: report.message, ...(report.offset === undefined ? {} : { offset: report.offset }) };
  const payload = packr.pack(base);
  if (payload.length <= RP_MAX_PAYLOAD) return payload;
  return packr.pack({ ...base, message: report.message.slice(0, SHORTENED_MESSAGE_CHARS) });
}

/** What an extension payload is; `request-batch` payloads are read by decodeRequestBatch. */
export function decodeLivemigExt(payload: Uint8Array): LivemigExtMessage {
  if (payload[0] === REQUEST_BATCH_KIND) return { kind: 'request-batch' };
  let msg: unknown;
  try {
    msg = packr.unpack(payload);
  } catch {
    return { kind: 'unknown' };
  }
  if (typeof msg !== 'object' || msg === null) return { kind: 'unknown' };
  const m = msg as Record<string, unknown>;
  if (m['kind'] !== 'error') return { kind: 'unknown' };
  const out: { kind: 'error' } & LivemigErrorReport = {
    kind: 'error',
    code: typeof m['code'] === 'string' ? m['code'] : 'LM_ERR_INTERNAL',
    message: typeof m['message'] === 'string' ? m['message'] : 'unknown error',
  };
  if (typeof m['offset'] === 'number') out.offset = m['offset'];
  return out;
}
