// The decoded stream, as this destination loads it: the checks that are this side's own (machine
// type, known devices, the postcopy capability and page size), device state into the devices,
// discards and received-bitmaps against guest RAM; and each decoder event that matters to the
// migration's state, turned into the destination machine's event.

import {
  ConfigError,
  type DecoderEvent,
  type DestinationConfig,
  type DestinationEvent,
  ErrorCode,
  LIVEMIG_HELLO_PING,
  MigCmd,
  recvBitmapBytes,
  type SectionIdentity,
  type SectionKind,
  type SectionLayout,
  TARGET_PAGE_SIZE,
} from '@livemig/protocol';
import type { Guest } from '@livemig/guest';

/** `load` is true when the section says the device's initial data is all in (VFIO's INIT_DATA_SENT). */
type Device = { layout: SectionLayout; load(data: Buffer, versionId: number): boolean | void };

export class StreamLoader {
  private readonly guest: Guest;
  readonly machineType: string;
  /** The machine's config; replaced while the destination listens (migrate-set-capabilities before the stream). */
  config: DestinationConfig;
  /** --uuid: a configuration/uuid that differs fails the load (whatever this side's validate-uuid, as QEMU 7.2). */
  private readonly uuid: string | undefined;
  /** Every non-RAM section we accept: FULL devices and iterative loaders, by idstr + instance. */
  private readonly devices = new Map<string, Device>();
  /**
   * Where the multifd channels' SYNCs belong, as the source's dialect shows it: at each RAM
   * section end (QEMU 7.2, and older machine types), or at each MULTIFD_FLUSH record.
   */
  private multifdSyncAt: 'section-end' | 'flush' = 'section-end';

  constructor(guest: Guest, machineType: string, config: DestinationConfig, uuid?: string) {
    this.guest = guest;
    this.uuid = uuid;
    this.machineType = machineType;
    this.config = config;
    for (const d of guest.devices) this.devices.set(`${d.idstr}\u0000${d.instanceId}`, d);
    const vfio = guest.vfio;
    if (vfio !== undefined) this.devices.set(`${vfio.idstr}\u0000${vfio.instanceId}`, { layout: vfio.layout, load: (data, v) => vfio.loadState(data, v) });
  }

  /** The data length of a device section of ours (the decoder's deviceLayout). */
  deviceLayout(s: SectionIdentity, kind: SectionKind): SectionLayout | undefined {
    void kind;
    return this.devices.get(`${s.idstr}\u0000${s.instanceId}`)?.layout;
  }

  /**
   * Check and load what `ev` brings; returns the machine event it is, if any. `ramSectionsEnded`:
   * the machine's count so far; `channelsSynced(n)`: whether every multifd channel sent n SYNCs.
   */
  machineEvent(ev: DecoderEvent, ramSectionsEnded: number, channelsSynced: (n: number) => boolean): DestinationEvent | undefined {
    switch (ev.kind) {
      case 'configuration':
        // QEMU compares over the received length only (a prefix compare).
        if (!this.machineType.startsWith(ev.machineType) || ev.machineType.length === 0) {
          throw new ConfigError(ErrorCode.CONFIG_MISMATCH, `Machine type received is '${ev.machineType}' and local is '${this.machineType}'`, {
            streamOffset: ev.offset,
          });
        }
        // QEMU 7.2 vmstate_uuid_post_load: no uuid here accepts any (it warns); a different one is refused.
        if (ev.uuid !== undefined && this.uuid !== undefined && ev.uuid !== this.uuid) {
          throw new ConfigError(ErrorCode.CONFIG_MISMATCH, `UUID received is ${ev.uuid} and local is ${this.uuid}`, { streamOffset: ev.offset });
        }
        return undefined;
      case 'sectionStart': {
        const s = ev.section;
        if (s.idstr === 'ram' && s.instanceId === 0) return undefined;
        if (!this.devices.has(`${s.idstr}\u0000${s.instanceId}`)) {
          throw new ConfigError(ErrorCode.CONFIG_MISMATCH, `Unknown savevm section or instance '${s.idstr}' ${s.instanceId}: this guest has no such device`, {
            streamOffset: ev.offset,
            sectionId: s.sectionId,
            idstr: s.idstr,
          });
        }
        return undefined;
      }
      case 'sectionEnd':
        if (ev.data !== undefined && this.loadDevice(ev)) return { type: 'initDataLoaded', streamOffset: ev.offset, idstr: ev.idstr };
        if (this.config.multifd && this.multifdSyncAt === 'section-end' && ev.idstr === 'ram' && ev.instanceId === 0) {
          return { type: 'ramSectionEnded', streamOffset: ev.offset, channelsSynced: channelsSynced(ramSectionsEnded + 1) };
        }
        return undefined;
      case 'multifdFlush':
        // A source that flushes once per round (QEMU 8.0+ machine types) syncs its channels here
        // and not at section ends: from the first flush on, only flushes are sync points.
        if (!this.config.multifd) return undefined;
        this.multifdSyncAt = 'flush';
        return { type: 'ramSectionEnded', streamOffset: ev.offset, channelsSynced: channelsSynced(ramSectionsEnded + 1) };
      case 'command':
        return this.commandEvent(ev);
      case 'eof':
        return ev.depth === 0 ? { type: 'eofReceived', streamOffset: ev.offset } : undefined;
      case 'vmdescription':
        return { type: 'vmdescriptionReceived', streamOffset: ev.offset };
      default:
        return undefined;
    }
  }

