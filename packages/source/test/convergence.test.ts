// The convergence decisions on their own: time and byte counts are handed in, so every case
// is a few numbers (wire-format.md §9, QEMU 7.2's migration_iteration_run and
// mig_throttle_guest_down).

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import {
  AutoConverge,
  BUFFER_DELAY_MS,
  BandwidthMeter,
  DEFAULT_ROUND_TRIP_MS,
  DEFAULT_STOP_MS,
  decideNext,
  downtimeVerdict,
  expectedDowntimeMs,
  NOTHING_PENDING_GRACE_MS,
  SWITCHOVER_MARGIN,
  type SwitchoverCost,
  SwitchoverCostMeter,
  switchoverThresholdBytes,
  type ThrottleParameters,
} from '../src/convergence.ts';

describe('BandwidthMeter', () => {
  it('measures nothing until a 100 ms window has passed', () => {
    const m = new BandwidthMeter(1_000);
    m.add(50_000);
    assert.equal(m.update(1_099), false);
    assert.equal(m.bandwidth, 0);
    assert.equal(m.conservative, 0, 'nothing to plan with before the first window');
  });

  it('provisionally, before the first window closes, the rate so far; after, the conservative figure', () => {
    const m = new BandwidthMeter(1_000);
    assert.equal(m.provisional(1_000), 0, 'no time passed');
    assert.equal(m.provisional(1_005), 0, 'nothing sent yet');
    m.add(50_000);
    assert.equal(m.provisional(1_010), 5_000, '50 kB in the 10 ms so far');
    assert.equal(m.conservative, 0, 'the plan for pending bytes still waits for a window');
    m.add(950_000);
    m.update(1_000 + BUFFER_DELAY_MS);
    m.add(1);
    assert.equal(m.provisional(1_150), 10_000, 'a window closed: its figure, not the open one');
  });

  it('closes the window at 100 ms: bytes/ms and Mbit/s', () => {
    const m = new BandwidthMeter(1_000);
    m.add(600_000);
    m.add(400_000);
    assert.equal(m.update(1_000 + BUFFER_DELAY_MS), true);
    assert.equal(m.bandwidth, 10_000); // 1,000,000 bytes in 100 ms
    assert.equal(m.mbps, 80); // 10 MB/s = 80 Mbit/s
    assert.equal(m.conservative, 10_000, 'one window: it is the estimate');
  });

  it('divides by the time that really passed; an empty window shows in the last figure, not in the estimate', () => {
    const m = new BandwidthMeter(0);
    m.add(1_000_000);
    assert.equal(m.update(250), true);
    assert.equal(m.bandwidth, 4_000);
    assert.equal(m.update(300), false);
    assert.equal(m.bandwidth, 4_000, 'a window still open changes nothing');
    assert.equal(m.update(350), true);
    assert.equal(m.bandwidth, 0);
    assert.equal(m.conservative, 4_000, 'nothing to send says nothing about the link');
  });

  it('plans with the 25th percentile of the last 10 windows, not the last (fastest) one', () => {
    const m = new BandwidthMeter(0);
    // Windows at 1, 2, …, 12 × 1000 bytes/ms: the first two fall out of the last 10.
    for (let i = 1; i <= 12; i++) {
      m.add(i * 100_000);
      m.update(i * 100);
    }
    assert.equal(m.bandwidth, 12_000);
    // Windows 3…12 sorted: index floor(9 / 4) = 2 → 5,000.
    assert.equal(m.conservative, 5_000);
    // One burst (say into empty socket buffers) does not move it.
    m.add(100_000_000);
    m.update(1_300);
    assert.equal(m.bandwidth, 1_000_000);
    assert.equal(m.conservative, 6_000);
  });
});

