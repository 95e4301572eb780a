// The incoming migration's connections: the listener(s), the main channel (which carries the
// return path), the connections that follow it to the same address (a preempt channel, or the
// multifd channels, each read by a thread of its own once its init packet is judged, see
// multifd-thread.ts), and the multifd SYNC count the main channel waits on. What the
// connections mean to the migration is the state machine's business: this file reports what
// happened and does what it is told.

import net from 'node:net';
import type tls from 'node:tls';
import {
  checkRecoveryStart,
  checkStreamHeader,
  ConfigError,
  ErrorCode,
  type MigrationError,
  MultifdReceiver,
  ProtocolError,
  RECOVERY_START_LENGTH,
  STREAM_HEADER_LENGTH,
  TransportError,
} from '@livemig/protocol';
import type { Guest } from '@livemig/guest';
import { channelSyncs, handOverToThread, type MultifdChannel, type MultifdThreadEvents } from './multifd-thread.ts';
import {
  adoptWithOnread,
  type ChannelListener,
  formatAddress,
  listenServer,
  looksLikeTlsHello,
  peerDistinguishedName,
  pumpOnread,
  RuntimeErrorCode,
  secureServerSide,
  TlsError,
  type TlsServerOptions,
} from '@livemig/runtime';

/** Default of x-livemig-handshake-timeout: a source sends its stream header at once. */
export const DEFAULT_HANDSHAKE_TIMEOUT_MS = 5_000;
/** Connections waiting to show a stream header at once; more are refused until some are decided. */
const MAX_CANDIDATES = 64;
/** How long the extra connections of a failed migration stay open after their FIN (see close). */
const FAILED_CHANNEL_LINGER_MS = 1_000;
/** Connections held unread beyond what multifd-channels allows, before more are closed at once. */
const MAX_HELD_CONNECTIONS = 256;

/** Node's static-buffer read mode for the main channel: where the next read goes, and what to do with it. */
export interface MainReader {
  buffer: () => Buffer;
  /** Handle `n` bytes at the start of the buffer; false pauses reading. */
  callback: (n: number) => boolean;
}

export interface ChannelEvents {
  /**
   * The main channel: the first connection to bring a stream header (QEVM, version 3) within the
   * handshake deadline. `prefix`: what was read off it to check that (the header and maybe more),
   * to be decoded before anything the socket reads next.
   */
  mainAccepted(socket: net.Socket, prefix: Buffer): void;
  /** A connection dropped before it became the main channel: silent past the deadline, or not a stream. */
  candidateDropped(reason: MigrationError, peer: string): void;
  /** A connection after the main one, with postcopy-preempt. */
  preemptAccepted(raw: net.Socket, tcp: boolean): void;
  /** A multifd channel delivered a SYNC packet or ended. */
  multifdProgressed(): void;
  /** A multifd channel is broken or sent what it must not. */
  multifdFailed(err: MigrationError): void;
  /** The main listener failed before a connection came. */
  listenerFailed(err: MigrationError): void;
  /** A TLS connection passed the handshake and tls-authz (what was negotiated, who the client is). */
  tlsAccepted?(peer: string, session: { protocol: string | null; cipher: string; client: string | undefined }): void;
}

export interface ChannelsOptions {
  guest: Guest;
  // preempt, multifd, multifdChannels and handshakeTimeoutMs are read when a connection comes,
  // so a destination reconfigured while it listens uses the new values.
  /** Capabilities that add connections after the main one. */
  preempt: boolean;
  multifd: boolean;
  /** Parameter multifd-channels. */
  multifdChannels: number;
  reader: MainReader;
  events: ChannelEvents;
  /** Parameter x-livemig-handshake-timeout (ms): how long a connection may take to send the stream header. */
  handshakeTimeoutMs?: number;
  /**
   * Parameters tls-creds and tls-authz: every connection (main, multifd, preempt, recovery)
   * completes a TLS handshake and passes the authz check before a byte of it is read, within
   * the handshake deadline. Its bytes are then pumped from the TLS socket (pumpOnread): nothing
   * reads its descriptor directly.
   */
  tls?: TlsServerOptions;
}

