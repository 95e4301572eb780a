// Postcopy helpers for e2e/postcopy.test.ts (wire-format.md §§7.2–7.3, 8): a postcopy pair of
// livemig processes, bounded waits on both sides, recovery, and an in-process TCP proxy that can
// freeze a link without closing it (what a dead router or a pulled cable looks like to TCP).

import assert from 'node:assert/strict';
import { readdirSync, readFileSync } from 'node:fs';
import net from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { digest, type GuestDigest, type MigrationInfo, MiB, queryStatus, setCapabilities, waitForMigration, waitForStatus } from './migration.ts';
import { type Child, type Harness, unusedPort, within } from './processes.ts';

/** Destination query-migrate in postcopy: QEMU's blocktime figures plus livemig's fault latency. */
export interface DestinationPostcopyInfo extends MigrationInfo {
  'postcopy-blocktime'?: number;
  'postcopy-vcpu-blocktime'?: number[];
  /** Mean fault latency, ns. */
  'postcopy-latency'?: number;
  /** Fault latency histogram: bucket i counts faults of [2^i, 2^(i+1)) µs. */
  'postcopy-latency-dist'?: number[];
  'postcopy-faults'?: number;
  /** livemig: pages placed from the preempt channel. */
  'x-postcopy-preempt-pages'?: number;
  /** livemig: pages this side asked for. */
  'x-postcopy-request-pages'?: number;
  /** livemig: pages the vCPUs accessed from RUN to the end of postcopy. */
  'x-postcopy-guest-accesses'?: number;
}

/**
 * Parameters under which precopy does not converge (a 1 ms downtime-limit) and the background
 * postcopy transfer is slow enough for the destination's vCPUs to fault on pages not yet sent.
 */
export const SLOW_POSTCOPY = {
  'max-bandwidth': 16 * MiB,
  'downtime-limit': 1,
  'max-postcopy-bandwidth': 4 * MiB,
} as const;

export interface PostcopyPairOptions {
  /** Guest flags for both sides (-m, --workload, ...). */
  guest: string[];
  /** Destination -S: the guest stays paused after the switchover (nothing faults). */
  paused?: boolean;
  /** Source parameters set over QMP before migrating (default SLOW_POSTCOPY). */
  parameters?: Record<string, number>;
  /** Capability postcopy-preempt on both sides (requested pages on a second connection). */
  preempt?: boolean;
  /** More flags for both processes (after the guest flags). */
  args?: string[];
}

/**
 * A destination listening on tcp:127.0.0.1:0 with --capabilities postcopy-ram,events, and a
 * source with the same capabilities and `parameters` set over QMP (as QEMU's tests set them).
 */
export async function postcopyPair(h: Harness, o: PostcopyPairOptions): Promise<{ src: Child; dst: Child & { incomingUri: string } }> {
  const caps = o.preempt === true ? ['postcopy-ram', 'postcopy-preempt', 'events'] : ['postcopy-ram', 'events'];
  const args = o.args ?? [];
  const dst = await h.destination({ incoming: 'tcp', paused: o.paused === true, guest: o.guest, capabilities: caps, args });
  const src = await h.source({ guest: o.guest, args });
  await setCapabilities(src, caps);
  await src.execute('migrate-set-parameters', o.parameters ?? SLOW_POSTCOPY);
  return { src, dst };
}

/**
 * migrate to `uri`, let precopy send for `precopyMs` (at least one byte must have gone), then
 * migrate-start-postcopy; resolves once both sides report postcopy-active.
 */
export async function migrateIntoPostcopy(src: Child, dst: Child, uri: string, { precopyMs = 500 }: { precopyMs?: number } = {}): Promise<void> {
  await src.execute('migrate', { uri });
  await waitForMigration(src, (i) => i.status === 'active' && (i.ram?.transferred ?? 0) > 0, 'precopy active with bytes sent', { timeoutMs: 15_000 });
  await sleep(precopyMs);
  assert.equal((await src.execute<MigrationInfo>('query-migrate')).status, 'active', 'precopy alone has not converged');
  assert.deepEqual(await src.execute('migrate-start-postcopy'), {});
  await waitForStatus(src, ['postcopy-active', 'completed'], { timeoutMs: 15_000 });
  await waitForStatus(dst, ['postcopy-active', 'completed'], { timeoutMs: 15_000 });
}

