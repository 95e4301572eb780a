// The convergence decisions on their own: time and byte counts are handed in, so every case
// is a few numbers (wire-format.md §9, QEMU 7.2's migration_iteration_run and
// mig_throttle_guest_down).

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { AutoConverge, BUFFER_DELAY_MS, BandwidthMeter, decideNext, type ThrottleParameters } from '../src/convergence.ts';

describe('BandwidthMeter', () => {
  it('measures nothing until a 100 ms window has passed', () => {
    const m = new BandwidthMeter(1_000);
    m.add(50_000);
    assert.equal(m.update(1_099, 300), false);
    assert.equal(m.bandwidth, 0);
    assert.equal(m.threshold, 0);
    assert.equal(m.expectedDowntime(1_000_000), 0, 'no estimate before the first window');
  });

  it('closes the window at 100 ms: bytes/ms, the downtime threshold in bytes, and Mbit/s', () => {
    const m = new BandwidthMeter(1_000);
    m.add(600_000);
    m.add(400_000);
    assert.equal(m.update(1_000 + BUFFER_DELAY_MS, 300), true);
    assert.equal(m.bandwidth, 10_000); // 1,000,000 bytes in 100 ms
    assert.equal(m.threshold, 3_000_000); // what fits in 300 ms at that rate
    assert.equal(m.mbps, 80); // 10 MB/s = 80 Mbit/s
    assert.equal(m.expectedDowntime(2_500_000), 250);
  });

  it('divides by the time that really passed, and starts the next window from zero', () => {
    const m = new BandwidthMeter(0);
    m.add(1_000_000);
    assert.equal(m.update(250, 100), true);
    assert.equal(m.bandwidth, 4_000);
    assert.equal(m.threshold, 400_000);
    // Nothing sent in the next window: the measurement drops to 0, not kept from before.
    assert.equal(m.update(300, 100), false);
    assert.equal(m.bandwidth, 4_000, 'a window still open changes nothing');
    assert.equal(m.update(350, 100), true);
    assert.equal(m.bandwidth, 0);
    assert.equal(m.threshold, 0);
  });

  it('uses the downtime limit given at each update', () => {
    const m = new BandwidthMeter(0);
    m.add(100_000);
    m.update(100, 500);
    assert.equal(m.threshold, 500_000);
    m.add(100_000);
    m.update(200, 20);
    assert.equal(m.threshold, 20_000);
  });
});

describe('decideNext', () => {
  const base = { pendingBytes: 10_000, thresholdBytes: 5_000, mustPrecopyBytes: 10_000, postcopyRequested: false, inPostcopy: false };

  it('completes when nothing is pending, even before any bandwidth was measured', () => {
    assert.equal(decideNext({ ...base, pendingBytes: 0, thresholdBytes: 0 }), 'complete');
  });

  it('completes when what is pending fits in the downtime (strictly below the threshold)', () => {
    assert.equal(decideNext({ ...base, pendingBytes: 4_999 }), 'complete');
    assert.equal(decideNext({ ...base, pendingBytes: 5_000 }), 'iterate', 'QEMU: pending < threshold');
    assert.equal(decideNext({ ...base, pendingBytes: 5_001 }), 'iterate');
  });

  it('iterates while the threshold is still 0 (no window measured yet)', () => {
    assert.equal(decideNext({ ...base, pendingBytes: 1, thresholdBytes: 0 }), 'iterate');
  });

  it('switches to postcopy once requested and the precopy-only part fits', () => {
    const requested = { ...base, postcopyRequested: true };
    assert.equal(decideNext({ ...requested, mustPrecopyBytes: 5_000 }), 'postcopy', 'at the threshold counts');
    assert.equal(decideNext({ ...requested, mustPrecopyBytes: 0 }), 'postcopy');
    assert.equal(decideNext({ ...requested, mustPrecopyBytes: 5_001 }), 'iterate');
  });

  it('never switches to postcopy unless asked, nor twice', () => {
    assert.equal(decideNext({ ...base, mustPrecopyBytes: 0 }), 'iterate');
    assert.equal(decideNext({ ...base, mustPrecopyBytes: 0, postcopyRequested: true, inPostcopy: true }), 'iterate');
  });

  it('prefers completing over postcopy when both apply', () => {
    assert.equal(decideNext({ ...base, pendingBytes: 100, mustPrecopyBytes: 0, postcopyRequested: true }), 'complete');
  });
});

