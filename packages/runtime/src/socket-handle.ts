// Moving a connected socket's libuv handle: to a new net.Socket that reads in static-buffer mode
// (Node takes `onread` only at construction), or out of this thread for a worker to own.

import net from 'node:net';
import { ChannelError, RuntimeErrorCode } from './errors.ts';

/** Node's static-buffer read mode: `callback(n, buffer)` sees `buffer[0..n)`, valid only during the call. */
export interface OnreadOptions {
  buffer: Uint8Array | (() => Uint8Array);
  /** Return false to pause the socket (resume() it to go on). */
  callback: (bytesWritten: number, buffer: Uint8Array) => boolean;
}

/**
 * A connected socket's file descriptor, where Node has one (a TCP or pipe handle on Linux):
 * Node exposes none but its private handle's `fd`. Undefined once closed or handed over.
 */
export function socketFd(socket: net.Socket): number | undefined {
  const fd = (socket as unknown as { _handle?: { fd?: unknown } | null })._handle?.fd;
  return typeof fd === 'number' && fd >= 0 ? fd : undefined;
}

/**
 * Take a connected socket's file descriptor away from this thread, for a worker thread to own
 * (`new net.Socket({ fd })` there). Reading stops; bytes already read but not consumed (a socket
 * without a 'data' listener keeps them) are returned, to be handled before what the fd brings.
 * The handle is left orphaned, never closed here: the worker closes the descriptor. Relies on
 * the private `_handle` (Node 20).
 */
export function detachFd(socket: net.Socket): { fd: number; pending: Buffer } {
  const s = socket as net.Socket & { _handle: { fd?: number; readStop?(): number } | null };
  const handle = s._handle;
  const fd = socketFd(socket);
  if (handle === null || fd === undefined) {
    throw new ChannelError(RuntimeErrorCode.INVALID_ARGUMENT, 'socket has no file descriptor to hand over (closed, or not a Unix socket or TCP connection)');
  }
  handle.readStop?.();
  // Without its handle the socket cannot start reading again (read() below would otherwise), and
  // destroy() only does the bookkeeping (a server's connection count).
  s._handle = null;
  const chunks: Buffer[] = [];
  for (let c = socket.read() as Buffer | null; c !== null; c = socket.read() as Buffer | null) chunks.push(c);
  s.destroy();
  return { fd, pending: Buffer.concat(chunks) };
}

/**
 * Re-wrap a paused, freshly accepted socket so it reads in static-buffer mode. Node only takes
 * `onread` at construction, so the libuv handle moves to a new net.Socket (works on Node 20; it
 * relies on the private `_handle`). Writes on the result go out on the same connection.
 */
export function adoptWithOnread(
  socket: net.Socket,
  onread: OnreadOptions,
  options: { allowHalfOpen?: boolean } = {},
): net.Socket {
  const old = socket as net.Socket & { _handle: unknown };
  const handle = old._handle;
  if (handle === null || handle === undefined) {
    throw new ChannelError(RuntimeErrorCode.INVALID_ARGUMENT, 'socket has no handle to adopt (already closed or adopted)');
  }
  old._handle = null;
  // With its handle gone, destroy() only does the bookkeeping: the server's connection count
  // drops (so server.close() can finish) and nothing is closed underneath us.
  old.destroy();
  const ctorOptions = {
    handle,
    readable: true,
    writable: true,
    allowHalfOpen: options.allowHalfOpen ?? true,
    onread,
  } as unknown as net.SocketConstructorOpts;
  const adopted = new net.Socket(ctorOptions);
  adopted.resume();
  return adopted;
}
