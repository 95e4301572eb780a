// Command-line flags every livemig process shares: the guest's shape and the control socket.
// Both sides of a migration must be started with the same guest flags.

import type { ParseArgsConfig } from 'node:util';
import { type Fill, type GuestConfig, GuestErrorCode, parseBlocks, parseWorkload, qemuMachineBlocks } from '@livemig/guest';
import { DEFAULT_QEMU_VERSION, parseQemuVersion, type QemuVersion, recordedMachine, recordedMachineTypes } from '@livemig/protocol';

export const DEFAULT_MACHINE = 'livemig-pc';

export const GUEST_OPTIONS = {
  machine: { type: 'string' },
  'qemu-version': { type: 'string' },
  memory: { type: 'string', short: 'm' },
  block: { type: 'string', multiple: true },
  vcpus: { type: 'string' },
  workload: { type: 'string' },
  fill: { type: 'string' },
  'qemu-devices-only': { type: 'boolean' },
  qmp: { type: 'string' },
  name: { type: 'string' },
  'log-level': { type: 'string' },
  object: { type: 'string', multiple: true },
  help: { type: 'boolean', short: 'h' },
} as const satisfies ParseArgsConfig['options'];

export const GUEST_HELP = `guest (the same on both sides of a migration):
  --machine TYPE        machine type sent/expected in the stream (default ${DEFAULT_MACHINE});
                        a versioned one (pc-q35-10.0, pc-i440fx-7.2) sets the stream's dialect;
                        a recorded QEMU one (${recordedMachineTypes().join(', ')})
                        has QEMU's RAM blocks (pc.ram sized by -m) and carries QEMU's devices
                        as QEMU -nodefaults -cpu qemu64 creates them
  --qemu-version V      the QEMU whose stream dialect an unversioned machine type (none,
                        livemig-pc) speaks: 7.2 (default) or 10.0 — e.g. multifd synced once
                        per round and SWITCHOVER_START, as QEMU 10.0's -machine none expects
  -m, --memory SIZE     main RAM block "pc.ram" (e.g. 256M, 1G, 4G; default 256M), plus a
                        4 MiB second block "vga.vram"
  --block NAME:SIZE     RAM blocks exactly as given instead (repeatable; the first is the
                        one the workload runs on), e.g. --block m0:16M for QEMU's -machine none
  --vcpus N             vCPU worker threads (default 1); each runs the workload on its own
                        slice of the main block
  --workload W          idle (default) | incrementer[:MB/s|:max] (one byte per page in address
                        order, forever; default 100 MB/s per vCPU) | random:MB/s |
                        hotset:MiB:MB/s (random writes inside the first MiB) |
                        scan[:MB/s] (reads every page in order, writes nothing)
  --fill F              initial RAM contents on the source: mixed (default; half the pages
                        zero, half random) | random | zero
  --qemu-devices-only   only QEMU's devices, no per-vCPU or app state: timer and globalstate,
                        and with a recorded --machine (pc-q35-10.0, pc-i440fx-10.0, pc-q35-7.2,
                        pc-i440fx-7.2, pc-i440fx-1.4) that machine's devices, carried as is
control:
  --qmp ADDR            QMP control socket: unix:PATH or tcp:HOST:PORT (port 0: any free port)
  --name NAME           a name for this process, as QEMU's -name (QMP query-name answers it)
  --log-level L         trace|debug|info|warn|error|silent (default info; env LIVEMIG_LOG_LEVEL)
  --object TYPE,id=ID,… an object, as QEMU's -object (repeatable; also QMP object-add/object-del):
                        tls-creds-x509,id=ID,dir=DIR,endpoint=server|client[,verify-peer=on|off]
                        tls-creds-psk,id=ID,dir=DIR,endpoint=…[,username=U]  authz-simple,id=ID,identity=DN
                        or JSON: '{"qom-type":"authz-list","id":…,"policy":"deny","rules":[…]}'.
                        Parameter tls-creds=ID turns TLS on (tls-hostname, tls-authz: see README)`;

function qemuVersionFlag(text: string | undefined): QemuVersion {
  if (text === undefined) return DEFAULT_QEMU_VERSION;
  try {
    return parseQemuVersion(text);
  } catch (err) {
    throw new UsageError(`--qemu-version: ${(err as Error).message}`, { cause: err });
  }
}

/** A command line that cannot be used; the message is what the user reads before the usage text. */
export class UsageError extends Error {
  readonly code = 'LM_ERR_USAGE';
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'UsageError';
  }
}

export interface GuestFlags {
  machineType: string;
  /** --qemu-version: the dialect of an unversioned machine type. */
  qemuVersion: QemuVersion;
  guest: GuestConfig;
  qmp: string | undefined;
  /** --name: what QMP query-name answers. */
  name: string | undefined;
  logLevel: string | undefined;
}