/** A connection that has not yet shown whether it is a source (before the main channel is chosen). */
interface Candidate {
  raw: net.Socket;
  /** Who connected, for the log: host:port, or a unix socket peer. */
  peer: string;
  chunks: Buffer[];
  bytes: number;
  timer: NodeJS.Timeout | undefined;
  onData: (chunk: Buffer) => void;
  /**
   * Its first bytes are not a stream header. Held (unread) while an earlier connection may still
   * become the main channel, since then it is one of its extras (a multifd channel's first
   * bytes are its init packet, and a livemig source sends its header only once they are all
   * connected); dropped once no earlier one can.
   */
  invalid: MigrationError | undefined;
  /** TLS: settles when the handshake and tls-authz are done (nothing is read before). */
  ready: Promise<unknown> | undefined;
  secured: boolean;
}

export class Channels {
  /** The main channel now (after a recovery, the recovery connection). */
  main: net.Socket | undefined;
  private readonly o: ChannelsOptions;
  private listener: ChannelListener | undefined;
  /** The listener of a migration with extra channels (preempt or multifd). */
  private server: net.Server | undefined;
  private addressText: string | undefined;
  private readonly multifd: MultifdChannel[] = [];
  /** Connections beyond what multifd-channels allows, left unread until the migration ends. */
  private readonly held: net.Socket[] = [];
  private readonly multifdIdsSeen = new Set<number>();
  /** When a multifd channel last brought bytes (ms, performance.now()); 0 before any. */
  lastMultifdByteAtMs = 0;
  /** A connection to the incoming address has brought a byte: the stream may have begun. */
  streamStarted = false;

  constructor(options: ChannelsOptions) {
    this.o = options;
  }

  /** Settings changed before the stream began (see IncomingMigration.reconfigure). */
  reconfigure(settings: Pick<ChannelsOptions, 'preempt' | 'multifd' | 'multifdChannels' | 'handshakeTimeoutMs'>): void {
    Object.assign(this.o, settings);
  }

  get listeningAddress(): string | undefined {
    return this.addressText;
  }

  /**
   * Listen on tcp: or unix:; returns the bound address (port 0 resolved). Whoever connects must
   * send the stream header within the handshake deadline: a silent or foreign client is dropped
   * and the port stays open for the real source (every connection is checked at once, so a
   * crowd of silent ones delays nobody).
   */
  async listen(address: string): Promise<string> {
    this.addressText = await this.listenWithExtras(
      address,
      (socket, prefix) => {
        // Nothing follows a lone main channel: later connections are refused, as before.
        if (!this.o.preempt && !this.o.multifd) this.server?.close();
        this.o.events.mainAccepted(socket, prefix);
      },
      (raw, extra, server, tcp, prefix) => {
        if (this.o.preempt) this.acceptPreempt(raw, extra, server, tcp, prefix);
        else if (this.o.multifd) this.acceptMultifd(raw, extra, prefix);
        else raw.destroy();
      },
      'stream header',
    );
    return this.addressText;
  }

  /** migrate-recover: listen for the source's recovery connection (and, with preempt, a new preempt channel). */
  async listenForRecovery(address: string, onMain: (socket: net.Socket, prefix: Buffer) => void): Promise<string> {
    // A recovery channel carries no stream header, but it starts with RECV_BITMAP: a silent or
    // foreign client is dropped and the port stays open for the resuming source. With TLS the
    // recovery connection is authenticated first, as the first one was.
    return this.listenWithExtras(
      address,
      (socket, prefix) => {
        if (!this.o.preempt) this.server?.close();
        onMain(socket, prefix);
      },
      (raw, extra, server, tcp, prefix) => {
        if (this.o.preempt) this.acceptPreempt(raw, extra, server, tcp, prefix);
        else raw.destroy();
      },
      'recovery',
    );
  }

