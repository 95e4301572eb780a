// livemig's convergence policy (README "Convergence policy"), pure: fed with what the source
// measures on each turn of its precopy loop (time, remaining bytes, pass), it says when a
// migration that does not converge gets its next step. It reads no clock and does no I/O; the
// source carries out what it decides (raise downtime-limit, start postcopy, cancel) and reports it.
//
//   watching ─no progress for no-progress-timeout─→ downtime-limit += step (≤ max), watch again
//      │                                         └→ at the max (or no step): the last step
//      └─ completion timeout (per GiB of guest RAM) passed ─→ the last step at once
//   last step: postcopy (needs postcopy-ram) | cancel | none; after it the policy decides nothing more
//
// Progress is a new minimum of the remaining bytes: during the first pass (all of RAM) as it is
// sent, afterwards at each dirty-bitmap sync (what the next pass must send). Within a later pass
// remaining always falls to about the switchover threshold and rises at the next sync, so that
// low point says nothing about whether the passes shrink. So the timeout must outlast a pass.
//
// Phases (README "Convergence policy"): while precopy iterates both timeouts count. Converged but
// waiting for the destination's SWITCHOVER_ACK (awaiting-ack), or stopped in pre-switchover until
// the operator's migrate-continue (held), there is nothing left to converge: the no-progress
// clock stands still (a higher downtime-limit would not help), the completion timeout counts on.
// Held, the switchover has begun: postcopy can no longer be the last step, cancel still can.

import type { MigrationParameters } from './migration-config.ts';

/** What the policy does once stepping is over (parameter x-livemig-convergence-last-step). */
export const CONVERGENCE_LAST_STEPS = ['none', 'postcopy', 'cancel'] as const;
export type ConvergenceLastStep = (typeof CONVERGENCE_LAST_STEPS)[number];

/** A decision's step: a downtime-limit raise, or the last step taken. */
export const CONVERGENCE_STEPS = ['downtime-limit', ...CONVERGENCE_LAST_STEPS] as const;
export type ConvergenceStep = (typeof CONVERGENCE_STEPS)[number];
/** Why the policy decided. */
export const CONVERGENCE_REASONS = ['no-progress', 'completion-timeout'] as const;
export type ConvergenceReason = (typeof CONVERGENCE_REASONS)[number];

export interface ConvergencePolicySettings {
  /** x-livemig-no-progress-timeout: ms without a new minimum of remaining before the next step (0 = off). */
  noProgressTimeoutMs: number;
  /** x-livemig-completion-timeout-per-gib: ms per GiB of guest RAM the whole migration may take (0 = off). */
  completionTimeoutMsPerGiB: number;
  /** x-livemig-downtime-limit-step: ms added to downtime-limit on each step (0 = no stepping). */
  downtimeLimitStepMs: number;
  /** x-livemig-downtime-limit-max: downtime-limit is never stepped above this (ms). */
  downtimeLimitMaxMs: number;
  lastStep: ConvergenceLastStep;
}

/** Where the source is when it measures (see the module comment). */
export const CONVERGENCE_PHASES = ['iterating', 'awaiting-ack', 'held'] as const;
export type ConvergencePhase = (typeof CONVERGENCE_PHASES)[number];

/** One turn's measurements. */
export interface ConvergenceMeasurement {
  nowMs: number;
  /** Default iterating. */
  phase?: ConvergencePhase;
  remainingBytes: number;
  /** Dirty-bitmap syncs so far (dirty-sync-count). */
  pass: number;
  /** downtime-limit now (ms). */
  downtimeLimitMs: number;
  /** Capability postcopy-ram is on (the last step postcopy needs it). */
  postcopyPossible: boolean;
}

export interface ConvergenceDecision {
  step: ConvergenceStep;
  reason: ConvergenceReason;
  /** downtime-limit after this decision (ms). */
  downtimeLimitMs: number;
  /** ms since the migration started. */
  elapsedMs: number;
  remainingBytes: number;
  pass: number;
  phase: ConvergencePhase;
  /** The last step asked for postcopy but it cannot be had (capability postcopy-ram off, or held in pre-switchover): nothing was done. */
  postcopyUnavailable: boolean;
}

const GIB = 2 ** 30;

/** The policy's settings from the migration parameters (read again on each turn: migrate-set-parameters applies at once). */
export function convergencePolicySettings(p: MigrationParameters): ConvergencePolicySettings {
  return {
    noProgressTimeoutMs: p['x-livemig-no-progress-timeout'],
    completionTimeoutMsPerGiB: p['x-livemig-completion-timeout-per-gib'],
    downtimeLimitStepMs: p['x-livemig-downtime-limit-step'],
    downtimeLimitMaxMs: p['x-livemig-downtime-limit-max'],
    lastStep: p['x-livemig-convergence-last-step'],
  };
}