export function guestFromFlags(values: Record<string, unknown>): GuestFlags {
  try {
    const vcpus = values['vcpus'] === undefined ? 1 : Number(values['vcpus']);
    if (!Number.isInteger(vcpus) || vcpus < 1 || vcpus > 64) throw new UsageError(`--vcpus "${String(values['vcpus'])}" is not a whole number from 1 to 64`);
    const fill = (values['fill'] as string | undefined) ?? 'mixed';
    if (!['zero', 'random', 'mixed'].includes(fill)) throw new UsageError(`--fill "${fill}" is not zero, random or mixed`);
    const machineType = (values['machine'] as string | undefined) ?? DEFAULT_MACHINE;
    // A recorded QEMU machine type brings QEMU's RAM blocks, and with --qemu-devices-only its
    // devices too (carried; ours beyond timer and globalstate would be sections QEMU refuses).
    // Without that flag the guest keeps its own vCPU and app state, so livemig ↔ livemig in that
    // machine type's dialect migrates the workload whole.
    const qemuDevicesOnly = values['qemu-devices-only'] === true;
    const qemuMachine = recordedMachine(machineType);
    const blockFlags = (values['block'] as string[] | undefined) ?? [];
    const blocks =
      qemuMachine !== undefined && blockFlags.length === 0
        ? qemuMachineBlocks(qemuMachine, values['memory'] as string | undefined)
        : parseBlocks(values['memory'] as string | undefined, blockFlags);
    return {
      machineType,
      qemuVersion: qemuVersionFlag(values['qemu-version'] as string | undefined),
      guest: {
        blocks,
        vcpus,
        workload: parseWorkload((values['workload'] as string | undefined) ?? 'idle'),
        fill: fill as Fill,
        livemigDevices: !qemuDevicesOnly,
        ...(qemuMachine === undefined || !qemuDevicesOnly ? {} : { qemuMachine }),
      },
      qmp: values['qmp'] as string | undefined,
      name: values['name'] as string | undefined,
      logLevel: values['log-level'] as string | undefined,
    };
  } catch (err) {
    // The guest's LM_ERR_BAD_GUEST_CONFIG, from text off the command line: a usage error here.
    if ((err as { code?: unknown }).code === GuestErrorCode.BAD_GUEST_CONFIG) throw new UsageError((err as Error).message, { cause: err });
    throw err;
  }
}

/**
 * Run `parse`; when it throws, print one line "program: message (see program --help)" to stderr
 * and exit with status 2, as both processes do for a command line they cannot use.
 */
export function orExitWithUsage<T>(program: string, parse: () => T): T {
  try {
    return parse();
  } catch (err) {
    return exitWithUsage(program, err);
  }
}

/** orExitWithUsage for a check that awaits (an address probed before anything is prepared). */
export async function orExitWithUsageAsync<T>(program: string, check: () => Promise<T>): Promise<T> {
  try {
    return await check();
  } catch (err) {
    return exitWithUsage(program, err);
  }
}

function exitWithUsage(program: string, err: unknown): never {
  // One line: what was wrong (the message names the flag) and where to read more.
  const message = String((err as Error).message).replace(/\s*\n\s*/g, ' ');
  process.stderr.write(`${program}: ${message} (see ${program} --help)\n`);
  process.exit(2);
}

/** A --parameters list, "NAME=VALUE,…", as migrate-set-parameters arguments (numbers and booleans typed). */
export function parameterList(text: string): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const item of text.split(',').filter((s) => s.length > 0)) {
    const eq = item.indexOf('=');
    if (eq <= 0) throw new UsageError(`--parameters item "${item}" is not NAME=VALUE`);
    const v = item.slice(eq + 1);
    out[item.slice(0, eq)] = v === 'true' ? true : v === 'false' ? false : /^-?\d+$/.test(v) ? Number(v) : v;
  }
  return out;
}

/**
 * `--capabilities a,b=off,c=on` as migrate-set-capabilities arguments: a bare name turns it on,
 * NAME=on / NAME=off set it (livemig-source's return-path is on unless turned off).
 */
export function capabilityList(list: string): { capability: string; state: boolean }[] {
  return list
    .split(',')
    .filter((c) => c.length > 0)
    .map((item) => {
      const eq = item.indexOf('=');
      if (eq < 0) return { capability: item, state: true };
      const value = item.slice(eq + 1);
      if (value !== 'on' && value !== 'off') throw new UsageError(`--capabilities item "${item}": the value must be on or off`);
      return { capability: item.slice(0, eq), state: value === 'on' };
    });
}