  /**
   * Listen for a main channel and the extra connections that follow it to the same address.
   * Each connection must send what `gate` names (a stream header, or a recovery channel's first
   * record) within the handshake deadline, and the first that does is the main
   * channel; connections accepted before it are dropped, those accepted after it are its extras
   * (a source connects its main channel first: multifd and preempt connections follow it, and a
   * QEMU 7.2 preempt channel stays silent, so they are never held to the header). `onExtra` gets
   * each extra with its 1-based position and the bytes already read off it.
   */
  private async listenWithExtras(
    address: string,
    onMain: (socket: net.Socket, prefix: Buffer) => void,
    onExtra: (raw: net.Socket, extra: number, server: net.Server, tcp: boolean, prefix: Buffer) => void,
    gate: 'stream header' | 'recovery',
  ): Promise<string> {
    const [check, need] = gate === 'recovery' ? [checkRecoveryStart, RECOVERY_START_LENGTH] : [checkStreamHeader, STREAM_HEADER_LENGTH];
    const expected = gate === 'recovery' ? "a recovery channel's first record" : 'a stream header';
    const server = net.createServer({ pauseOnConnect: true, allowHalfOpen: true });
    const bound = await listenServer(server, address);
    const tcp = bound.transport === 'tcp';
    const timeoutMs = this.o.handshakeTimeoutMs ?? DEFAULT_HANDSHAKE_TIMEOUT_MS;
    let extras = -1; // -1: no main channel yet
    const candidates: Candidate[] = [];
    const release = (c: Candidate): Buffer => {
      clearTimeout(c.timer);
      c.raw.off('data', c.onData);
      c.raw.pause();
      // What the stream read ahead of 'data' (up to its high-water mark) belongs to the prefix too.
      for (let b = c.raw.read() as Buffer | null; b !== null; b = c.raw.read() as Buffer | null) c.chunks.push(b);
      return Buffer.concat(c.chunks);
    };
    const drop = (c: Candidate, reason: MigrationError): void => {
      const i = candidates.indexOf(c);
      if (i < 0) return;
      candidates.splice(i, 1);
      release(c);
      c.raw.destroy();
      this.o.events.candidateDropped(reason, c.peer);
      // Held connections with nothing undecided before them any more are not extras: drop them.
      const head = candidates[0];
      if (head?.invalid !== undefined) drop(head, head.invalid);
    };
    const refuse = (c: Candidate, reason: MigrationError): void => {
      if (candidates[0] === c) {
        drop(c, reason);
        return;
      }
      c.invalid = reason;
      c.raw.off('data', c.onData);
      c.raw.pause();
    };
    const becomeMain = (c: Candidate): void => {
      const i = candidates.indexOf(c);
      const before = candidates.slice(0, i);
      const after = candidates.slice(i + 1);
      candidates.length = 0;
      extras = 0;
      for (const early of before) {
        candidates.push(early);
        drop(early, new TransportError(ErrorCode.PEER_SILENT, 'main', 'connected before the source and sent no stream header before it did'));
      }
      const prefix = release(c);
      onMain(this.readMain(c.raw, tcp), prefix);
      for (const late of after) {
        if (late.secured) onExtra(late.raw, ++extras, server, tcp, release(late));
        else {
          // Still in its TLS handshake: an extra once it is authenticated.
          clearTimeout(late.timer);
          late.ready?.then(
            () => onExtra(late.raw, ++extras, server, tcp, release(late)),
            (err: Error) => this.o.events.candidateDropped(err as MigrationError, peerOf(late.raw)),
          );
        }
      }
    };
    const peerOf = (raw: net.Socket): string => (raw.remoteAddress === undefined ? 'a unix socket peer' : `${raw.remoteAddress}:${raw.remotePort}`);
    const tls = this.o.tls;
    let handshaking = 0;
    server.on('connection', (accepted) => {
      if (tls === undefined) {
        onConnection(accepted, performance.now());
        return;
      }
      if (handshaking + candidates.length >= MAX_CANDIDATES) {
        accepted.destroy();
        return;
      }
      // TLS before anything else: the peer is authenticated (handshake, then tls-authz) before a
      // byte it sends is looked at; the handshake counts against the same deadline as the header.
      const startedAt = performance.now();
      const peer = peerOf(accepted);
      const { secured, ready } = secureServerSide(accepted, tls, `TLS connection from ${peer}`);
      const logSession = (socket: tls.TLSSocket): void =>
        this.o.events.tlsAccepted?.(peer, { protocol: socket.getProtocol(), cipher: socket.getCipher().name, client: peerDistinguishedName(socket) });
      accepted.resume();
      if (extras < 0) {
        // A candidate at once, in accept order (handshakes may finish in any order; a source
        // connects its main channel first and its extras after it).
        onConnection(secured, startedAt, ready.then(logSession));
        return;
      }
      handshaking++;
      const timer = setTimeout(() => {
        secured.destroy();
        reject(new TransportError(ErrorCode.PEER_SILENT, 'main', `did not complete the TLS handshake within the handshake deadline (x-livemig-handshake-timeout ${timeoutMs} ms)`));
      }, timeoutMs);
      timer.unref();
      let settled = false;
      const reject = (err: Error): void => {
        if (settled) return;
        settled = true;
        handshaking--;
        clearTimeout(timer);
        this.o.events.candidateDropped(err as MigrationError, peer);
      };
      ready.then(
        (socket) => {
          if (settled) {
            socket.destroy();
            return;
          }
          settled = true;
          handshaking--;
          clearTimeout(timer);
          socket.pause();
          logSession(socket);
          onConnection(socket, startedAt);
        },
        reject,
      );
    });
    const onConnection = (raw: net.Socket, startedAt: number, ready?: Promise<unknown>): void => {
      if (extras >= 0) {
        onExtra(raw, ++extras, server, tcp, Buffer.alloc(0));
        return;
      }
      if (candidates.length >= MAX_CANDIDATES) {
        raw.destroy();
        return;
      }
      const c: Candidate = {
        raw,
        // Named now: once reset, a TCP socket no longer knows its remote address.
        peer: peerOf(raw),
        chunks: [],
        bytes: 0,
        timer: undefined,
        invalid: undefined,
        ready,
        secured: ready === undefined,
        onData: (chunk) => {
          this.streamStarted = true;
          c.chunks.push(chunk);
          c.bytes += chunk.length;
          const head = c.chunks.length === 1 ? chunk : Buffer.concat(c.chunks);
          const verdict: 'valid' | ProtocolError | null = check(head.subarray(0, need));
          if (verdict === 'valid') becomeMain(c);
          else if (verdict !== null && tls === undefined && looksLikeTlsHello(head)) {
            refuse(c, new TlsError(RuntimeErrorCode.TLS_UNEXPECTED, 'the peer started a TLS handshake, but tls-creds is not set here: set the same tls-creds on this destination') as unknown as MigrationError);
          } else if (verdict !== null) refuse(c, verdict);
        },
      };
      candidates.push(c);
      const leftMs = Math.max(0, timeoutMs - (performance.now() - startedAt));
      c.timer = setTimeout(
        () =>
          drop(
            c,
            c.invalid ??
              (c.secured
                ? new TransportError(ErrorCode.PEER_SILENT, 'main', `sent ${c.bytes === 0 ? 'nothing' : `${c.bytes} bytes, not ${expected} yet,`} within the handshake deadline (x-livemig-handshake-timeout ${timeoutMs} ms)`)
                : new TransportError(ErrorCode.PEER_SILENT, 'main', `did not complete the TLS handshake within the handshake deadline (x-livemig-handshake-timeout ${timeoutMs} ms)`)),
          ),
        leftMs,
      );
      c.timer.unref();
      raw.on('error', () => {});
      const start = (): void => {
        c.secured = true;
        if (!candidates.includes(c)) return;
        raw.on('data', c.onData);
        // The server is allowHalfOpen: a FIN alone closes nothing, so a client that gave up is dropped here.
        raw.on('end', () => drop(c, TransportError.lost('main', `closed before it sent ${expected}`)));
        raw.on('close', () => {
          const i = candidates.indexOf(c);
          if (i >= 0) {
            candidates.splice(i, 1);
            clearTimeout(c.timer);
            this.o.events.candidateDropped(TransportError.lost('main', `closed before it sent ${expected}`), c.peer);
            const head = candidates[0];
            if (head?.invalid !== undefined) drop(head, head.invalid);
          }
        });
        raw.resume();
      };
      if (ready === undefined) start();
      else ready.then(start, (err: Error) => drop(c, err as MigrationError));
    };
    server.on('close', () => {
      for (const c of [...candidates]) {
        clearTimeout(c.timer);
        c.raw.destroy();
      }
      candidates.length = 0;
    });
    this.server?.close();
    this.server = server;
    return formatAddress(bound);
  }


