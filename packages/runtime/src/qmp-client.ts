// QMP client for tests and tools (wire-format.md §11.1). Works against our QmpServer and a real
// QEMU alike. Every wait is bounded; requests carry increasing numeric ids and replies are
// matched by id, so out-of-band replies that overtake others land where they belong.
//
// Events are kept from the moment the connection is up, so a test can start a migration and
// only then wait for MIGRATION {"status": "completed"} without racing it:
//
//   arrival ─► a pending waitForEvent() whose name/predicate match ─► else a waiting events()
//           ─► else the buffer (oldest dropped beyond maxBufferedEvents, counted in droppedEvents)

import type { Duplex } from 'node:stream';
import { formatAddress, toAddress, type MigrationAddress } from './address.ts';
import { connectChannel } from './channel.ts';
import { QmpError, RuntimeErrorCode } from './errors.ts';
import { DEFAULT_MAX_MESSAGE_BYTES, endGracefully, JsonStreamSplitter } from './json-stream.ts';

export interface QmpClientOptions {
  /** Default bound for connect, execute and event waits (ms). Default 30 000. */
  timeoutMs?: number;
  /** Capabilities to enable. Default: `['oob']` when the server offers it, else none. */
  capabilities?: readonly string[];
  /** Events kept while nobody waits for them; the oldest go first. Default 1024. */
  maxBufferedEvents?: number;
  /** Largest server message accepted. Default 1 MiB. */
  maxMessageBytes?: number;
}

export interface QmpExecuteOptions {
  /** Bound on this reply (ms). Default: the client's timeoutMs. */
  timeoutMs?: number;
  /** Send as `exec-oob` (the client must have enabled `oob`). */
  oob?: boolean;
}

export interface QmpGreeting {
  QMP: {
    version: { qemu: { major: number; minor: number; micro: number }; package: string };
    capabilities: string[];
  };
}

export interface QmpEvent {
  event: string;
  data?: Record<string, unknown>;
  timestamp: { seconds: number; microseconds: number };
}

interface Pending {
  readonly name: string;
  readonly resolve: (value: unknown) => void;
  readonly reject: (err: Error) => void;
  readonly timer: NodeJS.Timeout;
}

interface EventWaiter {
  readonly name: string;
  readonly predicate: ((event: QmpEvent) => boolean) | undefined;
  readonly resolve: (event: QmpEvent) => void;
  readonly reject: (err: Error) => void;
  readonly timer: NodeJS.Timeout;
}

interface IteratorWaiter {
  readonly resolve: (result: IteratorResult<QmpEvent>) => void;
  readonly reject: (err: Error) => void;
  readonly timer: NodeJS.Timeout | undefined;
}

const DEFAULT_TIMEOUT_MS = 30_000;
const DEFAULT_MAX_BUFFERED_EVENTS = 1024;

export class QmpClient {
  readonly greeting: QmpGreeting;
  readonly #stream: Duplex;
  readonly #timeoutMs: number;
  readonly #maxBufferedEvents: number;
  readonly #pending = new Map<number, Pending>();
  readonly #events: QmpEvent[] = [];
  #eventWaiters: EventWaiter[] = [];
  #iteratorWaiters: IteratorWaiter[] = [];
  #nextId = 1;
  #dropped = 0;
  #closedError: QmpError | undefined;
  #closePromise: Promise<void> | undefined;

  private constructor(stream: Duplex, greeting: QmpGreeting, timeoutMs: number, maxBufferedEvents: number) {
    this.#stream = stream;
    this.greeting = greeting;
    this.#timeoutMs = timeoutMs;
    this.#maxBufferedEvents = maxBufferedEvents;
  }

  /** Connect to `unix:PATH` / `tcp:HOST:PORT` (any channel address works), read the greeting, negotiate. */
  static async connect(address: string | MigrationAddress, options: QmpClientOptions = {}): Promise<QmpClient> {
    const timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    const addr = toAddress(address);
    const stream = await connectChannel(addr, { connectTimeoutMs: timeoutMs });
    try {
      return await QmpClient.over(stream, options, formatAddress(addr));
    } catch (err) {
      stream.destroy();
      throw err;
    }
  }

