// What a livemig process checks before it prepares its guest (filling and prefaulting 1 GiB takes
// seconds): every address it will listen on, so a port in use or a bad path is one line at once,
// not a stack trace after the RAM is ready. And how a process ends on an error a user caused.
//
// Exit statuses, the same for livemig-source and livemig-destination:
//   0  done (quit, or --exit-after-migrate with a completed migration)
//   1  the migration failed or was cancelled
//   2  the command line cannot be used: a bad flag or value, an address that does not parse or
//      cannot be listened on (in use, no such directory, no permission)
//   70 an internal error (a bug): the only case that prints a stack trace
//   130 / 143  ended by SIGINT / SIGTERM

import { lstat, stat } from 'node:fs/promises';
import net from 'node:net';
import { dirname } from 'node:path';
import { formatAddress, listenServer, type MigrationAddress, parseAddress, type Transport } from '@livemig/runtime';
import { UsageError } from './flags.ts';

export const EXIT_MIGRATION_FAILED = 1;
export const EXIT_USAGE = 2;
export const EXIT_INTERNAL = 70;

/**
 * Parse `text` given to `flag` as one of `transports`; a UsageError names the flag, the address
 * and the transports it takes (so `--migrate rdma:…` is not told to use `defer`).
 */
export function addressForFlag(flag: string, text: string, transports: readonly Transport[]): MigrationAddress {
  const list = transports.map((t) => (t === 'defer' ? 'defer' : `${t}:`)).join(', ');
  let address: MigrationAddress;
  try {
    address = parseAddress(text);
  } catch (err) {
    const reason = (err as Error).message.replace(/ \(expected [^)]*\)$/, '');
    throw new UsageError(`${flag} ${reason}; it takes ${list}`, { cause: err });
  }
  if (address.transport === 'defer' && !transports.includes('defer')) {
    throw new UsageError(`${flag} defer: 'defer' is only for a destination (livemig-destination --incoming defer); it takes ${list}`);
  }
  if (!transports.includes(address.transport)) {
    throw new UsageError(`${flag} ${JSON.stringify(text)}: ${address.transport} is not usable here; it takes ${list}`);
  }
  return address;
}

// What to do about a listen failure, by errno.
const LISTEN_HINTS: Readonly<Record<string, string>> = {
  EADDRINUSE: 'it is in use: pick another port (port 0 picks a free one) or stop what listens there',
  EACCES: 'permission denied: use a port above 1023 or a directory you can write',
  EADDRNOTAVAIL: 'no local interface has that address: use 127.0.0.1, 0.0.0.0 or one of this host’s addresses',
  ENOTFOUND: 'the host name does not resolve: use an IP address or a known name',
  EAI_AGAIN: 'the host name does not resolve: use an IP address or a known name',
};

/**
 * Check that `address` (tcp: or unix:) can be listened on, before anything is prepared: a tcp
 * port is bound and released at once; a unix path must be in an existing directory and not be
 * a live socket or another file. Throws a UsageError saying what to do.
 */
export async function checkListenable(flag: string, address: MigrationAddress): Promise<void> {
  const where = `${flag} ${formatAddress(address)}`;
  if (address.transport === 'tcp') {
    if (address.port === 0) return; // any free port: nothing to clash with
    const probe = net.createServer();
    try {
      await listenServer(probe, address);
    } catch (err) {
      const errno = ((err as Error).cause as NodeJS.ErrnoException | undefined)?.code ?? '';
      throw new UsageError(`${where}: ${LISTEN_HINTS[errno] ?? (err as Error).message}`, { cause: err });
    } finally {
      if (probe.listening) await new Promise<void>((resolve) => probe.close(() => resolve()));
    }
    return;
  }
  if (address.transport === 'file') {
    // Read from: it must be there to read.
    const file = await stat(address.path).catch(() => undefined);
    if (file === undefined || !file.isFile()) throw new UsageError(`${where}: no such file: give the stream file's path`);
    return;
  }
  if (address.transport !== 'unix') return;
  const dir = dirname(address.path);
  const dirStat = await stat(dir).catch(() => undefined);
  if (dirStat === undefined || !dirStat.isDirectory()) throw new UsageError(`${where}: directory ${dir} does not exist: create it or use another path`);
  const existing = await lstat(address.path).catch(() => undefined);
  if (existing === undefined) return;
  if (!existing.isSocket()) throw new UsageError(`${where}: the path exists and is not a socket: remove it or use another path`);
  // A socket file: stale (removed when we listen, as QEMU does) unless something accepts on it.
  const live = await new Promise<boolean>((resolve) => {
    const s = net.connect({ path: address.path });
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
  if (live) throw new UsageError(`${where}: another process listens on it: stop it or use another path`);
}

/**
 * The one line to print for an error that ends a process, and its exit status: a coded error
 * (a user's mistake or the environment) is its message; anything else is a bug, with its stack.
 */
export function fatalLine(program: string, err: unknown): { line: string; status: number } {
  const code = (err as { code?: unknown } | null)?.code;
  if (typeof code === 'string' && code.startsWith('LM_ERR_')) {
    const status = code === 'LM_ERR_USAGE' || code === 'LM_ERR_BAD_ADDRESS' || code === 'LM_ERR_BAD_PARAMETER' ? EXIT_USAGE : EXIT_MIGRATION_FAILED;
    return { line: `${program}: ${(err as Error).message}\n`, status };
  }
  return { line: `${program}: internal error: ${(err as Error | null)?.stack ?? String(err)}\n`, status: EXIT_INTERNAL };
}
