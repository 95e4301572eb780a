// Records one outgoing migration's timeline (@livemig/machine's timeline.ts): a sample of its
// counters every TIMELINE_INTERVAL_MS, plus events as they happen. Sampling reads a handful of
// counters the migration keeps anyway (ramInfo()), so it costs nothing per page.

import type { ConvergenceDecision } from '@livemig/protocol';
import {
  type Timeline,
  TIMELINE_FORMAT,
  TIMELINE_INTERVAL_MS,
  TIMELINE_VERSION,
  type TimelineEvent,
  type TimelineSample,
} from '@livemig/machine';
import type { MigrationStatus, OutgoingMigration } from './migration.ts';

/**
 * Samples kept at most: past it every second sample goes and the interval doubles, so a
 * migration left paused for days keeps a whole (coarser) timeline in bounded memory
 * (20 000 samples ≈ 4 MB of JSON; 33 min at 100 ms before the first halving).
 */
export const TIMELINE_MAX_SAMPLES = 20_000;

export interface TimelineRecorderOptions {
  uri: string;
  capabilities: string[];
  parameters: Record<string, number | string | boolean | string[]>;
  intervalMs?: number;
}

export class TimelineRecorder {
  readonly #m: OutgoingMigration;
  readonly #doc: Timeline;
  #timer: NodeJS.Timeout;
  #lastStatus: string;
  #switchoverSeen = false;
  /** Resolves with the finished document once the migration has ended. */
  readonly finished: Promise<Timeline>;

  constructor(m: OutgoingMigration, o: TimelineRecorderOptions) {
    this.#m = m;
    const intervalMs = o.intervalMs ?? TIMELINE_INTERVAL_MS;
    this.#doc = {
      format: TIMELINE_FORMAT,
      version: TIMELINE_VERSION,
      intervalMs,
      // The wall clock of the monotonic start (the migration may have started a moment ago).
      startedAt: new Date(Date.now() - (m.now() - m.startTime)).toISOString(),
      uri: o.uri,
      capabilities: o.capabilities,
      parameters: o.parameters,
      ramTotalBytes: m.guest.ram.totalBytes,
      samples: [],
      events: [],
      result: null,
    };
    this.#lastStatus = m.status;
    this.#event({ t: 0, kind: 'status', status: m.status });
    this.#timer = setInterval(() => this.sample(), intervalMs);
    this.#timer.unref();
    this.finished = m.done.then(() => this.#finish());
  }

  /** ms since the migration started. */
  #t(at = this.#m.now()): number {
    return Math.round(Math.max(0, at - this.#m.startTime));
  }

  /** Add an event in time order (the switchover is seen at the next sample, with its exact earlier time). */
  #event(e: TimelineEvent): void {
    const events = this.#doc.events;
    let i = events.length;
    while (i > 0 && events[i - 1]!.t > e.t) i--;
    events.splice(i, 0, e);
  }

  /** The migration's status changed (its QMP MIGRATION event). */
  statusChanged(status: MigrationStatus): void {
    if (status === this.#lastStatus) return;
    this.#lastStatus = status;
    this.#event({ t: this.#t(), kind: 'status', status });
    if (status === 'postcopy-active' && !this.#doc.events.some((e) => e.kind === 'postcopy-start')) this.#event({ t: this.#t(), kind: 'postcopy-start' });
  }

  /** A dirty-bitmap sync started pass `pass` (MIGRATION_PASS). */
  passStarted(pass: number): void {
    this.#event({ t: this.#t(), kind: 'pass', pass });
  }

  /** auto-converge changed the vCPU throttle (each step is a convergence decision). */
  throttled(percent: number): void {
    this.#event({ t: this.#t(), kind: 'throttle', percent });
  }

  /** The convergence policy decided (x-livemig-no-progress-timeout …). */
  convergenceDecided(d: ConvergenceDecision): void {
    this.#event({ t: this.#t(), kind: 'convergence', step: d.step, reason: d.reason, downtimeLimitMs: d.downtimeLimitMs });
  }

  /** Take one sample now (the timer does; the end takes a last one). */
  sample(): void {
    const m = this.#m;
    const r = m.ramInfo();
    // The switchover's exact time is kept by the migration (stopTime); seen at the next sample.
    if (!this.#switchoverSeen && m.stopTime > 0) {
      this.#switchoverSeen = true;
      this.#event({ t: this.#t(m.stopTime), kind: 'switchover-start' });
    }
    const throttle = m.throttlePercent;
    const s: TimelineSample = {
      t: this.#t(),
      status: m.status,
      transferredBytes: r.transferred,
      remainingBytes: r.remaining,
      dirtyBytesPerSecond: r['dirty-pages-rate'] * r['page-size'],
      bytesPerSecond: Math.round((r.mbps * 1e6) / 8),
      pass: r['dirty-sync-count'],
      expectedDowntimeMs: Math.round(m.expectedDowntime),
      throttlePercent: throttle,
    };
    const samples = this.#doc.samples;
    samples.push(s);
    if (samples.length >= TIMELINE_MAX_SAMPLES) this.#halve();
  }

  /** Keep every second sample (the last one too) and sample half as often from now on. */
  #halve(): void {
    const samples = this.#doc.samples;
    const last = samples.at(-1)!;
    const kept = samples.filter((_, i) => i % 2 === 0);
    if (kept.at(-1) !== last) kept.push(last);
    this.#doc.samples = kept;
    this.#doc.intervalMs *= 2;
    clearInterval(this.#timer);
    this.#timer = setInterval(() => this.sample(), this.#doc.intervalMs);
    this.#timer.unref();
  }

  #finish(): Timeline {
    clearInterval(this.#timer);
    const m = this.#m;
    this.sample();
    this.statusChanged(m.status);
    const completed = m.status === 'completed';
    if (completed && m.stopTime > 0) this.#event({ t: this.#t(m.stopTime + m.downtime), kind: 'downtime-end' });
    this.#doc.result = {
      status: m.status,
      totalTimeMs: Math.round(m.totalTime),
      setupTimeMs: Math.round(m.setupTime),
      downtimeMs: completed ? Math.round(m.downtime) : null,
      downtimeLimitMs: m.downtimeLimitMs,
      transferredBytes: m.ramInfo().transferred,
      passes: m.ram.stats.dirtySyncCount,
      errorDesc: m.errorDesc ?? null,
    };
    return this.#doc;
  }

  /** The document so far (a running migration's has result null). */
  document(): Timeline {
    return this.#doc;
  }
}
