// Mistakes a person makes, made on the real processes: each gets one line on stderr naming what
// was wrong and what to do, no stack trace, a consistent exit status (2: the command line cannot
// be used; 1: the migration failed; 130: Ctrl-C), and — for flags and addresses — before any
// guest RAM is prepared (no "guest ready" / "guest RAM prefaulted" line: a 1 GiB guest is asked
// for, so preparing it first would be seen).

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import net from 'node:net';
import { test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { CLI_MAIN, DESTINATION_MAIN, Harness, SOURCE_MAIN, unusedPort } from './helpers/processes.ts';

const T = { timeout: 60_000 };
const RUN_MS = 30_000;

interface Run {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

/** Run a process to its end (killed by pid if it overstays RUN_MS). */
function run(main: string, args: string[], env: Record<string, string> = {}): Promise<Run> {
  const child = spawn(process.execPath, [main, ...args], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, LIVEMIG_LOG_LEVEL: 'info', ...env } });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  return new Promise((resolve) => {
    const timer = setTimeout(() => child.kill('SIGKILL'), RUN_MS);
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout, stderr });
    });
  });
}

/** Exactly one line on stderr, matching `pattern`, no stack, nothing prepared, exit status 2. */
function assertUsageLine(r: Run, program: string, pattern: RegExp): void {
  const lines = r.stderr.split('\n').filter((l) => l !== '');
  assert.equal(lines.length, 1, `one line on stderr, got: ${r.stderr}`);
  assert.match(lines[0]!, new RegExp(`^${program}: `));
  assert.match(lines[0]!, pattern);
  assert.match(lines[0]!, new RegExp(`\\(see ${program} --help\\)$`), 'says where to read more');
  assert.doesNotMatch(r.stderr, /^\s+at /m, 'no stack trace');
  assert.doesNotMatch(r.stderr + r.stdout, /preparing guest RAM|guest ready|guest RAM prefaulted/, 'nothing was prepared');
  assert.deepEqual([r.code, r.signal], [2, null]);
}

/** A TCP port something listens on for the duration of `body`. */
async function withBusyPort(body: (port: number) => Promise<void>): Promise<void> {
  const server = net.createServer((s) => s.destroy());
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  try {
    await body((server.address() as net.AddressInfo).port);
  } finally {
    await new Promise((resolve) => server.close(resolve));
  }
}

const BIG = ['-m', '1G'];

test('a port in use: --qmp on either process, --incoming on the destination', T, () =>
  withBusyPort(async (port) => {
    const inUse = new RegExp(`tcp:127\\.0\\.0\\.1:${port}: it is in use: pick another port \\(port 0 picks a free one\\)`);
    assertUsageLine(await run(SOURCE_MAIN, [...BIG, '--qmp', `tcp:127.0.0.1:${port}`]), 'livemig-source', new RegExp(`--qmp ${inUse.source}`));
    assertUsageLine(await run(DESTINATION_MAIN, [...BIG, '--incoming', `tcp:127.0.0.1:${port}`]), 'livemig-destination', new RegExp(`--incoming ${inUse.source}`));
    assertUsageLine(
      await run(DESTINATION_MAIN, [...BIG, '--incoming', 'tcp:127.0.0.1:0', '--qmp', `tcp:127.0.0.1:${port}`]),
      'livemig-destination',
      new RegExp(`--qmp ${inUse.source}`),
    );
  }),
);

