// Two "hosts" for e2e/wan.test.ts: two network namespaces, each with one TUN device, joined by
// wan-link.py (a process in the root namespace that moves IP packets between the two TUNs with a
// one-way delay, seeded random loss, a line rate and a drop-tail queue).
//
// Why not veth + netem: this kernel has no netem qdisc ("Specified qdisc kind is unknown", no
// module, no modprobe), and tbf alone shapes rate but cannot delay or drop at random. TUN works
// (/dev/net/tun), so the link is emulated at packet level and TCP between the namespaces really
// sees the RTT and the losses (it retransmits; `nstat` in a namespace shows it).
//
// Names are private to one run (pid + counter), and close() removes everything it made whatever
// happened: the forwarder is killed by its pid, the namespaces deleted (their TUNs with them).

import { type ChildProcess, execFile, spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { within } from './processes.ts';

const FORWARDER = fileURLToPath(new URL('./wan-link.py', import.meta.url));
const IP_WAIT_MS = 10_000;

export interface WanOptions {
  /** One-way delay, ms (the RTT is twice this). */
  delayMs: number;
  /** Probability of losing each packet, each direction. */
  loss: number;
  /** Line rate, bits per second. */
  rateBps: number;
  /** Loss sequence seed. */
  seed: number;
  /** Drop-tail queue per direction, bytes (default 1 MiB). */
  queueBytes?: number;
}

function run(file: string, args: string[]): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile(file, args, { timeout: IP_WAIT_MS, killSignal: 'SIGKILL' }, (err, stdout, stderr) => {
      if (err !== null) reject(new Error(`${file} ${args.join(' ')}: ${stderr.trim() || err.message}`));
      else resolve(stdout);
    });
  });
}

/** Why two-host tests cannot run here (undefined when they can). Under CI=true the caller fails instead. */
export async function wanUnavailable(): Promise<string | undefined> {
  if (process.getuid?.() !== 0) return 'needs root (network namespaces and TUN devices)';
  if (!existsSync('/dev/net/tun')) return 'no /dev/net/tun';
  try {
    await run('ip', ['netns', 'list']);
  } catch (err) {
    return `ip netns does not work here: ${(err as Error).message}`;
  }
  try {
    await run('python3', ['-c', 'import fcntl, select']);
  } catch {
    return 'no python3 for the packet forwarder';
  }
  return undefined;
}

let runCount = 0;

export class WanLink {
  /** The namespaces: a holds the source, b the destination. */
  readonly nsA: string;
  readonly nsB: string;
  readonly addressA: string;
  readonly addressB: string;
  readonly #tunA: string;
  readonly #tunB: string;
  #forwarder: ChildProcess | undefined;
  #output = '';
  #created: string[] = [];

  private constructor() {
    runCount++;
    const id = `${process.pid % 100000}${runCount}`;
    // Interface names are at most 15 bytes.
    this.nsA = `lm-wan-a-${id}`;
    this.nsB = `lm-wan-b-${id}`;
    this.#tunA = `lmwa${id}`;
    this.#tunB = `lmwb${id}`;
    const subnet = 16 + ((process.pid + runCount) % 200);
    this.addressA = `10.213.${subnet}.1`;
    this.addressB = `10.213.${subnet}.2`;
  }

  /** Namespaces, TUNs, addresses and the forwarder; on any failure what was made is removed. */
  static async create(o: WanOptions): Promise<WanLink> {
    const w = new WanLink();
    try {
      await w.#setUp(o);
      return w;
    } catch (err) {
      await w.close();
      throw err;
    }
  }

  async #setUp(o: WanOptions): Promise<void> {
    const proc = spawn(
      'python3',
      [
        FORWARDER,
        this.#tunA,
        this.#tunB,
        '--delay-ms', String(o.delayMs),
        '--loss', String(o.loss),
        '--rate-bps', String(o.rateBps),
        '--queue-bytes', String(o.queueBytes ?? 2 ** 20),
        '--seed', String(o.seed),
      ],
      { stdio: ['pipe', 'pipe', 'pipe'] },
    );
    this.#forwarder = proc;
    proc.stdout!.on('data', (c: Buffer) => (this.#output += c.toString()));
    proc.stderr!.on('data', (c: Buffer) => (this.#output += c.toString()));
    proc.stdin!.on('error', () => {});
    await within(
      new Promise<void>((resolve, reject) => {
        const check = (): void => {
          if (this.#output.includes('ready\n')) resolve();
        };
        proc.stdout!.on('data', check);
        proc.once('exit', (code) => reject(new Error(`wan-link.py exited ${code}: ${this.#output}`)));
      }),
      'the WAN forwarder to create its TUN devices',
      IP_WAIT_MS,
    );
    for (const [ns, tun, address] of [[this.nsA, this.#tunA, this.addressA], [this.nsB, this.#tunB, this.addressB]] as const) {
      await run('ip', ['netns', 'add', ns]);
      this.#created.push(ns);
      await run('ip', ['link', 'set', tun, 'netns', ns]);
      await run('ip', ['-n', ns, 'addr', 'add', `${address}/24`, 'dev', tun]);
      await run('ip', ['-n', ns, 'link', 'set', tun, 'up']);
      await run('ip', ['-n', ns, 'link', 'set', 'lo', 'up']);
    }
  }

  /** Stop forwarding: every packet dropped, nothing closes (a dead router). */
  down(): void {
    this.#forwarder?.stdin?.write('down\n');
  }

  up(): void {
    this.#forwarder?.stdin?.write('up\n');
  }

  /** The forwarder's counters per direction ([a→b, b→a]). */
  async stats(): Promise<{ forwarded: number[]; lost: number[]; queue_drops: number[]; blackholed: number[]; bytes: number[] }> {
    const before = this.#output.length;
    this.#forwarder?.stdin?.write('stats\n');
    const line = await within(
      (async () => {
        for (;;) {
          const nl = this.#output.indexOf('\n', before);
          if (nl >= 0) return this.#output.slice(before, nl);
          await new Promise((r) => setTimeout(r, 20));
        }
      })(),
      'the WAN forwarder\'s counters',
      5_000,
    );
    return JSON.parse(line);
  }

  /** TCP retransmissions counted in namespace `ns` (the kernel's TcpRetransSegs). */
  async retransmits(ns: string): Promise<number> {
    const snmp = await run('ip', ['netns', 'exec', ns, 'cat', '/proc/net/snmp']);
    const lines = snmp.split('\n').filter((l) => l.startsWith('Tcp:'));
    const names = lines[0]!.split(/\s+/);
    const values = lines[1]!.split(/\s+/);
    return Number(values[names.indexOf('RetransSegs')]);
  }

  /** Kill the forwarder by pid, delete the namespaces (their TUNs go with them). Never throws. */
  async close(): Promise<void> {
    const f = this.#forwarder;
    if (f !== undefined && f.exitCode === null && f.signalCode === null && f.pid !== undefined) {
      const exited = new Promise<void>((resolve) => f.once('exit', () => resolve()));
      try {
        process.kill(f.pid, 'SIGKILL');
      } catch {
        // already gone
      }
      await within(exited, 'the WAN forwarder to exit', 3_000).catch(() => {});
    }
    for (const ns of this.#created.reverse()) await run('ip', ['netns', 'del', ns]).catch(() => {});
    this.#created = [];
  }
}
