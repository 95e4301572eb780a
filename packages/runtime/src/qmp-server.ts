// QMP server speaking QEMU's wire protocol (wire-format.md §11.1), so the same management tools
// and tests drive our processes and a real QEMU 7.2 alike.
//
//   connect ─► greeting {"QMP": …} ─► negotiation mode: only qmp_capabilities
//           ─► command mode: {"execute"|"exec-oob": NAME, "arguments"?: {…}, "id"?: ANY}
//                            ◄─ {"return": VALUE, "id"} | {"error": {"class", "desc"}, "id"}
//                            ◄─ {"event": NAME, "data"?: {…}, "timestamp": {"seconds", "microseconds"}}
//
// Each client's commands run one at a time in arrival order (a p-queue of concurrency 1), as
// QEMU's monitor does; `exec-oob` commands skip that queue. Parse errors and malformed requests
// go through the queue too, so every reply comes back in request order.

import { readFileSync } from 'node:fs';
import net from 'node:net';
import type { Duplex } from 'node:stream';
import PQueue from 'p-queue';
import type { Logger } from 'pino';
import { formatAddress, type MigrationAddress } from './address.ts';
import { RuntimeError, RuntimeErrorCode } from './errors.ts';
import { CLOSE_GRACE_MS, DEFAULT_MAX_MESSAGE_BYTES, encodeQmpLine, endGracefully, JsonStreamSplitter } from './json-stream.ts';
import { listenServer } from './listen.ts';
import {
  builtinExpected,
  builtinMatches,
  checkQmpValue,
  memberName,
  QMP_ENUM_VALUES,
  type QmpMembers,
  type QmpType,
  qmpEnum,
  qmpSchema,
} from './qmp-schema.ts';

export interface QmpVersion {
  major: number;
  minor: number;
  micro: number;
}

export interface QmpServerOptions {
  /** Goes into the greeting and query-version as `"package": "livemig <packageVersion>"`. */
  packageVersion?: string;
  /** The QEMU version we claim to be compatible with. Default 7.2.0. */
  qemuVersion?: QmpVersion;
  /** Largest accepted input message; a larger one gets an error and the client is closed. Default 1 MiB. */
  maxMessageBytes?: number;
  /** A client that lets this much output pile up unread is disconnected. Default 16 MiB. */
  maxOutputBytes?: number;
  /** Where to log client and handler trouble (debug/warn). */
  logger?: Logger;
  /** What query-name answers (QEMU's -name); none: `{}`. */
  name?: string;
}

export interface QmpCommandContext {
  /** Sequence number of the client connection, from 1. */
  readonly clientId: number;
  /** True for a command sent as `exec-oob`. */
  readonly oob: boolean;
  /** The request's `id`, undefined when it had none. */
  readonly id: unknown;
}

/** Returns the `return` value (undefined → `{}`); throws to reply with an error. */
export type QmpHandler = (args: Record<string, unknown>, context: QmpCommandContext) => unknown;

export interface QmpRegisterOptions {
  /** May be run with `exec-oob` (QEMU: migrate-pause, migrate-recover). */
  allowOob?: boolean;
  /**
   * The arguments, QAPI-style (`{ uri: 'str', '*resume': 'bool' }`). Given, the server refuses
   * unknown and missing arguments and wrong builtin types with QEMU's messages before the handler
   * runs, and query-qmp-schema shows them. Left out, the command takes anything (undescribed).
   */
  args?: QmpMembers;
  /**
   * `args` are the base of a QAPI union (object-add: `qom-type`, `id`): members beyond them
   * depend on the variant and pass to the handler, which checks them.
   */
  variantMembers?: boolean;
  /** What it returns, for query-qmp-schema. Default 'any'. */
  returns?: QmpType;
}

interface Command {
  readonly handler: QmpHandler;
  readonly allowOob: boolean;
  readonly args: QmpMembers | undefined;
  readonly variantMembers: boolean;
  readonly returns: QmpType;
}

const NAME_INFO: QmpType = [{ name: 'str' }];

interface QmpErrorBody {
  class: string;
  desc: string;
}

const DEFAULT_QEMU_VERSION: QmpVersion = { major: 7, minor: 2, micro: 0 };
const DEFAULT_MAX_OUTPUT_BYTES = 16 * 1024 * 1024;
// QEMU stops reading a monitor with this many requests queued (QMP_REQ_QUEUE_LEN_MAX).
const MAX_QUEUED_REQUESTS = 8;
const REQUEST_KEYS = new Set(['execute', 'exec-oob', 'arguments', 'id']);

