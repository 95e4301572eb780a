// End-to-end harness: real livemig-source / livemig-destination processes (the built dist, run
// with this very node), each with its own QMP socket in a short per-test temp dir.
//
//   await withHarness(async (h) => {
//     const dst = await h.destination({ incoming: 'tcp', paused: true, guest: ['-m', '64M'] });
//     const src = await h.source({ guest: ['-m', '64M'] });
//     await src.qmp.execute('migrate', { uri: dst.incomingUri });
//   });
//
// Every wait is bounded. Whatever happens in the body, every child is killed by pid at the end
// (SIGTERM, then SIGKILL after a bounded grace) and the temp dir removed; a failure carries the
// tail of each child's output.

import { type ChildProcess, execFile, spawn } from 'node:child_process';
import { closeSync, openSync, readFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { QmpClient, type QmpEvent } from '@livemig/runtime';
import { within } from '../../packages/runtime/test/helpers.ts';

export const SOURCE_MAIN = fileURLToPath(new URL('../../packages/source/dist/main.js', import.meta.url));
export const DESTINATION_MAIN = fileURLToPath(new URL('../../packages/destination/dist/main.js', import.meta.url));
export const CLI_MAIN = fileURLToPath(new URL('../../packages/cli/dist/main.js', import.meta.url));

/** Bound on a child's QMP socket starting to accept (it prefaults guest RAM first). */
const QMP_START_MS = 30_000;
/** Bound on one QMP reply. */
const QMP_REPLY_MS = 30_000;
/** SIGTERM grace before SIGKILL at cleanup, and the bound on exit after SIGKILL. */
const TERM_GRACE_MS = 3_000;
const KILL_WAIT_MS = 3_000;
/** How long a process that exited may take to close its output pipes. */
const OUTPUT_DRAIN_MS = 1_000;
/** Output kept per child printing through pipes, for failure messages. */
const OUTPUT_KEEP_BYTES = 64 * 1024;
/** Output shown per child in a failure message. */
const OUTPUT_SHOW_BYTES = 6 * 1024;

/** Every child started here and not yet seen to exit: killed if this process exits first. */
const live = new Set<ChildProcess>();
process.once('exit', () => {
  for (const proc of live) {
    try {
      if (proc.pid !== undefined) process.kill(proc.pid, 'SIGKILL');
    } catch {
      // already gone
    }
  }
});

export interface ExitStatus {
  code: number | null;
  signal: NodeJS.Signals | null;
}

/** A running livemig process with a connected QMP client and every event it emitted so far. */
export class Child {
  readonly name: string;
  readonly proc: ChildProcess;
  readonly qmpAddress: string;
  /** Set once the QMP socket accepted (see Harness.source / destination). */
  qmp!: QmpClient;
  /** Every QMP event received, in arrival order (recorded from the moment QMP connected). */
  readonly events: QmpEvent[] = [];
  readonly exited: Promise<ExitStatus>;
  #output = '';
  /** Characters printed since the start, kept or not (what outputMark and outputSince count in). */
  #printed = 0;
  /** The file the process prints into instead of pipes (SourceOptions.outputToFile). */
  readonly #outputFile: string | undefined;

  /**
   * `output.file`: the process prints into this file (all of it kept), not through pipes;
   * `output.keepBytes`: how much of what comes through pipes is kept (default 64 KiB).
   */
  constructor(name: string, proc: ChildProcess, qmpAddress: string, output: { file?: string | undefined; keepBytes?: number | undefined } = {}) {
    this.name = name;
    this.proc = proc;
    this.qmpAddress = qmpAddress;
    this.#outputFile = output.file;
    const keepBytes = output.keepBytes ?? OUTPUT_KEEP_BYTES;
    const keep = (chunk: Buffer): void => {
      const text = chunk.toString('utf8');
      this.#printed += text.length;
      this.#output += text;
      if (this.#output.length > keepBytes) this.#output = this.#output.slice(-keepBytes);
    };
    proc.stdout?.on('data', keep);
    proc.stderr?.on('data', keep);
    this.exited = new Promise((resolve) => {
      if (proc.exitCode !== null || proc.signalCode !== null) resolve({ code: proc.exitCode, signal: proc.signalCode });
      else {
        live.add(proc);
        proc.once('exit', (code, signal) => {
          live.delete(proc);
          // 'exit' can come before the last of the process's output: let its pipes drain
          // ('close'), for at most a second (a grandchild may hold them open).
          const settle = setTimeout(() => resolve({ code, signal }), OUTPUT_DRAIN_MS);
          proc.once('close', () => {
            clearTimeout(settle);
            resolve({ code, signal });
          });
        });
      }
    });
  }

  get pid(): number {
    return this.proc.pid ?? -1;
  }

  get alive(): boolean {
    return this.proc.exitCode === null && this.proc.signalCode === null;
  }

  /** What the process printed (stdout and stderr interleaved; through pipes, the last 64 KiB). */
  output(): string {
    if (this.#outputFile === undefined) return this.#output;
    try {
      return readFileSync(this.#outputFile, 'utf8');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return ''; // the harness's dir is gone
      throw err;
    }
  }

  /** A mark in the process's output: outputSince(mark) is what it printed after this call. */
  outputMark(): number {
    return this.#outputFile === undefined ? this.#printed : this.output().length;
  }

  /** What the process printed since `mark`; throws if part of it is no longer kept. */
  outputSince(mark: number): string {
    if (this.#outputFile !== undefined) {
      const output = this.output();
      if (mark > output.length) throw new Error(`${this.name}: its output file has ${output.length} characters, fewer than the mark (${mark})`);
      return output.slice(mark);
    }
    const dropped = this.#printed - this.#output.length;
    if (mark < dropped) throw new Error(`${this.name}: ${dropped - mark} characters printed after the mark are no longer kept (start it with outputToFile)`);
    return this.#output.slice(mark - dropped);
  }

  /** Wait for the process to exit, at most `timeoutMs`. */
  async waitForExit(timeoutMs = 15_000): Promise<ExitStatus> {
    return within(this.exited, `${this.name} (pid ${this.pid}) to exit`, timeoutMs);
  }

  /**
   * The first recorded event called `name` matching `predicate` (already received or arriving
   * within `timeoutMs`).
   */
  async waitForEvent(name: string, predicate: (e: QmpEvent) => boolean = () => true, timeoutMs = 60_000): Promise<QmpEvent> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const found = this.events.find((e) => e.event === name && predicate(e));
      if (found !== undefined) return found;
      if (Date.now() > deadline) {
        throw new Error(`${this.name}: no ${name} event matching within ${timeoutMs} ms; got ${JSON.stringify(this.events.map((e) => [e.event, e.data]))}`);
      }
      await sleep(20);
    }
  }

  /** The `status` of every MIGRATION event so far, in order. */
  migrationEvents(): string[] {
    return this.events.filter((e) => e.event === 'MIGRATION').map((e) => String(e.data?.['status']));
  }

  /** Run a QMP command (bounded). */
  execute<T = unknown>(command: string, args?: Record<string, unknown>, timeoutMs = QMP_REPLY_MS): Promise<T> {
    return this.qmp.execute<T>(command, args, { timeoutMs });
  }
}

export interface SourceOptions {
  /** Guest flags (-m, --workload, --vcpus, --fill, --block). */
  guest: string[];
  /** Extra source flags (--capabilities, --parameters, -S, --migrate, ...). */
  args?: string[];
  name?: string;
  /** Extra stdio entries after stdin/stdout/stderr: entry i becomes fd 3 + i in the child. */
  extraStdio?: Array<'pipe' | 'ignore' | 'inherit' | net.Socket | number | null>;
  /** Run inside this network namespace (`ip netns exec NS node …`, which execs: the pid stays node's). */
  netns?: string;
  /** Flags for node itself, before the script (V8's --trace-deopt …). */
  nodeArgs?: string[];
  /**
   * Print into a file in the test's dir, all of it kept, instead of pipes (whose last 64 KiB are
   * kept). Needed for V8's traces: V8 prints them with C stdio on the descriptor Node made
   * non-blocking, so what a pipe the test reads late cannot take is lost, not delayed.
   */
  outputToFile?: boolean;
}

export interface DestinationOptions {
  /** 'tcp' (127.0.0.1, port 0), 'unix' (a socket in the temp dir), 'defer' or a full address. */
  incoming: 'tcp' | 'unix' | 'defer' | (string & {});
  /** -S: stay paused after the migration until QMP cont. */
  paused?: boolean;
  guest: string[];
  capabilities?: string[];
  args?: string[];
  name?: string;
  /** Run inside this network namespace (as SourceOptions.netns). */
  netns?: string;
  /** Flags for node itself, before the script (V8's --trace-deopt …). */
  nodeArgs?: string[];
  /** Print into a file, all of it kept (as SourceOptions.outputToFile). */
  outputToFile?: boolean;
}

export class Harness {
  readonly dir: string;
  readonly children: Child[] = [];
  #count = 0;

  private constructor(dir: string) {
    this.dir = dir;
  }

  static async create(): Promise<Harness> {
    // unix socket paths must fit a sockaddr_un (107 bytes): keep the dir short.
    let base = tmpdir();
    if (Buffer.byteLength(base) > 40) base = '/tmp';
    return new Harness(await mkdtemp(join(base, 'lm-e2e-')));
  }

  /** A path in this test's temp dir (asserted short enough for a unix socket). */
  path(name: string): string {
    const p = join(this.dir, name);
    if (Buffer.byteLength(p) >= 100) throw new Error(`socket path too long for sockaddr_un: ${p}`);
    return p;
  }

  #unique(name: string): string {
    this.#count++;
    return this.children.some((c) => c.name === name) ? `${name}${this.#count}` : name;
  }

  async #start(name: string, main: string, args: string[], o: Pick<SourceOptions, 'extraStdio' | 'netns' | 'nodeArgs' | 'outputToFile'>): Promise<Child> {
    const { extraStdio = [], netns, nodeArgs = [] } = o;
    // A unix QMP socket is a path: reachable from any network namespace.
    const qmpAddress = `unix:${this.path(`${name}.qmp`)}`;
    const argv = [...nodeArgs, main, ...args, '--qmp', qmpAddress];
    const [file, fileArgs] = netns === undefined ? [process.execPath, argv] : ['ip', ['netns', 'exec', netns, process.execPath, ...argv]];
    const outputFile = o.outputToFile === true ? join(this.dir, `${name}.out`) : undefined;
    // Both stdout and stderr append to the file (one open description: nothing overwritten).
    const outputFd = outputFile === undefined ? undefined : openSync(outputFile, 'a');
    let proc: ChildProcess;
    try {
      proc = spawn(file, fileArgs, {
        stdio: ['ignore', outputFd ?? 'pipe', outputFd ?? 'pipe', ...extraStdio],
        env: { ...process.env, LIVEMIG_LOG_LEVEL: process.env['LIVEMIG_LOG_LEVEL'] ?? 'info' },
      });
    } finally {
      if (outputFd !== undefined) closeSync(outputFd); // the child has its own copy
    }
    const child = new Child(name, proc, qmpAddress, { file: outputFile });
    this.children.push(child);
    child.qmp = await connectQmp(child, QMP_START_MS);
    // Record every event; waits poll child.events (so no event is consumed by another wait).
    void (async () => {
      for await (const e of child.qmp.events({ idleTimeoutMs: Infinity })) child.events.push(e);
    })().catch(() => {});
    return child;
  }

  /** Start a livemig-source; resolves once its QMP accepts. */
  async source(o: SourceOptions): Promise<Child> {
    return this.#start(this.#unique(o.name ?? 'src'), SOURCE_MAIN, [...o.guest, ...(o.args ?? [])], o);
  }

  /**
   * Start a livemig-destination; resolves once its QMP accepts and (unless defer) it listens,
   * with `incomingUri` the address to migrate to (from query-migrate's socket-address).
   */
  async destination(o: DestinationOptions): Promise<Child & { incomingUri: string }> {
    const name = this.#unique(o.name ?? 'dst');
    const incoming = o.incoming === 'tcp' ? 'tcp:127.0.0.1:0' : o.incoming === 'unix' ? `unix:${this.path(`${name}.mig`)}` : o.incoming;
    const args = ['--incoming', incoming, ...o.guest];
    if (o.paused === true) args.push('-S');
    if (o.capabilities !== undefined && o.capabilities.length > 0) args.push('--capabilities', o.capabilities.join(','));
    args.push(...(o.args ?? []));
    const child = (await this.#start(name, DESTINATION_MAIN, args, o)) as Child & { incomingUri: string };
    // A stream file or command is read at once: there is no socket to report.
    child.incomingUri = incoming === 'defer' || /^(file|exec):/.test(incoming) ? incoming : await listeningAddress(child, 60_000);
    return child;
  }

  /** The tail of every child's output, for failure messages. */
  report(): string {
    return this.children
      .map((c) => {
        const out = c.output();
        const tail = out.length > OUTPUT_SHOW_BYTES ? `…${out.slice(-OUTPUT_SHOW_BYTES)}` : out;
        const state = c.alive ? 'running' : `exited code=${c.proc.exitCode} signal=${c.proc.signalCode}`;
        return `--- ${c.name} (pid ${c.pid}, ${state}) ---\n${tail.trimEnd()}`;
      })
      .join('\n');
  }

  /** Close QMP, then SIGTERM every live child by pid, SIGKILL after the grace; remove the dir. */
  async cleanup(): Promise<void> {
    await Promise.all(this.children.map((c) => (c.qmp === undefined ? undefined : within(c.qmp.close(), 'QMP close', 2000).catch(() => {}))));
    await Promise.all(
      this.children.map(async (c) => {
        if (!c.alive) return;
        try {
          process.kill(c.pid, 'SIGTERM');
        } catch {
          return; // already gone
        }
        const exited = await within(c.exited, 'exit after SIGTERM', TERM_GRACE_MS).then(
          () => true,
          () => false,
        );
        if (exited) return;
        try {
          process.kill(c.pid, 'SIGKILL');
        } catch {
          return;
        }
        await within(c.exited, 'exit after SIGKILL', KILL_WAIT_MS).catch(() => {});
      }),
    );
    await rm(this.dir, { recursive: true, force: true }).catch(() => {});
  }
}

/**
 * Run `body` with a fresh harness; children are killed and the temp dir removed whatever
 * happens. A failure is rethrown with the children's output appended.
 */
export async function withHarness(body: (h: Harness) => Promise<void>): Promise<void> {
  const h = await Harness.create();
  try {
    await body(h);
  } catch (err) {
    const e = err as Error;
    throw new Error(`${e.message}\n\n${h.report()}`, { cause: err });
  } finally {
    await h.cleanup();
  }
}

/** Poll-connect to a child's QMP socket until it accepts (bounded); fails early if it exits. */
export async function connectQmp(child: Child, timeoutMs: number): Promise<QmpClient> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (!child.alive) throw new Error(`${child.name} exited (code ${child.proc.exitCode}, signal ${child.proc.signalCode}) before its QMP socket accepted`);
    try {
      return await QmpClient.connect(child.qmpAddress, { timeoutMs: 5_000 });
    } catch (err) {
      if (Date.now() > deadline) throw new Error(`${child.name}: QMP ${child.qmpAddress} did not accept within ${timeoutMs} ms: ${(err as Error).message}`);
      await sleep(50);
    }
  }
}

