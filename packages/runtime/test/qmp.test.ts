import assert from 'node:assert/strict';
import net from 'node:net';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { QmpClient, QmpError, qmpEnum, QmpServer, type QmpEvent, type QmpServerOptions } from '../src/index.ts';
import { delay, RawQmp, WAIT_MS, withTempDir, within } from './helpers.ts';

type Kind = 'unix' | 'tcp';
const T = { timeout: 20_000 };

async function withServer<R>(
  kind: Kind,
  fn: (server: QmpServer) => Promise<R>,
  options: QmpServerOptions = {},
): Promise<R> {
  return withTempDir(async (dir) => {
    const server = await QmpServer.listen(kind === 'unix' ? `unix:${join(dir, 'qmp.sock')}` : 'tcp:127.0.0.1:0', {
      packageVersion: '9.9.9',
      ...options,
    });
    try {
      return await fn(server);
    } finally {
      await within(server.close(), 'server close');
    }
  });
}

async function withClient<R>(server: QmpServer, fn: (client: QmpClient) => Promise<R>, timeoutMs = WAIT_MS): Promise<R> {
  const client = await QmpClient.connect(server.address, { timeoutMs });
  try {
    return await fn(client);
  } finally {
    await within(client.close(), 'client close');
  }
}

function qmpError(err: unknown): QmpError {
  assert.ok(err instanceof Error, `expected an Error, got ${JSON.stringify(err)}`);
  return err as QmpError;
}

