// cpr-exec live update (QEMU's migration mode cpr-exec): the guest stops, its device state goes
// to a `file:` state file, and this process execs `cpr-exec-command` (same PID). Guest RAM is not
// copied: it lives in memfds (@livemig/native) that stay open across the exec, named to the new
// image in LIVEMIG_CPR_RAM. The new image (`livemig-source --incoming-cpr FILE`, with the same
// guest flags) maps them instead of allocating, loads the state file and runs the guest on.
//
//   LIVEMIG_CPR_RAM = JSON [{ "idstr": "pc.ram", "length": 268435456, "fd": 21 }, …]
//
// The state file is an ordinary stream whose configuration record carries the capability
// x-ignore-shared, as QEMU marks RAM that stays in shared memory: the RAM section lists the
// blocks (with a guest-physical address each) and holds no page.

import { readFile } from 'node:fs/promises';
import { delimiter, join } from 'node:path';
import { accessSync, constants } from 'node:fs';
import { type Guest, type RamAllocator } from '@livemig/guest';
import { native, NativeError, NativeErrorCode } from '@livemig/native';
import { MigCmd, type RamBlockInfo, StreamDecoder } from '@livemig/protocol';
import { deviceKey, type LoadableDevice, loadStateSections } from './state-sections.ts';

/** The environment variable that hands the RAM memfds to the new image. */
export const CPR_RAM_ENV = 'LIVEMIG_CPR_RAM';

interface SharedBlock {
  idstr: string;
  length: number;
  fd: number;
}

/** Guest RAM in memfds: the allocator for the Guest, and the fds to keep across an exec. */
export class SharedRam {
  /** The blocks allocated so far, with their memfds (what an exec hands over). */
  readonly blocks: SharedBlock[] = [];
  private readonly open: (idstr: string, length: number) => { fd: number; memory: SharedArrayBuffer };

  private constructor(open: (idstr: string, length: number) => { fd: number; memory: SharedArrayBuffer }) {
    this.open = open;
  }

  /** The Guest's allocator: each block's memory, its memfd noted. */
  readonly allocate: RamAllocator = (idstr, length) => {
    const { fd, memory } = this.open(idstr, length);
    this.blocks.push({ idstr, length, fd });
    return memory;
  };

  /** RAM in new memfds. */
  static create(): SharedRam {
    return new SharedRam((idstr, length) => native.createSharedRam(idstr, length));
  }

  /**
   * RAM a cpr-exec handed over (LIVEMIG_CPR_RAM, removed from the environment so that nothing
   * spawned later sees it); `configs`: this image's blocks, which must be the same.
   */
  static inherited(configs: readonly { idstr: string; length: number }[]): SharedRam {
    const text = process.env[CPR_RAM_ENV];
    if (text === undefined) {
      throw new NativeError(NativeErrorCode.CPR_INCOMING, `--incoming-cpr: no guest RAM was handed over (${CPR_RAM_ENV} is not set): start this only as a cpr-exec-command`);
    }
    delete process.env[CPR_RAM_ENV];
    let handed: SharedBlock[];
    try {
      handed = JSON.parse(text) as SharedBlock[];
      if (!Array.isArray(handed) || !handed.every((b) => typeof b.idstr === 'string' && Number.isInteger(b.length) && Number.isInteger(b.fd))) throw new Error('not a list of {idstr, length, fd}');
    } catch (err) {
      throw new NativeError(NativeErrorCode.CPR_INCOMING, `--incoming-cpr: ${CPR_RAM_ENV} does not parse (${(err as Error).message})`, { cause: err });
    }
    const describe = (list: readonly { idstr: string; length: number }[]): string => list.map((b) => `${b.idstr}:${b.length}`).join(', ');
    if (handed.length !== configs.length || handed.some((b, i) => b.idstr !== configs[i]!.idstr || b.length !== configs[i]!.length)) {
      throw new NativeError(
        NativeErrorCode.CPR_INCOMING,
        `--incoming-cpr: the guest flags give RAM blocks ${describe(configs)} but the old image had ${describe(handed)}: pass the same guest flags`,
      );
    }
    for (const b of handed) native.keepPrivate(b.fd);
    return new SharedRam((idstr, length) => {
      const fd = handed.find((h) => h.idstr === idstr)!.fd;
      return { fd, memory: native.mapSharedRam(fd, length) };
    });
  }

