// Migration capabilities and parameters as QMP speaks them (wire-format.md §11.3, §11.4):
// QEMU 7.2's names, order and defaults, with QEMU's validation ranges.

import { CONVERGENCE_LAST_STEPS, type ConvergenceLastStep } from './convergence-policy.ts';

/** QAPI MigrationStatus (wire-format.md §8): the strings query-migrate and MIGRATION events use. */
export type MigrationStatus =
  | 'none'
  | 'setup'
  | 'cancelling'
  | 'cancelled'
  | 'active'
  | 'postcopy-active'
  | 'postcopy-paused'
  | 'postcopy-recover'
  | 'completed'
  | 'failed'
  | 'colo'
  | 'pre-switchover'
  | 'device'
  | 'wait-unplug';

export const CAPABILITIES = [
  'xbzrle',
  'rdma-pin-all',
  'auto-converge',
  'zero-blocks',
  'compress',
  'events',
  'postcopy-ram',
  'x-colo',
  'release-ram',
  'block',
  'return-path',
  'pause-before-switchover',
  'multifd',
  'dirty-bitmaps',
  'postcopy-blocktime',
  'late-block-activate',
  'x-ignore-shared',
  'validate-uuid',
  'background-snapshot',
  'zero-copy-send',
  'postcopy-preempt',
  // QEMU 8.1+: the destination acknowledges on the return path before the source switches over.
  'switchover-ack',
  // QEMU 9.0+: the file layout with each page at a fixed offset (written and read by livemig).
  'mapped-ram',
] as const;

export type Capability = (typeof CAPABILITIES)[number];

/** Capabilities livemig implements; setting another one on is refused with a clear error. */
export const SUPPORTED_CAPABILITIES: ReadonlySet<Capability> = new Set<Capability>([
  'xbzrle',
  'auto-converge',
  'events',
  'return-path',
  'postcopy-ram',
  'postcopy-blocktime',
  'postcopy-preempt',
  'late-block-activate',
  'validate-uuid',
  'pause-before-switchover',
  'multifd',
  'switchover-ack',
  'mapped-ram',
]);

export type Capabilities = Record<Capability, boolean>;

export function defaultCapabilities(): Capabilities {
  return Object.fromEntries(CAPABILITIES.map((c) => [c, false])) as Capabilities;
}

/**
 * QAPI MigMode (QEMU 10.0 has normal, cpr-reboot and cpr-transfer; later QEMUs add cpr-exec).
 * livemig implements normal and cpr-exec.
 */
export const MIG_MODES = ['normal', 'cpr-reboot', 'cpr-transfer', 'cpr-exec'] as const;
export type MigMode = (typeof MIG_MODES)[number];
const SUPPORTED_MIG_MODES: readonly MigMode[] = ['normal', 'cpr-exec'];

export interface MigrationParameters {
  'announce-initial': number;
  'announce-max': number;
  'announce-rounds': number;
  'announce-step': number;
  'compress-level': number;
  'compress-threads': number;
  'compress-wait-thread': boolean;
  'decompress-threads': number;
  'throttle-trigger-threshold': number;
  'cpu-throttle-initial': number;
  'cpu-throttle-increment': number;
  'cpu-throttle-tailslow': boolean;
  'tls-creds': string;
  'tls-hostname': string;
  'tls-authz': string;
  /** Bytes per second; 0 = unlimited. */
  'max-bandwidth': number;
  /** Milliseconds. */
  'downtime-limit': number;
  'x-checkpoint-delay': number;
  'block-incremental': boolean;
  'multifd-channels': number;
  /** Bytes, a power of two ≥ one page. */
  'xbzrle-cache-size': number;
  /** Bytes per second in postcopy; 0 = unlimited. */
  'max-postcopy-bandwidth': number;
  'max-cpu-throttle': number;
  'multifd-compression': string;
  'multifd-zlib-level': number;
  'multifd-zstd-level': number;
  /**
   * livemig: milliseconds a precopy migration may go without progress (a return-path byte, or
   * bytes the kernel took on a migration connection) before it fails with LM_ERR_PEER_SILENT and
   * the source guest runs again; the destination fails a stream silent this long.
   */
  'x-livemig-stall-timeout': number;
  /**
   * livemig, destination: milliseconds a connection to the incoming port has to send the stream
   * header before it is dropped (the port stays open for the real source).
   */
  'x-livemig-handshake-timeout': number;
  /**
   * livemig, source (convergence policy, README "Convergence policy"): milliseconds without a new
   * minimum of the remaining bytes before the policy takes its next step; 0 = off.
   */
  'x-livemig-no-progress-timeout': number;
  /** livemig, source: milliseconds per GiB of guest RAM the migration may take before the policy's last step; 0 = off. */
  'x-livemig-completion-timeout-per-gib': number;
  /** livemig, source: milliseconds the policy adds to downtime-limit at each step; 0 = no stepping. */
  'x-livemig-downtime-limit-step': number;
  /** livemig, source: the policy never steps downtime-limit above this (ms). */
  'x-livemig-downtime-limit-max': number;
  /** livemig, source: the policy's last step: none, postcopy (needs postcopy-ram) or cancel. */
  'x-livemig-convergence-last-step': ConvergenceLastStep;
  /**
   * cpr-exec: `migrate` to a file: saves device state (RAM stays in shared memory, not copied),
   * then this process execs `cpr-exec-command`, whose new image loads it and runs the guest on.
   */
  mode: MigMode;
  /** cpr-exec: the new image's argv (argv[0] is the program, looked up in PATH when it has no slash). */
  'cpr-exec-command': string[];
}