  /**
   * Start reading the main channel into the stream reader: static-buffer reads on the socket's
   * own descriptor, or (TLS) chunks pumped from the TLS socket. The caller feeds `prefix` first.
   */
  private readMain(raw: net.Socket, tcp: boolean): net.Socket {
    if (this.o.tls !== undefined) {
      pumpOnread(raw, this.o.reader);
      raw.resume();
      return raw;
    }
    const socket = adoptWithOnread(raw, this.o.reader, { allowHalfOpen: true });
    if (tcp) socket.setNoDelay(true);
    return socket;
  }

  /** Postcopy-preempt: the second connection carries requested pages only; more are refused. */
  private acceptPreempt(raw: net.Socket, extra: number, server: net.Server, tcp: boolean, prefix: Buffer): void {
    if (extra > 1) {
      raw.destroy();
      return;
    }
    server.close();
    // Read off it while the main channel's header was checked (a preempt channel is silent until postcopy).
    if (prefix.length > 0) raw.unshift(prefix);
    this.o.events.preemptAccepted(raw, tcp);
  }

  /** Multifd: each of the next `multifd-channels` connections starts with an init packet naming its id. */
  private acceptMultifd(raw: net.Socket, extra: number, prefix: Buffer): void {
    const expected = this.o.multifdChannels;
    // One connection beyond multifd-channels is read too: its init packet names the mismatch (a
    // channel id this side does not expect), and that reason goes back to the source. More are
    // held unread until the end (closing them first would let the source fail on a reset before
    // the reason arrives).
    if (extra > expected + 1) {
      if (this.held.length < MAX_HELD_CONNECTIONS && this.server?.listening === true) this.held.push(raw);
      else raw.destroy();
      return;
    }
    const ram = this.o.guest.ram;
    const recv = new MultifdReceiver(blockResolver(new Map(ram.blocks.map((b, i) => [b.idstr, ram.view(i)]))));
    const channel: MultifdChannel = { recv, socket: raw, ended: false, threadSyncs: 0 };
    this.multifd.push(channel);
    // Bytes read off it while the main channel's header was checked come first, and before the
    // socket is adopted: adopting asks the receiver at once where the next read lands.
    let reading = true;
    for (let at = 0; at < prefix.length; ) {
      const into = recv.nextBuffer();
      const n = prefix.copy(into, 0, at);
      at += n;
      if (!this.onMultifdBytes(channel, n)) {
        reading = false;
        break;
      }
    }
    // Once its init packet is judged, a plain socket is read by a thread of its own from the
    // next packet boundary on (Node's reads stop: the callback returns false).
    const onread = {
      buffer: () => recv.nextBuffer(),
      callback: (n: number) => this.onMultifdBytes(channel, n) && (this.o.tls !== undefined || !handOverToThread(channel, this.o.guest, this.threadEvents)),
    };
    if (this.o.tls !== undefined) {
      // A TLS channel's bytes are decrypted in this thread: copied from each chunk into RAM.
      pumpOnread(raw, onread);
      if (reading) raw.resume();
      else raw.pause();
    } else {
      channel.socket = adoptWithOnread(raw, onread, { allowHalfOpen: true });
      if (!reading) channel.socket.pause();
    }
    channel.socket.on('end', () => {
      channel.ended = true;
      if (!recv.atPacketBoundary) this.o.events.multifdFailed(TransportError.lost('multifd', `multifd channel ${recv.channelId} closed in the middle of a packet`));
      else this.o.events.multifdProgressed();
    });
    channel.socket.on('error', (err) => this.o.events.multifdFailed(TransportError.lost('multifd', `multifd channel ${recv.channelId}: ${err.message}`, err)));
  }