describe('AutoConverge', () => {
  const params: ThrottleParameters = {
    throttleTriggerThreshold: 50,
    cpuThrottleInitial: 20,
    cpuThrottleIncrement: 10,
    maxCpuThrottle: 99,
    cpuThrottleTailslow: false,
  };
  const PAGE = 4096;

  /**
   * One period of `periodMs` in which the guest dirtied `dirtyPages` pages while `sentBytes`
   * went out; returns what onSync returned.
   */
  function period(
    ac: AutoConverge,
    state: { nowMs: number; sentBytes: number },
    dirtyPages: number,
    sentBytes: number,
    p: ThrottleParameters = params,
    enabled = true,
    periodMs = 1_000,
  ): number | undefined {
    state.nowMs += periodMs;
    state.sentBytes += sentBytes;
    ac.addDirty(dirtyPages);
    return ac.onSync(state.nowMs, state.sentBytes, PAGE, p, enabled);
  }

  it('does nothing at a sync less than 1 s into the period, and keeps counting the period', () => {
    const ac = new AutoConverge(0);
    ac.addDirty(1_000);
    assert.equal(ac.onSync(999, 1, PAGE, params, true), undefined);
    // The dirty pages of the early sync still belong to the period: two dirty periods throttle.
    assert.equal(ac.onSync(1_000, 1, PAGE, params, true), undefined);
    ac.addDirty(1_000);
    assert.equal(ac.onSync(2_000, 2, PAGE, params, true), 20);
    assert.equal(ac.percent, 20);
  });

  it('starts at cpu-throttle-initial after the second period that dirtied more than the threshold', () => {
    const ac = new AutoConverge(0);
    const s = { nowMs: 0, sentBytes: 0 };
    // 1 MiB sent, threshold 50 % = 512 KiB; 129 pages = 516 KiB dirtied is over it.
    assert.equal(period(ac, s, 129, 1 << 20), undefined, 'first high period only counts');
    assert.equal(period(ac, s, 129, 1 << 20), 20);
    assert.equal(ac.percent, 20);
  });

  it('a period dirtying exactly the threshold does not count', () => {
    const ac = new AutoConverge(0);
    const s = { nowMs: 0, sentBytes: 0 };
    for (let i = 0; i < 4; i++) assert.equal(period(ac, s, 128, 1 << 20), undefined); // 512 KiB = 50 %
    assert.equal(ac.percent, 0);
  });

  it('high periods need not be consecutive (QEMU keeps dirty_rate_high_cnt across calm periods)', () => {
    const ac = new AutoConverge(0);
    const s = { nowMs: 0, sentBytes: 0 };
    assert.equal(period(ac, s, 1_000, 1 << 20), undefined);
    assert.equal(period(ac, s, 0, 1 << 20), undefined);
    assert.equal(period(ac, s, 1_000, 1 << 20), 20);
  });

  it('raises by cpu-throttle-increment every second high period, capped by max-cpu-throttle', () => {
    const ac = new AutoConverge(0);
    const s = { nowMs: 0, sentBytes: 0 };
    const p = { ...params, maxCpuThrottle: 45 };
    const changes: Array<number | undefined> = [];
    for (let i = 0; i < 10; i++) changes.push(period(ac, s, 10_000, 1 << 20, p));
    assert.deepEqual(changes, [undefined, 20, undefined, 30, undefined, 40, undefined, 45, undefined, undefined]);
    assert.equal(ac.percent, 45);
  });

  it('never goes above 99 %', () => {
    const ac = new AutoConverge(0);
    const s = { nowMs: 0, sentBytes: 0 };
    const p = { ...params, cpuThrottleInitial: 95, cpuThrottleIncrement: 50, maxCpuThrottle: 100 };
    period(ac, s, 10_000, 1 << 20, p);
    assert.equal(period(ac, s, 10_000, 1 << 20, p), 95);
    period(ac, s, 10_000, 1 << 20, p);
    assert.equal(period(ac, s, 10_000, 1 << 20, p), 99);
    period(ac, s, 10_000, 1 << 20, p);
    assert.equal(period(ac, s, 10_000, 1 << 20, p), undefined, 'already at the top: no change reported');
  });

  it('counts periods but never throttles while auto-converge is off', () => {
    const ac = new AutoConverge(0);
    const s = { nowMs: 0, sentBytes: 0 };
    for (let i = 0; i < 6; i++) assert.equal(period(ac, s, 10_000, 1 << 20, params, false), undefined);
    assert.equal(ac.percent, 0);
  });

  it('measures sent bytes per period from the running total it is given', () => {
    const ac = new AutoConverge(0);
    // 100 MiB went out before the first sync; per period only 1 MiB goes: the periods are high.
    const s = { nowMs: 0, sentBytes: 100 << 20 };
    ac.onSync(1_000, s.sentBytes, PAGE, params, true); // closes the first period (its dirtying: none)
    s.nowMs = 1_000;
    assert.equal(period(ac, s, 200, 1 << 20), undefined);
    assert.equal(period(ac, s, 200, 1 << 20), 20);
  });

  describe('cpu-throttle-tailslow', () => {
    const slow = { ...params, cpuThrottleTailslow: true, cpuThrottleIncrement: 30 };

    /** An AutoConverge already throttling at 20 %. */
    function throttled(): { ac: AutoConverge; s: { nowMs: number; sentBytes: number } } {
      const ac = new AutoConverge(0);
      const s = { nowMs: 0, sentBytes: 0 };
      period(ac, s, 10_000, 1 << 20, slow);
      assert.equal(period(ac, s, 10_000, 1 << 20, slow), 20);
      return { ac, s };
    }

    it('raises only as far as the dirty rate says: cpu_now × (1 − threshold/dirtied)', () => {
      const { ac, s } = throttled();
      // threshold = 512 KiB; dirtied 640 KiB (160 pages): ratio 1.25, cpu_now 80 → +16.
      period(ac, s, 160, 1 << 20, slow);
      assert.equal(period(ac, s, 160, 1 << 20, slow), 36);
    });

    it('rounds the step up, and is at least 1', () => {
      const { ac, s } = throttled();
      // dirtied 129 pages = 516 KiB: 80 × (1 − 512/516) = 0.62 → 1.
      period(ac, s, 129, 1 << 20, slow);
      assert.equal(period(ac, s, 129, 1 << 20, slow), 21);
    });

    it('is capped by cpu-throttle-increment', () => {
      const { ac, s } = throttled();
      // dirtied 10× the threshold: 80 × 0.9 = 72, but at most +30.
      period(ac, s, 1_280, 1 << 20, slow);
      assert.equal(period(ac, s, 1_280, 1 << 20, slow), 50);
    });
  });
});

describe('decideNext and switchover-ack', () => {
  it('without switchover clearance (no SWITCHOVER_ACK yet) it iterates, converged or not', () => {
    const base = { pendingBytes: 0, thresholdBytes: 5_000, mustPrecopyBytes: 0, postcopyRequested: true, inPostcopy: false };
    assert.equal(decideNext({ ...base, canSwitchover: false }), 'iterate');
    assert.equal(decideNext({ ...base, pendingBytes: 10_000, canSwitchover: false }), 'iterate', 'nor postcopy');
    assert.equal(decideNext({ ...base, canSwitchover: true }), 'complete');
  });
});
