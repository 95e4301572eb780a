// The progress model: work done against an estimate that includes the dirty rate, held so it
// never goes back; an ETA with its basis; GiB and GiB/s only.

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { formatGiB, formatGiBps, ProgressModel, progressLine, type ProgressSample } from '../src/index.ts';

const GiB = 2 ** 30;
const sample = (o: Partial<ProgressSample>): ProgressSample => ({
  status: 'active',
  transferredBytes: 0,
  remainingBytes: 0,
  totalBytes: 4 * GiB,
  bytesPerSecond: 0,
  dirtyBytesPerSecond: 0,
  ...o,
});

describe('ProgressModel', () => {
  it('is done / (done + remaining / (1 - dirty rate / bandwidth)), with an ETA on that basis', () => {
    const p = new ProgressModel().update(sample({ transferredBytes: GiB, remainingBytes: GiB, bytesPerSecond: GiB, dirtyBytesPerSecond: GiB / 2 }));
    assert.equal(p.fraction, 1 / 3); // ahead = 1 GiB / (1 - 0.5) = 2 GiB
    assert.equal(p.etaMs, 2000);
    assert.equal(p.basis, 'bandwidth-and-dirty-rate');
  });

  it('never goes back when a new pass finds more dirty pages, and stays below 1 until completed', () => {
    const m = new ProgressModel();
    const a = m.update(sample({ transferredBytes: 3 * GiB, remainingBytes: GiB / 4, bytesPerSecond: GiB, dirtyBytesPerSecond: 0 }));
    const b = m.update(sample({ transferredBytes: 3.1 * GiB, remainingBytes: 2 * GiB, bytesPerSecond: GiB, dirtyBytesPerSecond: GiB / 2 }));
    assert.ok(a.fraction > 0.9);
    assert.equal(b.fraction, a.fraction, 'held, not lowered');
    const c = m.update(sample({ transferredBytes: 100 * GiB, remainingBytes: 0, bytesPerSecond: GiB }));
    assert.equal(c.fraction, 0.99, 'a running migration is never shown at 100 %');
    assert.deepEqual(m.update(sample({ status: 'completed' })), { fraction: 1, etaMs: 0, basis: 'completed' });
  });

  it('has no ETA before anything is measured, or while the guest dirties faster than we send', () => {
    const m = new ProgressModel();
    assert.deepEqual(m.update(sample({ status: 'setup' })), { fraction: 0, etaMs: null, basis: 'measuring' });
    const stuck = m.update(sample({ transferredBytes: GiB, remainingBytes: GiB, bytesPerSecond: GiB / 10, dirtyBytesPerSecond: GiB / 5 }));
    assert.equal(stuck.basis, 'not-converging');
    assert.equal(stuck.etaMs, null);
    assert.equal(stuck.fraction, 0, 'no estimate of the whole: nothing claimed');
    assert.equal(m.update(sample({ status: 'failed' })).basis, 'ended');
  });

  it('draws one line in GiB and GiB/s, with the ETA and its basis', () => {
    const progress = new ProgressModel().update(sample({ transferredBytes: GiB, remainingBytes: GiB, bytesPerSecond: GiB, dirtyBytesPerSecond: GiB / 2 }));
    const line = progressLine({ status: 'active', progress, transferredBytes: GiB, remainingBytes: GiB, bytesPerSecond: GiB / 4, passes: 2 });
    assert.equal(line, `[##########....................]  33 %  active    sent 1.00 GiB, 1.00 GiB dirty, 0.25 GiB/s, pass 2, ETA 2 s`);
    assert.equal(formatGiB(GiB / 2), '0.50 GiB');
    assert.equal(formatGiBps(3 * GiB), '3.00 GiB/s');
    assert.match(progressLine({ status: 'active', progress: { fraction: 0.5, etaMs: null, basis: 'not-converging' }, transferredBytes: 0, remainingBytes: 0, bytesPerSecond: 0, passes: 1 }), /ETA none: dirtying faster than sending$/);
  });
});