  /**
   * Replace this process's image with `command` (argv; argv[0] looked up in PATH when it has no
   * slash), the RAM memfds kept open and named in its environment. Returns only by throwing
   * LM_ERR_CPR_EXEC_FAILED, with this process as it was.
   */
  exec(command: readonly string[]): never {
    const program = command[0]!;
    const path = resolveProgram(program);
    const env = Object.entries(process.env)
      .filter(([k, v]) => k !== CPR_RAM_ENV && v !== undefined)
      .map(([k, v]) => `${k}=${v}`);
    env.push(`${CPR_RAM_ENV}=${JSON.stringify(this.blocks)}`);
    try {
      return native.execImage(path, command, env, this.blocks.map((b) => b.fd));
    } catch (err) {
      const e = err as NativeError;
      throw new NativeError(NativeErrorCode.CPR_EXEC_FAILED, `cpr-exec: cannot exec ${JSON.stringify(program)}: ${e.message.replace(/^execve [^:]*: /, '')}`, {
        cause: err,
        errno: e.errno,
      });
    }
  }
}

/** execvp's lookup: a name without a slash is searched in PATH (the first executable found). */
function resolveProgram(program: string): string {
  if (program.includes('/')) return program;
  for (const dir of (process.env['PATH'] ?? '/usr/bin:/bin').split(delimiter)) {
    const candidate = join(dir === '' ? '.' : dir, program);
    try {
      accessSync(candidate, constants.X_OK);
      return candidate;
    } catch {
      // not here
    }
  }
  return program;
}

/**
 * Load a cpr-exec state file into `guest`, whose RAM is already the old image's: the block list
 * must match, device sections are loaded into the devices. Returns the run state the old image
 * saved (globalstate), so the caller can run the guest on when it was running.
 */
export async function loadCprState(guest: Guest, path: string, machineType: string): Promise<string | undefined> {
  let bytes: Buffer;
  try {
    bytes = await readFile(path);
  } catch (err) {
    throw new NativeError(NativeErrorCode.CPR_INCOMING, `--incoming-cpr ${path}: ${(err as Error).message}`, { cause: err });
  }
  const devices = new Map<string, LoadableDevice>();
  for (const d of guest.devices) devices.set(deviceKey(d.idstr, d.instanceId), d);
  const vfio = guest.vfio;
  if (vfio !== undefined) devices.set(deviceKey(vfio.idstr, vfio.instanceId), { layout: vfio.layout, load: (data, v) => vfio.loadState(data, v) });
  const fail = (message: string, cause?: unknown): never => {
    throw new NativeError(NativeErrorCode.CPR_INCOMING, `--incoming-cpr ${path}: ${message}`, cause === undefined ? undefined : { cause });
  };
  const ram = guest.ram;
  const decoder = new StreamDecoder({
    ram: {
      attachBlocks: (blocks: readonly RamBlockInfo[]) => {
        const mismatch = blocks.length !== ram.blocks.length || blocks.some((b, i) => b.idstr !== ram.blocks[i]!.idstr || b.length !== ram.blocks[i]!.length);
        if (mismatch) fail(`the state file's RAM blocks (${blocks.map((b) => `${b.idstr}:${b.length}`).join(', ')}) are not this guest's`);
        // A page in the file (not from a cpr-exec source) still lands in guest RAM.
        return ram.blocks.map((b) => b.bytes);
      },
    },
    deviceLayout: (s) => devices.get(deviceKey(s.idstr, s.instanceId))?.layout,
    // A file from a QEMU 10.0-style source may hold SWITCHOVER_START; nothing else is expected.
    maxCommand: MigCmd.SWITCHOVER_START + 1,
  });
  const { capabilities } = loadStateSections({
    decoder,
    bytes,
    devices,
    machineType,
    fileName: 'the state file',
    fail,
    isOwn: (err) => (err as { code?: unknown }).code === NativeErrorCode.CPR_INCOMING,
  });
  const sawShared = capabilities?.includes('x-ignore-shared') === true;
  if (!sawShared) fail('not a cpr-exec state file (its configuration lacks x-ignore-shared): RAM would be missing');
  ram.markAllWritten();
  return guest.globalState.loaded;
}
