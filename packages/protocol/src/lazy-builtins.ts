// node:crypto and node:zlib, loaded on first use. Loading them (and making the first sha256) cost
// 6–30 ms and 2–15 ms here, the more the busier the machine: about what `livemig analyze --dump
// state` spends decoding a 512 MiB stream, which needs neither (it hashes nothing, and only
// compressed pages need zlib).

import type { Hash } from 'node:crypto';

let crypto: typeof import('node:crypto') | undefined;
let zlib: typeof import('node:zlib') | undefined;

export type { Hash };

export function createSha256(): Hash {
  crypto ??= process.getBuiltinModule('node:crypto');
  return crypto.createHash('sha256');
}

/** zlib's inflateSync, refusing output past `maxOutputLength` bytes. */
export function inflateSync(data: Uint8Array, maxOutputLength: number): Buffer {
  zlib ??= process.getBuiltinModule('node:zlib');
  return zlib.inflateSync(data, { maxOutputLength });
}
