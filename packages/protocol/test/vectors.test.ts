// Hand-written stream vectors (test/vectors/*.json), run through StreamDecoder.
//
// Each file is an array of
//   { id, note, hex, expect: [event…] [, memory] [, options] }          decodes completely
//   { id, note, hex, rejects: "LM_ERR_…", at, [expect: [event…]] }      fails with that code
// hex:     spaces and '|' are ignored; "hh*N" repeats one byte N times (page bodies).
// expect:  the events in order, each matched *partially*: only the keys written are compared,
//          recursively; a Buffer in an event compares to a hex string. The count must match.
// rejects: the error's code; `at` its streamOffset. `expect` then lists the events before it.
// memory:  { "block@0xoffset": hex } bytes the RamTarget's memory must hold at the end
//          (memory starts filled with 0xcc, so a ZERO page that was written shows as 00).
// options: StreamDecoderOptions; deviceLayout is given as { idstr: length }.
// Each vector runs twice, pushed whole and one byte at a time; both must give the same result.

import assert from 'node:assert/strict';
import { readdirSync, readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { describe, it } from 'node:test';
import { fileURLToPath } from 'node:url';
import { type DecoderEvent, NEED_MORE, type RamBlockInfo, StreamDecoder, type StreamDecoderOptions } from '../src/index.ts';

interface Vector {
  id: string;
  note: string;
  hex: string;
  expect?: unknown[];
  rejects?: string;
  at?: number;
  memory?: Record<string, string>;
  options?: Omit<StreamDecoderOptions, 'deviceLayout'> & { deviceLayout?: Record<string, number> };
}

const dir = join(dirname(fileURLToPath(import.meta.url)), 'vectors');

/** "aa bb | cc*3" → aabbcccccc */
function parseHex(text: string): Buffer {
  const parts: Buffer[] = [];
  for (const token of text.split(/[\s|]+/).filter((t) => t !== '')) {
    const rep = /^([0-9a-f]{2})\*(\d+)$/i.exec(token);
    if (rep !== null) {
      parts.push(Buffer.alloc(Number(rep[2]), parseInt(rep[1]!, 16)));
      continue;
    }
    assert.match(token, /^([0-9a-f]{2})+$/i, `bad hex token "${token}"`);
    parts.push(Buffer.from(token, 'hex'));
  }
  return Buffer.concat(parts);
}

/** Every key of `expected` matches in `actual`, recursively; arrays match in length and order. */
function matchPartial(actual: unknown, expected: unknown, path: string): void {
  if (Buffer.isBuffer(actual) && typeof expected === 'string') {
    assert.equal(actual.toString('hex'), expected.replace(/[\s|]/g, ''), path);
    return;
  }
  if (Array.isArray(expected)) {
    assert.ok(Array.isArray(actual), `${path}: expected an array`);
    assert.equal(actual.length, expected.length, `${path}: length`);
    expected.forEach((e, i) => matchPartial(actual[i], e, `${path}[${i}]`));
    return;
  }
  if (typeof expected === 'object' && expected !== null) {
    assert.ok(typeof actual === 'object' && actual !== null, `${path}: expected an object, got ${String(actual)}`);
    for (const [k, v] of Object.entries(expected)) matchPartial((actual as Record<string, unknown>)[k], v, `${path}.${k}`);
    return;
  }
  assert.strictEqual(actual, expected, path);
}

interface Outcome {
  events: DecoderEvent[];
  error: { code: unknown; streamOffset: unknown } | undefined;
  blocks: readonly RamBlockInfo[];
  memory: Buffer[];
}

function run(v: Vector, bytes: Buffer, chunk: number): Outcome {
  const memory: Buffer[] = [];
  let blocks: readonly RamBlockInfo[] = [];
  const { deviceLayout, ...rest } = v.options ?? {};
  const options: StreamDecoderOptions = {
    ...rest,
    ram: {
      attachBlocks: (list) => {
        blocks = list;
        for (const b of list) memory.push(Buffer.alloc(b.length, 0xcc));
        return memory;
      },
    },
  };
  if (deviceLayout !== undefined) options.deviceLayout = (id) => deviceLayout[id.idstr];
  const dec = new StreamDecoder(options);
  const events: DecoderEvent[] = [];
  try {
    for (let at = 0; at < bytes.length; at += chunk) {
      dec.push(bytes.subarray(at, at + chunk));
      for (let ev = dec.next(); ev !== NEED_MORE; ev = dec.next()) events.push(ev);
    }
    dec.end();
  } catch (err) {
    const e = err as { code?: unknown; streamOffset?: unknown };
    // A bug, not a rejection: only coded errors count.
    assert.equal(typeof e.code, 'string', `uncoded error: ${String(err)}`);
    return { events, error: { code: e.code, streamOffset: e.streamOffset }, blocks, memory };
  }
  return { events, error: undefined, blocks, memory };
}

for (const file of readdirSync(dir).filter((f) => f.endsWith('.json')).sort()) {
  const vectors = JSON.parse(readFileSync(join(dir, file), 'utf8')) as Vector[];
  describe(`vectors/${file}`, () => {
    const ids = new Set<string>();
    for (const v of vectors) {
      it(`${v.id}: ${v.note}`, () => {
        assert.ok(!ids.has(v.id), `duplicate id ${v.id}`);
        ids.add(v.id);
        assert.ok(v.expect !== undefined || v.rejects !== undefined, 'a vector needs expect or rejects');
        const bytes = parseHex(v.hex);
        const whole = run(v, bytes, bytes.length);
        const bytewise = run(v, bytes, 1);
        // Chunking invariance: a record is only consumed once it is all there.
        assert.deepEqual(bytewise.events, whole.events, 'events differ when pushed one byte at a time');
        assert.deepEqual(bytewise.error, whole.error, 'error differs when pushed one byte at a time');

        if (v.rejects !== undefined) {
          assert.ok(whole.error !== undefined, `expected ${v.rejects}, decoded fine`);
          assert.equal(whole.error.code, v.rejects);
          if (v.at !== undefined) assert.equal(whole.error.streamOffset, v.at, 'error streamOffset');
        } else if (whole.error !== undefined) {
          assert.fail(`unexpected ${String(whole.error.code)} at ${String(whole.error.streamOffset)}`);
        }
        if (v.expect !== undefined) matchPartial(whole.events, v.expect, 'events');

        for (const [where, hex] of Object.entries(v.memory ?? {})) {
          const [name, off] = where.split('@') as [string, string];
          const i = whole.blocks.findIndex((b) => b.idstr === name);
          assert.ok(i >= 0, `no block ${name}`);
          const want = parseHex(hex);
          const at = Number(off);
          assert.equal(whole.memory[i]!.subarray(at, at + want.length).toString('hex'), want.toString('hex'), `memory ${where}`);
          assert.ok(bytewise.memory[i]!.equals(whole.memory[i]!), `memory ${name} differs when pushed one byte at a time`);
        }
      });
    }
  });
}