/**
 * Default of x-livemig-stall-timeout: well above a healthy link's longest quiet stretch (a
 * rate-limit sleep, a 50 ms section, a destination starting its guest), short enough that a dead
 * link gives the source guest back within seconds.
 */
export const DEFAULT_STALL_TIMEOUT_MS = 5_000;

export function defaultParameters(): MigrationParameters {
  return {
    'announce-initial': 50,
    'announce-max': 550,
    'announce-rounds': 5,
    'announce-step': 100,
    'compress-level': 1,
    'compress-threads': 8,
    'compress-wait-thread': true,
    'decompress-threads': 2,
    'throttle-trigger-threshold': 50,
    'cpu-throttle-initial': 20,
    'cpu-throttle-increment': 10,
    'cpu-throttle-tailslow': false,
    'tls-creds': '',
    'tls-hostname': '',
    'tls-authz': '',
    'max-bandwidth': 134217728,
    'downtime-limit': 300,
    'x-checkpoint-delay': 20000,
    'block-incremental': false,
    'multifd-channels': 2,
    'xbzrle-cache-size': 67108864,
    'max-postcopy-bandwidth': 0,
    'max-cpu-throttle': 99,
    'multifd-compression': 'none',
    'multifd-zlib-level': 1,
    'multifd-zstd-level': 1,
    'x-livemig-stall-timeout': DEFAULT_STALL_TIMEOUT_MS,
    'x-livemig-handshake-timeout': 5_000,
    // The convergence policy is off unless a timeout is set.
    'x-livemig-no-progress-timeout': 0,
    'x-livemig-completion-timeout-per-gib': 0,
    'x-livemig-downtime-limit-step': 0,
    'x-livemig-downtime-limit-max': 2_000,
    'x-livemig-convergence-last-step': 'none',
    mode: 'normal',
    'cpr-exec-command': [],
  };
}

/** An invalid QMP argument; the message is what QEMU users expect to read. */
export class ParameterError extends Error {
  readonly code = 'LM_ERR_BAD_PARAMETER';
}

type Range = readonly [number, number];
const INT_RANGES: Partial<Record<keyof MigrationParameters, Range>> = {
  'announce-initial': [1, 100000],
  'announce-max': [1, 100000],
  'announce-rounds': [1, 1000],
  'announce-step': [1, 10000],
  'compress-level': [0, 9],
  'compress-threads': [1, 255],
  'decompress-threads': [1, 255],
  'throttle-trigger-threshold': [1, 100],
  'cpu-throttle-initial': [1, 99],
  'cpu-throttle-increment': [1, 99],
  'max-bandwidth': [0, Number.MAX_SAFE_INTEGER],
  'downtime-limit': [0, 2000000],
  'x-checkpoint-delay': [0, Number.MAX_SAFE_INTEGER],
  'multifd-channels': [1, 255],
  'xbzrle-cache-size': [4096, Number.MAX_SAFE_INTEGER],
  'max-postcopy-bandwidth': [0, Number.MAX_SAFE_INTEGER],
  'max-cpu-throttle': [1, 99],
  'multifd-zlib-level': [0, 9],
  'multifd-zstd-level': [0, 20],
  // Below a few keepalive intervals (500 ms) a busy but healthy link would trip it.
  'x-livemig-stall-timeout': [1000, 3_600_000],
  'x-livemig-handshake-timeout': [100, 3_600_000],
  'x-livemig-no-progress-timeout': [0, 86_400_000],
  'x-livemig-completion-timeout-per-gib': [0, 86_400_000],
  'x-livemig-downtime-limit-step': [0, 2000000],
  'x-livemig-downtime-limit-max': [0, 2000000],
};

