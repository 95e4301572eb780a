import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { closeSync, fstatSync, openSync } from 'node:fs';
import { readFile, stat, writeFile } from 'node:fs/promises';
import net from 'node:net';
import { join } from 'node:path';
import type { Duplex } from 'node:stream';
import { finished } from 'node:stream/promises';
import { describe, it } from 'node:test';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { acceptWithOnread, connectChannel, listenChannel } from '../src/index.ts';
import { delay, withTempDir, within } from './helpers.ts';

const T = { timeout: 20_000 };

function code(err: unknown): unknown {
  return (err as { code?: unknown }).code;
}

/** Everything the stream yields until it ends. */
function readAll(stream: Duplex): Promise<Buffer> {
  const chunks: Buffer[] = [];
  stream.on('data', (c: Buffer) => chunks.push(c));
  return within(finished(stream, { writable: false }).then(() => Buffer.concat(chunks)), 'stream end');
}

/** Resolves once `cond()` holds (polled every 5 ms, bounded by within()). */
function until(cond: () => boolean, what: string): Promise<void> {
  return within(
    new Promise<void>((r) => {
      const check = (): void => void (cond() ? r() : setTimeout(check, 5));
      check();
    }),
    what,
  );
}

/** The error the stream is destroyed with. */
function errorOf(stream: Duplex): Promise<Error> {
  return within(new Promise((resolve) => stream.once('error', resolve)), 'stream error');
}

function pattern(n: number): Buffer {
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i++) b[i] = (i * 31 + 7) & 0xff;
  return b;
}

async function echoRoundTrip(listenAddress: string): Promise<string> {
  // Half-open on both sides: the sender finishes the stream, then still reads the return path.
  const listener = await listenChannel(listenAddress, { allowHalfOpen: true });
  try {
    const sender = await connectChannel(listener.address, { connectTimeoutMs: 2000, allowHalfOpen: true });
    const receiver = await within(listener.accepted, 'accept');
    try {
      const data = pattern(300_000);
      const got = readAll(receiver);
      sender.end(data);
      assert.ok((await got).equals(data), 'main channel bytes arrive intact');
      // The reverse direction of the same connection (the return path).
      const back = readAll(sender);
      receiver.end('rp-bytes');
      assert.equal((await back).toString(), 'rp-bytes');
      return listener.addressText;
    } finally {
      sender.destroy();
      receiver.destroy();
    }
  } finally {
    await listener.close();
  }
}

