// One progress model for a migration, used by the source's query-migrate (`x-progress`), its
// terminal bar, and the demo's bar: a fraction that never goes back, an ETA that says what it
// rests on, and one unit family (GiB, GiB/s).
//
// The fraction is work done against an estimate of the whole work (README "Progress"):
//
//   done      = bytes sent so far (D)
//   ahead     = remaining dirty bytes R, plus what the guest dirties while they are sent:
//               sending R at bandwidth B takes R/B s, during which d·R/B bytes are dirtied, and
//               so on: R·(1 + d/B + (d/B)² + …) = R / (1 − d/B)           (only when d < B)
//   fraction  = D / (D + ahead), held at its highest value so far (a new pass that finds more
//               dirty pages makes the estimate bigger, never the bar shorter), below 1 until the
//               migration has completed, then exactly 1.
//
// The ETA is ahead / B with basis "bandwidth-and-dirty-rate"; when d ≥ B there is none (basis
// "not-converging": at this dirty rate precopy never ends); before anything is measured the basis
// is "measuring".

export type ProgressBasis = 'measuring' | 'bandwidth-and-dirty-rate' | 'not-converging' | 'completed' | 'ended';

export interface ProgressSample {
  status: string;
  /** Bytes sent so far. */
  transferredBytes: number;
  /** Dirty bytes still to send (QEMU's ram.remaining). */
  remainingBytes: number;
  totalBytes: number;
  /** Measured send rate. */
  bytesPerSecond: number;
  /** Measured rate at which the guest dirties pages, in bytes. */
  dirtyBytesPerSecond: number;
}

export interface Progress {
  /** 0…1, never decreasing over one migration; 1 only once completed. */
  fraction: number;
  /** Milliseconds left, or null when there is no basis for one. */
  etaMs: number | null;
  basis: ProgressBasis;
}

// Below 1 until completed: a migration at "100 %" that still runs would be a lie.
const MAX_RUNNING_FRACTION = 0.99;

/** A migration's progress; feed it every sample (query-migrate answers, bar ticks). */
export class ProgressModel {
  #fraction = 0;

  update(s: ProgressSample): Progress {
    if (s.status === 'completed') {
      this.#fraction = 1;
      return { fraction: 1, etaMs: 0, basis: 'completed' };
    }
    if (s.status === 'failed' || s.status === 'cancelled') return { fraction: this.#fraction, etaMs: null, basis: 'ended' };
    const B = s.bytesPerSecond;
    const d = s.dirtyBytesPerSecond;
    let ahead: number;
    let etaMs: number | null;
    let basis: ProgressBasis;
    if (!(B > 0) || s.transferredBytes <= 0) {
      ahead = Math.max(s.remainingBytes, s.totalBytes - s.transferredBytes);
      etaMs = null;
      basis = 'measuring';
    } else if (d >= B) {
      ahead = Number.POSITIVE_INFINITY;
      etaMs = null;
      basis = 'not-converging';
    } else {
      ahead = s.remainingBytes / (1 - d / B);
      etaMs = Math.round((ahead / B) * 1000);
      basis = 'bandwidth-and-dirty-rate';
    }
    const raw = s.transferredBytes > 0 ? s.transferredBytes / (s.transferredBytes + ahead) : 0;
    this.#fraction = Math.max(this.#fraction, Math.min(MAX_RUNNING_FRACTION, Number.isFinite(raw) ? raw : 0));
    return { fraction: this.#fraction, etaMs, basis };
  }
}

const GiB = 2 ** 30;

/** Bytes as GiB with two decimals: the one unit progress and summaries use. */
export function formatGiB(bytes: number): string {
  return `${(bytes / GiB).toFixed(2)} GiB`;
}

/** A rate as GiB/s with two decimals. */
export function formatGiBps(bytesPerSecond: number): string {
  return `${(bytesPerSecond / GiB).toFixed(2)} GiB/s`;
}

function formatEta(p: Progress): string {
  if (p.etaMs === null) return p.basis === 'not-converging' ? 'ETA none: dirtying faster than sending' : 'ETA measuring';
  const s = Math.ceil(p.etaMs / 1000);
  return `ETA ${s >= 60 ? `${Math.floor(s / 60)} min ${s % 60} s` : `${s} s`}`;
}

export interface ProgressLineFigures {
  status: string;
  progress: Progress;
  transferredBytes: number;
  remainingBytes: number;
  bytesPerSecond: number;
  passes: number;
}

/** The bar and its figures on one line, e.g. `[#####.....]  48 %  active  sent 0.50 GiB, …`. */
export function progressLine(f: ProgressLineFigures, width = 30): string {
  const filled = Math.floor(f.progress.fraction * width);
  const bar = `[${'#'.repeat(filled)}${'.'.repeat(width - filled)}]`;
  return (
    `${bar} ${Math.floor(f.progress.fraction * 100).toString().padStart(3)} %  ${f.status.padEnd(9)} ` +
    `sent ${formatGiB(f.transferredBytes)}, ${formatGiB(f.remainingBytes)} dirty, ${formatGiBps(f.bytesPerSecond)}, pass ${f.passes}, ${formatEta(f.progress)}`
  );
}

/** A status line for the preparation phase (before there is a migration to measure). */
export function preparingLine(what: string, elapsedMs: number): string {
  return `preparing: ${what} (${(elapsedMs / 1000).toFixed(0)} s)`;
}

/**
 * One line redrawn in place at the bottom of a terminal (stderr by default), never printed when
 * it is not a TTY. Other output goes through print() (or, for the logger, setStatusLine), which
 * clears the line, writes above it and redraws it, so the two never run into each other.
 */
export class TtyProgress {
  private readonly stream: NodeJS.WriteStream;
  private line = '';
  constructor(stream: NodeJS.WriteStream = process.stderr) {
    this.stream = stream;
  }
  get enabled(): boolean {
    return this.stream.isTTY === true;
  }
  update(line: string): void {
    if (!this.enabled) return;
    this.line = line;
    this.stream.write(`\r\x1b[K${line}`);
  }
  /** Take the line off the screen (before other output). */
  clear(): void {
    if (this.line !== '') this.stream.write('\r\x1b[K');
  }
  /** Put it back (after other output). */
  redraw(): void {
    if (this.line !== '') this.stream.write(`\r\x1b[K${this.line}`);
  }
  /** Write a whole line to `out` above the progress line. */
  print(out: NodeJS.WritableStream, text: string): void {
    this.clear();
    out.write(`${text}\n`);
    this.redraw();
  }
  done(): void {
    this.clear();
    this.line = '';
  }
}