let runtimeVersion: string | undefined;
function defaultPackageVersion(): string {
  if (runtimeVersion === undefined) {
    try {
      // src/ and dist/ both sit one level below the package root.
      const pkg = JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')) as { version?: unknown };
      runtimeVersion = typeof pkg.version === 'string' ? pkg.version : '0.0.0';
    } catch {
      runtimeVersion = '0.0.0';
    }
  }
  return runtimeVersion;
}

class Session {
  readonly id: number;
  readonly socket: Duplex;
  readonly queue = new PQueue({ concurrency: 1 });
  negotiated = false;
  oob = false;
  closed = false;
  paused = false;
  splitter: JsonStreamSplitter | undefined;

  constructor(id: number, socket: Duplex) {
    this.id = id;
    this.socket = socket;
  }
}

/** A QMP server for any number of clients; see {@link QmpServer.listen}. */
export class QmpServer {
  readonly #commands = new Map<string, Command>();
  /** Declared events and their data (see declareEvent). */
  readonly #events = new Map<string, QmpMembers>();
  readonly #undeclaredSeen = new Set<string>();
  readonly #name: string | undefined;
  readonly #sessions = new Set<Session>();
  readonly #greeting: string;
  readonly #version: { qemu: QmpVersion; package: string };
  readonly #maxMessageBytes: number;
  readonly #maxOutputBytes: number;
  readonly #log: Logger | undefined;
  #server: net.Server | undefined;
  #address: MigrationAddress | undefined;
  #nextClientId = 1;
  #closing: Promise<void> | undefined;