for (const kind of ['unix', 'tcp'] as const) {
  describe(`QMP over ${kind}`, () => {
    it('exposes the bound address (port 0 → a real port)', T, () =>
      withServer(kind, async (server) => {
        if (kind === 'tcp') {
          assert.equal(server.address.transport, 'tcp');
          assert.match(server.addressText, /^tcp:127\.0\.0\.1:[1-9][0-9]*$/);
        } else {
          assert.match(server.addressText, /^unix:.*qmp\.sock$/);
        }
      }),
    );

    it('sends the greeting, CRLF-terminated, byte for byte', T, () =>
      withServer(kind, async (server) => {
        const raw = await RawQmp.connect(server.address);
        try {
          assert.equal(
            await raw.nextLine(),
            '{"QMP":{"version":{"qemu":{"micro":0,"minor":2,"major":7},"package":"livemig 9.9.9"},"capabilities":["oob"]}}',
          );
        } finally {
          await raw.close();
        }
      }),
    );

    it('negotiation mode accepts only qmp_capabilities, sends no events, then switches', T, () =>
      withServer(kind, async (server) => {
        server.register('ping', () => 'pong');
        const raw = await RawQmp.connect(server.address);
        try {
          await raw.next(); // greeting
          raw.send('{"execute":"query-version","id":1}');
          assert.deepEqual(await raw.next(), {
            error: { class: 'CommandNotFound', desc: "Expecting capabilities negotiation with 'qmp_capabilities'" },
            id: 1,
          });
          server.emitEvent('EARLY');
          raw.send('{"execute":"ping","id":"x"}');
          assert.equal(
            (await raw.next() as { error: { class: string } }).error.class,
            'CommandNotFound',
            'no EARLY event in negotiation mode',
          );
          raw.send('{"execute":"qmp_capabilities","id":{"a":[1]}}');
          assert.deepEqual(await raw.next(), { return: {}, id: { a: [1] } });
          raw.send('{"execute":"ping"}');
          assert.deepEqual(await raw.next(), { return: 'pong' });
          raw.send('{"execute":"qmp_capabilities","id":2}');
          assert.deepEqual(await raw.next(), {
            error: { class: 'CommandNotFound', desc: 'Capabilities negotiation is already complete, command ignored' },
            id: 2,
          });
        } finally {
          await raw.close();
        }
      }),
    );

    it('rejects unknown capabilities', T, () =>
      withServer(kind, async (server) => {
        const raw = await RawQmp.connect(server.address);
        try {
          await raw.next();
          raw.send('{"execute":"qmp_capabilities","arguments":{"enable":["bogus"]},"id":1}');
          assert.deepEqual(await raw.next(), {
            error: { class: 'GenericError', desc: "Parameter 'enable' does not accept value 'bogus'" },
            id: 1,
          });
          raw.send('{"execute":"qmp_capabilities","id":2}');
          assert.deepEqual(await raw.next(), { return: {}, id: 2 });
        } finally {
          await raw.close();
        }
      }),
    );

    it('dispatches to registered handlers with arguments; built-ins answer', T, () =>
      withServer(kind, async (server) => {
        const seen: Array<{ args: unknown; oob: boolean; id: unknown }> = [];
        server.register('echo', (args, ctx) => {
          seen.push({ args, oob: ctx.oob, id: ctx.id });
          return args;
        });
        server.register('nothing', async () => undefined);
        await withClient(server, async (client) => {
          assert.deepEqual(client.greeting.QMP.version, { qemu: { micro: 0, minor: 2, major: 7 }, package: 'livemig 9.9.9' });
          assert.deepEqual(await client.execute('echo', { a: 1, b: 'x' }), { a: 1, b: 'x' });
          assert.deepEqual(await client.execute('echo'), {});
          assert.deepEqual(await client.execute('nothing'), {});
          assert.deepEqual(await client.execute('query-version'), {
            qemu: { micro: 0, minor: 2, major: 7 },
            package: 'livemig 9.9.9',
          });
          assert.deepEqual(await client.execute('query-commands'), [
            { name: 'qmp_capabilities' },
            { name: 'query-commands' },
            { name: 'query-events' },
            { name: 'query-version' },
            { name: 'query-name' },
            { name: 'query-qmp-schema' },
            { name: 'echo' },
            { name: 'nothing' },
          ]);
          assert.equal(seen.length, 2);
          assert.equal(seen[0]?.oob, false);
          assert.equal(typeof seen[0]?.id, 'number');
          assert.ok((seen[1]?.id as number) > (seen[0]?.id as number), 'ids increase');
        });
      }),
    );

    it('maps handler failures and unknown commands to QMP errors', T, () =>
      withServer(kind, async (server) => {
        server.register('boom', () => {
          throw new Error('it broke');
        });
        server.register('async-boom', async () => {
          await delay(1);
          throw new Error('later');
        });
        server.register('classed', () => {
          throw Object.assign(new Error('no such device'), { qmpClass: 'DeviceNotFound' });
        });
        server.register('reply', () => {
          throw QmpError.reply('DeviceNotActive', 'not active');
        });
        server.register('bigint', () => 1n);
        await withClient(server, async (client) => {
          const cases: Array<[string, string, string]> = [
            ['boom', 'GenericError', 'it broke'],
            ['async-boom', 'GenericError', 'later'],
            ['classed', 'DeviceNotFound', 'no such device'],
            ['reply', 'DeviceNotActive', 'not active'],
            ['no-such-command', 'CommandNotFound', 'The command no-such-command has not been found'],
          ];
          for (const [name, qmpClass, desc] of cases) {
            const err = qmpError(await client.execute(name).then(() => assert.fail(`${name} resolved`), (e: unknown) => e));
            assert.equal(err.code, 'LM_ERR_QMP_ERROR_REPLY');
            assert.equal(err.qmpClass, qmpClass);
            assert.equal(err.desc, desc);
            assert.match(err.message, new RegExp(name));
          }
          const enc = qmpError(await client.execute('bigint').catch((e: unknown) => e));
          assert.equal(enc.qmpClass, 'GenericError');
          assert.match(enc.desc ?? '', /cannot encode the reply/);
          // The connection is still usable after errors.
          assert.deepEqual(await client.execute('query-version').then((v) => typeof v), 'object');
        });
      }),
    );

    it('answers invalid JSON without an id and malformed requests with one, in order', T, () =>
      withServer(kind, async (server) => {
        server.register('ping', () => 'pong');
        const raw = await RawQmp.negotiated(server.address);
        try {
          raw.send('{"execute": }\r\n');
          const parse = (await raw.next()) as { error: { class: string; desc: string }; id?: unknown };
          assert.equal(parse.error.class, 'GenericError');
          assert.match(parse.error.desc, /^JSON parse error, /);
          assert.equal('id' in parse, false);
          raw.send('nonsense {"execute":"ping","id":1}');
          assert.match(((await raw.next()) as { error: { desc: string } }).error.desc, /^JSON parse error, /);
          assert.deepEqual(await raw.next(), { return: 'pong', id: 1 });
          raw.send('[1,2] 42 "str"');
          for (let i = 0; i < 3; i++) {
            assert.deepEqual(await raw.next(), { error: { class: 'GenericError', desc: 'QMP input must be a JSON object' } });
          }
          const malformed: Array<[string, string]> = [
            ['{"id":5}', "QMP input lacks member 'execute'"],
            ['{"execute":1,"id":5}', "QMP input member 'execute' must be a string"],
            ['{"execute":"ping","arguments":[],"id":5}', "QMP input member 'arguments' must be an object"],
            ['{"execute":"ping","extra":true,"id":5}', "QMP input member 'extra' is unexpected"],
            ['{"exec-oob":"ping","id":5}', "QMP input member 'exec-oob' is unexpected"],
          ];
          raw.send(malformed.map(([req]) => req).join(''));
          for (const [, desc] of malformed) {
            assert.deepEqual(await raw.next(), { error: { class: 'GenericError', desc }, id: 5 });
          }
        } finally {
          await raw.close();
        }
      }),
    );

    it('parses objects split across reads and several per line (single quotes, braces in strings, UTF-8)', T, () =>
      withServer(kind, async (server) => {
        server.register('echo', (args) => args);
        const raw = await RawQmp.negotiated(server.address);
        try {
          const text = '{"execute":"echo","arguments":{"s":"}{ \\" ]\\\\","u":"é€😀"},"id":1}';
          const bytes = Buffer.from(text, 'utf8');
          // One byte per write, with a pause so the reads really are split (mid UTF-8 sequence too).
          for (let i = 0; i < bytes.length; i++) {
            raw.socket.write(bytes.subarray(i, i + 1));
            if (i % 8 === 0) await delay(1);
          }
          const line = await raw.nextLine();
          assert.ok(line !== undefined && /^[\x20-\x7e]*$/.test(line), 'output is ASCII');
          assert.ok(line.includes('\\u00e9\\u20ac\\ud83d\\ude00'), line);
          assert.deepEqual(JSON.parse(line), { return: { s: '}{ " ]\\', u: 'é€😀' }, id: 1 });

          raw.send(
            `{"execute":"echo","arguments":{"n":1},"id":2}{"execute":"echo","arguments":{"n":2},"id":3}\n` +
              `{'execute':'echo','arguments':{'q':'it\\'s "x"'},'id':4}  {"execute":"echo","id":5}`,
          );
          assert.deepEqual(await raw.next(), { return: { n: 1 }, id: 2 });
          assert.deepEqual(await raw.next(), { return: { n: 2 }, id: 3 });
          assert.deepEqual(await raw.next(), { return: { q: `it's "x"` }, id: 4 });
          assert.deepEqual(await raw.next(), { return: {}, id: 5 });
        } finally {
          await raw.close();
        }
      }),
    );

    it('closes a client whose message exceeds 1 MiB, and serves others', T, () =>
      withServer(kind, async (server) => {
        const raw = await RawQmp.negotiated(server.address);
        try {
          const head = '{"execute":"x","arguments":{"pad":"';
          raw.send(head);
          const chunk = 'a'.repeat(64 * 1024);
          for (let sent = head.length; sent <= 1024 * 1024 && !raw.socket.destroyed; sent += chunk.length) {
            if (!raw.socket.write(chunk)) await Promise.race([new Promise((r) => raw.socket.once('drain', r)), raw.closed]);
          }
          assert.deepEqual(await raw.next(), {
            error: { class: 'GenericError', desc: 'message exceeds 1048576 bytes' },
          });
          await within(raw.closed, 'server closing the oversized client');
          await withClient(server, async (client) => {
            assert.equal(typeof (await client.execute('query-version')), 'object');
          });
        } finally {
          await raw.close();
        }
      }),
    );

    it('runs one client’s commands serially, in order; replies come back in order', T, () =>
      withServer(kind, async (server) => {
        let running = 0;
        let maxRunning = 0;
        const order: number[] = [];
        server.register('step', async (args) => {
          running++;
          maxRunning = Math.max(maxRunning, running);
          await delay(Number(args['ms']));
          order.push(Number(args['n']));
          running--;
          return args['n'];
        });
        await withClient(server, async (client) => {
          const n = 20; // more than the 8 queued requests that make the server stop reading
          const replies = await within(
            Promise.all(Array.from({ length: n }, (_, i) => client.execute('step', { n: i, ms: (n - i) % 4 }))),
            'serial replies',
          );
          assert.deepEqual(replies, Array.from({ length: n }, (_, i) => i));
          assert.deepEqual(order, Array.from({ length: n }, (_, i) => i));
          assert.equal(maxRunning, 1);
        });
      }),
    );

    it('runs exec-oob commands past a blocked queue; refuses OOB where not allowed', T, () =>
      withServer(kind, async (server) => {
        let release: () => void = () => {};
        const blocked = new Promise<void>((resolve) => {
          release = resolve;
        });
        server.register('block', async () => {
          await blocked;
          return 'unblocked';
        });
        server.register(
          'migrate-pause',
          (_args, ctx) => {
            release();
            return { oob: ctx.oob };
          },
          { allowOob: true },
        );
        server.register('plain', () => 'plain');
        try {
          await withClient(server, async (client) => {
            const events: string[] = [];
            const slow = client.execute('block').then((v) => events.push(`block:${String(v)}`));
            const queued = client.execute('plain').then((v) => events.push(`plain:${String(v)}`));
            await delay(20);
            assert.deepEqual(events, []);
            assert.deepEqual(await client.execute('migrate-pause', undefined, { oob: true }), { oob: true });
            await within(Promise.all([slow, queued]), 'queued replies');
            assert.deepEqual(events, ['block:unblocked', 'plain:plain']);
            const err = qmpError(await client.execute('plain', undefined, { oob: true }).catch((e: unknown) => e));
            assert.equal(err.qmpClass, 'GenericError');
            assert.equal(err.desc, 'The command plain does not support OOB');
          });
          // Without oob negotiated, exec-oob is refused.
          const client = await QmpClient.connect(server.address, { timeoutMs: WAIT_MS, capabilities: [] });
          try {
            const err = qmpError(await client.execute('migrate-pause', undefined, { oob: true }).catch((e: unknown) => e));
            assert.equal(err.desc, "QMP input member 'exec-oob' is unexpected");
          } finally {
            await client.close();
          }
        } finally {
          release();
        }
      }),
    );

    it('sends events to every negotiated client with a timestamp; the client buffers them', T, () =>
      withServer(kind, async (server) => {
        const a = await QmpClient.connect(server.address, { timeoutMs: WAIT_MS });
        const b = await QmpClient.connect(server.address, { timeoutMs: WAIT_MS });
        const raw = await RawQmp.connect(server.address); // not negotiated: gets nothing
        try {
          await raw.next(); // greeting
          assert.equal(server.clientCount, 3);
          const before = Date.now() / 1000;
          server.emitEvent('MIGRATION', { status: 'setup' });
          server.emitEvent('STOP');
          server.emitEvent('MIGRATION', { status: 'active' });
          server.emitEvent('MIGRATION', { status: 'completed' });
          // Arrived before anyone waited: served from the buffer, first match by predicate.
          const done = await a.waitForEvent('MIGRATION', (e) => e.data?.['status'] === 'completed');
          assert.deepEqual(done.data, { status: 'completed' });
          assert.ok(Math.abs(done.timestamp.seconds - before) < 60);
          assert.ok(done.timestamp.microseconds >= 0 && done.timestamp.microseconds < 1_000_000);
          const stop = await a.waitForEvent('STOP');
          assert.equal('data' in stop, false);
          // The iterator yields what is left, in order, then waits for more.
          const it = a.events({ idleTimeoutMs: WAIT_MS });
          assert.deepEqual((await it.next()).value?.data, { status: 'setup' });
          assert.deepEqual((await it.next()).value?.data, { status: 'active' });
          const pending = it.next();
          server.emitEvent('RESUME');
          assert.equal((await within(pending, 'iterator event')).value?.event, 'RESUME');
          // A waiter registered first gets a matching event ahead of the buffer.
          const waiting = b.waitForEvent('LATER');
          await delay(5);
          server.emitEvent('LATER', { x: 1 });
          assert.deepEqual((await waiting).data, { x: 1 });
          const seenByB: QmpEvent[] = [];
          for await (const e of b.events({ idleTimeoutMs: WAIT_MS })) {
            seenByB.push(e);
            if (seenByB.length === 5) break;
          }
          assert.deepEqual(
            seenByB.map((e) => e.event),
            ['MIGRATION', 'STOP', 'MIGRATION', 'MIGRATION', 'RESUME'],
          );
          assert.deepEqual((await a.waitForEvent('LATER')).data, { x: 1 }, 'a got LATER too, buffered');
          // Timeouts are bounded and coded.
          const err = qmpError(await a.waitForEvent('NEVER', undefined, 30).catch((e: unknown) => e));
          assert.equal(err.code, 'LM_ERR_QMP_TIMEOUT');
          const idle = qmpError(await a.events({ idleTimeoutMs: 30 }).next().catch((e: unknown) => e));
          assert.equal(idle.code, 'LM_ERR_QMP_TIMEOUT');
          await raw.quiet(20);
        } finally {
          await Promise.all([a.close(), b.close(), raw.close()]);
        }
      }),
    );

    it('bounds the event buffer, dropping the oldest', T, () =>
      withServer(kind, async (server) => {
        const client = await QmpClient.connect(server.address, { timeoutMs: WAIT_MS, maxBufferedEvents: 3 });
        try {
          for (let i = 0; i < 5; i++) server.emitEvent('TICK', { i });
          await client.execute('query-version'); // replies follow the events, so all 5 have arrived
          assert.equal(client.droppedEvents, 2);
          const got: unknown[] = [];
          for (let i = 0; i < 3; i++) got.push((await client.waitForEvent('TICK')).data?.['i']);
          assert.deepEqual(got, [2, 3, 4]);
        } finally {
          await client.close();
        }
      }),
    );

    it('bounds execute with a timeout', T, () =>
      withServer(kind, async (server) => {
        let release: () => void = () => {};
        const never = new Promise<void>((resolve) => {
          release = resolve;
        });
        server.register('hang', () => never);
        try {
          await withClient(server, async (client) => {
            const err = qmpError(await client.execute('hang', undefined, { timeoutMs: 40 }).catch((e: unknown) => e));
            assert.equal(err.code, 'LM_ERR_QMP_TIMEOUT');
            assert.match(err.message, /hang got no reply within 40 ms/);
          });
        } finally {
          release();
        }
      }),
    );

    it('close() ends every client: pending calls and waits reject with LM_ERR_QMP_CLOSED', T, async () => {
      let addr;
      let release: () => void = () => {};
      await withServer(kind, async (server) => {
        addr = server.address;
        server.register('hang', () => new Promise<void>((resolve) => (release = resolve)));
        const client = await QmpClient.connect(server.address, { timeoutMs: WAIT_MS });
        const call = client.execute('hang').catch((e: unknown) => e);
        const wait = client.waitForEvent('NEVER').catch((e: unknown) => e);
        const iter = client.events().next();
        await delay(10);
        await within(server.close(), 'server close');
        assert.equal(qmpError(await call).code, 'LM_ERR_QMP_CLOSED');
        assert.equal(qmpError(await wait).code, 'LM_ERR_QMP_CLOSED');
        assert.deepEqual(await iter, { value: undefined, done: true });
        assert.equal(client.closed, true);
        assert.equal(qmpError(await client.execute('x').catch((e: unknown) => e)).code, 'LM_ERR_QMP_CLOSED');
        await client.close();
        release();
      });
      assert.ok(addr !== undefined);
      const err = await QmpClient.connect(addr, { timeoutMs: 1000 }).catch((e: unknown) => e);
      assert.equal((err as { code?: unknown }).code, 'LM_ERR_CHANNEL_OPEN');
    });
  });
}

