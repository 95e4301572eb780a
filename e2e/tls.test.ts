// Issue 14, TLS: QEMU's TLS migration cases (tests/qtest/migration-test.c: PSK match/mismatch,
// x509 default/override/mismatched host, friendly/hostile/anonymous clients, authz allow/deny)
// between two livemig processes over real sockets, with certificates made here by openssl.
// Every wait is bounded; no assertion is about time.
//
// Run: pnpm build && node --import tsx --test --test-concurrency=1 e2e/tls.test.ts

import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { after, test } from 'node:test';
import { assertSameRam, queryMigrate, setCapabilities, waitForStatus } from './helpers/migration.ts';
import { assertQmpError, migrateIntoPostcopy, recover, SLOW_POSTCOPY, stopAndCheckPattern, waitBothCompleted, waitBothPaused } from './helpers/postcopy.ts';
import { type Child, type Harness, withHarness, within } from './helpers/processes.ts';
import { makePskDir, makeX509Dirs, randomPskKey } from './helpers/tls.ts';

const T = { timeout: 120_000 };
const GUEST = ['-m', '32M'];
/** Bound on a refusal showing in a destination's log. */
const LOG_WAIT_MS = 20_000;

const root = mkdtempSync(join(tmpdir().length > 40 ? '/tmp' : tmpdir(), 'lm-tls-'));
after(() => rmSync(root, { recursive: true, force: true }));
const pki = makeX509Dirs(root);
const pskKey = randomPskKey();
const pskDir = makePskDir(join(root, 'psk'), { qemu: pskKey, other: randomPskKey() });
const wrongPskDir = makePskDir(join(root, 'psk-wrong'), { qemu: randomPskKey() });

const x509 = (dir: string, endpoint: 'server' | 'client', extra = ''): string[] => ['--object', `tls-creds-x509,id=tls0,dir=${dir},endpoint=${endpoint}${extra}`];
const psk = (dir: string, endpoint: 'server' | 'client'): string[] => ['--object', `tls-creds-psk,id=tls0,dir=${dir},endpoint=${endpoint}`];

/** Wait (bounded) until the child's log matches `re`. */
async function waitForLog(c: Child, re: RegExp, timeoutMs = LOG_WAIT_MS): Promise<string> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const m = re.exec(c.output());
    if (m !== null) return m[0];
    if (Date.now() > deadline) throw new Error(`${c.name}: nothing matching ${re} in its log within ${timeoutMs} ms`);
    await sleep(50);
  }
}

interface Pair {
  src: Child;
  dst: Child & { incomingUri: string };
}

async function pair(h: Harness, dstArgs: string[], srcArgs: string[], dstParams = 'tls-creds=tls0', srcParams = 'tls-creds=tls0'): Promise<Pair> {
  const dst = await h.destination({ incoming: 'tcp', guest: GUEST, args: [...dstArgs, ...(dstParams === '' ? [] : ['--parameters', dstParams])] });
  const src = await h.source({ guest: GUEST, args: [...srcArgs, ...(srcParams === '' ? [] : ['--parameters', srcParams])] });
  return { src, dst };
}

/** The migration completes and the destination holds the source's RAM. */
async function assertMigrates({ src, dst }: Pair, uri = dst.incomingUri): Promise<void> {
  await src.execute('migrate', { uri });
  await waitForStatus(src, 'completed');
  await waitForStatus(dst, 'completed', { timeoutMs: 20_000 });
  await assertSameRam(src, dst);
}

/**
 * The migration is refused: the source fails, the destination logs `code` (and `reason`) for the
 * connection, never went active (not a byte of the stream was loaded) and keeps listening.
 */
async function assertRefused({ src, dst }: Pair, code: string, reason: RegExp, uri = dst.incomingUri): Promise<string> {
  await src.execute('migrate', { uri });
  const failed = await waitForStatus(src, 'failed', { timeoutMs: 30_000 });
  const line = await waitForLog(dst, new RegExp(`dropped a connection from [^\\n]*\\[${code}\\]`));
  assert.match(line, reason);
  assert.equal((await queryMigrate(dst)).status ?? 'none', 'none', 'the destination loaded nothing and still waits for its source');
  assert.equal(dst.alive, true);
  return failed['error-desc'] ?? '';
}