/** Both sides in postcopy-paused within `timeoutMs` (measured from the call). */
export async function waitBothPaused(src: Child, dst: Child, timeoutMs = 6_000): Promise<{ src: MigrationInfo; dst: MigrationInfo }> {
  const [s, d] = await Promise.all([
    waitForStatus(src, 'postcopy-paused', { timeoutMs }),
    waitForStatus(dst, 'postcopy-paused', { timeoutMs }),
  ]);
  return { src: s, dst: d };
}

/**
 * Recovery over a fresh port (or `via`, e.g. a proxy in front of that port): destination
 * migrate-recover (exec-oob, as management tools send it), source migrate resume=true.
 * Returns the destination's recovery address.
 */
export async function recover(src: Child, dst: Child, { via }: { via?: (recoverUri: string) => Promise<string> } = {}): Promise<string> {
  const recoverUri = `tcp:127.0.0.1:${await unusedPort()}`;
  assert.deepEqual(await dst.qmp.execute('migrate-recover', { uri: recoverUri }, { oob: true, timeoutMs: 10_000 }), {});
  const resumeUri = via === undefined ? recoverUri : await via(recoverUri);
  assert.deepEqual(await src.execute('migrate', { uri: resumeUri, resume: true }), {});
  return recoverUri;
}

/** The `n`-th MIGRATION event with `status` on `c` (bounded; events are recorded, so no race). */
export async function waitForNthMigrationEvent(c: Child, status: string, n: number, timeoutMs = 6_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const seen = c.migrationEvents().filter((s) => s === status).length;
    if (seen >= n) return;
    if (Date.now() > deadline) throw new Error(`${c.name}: ${seen} of ${n} MIGRATION ${status} events within ${timeoutMs} ms: ${JSON.stringify(c.migrationEvents())}`);
    await sleep(20);
  }
}

/** Both sides completed (bounded); returns the final query-migrate of each. */
export async function waitBothCompleted(src: Child, dst: Child, timeoutMs = 60_000): Promise<{ src: MigrationInfo; dst: DestinationPostcopyInfo }> {
  const s = await waitForStatus(src, 'completed', { timeoutMs });
  const d = await waitForStatus(dst, 'completed', { timeoutMs: 10_000 });
  return { src: s, dst: d as DestinationPostcopyInfo };
}

/**
 * `stop` the destination guest, then its incrementer pattern must be consistent: every page
 * holds what an uninterrupted run would have written (no page lost, none stale).
 */
export async function stopAndCheckPattern(dst: Child): Promise<GuestDigest> {
  await dst.execute('stop');
  assert.equal(await queryStatus(dst), 'paused');
  const d = await digest(dst);
  assert.equal(d.pattern.consistent, true, `incrementer pattern on the destination: ${JSON.stringify(d.pattern)}`);
  return d;
}

/** `p` rejects with a QMP error reply of class `qmpClass` whose desc matches `desc`. */
export async function assertQmpError(p: Promise<unknown>, desc: RegExp, qmpClass = 'GenericError'): Promise<void> {
  await assert.rejects(p, (err: Error & { qmpClass?: string; desc?: string }) => {
    assert.equal(err.qmpClass, qmpClass, `error class of ${err.message}`);
    assert.match(err.desc ?? '', desc);
    return true;
  });
}

export interface ProxyPair {
  client: net.Socket;
  upstream: net.Socket;
}

/**
 * A TCP proxy on 127.0.0.1:0 forwarding every accepted connection to `target`
 * (tcp:HOST:PORT), both directions, with backpressure.
 *
 *   freeze()        stop forwarding and pause both sockets of every connection *without closing
 *                   them*: neither end sees an error or EOF, TCP just goes quiet.
 *   dropReplies()   keep forwarding client → target, drop everything target → client.
 *   delayReplies(ms) deliver target → client `ms` late.
 *   cut()           destroy both sockets of every connection (each end sees the close).
 *   freezeAfter(n)  freeze() once `n` bytes have gone client → target (a point in the stream
 *                   reached without polling, e.g. inside a long stop-and-copy).
 *   cutBefore(b)    forward client → target up to the first occurrence of the bytes `b`, then
 *                   cut(): the client has written `b` and more, the target never sees it.
 *   freezeBefore(b) as cutBefore, but freeze() instead of cut(): a point in the stream held.
 *   thaw()          undo freeze(): forward again (what was held back is delivered).
 *   reset()         destroy both sockets of every connection with a TCP RST (each end sees ECONNRESET).
 *   garbleNext(n)   the next `n` bytes client → target become 0xff (a corrupting middlebox:
 *                   record headers in them turn into flags and lengths no stream has).
 *   onAccept(f)     call `f` for each connection as it is accepted, before any byte is forwarded.
 *   close()         cut() and stop listening (call it in finally).
 */
