// Binding a net.Server to a `tcp:` or `unix:` address, shared by the QMP server and the
// migration listener, and reading back what was actually bound (port 0 → the kernel's pick).

import { chmodSync } from 'node:fs';
import { lstat, unlink } from 'node:fs/promises';
import { isMainThread } from 'node:worker_threads';
import type { Server } from 'node:net';
import { formatAddress, toAddress, type MigrationAddress } from './address.ts';
import { ChannelError, RuntimeErrorCode } from './errors.ts';

/**
 * Listen on `tcp:HOST:PORT` (empty HOST = every local address, PORT 0 = any free port) or
 * `unix:PATH` (a stale socket file at PATH is removed first, as QEMU does; the socket is created
 * owner-only, mode 0600, whatever the umask). Resolves with the
 * bound address; rejects with ChannelError LM_ERR_CHANNEL_OPEN (or LM_ERR_UNSUPPORTED_TRANSPORT
 * for other transports).
 */
export async function listenServer(server: Server, address: string | MigrationAddress): Promise<MigrationAddress> {
  const addr = toAddress(address);
  if (addr.transport === 'unix') {
    await removeStaleSocket(addr.path);
  } else if (addr.transport !== 'tcp') {
    throw new ChannelError(
      RuntimeErrorCode.UNSUPPORTED_TRANSPORT,
      `cannot listen on ${formatAddress(addr)}: only tcp: and unix: addresses accept connections`,
    );
  }
  await new Promise<void>((resolve, reject) => {
    const onError = (err: Error): void => {
      reject(
        new ChannelError(RuntimeErrorCode.CHANNEL_OPEN, `cannot listen on ${formatAddress(addr)}: ${err.message}`, {
          cause: err,
        }),
      );
    };
    server.once('error', onError);
    const onListening = (): void => {
      server.off('error', onError);
      if (addr.transport === 'unix') {
        // Synchronously, in the same turn as the bind: an await here would let a client in
        // (connected, even served) before the caller has set its server up.
        try {
          chmodSync(addr.path, UNIX_SOCKET_MODE);
        } catch (err) {
          server.close();
          reject(new ChannelError(RuntimeErrorCode.CHANNEL_OPEN, `cannot make unix:${addr.path} owner-only: ${(err as Error).message}`, { cause: err }));
          return;
        }
      }
      resolve();
    };
    if (addr.transport === 'unix') listenOwnerOnly(server, addr.path, onListening);
    else if (addr.host === '') server.listen({ port: addr.port }, onListening);
    else server.listen({ port: addr.port, host: addr.host }, onListening);
  });
  return boundAddress(server, addr);
}

/** Mode of QMP and migration unix sockets: connecting needs write permission, so only the owner may. */
export const UNIX_SOCKET_MODE = 0o600;

/**
 * Bind with the umask at 077, so bind(2) itself creates the socket file 0600: there is no moment
 * when another local user could connect (a chmod after bind leaves one, and a connection made in
 * it stays open). Node binds synchronously inside listen() (net.js setupListenHandle), so the
 * umask is back before any other JS runs; other threads creating files in that instant get a
 * stricter mode, never a looser one. The 'listening' callback then chmods it 0600 as well (worker
 * threads cannot change the umask: there that alone applies).
 */
function listenOwnerOnly(server: Server, path: string, onListening: () => void): void {
  if (!isMainThread) {
    server.listen({ path }, onListening);
    return;
  }
  const previous = process.umask(0o077);
  try {
    server.listen({ path }, onListening);
  } finally {
    process.umask(previous);
  }
}

/** The address a listening server is bound to, in MigrationAddress form. */
export function boundAddress(server: Server, requested?: MigrationAddress): MigrationAddress {
  const a = server.address();
  if (a === null) throw new ChannelError(RuntimeErrorCode.INVALID_ARGUMENT, 'server is not listening');
  if (typeof a === 'string') return { transport: 'unix', path: a };
  if (requested?.transport === 'unix') return requested;
  return { transport: 'tcp', host: a.address, port: a.port };
}

async function removeStaleSocket(path: string): Promise<void> {
  let isSocket: boolean;
  try {
    isSocket = (await lstat(path)).isSocket();
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return;
    throw new ChannelError(RuntimeErrorCode.CHANNEL_OPEN, `cannot listen on unix:${path}: ${(err as Error).message}`, {
      cause: err,
    });
  }
  // Only ever remove a socket: a regular file at that path is far more likely a typo than stale.
  if (!isSocket) {
    throw new ChannelError(RuntimeErrorCode.CHANNEL_OPEN, `cannot listen on unix:${path}: the path exists and is not a socket`);
  }
  try {
    await unlink(path);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') {
      throw new ChannelError(
        RuntimeErrorCode.CHANNEL_OPEN,
        `cannot remove stale socket unix:${path}: ${(err as Error).message}`,
        { cause: err },
      );
    }
  }
}