describe('tcp and unix channels', () => {
  it('tcp port 0: binds a real port, carries both directions, stops listening after one accept', T, async () => {
    const listener = await listenChannel('tcp:127.0.0.1:0');
    assert.equal(listener.address.transport, 'tcp');
    assert.match(listener.addressText, /^tcp:127\.0\.0\.1:[1-9][0-9]*$/);
    const a = await connectChannel(listener.addressText);
    const b = await within(listener.accepted, 'accept');
    const refused = await connectChannel(listener.addressText, { connectTimeoutMs: 2000 }).catch((e: unknown) => e);
    assert.equal(code(refused), 'LM_ERR_CHANNEL_OPEN');
    assert.match((refused as Error).message, /ECONNREFUSED/);
    a.destroy();
    b.destroy();
    await listener.close();
    assert.match(await echoRoundTrip('tcp:127.0.0.1:0'), /^tcp:/);
  });

  it('unix: carries both directions and replaces a stale socket file', T, () =>
    withTempDir(async (dir) => {
      const path = join(dir, 'mig.sock');
      // Leave a stale socket file behind: a process that binds and dies without unlinking.
      const child = spawn(process.execPath, [
        '-e',
        `require('net').createServer().listen(${JSON.stringify(path)}, () => process.kill(process.pid, 'SIGKILL'))`,
      ]);
      await within(new Promise((resolve) => child.once('exit', resolve)), 'stale-socket child');
      assert.ok((await stat(path)).isSocket());
      assert.equal(await echoRoundTrip(`unix:${path}`), `unix:${path}`);
    }),
  );

  it('unix: refuses to replace something that is not a socket', T, () =>
    withTempDir(async (dir) => {
      const path = join(dir, 'not-a-socket');
      await writeFile(path, 'precious');
      const err = await listenChannel(`unix:${path}`).catch((e: unknown) => e);
      assert.equal(code(err), 'LM_ERR_CHANNEL_OPEN');
      assert.match((err as Error).message, /exists and is not a socket/);
      assert.equal(await readFile(path, 'utf8'), 'precious');
    }),
  );

  it('listener close() before a connection rejects accepted; acceptTimeoutMs bounds the wait', T, async () => {
    const l1 = await listenChannel('tcp:127.0.0.1:0');
    await l1.close();
    assert.equal(code(await l1.accepted.catch((e: unknown) => e)), 'LM_ERR_CHANNEL_CLOSED');
    const l2 = await listenChannel('tcp:127.0.0.1:0', { acceptTimeoutMs: 30 });
    assert.equal(code(await l2.accepted.catch((e: unknown) => e)), 'LM_ERR_CHANNEL_TIMEOUT');
    await l2.close();
  });

  it('unsupported directions and transports have codes', T, async () => {
    for (const a of ['exec:cat', 'file:/tmp/x', 'fd:3', 'defer']) {
      assert.equal(code(await listenChannel(a).catch((e: unknown) => e)), 'LM_ERR_UNSUPPORTED_TRANSPORT', a);
    }
    assert.equal(code(await connectChannel('defer').catch((e: unknown) => e)), 'LM_ERR_UNSUPPORTED_TRANSPORT');
    assert.equal(code(await connectChannel('tcp:127.0.0.1:0').catch((e: unknown) => e)), 'LM_ERR_CHANNEL_OPEN');
    assert.equal(code(await connectChannel('tcp:127.0.0.1').catch((e: unknown) => e)), 'LM_ERR_BAD_ADDRESS');
    const onread = { buffer: Buffer.alloc(8), callback: () => true };
    assert.equal(code(await connectChannel('exec:cat', { onread }).catch((e: unknown) => e)), 'LM_ERR_UNSUPPORTED_TRANSPORT');
  });
});

describe('exec channels', () => {
  it('exec:cat > FILE writes the file (batched writes included); the readable side ends on exit 0', T, () =>
    withTempDir(async (dir) => {
      const file = join(dir, 'out.bin');
      const ch = await connectChannel(`exec:cat > '${file}'`);
      const ended = readAll(ch);
      const data = pattern(1 << 20);
      ch.cork();
      for (let off = 0; off < data.length; off += 4096) ch.write(data.subarray(off, off + 4096));
      ch.uncork();
      ch.end();
      assert.equal((await ended).length, 0);
      await within(finished(ch), 'exec channel finished');
      assert.ok((await readFile(file)).equals(data));
    }),
  );

  it('reads the command’s stdout', T, async () => {
    const ch = await connectChannel('exec:tr a-z A-Z');
    const out = readAll(ch);
    ch.end('hello migration');
    assert.equal((await out).toString(), 'HELLO MIGRATION');
  });

  it('a non-zero exit is an LM_ERR_EXEC_FAILED error carrying the status and stderr', T, async () => {
    const ch = await connectChannel('exec:echo "disk full" >&2; exit 3');
    ch.resume();
    const err = await errorOf(ch);
    assert.equal(code(err), 'LM_ERR_EXEC_FAILED');
    assert.match(err.message, /exited with status 3: disk full/);
  });

  it('a command that dies while we write reports its exit, not EPIPE', T, async () => {
    const ch = await connectChannel('exec:head -c 10 > /dev/null; exit 7');
    const err = errorOf(ch);
    const data = pattern(256 * 1024);
    for (let i = 0; i < 16 && !ch.destroyed; i++) {
      if (!ch.write(data)) await Promise.race([new Promise((r) => ch.once('drain', r)), err]);
    }
    const e = await err;
    assert.equal(code(e), 'LM_ERR_EXEC_FAILED');
    assert.match(e.message, /exited with status 7/);
  });

  it('a command killed by a signal is reported as such; destroy() kills a running command', T, async () => {
    const ch = await connectChannel('exec:kill -9 $$');
    ch.resume();
    const err = await errorOf(ch);
    assert.equal(code(err), 'LM_ERR_EXEC_FAILED');
    assert.match(err.message, /killed by SIGKILL/);

    const running = (await connectChannel('exec:exec sleep 30')) as Duplex & { child: import('node:child_process').ChildProcess };
    const exited = new Promise((resolve) => running.child.once('exit', (c, s) => resolve(s)));
    running.destroy();
    assert.equal(await within(exited, 'killed child'), 'SIGTERM');
  });
});