interface SocketAddressEntry {
  type: string;
  host?: string;
  port?: string;
  path?: string;
}

/** The destination's bound listening address, from query-migrate's socket-address (bounded). */
export async function listeningAddress(dst: Child, timeoutMs = 60_000): Promise<string> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const info = await dst.execute<{ status?: string; 'socket-address'?: SocketAddressEntry[] }>('query-migrate');
    const a = info['socket-address']?.[0];
    if (a !== undefined) {
      if (a.type === 'inet') return `tcp:${a.host}:${a.port}`;
      if (a.type === 'unix') return `unix:${a.path}`;
      throw new Error(`${dst.name}: unexpected socket-address ${JSON.stringify(a)}`);
    }
    if (!dst.alive) throw new Error(`${dst.name} exited before listening`);
    if (Date.now() > deadline) throw new Error(`${dst.name} did not report a listening socket-address within ${timeoutMs} ms (last: ${JSON.stringify(info)})`);
    await sleep(50);
  }
}

// Bounded waits: the runtime tests' helper (it names what was awaited when it times out).
export { within };

/** A TCP port on 127.0.0.1 that nothing listens on (bound, then released). */
export async function unusedPort(): Promise<number> {
  const server = net.createServer();
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve());
  });
  const port = (server.address() as net.AddressInfo).port;
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return port;
}