describe('the switchover plan', () => {
  const cost: SwitchoverCost = { stopMs: 10, syncMs: 2, deviceSaveMs: 3, deviceStateBytes: 50_000, roundTripMs: 5 };

  it('expects the fixed costs plus every byte left at the bandwidth, with the margin', () => {
    // 20 ms fixed; (950,000 + 50,000 + 10 ms × 100 bytes/ms) / 10,000 bytes/ms = 100.1 ms.
    assert.equal(expectedDowntimeMs(950_000, cost, 10_000, 100), (20 + 100.1) * SWITCHOVER_MARGIN);
    assert.equal(expectedDowntimeMs(0, cost, 0), 20 * SWITCHOVER_MARGIN, 'no bandwidth yet: only the fixed costs are known');
  });

  it("the threshold is the pending size at which the expectation meets the limit", () => {
    const limit = 300;
    const t = switchoverThresholdBytes(limit, cost, 10_000, 100);
    // 300 / 1.25 = 240 ms; 220 ms for bytes: 2,200,000 − 50,000 device bytes − 1,000 dirtied while stopping.
    assert.equal(t, 2_149_000);
    assert.ok(Math.abs(expectedDowntimeMs(t, cost, 10_000, 100) - limit) < 1e-9);
    assert.ok(expectedDowntimeMs(t - 1, cost, 10_000, 100) < limit);
  });

  it('is 0 (iterate) when the fixed costs alone do not fit, or no bandwidth is measured', () => {
    assert.equal(switchoverThresholdBytes(20, cost, 10_000), 0, '20 ms × 1.25 = 25 ms > 20 ms');
    assert.equal(switchoverThresholdBytes(300, cost, 0), 0);
    assert.equal(switchoverThresholdBytes(300, { ...cost, deviceStateBytes: 10_000_000 }, 10_000), 0, 'device state alone too big');
  });

  it('a bigger device state or a slower round trip lowers the threshold by exactly its cost', () => {
    const t = switchoverThresholdBytes(300, cost, 10_000);
    assert.equal(t - switchoverThresholdBytes(300, { ...cost, deviceStateBytes: 150_000 }, 10_000), 100_000);
    assert.equal(t - switchoverThresholdBytes(300, { ...cost, roundTripMs: 15 }, 10_000), 100_000, '10 ms at 10,000 bytes/ms');
    assert.equal(t - switchoverThresholdBytes(300, { ...cost, deviceSaveMs: 13 }, 10_000), 100_000);
  });
});

describe('SwitchoverCostMeter', () => {
  it('defaults before anything is measured; no round trip without a return path', () => {
    assert.deepEqual(new SwitchoverCostMeter(true).cost, { stopMs: DEFAULT_STOP_MS, syncMs: 0, deviceSaveMs: 0, deviceStateBytes: 0, roundTripMs: DEFAULT_ROUND_TRIP_MS });
    assert.equal(new SwitchoverCostMeter(false).cost.roundTripMs, 0);
  });

  it('plans with the largest of the last 4 samples of each cost, and the last device save', () => {
    const c = new SwitchoverCostMeter(true);
    for (const ms of [40, 3, 5, 4, 6]) c.noteRoundTrip(ms);
    c.noteSync(2);
    c.noteSync(1);
    c.noteStop(1);
    c.noteDeviceSave(2, 9_000);
    c.noteDeviceSave(1, 8_000);
    assert.deepEqual(c.cost, { stopMs: 1, syncMs: 2, deviceSaveMs: 1, deviceStateBytes: 8_000, roundTripMs: 6 }, 'the 40 ms round trip has aged out');
  });
});

describe('downtimeVerdict', () => {
  it('rounds the downtime to whole ms, as query-migrate shows it, and the overshoot is what exceeds the limit', () => {
    assert.deepEqual(downtimeVerdict(99.6, 100), { downtimeMs: 100, limitMs: 100, overshootMs: 0 });
    assert.deepEqual(downtimeVerdict(100.5, 100), { downtimeMs: 101, limitMs: 100, overshootMs: 1 });
    assert.deepEqual(downtimeVerdict(481.2, 300), { downtimeMs: 481, limitMs: 300, overshootMs: 181 });
    assert.deepEqual(downtimeVerdict(0.2, 0), { downtimeMs: 0, limitMs: 0, overshootMs: 0 });
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

  it('with nothing pending but a plan that does not fit, waits up to the grace for the costs to come down, then completes', () => {
    const nothing = { ...base, pendingBytes: 0, thresholdBytes: 0 };
    assert.equal(decideNext({ ...nothing, nothingPendingForMs: 0 }), 'iterate');
    assert.equal(decideNext({ ...nothing, nothingPendingForMs: NOTHING_PENDING_GRACE_MS - 1 }), 'iterate');
    assert.equal(decideNext({ ...nothing, nothingPendingForMs: NOTHING_PENDING_GRACE_MS }), 'complete');
    assert.equal(decideNext({ ...nothing, thresholdBytes: 1, nothingPendingForMs: 0 }), 'complete', 'a plan that fits: at once');
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
