// The convergence policy's side of the outgoing migration (README "Convergence policy"): the
// pure ConvergencePolicy (@livemig/protocol) fed on each turn of precopy's loop, while it waits
// for the destination's SWITCHOVER_ACK, and while it is held in pre-switchover; each decision
// reported (log line, then the migration's `convergence` event: QMP, timeline, parameters) and
// then carried out (downtime-limit raised, postcopy asked for, or the migration cancelled).

import {
  type ConvergenceDecision,
  type ConvergencePhase,
  ConvergencePolicy,
  convergencePolicyEnabled,
  convergencePolicySettings,
  isSourceFinal,
} from '@livemig/protocol';
import type { OutgoingMigration } from './migration.ts';

const GIB = 2 ** 30;

/** Why a decision came, for its log line. */
function why(d: ConvergenceDecision, m: OutgoingMigration): string {
  const p = m.o.parameters;
  if (d.reason === 'no-progress') return `no new minimum of remaining for ${p['x-livemig-no-progress-timeout']} ms`;
  const held = d.phase === 'held' ? ', held in pre-switchover' : d.phase === 'awaiting-ack' ? ", waiting for the destination's switchover ack" : '';
  return `completion timeout passed (${p['x-livemig-completion-timeout-per-gib']} ms per GiB of ${(m.guest.ram.totalBytes / GIB).toFixed(3)} GiB${held})`;
}

/** What a decision does, for its log line. */
function what(d: ConvergenceDecision, fromLimitMs: number): string {
  switch (d.step) {
    case 'downtime-limit':
      return `downtime-limit raised from ${fromLimitMs} to ${d.downtimeLimitMs} ms`;
    case 'postcopy':
      return d.phase === 'awaiting-ack' ? 'last step: switching to postcopy once the destination acknowledges the switchover' : 'last step: switching to postcopy';
    case 'cancel':
      return 'last step: cancelling the migration (the source guest runs on)';
    case 'none':
      if (!d.postcopyUnavailable) return 'last step none: the migration goes on';
      return d.phase === 'held'
        ? 'last step postcopy skipped: the switchover has begun (pre-switchover); the migration waits for migrate-continue'
        : 'last step postcopy skipped: capability postcopy-ram is off; the migration goes on';
  }
}

export class ConvergencePolicyRunner {
  readonly #m: OutgoingMigration;
  readonly #policy: ConvergencePolicy;

  constructor(m: OutgoingMigration) {
    this.#m = m;
    // Its timeouts count from the connection, as before total-time took in the connect.
    this.#policy = new ConvergencePolicy(m.connectedAt, m.guest.ram.totalBytes);
  }

  /** One turn: a decision, if one is due, is reported and then carried out. */
  turn(remainingBytes: number, phase: ConvergencePhase): void {
    const m = this.#m;
    const p = m.o.parameters;
    const d = this.#policy.tick(
      { nowMs: m.now(), phase, remainingBytes, pass: m.ram.stats.dirtySyncCount, downtimeLimitMs: p['downtime-limit'], postcopyPossible: m.o.capabilities['postcopy-ram'] },
      convergencePolicySettings(p),
    );
    if (d === undefined) return;
    const fields = { step: d.step, reason: d.reason, phase: d.phase, downtimeLimitMs: d.downtimeLimitMs, remaining: d.remainingBytes, pass: d.pass, elapsedMs: d.elapsedMs };
    m.o.log[d.postcopyUnavailable ? 'warn' : 'info'](fields, `convergence policy: ${why(d, m)}; ${what(d, p['downtime-limit'])}`);
    if (d.step === 'downtime-limit') p['downtime-limit'] = d.downtimeLimitMs;
    m.o.events.convergence?.(d);
    if (d.step === 'postcopy') m.requestPostcopy();
    else if (d.step === 'cancel') m.cancel();
  }

  /** query-migrate's x-livemig-convergence: the policy's state, when it is on or has decided. */
  info(): Record<string, unknown> | undefined {
    const m = this.#m;
    const p = m.o.parameters;
    const settings = convergencePolicySettings(p);
    const policy = this.#policy;
    const last = policy.last;
    if (!convergencePolicyEnabled(settings) && last === undefined) return undefined;
    const now = isSourceFinal(m.state) ? m.startTime + m.totalTime : m.now();
    const deadline = policy.completionDeadlineMs(settings);
    return {
      step: last?.step ?? 'watching',
      ...(last === undefined ? {} : { reason: last.reason }),
      decisions: policy.decisions,
      'downtime-limit': p['downtime-limit'],
      'no-progress-ms': Math.round(policy.sinceProgressMs(now)),
      ...(deadline === undefined ? {} : { 'completion-deadline-ms': Math.round(deadline - m.connectedAt) }),
    };
  }
}
