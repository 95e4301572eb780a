import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { encodeQmpLine, JsonStreamSplitter } from '../src/index.ts';

interface Seen {
  values: unknown[];
  errors: string[];
  fatal: string[];
}

function splitter(max?: number): { s: JsonStreamSplitter; seen: Seen } {
  const seen: Seen = { values: [], errors: [], fatal: [] };
  const s = new JsonStreamSplitter(
    {
      value: (v) => seen.values.push(v),
      parseError: (d) => seen.errors.push(d),
      fatal: (d) => seen.fatal.push(d),
    },
    max,
  );
  return { s, seen };
}

const STREAM = Buffer.from(
  '{"execute":"a","id":1}{"execute":"b","arguments":{"s":"}{[\\"\\\\","t":\'x"y\'},"id":[1,{"z":2}]}\r\n' +
    "  {'execute':'c','arguments':{'q':'it\\'s'}}\n[1,2] 42 true \"str\" {\"u\":\"é😀\"}\n",
  'utf8',
);
const EXPECTED: unknown[] = [
  { execute: 'a', id: 1 },
  { execute: 'b', arguments: { s: '}{["\\', t: 'x"y' }, id: [1, { z: 2 }] },
  { execute: 'c', arguments: { q: "it's" } },
  [1, 2],
  42,
  true,
  'str',
  { u: 'é😀' },
];

describe('JsonStreamSplitter', () => {
  it('splits concatenated values, whatever the chunking (every split point, and byte by byte)', () => {
    const whole = splitter();
    whole.s.push(STREAM);
    assert.deepEqual(whole.seen.values, EXPECTED);
    for (let cut = 1; cut < STREAM.length; cut++) {
      const { s, seen } = splitter();
      s.push(STREAM.subarray(0, cut));
      s.push(STREAM.subarray(cut));
      assert.deepEqual(seen.values, EXPECTED, `split at ${cut}`);
      assert.deepEqual(seen.errors, []);
    }
    const { s, seen } = splitter();
    for (let i = 0; i < STREAM.length; i++) s.push(STREAM.subarray(i, i + 1));
    assert.deepEqual(seen.values, EXPECTED);
    assert.equal(s.pendingBytes, 0);
  });

  it('does not depend on the caller keeping its chunk (static read buffers)', () => {
    const { s, seen } = splitter();
    const scratch = Buffer.alloc(8);
    for (let off = 0; off < STREAM.length; off += 8) {
      const n = STREAM.copy(scratch, 0, off, off + 8);
      s.push(scratch.subarray(0, n));
      scratch.fill(0x7b); // scribble over it, as the next read would
    }
    assert.deepEqual(seen.values, EXPECTED);
  });

  it('reports unparsable values with QEMU-style text and carries on', () => {
    const { s, seen } = splitter();
    s.push(Buffer.from('{"a": } nonsense {"ok":1} ] {"b":tru}{"ok":2}'));
    assert.deepEqual(seen.values, [{ ok: 1 }, { ok: 2 }]);
    assert.equal(seen.errors.length, 4);
    for (const e of seen.errors) assert.match(e, /^JSON parse error, /);
  });

  it('is fatal past the size limit, whether the value completes or not', () => {
    const big = splitter(16);
    big.s.push(Buffer.from('{"a":"0123456789abcdef"}{"b":1}'));
    assert.deepEqual(big.seen.fatal, ['message exceeds 16 bytes']);
    assert.deepEqual(big.seen.values, []);
    assert.ok(big.s.dead);
    big.s.push(Buffer.from('{"c":1}'));
    assert.deepEqual(big.seen.values, [], 'dead splitter ignores input');

    const open = splitter(16);
    open.s.push(Buffer.from('{"a":"0123'));
    assert.equal(open.s.pendingBytes, 10);
    open.s.push(Buffer.from('456789'));
    assert.deepEqual(open.seen.fatal, []);
    open.s.push(Buffer.from('x'));
    assert.deepEqual(open.seen.fatal, ['message exceeds 16 bytes']);
    assert.equal(open.s.pendingBytes, 0, 'nothing kept after dying');
  });

  it('is fatal past 1024 levels of nesting', () => {
    const { s, seen } = splitter();
    s.push(Buffer.from('['.repeat(1025)));
    assert.deepEqual(seen.fatal, ['JSON parse error, nesting deeper than 1024']);
    const ok = splitter();
    ok.s.push(Buffer.from(`${'['.repeat(1024)}${']'.repeat(1024)}`));
    assert.equal(ok.seen.values.length, 1);
  });
});

describe('encodeQmpLine', () => {
  it('is ASCII with CRLF', () => {
    assert.equal(encodeQmpLine({ a: 'é😀\u007f', b: [1] }), '{"a":"\\u00e9\\ud83d\\ude00\\u007f","b":[1]}\r\n');
    assert.deepEqual(JSON.parse(encodeQmpLine({ a: 'é😀' })), { a: 'é😀' });
  });
});
