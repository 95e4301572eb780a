// One-line progress for a terminal: redrawn in place, never printed when not on a TTY.

export interface ProgressFigures {
  status: string;
  transferred: number;
  total: number;
  remaining: number;
  mbps: number;
  passes: number;
}

function gib(n: number): string {
  return n >= 2 ** 30 ? `${(n / 2 ** 30).toFixed(2)} GiB` : `${(n / 2 ** 20).toFixed(1)} MiB`;
}

export function progressLine(f: ProgressFigures, width = 24): string {
  const done = f.total > 0 ? Math.min(1, Math.max(0, 1 - f.remaining / f.total)) : 0;
  const filled = Math.round(done * width);
  const bar = `[${'#'.repeat(filled)}${'.'.repeat(width - filled)}]`;
  return `${bar} ${(done * 100).toFixed(0).padStart(3)} %  ${f.status.padEnd(9)} sent ${gib(f.transferred)}, ${gib(f.remaining)} dirty, ${f.mbps.toFixed(0)} Mbit/s, pass ${f.passes}`;
}

export class TtyProgress {
  private readonly stream: NodeJS.WriteStream;
  private shown = false;
  constructor(stream: NodeJS.WriteStream = process.stderr) {
    this.stream = stream;
  }
  get enabled(): boolean {
    return this.stream.isTTY === true;
  }
  update(line: string): void {
    if (!this.enabled) return;
    this.stream.write(`\r\x1b[K${line}`);
    this.shown = true;
  }
  done(): void {
    if (this.shown) this.stream.write('\r\x1b[K');
    this.shown = false;
  }
}