describe('file channels', () => {
  it('file:PATH,offset=N keeps the first N bytes, drops the rest, writes from N; readable ends at once', T, () =>
    withTempDir(async (dir) => {
      const path = join(dir, 'mig.img');
      await writeFile(path, 'HEADER-old-junk-that-must-go');
      const ch = await connectChannel(`file:${path},offset=7`);
      assert.equal((await readAll(ch)).length, 0, 'readable side is empty');
      ch.write('new ');
      ch.end('data');
      await within(finished(ch), 'file channel finished');
      assert.equal(await readFile(path, 'utf8'), 'HEADER-new data');
    }),
  );

  it('creates the file (mode 0600), and an offset past the end leaves a zero hole', T, () =>
    withTempDir(async (dir) => {
      const path = join(dir, 'fresh.img');
      const ch = await connectChannel(`file:${path},offset=0x10`);
      ch.end(Buffer.from('QEVM'));
      await within(finished(ch), 'file channel finished');
      const bytes = await readFile(path);
      assert.deepEqual([...bytes.subarray(0, 16)], new Array(16).fill(0));
      assert.equal(bytes.subarray(16).toString(), 'QEVM');
      assert.equal((await stat(path)).mode & 0o777, 0o600 & ~process.umask());
      const plain = await connectChannel(`file:${path}`);
      plain.end('x');
      await within(finished(plain), 'file channel finished');
      assert.equal(await readFile(path, 'utf8'), 'x', 'offset 0 truncates everything');
    }),
  );

  it('an unwritable path is LM_ERR_CHANNEL_OPEN', T, () =>
    withTempDir(async (dir) => {
      const err = await connectChannel(`file:${join(dir, 'no', 'such', 'dir')}`).catch((e: unknown) => e);
      assert.equal(code(err), 'LM_ERR_CHANNEL_OPEN');
      assert.match((err as Error).message, /ENOENT/);
    }),
  );
});

describe('fd channels', () => {
  it('fd:N wraps an inherited socket in a child process', T, async () => {
    const channelModule = fileURLToPath(new URL('../src/channel.ts', import.meta.url));
    const script = `
      import { connectChannel } from ${JSON.stringify(channelModule)};
      const ch = await connectChannel('fd:3');
      ch.on('data', (d) => ch.write(d.toString().toUpperCase()));
      ch.on('end', () => ch.end());
    `;
    const child = spawn(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], {
      stdio: ['ignore', 'inherit', 'inherit', 'pipe'],
    });
    try {
      const sock = child.stdio[3] as Duplex;
      const reply = readAll(sock);
      sock.end('through an inherited fd');
      assert.equal((await reply).toString(), 'THROUGH AN INHERITED FD');
      const status = await within(
        new Promise((resolve) => child.once('exit', (c) => resolve(c))),
        'fd child exit',
        10_000,
      );
      assert.equal(status, 0);
    } finally {
      if (child.exitCode === null) child.kill();
    }
  });

  it('an fd that is not a socket or pipe is LM_ERR_CHANNEL_OPEN', T, () =>
    withTempDir(async (dir) => {
      const fd = openSync(join(dir, 'regular'), 'w');
      try {
        const err = await connectChannel(`fd:${fd}`).catch((e: unknown) => e);
        assert.equal(code(err), 'LM_ERR_CHANNEL_OPEN');
      } finally {
        closeSync(fd);
      }
    }),
  );
});

