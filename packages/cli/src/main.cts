// The `livemig` command. CommonJS (dist/main.cjs), so that Node runs it without starting its ES
// module loader (~10 ms of CPU); dist/main.js, an ES module that imports it, runs it as before.

import type { ConvergenceLastStep } from '@livemig/protocol';
// Each command loads its own modules when it runs: `analyze` starts as fast as Node does, without
// the QMP client and timeline code that `info` and `report` pull in (~0.1 s of loading).

// node:util as a builtin, not an ESM import, which reads all its exports (loading MIMEType's and
// AbortController's modules).
const { parseArgs } = process.getBuiltinModule('node:util');

const USAGE = `usage: livemig <command> [options]

commands:
  analyze <file|-> [--json] [--extract <dir>] [--dump state]
      Decode a QEMU migration stream (QEMU_VM_FILE v3, as written by QEMU's
      "migrate exec:cat > FILE" or by livemig) and print every record: header,
      machine type, sections with their stream offsets, commands (PACKAGED
      contents included), RAM blocks with page-record counts and the sha256 of
      each block's reconstructed contents (pages never sent count as zeros).
      gzip-compressed input is detected and read transparently; "-" reads
      standard input. Device sections are sized by the stream's VMDESCRIPTION
      when reading a file, else found by their section footers.
        --json           one JSON document on stdout
        --extract <dir>  write each RAM block's bytes to <dir>/<idstr>, with
                         characters other than [A-Za-z0-9._@-] %-encoded
        --dump state     instead: every device section's fields and values,
                         decoded by the VMDESCRIPTION, as QEMU's
                         scripts/analyze-migration.py -d state prints them
      A file is read in place with bounded memory: RAM is hashed, not held.
      exit status: 0 decoded, 1 usage or I/O error, 2 malformed stream
      (one line on stderr naming what was wrong and its byte offset; with
      --json also {"error":{"code","message","offset"}} on stdout)

  demo [--memory SIZE] [--workload W] [--vcpus N] [--transport tcp|unix]
       [--max-bandwidth BYTES_PER_S] [--downtime-limit MS] [--multifd N]
       [--no-progress-timeout MS] [--completion-timeout-per-gib MS]
       [--downtime-limit-step MS] [--downtime-limit-max MS]
       [--convergence-last-step none|postcopy|cancel]
      The main job: start a livemig-destination and a livemig-source as two
      processes on loopback, migrate a running guest (default: 1G running the
      incrementer workload, unlimited bandwidth, 300 ms downtime limit) with a
      live progress bar, print the summary (total time, downtime, bytes,
      throughput, passes) and verify the result: the paused destination's
      memory equals the stopped source's block by block (sha256), and once
      continued the destination guest runs on with a consistent pattern.
      --multifd N moves the pages on N multifd channels instead of the one
      stream (QEMU's multifd packets, on N connections at once).
      The convergence policy (README "Convergence policy"; off unless a
      timeout is set): after --no-progress-timeout MS without progress
      downtime-limit goes up by --downtime-limit-step up to
      --downtime-limit-max (default 2000), and at the max, or once
      --completion-timeout-per-gib MS per GiB of guest RAM have passed, the
      last step: postcopy (turned on for it), cancel, or none (default).
      exit status 0 when verified with the downtime within its limit, 3 when
      verified but the downtime exceeded the limit (VERDICT: OVER), 1
      otherwise (a cancel included).

  info --qmp ADDR [--completed] [--json]
      A migration's job info, as "virsh domjobinfo" shows it: connects to a
      livemig process's (or QEMU's) QMP socket (unix:PATH or tcp:HOST:PORT),
      runs query-migrate and prints job type, time elapsed, data processed,
      remaining and total, bandwidth, dirty rate, iteration, downtime,
      expected downtime, setup time, postcopy requests, progress and the
      convergence policy's state (when it is on).
        --completed  the last migration that ended (completed, failed or
                     cancelled), with its final figures
        --json       one JSON document: {"job-type", "query-migrate"}
      exit status: 0 shown, 1 usage error or QMP unreachable (one line)

  report TIMELINE [-o OUT.html]
      Render a migration timeline (livemig-source --timeline FILE, QMP
      x-query-migration-timeline, or the one livemig demo writes) as one
      self-contained HTML page: bandwidth, dirty rate and remaining bytes over
      time, passes, the downtime window, status changes, and a summary table.
      Without -o the page goes next to TIMELINE as TIMELINE.html.
      exit status: 0 written, 1 usage or I/O error, 2 not a timeline

  help    this text
`;