  /** What the multifd reader threads report. */
  private readonly threadEvents: MultifdThreadEvents = {
    progressed: () => this.o.events.multifdProgressed(),
    bytes: () => (this.lastMultifdByteAtMs = performance.now()),
    failed: (err) => this.o.events.multifdFailed(err),
  };

  private onMultifdBytes(channel: MultifdChannel, n: number): boolean {
    this.lastMultifdByteAtMs = performance.now();
    try {
      const ev = channel.recv.advance(n);
      if (ev === null) return true;
      if (ev.kind === 'init') {
        const id = ev.init.channelId;
        const expected = this.o.multifdChannels;
        if (id >= expected) throw new ConfigError(ErrorCode.BAD_MULTIFD, `multifd channel id ${id}, but multifd-channels is ${expected} here`);
        if (this.multifdIdsSeen.has(id)) throw new ConfigError(ErrorCode.BAD_MULTIFD, `multifd channel id ${id} connected twice`);
        if (ev.init.uuid.some((b) => b !== 0)) throw new ConfigError(ErrorCode.BAD_MULTIFD, `multifd channel ${id} names a UUID other than this guest's (all zeros)`);
        this.multifdIdsSeen.add(id);
      } else if (ev.sync) this.o.events.multifdProgressed();
      return true;
    } catch (err) {
      this.o.events.multifdFailed(err as MigrationError);
      return false;
    }
  }

