// RateLimiter with the clock handed in: the line is rate × elapsed + one burst, a stalled
// sender banks at most one 100 ms window, and a rate change keeps what is owed.

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { RateLimiter } from '../src/rate-limiter.ts';

const MB = 1_000_000;
const BURST = 256 * 1024;

describe('RateLimiter', () => {
  it('0 bytes/s is unlimited: any amount, no wait, whatever was consumed', () => {
    const l = new RateLimiter(0, 0);
    assert.equal(l.unlimited, true);
    l.consume(10 * MB);
    assert.equal(l.allowance(0), Infinity);
    assert.equal(l.delayFor(100 * MB, 0), 0);
  });

  it('starts with one burst and grows with the rate', () => {
    const l = new RateLimiter(10 * MB, 1_000);
    assert.equal(l.rate, 10 * MB);
    assert.equal(l.allowance(1_000), BURST);
    l.consume(BURST);
    assert.equal(l.allowance(1_000), 0);
    assert.equal(l.allowance(1_010), 100_000); // 10 ms at 10 MB/s
  });

  it('takes the burst from the constructor', () => {
    const l = new RateLimiter(10 * MB, 0, 4096);
    assert.equal(l.burstBytes, 4096);
    assert.equal(l.allowance(0), 4096);
  });

  it('delayFor says how long until that many bytes fit, and 0 when they already do', () => {
    const l = new RateLimiter(1 * MB, 0);
    l.consume(BURST);
    assert.equal(l.delayFor(0, 0), 0);
    assert.equal(l.delayFor(100_000, 0), 100); // 100 kB at 1 MB/s
    assert.equal(l.delayFor(100_000, 40), 60);
    assert.equal(l.delayFor(100_000, 100), 0);
  });

  it('keeps any window on the rate: sending whenever allowed gives rate × time + one burst', () => {
    const l = new RateLimiter(8 * MB, 0);
    let sent = 0;
    for (let now = 0; now <= 10_000; now += 7) {
      const n = Math.min(64 * 1024, l.allowance(now));
      if (n <= 0) continue;
      l.consume(n);
      sent += n;
    }
    // 10 s at 8 MB/s plus the first burst, give or take the last partial step.
    assert.ok(sent <= 80 * MB + BURST, `sent ${sent}`);
    assert.ok(sent >= 80 * MB + BURST - 64 * 1024 - 8 * 7_000, `sent ${sent}`);
  });

  it('a debt (one batch over the line) is paid back before more may go', () => {
    const l = new RateLimiter(1 * MB, 0);
    l.consume(BURST + 500_000);
    assert.equal(l.allowance(0), -500_000);
    assert.equal(l.delayFor(1, 0), 500.001);
    assert.equal(l.allowance(500), 0);
  });

  it('time spent stalled banks at most one 100 ms window (or one burst, if larger)', () => {
    const fast = new RateLimiter(100 * MB, 0);
    fast.consume(BURST);
    assert.equal(fast.allowance(60_000), 10 * MB, '100 ms of 100 MB/s, not a minute of it');
    fast.consume(10 * MB);
    assert.equal(fast.allowance(60_000), 0);
    assert.equal(fast.allowance(60_001), 100_000, 'back on the line from there');

    const slow = new RateLimiter(1 * MB, 0);
    assert.equal(slow.allowance(60_000), BURST, '100 ms of 1 MB/s is below one burst');
  });

  it('setRate: a new rate from now on, credit carried over up to one burst', () => {
    const l = new RateLimiter(1 * MB, 0);
    l.consume(BURST);
    assert.equal(l.allowance(50), 50_000);
    l.setRate(10 * MB, 50);
    assert.equal(l.rate, 10 * MB);
    assert.equal(l.allowance(50), 50_000, 'no jump at the change');
    assert.equal(l.allowance(60), 150_000, 'then 10 ms at the new rate');
  });

  it('setRate keeps a debt owed', () => {
    const l = new RateLimiter(10 * MB, 0);
    l.consume(BURST + 1 * MB);
    l.setRate(1 * MB, 0);
    assert.equal(l.allowance(0), -1 * MB);
    assert.equal(l.delayFor(0, 0), 1_000, 'the megabyte owed now takes 1 s at 1 MB/s');
  });

  it('setRate to unlimited and back starts again from one burst', () => {
    const l = new RateLimiter(1 * MB, 0);
    l.consume(BURST + 5 * MB);
    l.setRate(0, 10);
    assert.equal(l.unlimited, true);
    l.consume(50 * MB); // what goes while unlimited is not held against the next rate
    assert.equal(l.delayFor(50 * MB, 20), 0);
    l.setRate(2 * MB, 30);
    assert.equal(l.unlimited, false);
    assert.equal(l.allowance(30), BURST);
    l.consume(BURST);
    assert.equal(l.allowance(40), 20_000, '10 ms at 2 MB/s');
  });

  it('setRate from unlimited to limited never carries more than one burst of credit', () => {
    const l = new RateLimiter(0, 0);
    l.setRate(1 * MB, 10_000);
    assert.equal(l.allowance(10_000), BURST);
  });

  it('delayFor a request larger than one window reaches 0: waiting as told lets it go', () => {
    const l = new RateLimiter(1_000_000, 0);
    l.consume(BURST);
    let t = 0;
    for (let i = 0; i < 3 && l.delayFor(1 << 20, t) > 0; i++) t += l.delayFor(1 << 20, t);
    assert.equal(l.delayFor(1 << 20, t), 0, `still ${l.delayFor(1 << 20, t)} ms at t=${t}`);
  });
});
