// `livemig-source --load-state FILE`: start from a saved migration stream instead of a fresh
// guest — RAM pages into guest RAM (blocks matched by name and length), device sections into the
// devices. With a recorded QEMU machine type (--machine pc-q35-10.0, …) that file can be QEMU's
// own (`migrate "exec:cat > FILE"`): QEMU's devices are walked by their recorded layout and carried,
// so this source sends QEMU the state another QEMU saved (QEMU → livemig → QEMU).

import { readFile } from 'node:fs/promises';
import type { Guest } from '@livemig/guest';
import { MigCmd, type RamBlockInfo, StreamDecoder } from '@livemig/protocol';
import { SourceErrorCode, StateFileError } from './errors.ts';
import { deviceKey, loadStateSections } from './state-sections.ts';

/**
 * Load the stream file `path` into `guest` (not running). Returns the run state the saving side
 * had (its globalstate), if the file holds one. Throws StateFileError (LM_ERR_BAD_STATE_FILE) naming the file and
 * what did not fit; the decoder's or device's error is its cause.
 */
export async function loadStateFile(guest: Guest, path: string, machineType: string): Promise<string | undefined> {
  const fail = (message: string, cause?: unknown): never => {
    throw new StateFileError(`--load-state ${path}: ${message}`, cause === undefined ? {} : { cause });
  };
  let bytes: Buffer;
  try {
    bytes = await readFile(path);
  } catch (err) {
    return fail((err as Error).message, err);
  }
  const devices = new Map(guest.devices.map((d) => [deviceKey(d.idstr, d.instanceId), d]));
  const ram = guest.ram;
  const decoder = new StreamDecoder({
    ram: {
      attachBlocks: (blocks: readonly RamBlockInfo[]) =>
        blocks.map((b) => {
          const mine = ram.blocks.find((x) => x.idstr === b.idstr);
          if (mine === undefined || mine.length !== b.length) {
            fail(`RAM block "${b.idstr}" of ${b.length} bytes is not in this guest (${ram.blocks.map((x) => `${x.idstr}:${x.length}`).join(', ')})`);
          }
          return mine!.bytes;
        }),
    },
    deviceLayout: (s) => devices.get(deviceKey(s.idstr, s.instanceId))?.layout,
    // QEMU 10.0's streams hold SWITCHOVER_START; the oldest machine types have no footers.
    maxCommand: MigCmd.SWITCHOVER_START + 1,
    expectFooters: 'auto',
  });
  loadStateSections({
    decoder,
    bytes,
    devices,
    machineType,
    fileName: 'the file',
    fail,
    isOwn: (err) => (err as { code?: unknown }).code === SourceErrorCode.BAD_STATE_FILE,
  });
  ram.markAllWritten();
  return guest.globalState.loaded;
}
