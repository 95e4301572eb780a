// XBZRLE page delta encoding (wire-format.md §6.5), byte-compatible with QEMU.
//
//   encoded := { zrun nzrun }*          a trailing unchanged run is omitted
//   zrun    := uleb(n)                  n bytes equal to the old page (only the first may be 0)
//   nzrun   := uleb(m) byte[m]          m ≥ 1 bytes taken verbatim from the new page
//   uleb(x) := x < 0x80 ? [x] : [(x & 0x7f) | 0x80, x >> 7]      (x ≤ 0x3fff)
//
// Runs are maximal, so the encoder's output equals QEMU's for the same pair of pages,
// including where it gives up: QEMU bails out (the page is then sent whole) as soon as the
// output cannot hold two more bytes or the next verbatim run.

/** Returned by xbzrleEncode when the delta would not fit in `dstLimit` bytes: send a plain page. */
export const XBZRLE_OVERFLOW = -1;

/**
 * Encode `cur` against `old` (both `length` bytes) into `dst` at `dstOffset`, writing at most
 * `dstLimit` bytes. Returns the encoded length (0: pages identical, send nothing) or
 * XBZRLE_OVERFLOW.
 */
export function xbzrleEncode(
  old: Uint8Array,
  oldOffset: number,
  cur: Uint8Array,
  curOffset: number,
  length: number,
  dst: Uint8Array,
  dstOffset: number,
  dstLimit: number,
): number {
  let i = 0;
  let d = 0;
  while (i < length) {
    if (d + 2 > dstLimit) return XBZRLE_OVERFLOW;
    const zStart = i;
    while (i < length && old[oldOffset + i] === cur[curOffset + i]) i++;
    if (i === length) return zStart === 0 ? 0 : d;
    d += ulebEncode(i - zStart, dst, dstOffset + d);
    if (d + 2 > dstLimit) return XBZRLE_OVERFLOW;
    const nzStart = i;
    while (i < length && old[oldOffset + i] !== cur[curOffset + i]) i++;
    const nz = i - nzStart;
    d += ulebEncode(nz, dst, dstOffset + d);
    if (d + nz > dstLimit) return XBZRLE_OVERFLOW;
    dst.set(cur.subarray(curOffset + nzStart, curOffset + i), dstOffset + d);
    d += nz;
  }
  return d;
}

function ulebEncode(value: number, dst: Uint8Array, at: number): number {
  if (value < 0x80) {
    dst[at] = value;
    return 1;
  }
  dst[at] = (value & 0x7f) | 0x80;
  dst[at + 1] = value >> 7;
  return 2;
}

/** Why a decode failed; undefined means success. */
export type XbzrleFault =
  | 'short input'
  | 'bad run length'
  | 'zero-length run'
  | 'output overflow'
  | 'input overflow';

/** Reason of the last failed xbzrleDecode (set only when it returns -1). */
export let xbzrleLastFault: XbzrleFault | undefined;

/**
 * Apply `encLen` encoded bytes at `src[srcOffset]` to the page at `page[pageOffset]`
 * (`pageLength` bytes) in place. Returns the number of page bytes covered, or -1 on malformed
 * input (see xbzrleLastFault); on failure the page may be partly written.
 */
export function xbzrleDecode(
  src: Uint8Array,
  srcOffset: number,
  encLen: number,
  page: Uint8Array,
  pageOffset: number,
  pageLength: number,
): number {
  let i = 0;
  let d = 0;
  while (i < encLen) {
    if (encLen - i < 2) return fail('short input');
    // zrun
    let b = src[srcOffset + i]!;
    let run: number;
    if (b < 0x80) {
      run = b;
      i += 1;
    } else {
      const b2 = src[srcOffset + i + 1]!;
      if (b2 >= 0x80) return fail('bad run length');
      run = (b & 0x7f) | (b2 << 7);
      i += 2;
    }
    if (run === 0 && d !== 0) return fail('zero-length run');
    d += run;
    if (d > pageLength) return fail('output overflow');
    if (encLen - i < 2) return fail('short input');
    // nzrun
    b = src[srcOffset + i]!;
    if (b < 0x80) {
      run = b;
      i += 1;
    } else {
      const b2 = src[srcOffset + i + 1]!;
      if (b2 >= 0x80) return fail('bad run length');
      run = (b & 0x7f) | (b2 << 7);
      i += 2;
    }
    if (run === 0) return fail('zero-length run');
    if (d + run > pageLength) return fail('output overflow');
    if (i + run > encLen) return fail('input overflow');
    page.set(src.subarray(srcOffset + i, srcOffset + i + run), pageOffset + d);
    i += run;
    d += run;
  }
  return d;
}

function fail(fault: XbzrleFault): -1 {
  xbzrleLastFault = fault;
  return -1;
}