describe('QMP introspection', () => {
  it('query-name, query-events and a schema in QEMU\'s SchemaInfo shape from the registrations', T, () =>
    withServer(
      'unix',
      async (server) => {
        server.register('go', () => ({}), { args: { uri: 'str', '*fast': 'bool', '*tags': ['str'] }, returns: {}, allowOob: true });
        server.register('loose', (args) => args);
        server.declareEvent('DONE', { status: qmpEnum(['ok', 'bad']), '*count': 'int' });
        server.declareEvent('PING');
        await withClient(server, async (client) => {
          assert.deepEqual(await client.execute('query-name'), { name: 'vm1' });
          assert.deepEqual(await client.execute('query-events'), [{ name: 'DONE' }, { name: 'PING' }]);
          const schema = (await client.execute('query-qmp-schema')) as Record<string, unknown>[];
          const byName = new Map(schema.map((e) => [e['name'], e]));
          assert.deepEqual(byName.get('0'), { name: '0', 'meta-type': 'object', members: [] }, 'the empty object is "0", as in QEMU');
          const go = byName.get('go')!;
          assert.deepEqual({ ...go, 'arg-type': 'T' }, { name: 'go', 'meta-type': 'command', 'arg-type': 'T', 'ret-type': '0', 'allow-oob': true });
          assert.deepEqual(byName.get(go['arg-type'] as string), {
            name: go['arg-type'],
            'meta-type': 'object',
            members: [
              { name: 'uri', type: 'str' },
              { name: 'fast', type: 'bool', default: null },
              { name: 'tags', type: '[str]', default: null },
            ],
          });
          assert.deepEqual(byName.get('[str]'), { name: '[str]', 'meta-type': 'array', 'element-type': 'str' });
          assert.deepEqual(byName.get('str'), { name: 'str', 'meta-type': 'builtin', 'json-type': 'string' });
          assert.equal(byName.get('loose')!['arg-type'], 'any', 'an undescribed command takes anything');
          const done = byName.get('DONE')!;
          assert.equal(done['meta-type'], 'event');
          const data = byName.get(done['arg-type'] as string) as { members: { name: string; type: string }[] };
          assert.deepEqual(byName.get(data.members[0]!.type), { name: data.members[0]!.type, 'meta-type': 'enum', members: [{ name: 'ok' }, { name: 'bad' }], values: ['ok', 'bad'] });
          assert.equal(byName.get('PING')!['arg-type'], '0');
          for (const name of ['qmp_capabilities', 'query-commands', 'query-events', 'query-name', 'query-version', 'query-qmp-schema']) {
            assert.equal(byName.get(name)?.['meta-type'], 'command', name);
          }
          // The server checks what it describes, before the handler runs, with QEMU's messages.
          const desc = (name: string, args: Record<string, unknown>): Promise<unknown> =>
            client.execute(name, args).then(
              () => 'accepted',
              (e: unknown) => (e as QmpError).desc,
            );
          assert.equal(await desc('go', {}), "Parameter 'uri' is missing");
          assert.equal(await desc('go', { uri: 1 }), "Invalid parameter type for 'uri', expected: string");
          assert.equal(await desc('go', { uri: 'x', fast: 'yes' }), "Invalid parameter type for 'fast', expected: boolean");
          assert.equal(await desc('go', { uri: 'x', slow: true }), "Parameter 'slow' is unexpected");
          assert.equal(await desc('go', { uri: 'x', fast: true, tags: ['a'] }), 'accepted');
          assert.equal(await desc('query-name', { x: 1 }), "Parameter 'x' is unexpected");
          assert.deepEqual(await client.execute('loose', { any: 'thing' }), { any: 'thing' });
        });
      },
      { name: 'vm1' },
    ),
  );

  it('query-name without a name is {}', T, () =>
    withServer('tcp', (server) => withClient(server, async (client) => assert.deepEqual(await client.execute('query-name'), {}))),
  );
});