  constructor(options: QmpServerOptions = {}) {
    const qemu = options.qemuVersion ?? DEFAULT_QEMU_VERSION;
    this.#version = {
      qemu: { micro: qemu.micro, minor: qemu.minor, major: qemu.major },
      package: `livemig ${options.packageVersion ?? defaultPackageVersion()}`,
    };
    this.#greeting = encodeQmpLine({ QMP: { version: this.#version, capabilities: ['oob'] } });
    this.#maxMessageBytes = options.maxMessageBytes ?? DEFAULT_MAX_MESSAGE_BYTES;
    this.#maxOutputBytes = options.maxOutputBytes ?? DEFAULT_MAX_OUTPUT_BYTES;
    this.#log = options.logger;
    this.#name = options.name;
    // qmp_capabilities is answered inside dispatch (it changes the session); listed here so
    // query-commands shows it and register() refuses the name.
    this.register('qmp_capabilities', () => ({}), { args: { '*enable': [qmpEnum(['oob'])] }, returns: {} });
    // QEMU's introspection commands, with QEMU 7.2's return shapes.
    this.register('query-commands', () => [...this.#commands.keys()].map((name) => ({ name })), { args: {}, returns: NAME_INFO });
    this.register('query-events', () => [...this.#events.keys()].map((name) => ({ name })), { args: {}, returns: NAME_INFO });
    this.register('query-version', () => this.#version, {
      args: {},
      returns: { qemu: { major: 'int', minor: 'int', micro: 'int' }, package: 'str' },
    });
    this.register('query-name', () => (this.#name === undefined ? {} : { name: this.#name }), { args: {}, returns: { '*name': 'str' } });
    this.register('query-qmp-schema', () => this.schema(), { args: {}, returns: ['any'] });
  }

  /** query-qmp-schema's answer: every command and declared event, from their descriptions. */
  schema(): Record<string, unknown>[] {
    return qmpSchema(
      [...this.#commands].map(([name, c]) => ({ name, args: c.args, returns: c.returns, allowOob: c.allowOob })),
      [...this.#events].map(([name, data]) => ({ name, data })),
    );
  }

  /**
   * Declare an event and its data (QAPI-style members), for query-events and query-qmp-schema.
   * Declaring one twice with the same name replaces its description.
   */
  declareEvent(name: string, data: QmpMembers = {}): void {
    if (typeof name !== 'string' || name === '') {
      throw new RuntimeError(RuntimeErrorCode.INVALID_ARGUMENT, 'QMP event name must be a non-empty string');
    }
    this.#events.set(name, data);
  }

  /** Create a server and listen on `unix:PATH` or `tcp:HOST:PORT` (port 0 picks a free port). */
  static async listen(address: string | MigrationAddress, options: QmpServerOptions = {}): Promise<QmpServer> {
    const qmp = new QmpServer(options);
    const server = net.createServer((socket) => qmp.handleConnection(socket));
    qmp.#address = await listenServer(server, address);
    qmp.#server = server;
    return qmp;
  }

  /** The bound address (after listen()). */
  get address(): MigrationAddress {
    if (this.#address === undefined) throw new RuntimeError(RuntimeErrorCode.INVALID_ARGUMENT, 'QMP server is not listening');
    return this.#address;
  }

  /** The bound address as text, e.g. `tcp:127.0.0.1:40123` or `unix:/run/x.qmp`. */
  get addressText(): string {
    return formatAddress(this.address);
  }

  /** Connected clients, negotiated or not. */
  get clientCount(): number {
    return this.#sessions.size;
  }

  /** Add a command. Throws LM_ERR_INVALID_ARGUMENT for a name already registered (built-ins included). */
  register(name: string, handler: QmpHandler, options: QmpRegisterOptions = {}): void {
    if (typeof name !== 'string' || name === '') {
      throw new RuntimeError(RuntimeErrorCode.INVALID_ARGUMENT, 'QMP command name must be a non-empty string');
    }
    if (this.#commands.has(name)) {
      throw new RuntimeError(RuntimeErrorCode.INVALID_ARGUMENT, `QMP command ${JSON.stringify(name)} is already registered`);
    }
    this.#commands.set(name, { handler, allowOob: options.allowOob ?? false, args: options.args, variantMembers: options.variantMembers ?? false, returns: options.returns ?? 'any' });
  }

  /** Send an event to every client that finished negotiation. */
  emitEvent(name: string, data?: Record<string, unknown>): void {
    if (this.#events.size > 0 && !this.#events.has(name) && !this.#undeclaredSeen.has(name)) {
      // Introspection would not show it: a bug of the process, said once per name.
      this.#undeclaredSeen.add(name);
      this.#log?.warn({ event: name }, 'QMP event emitted without declareEvent(): query-events does not list it');
    }
    const t = performance.timeOrigin + performance.now(); // ms since the epoch, sub-ms precision
    const seconds = Math.floor(t / 1000);
    const microseconds = Math.min(999_999, Math.floor((t - seconds * 1000) * 1000));
    const event: Record<string, unknown> = { event: name };
    if (data !== undefined) event['data'] = data;
    event['timestamp'] = { seconds, microseconds };
    const line = encodeQmpLine(event);
    for (const session of this.#sessions) {
      if (session.negotiated) this.#write(session, line);
    }
  }

  /**
   * Serve one already-connected stream (a socket accepted elsewhere, stdio, an in-memory pair).
   * listen() routes its connections here.
   */
  handleConnection(socket: Duplex): void {
    if (this.#closing !== undefined) {
      socket.destroy();
      return;
    }
    const session = new Session(this.#nextClientId++, socket);
    this.#sessions.add(session);
    session.splitter = new JsonStreamSplitter(
      {
        value: (value) => this.#receive(session, value),
        parseError: (desc) => this.#enqueue(session, () => this.#write(session, encodeQmpLine({ error: { class: 'GenericError', desc } }))),
        fatal: (desc) => this.#fatal(session, desc),
      },
      this.#maxMessageBytes,
    );
    socket.on('data', (chunk: Buffer) => session.splitter?.push(chunk));
    socket.on('error', (err) => this.#log?.debug({ err, client: session.id }, 'QMP client connection error'));
    socket.on('close', () => this.#drop(session));
    // QMP clients close by just closing; answer their FIN with ours.
    socket.on('end', () => socket.end());
    this.#write(session, this.#greeting);
  }

  /** Stop listening and close every client (graceful end, destroyed after a short grace period). */
  close(): Promise<void> {
    this.#closing ??= this.#close();
    return this.#closing;
  }

  async #close(): Promise<void> {
    const server = this.#server;
    const listenerClosed =
      server === undefined || !server.listening
        ? Promise.resolve()
        : new Promise<void>((resolve) => server.close(() => resolve()));
    const clients = [...this.#sessions].map((session) => {
      session.splitter?.stop();
      session.queue.clear();
      return endGracefully(session.socket);
    });
    await Promise.all([listenerClosed, ...clients]);
  }

  #drop(session: Session): void {
    session.closed = true;
    session.splitter?.stop();
    session.queue.clear();
    this.#sessions.delete(session);
  }

  #fatal(session: Session, desc: string): void {
    this.#log?.warn({ client: session.id, desc }, 'QMP client sent an unusable message; closing it');
    // Not queued: the stream cannot be trusted past this point, so nothing queued after it runs.
    session.queue.clear();
    this.#write(session, encodeQmpLine({ error: { class: 'GenericError', desc } }));
    session.closed = true;
    session.socket.end();
    setTimeout(() => session.socket.destroy(), CLOSE_GRACE_MS).unref();
  }

  #write(session: Session, line: string): void {
    if (session.closed || session.socket.destroyed) return;
    session.socket.write(line);
    if (session.socket.writableLength > this.#maxOutputBytes) {
      this.#log?.warn({ client: session.id, bytes: session.socket.writableLength }, 'QMP client is not reading its output; disconnecting it');
      session.closed = true;
      session.socket.destroy();
    }
  }

  #enqueue(session: Session, task: () => unknown): void {
    session.queue
      .add(async () => {
        if (!session.closed) await task();
      })
      .catch((err: unknown) => this.#log?.warn({ err, client: session.id }, 'QMP request task failed'))
      .finally(() => {
        if (session.paused && session.queue.size < MAX_QUEUED_REQUESTS) {
          session.paused = false;
          session.socket.resume();
        }
      });
    // Backpressure as in QEMU: stop reading a client that has too many requests waiting.
    if (!session.paused && session.queue.size >= MAX_QUEUED_REQUESTS) {
      session.paused = true;
      session.socket.pause();
    }
  }

  #receive(session: Session, value: unknown): void {
    // OOB requests run at once; everything else, malformed requests included, waits its turn.
    if (
      session.oob &&
      value !== null &&
      typeof value === 'object' &&
      !Array.isArray(value) &&
      Object.hasOwn(value, 'exec-oob')
    ) {
      this.#dispatch(session, value).catch((err: unknown) =>
        this.#log?.warn({ err, client: session.id }, 'QMP out-of-band request failed'),
      );
      return;
    }
    this.#enqueue(session, () => this.#dispatch(session, value));
  }

  async #dispatch(session: Session, value: unknown): Promise<void> {
    if (value === null || typeof value !== 'object' || Array.isArray(value)) {
      this.#reply(session, undefined, false, { class: 'GenericError', desc: 'QMP input must be a JSON object' });
      return;
    }
    const request = value as Record<string, unknown>;
    const hasId = Object.hasOwn(request, 'id');
    const id = request['id'];
    const invalid = this.#validate(session, request);
    if (invalid !== undefined) {
      this.#reply(session, id, hasId, { class: 'GenericError', desc: invalid });
      return;
    }
    const oob = Object.hasOwn(request, 'exec-oob');
    const name = (oob ? request['exec-oob'] : request['execute']) as string;
    const args = (request['arguments'] ?? {}) as Record<string, unknown>;

    if (!session.negotiated) {
      if (name !== 'qmp_capabilities') {
        this.#reply(session, id, hasId, {
          class: 'CommandNotFound',
          desc: "Expecting capabilities negotiation with 'qmp_capabilities'",
        });
        return;
      }
      const failure = this.#negotiate(session, args);
      this.#reply(session, id, hasId, failure);
      return;
    }
    if (name === 'qmp_capabilities') {
      this.#reply(session, id, hasId, {
        class: 'CommandNotFound',
        desc: 'Capabilities negotiation is already complete, command ignored',
      });
      return;
    }
    const command = this.#commands.get(name);
    if (command === undefined) {
      this.#reply(session, id, hasId, { class: 'CommandNotFound', desc: `The command ${name} has not been found` });
      return;
    }
    if (oob && !command.allowOob) {
      this.#reply(session, id, hasId, { class: 'GenericError', desc: `The command ${name} does not support OOB` });
      return;
    }
    const badArgs = command.args === undefined ? undefined : checkArguments(command.args, args, command.variantMembers);
    if (badArgs !== undefined) {
      this.#reply(session, id, hasId, { class: 'GenericError', desc: badArgs });
      return;
    }
    let result: unknown;
    try {
      result = await command.handler(args, { clientId: session.id, oob, id });
    } catch (err) {
      this.#log?.debug({ err, client: session.id, command: name }, 'QMP command failed');
      this.#reply(session, id, hasId, toErrorBody(err));
      return;
    }
    this.#reply(session, id, hasId, undefined, result);
  }

  // QEMU's qmp_dispatch_check_obj(), with its messages.
  #validate(session: Session, request: Record<string, unknown>): string | undefined {
    let execKey: string | undefined;
    for (const key of Object.keys(request)) {
      if (key === 'execute' || (key === 'exec-oob' && session.oob)) {
        if (typeof request[key] !== 'string') return `QMP input member '${key}' must be a string`;
        if (execKey !== undefined) return `QMP input member '${key}' clashes with '${execKey}'`;
        execKey = key;
      } else if (key === 'arguments') {
        const a = request[key];
        if (a === null || typeof a !== 'object' || Array.isArray(a)) return "QMP input member 'arguments' must be an object";
      } else if (!REQUEST_KEYS.has(key) || key === 'exec-oob') {
        return `QMP input member '${key}' is unexpected`;
      }
    }
    if (execKey === undefined) return "QMP input lacks member 'execute'";
    return undefined;
  }

  #negotiate(session: Session, args: Record<string, unknown>): QmpErrorBody | undefined {
    for (const key of Object.keys(args)) {
      if (key !== 'enable') return { class: 'GenericError', desc: `Parameter '${key}' is unexpected` };
    }
    const enable = args['enable'];
    let oob = false;
    if (enable !== undefined) {
      if (!Array.isArray(enable)) return { class: 'GenericError', desc: "Invalid parameter type for 'enable', expected: array" };
      for (const cap of enable) {
        if (cap !== 'oob') return { class: 'GenericError', desc: `Parameter 'enable' does not accept value '${String(cap)}'` };
        oob = true;
      }
    }
    session.negotiated = true;
    session.oob = oob;
    return undefined;
  }

  #reply(session: Session, id: unknown, hasId: boolean, error: QmpErrorBody | undefined, result?: unknown): void {
    const message: Record<string, unknown> = error === undefined ? { return: result === undefined ? {} : result } : { error };
    if (hasId) message['id'] = id;
    let line: string;
    try {
      line = encodeQmpLine(message);
    } catch (err) {
      // A handler returned something JSON cannot carry (a BigInt, a cycle).
      const fallback: Record<string, unknown> = {
        error: { class: 'GenericError', desc: `cannot encode the reply: ${(err as Error).message}` },
      };
      if (hasId) fallback['id'] = id;
      line = encodeQmpLine(fallback);
    }
    this.#write(session, line);
  }
}