describe('static-buffer (onread) reads', () => {
  it('acceptWithOnread receives every byte through one buffer and can write back', T, async () => {
    const server = net.createServer({ pauseOnConnect: true });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    const { port } = server.address() as net.AddressInfo;
    const buffer = Buffer.alloc(4096);
    const received: Buffer[] = [];
    let sameBuffer = true;
    const socketP = acceptWithOnread(server, {
      buffer,
      callback: (n, buf) => {
        if (buf !== buffer) sameBuffer = false;
        received.push(Buffer.from(buf.subarray(0, n))); // copy: the buffer is reused
        return true;
      },
    });
    const client = net.connect(port, '127.0.0.1');
    try {
      const socket = await within(socketP, 'accept with onread');
      const ended = within(new Promise((resolve) => socket.once('end', resolve)), 'end on onread socket');
      const data = pattern(200_000);
      client.end(data);
      await ended;
      assert.ok(Buffer.concat(received).equals(data), 'all bytes, in order');
      assert.ok(received.length > 1 && received.every((c) => c.length <= 4096));
      assert.ok(sameBuffer, 'callback always gets the static buffer');
      const back = readAll(client);
      socket.end('ack');
      assert.equal((await back).toString(), 'ack');
      await within(new Promise((resolve) => server.close(resolve)), 'server close (connection count released)');
    } finally {
      client.destroy();
      if (server.listening) server.close();
    }
  });

  it('listenChannel({ onread }) over unix; returning false pauses the socket', T, () =>
    withTempDir(async (dir) => {
      const received: Buffer[] = [];
      let paused = false;
      const listener = await listenChannel(`unix:${join(dir, 'r.sock')}`, {
        onread: {
          buffer: () => Buffer.alloc(1024),
          callback: (n, buf) => {
            received.push(Buffer.from(buf.subarray(0, n)));
            if (!paused) {
              paused = true;
              return false;
            }
            return true;
          },
        },
      });
      const sender = await connectChannel(listener.address);
      try {
        const receiver = await within(listener.accepted, 'accept');
        sender.write(pattern(10_000));
        await delay(50);
        assert.equal(received.length, 1, 'paused after the first chunk');
        // onread mode stops the handle, not the stream: isPaused() stays false; resume() restarts it.
        await delay(20);
        assert.equal(received.length, 1, 'still paused');
        const ended = within(new Promise((resolve) => receiver.once('end', resolve)), 'end');
        receiver.resume();
        sender.end();
        await ended;
        assert.ok(Buffer.concat(received).equals(pattern(10_000)));
        receiver.destroy();
      } finally {
        sender.destroy();
        await listener.close();
      }
    }),
  );

  it('acceptWithOnread needs pauseOnConnect', async () => {
    const server = net.createServer();
    const err = await acceptWithOnread(server, { buffer: Buffer.alloc(1), callback: () => true }).catch((e: unknown) => e);
    assert.equal(code(err), 'LM_ERR_INVALID_ARGUMENT');
  });
});

/** A loopback TCP connection: the listening server, the connecting end and the accepted end. */
async function tcpPair(): Promise<{ server: net.Server; client: net.Socket; peer: net.Socket }> {
  const server = net.createServer();
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const accepted = new Promise<net.Socket>((r) => server.once('connection', r));
  const client = net.connect((server.address() as net.AddressInfo).port, '127.0.0.1');
  const peer = await within(accepted, 'accept');
  // Connected on both ends: a socket still connecting cannot be handed over by descriptor.
  if (client.connecting) await within(new Promise((r) => client.once('connect', r)), 'connect');
  return { server, client, peer };
}