/**
 * Apply `migrate-set-parameters` arguments to a copy of `current`, validated as QEMU does.
 * Returns the new parameters; throws ParameterError naming the first bad one.
 */
export function applyParameters(current: MigrationParameters, args: Record<string, unknown>): MigrationParameters {
  const next = { ...current } as Record<string, unknown>;
  for (const [name, value] of Object.entries(args)) {
    if (!(name in current)) throw new ParameterError(`Parameter '${name}' is unexpected`);
    if (name === 'mode') {
      if (typeof value !== 'string' || !(MIG_MODES as readonly string[]).includes(value)) {
        throw new ParameterError(`Parameter 'mode' does not accept value '${String(value)}'`);
      }
      if (!SUPPORTED_MIG_MODES.includes(value as MigMode)) throw new ParameterError(`Mode '${value}' is not supported by livemig (${SUPPORTED_MIG_MODES.join(', ')})`);
      next[name] = value;
      continue;
    }
    if (name === 'x-livemig-convergence-last-step') {
      if (typeof value !== 'string' || !(CONVERGENCE_LAST_STEPS as readonly string[]).includes(value)) {
        throw new ParameterError(`Parameter '${name}' does not accept value '${String(value)}' (${CONVERGENCE_LAST_STEPS.join(', ')})`);
      }
      next[name] = value;
      continue;
    }
    if (name === 'cpr-exec-command') {
      if (!Array.isArray(value) || !value.every((a) => typeof a === 'string')) throw new ParameterError(`Parameter 'cpr-exec-command' expects a list of strings`);
      if (value.some((a: string) => a.includes('\0'))) throw new ParameterError(`Parameter 'cpr-exec-command' has an argument with a NUL byte`);
      next[name] = [...(value as string[])];
      continue;
    }
    const want = typeof (current as unknown as Record<string, unknown>)[name];
    if (typeof value !== want || (want === 'number' && !Number.isInteger(value))) {
      throw new ParameterError(`Parameter '${name}' expects ${want === 'number' ? 'an integer' : want}`);
    }
    const range = INT_RANGES[name as keyof MigrationParameters];
    if (range !== undefined && ((value as number) < range[0] || (value as number) > range[1])) {
      throw new ParameterError(`Parameter '${name}' expects a value between ${range[0]} and ${range[1]}`);
    }
    next[name] = value;
  }
  const p = next as unknown as MigrationParameters;
  const cache = p['xbzrle-cache-size'];
  if (!Number.isInteger(Math.log2(cache))) {
    throw new ParameterError(`Parameter 'xbzrle-cache-size' expects a power of two no less than the target page size`);
  }
  if (p['max-cpu-throttle'] < p['cpu-throttle-initial']) {
    throw new ParameterError(`Parameter 'max-cpu-throttle' expects a value between cpu-throttle-initial (${p['cpu-throttle-initial']}) and 99`);
  }
  return p;
}

/**
 * Apply `migrate-set-capabilities` arguments; throws ParameterError for unknown names,
 * unsupported capabilities turned on, and QEMU's incompatible combinations.
 */
export function applyCapabilities(current: Capabilities, list: unknown): Capabilities {
  if (!Array.isArray(list)) throw new ParameterError("Parameter 'capabilities' expects an array");
  const next = { ...current };
  for (const item of list) {
    const { capability, state } = (item ?? {}) as { capability?: unknown; state?: unknown };
    if (typeof capability !== 'string' || !(CAPABILITIES as readonly string[]).includes(capability)) {
      throw new ParameterError(`Parameter 'capability' does not accept value '${String(capability)}'`);
    }
    if (typeof state !== 'boolean') throw new ParameterError(`Parameter 'state' expects a boolean`);
    if (state && !SUPPORTED_CAPABILITIES.has(capability as Capability)) {
      throw new ParameterError(`Capability '${capability}' is not supported by livemig`);
    }
    next[capability as Capability] = state;
  }
  if (next['postcopy-preempt'] && !next['postcopy-ram']) {
    throw new ParameterError('Postcopy preempt requires postcopy-ram');
  }
  if (next['switchover-ack'] && !next['return-path']) {
    throw new ParameterError("Capability 'switchover-ack' requires capability 'return-path'");
  }
  return next;
}
