// The incoming migration's connections: the listener(s), the main channel (which carries the
// return path), the connections that follow it to the same address (a preempt channel, or the
// multifd channels, which read page data straight into guest RAM), and the multifd SYNC count the
// main channel waits on. What the connections mean to the migration is the state machine's
// business: this file reports what happened and does what it is told.

import net from 'node:net';
import { ConfigError, ErrorCode, type MigrationError, MultifdReceiver, TransportError } from '@livemig/protocol';
import type { Guest } from '@livemig/guest';
import { adoptWithOnread, type ChannelListener, formatAddress, listenChannel, listenServer } from '@livemig/runtime';

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
  /** The first connection to the listener: the main channel (as a QEMU 7.2 destination assumes). */
  mainAccepted(socket: net.Socket): void;
  /** A connection after the main one, with postcopy-preempt. */
  preemptAccepted(raw: net.Socket, tcp: boolean): void;
  /** A multifd channel delivered a SYNC packet or ended. */
  multifdProgressed(): void;
  /** A multifd channel is broken or sent what it must not. */
  multifdFailed(err: MigrationError): void;
  /** The main listener failed before a connection came. */
  listenerFailed(err: MigrationError): void;
}

interface MultifdChannel {
  recv: MultifdReceiver;
  socket: net.Socket;
  ended: boolean;
}

export interface ChannelsOptions {
  guest: Guest;
  /** Capabilities that add connections after the main one. */
  preempt: boolean;
  multifd: boolean;
  /** Parameter multifd-channels. */
  multifdChannels: number;
  reader: MainReader;
  events: ChannelEvents;
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

  constructor(options: ChannelsOptions) {
    this.o = options;
  }

  get listeningAddress(): string | undefined {
    return this.addressText;
  }

  /** Listen on tcp: or unix:; returns the bound address (port 0 resolved). */
  async listen(address: string): Promise<string> {
    if (this.o.preempt || this.o.multifd) {
      this.addressText = await this.listenWithExtras(address, (socket) => this.o.events.mainAccepted(socket), (raw, extra, server, tcp) => {
        if (this.o.preempt) this.acceptPreempt(raw, extra, server, tcp);
        else this.acceptMultifd(raw, extra);
      });
      return this.addressText;
    }
    const listener = await listenChannel(address, { allowHalfOpen: true, onread: this.o.reader });
    this.listener = listener;
    this.addressText = listener.addressText;
    listener.accepted.then(
      (socket) => this.o.events.mainAccepted(socket),
      (err: unknown) => this.o.events.listenerFailed(TransportError.lost('main', `listening on ${listener.addressText} failed: ${(err as Error).message}`, err)),
    );
    return listener.addressText;
  }

  /** migrate-recover: listen for the source's recovery connection (and, with preempt, a new preempt channel). */
  async listenForRecovery(address: string, onMain: (socket: net.Socket) => void): Promise<string> {
    if (this.o.preempt) return this.listenWithExtras(address, onMain, (raw, extra, server, tcp) => this.acceptPreempt(raw, extra, server, tcp));
    const listener = await listenChannel(address, { allowHalfOpen: true, onread: this.o.reader });
    listener.accepted.then(onMain, () => {});
    return listener.addressText;
  }

  /**
   * Listen for a main channel and the extra connections that follow it to the same address: the
   * first connection is the main channel and goes to `onMain`; `onExtra` gets each later one (its
   * 1-based position among the extras).
   */
  private async listenWithExtras(
    address: string,
    onMain: (socket: net.Socket) => void,
    onExtra: (raw: net.Socket, extra: number, server: net.Server, tcp: boolean) => void,
  ): Promise<string> {
    const server = net.createServer({ pauseOnConnect: true, allowHalfOpen: true });
    const bound = await listenServer(server, address);
    const tcp = bound.transport === 'tcp';
    let count = 0;
    server.on('connection', (raw) => {
      count++;
      if (count > 1) {
        onExtra(raw, count - 1, server, tcp);
        return;
      }
      const socket = adoptWithOnread(raw, this.o.reader, { allowHalfOpen: true });
      if (tcp) socket.setNoDelay(true);
      onMain(socket);
    });
    this.server?.close();
    this.server = server;
    return formatAddress(bound);
  }

  /** Postcopy-preempt: the second connection carries requested pages only; more are refused. */
  private acceptPreempt(raw: net.Socket, extra: number, server: net.Server, tcp: boolean): void {
    if (extra > 1) {
      raw.destroy();
      return;
    }
    server.close();
    this.o.events.preemptAccepted(raw, tcp);
  }

  /** Multifd: each of the next `multifd-channels` connections starts with an init packet naming its id. */
  private acceptMultifd(raw: net.Socket, extra: number): void {
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
    const blocks = new Map(ram.blocks.map((b, i) => [b.idstr, ram.view(i)]));
    const recv = new MultifdReceiver((name) => blocks.get(name));
    const channel: MultifdChannel = { recv, socket: raw, ended: false };
    channel.socket = adoptWithOnread(raw, { buffer: () => recv.nextBuffer(), callback: (n) => this.onMultifdBytes(channel, n) }, { allowHalfOpen: true });
    this.multifd.push(channel);
    channel.socket.on('end', () => {
      channel.ended = true;
      if (!recv.atPacketBoundary) this.o.events.multifdFailed(TransportError.lost('multifd', `multifd channel ${recv.channelId} closed in the middle of a packet`));
      else this.o.events.multifdProgressed();
    });
    channel.socket.on('error', (err) => this.o.events.multifdFailed(TransportError.lost('multifd', `multifd channel ${recv.channelId}: ${err.message}`, err)));
  }

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
    return this.multifd.every((c) => c.recv.syncs >= ramSectionsEnded);
  }

  /** A channel that ended before delivering the SYNC of RAM section `ramSectionsEnded` (it never will). */
  stuckChannel(ramSectionsEnded: number): number | undefined {
    return this.multifd.find((c) => c.ended && c.recv.syncs < ramSectionsEnded)?.recv.channelId;
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
    if (!failed) {
      for (const c of extra) c.destroy();
      return;
    }
    // After a failure the source may still be writing: closing a connection with unread bytes
    // resets it, and that reset can reach the source before the reason sent on the return path.
    // End them (FIN) and close them a moment later.
    for (const c of extra) c.end();
    setTimeout(() => {
      for (const c of extra) c.destroy();
    }, FAILED_CHANNEL_LINGER_MS).unref();
  }
}