describe('detachFd: a connection handed to a worker thread', () => {
  it('the worker owns it both ways; bytes this thread had read already come back as pending; this thread reads nothing more', T, async () => {
    const { Worker } = await import('node:worker_threads');
    const { detachFd } = await import('../src/index.ts');
    const { server, client, peer } = await tcpPair();
    try {
      // The client connection reads 'early' into its buffer (no 'data' listener: it stays there).
      peer.write('early');
      await until(() => client.readableLength >= 5, 'early bytes buffered');
      let readHere = 0;
      const { fd, pending } = detachFd(client);
      client.on('data', (c: Buffer) => (readHere += c.length));
      assert.equal(pending.toString(), 'early');
      // The worker echoes what it reads, upper-cased, and reports how much it got.
      const w = new Worker(
        `const net = require('node:net'); const { workerData, parentPort } = require('node:worker_threads');
         const s = new net.Socket({ fd: workerData.fd, readable: true, writable: true });
         let got = 0;
         s.on('data', (d) => { got += d.length; s.write(d.toString().toUpperCase()); if (got >= 5) { parentPort.postMessage(got); } });`,
        { eval: true, workerData: { fd } },
      );
      const echoed = new Promise<string>((r) => peer.once('data', (d: Buffer) => r(d.toString())));
      peer.write('later');
      assert.equal(await within(new Promise((r) => w.once('message', r)), 'worker read'), 5);
      assert.equal(await within(echoed, 'echo'), 'LATER');
      await delay(50);
      assert.equal(readHere, 0, 'the detached socket read nothing more in this thread');
      // The worker's exit closes the descriptor: the peer sees the end.
      const ended = new Promise((r) => peer.once('end', r));
      peer.resume();
      await w.terminate();
      await within(ended, 'peer end');
    } finally {
      peer.destroy();
      server.close();
    }
  });

  it('refuses a socket without a descriptor', T, async () => {
    const { detachFd } = await import('../src/index.ts');
    const s = new net.Socket();
    assert.throws(() => detachFd(s), (err: Error) => code(err) === 'LM_ERR_INVALID_ARGUMENT' || /file descriptor/.test(err.message));
  });
});

describe('WorkerConnection', () => {
  it('delivers the pending bytes first, then what arrives; reports a loss once; an onData error is a loss naming the connection', T, async () => {
    const { detachFd, WorkerConnection } = await import('../src/index.ts');
    const { server, client, peer } = await tcpPair();
    try {
      peer.write('one');
      await until(() => client.readableLength >= 3, 'bytes buffered');
      const handed = { ...detachFd(client), tcp: true };
      const got: string[] = [];
      const losses: string[] = [];
      const conn = new WorkerConnection(handed, 'test channel', (c) => {
        got.push(c.toString());
        if (c.toString().includes('bad')) throw new Error('cannot parse');
      }, (reason) => losses.push(reason));
      conn.start();
      assert.deepEqual(got, ['one'], 'pending bytes at start()');
      peer.write('two');
      await until(() => got.length >= 2, 'second chunk');
      assert.equal(got.join(''), 'onetwo');
      peer.write('bad');
      await until(() => losses.length >= 1, 'loss');
      await delay(50);
      assert.deepEqual(losses, ['test channel: cannot parse'], 'one loss, naming the channel and the cause');
      assert.equal(conn.done, true);
    } finally {
      peer.destroy();
      server.close();
    }
  });
});

describe('WorkerConnection reads', () => {
  it('the pending bytes, then those that arrived between the hand-over and start(), then the rest: 4 MiB arrive intact through its one read buffer', T, async () => {
    const { detachFd, WorkerConnection } = await import('../src/index.ts');
    const { server, client, peer } = await tcpPair();
    try {
      const data = randomBytes(4 * 1024 * 1024);
      peer.write(data.subarray(0, 1000));
      await until(() => client.readableLength >= 1000, 'bytes buffered');
      const handed = { ...detachFd(client), tcp: true };
      const chunks: Buffer[] = [];
      let reused = false;
      let last: Buffer | undefined;
      const conn = new WorkerConnection(handed, 'test channel', (c) => {
        if (last !== undefined && c.buffer === last.buffer) reused = true;
        last = c;
        chunks.push(Buffer.from(c)); // a chunk is valid only during the call
      }, () => {});
      peer.write(data.subarray(1000, 2000));
      await delay(100);
      assert.equal(chunks.length, 0, 'nothing is delivered before start()');
      conn.start();
      peer.write(data.subarray(2000));
      await until(() => chunks.reduce((a, c) => a + c.length, 0) >= data.length, 'all bytes');
      assert.ok(Buffer.concat(chunks).equals(data), 'the bytes arrive whole and in order');
      assert.ok(reused, 'reads share one buffer');
      conn.close();
    } finally {
      peer.destroy();
      server.close();
    }
  });
});