/** Whether these settings ask for anything at all (off by default). */
export function convergencePolicyEnabled(s: ConvergencePolicySettings): boolean {
  return s.noProgressTimeoutMs > 0 || s.completionTimeoutMsPerGiB > 0;
}

export class ConvergencePolicy {
  readonly #startMs: number;
  readonly #ramBytes: number;
  #firstPass: number | undefined;
  #lastPass: number | undefined;
  #minRemaining = Infinity;
  /** When remaining last reached a new minimum, or a step was taken (the no-progress clock). */
  #progressAtMs: number;
  #finished = false;
  /** Decisions taken so far. */
  decisions = 0;
  /** The last decision, if any. */
  last: ConvergenceDecision | undefined;

  constructor(startMs: number, ramBytes: number) {
    this.#startMs = startMs;
    this.#ramBytes = ramBytes;
    this.#progressAtMs = startMs;
  }

  /** The last step has been taken: nothing more will be decided. */
  get finished(): boolean {
    return this.#finished;
  }

  /** ms since remaining last reached a new minimum (or since the last step). */
  sinceProgressMs(nowMs: number): number {
    return Math.max(0, nowMs - this.#progressAtMs);
  }

  /** When the completion timeout runs out (ms, on the caller's clock), or undefined when it is off. */
  completionDeadlineMs(s: ConvergencePolicySettings): number | undefined {
    if (s.completionTimeoutMsPerGiB <= 0) return undefined;
    return this.#startMs + (s.completionTimeoutMsPerGiB * this.#ramBytes) / GIB;
  }

  /** Feed one turn's measurements; returns a decision when one is due. */
  tick(m: ConvergenceMeasurement, s: ConvergencePolicySettings): ConvergenceDecision | undefined {
    this.#observe(m);
    // Nothing left to converge: only the destination's ack or the operator's continue is awaited.
    if ((m.phase ?? 'iterating') !== 'iterating') this.#progressAtMs = m.nowMs;
    if (this.#finished || !convergencePolicyEnabled(s)) return undefined;
    const deadline = this.completionDeadlineMs(s);
    if (deadline !== undefined && m.nowMs >= deadline) return this.#lastStep(m, s, 'completion-timeout');
    if (s.noProgressTimeoutMs <= 0 || m.nowMs - this.#progressAtMs < s.noProgressTimeoutMs) return undefined;
    const limit = m.downtimeLimitMs;
    if (s.downtimeLimitStepMs > 0 && limit < s.downtimeLimitMaxMs) {
      // Each step gets a whole timeout to show whether the higher limit is enough.
      this.#progressAtMs = m.nowMs;
      return this.#decide(m, 'downtime-limit', 'no-progress', Math.min(limit + s.downtimeLimitStepMs, s.downtimeLimitMaxMs), false);
    }
    return this.#lastStep(m, s, 'no-progress');
  }

  #observe(m: ConvergenceMeasurement): void {
    this.#firstPass ??= m.pass;
    const newPass = m.pass !== this.#lastPass;
    if (newPass && this.#lastPass === this.#firstPass && m.pass !== this.#firstPass) {
      // The first pass ended near zero: later passes are compared by what they start with.
      this.#minRemaining = Infinity;
    }
    this.#lastPass = m.pass;
    if (m.pass !== this.#firstPass && !newPass) return;
    if (m.remainingBytes < this.#minRemaining) {
      this.#minRemaining = m.remainingBytes;
      this.#progressAtMs = m.nowMs;
    }
  }

  #lastStep(m: ConvergenceMeasurement, s: ConvergencePolicySettings, reason: ConvergenceReason): ConvergenceDecision {
    this.#finished = true;
    const unavailable = s.lastStep === 'postcopy' && (!m.postcopyPossible || m.phase === 'held');
    return this.#decide(m, unavailable ? 'none' : s.lastStep, reason, m.downtimeLimitMs, unavailable);
  }

  #decide(m: ConvergenceMeasurement, step: ConvergenceStep, reason: ConvergenceReason, downtimeLimitMs: number, postcopyUnavailable: boolean): ConvergenceDecision {
    const d: ConvergenceDecision = {
      step,
      reason,
      downtimeLimitMs,
      elapsedMs: Math.round(m.nowMs - this.#startMs),
      remainingBytes: m.remainingBytes,
      pass: m.pass,
      phase: m.phase ?? 'iterating',
      postcopyUnavailable,
    };
    this.decisions++;
    this.last = d;
    return d;
  }
}