let stdoutOpened = false;

/** process.stdout, with a reader that goes away (`livemig analyze … | head`) not an error worth a stack trace. */
function stdoutStream(): NodeJS.WriteStream {
  if (!stdoutOpened) {
    stdoutOpened = true;
    process.stdout.on('error', (err: NodeJS.ErrnoException) => {
      if (err.code === 'EPIPE') process.exit(process.exitCode ?? 0);
      throw err;
    });
  }
  return process.stdout;
}

/**
 * Text to standard output with writeSync, not process.stdout: loading its stream stack costs
 * ~5–8 ms of CPU, a tenth of what `analyze --dump state` takes. A descriptor left non-blocking
 * (EAGAIN) gets process.stdout, for this write and every later one, so that they stay in order.
 */
function writeOut(text: string): void {
  if (stdoutOpened) {
    stdoutStream().write(text);
    return;
  }
  const bytes = Buffer.from(text);
  let done = 0;
  try {
    while (done < bytes.length) done += process.getBuiltinModule('node:fs').writeSync(1, bytes, done);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'EPIPE') process.exit(process.exitCode ?? 0);
    if (code !== 'EAGAIN') throw err;
    stdoutStream().write(bytes.subarray(done));
  }
}

/**
 * Whether standard error is a terminal, asked of process.stderr only when it may be one (a
 * character device): opening it loads the same stream stack as process.stdout.
 */
function stderrIsTerminal(): boolean {
  try {
    if (!process.getBuiltinModule('node:fs').fstatSync(2).isCharacterDevice()) return false;
  } catch {
    return false;
  }
  return process.stderr.isTTY === true;
}

type AmdFactory = (...deps: unknown[]) => void;

/**
 * analyze.ts with the protocol modules it uses, from the one file that the root tsc -b writes
 * for them (tsconfig.analyze-bundle.json: ~12 ms of CPU to load against ~45 ms as ~24 ES
 * modules), or undefined when it is not there (running from src/) or older than a source it
 * holds: then they are imported as ES modules.
 * The file is AMD, tsc's single-file format: `define` records each module, `require` runs one
 * (its dependencies first) and node: ids are Node's builtins.
 */