test('PSK, matching keys: the migration completes over TLS (TLS 1.2, a forward-secret PSK suite)', T, () =>
  withHarness(async (h) => {
    const p = await pair(h, psk(pskDir, 'server'), psk(pskDir, 'client'));
    await assertMigrates(p);
    assert.match(await waitForLog(p.dst, /authenticated \([^)]*\)/), /\(TLSv1\.2 ECDHE-PSK-CHACHA20-POLY1305\)/);
  }));

test('PSK, mismatched keys: the handshake fails on both sides (LM_ERR_TLS_HANDSHAKE)', T, () =>
  withHarness(async (h) => {
    const p = await pair(h, psk(pskDir, 'server'), psk(wrongPskDir, 'client'));
    const desc = await assertRefused(p, 'LM_ERR_TLS_HANDSHAKE', /TLS handshake failed/);
    assert.match(desc, /TLS|failed/, desc);
  }));

test('x509, default host (the URI host 127.0.0.1 is in the certificate) with a friendly client: completes', T, () =>
  withHarness(async (h) => {
    const p = await pair(h, x509(pki.server, 'server'), x509(pki.client, 'client'));
    await assertMigrates(p);
    assert.match(await waitForLog(p.dst, /authenticated \([^)]*\)/), new RegExp(`\\(TLSv1\\.3 \\S+, client ${pki.friendly.dn}\\)`));
  }));

test('x509, tls-hostname overrides the URI host: completes with tls-hostname=localhost to 127.0.0.1', T, () =>
  withHarness(async (h) => {
    await assertMigrates(await pair(h, x509(pki.server, 'server'), x509(pki.client, 'client'), 'tls-creds=tls0', 'tls-creds=tls0,tls-hostname=localhost'));
  }));

test('x509, mismatched host: the source refuses a certificate that does not name tls-hostname', T, () =>
  withHarness(async (h) => {
    const { src, dst } = await pair(h, x509(pki.server, 'server'), x509(pki.client, 'client'), 'tls-creds=tls0', 'tls-creds=tls0,tls-hostname=qemu.org.invalid');
    await src.execute('migrate', { uri: dst.incomingUri });
    const failed = await waitForStatus(src, 'failed', { timeoutMs: 30_000 });
    assert.match(failed['error-desc'] ?? '', /TLS handshake failed: .*qemu\.org\.invalid/, failed['error-desc']);
    assert.match(src.output(), /LM_ERR_TLS_HANDSHAKE/);
    assert.equal((await queryMigrate(dst)).status ?? 'none', 'none');
  }));