describe('QMP misc', () => {
  it('register() refuses duplicates and built-in names', () => {
    const server = new QmpServer();
    server.register('a', () => 1);
    for (const name of ['a', 'qmp_capabilities', 'query-version', '']) {
      assert.throws(
        () => server.register(name, () => 1),
        (e: unknown) => (e as { code?: unknown }).code === 'LM_ERR_INVALID_ARGUMENT',
      );
    }
  });

  it('the client times out on a server that never greets', T, async () => {
    const silent = net.createServer(() => {});
    const sockets = new Set<net.Socket>();
    silent.on('connection', (s) => sockets.add(s));
    await new Promise<void>((resolve) => silent.listen(0, '127.0.0.1', resolve));
    try {
      const { port } = silent.address() as net.AddressInfo;
      const err = await QmpClient.connect(`tcp:127.0.0.1:${port}`, { timeoutMs: 50 }).catch((e: unknown) => e);
      assert.equal((err as { code?: unknown }).code, 'LM_ERR_QMP_TIMEOUT');
    } finally {
      for (const s of sockets) s.destroy();
      await new Promise((resolve) => silent.close(resolve));
    }
  });

  it('the client rejects a peer that does not speak QMP', T, async () => {
    const other = net.createServer((s) => s.end('{"hello": "world"}\r\n'));
    await new Promise<void>((resolve) => other.listen(0, '127.0.0.1', resolve));
    try {
      const { port } = other.address() as net.AddressInfo;
      const err = await QmpClient.connect(`tcp:127.0.0.1:${port}`, { timeoutMs: WAIT_MS }).catch((e: unknown) => e);
      assert.equal((err as { code?: unknown }).code, 'LM_ERR_QMP_PROTOCOL');
    } finally {
      await new Promise((resolve) => other.close(resolve));
    }
  });

  it('a smaller maxMessageBytes applies to the server', T, () =>
    withServer(
      'unix',
      async (server) => {
        const raw = await RawQmp.negotiated(server.address);
        try {
          raw.send(`{"execute":"x","arguments":{"p":"${'b'.repeat(200)}"}}`);
          assert.deepEqual(await raw.next(), { error: { class: 'GenericError', desc: 'message exceeds 100 bytes' } });
          await within(raw.closed, 'close after oversize');
        } finally {
          await raw.close();
        }
      },
      { maxMessageBytes: 100 },
    ),
  );
});
