// Thread helpers that worker threads load on their own (vCPUs, the fault and page server
// threads): scheduling priority, and waiting on a shared word without blocking. Nothing here
// imports more than Node's built-ins, so a worker starts without the protocol package.

import { execFileSync } from 'node:child_process';
import { readlinkSync } from 'node:fs';
import { setPriority } from 'node:os';

/** Atomics.waitAsync (Node 20 has it; the es2023 lib does not declare it). */
const waitAsync = (
  Atomics as unknown as {
    waitAsync(a: Int32Array, i: number, v: number, t: number): { async: boolean; value: Promise<string> | string };
  }
).waitAsync;

/**
 * Atomics.wait without blocking the thread: resolves with its result ('ok', 'not-equal' or
 * 'timed-out') once `array[index]` is no longer `value` and was notified, or after `timeoutMs`.
 */
export async function waitOnWord(array: Int32Array, index: number, value: number, timeoutMs: number): Promise<string> {
  const r = waitAsync(array, index, value, timeoutMs);
  return r.async ? await r.value : (r.value as string);
}

/** The nice value latency-critical threads ask for (postcopy's fault and page server threads). */
export const LATENCY_NICE = -10;

/**
 * SCHED_FIFO priorities under --realtime-postcopy. The fault and page server threads outrank the
 * vCPUs, so a vCPU that runs flat out never keeps them from serving its next fault.
 */
export const REALTIME_SERVICE_PRIORITY = 2;
export const REALTIME_VCPU_PRIORITY = 1;

/**
 * Ask for LATENCY_NICE for the calling thread (on Linux a thread has its own nice value), so it
 * runs ahead of a busy main thread, and with `realtime` for SCHED_FIFO at
 * REALTIME_SERVICE_PRIORITY. Only a privileged process (CAP_SYS_NICE) gets either; returns
 * whether what was asked for took effect. Elsewhere the thread keeps the normal priority.
 */
export function raiseThreadPriority(realtime = false): boolean {
  let ok = true;
  try {
    setPriority(0, LATENCY_NICE);
  } catch {
    ok = false;
  }
  if (realtime) ok = setThreadRealtime(REALTIME_SERVICE_PRIORITY);
  return ok;
}

/**
 * Put the calling thread under SCHED_FIFO at `priority`, or back under the normal policy
 * (`priority` 0). Node has no sched_setscheduler, so chrt (util-linux) does it for the thread's
 * id, once per change. Real time needs CAP_SYS_NICE (or an RLIMIT_RTPRIO allowance); going back
 * never does. Returns whether it took effect.
 */
export function setThreadRealtime(priority: number): boolean {
  try {
    const tid = readlinkSync('/proc/thread-self').split('/').pop()!;
    const args = priority > 0 ? ['--fifo', '--pid', String(priority), tid] : ['--other', '--pid', '0', tid];
    execFileSync('chrt', args, { stdio: 'ignore', timeout: 5_000 });
    return true;
  } catch {
    return false;
  }
}
