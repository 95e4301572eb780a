// A fixed-seed mutation fuzz of the stream decoder: 100,000 hostile streams (by default) made
// from the small QEMU 7.2 fixtures (and every record type they hold) by bit flips, byte sets,
// huge words at length fields, splices of one part of a stream over another and truncation,
// each pushed in up to four chunks. Each must end in success or a coded LM_ERR_* error — never
// a TypeError/RangeError, never an endless run of events, never a buffer past the limits.
//
// The seed is fixed, so CI runs the same 100,000 streams every time; a failure names the seed
// and the run index, and replays alone with
//   LIVEMIG_FUZZ_SEED=<seed> LIVEMIG_FUZZ_FROM=<index> LIVEMIG_FUZZ_RUNS=1 node --import tsx --test packages/protocol/test/fuzz.test.ts
// (run i's mutation depends only on the seed and i). Other seeds: set LIVEMIG_FUZZ_SEED.
//
// Nothing is allocated per run but the decoder itself: the streams are mutated in place and
// restored, the RAM they load goes into one preallocated pool, the chunks are views.

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { NEED_MORE, type RamBlockInfo, type RamTarget, StreamDecoder, type StreamDecoderOptions } from '../src/index.ts';
import { fixtureNames, fixturesMissing, countSkippedWithoutFixtures, interestingOffsets, loadFixture } from './fixtures.ts';

const SEED = Number(process.env['LIVEMIG_FUZZ_SEED'] ?? 0x5eed1405);
const FROM = Number(process.env['LIVEMIG_FUZZ_FROM'] ?? 0);
const RUNS = Number(process.env['LIVEMIG_FUZZ_RUNS'] ?? 100_000);
/** Fixtures up to this size are the corpus (the larger ones cost milliseconds per run). */
const CORPUS_MAX_BYTES = 100_000;
const LIMITS = { maxSectionBytes: 1 << 20, maxVmdescBytes: 1 << 20, maxRamBytes: 2 ** 31 } satisfies StreamDecoderOptions;
const POOL_BYTES = 64 * 2 ** 20;

