// The convergence policy with an injected clock: each test feeds measurements as precopy's loop
// would (time, remaining, pass) and checks which decisions come, in which order.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import {
  applyParameters,
  type ConvergenceDecision,
  type ConvergencePhase,
  ConvergencePolicy,
  type ConvergencePolicySettings,
  convergencePolicyEnabled,
  convergencePolicySettings,
  defaultParameters,
} from '../src/index.ts';

const MiB = 2 ** 20;
const RAM = 64 * MiB;
const OFF: ConvergencePolicySettings = { noProgressTimeoutMs: 0, completionTimeoutMsPerGiB: 0, downtimeLimitStepMs: 0, downtimeLimitMaxMs: 2000, lastStep: 'none' };

/** Drives a policy the way precopy's loop does: one turn every `turnMs`, downtime-limit kept as decided. */
class Driver {
  now = 1000;
  downtimeLimitMs = 50;
  postcopyPossible = true;
  readonly policy = new ConvergencePolicy(this.now, RAM);
  readonly decisions: ConvergenceDecision[] = [];
  constructor(readonly settings: ConvergencePolicySettings) {}

  turn(remainingBytes: number, pass: number, turnMs = 50, phase: ConvergencePhase = 'iterating'): ConvergenceDecision | undefined {
    this.now += turnMs;
    const d = this.policy.tick({ nowMs: this.now, phase, remainingBytes, pass, downtimeLimitMs: this.downtimeLimitMs, postcopyPossible: this.postcopyPossible }, this.settings);
    if (d !== undefined) {
      this.decisions.push(d);
      if (d.step === 'downtime-limit') this.downtimeLimitMs = d.downtimeLimitMs;
    }
    return d;
  }

  /** A migration that does not converge: pass 1 sends all of RAM, then every pass starts with 48 MiB and falls to 0. */
  run(ms: number): void {
    const until = this.now + ms;
    let pass = 1;
    let remaining = RAM;
    while (this.now < until && !this.policy.finished) {
      remaining -= 2 * MiB;
      if (remaining <= 0) {
        pass++;
        remaining = 48 * MiB;
      }
      this.turn(remaining, pass);
    }
  }
}

test('off by default: no decision however long nothing converges', () => {
  const settings = convergencePolicySettings(defaultParameters());
  assert.deepEqual(settings, OFF);
  assert.equal(convergencePolicyEnabled(settings), false);
  const d = new Driver(settings);
  d.run(600_000);
  assert.deepEqual(d.decisions, []);
});

test('no progress: downtime-limit stepped up to the max, one step per timeout, then the last step, then nothing more', () => {
  const d = new Driver({ ...OFF, noProgressTimeoutMs: 1000, downtimeLimitStepMs: 40, downtimeLimitMaxMs: 150, lastStep: 'cancel' });
  d.run(60_000);
  assert.deepEqual(
    d.decisions.map((x) => [x.step, x.reason, x.downtimeLimitMs]),
    [
      ['downtime-limit', 'no-progress', 90],
      ['downtime-limit', 'no-progress', 130],
      ['downtime-limit', 'no-progress', 150],
      ['cancel', 'no-progress', 150],
    ],
  );
  assert.equal(d.policy.finished, true);
  assert.equal(d.policy.decisions, 4);
  // Pass 1 (64 MiB at 2 MiB a turn) is progress all along, and pass 2's start is the first pass
  // start seen: the first step comes a timeout after that, and pass 3 onwards start no lower.
  const secondPassStart = 1000 + 32 * 50;
  assert.equal(d.decisions[0]!.elapsedMs, secondPassStart - 1000 + 1000);
  for (let i = 1; i < d.decisions.length; i++) assert.equal(d.decisions[i]!.elapsedMs - d.decisions[i - 1]!.elapsedMs, 1000, 'a whole timeout between steps');
  assert.equal(d.turn(1, 99, 100_000), undefined, 'finished: nothing more');
});

test('progress is a new minimum of what a pass starts with: shrinking passes keep the policy quiet', () => {
  // The timeout must outlast a pass (1.5 s here): progress is seen once a pass.
  const d = new Driver({ ...OFF, noProgressTimeoutMs: 2000, lastStep: 'cancel' });
  for (let r = RAM; r >= 0; r -= 4 * MiB) d.turn(r, 1);
  let start = 60 * MiB;
  for (let pass = 2; pass < 40; pass++) {
    start -= MiB; // each pass starts a little smaller than the last
    // A pass lasting 1.5 s whose remaining falls to 0: only its start counts.
    for (let r = start; r > 0; r -= start / 30) d.turn(r, pass);
  }
  assert.deepEqual(d.decisions, []);
  // Then passes stop shrinking: one timeout later the last step.
  for (let i = 0; i < 200 && !d.policy.finished; i++) d.turn(start, 100 + Math.floor(i / 10));
  assert.deepEqual(d.decisions.map((x) => [x.step, x.reason]), [['cancel', 'no-progress']]);
});

test('completion timeout: per GiB of guest RAM, straight to the last step whatever the stepping', () => {
  // 64 MiB = 1/16 GiB: 160 s per GiB gives 10 s.
  const d = new Driver({ ...OFF, completionTimeoutMsPerGiB: 160_000, noProgressTimeoutMs: 3000, downtimeLimitStepMs: 10, downtimeLimitMaxMs: 1000, lastStep: 'postcopy' });
  assert.equal(d.policy.completionDeadlineMs(d.settings), 1000 + 10_000);
  d.run(60_000);
  const steps = d.decisions.map((x) => [x.step, x.reason]);
  assert.deepEqual(steps.at(-1), ['postcopy', 'completion-timeout']);
  assert.ok(steps.slice(0, -1).every(([s, r]) => s === 'downtime-limit' && r === 'no-progress'), JSON.stringify(steps));
  assert.equal(d.decisions.at(-1)!.elapsedMs, 10_000);
  assert.ok(d.downtimeLimitMs < 1000, 'the max was not reached before the deadline');
});

