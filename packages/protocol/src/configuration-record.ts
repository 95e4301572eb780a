// The configuration record (wire-format.md §3): machine type, then configuration/* subsections
// (target-page-bits, uuid, capabilities). Peeked whole before it is consumed, like every record.
//
//   u8 0x07 | be32 len, machine type | { u8 0x05, u8 n, name, be32 version, body }*

import { RecordType } from './constants.ts';
import { type ErrorCodeValue, ErrorCode, ProtocolError } from './errors.ts';
import type { ByteReader } from './reader.ts';
import { NEED_MORE, type NeedMore } from './ram-record-decoder.ts';
import type { ConfigurationRecord } from './stream-events.ts';

/** The configuration record, consumed, if the stream has one here; null when it has none (nothing consumed). */
export function readConfigurationRecord(r: ByteReader): ConfigurationRecord | NeedMore | null {
  const fail = (code: ErrorCodeValue, message: string, rel: number): never => {
    throw new ProtocolError(code, message, { streamOffset: r.streamOffset + rel });
  };
  if (r.available < 1) return NEED_MORE;
  if (r.u8(0) !== RecordType.CONFIGURATION) return null;
  if (r.available < 5) return NEED_MORE;
  const nameLen = r.be32(1);
  if (nameLen > 255) fail(ErrorCode.BAD_CONFIGURATION, `machine type name of ${nameLen} bytes (at most 255)`, 1);
  let k = 5 + nameLen;
  if (r.available < k + 1) return NEED_MORE;
  const rec: ConfigurationRecord = {
    offset: r.streamOffset,
    end: 0,
    machineType: r.latin1(5, nameLen),
    subsections: [],
  };
  while (r.u8(k) === RecordType.SUBSECTION) {
    if (r.available < k + 2) return NEED_MORE;
    const n = r.u8(k + 1);
    if (r.available < k + 2 + n + 4) return NEED_MORE;
    const name = r.latin1(k + 2, n);
    if (!name.startsWith('configuration/')) break;
    const body = k + 2 + n + 4;
    const subStart = k;
    switch (name) {
      case 'configuration/target-page-bits':
        if (r.available < body + 4) return NEED_MORE;
        rec.targetPageBits = r.be32(body);
        k = body + 4;
        break;
      case 'configuration/uuid':
        if (r.available < body + 16) return NEED_MORE;
        rec.uuid = uuidString(r.copyOut(body, 16));
        k = body + 16;
        break;
      case 'configuration/capabilities': {
        if (r.available < body + 4) return NEED_MORE;
        const count = r.be32(body);
        if (count > 64) fail(ErrorCode.BAD_CONFIGURATION, `configuration lists ${count} capabilities (at most 64)`, body);
        let p = body + 4;
        const caps: string[] = [];
        for (let i = 0; i < count; i++) {
          if (r.available < p + 1) return NEED_MORE;
          const cn = r.u8(p);
          if (r.available < p + 1 + cn) return NEED_MORE;
          caps.push(r.latin1(p + 1, cn));
          p += 1 + cn;
        }
        rec.capabilities = caps;
        k = p;
        break;
      }
      default:
        fail(ErrorCode.BAD_CONFIGURATION, `unknown configuration subsection "${name}"`, k);
    }
    rec.subsections.push({ offset: r.streamOffset + subStart, name, version: r.be32(subStart + 2 + n) });
    if (r.available < k + 1) return NEED_MORE;
  }
  rec.end = r.streamOffset + k;
  r.skip(k);
  return rec;
}

function uuidString(b: Buffer): string {
  const h = b.toString('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}