export interface AnalyzeReport {
  ramBlocks: { idstr: string; length: number; sha256: string; normalPages: number; zeroPages: number; xbzrlePages: number }[];
  [key: string]: unknown;
}

/** Run the demo in its own process group; the whole group is killed if it overstays. */
export function runDemo(args: string[], timeoutMs = 120_000): Promise<{ code: number | null; out: string }> {
  const child = spawn(process.execPath, [CLI_MAIN, 'demo', ...args], { stdio: ['ignore', 'pipe', 'pipe'], detached: true });
  let out = '';
  child.stdout.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr.on('data', (d: Buffer) => (out += d.toString()));
  return new Promise((resolve) => {
    const timer = setTimeout(() => {
      try {
        process.kill(-child.pid!, 'SIGKILL');
      } catch {
        // already gone
      }
    }, timeoutMs);
    child.on('exit', (code) => {
      clearTimeout(timer);
      resolve({ code, out });
    });
  });
}

/** `livemig …` as a process; bounded, killed by pid when it overstays. */
export function livemig(args: string[], timeoutMs = 60_000): Promise<{ code: number | null; stdout: string; stderr: string }> {
  const child = spawn(process.execPath, [CLI_MAIN, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  return new Promise((resolve) => {
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.on('exit', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}

/** `livemig analyze FILE --json` (bounded); resolves with the exit code, the report and stderr. */
export function analyzeFile(file: string, timeoutMs = 60_000): Promise<{ code: number; report: AnalyzeReport | undefined; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(
      process.execPath,
      [CLI_MAIN, 'analyze', file, '--json'],
      { timeout: timeoutMs, killSignal: 'SIGKILL', maxBuffer: 64 * 2 ** 20 },
      (err, stdout, stderr) => {
        const code = err === null ? 0 : typeof (err as { code?: unknown }).code === 'number' ? ((err as { code: number }).code) : -1;
        let report: AnalyzeReport | undefined;
        try {
          report = JSON.parse(stdout) as AnalyzeReport;
        } catch {
          report = undefined;
        }
        resolve({ code, report, stdout, stderr });
      },
    );
  });
}