/** splitmix32-style hash of (seed, run, draw): every run's choices depend only on seed and index. */
class RunRandom {
  #state = 0;
  start(seed: number, run: number): void {
    this.#state = (Math.imul(seed ^ 0x9e3779b9, 0x85ebca6b) ^ Math.imul(run + 1, 0xc2b2ae35)) >>> 0;
  }
  /** A uniform integer in [0, n). */
  below(n: number): number {
    let z = (this.#state = (this.#state + 0x9e3779b9) >>> 0);
    z = Math.imul(z ^ (z >>> 16), 0x21f0aaad);
    z = Math.imul(z ^ (z >>> 15), 0x735a2d97);
    z = (z ^ (z >>> 15)) >>> 0;
    return z % n;
  }
}

/** Values that break length and type fields. */
const HOSTILE_WORDS = [0, 1, 0x7f, 0x80, 0xff, 0x100, 0x1000, 0x10000, 0x7fffffff, 0x80000000, 0xffffffff] as const;

interface CorpusEntry {
  name: string;
  stream: Buffer;
  /** Offsets of record headers, length fields and type bytes (from the manifest). */
  interesting: number[];
}

const pool = Buffer.alloc(POOL_BYTES);
const poolTarget: RamTarget = {
  attachBlocks(blocks: readonly RamBlockInfo[]): (Uint8Array | undefined)[] {
    let total = 0;
    for (const b of blocks) total += b.length;
    assert.ok(total <= LIMITS.maxRamBytes, `block list of ${total} bytes passed the ${LIMITS.maxRamBytes}-byte limit`);
    if (total > POOL_BYTES) return blocks.map(() => undefined);
    let at = 0;
    return blocks.map((b) => {
      const view = pool.subarray(at, at + b.length);
      at += b.length;
      return view;
    });
  },
};

/** What one run did to its stream, so it can be restored and named in a failure. */
const saved = { offsets: new Int32Array(64), values: new Uint8Array(64), count: 0 };
function setByte(s: Buffer, k: number, v: number): void {
  if (saved.count === saved.offsets.length) return; // enough damage for one run
  saved.offsets[saved.count] = k;
  saved.values[saved.count] = s[k]!;
  saved.count++;
  s[k] = v;
}
function restore(s: Buffer): void {
  for (let i = saved.count - 1; i >= 0; i--) s[saved.offsets[i]!] = saved.values[i]!;
  saved.count = 0;
}

/** Mutates `e.stream` in place; returns the length of the stream to decode (a truncation or all). */
function mutate(rnd: RunRandom, e: CorpusEntry): { length: number; what: string } {
  const s = e.stream;
  const place = (width: number): number => {
    const k = rnd.below(2) === 0 ? e.interesting[rnd.below(e.interesting.length)]! : rnd.below(s.length);
    return Math.min(k, s.length - width);
  };
  const kind = rnd.below(6);
  let what: string;
  switch (kind) {
    case 0: {
      const k = place(1);
      const bit = rnd.below(8);
      setByte(s, k, s[k]! ^ (1 << bit));
      what = `flip bit ${bit} at ${k}`;
      break;
    }
    case 1: {
      const k = place(1);
      const v = rnd.below(256);
      setByte(s, k, v);
      what = `byte ${v} at ${k}`;
      break;
    }
    case 2: {
      const width = [2, 4, 8][rnd.below(3)]!;
      const k = place(width);
      const v = HOSTILE_WORDS[rnd.below(HOSTILE_WORDS.length)]!;
      // Big-endian, right-aligned in `width` bytes; an 8-byte 0xffffffff fills all eight.
      for (let i = 0; i < width; i++) {
        const shift = 8 * (width - 1 - i);
        const byte = shift >= 32 ? (v === 0xffffffff ? 0xff : 0) : (v >>> shift) & 0xff;
        setByte(s, k + i, byte);
      }
      what = `${width}-byte word ${v} at ${k}`;
      break;
    }
    case 3: {
      const n = 2 + rnd.below(12);
      for (let i = 0; i < n; i++) setByte(s, place(1), rnd.below(256));
      what = `${n} random bytes`;
      break;
    }
    case 4: {
      // Splice: copy a run of the stream over another place (records where they do not belong).
      const len = 1 + rnd.below(64);
      const from = rnd.below(s.length - len);
      const to = place(len);
      for (let i = 0; i < len; i++) setByte(s, to + i, s[from + i]!);
      what = `${len} bytes from ${from} copied to ${to}`;
      break;
    }
    default: {
      const k = place(1);
      setByte(s, k, rnd.below(256));
      const length = 1 + rnd.below(s.length);
      return { length, what: `byte at ${k}, truncated to ${length} bytes` };
    }
  }
  return { length: s.length, what };
}

/** Decode `s[0, length)` in up to four chunks; returns the error code or 'ok'. */
function decodeOnce(rnd: RunRandom, s: Buffer, length: number): string {
  let dec: StreamDecoder;
  try {
    dec = new StreamDecoder({ ...LIMITS, ram: poolTarget });
  } catch (err) {
    return codeOf(err);
  }
  const chunks = 1 + rnd.below(4);
  const maxEvents = 2 * length + 16;
  const maxBuffered = LIMITS.maxSectionBytes + 512;
  let events = 0;
  let at = 0;
  try {
    for (let c = 0; c < chunks; c++) {
      const end = c === chunks - 1 ? length : at + rnd.below(length - at + 1);
      dec.push(s.subarray(at, end));
      at = end;
      for (let ev = dec.next(); ev !== NEED_MORE; ev = dec.next()) {
        if (++events > maxEvents) assert.fail(`more than ${maxEvents} events from ${length} bytes: the decoder does not progress`);
      }
      if (dec.bufferedBytes > maxBuffered) assert.fail(`decoder holds ${dec.bufferedBytes} bytes after NEED_MORE`);
    }
    dec.end();
    return 'ok';
  } catch (err) {
    return codeOf(err);
  }
}

function codeOf(err: unknown): string {
  if (err instanceof assert.AssertionError) throw err;
  const code = (err as { code?: unknown } | null)?.code;
  if (typeof code === 'string' && code.startsWith('LM_ERR_')) return code;
  const e = err as Error;
  throw new Error(`threw ${e?.name ?? typeof err} without an LM_ERR_ code: ${e?.message ?? String(err)}`, { cause: err });
}

const missing = fixturesMissing();

describe('fixed-seed decoder fuzz', { skip: missing }, () => {
  it(`${RUNS} mutated streams (seed 0x${SEED.toString(16)}, from run ${FROM}) end in success or a coded error`, () => {
    const corpus: CorpusEntry[] = [];
    for (const name of fixtureNames()) {
      const f = loadFixture(name);
      if (f.stream.length > CORPUS_MAX_BYTES) continue;
      corpus.push({ name, stream: Buffer.from(f.stream), interesting: interestingOffsets(f.manifest, f.stream.length) });
    }
    assert.ok(corpus.length >= 4, `corpus of ${corpus.length} fixtures`);
    const rnd = new RunRandom();
    const codes = new Map<string, number>();
    const memoryBefore = process.memoryUsage().arrayBuffers;
    let memoryPeak = memoryBefore;
    const started = process.hrtime.bigint();
    for (let run = FROM; run < FROM + RUNS; run++) {
      rnd.start(SEED, run);
      const e = corpus[rnd.below(corpus.length)]!;
      const { length, what } = mutate(rnd, e);
      let code: string;
      try {
        code = decodeOnce(rnd, e.stream, length);
      } catch (err) {
        const replay = `LIVEMIG_FUZZ_SEED=${SEED} LIVEMIG_FUZZ_FROM=${run} LIVEMIG_FUZZ_RUNS=1`;
        throw new Error(`fuzz run ${run} (seed ${SEED}, ${e.name}: ${what}) failed: ${(err as Error).message}\nreplay: ${replay}`, { cause: err });
      } finally {
        restore(e.stream);
      }
      codes.set(code, (codes.get(code) ?? 0) + 1);
      if ((run & 1023) === 0) memoryPeak = Math.max(memoryPeak, process.memoryUsage().arrayBuffers);
    }
    const ms = Number(process.hrtime.bigint() - started) / 1e6;
    const summary = [...codes].sort((a, b) => b[1] - a[1]).map(([c, n]) => `${c} ${n}`).join(', ');
    console.log(`fuzz: ${RUNS} runs of seed 0x${SEED.toString(16)} in ${(ms / 1000).toFixed(1)} s over ${corpus.length} fixtures; arrayBuffers +${((memoryPeak - memoryBefore) / 2 ** 20).toFixed(1)} MiB; outcomes: ${summary}`);
    assert.ok(memoryPeak - memoryBefore < 64 * 2 ** 20, `arrayBuffers grew by ${memoryPeak - memoryBefore} bytes`);
    if (RUNS >= 10_000) assert.ok(codes.size >= 8, `the mutations reached only ${summary}`);
  });
});

countSkippedWithoutFixtures('fixed-seed decoder fuzz');
