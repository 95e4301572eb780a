// Logging: one pino root logger per process, one child per component (`name` field). Logs go to
// stderr so stdout stays free for machine-readable output (`--json`). Pretty when a person is
// watching (stderr is a TTY), JSON lines otherwise. Both streams are synchronous: log volume is a
// line per iteration, and a crash must not eat the lines that explain it.

import { writeSync } from 'node:fs';
import { Writable } from 'node:stream';
import pino from 'pino';
import pinoPretty from 'pino-pretty';

export type Logger = pino.Logger;
export type LogLevel = pino.LevelWithSilent;

export interface LoggerOptions {
  /** Level for this logger. Default: env LIVEMIG_LOG_LEVEL, else 'info'. */
  level?: LogLevel;
  /** Human-readable output. Default: whether stderr is a TTY. Only the first call decides this. */
  pretty?: boolean;
}

const LEVELS: ReadonlySet<string> = new Set(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent']);

let root: Logger | undefined;

/** A line redrawn at the bottom of the terminal (a progress bar), kept clear of log lines. */
export interface StatusLine {
  clear(): void;
  redraw(): void;
}

let statusLine: StatusLine | undefined;

/**
 * While set, each pretty log line is written above `line`: it is cleared first and redrawn after,
 * so a progress bar on stderr and the logs never run into each other. Undefined removes it.
 */
export function setStatusLine(line: StatusLine | undefined): void {
  statusLine = line;
}

// fd 2, written synchronously, with the status line (if any) taken off the screen around each line.
function stderrAroundStatusLine(): Writable {
  return new Writable({
    write(chunk: Buffer, _encoding, callback): void {
      statusLine?.clear();
      writeSync(2, chunk);
      statusLine?.redraw();
      callback();
    },
  });
}

/** The level LIVEMIG_LOG_LEVEL asks for, or undefined when unset or not a pino level. */
function envLevel(): LogLevel | undefined {
  const value = process.env['LIVEMIG_LOG_LEVEL']?.trim().toLowerCase();
  return value !== undefined && LEVELS.has(value) ? (value as LogLevel) : undefined;
}

/**
 * A logger for one component of this process, e.g. `createLogger('qmp')`. The first call creates
 * the process's root logger (its `pretty` choice sticks); later calls make children of it.
 */
export function createLogger(name: string, options: LoggerOptions = {}): Logger {
  const level = options.level ?? envLevel() ?? 'info';
  if (root === undefined) {
    const pretty = options.pretty ?? process.stderr.isTTY === true;
    const destination = pretty
      ? pinoPretty({ destination: stderrAroundStatusLine(), sync: true, colorize: process.stderr.isTTY === true, translateTime: 'SYS:HH:MM:ss.l' })
      : pino.destination({ dest: 2, sync: true });
    // The root passes everything; each child filters at its own level.
    root = pino({ level: 'trace', base: { pid: process.pid } }, destination);
    const raw = process.env['LIVEMIG_LOG_LEVEL'];
    if (raw !== undefined && raw.trim() !== '' && envLevel() === undefined) {
      root.child({ name: 'log' }).warn(`LIVEMIG_LOG_LEVEL=${JSON.stringify(raw)} is not a level (${[...LEVELS].join(', ')}); using info`);
    }
  }
  return root.child({ name }, { level });
}
