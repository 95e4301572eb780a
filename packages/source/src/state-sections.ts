// A saved stream read whole into a guest that is not running: shared by --load-state (any stream
// file, QEMU's included) and --incoming-cpr (a cpr-exec state file).

import { NEED_MORE, type SectionLayout, type StreamDecoder } from '@livemig/protocol';

/** What a state file's device section is loaded into. */
export interface LoadableDevice {
  readonly layout: SectionLayout;
  load(data: Buffer, versionId: number): void;
}

export function deviceKey(idstr: string, instanceId: number): string {
  return `${idstr}\u0000${instanceId}`;
}

/**
 * Decode `bytes` whole with `decoder` (its RAM target already set): the configuration's machine
 * type must be `machineType`'s, every section must have a device here, and each device section is
 * loaded as it ends. A failure goes through `fail` (the caller's coded error, naming its flag and
 * file), except errors `fail` made itself (`isOwn`). Returns the configuration's capabilities.
 */
export function loadStateSections(o: {
  decoder: StreamDecoder;
  bytes: Buffer;
  devices: ReadonlyMap<string, LoadableDevice>;
  machineType: string;
  /** How the file is named in messages ("the file", "the state file"). */
  fileName: string;
  fail: (message: string, cause?: unknown) => never;
  isOwn: (err: unknown) => boolean;
}): { capabilities: readonly string[] | undefined } {
  const { decoder, devices, fail } = o;
  let capabilities: readonly string[] | undefined;
  try {
    decoder.push(o.bytes);
    for (let ev = decoder.next(); ev !== NEED_MORE; ev = decoder.next()) {
      if (ev.kind === 'configuration') {
        if (!o.machineType.startsWith(ev.machineType)) fail(`machine type '${ev.machineType}' in ${o.fileName}, '${o.machineType}' here`);
        capabilities = ev.capabilities;
      } else if (ev.kind === 'sectionStart') {
        const s = ev.section;
        if (!(s.idstr === 'ram' && s.instanceId === 0) && !devices.has(deviceKey(s.idstr, s.instanceId))) fail(`section '${s.idstr}' ${s.instanceId}: this guest has no such device`);
      } else if (ev.kind === 'sectionEnd' && ev.data !== undefined) {
        devices.get(deviceKey(ev.idstr, ev.instanceId))!.load(ev.data, ev.versionId);
      }
    }
    decoder.end();
  } catch (err) {
    if (o.isOwn(err)) throw err;
    fail((err as Error).message, err);
  }
  return { capabilities };
}
