// The received-pages bitmap (wire-format.md §5.4): little-endian bit order, page i is
// byte i >> 3, bit i & 7; its wire size is rounded up to whole 8-byte words.

/** Bytes of a received bitmap for `pageCount` pages, as sent in a RECV_BITMAP reply. */
export function recvBitmapBytes(pageCount: number): number {
  return Math.ceil(Math.ceil(pageCount / 8) / 8) * 8;
}

export class PageBitmap {
  readonly pageCount: number;
  readonly bytes: Uint8Array;

  /** `storage` may be shared memory (a SharedArrayBuffer view) of at least recvBitmapBytes(pageCount). */
  constructor(pageCount: number, storage?: Uint8Array) {
    this.pageCount = pageCount;
    this.bytes = storage ?? new Uint8Array(recvBitmapBytes(pageCount));
  }

  has(page: number): boolean {
    return (this.bytes[page >> 3]! & (1 << (page & 7))) !== 0;
  }

  set(page: number): void {
    this.bytes[page >> 3]! |= 1 << (page & 7);
  }

  clear(page: number): void {
    this.bytes[page >> 3]! &= ~(1 << (page & 7));
  }

  setRange(first: number, count: number): void {
    for (let p = first; p < first + count; p++) this.set(p);
  }

  clearRange(first: number, count: number): void {
    for (let p = first; p < first + count; p++) this.clear(p);
  }

  /** Pages set. */
  count(): number {
    let n = 0;
    for (let p = 0; p < this.pageCount; p++) if (this.has(p)) n++;
    return n;
  }
}
