// Batched page requests between livemig peers (a return-path extension), encoded and decoded.

import { TARGET_PAGE_SIZE } from './constants.ts';
import { ErrorCode, ProtocolError } from './errors.ts';
import { writeRpLivemigExt, writeRpReqPages } from './return-path.ts';
import type { BatchWriter } from './writer.ts';

/**
 * Batched page requests between livemig peers, in one RP_LIVEMIG_EXT message of compressed page
 * indices (DPDK-style pointer compression: offsets in pages from the lowest page, 16 bits each
 * when they fit, else 32):
 *   u8 0x01 (page-request batch) | u8 width 16|32 | cstr block | be32 base page | offsets (LE)
 * 2 bytes a page after an 11-byte header, instead of a 16-byte REQ_PAGES each. msgpack payloads
 * (our other extensions) never start with 0x01. Returns the bytes written.
 */
export function encodeRequestBatch(w: BatchWriter, block: string, pages: readonly number[]): number {
  const before = w.totalBytes;
  const perMessage = Math.floor((512 - 7 - block.length) / 4);
  for (let i = 0; i < pages.length; ) {
    const chunk = pages.slice(i, i + perMessage);
    i += chunk.length;
    const base = Math.min(...chunk);
    const width = Math.max(...chunk) - base > 0xffff ? 4 : 2;
    const payload = Buffer.alloc(2 + 1 + block.length + 4 + width * chunk.length);
    payload[0] = 0x01;
    payload[1] = width * 8;
    payload[2] = block.length;
    payload.write(block, 3, 'latin1');
    let at = 3 + block.length;
    payload.writeUInt32BE(base, at);
    at += 4;
    for (const p of chunk) {
      if (width === 2) payload.writeUInt16LE(p - base, at);
      else payload.writeUInt32LE(p - base, at);
      at += width;
    }
    writeRpLivemigExt(w, payload);
  }
  return w.totalBytes - before;
}

/** The extension payload's first byte for a page-request batch. */
export const REQUEST_BATCH_KIND = 0x01;

/** Decode a page-request batch payload: `onPage(block, page)` for each page, in order. Throws LM_ERR_BAD_RP_PAYLOAD on a malformed one. */
export function decodeRequestBatch(p: Uint8Array, onPage: (block: string, page: number) => void): void {
  const b = Buffer.from(p.buffer, p.byteOffset, p.byteLength);
  const width = b[1] === 32 ? 4 : b[1] === 16 ? 2 : 0;
  const n = b[2] ?? 0;
  if (b[0] !== REQUEST_BATCH_KIND || width === 0 || b.length < 3 + n + 4 || (b.length - 7 - n) % width !== 0) {
    throw new ProtocolError(ErrorCode.BAD_RP_PAYLOAD, `malformed page-request batch (${b.length} bytes, width byte ${b[1] ?? 'missing'})`);
  }
  const block = b.toString('latin1', 3, 3 + n);
  const base = b.readUInt32BE(3 + n);
  for (let at = 7 + n; at < b.length; at += width) onPage(block, base + (width === 2 ? b.readUInt16LE(at) : b.readUInt32LE(at)));
}

/** Whether REQ_PAGES on one connection has named its block yet (then the next ones need not). */
export interface RequestNaming {
  named: boolean;
}

/**
 * Page requests for `pages` of block `block` on one connection: one page-request batch when
 * `batch` (a livemig peer) and there are several, else a REQ_PAGES each, the first on the
 * connection naming its block. Returns the bytes written.
 */
export function writePageRequests(w: BatchWriter, block: string, pages: readonly number[], batch: boolean, naming: RequestNaming): number {
  if (batch && pages.length >= 2) return encodeRequestBatch(w, block, pages);
  const before = w.totalBytes;
  for (const page of pages) {
    writeRpReqPages(w, page * TARGET_PAGE_SIZE, TARGET_PAGE_SIZE, naming.named ? undefined : block);
    naming.named = true;
  }
  return w.totalBytes - before;
}