describe('WorkerConnection writes', () => {
  it('write(): 16 MiB in 1000 writes to a peer that reads late arrive whole and in order, past a full send buffer; each callback once', T, async () => {
    const { detachFd, WorkerConnection } = await import('../src/index.ts');
    const { server, client, peer } = await tcpPair();
    try {
      const conn = new WorkerConnection({ ...detachFd(client), tcp: true }, 'test channel', () => {}, () => {});
      conn.start();
      peer.pause(); // nothing is read until all is written: the send buffer fills
      const data = randomBytes(16 * 1024 * 1024);
      const piece = data.length / 1000;
      let callbacks = 0;
      let queuedAtSomePoint = false;
      for (let i = 0; i < 1000; i++) {
        const at = i * piece;
        // Two buffers a write, as a page record goes: a header and the page.
        conn.write([data.subarray(at, at + 10), data.subarray(at + 10, at + piece)], () => callbacks++);
        if (conn.socket.writableLength > 0) queuedAtSomePoint = true;
      }
      assert.ok(queuedAtSomePoint, 'the send buffer filled, so later writes went through the socket');
      const received: Buffer[] = [];
      let got = 0;
      peer.on('data', (c: Buffer) => {
        received.push(c);
        got += c.length;
      });
      peer.resume();
      await until(() => got >= data.length && callbacks === 1000, 'all bytes and callbacks');
      assert.ok(Buffer.concat(received).equals(data), 'the bytes arrive whole and in order');
      conn.close();
    } finally {
      peer.destroy();
      server.close();
    }
  });
});

describe('WorkerConnection.onClosing', () => {
  for (const how of ['close()', 'a peer reset (Node destroys the socket itself)'] as const) {
    it(`runs once, while the descriptor is still open, before ${how} closes it`, T, async () => {
      const { detachFd, WorkerConnection } = await import('../src/index.ts');
      const { server, client, peer } = await tcpPair();
      try {
        await until(() => !client.connecting, 'connected');
        const handed = { ...detachFd(client), tcp: true };
        const events: string[] = [];
        const conn = new WorkerConnection(handed, 'test channel', () => {}, () => events.push('lost'));
        conn.onClosing = () => {
          // Still this connection's descriptor: a write on it reaches the peer's socket.
          events.push(`closing, open: ${fstatSync(handed.fd).isSocket()}`);
        };
        conn.start();
        if (how === 'close()') conn.close();
        else peer.resetAndDestroy();
        await until(() => events.length >= (how === 'close()' ? 1 : 2), 'closing');
        await delay(50);
        assert.deepEqual(events, how === 'close()' ? ['closing, open: true'] : ['closing, open: true', 'lost']);
      } finally {
        peer.destroy();
        server.close();
      }
    });
  }
});

describe('CommandThread', () => {
  it('ask() is true on the answer, false when none comes in time or the thread has ended; onMessage sees every message', T, () =>
    withTempDir(async (dir) => {
      const { CommandThread } = await import('../src/index.ts');
      const file = join(dir, 'echo-worker.mjs');
      // Answers 'ping' with 'pong'; ignores 'mute'.
      await writeFile(file, `import { parentPort } from 'node:worker_threads';
        parentPort.on('message', (m) => { if (m.kind === 'ping') parentPort.postMessage({ kind: 'pong' }); });`);
      const seen: string[] = [];
      const t = new CommandThread<{ kind: string }, { kind: string }>(pathToFileURL(file), null, (m) => seen.push(m.kind), () => {});
      assert.equal(await t.ask({ kind: 'ping' }, 'pong', 5_000), true);
      assert.deepEqual(seen, ['pong']);
      assert.equal(await t.ask({ kind: 'mute' }, 'pong', 100), false, 'no answer within the bound');
      await t.stop();
      assert.equal(t.exited, true);
      assert.equal(await t.ask({ kind: 'ping' }, 'pong', 5_000), false, 'an ended thread answers nothing, at once');
    }));
});