  private loadDevice(ev: Extract<DecoderEvent, { kind: 'sectionEnd' }>): boolean {
    const dev = this.devices.get(`${ev.idstr}\u0000${ev.instanceId}`)!;
    try {
      return dev.load(ev.data!, ev.versionId) === true;
    } catch (err) {
      throw new ConfigError(ErrorCode.CONFIG_MISMATCH, (err as Error).message, { streamOffset: ev.dataOffset, sectionId: ev.sectionId, idstr: ev.idstr, cause: err });
    }
  }

  private commandEvent(ev: Extract<DecoderEvent, { kind: 'command' }>): DestinationEvent | undefined {
    const c = ev.command;
    const streamOffset = ev.offset;
    switch (c.cmd) {
      case MigCmd.OPEN_RETURN_PATH:
        return { type: 'returnPathOpened', streamOffset };
      case MigCmd.PING:
        return { type: 'pingReceived', streamOffset, value: c.pingValue!, livemigHello: c.pingValue === LIVEMIG_HELLO_PING };
      case MigCmd.POSTCOPY_ADVISE:
        this.checkAdvise(c.length, c.hostPageSizeSummary, streamOffset);
        return { type: 'postcopyAdviseReceived', streamOffset, postcopyRam: c.length === 16 };
      case MigCmd.POSTCOPY_RAM_DISCARD:
        return { type: 'discardReceived', streamOffset, discard: c.discard! };
      case MigCmd.POSTCOPY_LISTEN:
        return { type: 'listenReceived', streamOffset };
      case MigCmd.POSTCOPY_RUN:
        return { type: 'runReceived', streamOffset };
      case MigCmd.RECV_BITMAP:
        return { type: 'recvBitmapRequested', streamOffset, block: c.block! };
      case MigCmd.POSTCOPY_RESUME:
        return { type: 'resumeReceived', streamOffset };
      case MigCmd.PACKAGED:
        return undefined; // its records follow as events of their own
      case MigCmd.SWITCHOVER_START:
        // QEMU 10.0: the source has stopped its guest and the final state follows. Nothing to do
        // here until devices that prepare for the switchover exist (QEMU uses it for vfio).
        return undefined;
      default:
        throw new ConfigError(ErrorCode.UNEXPECTED_COMMAND, `command ${c.name} is not supported by this destination`, { streamOffset });
    }
  }

  /** ADVISE must match this side's postcopy-ram capability and page size. */
  private checkAdvise(length: number, hostPageSizeSummary: number | undefined, streamOffset: number): void {
    const postcopyRam = this.config.postcopyRam;
    if (length === 16 && !postcopyRam) {
      throw new ConfigError(ErrorCode.CONFIG_MISMATCH, 'the source uses postcopy-ram but this destination does not have the capability on', { streamOffset });
    }
    if (length === 0 && postcopyRam) {
      throw new ConfigError(ErrorCode.CONFIG_MISMATCH, 'this destination has postcopy-ram on but the source does not', { streamOffset });
    }
    if (hostPageSizeSummary !== undefined && hostPageSizeSummary !== TARGET_PAGE_SIZE) {
      throw new ConfigError(ErrorCode.CONFIG_MISMATCH, `host page size summary 0x${hostPageSizeSummary.toString(16)} differs from ours (0x1000)`, { streamOffset });
    }
  }

  /** POSTCOPY_RAM_DISCARD: these pages did not arrive (or went stale): vCPUs must wait for them. */
  discard(name: string, ranges: readonly { start: number; length: number }[], streamOffset: number): void {
    const ram = this.guest.ram;
    const guestIndex = ram.blocks.findIndex((b) => b.idstr === name);
    const block = ram.blocks[guestIndex];
    if (block === undefined) throw new ConfigError(ErrorCode.CONFIG_MISMATCH, `POSTCOPY_RAM_DISCARD for unknown block "${name}"`, { streamOffset, block: name });
    for (const r of ranges) {
      if (r.start + r.length > block.length) {
        throw new ConfigError(ErrorCode.CONFIG_MISMATCH, `discard range 0x${r.start.toString(16)}+0x${r.length.toString(16)} is outside "${name}"`, { streamOffset, block: name });
      }
      ram.clearReceived(guestIndex, r.start / TARGET_PAGE_SIZE, r.length / TARGET_PAGE_SIZE);
    }
  }

  /** RECV_BITMAP: which pages of a block we hold (our bitmap words are its little-endian bytes). */
  receivedBitmap(name: string, streamOffset: number): Buffer {
    const b = this.guest.ram.blocks.find((x) => x.idstr === name);
    if (b === undefined) throw new ConfigError(ErrorCode.CONFIG_MISMATCH, `RECV_BITMAP for unknown block "${name}"`, { streamOffset, block: name });
    const size = recvBitmapBytes(b.pageCount);
    const bytes = Buffer.alloc(size);
    Buffer.from(b.receivedMemory).copy(bytes, 0, 0, Math.min(size, b.receivedMemory.byteLength));
    // Bits past the last page stay zero, as QEMU's do.
    for (let p = b.pageCount; p < size * 8; p++) bytes[p >> 3] = bytes[p >> 3]! & ~(1 << (p & 7));
    return bytes;
  }
}
