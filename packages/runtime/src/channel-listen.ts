// The receiving side of tcp: and unix: channels: listen, take the first connection (optionally
// reading it in static-buffer mode), stop listening.

import net from 'node:net';
import { formatAddress, toAddress, type MigrationAddress } from './address.ts';
import { ChannelError, RuntimeErrorCode } from './errors.ts';
import { listenServer } from './listen.ts';
import { adoptWithOnread, type OnreadOptions } from './socket-handle.ts';

export interface ListenChannelOptions {
  /** Read the accepted connection in static-buffer mode (see {@link acceptWithOnread}). */
  onread?: OnreadOptions;
  /** Give up waiting for the connection after this many ms. Default: wait until close(). */
  acceptTimeoutMs?: number;
  /** Keep our side writable after the peer ends its side. Default false. */
  allowHalfOpen?: boolean;
  /** TCP_NODELAY on the accepted tcp connection. Default true. */
  noDelay?: boolean;
}

export interface ChannelListener {
  /** What was actually bound (port 0 → the chosen port). */
  readonly address: MigrationAddress;
  /** The same as text, e.g. `tcp:127.0.0.1:40123`. */
  readonly addressText: string;
  /** The first accepted connection. The listener stops listening once it has one. */
  readonly accepted: Promise<net.Socket>;
  /** Stop listening; `accepted` rejects with LM_ERR_CHANNEL_CLOSED if nothing was accepted yet. */
  close(): Promise<void>;
}

/**
 * Listen for the receiving side of a channel on `tcp:` or `unix:`. Resolves as soon as the address
 * is bound; `accepted` resolves with the first connection, after which the listener closes.
 */
export async function listenChannel(
  address: string | MigrationAddress,
  options: ListenChannelOptions = {},
): Promise<ChannelListener> {
  const addr = toAddress(address);
  const onread = options.onread;
  const server = net.createServer({ allowHalfOpen: options.allowHalfOpen ?? false, pauseOnConnect: onread !== undefined });
  const bound = await listenServer(server, addr);
  const text = formatAddress(bound);
  const noDelay = options.noDelay ?? true;

  let settled = false;
  let timer: NodeJS.Timeout | undefined;
  let rejectAccept: (err: Error) => void = () => {};
  const accepted = new Promise<net.Socket>((resolve, reject) => {
    rejectAccept = (err) => {
      if (settled) return;
      settled = true;
      server.off('connection', onConnection);
      reject(err);
    };
    const onConnection = (socket: net.Socket): void => {
      if (settled) {
        socket.destroy();
        return;
      }
      settled = true;
      if (timer !== undefined) clearTimeout(timer);
      server.off('connection', onConnection);
      server.close();
      try {
        const s = onread === undefined ? socket : adoptWithOnread(socket, onread, { allowHalfOpen: options.allowHalfOpen ?? false });
        if (bound.transport === 'tcp') s.setNoDelay(noDelay);
        resolve(s);
      } catch (err) {
        socket.destroy();
        reject(err);
      }
    };
    server.on('connection', onConnection);
  });
  // The caller may never look at `accepted` (e.g. it closes the listener first).
  accepted.catch(() => {});
  if (options.acceptTimeoutMs !== undefined) {
    const ms = options.acceptTimeoutMs;
    timer = setTimeout(() => {
      rejectAccept(new ChannelError(RuntimeErrorCode.CHANNEL_TIMEOUT, `no connection on ${text} within ${ms} ms`));
      server.close();
    }, ms);
  }

  return {
    address: bound,
    addressText: text,
    accepted,
    close: () =>
      new Promise<void>((resolve) => {
        if (timer !== undefined) clearTimeout(timer);
        rejectAccept(new ChannelError(RuntimeErrorCode.CHANNEL_CLOSED, `listener on ${text} closed before a connection arrived`));
        if (!server.listening) {
          resolve();
          return;
        }
        server.close(() => resolve());
      }),
  };
}

/**
 * Wait for the first connection on `server` and hand it back reading in static-buffer mode.
 * `server` must have been created with `{ pauseOnConnect: true }`, so no byte is read into a
 * buffer of Node's own before the switch. Later connections are left to other listeners.
 */
export function acceptWithOnread(
  server: net.Server,
  onread: OnreadOptions,
  options: { timeoutMs?: number; allowHalfOpen?: boolean } = {},
): Promise<net.Socket> {
  if ((server as net.Server & { pauseOnConnect?: boolean }).pauseOnConnect !== true) {
    return Promise.reject(
      new ChannelError(RuntimeErrorCode.INVALID_ARGUMENT, 'acceptWithOnread needs a server created with { pauseOnConnect: true }'),
    );
  }
  return new Promise((resolve, reject) => {
    let timer: NodeJS.Timeout | undefined;
    const cleanup = (): void => {
      if (timer !== undefined) clearTimeout(timer);
      server.off('connection', onConnection).off('close', onClose);
    };
    const onConnection = (socket: net.Socket): void => {
      cleanup();
      try {
        resolve(adoptWithOnread(socket, onread, { allowHalfOpen: options.allowHalfOpen ?? true }));
      } catch (err) {
        socket.destroy();
        reject(err);
      }
    };
    const onClose = (): void => {
      cleanup();
      reject(new ChannelError(RuntimeErrorCode.CHANNEL_CLOSED, 'server closed before a connection arrived'));
    };
    server.on('connection', onConnection).once('close', onClose);
    if (options.timeoutMs !== undefined) {
      const ms = options.timeoutMs;
      timer = setTimeout(() => {
        cleanup();
        reject(new ChannelError(RuntimeErrorCode.CHANNEL_TIMEOUT, `no connection within ${ms} ms`));
      }, ms);
    }
  });
}
