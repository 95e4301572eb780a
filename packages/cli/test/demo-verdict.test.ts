// The demo's verdict from its three facts: verified or not, the downtime, and its limit.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { demoVerdict, EXIT_DOWNTIME_OVER } from '../src/demo.ts';

test('PASS (0) only when verified and within the limit; the limit itself counts as within', () => {
  assert.equal(demoVerdict(true, 42, 300).status, 0);
  assert.match(demoVerdict(true, 300, 300).line, /^VERDICT: PASS — .*downtime 300 ms within the 300 ms limit/);
});

test('OVER (3) when verified but the downtime exceeded the limit, with the figures', () => {
  const v = demoVerdict(true, 481, 300);
  assert.equal(v.status, EXIT_DOWNTIME_OVER);
  assert.equal(EXIT_DOWNTIME_OVER, 3);
  assert.match(v.line, /^VERDICT: OVER — downtime 481 ms exceeded the 300 ms limit by 181 ms/);
});

test('FAIL (1) when not verified, whatever the downtime', () => {
  assert.deepEqual(demoVerdict(false, 10, 300), { line: 'VERDICT: FAIL', status: 1 });
  assert.deepEqual(demoVerdict(false, 900, 300), { line: 'VERDICT: FAIL', status: 1 });
});
