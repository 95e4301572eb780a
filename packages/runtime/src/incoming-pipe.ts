import { spawn, type ChildProcess } from 'node:child_process';
import { constants as fsConstants } from 'node:fs';
import { access } from 'node:fs/promises';
import type net from 'node:net';
import { formatAddress, type MigrationAddress } from './address.ts';
import { ChannelError, RuntimeErrorCode } from './errors.ts';

/**
 * An incoming stream from a file (`file:PATH[,offset=N]`, QEMU 9.0+) or a command's output
 * (`exec:CMD`), as a readable socket: a child process (`cat`/`tail`, or `/bin/sh -c CMD`) writes it
 * into a pipe, so the destination reads it exactly as it reads a connection (onread, backpressure,
 * 'end' when it is all there).
 */
export async function openIncomingPipe(
  address: Extract<MigrationAddress, { transport: 'file' | 'exec' }>,
): Promise<{ stdout: net.Socket; child: ChildProcess; text: string }> {
  const text = formatAddress(address);
  let argv: string[];
  if (address.transport === 'file') {
    try {
      await access(address.path, fsConstants.R_OK);
    } catch (err) {
      throw new ChannelError(RuntimeErrorCode.CHANNEL_OPEN, `cannot open ${text}: ${(err as Error).message}`, { cause: err });
    }
    argv = address.offset === 0 ? ['cat', '--', address.path] : ['tail', '-c', `+${address.offset + 1}`, '--', address.path];
  } else {
    argv = ['/bin/sh', '-c', address.command];
  }
  const child = spawn(argv[0]!, argv.slice(1), { stdio: ['ignore', 'pipe', 'inherit'] });
  await new Promise<void>((resolve, reject) => {
    child.once('spawn', resolve).once('error', (err) => reject(new ChannelError(RuntimeErrorCode.EXEC_FAILED, `${text}: cannot run ${argv[0]}: ${err.message}`, { cause: err })));
  });
  return { stdout: child.stdout as net.Socket, child, text };
}