  /** Run the QMP handshake over an already-open stream (stdio, an in-memory pair, …). */
  static async over(stream: Duplex, options: QmpClientOptions = {}, label = 'QMP stream'): Promise<QmpClient> {
    const timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    let client: QmpClient | undefined;
    let greetingWaiter: { resolve: (g: QmpGreeting) => void; reject: (e: Error) => void } | undefined;
    let greeted = false;
    const early: unknown[] = [];

    const fail = (err: QmpError): void => {
      if (client !== undefined) client.#shutDown(err);
      else greetingWaiter?.reject(err);
    };
    const splitter = new JsonStreamSplitter(
      {
        value: (value) => {
          if (client !== undefined) client.#receive(value);
          else if (greeted) early.push(value); // same chunk as the greeting; replayed below
          else if (isObject(value) && isObject(value['QMP'])) {
            greeted = true;
            greetingWaiter?.resolve(value as unknown as QmpGreeting);
          } else {
            greetingWaiter?.reject(
              new QmpError(RuntimeErrorCode.QMP_PROTOCOL, `${label}: expected a QMP greeting, got ${JSON.stringify(value).slice(0, 200)}`),
            );
          }
        },
        parseError: (desc) => fail(new QmpError(RuntimeErrorCode.QMP_PROTOCOL, `${label}: server sent invalid JSON (${desc})`)),
        fatal: (desc) => {
          fail(new QmpError(RuntimeErrorCode.QMP_PROTOCOL, `${label}: ${desc}`));
          stream.destroy();
        },
      },
      options.maxMessageBytes ?? DEFAULT_MAX_MESSAGE_BYTES,
    );
    stream.on('data', (chunk: Buffer) => splitter.push(chunk));
    const onGone = (err?: Error): void => {
      splitter.stop();
      fail(
        new QmpError(
          RuntimeErrorCode.QMP_CLOSED,
          `${label}: connection closed${err !== undefined ? ` (${err.message})` : ''}`,
          err === undefined ? undefined : { cause: err },
        ),
      );
    };
    stream.on('error', (err) => onGone(err));
    stream.on('close', () => onGone());
    // Our side stays open only as long as the server's does.
    stream.on('end', () => stream.end());

    const greeting = await new Promise<QmpGreeting>((resolve, reject) => {
      const timer = setTimeout(
        () => reject(new QmpError(RuntimeErrorCode.QMP_TIMEOUT, `${label}: no QMP greeting within ${timeoutMs} ms`)),
        timeoutMs,
      );
      greetingWaiter = {
        resolve: (g) => {
          clearTimeout(timer);
          resolve(g);
        },
        reject: (e) => {
          clearTimeout(timer);
          reject(e);
        },
      };
    });
    client = new QmpClient(stream, greeting, timeoutMs, options.maxBufferedEvents ?? DEFAULT_MAX_BUFFERED_EVENTS);
    for (const value of early.splice(0)) client.#receive(value);
    const offered = Array.isArray(greeting.QMP.capabilities) ? greeting.QMP.capabilities : [];
    const enable = options.capabilities ?? (offered.includes('oob') ? ['oob'] : []);
    try {
      await client.execute('qmp_capabilities', enable.length > 0 ? { enable: [...enable] } : undefined);
    } catch (err) {
      client.#shutDown(err instanceof QmpError ? err : new QmpError(RuntimeErrorCode.QMP_PROTOCOL, String(err)));
      throw err;
    }
    return client;
  }

  /** Events that were dropped because the buffer was full. */
  get droppedEvents(): number {
    return this.#dropped;
  }

  /** True once the connection is gone (closed by either side). */
  get closed(): boolean {
    return this.#closedError !== undefined;
  }

