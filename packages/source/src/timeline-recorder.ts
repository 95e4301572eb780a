// Records one outgoing migration's timeline (@livemig/machine's timeline.ts): a sample of its
// counters every TIMELINE_INTERVAL_MS, plus events as they happen. Sampling reads a handful of
// counters the migration keeps anyway (ramInfo()), so it costs nothing per page.

import {
  type Timeline,
  TIMELINE_FORMAT,
  TIMELINE_INTERVAL_MS,
  TIMELINE_VERSION,
  type TimelineEvent,
  type TimelineSample,
} from '@livemig/machine';
import type { MigrationStatus, OutgoingMigration } from './migration.ts';

export interface TimelineRecorderOptions {
  uri: string;
  capabilities: string[];
  parameters: Record<string, number | string | boolean>;
  intervalMs?: number;
}

export class TimelineRecorder {
  readonly #m: OutgoingMigration;
  readonly #doc: Timeline;
  readonly #timer: NodeJS.Timeout;
  #lastStatus: string;
  #lastThrottle = 0;
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

  #event(e: TimelineEvent): void {
    this.#doc.events.push(e);
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
    if (throttle !== this.#lastThrottle) {
      this.#lastThrottle = throttle;
      this.#event({ t: this.#t(), kind: 'throttle', percent: throttle });
    }
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
    this.#doc.samples.push(s);
  }

  #finish(): Timeline {
    clearInterval(this.#timer);
    const m = this.#m;
    this.sample();
    this.statusChanged(m.status);
    const completed = m.status === 'completed';
    if (completed && m.stopTime > 0) this.#event({ t: this.#t(m.stopTime + m.downtime), kind: 'downtime-end' });
    // Events came from two clocks' worth of callers (sampled and immediate): keep them in time order.
    this.#doc.events.sort((a, b) => a.t - b.t);
    this.#doc.result = {
      status: m.status,
      totalTimeMs: Math.round(m.totalTime),
      setupTimeMs: Math.round(m.setupTime),
      downtimeMs: completed ? Math.round(m.downtime) : null,
      downtimeLimitMs: m.o.parameters['downtime-limit'],
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