function loadAnalyzeBundle(): typeof import('./analyze.ts') | undefined {
  const file = process.getBuiltinModule('node:path').join(__dirname, 'analyze-bundle.js');
  let source: string;
  try {
    source = process.getBuiltinModule('node:fs').readFileSync(file, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw err;
  }
  // Only the root tsc -b rewrites this file: after `tsc -b packages/cli` (or protocol) alone it
  // would run older code than the ES modules beside it. Its module ids (its define calls, read
  // before it runs) are the sources' paths under packages/; one of them newer than its last
  // build means it is stale (~30 stats, ~0.1 ms). Its build info says when tsc last built it:
  // the file itself keeps its old time when its text came out the same.
  const fs = process.getBuiltinModule('node:fs');
  const path = process.getBuiltinModule('node:path');
  const builtAt = (fs.statSync(file.replace(/\.js$/, '.tsbuildinfo'), { throwIfNoEntry: false }) ?? fs.statSync(file)).mtimeMs;
  const packages = path.join(__dirname, '..', '..');
  for (const [, id] of source.matchAll(/\bdefine\("([^"]+)"/g)) {
    const changedAt = fs.statSync(path.join(packages, `${id}.ts`), { throwIfNoEntry: false })?.mtimeMs;
    if (changedAt !== undefined && changedAt > builtAt) return undefined;
  }
  const defined = new Map<string, { deps: string[]; factory: AmdFactory }>();
  const loaded = new Map<string, object>();
  const requireModule = (id: string): object => {
    if (id.startsWith('node:')) return process.getBuiltinModule(id)!;
    let exports = loaded.get(id);
    if (exports !== undefined) return exports;
    const m = defined.get(id);
    if (m === undefined) throw new Error(`${file}: no module "${id}" in it (rebuild with tsc -b)`);
    exports = {};
    loaded.set(id, exports);
    m.factory(...m.deps.map((d) => (d === 'require' ? requireModule : d === 'exports' ? exports : requireModule(d))));
    return exports;
  };
  const define = (id: string, deps: string[], factory: AmdFactory): void => void defined.set(id, { deps, factory });
  // Wrapped on its first line, so that its line numbers in stack traces stay the file's own.
  const run = process.getBuiltinModule('node:vm').runInThisContext(`(function (define) {${source}\n})`, { filename: file }) as (d: typeof define) => void;
  run(define);
  return requireModule('cli/src/analyze') as typeof import('./analyze.ts');
}

function fail(message: string, json: boolean, code: string, status: number, offset?: number, where = ''): number {
  process.stderr.write(`livemig: ${where}${message}\n`);
  if (json) writeOut(JSON.stringify({ error: { code, message, offset: offset ?? null } }) + '\n');
  return status;
}

async function analyzeCommand(argv: string[]): Promise<number> {
  let values: { json?: boolean; extract?: string; dump?: string; help?: boolean };
  let positionals: string[];
  try {
    ({ values, positionals } = parseArgs({
      args: argv,
      allowPositionals: true,
      options: { json: { type: 'boolean' }, extract: { type: 'string' }, dump: { type: 'string', short: 'd' }, help: { type: 'boolean', short: 'h' } },
    }));
  } catch (err) {
    return fail(`analyze: ${(err as Error).message} (see livemig help)`, false, 'LM_ERR_USAGE', 1);
  }
  if (values.help === true) {
    writeOut(USAGE);
    return 0;
  }
  const json = values.json === true;
  if (positionals.length !== 1) return fail(`analyze: expected one file (or -), got ${positionals.length} (see livemig help)`, json, 'LM_ERR_USAGE', 1);
  const input = positionals[0]!;
  const dumpState = values.dump !== undefined;
  if (dumpState && values.dump !== 'state') return fail(`analyze: --dump ${values.dump}: only "state" is known (see livemig help)`, json, 'LM_ERR_USAGE', 1);
  if (dumpState && (json || values.extract !== undefined)) {
    return fail(`analyze: --dump state prints its own JSON; it does not combine with ${json ? '--json' : '--extract'} (see livemig help)`, json, 'LM_ERR_USAGE', 1);
  }
  const showProgress = !json && stderrIsTerminal();
  const { analyzeInput, extractBlocks, humanReport, jsonReport, stateDumpText } = loadAnalyzeBundle() ?? (await import('./analyze.ts'));
  try {
    const result = await analyzeInput({
      input,
      dumpState,
      ...(showProgress
        ? {
            onProgress: (done: number, total: number | undefined) => {
              const pct = total === undefined ? '' : ` (${((100 * done) / total).toFixed(0)} %)`;
              process.stderr.write(`\ranalyzing: ${(done / 2 ** 20).toFixed(0)} MiB${pct}   `);
            },
          }
        : {}),
    });
    if (showProgress) process.stderr.write('\r\x1b[K');
    try {
      if (values.extract !== undefined) {
        const files = await extractBlocks(result, values.extract);
        if (!json) process.stderr.write(`extracted ${files.length} block(s) to ${values.extract}\n`);
      }
    } finally {
      result.close();
    }
    if (result.state !== undefined) writeOut(stateDumpText(result.state));
    else writeOut(json ? JSON.stringify(jsonReport(result.report)) + '\n' : humanReport(result.report, input));
    return 0;
  } catch (err) {
    if (showProgress) process.stderr.write('\r\x1b[K');
    const e = err as { code?: unknown; message?: string; streamOffset?: number; errno?: number };
    const code = typeof e.code === 'string' ? e.code : 'LM_ERR_INTERNAL';
    if (code.startsWith('LM_ERR_')) return fail(e.message ?? code, json, code, 2, e.streamOffset, `${input}: ${code}: `);
    if (code.startsWith('Z_')) return fail(`bad gzip data: ${e.message}`, json, code, 2, undefined, `${input}: `);
    if (e.errno !== undefined) return fail(e.message ?? code, json, code, 1, undefined, `${input}: `);
    throw err;
  }
}

async function demoCommand(argv: string[]): Promise<number> {
  let values;
  try {
    values = parseArgs({
      args: argv,
      options: {
        memory: { type: 'string', short: 'm' },
        workload: { type: 'string' },
        vcpus: { type: 'string' },
        transport: { type: 'string' },
        'max-bandwidth': { type: 'string' },
        'downtime-limit': { type: 'string' },
        multifd: { type: 'string' },
        'no-progress-timeout': { type: 'string' },
        'completion-timeout-per-gib': { type: 'string' },
        'downtime-limit-step': { type: 'string' },
        'downtime-limit-max': { type: 'string' },
        'convergence-last-step': { type: 'string' },
        help: { type: 'boolean', short: 'h' },
      },
    }).values;
  } catch (err) {
    return fail(`demo: ${(err as Error).message} (see livemig help)`, false, 'LM_ERR_USAGE', 1);
  }
  if (values.help === true) {
    writeOut(USAGE);
    return 0;
  }
  const transport = values.transport ?? 'tcp';
  if (transport !== 'tcp' && transport !== 'unix') return fail(`demo: --transport must be tcp or unix (see livemig help)`, false, 'LM_ERR_USAGE', 1);
  const numbers: Record<string, [string | undefined, number]> = {
    '--vcpus': [values.vcpus, 1],
    '--max-bandwidth': [values['max-bandwidth'], 0],
    '--downtime-limit': [values['downtime-limit'], 300],
    '--multifd': [values.multifd, 0],
    '--no-progress-timeout': [values['no-progress-timeout'], 0],
    '--completion-timeout-per-gib': [values['completion-timeout-per-gib'], 0],
    '--downtime-limit-step': [values['downtime-limit-step'], 0],
    '--downtime-limit-max': [values['downtime-limit-max'], 2000],
  };
  const n: Record<string, number> = {};
  for (const [flag, [text, fallback]] of Object.entries(numbers)) {
    const v = text === undefined ? fallback : Number(text);
    if (!Number.isInteger(v) || v < 0) return fail(`demo: ${flag} "${text}" is not a whole number (see livemig help)`, false, 'LM_ERR_USAGE', 1);
    n[flag] = v;
  }
  const lastStep = values['convergence-last-step'] ?? 'none';
  // Loaded here, not at start-up: `analyze` and `--help` start as fast as Node does without it.
  const { CONVERGENCE_LAST_STEPS } = await import('@livemig/protocol');
  if (!(CONVERGENCE_LAST_STEPS as readonly string[]).includes(lastStep)) {
    return fail(`demo: --convergence-last-step must be ${CONVERGENCE_LAST_STEPS.join(', ')}, not "${lastStep}" (see livemig help)`, false, 'LM_ERR_USAGE', 1);
  }
  if (lastStep === 'postcopy' && n['--multifd']! > 0) return fail('demo: --convergence-last-step postcopy does not combine with --multifd (postcopy-ram and multifd)', false, 'LM_ERR_USAGE', 1);
  try {
    // Loaded here: the demo pulls in both processes' code, which `analyze` has no use for (its memory stays small).
    const { runDemo } = await import('./demo.ts');
    return await runDemo({
      memory: values.memory ?? '1G',
      workload: values.workload ?? 'incrementer',
      vcpus: n['--vcpus']!,
      transport,
      maxBandwidth: n['--max-bandwidth']!,
      downtimeLimitMs: n['--downtime-limit']!,
      multifdChannels: n['--multifd']!,
      convergence: {
        noProgressTimeoutMs: n['--no-progress-timeout']!,
        completionTimeoutMsPerGiB: n['--completion-timeout-per-gib']!,
        downtimeLimitStepMs: n['--downtime-limit-step']!,
        downtimeLimitMaxMs: n['--downtime-limit-max']!,
        lastStep: lastStep as ConvergenceLastStep,
      },
      out: stdoutStream(),
    });
  } catch (err) {
    const code = (err as { code?: unknown }).code;
    return fail((err as Error).message, false, typeof code === 'string' && code.startsWith('LM_ERR_') ? code : 'LM_ERR_INTERNAL', 1);
  }
}

async function infoCommand(argv: string[]): Promise<number> {
  let values;
  try {
    values = parseArgs({
      args: argv,
      options: { qmp: { type: 'string' }, completed: { type: 'boolean' }, json: { type: 'boolean' }, help: { type: 'boolean', short: 'h' } },
    }).values;
  } catch (err) {
    return fail(`info: ${(err as Error).message} (see livemig help)`, false, 'LM_ERR_USAGE', 1);
  }
  if (values.help === true) {
    writeOut(USAGE);
    return 0;
  }
  const json = values.json === true;
  if (values.qmp === undefined) return fail('info: --qmp ADDR is required (unix:PATH or tcp:HOST:PORT; see livemig help)', json, 'LM_ERR_USAGE', 1);
  const { runInfo } = await import('./info.ts');
  try {
    writeOut(await runInfo({ qmp: values.qmp, completed: values.completed === true, json }));
    return 0;
  } catch (err) {
    const code = (err as { code?: unknown }).code;
    if (code !== 'LM_ERR_INFO') throw err;
    return fail((err as Error).message, json, code, 1, undefined, 'info: ');
  }
}

async function reportCommand(argv: string[]): Promise<number> {
  let values;
  let positionals: string[];
  try {
    ({ values, positionals } = parseArgs({
      args: argv,
      allowPositionals: true,
      options: { output: { type: 'string', short: 'o' }, help: { type: 'boolean', short: 'h' } },
    }));
  } catch (err) {
    return fail(`report: ${(err as Error).message} (see livemig help)`, false, 'LM_ERR_USAGE', 1);
  }
  if (values.help === true) {
    writeOut(USAGE);
    return 0;
  }
  if (positionals.length !== 1) return fail(`report: expected one timeline file, got ${positionals.length} (see livemig help)`, false, 'LM_ERR_USAGE', 1);
  const input = positionals[0]!;
  const output = values.output ?? `${input.replace(/\.json$/, '')}.html`;
  const { runReport } = await import('./report.ts');
  try {
    await runReport(input, output);
    writeOut(`${output}\n`);
    return 0;
  } catch (err) {
    const e = err as { code?: unknown; message: string; errno?: number };
    if (e.code === 'LM_ERR_BAD_TIMELINE') return fail(e.message, false, e.code, 2, undefined, `report: ${input}: `);
    if (e.errno !== undefined) return fail(e.message, false, String(e.code), 1, undefined, 'report: ');
    throw err;
  }
}

async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  switch (command) {
    case 'info':
      return infoCommand(rest);
    case 'report':
      return reportCommand(rest);
    case 'analyze':
      return analyzeCommand(rest);
    case 'demo':
      return demoCommand(rest);
    case undefined:
    case 'help':
    case '--help':
    case '-h':
      writeOut(USAGE);
      return command === undefined ? 1 : 0;
    default:
      process.stderr.write(`livemig: unknown command "${command}" (see livemig help)`);
      return 1;
  }
}

main(process.argv.slice(2)).then(
  (status) => {
    process.exitCode = status;
  },
  (err: unknown) => {
    process.stderr.write(`livemig: internal error: ${(err as Error).stack ?? String(err)}\n`);
    process.exitCode = 70;
  },
);