  /** Whether every channel has delivered the SYNC of each of the first `ramSectionsEnded` RAM sections. */
  syncsComplete(ramSectionsEnded: number): boolean {
    if (this.multifd.length < this.o.multifdChannels) return ramSectionsEnded === 0;
    return this.multifd.every((c) => channelSyncs(c) >= ramSectionsEnded);
  }

  /** A channel that ended before delivering the SYNC of RAM section `ramSectionsEnded` (it never will). */
  stuckChannel(ramSectionsEnded: number): number | undefined {
    return this.multifd.find((c) => c.ended && channelSyncs(c) < ramSectionsEnded)?.recv.channelId;
  }

  /** Write on the return path (the main connection). */
  writeReturnPath(bytes: Buffer): void {
    if (this.main !== undefined && !this.main.destroyed) this.main.write(bytes);
  }

  /** A postcopy pause: the main connection is gone (a recovery brings a new one). */
  dropMain(): void {
    this.main?.destroy();
    this.main = undefined;
  }

  /** The migration ended: half-close the main connection (after the SHUT), close the rest and the listeners. */
  close(failed: boolean): void {
    this.main?.end();
    this.server?.close();
    void this.listener?.close();
    const extra = [...this.multifd.map((c) => c.socket), ...this.held];
    // A reader thread holds its own descriptor: the socket closes once it stops too.
    const stopThreads = (): void => {
      for (const c of this.multifd) c.thread?.close();
    };
    if (!failed) {
      stopThreads();
      for (const c of extra) c.destroy();
      return;
    }
    // After a failure the source may still be writing: closing a connection with unread bytes
    // resets it, and that reset can reach the source before the reason sent on the return path.
    // End them (FIN) and close them a moment later.
    for (const c of extra) c.end();
    setTimeout(() => {
      stopThreads();
      for (const c of extra) c.destroy();
    }, FAILED_CHANNEL_LINGER_MS).unref();
  }
}

/** Where a channel's packets find their block's memory; one function for every channel (and the warm-up), one call target for V8. */
export function blockResolver(blocks: Map<string, Buffer>): (name: string) => Buffer | undefined {
  return (name) => blocks.get(name);
}