  /**
   * Run a command; resolves with its `return` value. Rejects with QmpError: LM_ERR_QMP_ERROR_REPLY
   * (with `qmpClass` and `desc`) on an error reply, LM_ERR_QMP_TIMEOUT, or LM_ERR_QMP_CLOSED.
   */
  execute<T = unknown>(name: string, args?: Record<string, unknown>, options: QmpExecuteOptions = {}): Promise<T> {
    if (this.#closedError !== undefined) return Promise.reject(this.#closedError);
    const id = this.#nextId++;
    const request: Record<string, unknown> = { [options.oob === true ? 'exec-oob' : 'execute']: name };
    if (args !== undefined) request['arguments'] = args;
    request['id'] = id;
    const timeoutMs = options.timeoutMs ?? this.#timeoutMs;
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#pending.delete(id);
        reject(new QmpError(RuntimeErrorCode.QMP_TIMEOUT, `QMP command ${name} got no reply within ${timeoutMs} ms`));
      }, timeoutMs);
      this.#pending.set(id, { name, resolve: resolve as (value: unknown) => void, reject, timer });
      this.#stream.write(`${JSON.stringify(request)}\r\n`);
    });
  }

  /**
   * The next event called `name` (and matching `predicate`), taken from the buffer when it has
   * already arrived. Rejects with LM_ERR_QMP_TIMEOUT or LM_ERR_QMP_CLOSED.
   */
  waitForEvent(name: string, predicate?: (event: QmpEvent) => boolean, timeoutMs: number = this.#timeoutMs): Promise<QmpEvent> {
    const index = this.#events.findIndex((e) => e.event === name && (predicate === undefined || predicate(e)));
    if (index >= 0) {
      const [event] = this.#events.splice(index, 1);
      return Promise.resolve(event as QmpEvent);
    }
    if (this.#closedError !== undefined) return Promise.reject(this.#closedError);
    return new Promise((resolve, reject) => {
      const waiter: EventWaiter = {
        name,
        predicate,
        resolve,
        reject,
        timer: setTimeout(() => {
          this.#eventWaiters = this.#eventWaiters.filter((w) => w !== waiter);
          reject(new QmpError(RuntimeErrorCode.QMP_TIMEOUT, `no QMP event ${name} within ${timeoutMs} ms`));
        }, timeoutMs),
      };
      this.#eventWaiters.push(waiter);
    });
  }

  /**
   * Every event, buffered ones first, until the connection closes. Each wait for the next event
   * is bounded by `idleTimeoutMs` (default: the client's timeoutMs; `Infinity` for none).
   */
  events(options: { idleTimeoutMs?: number } = {}): AsyncIterableIterator<QmpEvent> {
    const idleTimeoutMs = options.idleTimeoutMs ?? this.#timeoutMs;
    const next = (): Promise<IteratorResult<QmpEvent>> => {
      const event = this.#events.shift();
      if (event !== undefined) return Promise.resolve({ value: event, done: false });
      if (this.#closedError !== undefined) return Promise.resolve({ value: undefined, done: true });
      return new Promise((resolve, reject) => {
        const waiter: IteratorWaiter = {
          resolve,
          reject,
          timer: Number.isFinite(idleTimeoutMs)
            ? setTimeout(() => {
                this.#iteratorWaiters = this.#iteratorWaiters.filter((w) => w !== waiter);
                reject(new QmpError(RuntimeErrorCode.QMP_TIMEOUT, `no QMP event within ${idleTimeoutMs} ms`));
              }, idleTimeoutMs)
            : undefined,
        };
        this.#iteratorWaiters.push(waiter);
      });
    };
    const iterator: AsyncIterableIterator<QmpEvent> = {
      next,
      return: () => Promise.resolve({ value: undefined, done: true }),
      [Symbol.asyncIterator]: () => iterator,
    };
    return iterator;
  }

  /** Close the connection; pending commands and waits reject with LM_ERR_QMP_CLOSED. */
  close(): Promise<void> {
    if (this.#closePromise === undefined) {
      this.#shutDown(new QmpError(RuntimeErrorCode.QMP_CLOSED, 'QMP client closed'));
      this.#closePromise = endGracefully(this.#stream);
    }
    return this.#closePromise;
  }

  #receive(value: unknown): void {
    if (!isObject(value)) return;
    if (typeof value['event'] === 'string') {
      this.#deliver(value as unknown as QmpEvent);
      return;
    }
    if (!Object.hasOwn(value, 'return') && !Object.hasOwn(value, 'error')) return; // unknown keys are ignored (§11.1)
    const id = value['id'];
    // Replies without our id (an id-less parse error) cannot be matched; we never send bad JSON.
    if (typeof id !== 'number') return;
    const pending = this.#pending.get(id);
    if (pending === undefined) return; // timed out already
    this.#pending.delete(id);
    clearTimeout(pending.timer);
    if (Object.hasOwn(value, 'error')) {
      const body = isObject(value['error']) ? value['error'] : {};
      const qmpClass = typeof body['class'] === 'string' ? body['class'] : 'GenericError';
      const desc = typeof body['desc'] === 'string' ? body['desc'] : '';
      pending.reject(
        new QmpError(RuntimeErrorCode.QMP_ERROR_REPLY, `QMP command ${pending.name} failed: ${qmpClass}: ${desc}`, {
          qmpClass,
          desc,
        }),
      );
    } else {
      pending.resolve(value['return']);
    }
  }

  #deliver(event: QmpEvent): void {
    for (const waiter of this.#eventWaiters) {
      if (waiter.name !== event.event) continue;
      let matches: boolean;
      try {
        matches = waiter.predicate === undefined || waiter.predicate(event);
      } catch (err) {
        this.#eventWaiters = this.#eventWaiters.filter((w) => w !== waiter);
        clearTimeout(waiter.timer);
        waiter.reject(err as Error);
        continue;
      }
      if (matches) {
        this.#eventWaiters = this.#eventWaiters.filter((w) => w !== waiter);
        clearTimeout(waiter.timer);
        waiter.resolve(event);
        return;
      }
    }
    const reader = this.#iteratorWaiters.shift();
    if (reader !== undefined) {
      clearTimeout(reader.timer);
      reader.resolve({ value: event, done: false });
      return;
    }
    this.#events.push(event);
    if (this.#events.length > this.#maxBufferedEvents) {
      this.#events.shift();
      this.#dropped++;
    }
  }

  #shutDown(err: QmpError): void {
    if (this.#closedError !== undefined) return;
    this.#closedError = err;
    for (const pending of this.#pending.values()) {
      clearTimeout(pending.timer);
      pending.reject(err);
    }
    this.#pending.clear();
    for (const waiter of this.#eventWaiters) {
      clearTimeout(waiter.timer);
      waiter.reject(err);
    }
    this.#eventWaiters = [];
    for (const reader of this.#iteratorWaiters) {
      clearTimeout(reader.timer);
      reader.resolve({ value: undefined, done: true });
    }
    this.#iteratorWaiters = [];
  }
}

function isObject(value: unknown): value is Record<string, unknown> {
  return value !== null && typeof value === 'object' && !Array.isArray(value);
}