test('addresses that cannot be used: bad schemes, defer on the source, a missing directory, a live unix socket', T, async () => {
  const h = await Harness.create();
  const live = net.createServer((s) => s.destroy());
  try {
    const livePath = h.path('live.sock');
    await new Promise<void>((resolve) => live.listen(livePath, resolve));
    const source = (a: string[]): Promise<Run> => run(SOURCE_MAIN, [...BIG, ...a]);
    const destination = (a: string[]): Promise<Run> => run(DESTINATION_MAIN, [...BIG, ...a]);

    const rdma = await source(['--migrate', 'rdma:10.0.0.1:4444']);
    assertUsageLine(rdma, 'livemig-source', /--migrate .*rdma: is not supported; it takes tcp:, unix:, fd:, exec:, file:/);
    assert.doesNotMatch(rdma.stderr, /defer/, 'the source is not offered defer');
    assertUsageLine(await source(['--migrate', 'defer']), 'livemig-source', /'defer' is only for a destination \(livemig-destination --incoming defer\)/);
    assertUsageLine(await source(['--migrate', 'tcp:127.0.0.1']), 'livemig-source', /--migrate .*missing ":PORT"/);
    assertUsageLine(await source(['--capabilities', 'multifd', '--migrate', 'exec:cat']), 'livemig-source', /--migrate exec:cat: multifd is not supported/);
    assertUsageLine(await source(['--qmp', 'fd:3']), 'livemig-source', /--qmp "fd:3": fd is not usable here; it takes tcp:, unix:/);
    assertUsageLine(await destination(['--incoming', 'fd:3']), 'livemig-destination', /--incoming "fd:3": fd is not usable here; it takes tcp:, unix:, file:, exec:, defer/);
    assertUsageLine(await destination(['--incoming', 'file:/nonexistent-dir/stream.mig']), 'livemig-destination', /--incoming file:\/nonexistent-dir\/stream\.mig: no such file/);
    assertUsageLine(await destination(['--incoming', 'unix:/nonexistent-dir/m.sock']), 'livemig-destination', /directory \/nonexistent-dir does not exist: create it/);
    assertUsageLine(await destination(['--incoming', `unix:${livePath}`]), 'livemig-destination', /another process listens on it/);
    assertUsageLine(await destination([]), 'livemig-destination', /--incoming is required/);
  } finally {
    await new Promise((resolve) => live.close(resolve));
    await h.cleanup();
  }
});

test('flags that cannot be used', T, async () => {
  assertUsageLine(await run(SOURCE_MAIN, [...BIG, '--vcpus', '0']), 'livemig-source', /--vcpus "0" is not a whole number from 1 to 64/);
  assertUsageLine(await run(SOURCE_MAIN, [...BIG, '--bogus']), 'livemig-source', /Unknown option '--bogus'/);
  assertUsageLine(await run(SOURCE_MAIN, [...BIG, '--parameters', 'downtime-limit=soon']), 'livemig-source', /--parameters: Parameter 'downtime-limit' expects an integer/);
  assertUsageLine(await run(SOURCE_MAIN, [...BIG, '--timeline', '/nonexistent-dir/t.json']), 'livemig-source', /--timeline \/nonexistent-dir\/t\.json: cannot write in \/nonexistent-dir \(ENOENT\)/);
  assertUsageLine(await run(DESTINATION_MAIN, ['-m', 'lots', '--incoming', 'defer']), 'livemig-destination', /"lots" is not a size/);
  assertUsageLine(await run(DESTINATION_MAIN, [...BIG, '--incoming', 'defer', '--capabilities', 'rdma-pin-all']), 'livemig-destination', /Capability 'rdma-pin-all' is not supported/);
});

test('a refused connection: logged once as an error, no stack, exit 1 with --exit-after-migrate', T, async () => {
  const port = await unusedPort();
  const r = await run(SOURCE_MAIN, ['-m', '16M', '--migrate', `tcp:127.0.0.1:${port}`, '--exit-after-migrate']);
  assert.deepEqual([r.code, r.signal], [1, null], r.stderr);
  const lines = r.stderr.split('\n').filter((l) => /refused/i.test(l));
  assert.equal(lines.length, 1, `said once: ${r.stderr}`);
  const entry = JSON.parse(lines[0]!) as { level: number; msg: string };
  assert.equal(entry.level, 50, 'at error level (the outcome the user asked for)');
  assert.equal(entry.msg, `Failed to connect to 'tcp:127.0.0.1:${port}': connection refused (ECONNREFUSED): is a destination listening there?`);
  assert.doesNotMatch(r.stderr, /^\s+at /m);
});

