// Migration channels as Node duplex streams (wire-format.md §1.1). The main channel carries the
// stream source → destination; the return path is the reverse direction of the same stream, so
// every channel here is a Duplex, even where one side can only ever be empty (`file:`).
//
//   sending side    connectChannel(address)   tcp: unix: fd: (here)  exec: file: (exec-file-channel.ts,
//                                              positioned-file-channel.ts)
//   receiving side  listenChannel(address)    tcp: unix: (channel-listen.ts); file: exec: (incoming-pipe.ts)

import net from 'node:net';
import type { Duplex } from 'node:stream';
import { formatAddress, toAddress, type MigrationAddress } from './address.ts';
import { ChannelError, RuntimeErrorCode } from './errors.ts';
import { openFile, spawnExec } from './exec-file-channel.ts';
import { openPositionedFile } from './positioned-file-channel.ts';
import type { OnreadOptions } from './socket-handle.ts';
import { secureClientSide, type TlsClientOptions } from './tls.ts';

export interface ConnectChannelOptions {
  /** Bound on the tcp/unix connect (ms). Default 10 000. */
  connectTimeoutMs?: number;
  /** Static-buffer reads for tcp:, unix: and fd: channels. */
  onread?: OnreadOptions;
  /** Keep our side writable after the peer ends its side. Default false (Node's default). */
  allowHalfOpen?: boolean;
  /** TCP_NODELAY for tcp: (default true: return-path page requests must not wait for Nagle). */
  noDelay?: boolean;
  /**
   * What to do with an `exec:` command's stderr: keep the last 4 KiB for the error message
   * ('capture', default), pass it through to ours ('inherit'), or drop it ('ignore').
   */
  execStderr?: 'capture' | 'inherit' | 'ignore';
  /**
   * `file:` only: a file written by position (mapped-ram), a {@link PositionedFileChannel} —
   * the stream may skip ahead, and pages are written at their own offsets.
   */
  positioned?: boolean;
  /**
   * TLS over tcp:/unix: (parameter tls-creds): the promise resolves once the handshake has
   * authenticated the destination, within `connectTimeoutMs`. Not with `onread`.
   */
  tls?: TlsClientOptions;
}

const DEFAULT_CONNECT_TIMEOUT_MS = 10_000;

/**
 * Open the sending side of a channel. tcp:/unix: connect within `connectTimeoutMs`; `fd:N` wraps
 * an inherited socket or pipe; `exec:CMD` runs `/bin/sh -c CMD` (we write its stdin and read its
 * stdout; a non-zero exit destroys the stream with LM_ERR_EXEC_FAILED); `file:PATH[,offset=N]`
 * truncates PATH to N bytes and writes from there (its readable side is empty).
 */
export async function connectChannel(
  address: string | MigrationAddress,
  options: ConnectChannelOptions = {},
): Promise<Duplex> {
  const addr = toAddress(address);
  const text = formatAddress(addr);
  if (options.onread !== undefined && (addr.transport === 'exec' || addr.transport === 'file')) {
    throw new ChannelError(RuntimeErrorCode.UNSUPPORTED_TRANSPORT, `onread is not available for ${addr.transport}: channels`);
  }
  if (options.tls !== undefined) {
    if (addr.transport !== 'tcp' && addr.transport !== 'unix') {
      throw new ChannelError(RuntimeErrorCode.UNSUPPORTED_TRANSPORT, `TLS (tls-creds) needs a tcp: or unix: migration address, not ${addr.transport}:`);
    }
    const tls = options.tls;
    if (options.onread !== undefined) throw new ChannelError(RuntimeErrorCode.INVALID_ARGUMENT, 'onread cannot read through TLS (use pumpOnread)');
    const socket = await connectSocket(addr, text, options);
    // QEMU checks the URI's host when tls-hostname is empty.
    const hostname = tls.hostname !== undefined && tls.hostname !== '' ? tls.hostname : addr.transport === 'tcp' ? addr.host : undefined;
    return secureClientSide(socket, { creds: tls.creds, hostname }, text, options.connectTimeoutMs ?? DEFAULT_CONNECT_TIMEOUT_MS);
  }
  switch (addr.transport) {
    case 'tcp':
    case 'unix':
      return connectSocket(addr, text, options);
    case 'fd':
      return openFd(addr.fd, text, options);
    case 'exec':
      return spawnExec(addr.command, text, options.execStderr ?? 'capture');
    case 'file':
      return options.positioned === true ? openPositionedFile(addr.path, addr.offset, text) : openFile(addr.path, addr.offset, text);
    case 'defer':
      throw new ChannelError(RuntimeErrorCode.UNSUPPORTED_TRANSPORT, 'cannot connect to "defer": it is a destination-only address');
  }
}

function connectSocket(
  addr: Extract<MigrationAddress, { transport: 'tcp' | 'unix' }>,
  text: string,
  options: ConnectChannelOptions,
): Promise<net.Socket> {
  if (addr.transport === 'tcp' && addr.port === 0) {
    throw new ChannelError(RuntimeErrorCode.CHANNEL_OPEN, `cannot connect to ${text}: port 0 is only for listening`);
  }
  const timeoutMs = options.connectTimeoutMs ?? DEFAULT_CONNECT_TIMEOUT_MS;
  return new Promise((resolve, reject) => {
    const common: net.ConnectOpts & { allowHalfOpen?: boolean } = { allowHalfOpen: options.allowHalfOpen ?? false };
    if (options.onread !== undefined) common.onread = options.onread;
    const socket =
      addr.transport === 'tcp'
        ? net.connect({ ...common, host: addr.host === '' ? 'localhost' : addr.host, port: addr.port, noDelay: options.noDelay ?? true })
        : net.connect({ ...common, path: addr.path });
    const timer = setTimeout(() => {
      socket.off('connect', onConnect).off('error', onError);
      socket.destroy();
      reject(new ChannelError(RuntimeErrorCode.CHANNEL_TIMEOUT, `connect to ${text} timed out after ${timeoutMs} ms`));
    }, timeoutMs);
    const onConnect = (): void => {
      clearTimeout(timer);
      socket.off('error', onError);
      resolve(socket);
    };
    const onError = (err: Error): void => {
      clearTimeout(timer);
      socket.off('connect', onConnect);
      socket.destroy();
      reject(new ChannelError(RuntimeErrorCode.CHANNEL_OPEN, `connect to ${text} failed: ${err.message}`, { cause: err }));
    };
    socket.once('connect', onConnect).once('error', onError);
  });
}

function openFd(fd: number, text: string, options: ConnectChannelOptions): net.Socket {
  // SocketConstructorOpts lacks `onread` in @types/node 20, but the constructor honours it.
  const ctorOptions: net.SocketConstructorOpts & { onread?: OnreadOptions } = {
    fd,
    readable: true,
    writable: true,
    allowHalfOpen: options.allowHalfOpen ?? false,
  };
  if (options.onread !== undefined) ctorOptions.onread = options.onread;
  try {
    return new net.Socket(ctorOptions);
  } catch (err) {
    // A regular file, a closed fd or a tty: net.Socket only wraps sockets and pipes.
    throw new ChannelError(RuntimeErrorCode.CHANNEL_OPEN, `cannot use ${text}: ${(err as Error).message}`, { cause: err });
  }
}
