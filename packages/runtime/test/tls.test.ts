import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdirSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import { PassThrough } from 'node:stream';
import { describe, it } from 'node:test';
import { connectChannel, ObjectRegistry, parseObjectOption, pumpOnread, secureServerSide } from '../src/index.ts';
import { withTempDir, within } from './helpers.ts';

const T = { timeout: 30_000 };

function code(err: unknown): unknown {
  return (err as { code?: unknown }).code;
}

describe('--object parsing', () => {
  it("reads QEMU's TYPE,key=value form, with ,, for a comma in a value", () => {
    assert.deepEqual(parseObjectOption('authz-simple,id=a0,identity=CN=x,,O=y'), { 'qom-type': 'authz-simple', id: 'a0', identity: 'CN=x,O=y' });
    assert.deepEqual(parseObjectOption('{"qom-type":"authz-list","id":"l","rules":[]}'), { 'qom-type': 'authz-list', id: 'l', rules: [] });
  });

  it('refuses what is not an object description (LM_ERR_BAD_OBJECT)', () => {
    for (const bad of ['', 'id=x', 'authz-simple,identity', '{"qom-type":', '{"x":1']) {
      assert.throws(() => parseObjectOption(bad), (err) => code(err) === 'LM_ERR_BAD_OBJECT', bad);
    }
  });
});

describe('ObjectRegistry', () => {
  it('creates authz objects; authz-list rules apply in order (exact, glob), then the default policy', () => {
    const r = new ObjectRegistry();
    r.add({ 'qom-type': 'authz-simple', id: 's', identity: 'CN=a,O=b' });
    r.add({ 'qom-type': 'authz-list', id: 'l', policy: 'deny', rules: [{ match: 'CN=bad*', policy: 'deny', format: 'glob' }, { match: 'CN=b?d2', policy: 'allow', format: 'glob' }, { match: 'CN=ok', policy: 'allow' }] });
    assert.equal(r.authz('s')?.isAllowed('CN=a,O=b'), true);
    assert.equal(r.authz('s')?.isAllowed('CN=a,O=c'), false);
    const l = r.authz('l');
    assert.equal(l?.isAllowed('CN=bad2'), false, 'the first matching rule decides');
    assert.equal(l?.isAllowed('CN=bid2'), true);
    assert.equal(l?.isAllowed('CN=ok'), true);
    assert.equal(l?.isAllowed('CN=ok.'), false, 'exact means exact');
    assert.equal(l?.isAllowed('CN=other'), false, 'default policy');
    assert.equal(r.authz(''), undefined);
  });

  it('refuses duplicates, unknown types and properties, and a missing object (LM_ERR_BAD_OBJECT)', () => {
    const r = new ObjectRegistry();
    r.add({ 'qom-type': 'authz-simple', id: 's', identity: 'x' });
    const bad = (props: Record<string, unknown>): void => assert.throws(() => r.add(props), (err) => code(err) === 'LM_ERR_BAD_OBJECT', JSON.stringify(props));
    bad({ 'qom-type': 'authz-simple', id: 's', identity: 'y' });
    bad({ 'qom-type': 'memory-backend-ram', id: 'm' });
    bad({ 'qom-type': 'authz-simple', id: 't', identity: 'y', colour: 'red' });
    bad({ 'qom-type': 'authz-simple', id: 'u' });
    bad({ 'qom-type': 'authz-list', id: 'v', rules: [{ match: 'x', format: 'regex' }] });
    assert.throws(() => r.delete('nosuch'), (err) => code(err) === 'LM_ERR_BAD_OBJECT');
    r.delete('s');
    assert.equal(r.get('s'), undefined);
  });

  it("names unusable credentials with QEMU's text (LM_ERR_TLS_CREDS)", () =>
    withTempDir(async (dir) => {
      const r = new ObjectRegistry();
      writeFileSync(join(dir, 'keys.psk'), `qemu:${randomBytes(16).toString('hex')}\n`);
      r.add({ 'qom-type': 'tls-creds-psk', id: 'p', dir, endpoint: 'client' });
      r.add({ 'qom-type': 'authz-simple', id: 'a', identity: 'x' });
      const refused = (f: () => unknown, text: RegExp): void => assert.throws(f, (err) => code(err) === 'LM_ERR_TLS_CREDS' && text.test((err as Error).message));
      refused(() => r.creds('nosuch', 'client'), /^No TLS credentials with id 'nosuch'$/);
      refused(() => r.creds('a', 'client'), /^Object with id 'a' is not TLS credentials$/);
      refused(() => r.creds('p', 'server'), /^Expected TLS credentials for a server endpoint$/);
      refused(() => r.authz('p'), /No authorization object with id 'p'/);
      refused(() => r.add({ 'qom-type': 'tls-creds-psk', id: 'q', dir, endpoint: 'client', username: 'alice' }), /^Username alice not found in PSK file .*keys\.psk$/);
      refused(() => r.add({ 'qom-type': 'tls-creds-x509', id: 'x', dir: join(dir, 'none'), endpoint: 'server' }), /Unable to access credentials .*ca-cert\.pem: No such file or directory/);
      assert.equal(r.creds('', 'client'), undefined, 'no tls-creds: no TLS');
      assert.equal(r.creds('p', 'client')?.kind, 'tls-creds-psk');
    }));
});