// QEMU's input visitor checks, with its messages: unknown, missing, and wrong builtin types.
function checkArguments(members: QmpMembers, args: Record<string, unknown>, variantMembers: boolean): string | undefined {
  const known = new Map<string, { type: QmpType; optional: boolean }>();
  for (const [key, type] of Object.entries(members)) {
    const { name, optional } = memberName(key);
    known.set(name, { type, optional });
  }
  for (const [name, member] of known) {
    if (!Object.hasOwn(args, name)) {
      if (!member.optional) return `Parameter '${name}' is missing`;
      continue;
    }
    if (!builtinMatches(member.type, args[name])) return `Invalid parameter type for '${name}', expected: ${builtinExpected(member.type)}`;
    // An enum member is checked here too (QEMU's "does not accept value"); other composites by their handlers.
    if (typeof member.type === 'object' && Object.hasOwn(member.type, QMP_ENUM_VALUES)) {
      const bad = checkQmpValue(member.type, args[name], name);
      if (bad !== undefined) return bad;
    }
  }
  if (variantMembers) return undefined;
  for (const name of Object.keys(args)) {
    if (!known.has(name)) return `Parameter '${name}' is unexpected`;
  }
  return undefined;
}

// Handler failure → QMP error: an error's own `qmpClass` (and `desc`) win, else GenericError + message.
function toErrorBody(err: unknown): QmpErrorBody {
  if (err !== null && typeof err === 'object') {
    const e = err as { qmpClass?: unknown; desc?: unknown; message?: unknown };
    const message = typeof e.message === 'string' ? e.message : String(err);
    if (typeof e.qmpClass === 'string' && e.qmpClass !== '') {
      return { class: e.qmpClass, desc: typeof e.desc === 'string' ? e.desc : message };
    }
    return { class: 'GenericError', desc: message };
  }
  return { class: 'GenericError', desc: String(err) };
}
