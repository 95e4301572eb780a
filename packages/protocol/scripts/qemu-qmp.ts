// A real QEMU driven over QMP, for the scripts that record data from it (make-foreign-machines.ts
// here, fixtures/qemu-10.0/make.ts): a bare line client on QEMU's own socket, so nothing of
// livemig stands between QEMU and what the scripts record.

import { spawn } from 'node:child_process';
import net from 'node:net';

/** Commands in order, each answered by the next `return` or `error` line (events are skipped). */
export class Qmp {
  private buf = '';
  private readonly waiters: ((msg: any) => void)[] = [];
  private readonly sock: net.Socket;
  constructor(sock: net.Socket) {
    this.sock = sock;
    sock.setEncoding('utf8');
    sock.on('data', (d: string) => {
      this.buf += d;
      for (let nl = this.buf.indexOf('\n'); nl >= 0; nl = this.buf.indexOf('\n')) {
        const msg = JSON.parse(this.buf.slice(0, nl));
        this.buf = this.buf.slice(nl + 1);
        if ('return' in msg || 'error' in msg) this.waiters.shift()?.(msg);
      }
    });
  }
  execute(command: string, args?: object): Promise<any> {
    return new Promise((resolve, reject) => {
      this.waiters.push((msg) => ('error' in msg ? reject(new Error(`${command}: ${msg.error.desc}`)) : resolve(msg.return)));
      this.sock.write(JSON.stringify(args === undefined ? { execute: command } : { execute: command, arguments: args }) + '\n');
    });
  }
}

/** Connect once QEMU's QMP socket accepts (every 100 ms, 10 s at most). */
async function connect(path: string): Promise<net.Socket> {
  for (let i = 0; i < 100; i++) {
    try {
      return await new Promise<net.Socket>((resolve, reject) => {
        const s = net.connect(path, () => resolve(s));
        s.once('error', reject);
      });
    } catch {
      await new Promise((r) => setTimeout(r, 100));
    }
  }
  throw new Error(`QMP socket ${path} did not accept`);
}

/**
 * Run `binary args` in `cwd` (its output passed through), connect to its QMP socket at `qmpPath`,
 * negotiate, and hand the connection to `use`; QEMU is killed afterwards.
 */
export async function withQemu<T>(binary: string, args: string[], qmpPath: string, use: (qmp: Qmp) => Promise<T>, options: { cwd?: string } = {}): Promise<T> {
  const qemu = spawn(binary, args, { ...(options.cwd === undefined ? {} : { cwd: options.cwd }), stdio: ['ignore', 'inherit', 'inherit'] });
  try {
    const qmp = new Qmp(await connect(qmpPath));
    await qmp.execute('qmp_capabilities');
    return await use(qmp);
  } finally {
    if (qemu.exitCode === null) qemu.kill('SIGKILL');
  }
}

/** Poll query-migrate (every 100 ms, 30 s at most) until the migration ends; its final answer, or a throw unless completed. */
export async function migrationEnded(qmp: Qmp, name: string): Promise<any> {
  let info: any;
  for (let i = 0; i < 300; i++) {
    info = await qmp.execute('query-migrate');
    if (info.status === 'completed' || info.status === 'failed') break;
    await new Promise((r) => setTimeout(r, 100));
  }
  if (info.status !== 'completed') throw new Error(`${name}: migration ${info.status}: ${info['error-desc'] ?? ''}`);
  return info;
}