test('livemig demo: Ctrl-C (SIGINT) stops both processes and exits 130, not 0', { timeout: 120_000 }, async () => {
  const child = spawn(process.execPath, [CLI_MAIN, 'demo', '--memory', '64M', '--max-bandwidth', '8000000'], { stdio: ['ignore', 'pipe', 'pipe'], detached: true });
  let out = '';
  child.stdout.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr.on('data', (d: Buffer) => (out += d.toString()));
  const exited = new Promise<[number | null, NodeJS.Signals | null]>((resolve) => child.on('exit', (code, signal) => resolve([code, signal])));
  try {
    const deadline = Date.now() + 90_000;
    let pids: number[] = [];
    while (pids.length === 0) {
      const m = /destination pid (\d+) .*source pid (\d+)/.exec(out);
      if (m !== null) pids = [Number(m[1]), Number(m[2])];
      else if (Date.now() > deadline || child.exitCode !== null) assert.fail(`the demo did not start its processes: ${out}`);
      else await sleep(50);
    }
    process.kill(child.pid!, 'SIGINT');
    assert.deepEqual(await exited, [130, null], out);
    assert.match(out, /interrupted by SIGINT; stopping the source and the destination/);
    // Both children go too (bounded wait).
    for (const pid of pids) {
      const until = Date.now() + 15_000;
      for (;;) {
        try {
          process.kill(pid, 0);
        } catch {
          break; // gone
        }
        if (Date.now() > until) assert.fail(`child ${pid} still running after the demo was interrupted`);
        await sleep(50);
      }
    }
  } finally {
    try {
      process.kill(-child.pid!, 'SIGKILL');
    } catch {
      // already gone
    }
  }
});

test('--qemu-version other than the versions livemig speaks: one line on either process', T, async () => {
  for (const [main, program] of [[SOURCE_MAIN, 'livemig-source'], [DESTINATION_MAIN, 'livemig-destination']] as const) {
    const extra = main === DESTINATION_MAIN ? ['--incoming', 'tcp:127.0.0.1:0'] : [];
    assertUsageLine(await run(main, [...BIG, ...extra, '--qemu-version', '8.2']), program, /--qemu-version: QEMU version 8\.2 is not one livemig speaks \(7\.2, 10\.0\)/);
  }
});

test('TLS objects and parameters on the command line: an unreadable credentials dir, an unknown object type, tls-creds naming nothing, client credentials on the destination — one line each, exit 2, before any RAM', T, async () => {
  const incoming = `tcp:127.0.0.1:${await unusedPort()}`;
  assertUsageLine(
    await run(SOURCE_MAIN, ['-m', '1G', '--object', 'tls-creds-x509,id=tls0,dir=/nonexistent/pki,endpoint=client']),
    'livemig-source',
    /--object tls-creds-x509,id=tls0,dir=\/nonexistent\/pki,endpoint=client: .*Unable to access credentials \/nonexistent\/pki\/ca-cert\.pem: No such file or directory/,
  );
  assertUsageLine(await run(SOURCE_MAIN, ['-m', '1G', '--object', 'secret,id=s0,data=x']), 'livemig-source', /--object secret,id=s0,data=x: .*expected one of tls-creds-x509, tls-creds-psk, authz-simple, authz-list \(got 'secret'\)/);
  assertUsageLine(await run(SOURCE_MAIN, ['-m', '1G', '--parameters', 'tls-creds=nosuch', '--migrate', incoming]), 'livemig-source', /--migrate tcp:.*: No TLS credentials with id 'nosuch'/);
  assertUsageLine(await run(DESTINATION_MAIN, ['-m', '1G', '--incoming', incoming, '--parameters', 'tls-creds=tls0,tls-authz=nosuch', '--object', 'authz-simple,id=a0,identity=CN=x']), 'livemig-destination', /No TLS credentials with id 'tls0'/);
  const h = await Harness.create();
  try {
    const dir = h.path('pki');
    const { makeX509Dirs } = await import('./helpers/tls.ts');
    const pki = makeX509Dirs(dir);
    assertUsageLine(
      await run(DESTINATION_MAIN, ['-m', '1G', '--incoming', incoming, '--object', `tls-creds-x509,id=tls0,dir=${pki.client},endpoint=client`, '--parameters', 'tls-creds=tls0']),
      'livemig-destination',
      /Expected TLS credentials for a server endpoint/,
    );
  } finally {
    await h.cleanup();
  }
});
