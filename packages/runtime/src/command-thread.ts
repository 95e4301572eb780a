// The main thread's side of a worker thread it sends commands to and hears messages from: a
// command's answer is awaited with a bound, and the thread's end is noticed.

import { fileURLToPath } from 'node:url';
import { Worker } from 'node:worker_threads';

export class CommandThread<C, M extends { kind: string }> {
  private readonly worker: Worker;
  /** The thread has ended (stopped, or it failed). */
  exited = false;
  private readonly waiters = new Set<(m: M | undefined) => void>();

  /**
   * Start `url` (a compiled worker module) with `workerData`. `onMessage` sees every message,
   * `onError` a failure of the thread. The thread does not keep the process alive.
   */
  constructor(url: URL, workerData: unknown, onMessage: (m: M) => void, onError: (err: Error) => void) {
    this.worker = new Worker(fileURLToPath(url), { workerData });
    this.worker.unref();
    this.worker.on('message', (m: M) => {
      onMessage(m);
      for (const w of this.waiters) w(m);
    });
    this.worker.on('error', onError);
    this.worker.on('exit', () => {
      this.exited = true;
      for (const w of this.waiters) w(undefined);
    });
  }

  /** Send a command (an ended thread gets nothing). */
  post(command: C): void {
    if (!this.exited) this.worker.postMessage(command);
  }

  /** True on the first message of one of `kinds`; false if the thread ends first or `timeoutMs` passes. */
  waitFor(kinds: readonly M['kind'][], timeoutMs: number): Promise<boolean> {
    if (this.exited) return Promise.resolve(false);
    return new Promise((resolve) => {
      const done = (m: M | undefined): void => {
        if (m !== undefined && !kinds.includes(m.kind)) return;
        this.waiters.delete(done);
        clearTimeout(timer);
        resolve(m !== undefined);
      };
      const timer = setTimeout(() => done(undefined), timeoutMs);
      this.waiters.add(done);
    });
  }

  /** Post `command` and wait for its answer `answer` (see waitFor). */
  ask(command: C, answer: M['kind'], timeoutMs: number): Promise<boolean> {
    const answered = this.waitFor([answer], timeoutMs);
    this.post(command);
    return answered;
  }

  async stop(): Promise<void> {
    await this.worker.terminate();
  }
}