test('x509, hostile client (certificate from another CA): refused before anything is read', T, () =>
  withHarness(async (h) => {
    const desc = await assertRefused(await pair(h, x509(pki.server, 'server'), x509(pki.hostile, 'client')), 'LM_ERR_TLS_HANDSHAKE', /client's certificate is not trusted/);
    assert.match(desc, /refused this source's certificate or tls-authz|alert|TLS/, desc);
  }));

test('x509, anonymous client with verify-peer=off on the server: completes', T, () =>
  withHarness(async (h) => {
    await assertMigrates(await pair(h, x509(pki.server, 'server', ',verify-peer=off'), x509(pki.anonymous, 'client')));
  }));

test('x509, anonymous client with verify-peer=on (the default): refused', T, () =>
  withHarness(async (h) => {
    await assertRefused(await pair(h, x509(pki.server, 'server'), x509(pki.anonymous, 'client')), 'LM_ERR_TLS_HANDSHAKE', /did not return a certificate|sent no certificate/);
  }));

test('x509 authz-simple: the allowed distinguished name migrates, another is refused (LM_ERR_TLS_AUTHZ_DENIED)', T, () =>
  withHarness(async (h) => {
    const allow = ['--object', `authz-simple,id=auth0,identity=${pki.friendly.dn.replaceAll(',', ',,')}`];
    await assertMigrates(await pair(h, [...x509(pki.server, 'server'), ...allow], x509(pki.client, 'client'), 'tls-creds=tls0,tls-authz=auth0'));
    const deny = ['--object', 'authz-simple,id=auth0,identity=CN=someone-else,,O=livemig tests,,C=GB'];
    const p = await pair(h, [...x509(pki.server, 'server'), ...deny], x509(pki.client, 'client'), 'tls-creds=tls0,tls-authz=auth0');
    await assertRefused(p, 'LM_ERR_TLS_AUTHZ_DENIED', new RegExp(`authz check for ${pki.friendly.dn} is denied`));
  }));

test('x509 authz-list made with QMP object-add: an exact allow rule migrates; after object-del, a glob deny rule refuses', T, () =>
  withHarness(async (h) => {
    const { listeningAddress } = await import('./helpers/processes.ts');
    const incoming = async (rules: unknown[], policy: 'allow' | 'deny', recreate: boolean): Promise<Child & { incomingUri: string }> => {
      const dst = await h.destination({ incoming: 'defer', guest: GUEST, args: x509(pki.server, 'server') });
      if (recreate) {
        await dst.execute('object-add', { 'qom-type': 'authz-list', id: 'auth0', policy: 'allow' });
        await assertQmpError(dst.execute('object-add', { 'qom-type': 'authz-list', id: 'auth0' }), /duplicate/);
        await dst.execute('object-del', { id: 'auth0' });
      }
      await dst.execute('object-add', { 'qom-type': 'authz-list', id: 'auth0', policy, rules });
      await dst.execute('migrate-set-parameters', { 'tls-creds': 'tls0', 'tls-authz': 'auth0' });
      await dst.execute('migrate-incoming', { uri: 'tcp:127.0.0.1:0' });
      return Object.assign(dst, { incomingUri: await listeningAddress(dst) });
    };
    const srcArgs = [...x509(pki.client, 'client'), '--parameters', 'tls-creds=tls0'];
    const allowed = await incoming([{ match: pki.friendly.dn, policy: 'allow', format: 'exact' }], 'deny', false);
    await assertMigrates({ src: await h.source({ guest: GUEST, args: srcArgs }), dst: allowed });
    const denied = await incoming([{ match: 'CN=friendly-*', policy: 'deny', format: 'glob' }], 'allow', true);
    await assertRefused({ src: await h.source({ guest: GUEST, args: srcArgs, name: 'src2' }), dst: denied }, 'LM_ERR_TLS_AUTHZ_DENIED', /is denied \(tls-authz 'auth0'\)/);
  }));

test("unknown tls-creds: migrate and migrate-incoming fail with QEMU's text; wrong endpoint too", T, () =>
  withHarness(async (h) => {
    const dst = await h.destination({ incoming: 'defer', guest: GUEST, args: x509(pki.client, 'client') });
    await dst.execute('migrate-set-parameters', { 'tls-creds': 'nosuch' });
    await assertQmpError(dst.execute('migrate-incoming', { uri: 'tcp:127.0.0.1:0' }), /^No TLS credentials with id 'nosuch'$/);
    await dst.execute('migrate-set-parameters', { 'tls-creds': 'tls0' });
    await assertQmpError(dst.execute('migrate-incoming', { uri: 'tcp:127.0.0.1:0' }), /^Expected TLS credentials for a server endpoint$/);
    const src = await h.source({ guest: GUEST });
    await src.execute('migrate-set-parameters', { 'tls-creds': 'nosuch' });
    await assertQmpError(src.execute('migrate', { uri: 'tcp:127.0.0.1:9' }), /^No TLS credentials with id 'nosuch'$/);
    await assertQmpError(src.execute('object-add', { 'qom-type': 'tls-creds-x509', id: 'bad', dir: join(root, 'nowhere'), endpoint: 'client' }), /Unable to access credentials .*ca-cert\.pem/);
    // Nothing was started: the process still answers and no migration is reported.
    assert.deepEqual(await queryMigrate(src), {});
  }));

test('a plaintext source to a TLS destination is refused (LM_ERR_TLS_PLAINTEXT_PEER), and a TLS source to a plaintext one (LM_ERR_TLS_UNEXPECTED)', T, () =>
  withHarness(async (h) => {
    await assertRefused(await pair(h, x509(pki.server, 'server'), [], 'tls-creds=tls0', ''), 'LM_ERR_TLS_PLAINTEXT_PEER', /not speaking TLS/);
    const desc = await assertRefused(await pair(h, [], x509(pki.client, 'client'), '', 'tls-creds=tls0'), 'LM_ERR_TLS_UNEXPECTED', /started a TLS handshake, but tls-creds is not set here/);
    assert.match(desc, /TLS handshake/, desc);
  }));

test('x509 with multifd (2 channels): every channel is TLS and the migration completes', T, () =>
  withHarness(async (h) => {
    const dst = await h.destination({ incoming: 'tcp', guest: GUEST, capabilities: ['multifd'], args: [...x509(pki.server, 'server'), '--parameters', 'tls-creds=tls0,multifd-channels=2'] });
    const src = await h.source({ guest: GUEST, args: [...x509(pki.client, 'client'), '--capabilities', 'multifd', '--parameters', 'tls-creds=tls0,multifd-channels=2'] });
    await assertMigrates({ src, dst });
    const ram = (await queryMigrate(src)).ram;
    assert.ok((ram?.['multifd-bytes'] ?? 0) > 0, `pages went on the multifd channels: ${JSON.stringify(ram)}`);
  }));

test('x509 with postcopy-preempt, a pause and a recovery: the preempt and recovery connections are TLS too; faults are served and the pattern is consistent', T, () =>
  withHarness(async (h) => {
    const guest = ['-m', '64M', '--workload', 'incrementer:200'];
    const caps = ['postcopy-ram', 'postcopy-preempt', 'events'];
    const dst = await h.destination({ incoming: 'tcp', guest, capabilities: caps, args: [...x509(pki.server, 'server'), '--parameters', 'tls-creds=tls0'] });
    const src = await h.source({ guest, args: [...x509(pki.client, 'client'), '--parameters', 'tls-creds=tls0'] });
    await setCapabilities(src, caps);
    await src.execute('migrate-set-parameters', SLOW_POSTCOPY);
    await migrateIntoPostcopy(src, dst, dst.incomingUri);
    await sleep(500); // faults in flight
    assert.deepEqual(await dst.qmp.execute('migrate-pause', undefined, { oob: true, timeoutMs: 5_000 }), {});
    await waitBothPaused(src, dst);
    await recover(src, dst);
    await waitForStatus(dst, 'postcopy-active', { timeoutMs: 10_000 });
    const { dst: d } = await waitBothCompleted(src, dst);
    assert.ok((d['postcopy-faults'] ?? 0) > 0 && (d['x-postcopy-request-pages'] ?? 0) > 0, `vCPUs faulted and pages were requested: ${JSON.stringify(d)}`);
    // With TLS the fault path stays on the main thread and requested pages come on the main channel.
    assert.equal(d['x-postcopy-preempt-pages'] ?? 0, 0);
    await stopAndCheckPattern(dst);
    assert.doesNotMatch(dst.output(), /dropped a connection/, 'every connection (main, preempt, recovery) passed the TLS handshake');
  }));

test('x509 with a TLS destination: a client silent in the TLS handshake is dropped at the handshake deadline, and the real source, coming after it, migrates', T, () =>
  withHarness(async (h) => {
    const { dst, src } = await pair(h, [...x509(pki.server, 'server'), '--handshake-timeout', '1000'], x509(pki.client, 'client'));
    const port = Number(dst.incomingUri.split(':').at(-1));
    const silent = net.connect({ host: '127.0.0.1', port });
    silent.on('error', () => {});
    try {
      await within(new Promise((r) => silent.once('connect', r)), 'the silent client connects', 10_000);
      await waitForLog(dst, /did not complete the TLS handshake within the handshake deadline \(x-livemig-handshake-timeout 1000 ms\)[^\n]*\[LM_ERR_PEER_SILENT\]/);
      assert.equal((await queryMigrate(dst)).status ?? 'none', 'none');
      await assertMigrates({ src, dst });
    } finally {
      silent.destroy();
    }
  }));

test('x509 over unix: without tls-hostname the source has no name to check and fails with QEMU\'s text', T, () =>
  withHarness(async (h) => {
    const dst = await h.destination({ incoming: 'unix', guest: GUEST, args: [...x509(pki.server, 'server'), '--parameters', 'tls-creds=tls0'] });
    const src = await h.source({ guest: GUEST, args: [...x509(pki.client, 'client'), '--parameters', 'tls-creds=tls0'] });
    await src.execute('migrate', { uri: dst.incomingUri });
    const failed = await waitForStatus(src, 'failed', { timeoutMs: 30_000 });
    assert.match(failed['error-desc'] ?? '', /No hostname available for TLS/);
    // With the name the certificate carries, the same address works.
    await src.execute('migrate-set-parameters', { 'tls-hostname': 'localhost' });
    await assertMigrates({ src, dst });
  }));

/**
 * A TCP relay to `port` that holds the destination's first bytes (its side of the TLS handshake)
 * until `holdMs` after the connection: connecting the source's channel takes at least that long.
 */
async function slowHandshakeRelay(port: number, holdMs: number): Promise<net.Server> {
  const relay = net.createServer((client) => {
    const opened = performance.now();
    const server = net.connect(port, '127.0.0.1');
    let hold: NodeJS.Timeout | undefined;
    client.pipe(server);
    server.once('data', (first) => {
      server.pause();
      hold = setTimeout(() => {
        client.write(first);
        server.pipe(client);
        server.resume();
      }, Math.max(0, holdMs - (performance.now() - opened)));
    });
    const close = (): void => {
      clearTimeout(hold);
      client.destroy();
      server.destroy();
    };
    client.on('error', close).on('close', close);
    server.on('error', close).on('close', close);
  });
  relay.listen(0, '127.0.0.1');
  await new Promise((resolve) => relay.once('listening', resolve));
  return relay;
}

test("total-time counts from the migrate command, the channel's TLS handshake included (QEMU's definition)", T, () =>
  withHarness(async (h) => {
    const HOLD_MS = 1500;
    const p = await pair(h, psk(pskDir, 'server'), psk(pskDir, 'client'));
    const relay = await slowHandshakeRelay(Number(/:(\d+)$/.exec(p.dst.incomingUri)![1]), HOLD_MS);
    try {
      const asked = performance.now();
      await assertMigrates(p, `tcp:127.0.0.1:${(relay.address() as net.AddressInfo).port}`);
      const seen = performance.now() - asked;
      const info = await queryMigrate(p.src);
      const total = info['total-time'] ?? NaN;
      // The handshake alone took HOLD_MS, and total-time cannot exceed what this test saw.
      assert.ok(total >= HOLD_MS, `total-time ${total} ms is shorter than the ${HOLD_MS} ms the channel took to connect`);
      assert.ok(total <= seen + 1, `total-time ${total} ms is longer than the ${Math.round(seen)} ms from migrate to completed`);
      // The timeline's clock is the same: the migration went active only once connected.
      const timeline = (await p.src.execute('x-query-migration-timeline')) as { events: { t: number; kind: string; status?: string }[] };
      const active = timeline.events.find((e) => e.kind === 'status' && e.status === 'active');
      assert.ok(active !== undefined && active.t >= HOLD_MS, `the timeline shows status active at ${active?.t} ms, before the channel was connected (${HOLD_MS} ms)`);
      // setup-time is QEMU's: from the migration thread's start, once connected.
      assert.ok((info['setup-time'] ?? NaN) <= total - HOLD_MS + 1, `setup-time ${info['setup-time']} ms counts the connect`);
    } finally {
      relay.close();
    }
  }));