describe('pumpOnread', () => {
  it('copies chunks into the static buffer, keeps the rest when paused, and delivers it first on resume', async () => {
    const stream = new PassThrough();
    const buffer = Buffer.alloc(4);
    const seen: string[] = [];
    let stopAfter = 2;
    pumpOnread(stream, {
      buffer,
      callback: (n, b) => {
        seen.push(Buffer.from(b.subarray(0, n)).toString());
        return --stopAfter > 0;
      },
    }, Buffer.from('ab'));
    assert.deepEqual(seen, ['ab'], 'the prefix goes first');
    stream.write('cdefghij');
    await within(new Promise((r) => setImmediate(r)), 'a turn');
    assert.deepEqual(seen, ['ab', 'cdef'], 'paused after the callback said so, the rest kept');
    stream.write('kl');
    stopAfter = 10;
    stream.resume();
    await within(new Promise((r) => setTimeout(r, 10)), 'a turn');
    assert.deepEqual(seen.join(''), 'abcdefghijkl', 'nothing lost or reordered');
  });
});

describe('TLS over a channel (PSK)', () => {
  it('connectChannel with tls speaks to secureServerSide; a wrong key fails both sides (LM_ERR_TLS_HANDSHAKE)', T, () =>
    withTempDir(async (dir) => {
      const key = randomBytes(32).toString('hex');
      const mk = (name: string, k: string): string => {
        const d = join(dir, name);
        mkdirSync(d);
        writeFileSync(join(d, 'keys.psk'), `qemu:${k}\n`);
        return d;
      };
      const r = new ObjectRegistry();
      r.add({ 'qom-type': 'tls-creds-psk', id: 'srv', dir: mk('s', key), endpoint: 'server' });
      r.add({ 'qom-type': 'tls-creds-psk', id: 'good', dir: mk('g', key), endpoint: 'client' });
      r.add({ 'qom-type': 'tls-creds-psk', id: 'bad', dir: mk('b', randomBytes(32).toString('hex')), endpoint: 'client' });
      const serverResults: Promise<unknown>[] = [];
      const server = net.createServer({ pauseOnConnect: true }, (raw) => {
        const { ready } = secureServerSide(raw, { creds: r.creds('srv', 'server')!, authz: undefined }, 'test');
        serverResults.push(ready.then((s) => {
          s.on('data', (d: Buffer) => s.end(d));
          return 'ok';
        }, (err: unknown) => code(err)));
        raw.resume();
      });
      await new Promise<void>((res) => server.listen(0, '127.0.0.1', res));
      const port = (server.address() as net.AddressInfo).port;
      try {
        const ch = await connectChannel(`tcp:127.0.0.1:${port}`, { tls: { creds: r.creds('good', 'client')!, hostname: undefined } });
        ch.write('hello');
        const echoed = await within(new Promise<string>((res) => ch.once('data', (d: Buffer) => res(d.toString()))), 'echo');
        assert.equal(echoed, 'hello');
        ch.destroy();
        await assert.rejects(connectChannel(`tcp:127.0.0.1:${port}`, { tls: { creds: r.creds('bad', 'client')!, hostname: undefined } }), (err) => code(err) === 'LM_ERR_TLS_HANDSHAKE');
        assert.deepEqual(await within(Promise.all(serverResults), 'server verdicts'), ['ok', 'LM_ERR_TLS_HANDSHAKE']);
        await assert.rejects(connectChannel('exec:cat', { tls: { creds: r.creds('good', 'client')!, hostname: undefined } }), (err) => code(err) === 'LM_ERR_UNSUPPORTED_TRANSPORT');
      } finally {
        server.close();
      }
    }));
});

// openssl is what the e2e tests make certificates with; here it only checks it is there.
execFileSync('openssl', ['version']);
