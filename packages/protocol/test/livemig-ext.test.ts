import { test } from 'node:test';
import assert from 'node:assert/strict';
import { BatchWriter, decodeLivemigExt, decodeRequestBatch, encodeLivemigError, encodeRequestBatch, RP_MAX_PAYLOAD, ReturnPathDecoder, NEED_MORE_RP } from '../src/index.ts';

test('livemig error report: round trip with and without an offset', () => {
  assert.deepEqual(decodeLivemigExt(encodeLivemigError({ code: 'LM_ERR_BAD_MAGIC', message: 'bad magic', offset: 0 })), {
    kind: 'error',
    code: 'LM_ERR_BAD_MAGIC',
    message: 'bad magic',
    offset: 0,
  });
  assert.deepEqual(decodeLivemigExt(encodeLivemigError({ code: 'LM_ERR_CONFIG_MISMATCH', message: 'x' })), { kind: 'error', code: 'LM_ERR_CONFIG_MISMATCH', message: 'x' });
});

test('livemig error report: a long message is shortened to fit one return-path message', () => {
  const payload = encodeLivemigError({ code: 'LM_ERR_CONFIG_MISMATCH', message: 'y'.repeat(2000), offset: 123 });
  assert.ok(payload.length <= RP_MAX_PAYLOAD, `${payload.length} bytes`);
  const m = decodeLivemigExt(payload);
  assert.equal(m.kind, 'error');
  if (m.kind === 'error') {
    assert.equal(m.message.length, 400);
    assert.equal(m.offset, 123);
  }
});

test('livemig extension: a request batch is recognised by its first byte; junk is unknown, never an exception', () => {
  const w = new BatchWriter();
  encodeRequestBatch(w, 'pc.ram', [1, 2, 3]);
  const rp = new ReturnPathDecoder({ livemigExtensions: true });
  rp.push(w.flushConcat());
  const m = rp.next();
  assert.notEqual(m, NEED_MORE_RP);
  assert.deepEqual(decodeLivemigExt((m as { payload: Buffer }).payload), { kind: 'request-batch' });
  for (const junk of [Buffer.from([0xc1]), Buffer.alloc(0), Buffer.from([0x92, 0x01, 0x02]), Buffer.from([0x81, 0xa4, 0x6b, 0x69, 0x6e, 0x64, 0x01])]) {
    assert.deepEqual(decodeLivemigExt(junk), { kind: 'unknown' });
  }
});

test('request batch: decoded page by page; a malformed one is LM_ERR_BAD_RP_PAYLOAD', () => {
  const w = new BatchWriter();
  encodeRequestBatch(w, 'pc.ram', [7, 9, 70_000]);
  const rp = new ReturnPathDecoder({ livemigExtensions: true });
  rp.push(w.flushConcat());
  const payload = (rp.next() as { payload: Buffer }).payload;
  const pages: Array<[string, number]> = [];
  decodeRequestBatch(payload, (block, page) => pages.push([block, page]));
  assert.deepEqual(pages, [['pc.ram', 7], ['pc.ram', 9], ['pc.ram', 70_000]]);
  const bad = [payload.subarray(0, payload.length - 1), Buffer.concat([Buffer.from([0x02]), payload.subarray(1)]), Buffer.from([0x01, 8, 0])];
  for (const p of bad) assert.throws(() => decodeRequestBatch(p, () => {}), { code: 'LM_ERR_BAD_RP_PAYLOAD', name: 'ProtocolError' });
});
