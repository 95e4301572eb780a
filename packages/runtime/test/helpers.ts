// Test helpers: a raw line-level QMP peer (to see exact bytes), temp dirs, bounded waits.

import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { MigrationAddress } from '../src/index.ts';

export const WAIT_MS = 5000;

/** Reject after `ms` with a message naming what was awaited. */
export function within<T>(promise: Promise<T>, what: string, ms: number = WAIT_MS): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  return Promise.race([
    promise,
    new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
    }),
  ]).finally(() => clearTimeout(timer));
}

export function delay(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

export async function withTempDir<T>(fn: (dir: string) => Promise<T>): Promise<T> {
  const dir = await mkdtemp(join(tmpdir(), 'lm-rt-'));
  try {
    return await fn(dir);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

/** A QMP peer that sees raw lines: every server line must end in CRLF. */
export class RawQmp {
  readonly socket: net.Socket;
  readonly closed: Promise<void>;
  #text = '';
  #lines: string[] = [];
  #waiters: Array<(line: string | undefined) => void> = [];
  #ended = false;

  private constructor(socket: net.Socket) {
    this.socket = socket;
    socket.setEncoding('utf8');
    socket.on('data', (s: string) => {
      this.#text += s;
      let nl: number;
      while ((nl = this.#text.indexOf('\n')) >= 0) {
        const line = this.#text.slice(0, nl + 1);
        this.#text = this.#text.slice(nl + 1);
        assert.ok(line.endsWith('\r\n'), `server line ends with CRLF: ${JSON.stringify(line)}`);
        this.#push(line.slice(0, -2));
      }
    });
    socket.on('error', () => {}); // resets are expected in the oversize tests
    this.closed = new Promise((resolve) =>
      socket.once('close', () => {
        this.#ended = true;
        for (const w of this.#waiters.splice(0)) w(undefined);
        resolve();
      }),
    );
  }

  static connect(address: MigrationAddress): Promise<RawQmp> {
    return within(
      new Promise<RawQmp>((resolve, reject) => {
        const socket =
          address.transport === 'unix'
            ? net.connect(address.path)
            : address.transport === 'tcp'
              ? net.connect(address.port, address.host)
              : undefined;
        if (socket === undefined) throw new Error('RawQmp: tcp or unix only');
        socket.once('connect', () => resolve(new RawQmp(socket))).once('error', reject);
      }),
      'raw QMP connect',
    );
  }

  /** Connect, read the greeting, negotiate (optionally with oob). */
  static async negotiated(address: MigrationAddress, oob = false): Promise<RawQmp> {
    const raw = await RawQmp.connect(address);
    assert.ok('QMP' in ((await raw.next()) as object));
    raw.send(oob ? '{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}' : '{"execute":"qmp_capabilities"}');
    assert.deepEqual(await raw.next(), { return: {} });
    return raw;
  }

  #push(line: string): void {
    const w = this.#waiters.shift();
    if (w !== undefined) w(line);
    else this.#lines.push(line);
  }

  send(text: string): void {
    this.socket.write(text);
  }

  /** The next line (without CRLF); undefined once the server closed the connection. */
  nextLine(ms: number = WAIT_MS): Promise<string | undefined> {
    const line = this.#lines.shift();
    if (line !== undefined) return Promise.resolve(line);
    if (this.#ended) return Promise.resolve(undefined);
    return within(new Promise((resolve) => this.#waiters.push(resolve)), 'a QMP line', ms);
  }

  async next(ms: number = WAIT_MS): Promise<unknown> {
    const line = await this.nextLine(ms);
    if (line === undefined) throw new Error('connection closed while waiting for a line');
    return JSON.parse(line);
  }

  /** Assert nothing arrives for `ms`. */
  async quiet(ms: number): Promise<void> {
    await delay(ms);
    assert.deepEqual(this.#lines, [], 'no unexpected output');
  }

  async close(): Promise<void> {
    this.socket.destroy();
    await within(this.closed, 'raw socket close');
  }
}