export class TcpProxy {
  readonly #server: net.Server;
  readonly #target: { host: string; port: number };
  readonly pairs: ProxyPair[] = [];
  #frozen = false;
  #dropReplies = false;
  #delayReplies = 0;
  /** cutBefore(): the byte pattern, the last bytes seen client → target (a match may straddle chunks). */
  #cutPattern: Buffer | undefined;
  /** What happens at #cutPattern: cut (cutBefore) or freeze (freezeBefore). */
  #atPattern: 'cut' | 'freeze' = 'cut';
  #garble = 0;
  #onAccept: ((pair: ProxyPair) => void) | undefined;
  #freezeAfterUp = Infinity;
  #upTail = Buffer.alloc(0);
  /** Bytes read while a freezeBefore() pattern froze the link, delivered by thaw(). */
  #held: { to: net.Socket; chunk: Buffer; dir: 'up' | 'down' }[] = [];
  /** Bytes forwarded client → target and target → client. */
  forwarded = { up: 0, down: 0 };

  private constructor(server: net.Server, target: { host: string; port: number }) {
    this.#server = server;
    this.#target = target;
  }

  static async start(target: string): Promise<TcpProxy> {
    const m = /^tcp:([^:]+):(\d+)$/.exec(target);
    if (m === null) throw new Error(`TcpProxy: not a tcp:HOST:PORT address: ${target}`);
    const server = net.createServer();
    const proxy = new TcpProxy(server, { host: m[1]!, port: Number(m[2]) });
    server.on('connection', (c) => proxy.#accept(c));
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(0, '127.0.0.1', () => resolve());
    });
    return proxy;
  }

  /** True while nothing is forwarded (freeze(), or a freezeAfter / freezeBefore point reached). */
  get frozen(): boolean {
    return this.#frozen;
  }

  get port(): number {
    return (this.#server.address() as net.AddressInfo).port;
  }

  get uri(): string {
    return `tcp:127.0.0.1:${this.port}`;
  }

  #accept(client: net.Socket): void {
    const upstream = net.connect(this.#target.port, this.#target.host);
    this.pairs.push({ client, upstream });
    // Both sockets of a pair exist (and have error listeners, below) before a hook may fault them.
    const hook = this.#onAccept;
    if (hook !== undefined) setImmediate(() => hook({ client, upstream }));
    const forward = (from: net.Socket, to: net.Socket, dir: 'up' | 'down'): void => {
      from.on('data', (chunk: Buffer) => {
        if (this.#frozen) {
          // Paused sockets may still deliver a chunk already read: kept for thaw().
          this.#held.push({ to, chunk, dir });
          return;
        }
        if (dir === 'down' && this.#dropReplies) return;
        if (dir === 'up' && this.#cutPattern !== undefined) {
          const pattern = this.#cutPattern;
          const seen = Buffer.concat([this.#upTail, chunk]);
          const at = seen.indexOf(pattern);
          if (at >= 0) {
            // Deliver what came before the pattern, then break (or freeze) every connection.
            this.#cutPattern = undefined;
            this.#frozen = true;
            const before = chunk.subarray(0, Math.max(0, at - this.#upTail.length));
            this.forwarded.up += before.length;
            if (this.#atPattern === 'cut') {
              to.write(before, () => this.cut());
            } else {
              to.write(before);
              this.#held.push({ to, chunk: chunk.subarray(before.length), dir });
              this.freeze();
            }
            return;
          }
          this.#upTail = seen.subarray(Math.max(0, seen.length - pattern.length + 1));
        }
        if (dir === 'up' && this.#garble > 0) {
          const n = Math.min(this.#garble, chunk.length);
          chunk.fill(0xff, 0, n);
          this.#garble -= n;
        }
        this.forwarded[dir] += chunk.length;
        if (dir === 'up' && this.forwarded.up >= this.#freezeAfterUp) {
          // This chunk goes through; nothing after it.
          to.write(chunk);
          this.freeze();
          return;
        }
        if (dir === 'down' && this.#delayReplies > 0) {
          // Same delay for every chunk: timers fire in order, so the byte order holds.
          setTimeout(() => {
            if (!this.#frozen && !to.destroyed) to.write(chunk);
          }, this.#delayReplies);
          return;
        }
        if (!to.write(chunk)) from.pause();
      });
      to.on('drain', () => {
        if (!this.#frozen) from.resume();
      });
    };
    if (this.#frozen) {
      client.pause();
      upstream.pause();
    }
    forward(client, upstream, 'up');
    forward(upstream, client, 'down');
    for (const s of [client, upstream]) s.on('error', () => {});
    // A close is passed on as an end (what was already forwarded is still delivered first),
    // after the reply delay for the target's close; a frozen link passes nothing on.
    client.on('close', () => {
      if (!this.#frozen) upstream.end();
    });
    upstream.on('close', () => {
      if (this.#frozen) return;
      if (this.#delayReplies > 0) setTimeout(() => client.end(), this.#delayReplies);
      else client.end();
    });
  }

  /** Resolves once `n` connections were accepted (bounded). */
  async waitForConnections(n = 1, timeoutMs = 10_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (this.pairs.length < n) {
      if (Date.now() > deadline) throw new Error(`TcpProxy: ${this.pairs.length} of ${n} connections within ${timeoutMs} ms`);
      await sleep(10);
    }
  }

  freeze(): void {
    this.#frozen = true;
    for (const { client, upstream } of this.pairs) {
      client.pause();
      upstream.pause();
    }
  }

  dropReplies(): void {
    this.#dropReplies = true;
  }

  /** Deliver everything target → client `ms` late (a slow return path). */
  delayReplies(ms: number): void {
    this.#delayReplies = ms;
  }

  freezeAfter(bytesUp: number): void {
    this.#freezeAfterUp = bytesUp;
  }

  cutBefore(pattern: Buffer): void {
    this.#cutPattern = pattern;
    this.#atPattern = 'cut';
  }

  freezeBefore(pattern: Buffer): void {
    this.#cutPattern = pattern;
    this.#atPattern = 'freeze';
  }

  thaw(): void {
    this.#frozen = false;
    this.#freezeAfterUp = Infinity;
    for (const { to, chunk, dir } of this.#held.splice(0)) {
      if (to.destroyed) continue;
      if (dir === 'down') {
        this.forwarded.down += chunk.length;
        to.write(chunk);
        continue;
      }
      if (this.#garble > 0) {
        const n = Math.min(this.#garble, chunk.length);
        chunk.fill(0xff, 0, n);
        this.#garble -= n;
      }
      this.forwarded.up += chunk.length;
      to.write(chunk);
    }
    for (const { client, upstream } of this.pairs) {
      client.resume();
      upstream.resume();
    }
  }

  reset(): void {
    for (const { client, upstream } of this.pairs) {
      client.resetAndDestroy();
      upstream.resetAndDestroy();
    }
  }

  garbleNext(bytes: number): void {
    this.#garble = bytes;
  }

  onAccept(hook: (pair: ProxyPair) => void): void {
    this.#onAccept = hook;
  }

  cut(): void {
    for (const { client, upstream } of this.pairs) {
      client.destroy();
      upstream.destroy();
    }
  }

  async close(): Promise<void> {
    this.cut();
    await within(new Promise<void>((resolve) => this.#server.close(() => resolve())), 'TcpProxy close', 2_000).catch(() => {});
  }
}

/**
 * The threads of process `pid` under SCHED_FIFO, with their real-time priorities, from
 * /proc/PID/task/TID/stat (fields 40 and 41: rt_priority, policy).
 */
export function fifoThreads(pid: number): { tid: number; priority: number }[] {
  const out: { tid: number; priority: number }[] = [];
  for (const tid of readdirSync(`/proc/${pid}/task`)) {
    let stat: string;
    try {
      stat = readFileSync(`/proc/${pid}/task/${tid}/stat`, 'utf8');
    } catch {
      continue; // the thread ended meanwhile
    }
    // Fields after the command name (which may hold spaces), from field 3 on.
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    const priority = Number(fields[40 - 3]);
    const policy = Number(fields[41 - 3]);
    if (policy === 1) out.push({ tid: Number(tid), priority });
  }
  return out;
}