test('no stepping, or already at the max: a timeout goes straight to the last step', () => {
  const a = new Driver({ ...OFF, noProgressTimeoutMs: 500, lastStep: 'none' });
  a.run(20_000);
  assert.deepEqual(a.decisions.map((x) => [x.step, x.downtimeLimitMs]), [['none', 50]]);
  const b = new Driver({ ...OFF, noProgressTimeoutMs: 500, downtimeLimitStepMs: 100, downtimeLimitMaxMs: 40, lastStep: 'cancel' });
  b.run(20_000);
  assert.deepEqual(b.decisions.map((x) => [x.step, x.downtimeLimitMs]), [['cancel', 50]]);
});

test('last step postcopy without postcopy-ram: step none, marked as unavailable', () => {
  const d = new Driver({ ...OFF, noProgressTimeoutMs: 500, lastStep: 'postcopy' });
  d.postcopyPossible = false;
  d.run(20_000);
  assert.deepEqual(d.decisions.map((x) => [x.step, x.postcopyUnavailable]), [['none', true]]);
});

test('awaiting the switchover ack: the no-progress clock stands still, the completion timeout counts on', () => {
  // 64 MiB = 1/16 GiB: 160 s per GiB gives 10 s.
  const d = new Driver({ ...OFF, noProgressTimeoutMs: 1000, downtimeLimitStepMs: 10, downtimeLimitMaxMs: 1000, completionTimeoutMsPerGiB: 160_000, lastStep: 'cancel' });
  for (let r = RAM; r >= 0; r -= 4 * MiB) d.turn(r, 1);
  // Converged (a pass finds nothing new) but not acknowledged: a pass a turn, no new minimum.
  let pass = 2;
  while (!d.policy.finished && d.now < 60_000) d.turn(0, pass++, 50, 'awaiting-ack');
  assert.deepEqual(d.decisions.map((x) => [x.step, x.reason, x.phase, x.downtimeLimitMs]), [['cancel', 'completion-timeout', 'awaiting-ack', 50]]);
  assert.equal(d.decisions[0]!.elapsedMs, 10_000);
});

test('held in pre-switchover: nothing stepped, the completion timeout counts on; postcopy can no longer be the last step', () => {
  const settings: ConvergencePolicySettings = { ...OFF, noProgressTimeoutMs: 1000, downtimeLimitStepMs: 10, downtimeLimitMaxMs: 1000, completionTimeoutMsPerGiB: 160_000, lastStep: 'postcopy' };
  const d = new Driver(settings);
  d.turn(MiB, 5);
  while (!d.policy.finished && d.now < 60_000) d.turn(MiB, 5, 100, 'held');
  assert.deepEqual(d.decisions.map((x) => [x.step, x.reason, x.phase, x.postcopyUnavailable]), [['none', 'completion-timeout', 'held', true]]);
  assert.equal(d.policy.sinceProgressMs(d.now), 0, 'the no-progress clock stood still');
  // With last step cancel the hold is cancelled.
  const c = new Driver({ ...settings, lastStep: 'cancel' });
  while (!c.policy.finished && c.now < 60_000) c.turn(MiB, 5, 100, 'held');
  assert.deepEqual(c.decisions.map((x) => [x.step, x.phase, x.postcopyUnavailable]), [['cancel', 'held', false]]);
});

test('settings change between turns apply at the next turn (migrate-set-parameters mid-migration)', () => {
  const settings = { ...OFF };
  const d = new Driver(settings);
  d.run(5000);
  assert.deepEqual(d.decisions, []);
  settings.noProgressTimeoutMs = 1000;
  settings.lastStep = 'cancel';
  // The no-progress clock ran all along: the migration has made none for seconds already.
  d.turn(48 * MiB, 50);
  assert.deepEqual(d.decisions.map((x) => x.step), ['cancel']);
});

test('parameters: names, defaults, ranges and the last step enum', () => {
  const p = applyParameters(defaultParameters(), {
    'x-livemig-no-progress-timeout': 3000,
    'x-livemig-completion-timeout-per-gib': 60_000,
    'x-livemig-downtime-limit-step': 50,
    'x-livemig-downtime-limit-max': 500,
    'x-livemig-convergence-last-step': 'postcopy',
  });
  assert.deepEqual(convergencePolicySettings(p), { noProgressTimeoutMs: 3000, completionTimeoutMsPerGiB: 60_000, downtimeLimitStepMs: 50, downtimeLimitMaxMs: 500, lastStep: 'postcopy' });
  assert.throws(() => applyParameters(p, { 'x-livemig-convergence-last-step': 'abort' }), /Parameter 'x-livemig-convergence-last-step' does not accept value 'abort' \(none, postcopy, cancel\)/);
  assert.throws(() => applyParameters(p, { 'x-livemig-no-progress-timeout': -1 }), /expects a value between 0 and 86400000/);
  assert.throws(() => applyParameters(p, { 'x-livemig-downtime-limit-step': 1.5 }), /expects an integer/);
});
