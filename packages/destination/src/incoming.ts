// The incoming migration: accept one connection, decode the stream straight into guest RAM,
// load devices, answer on the return path, and start the guest when the stream is complete.
//
//   none → (listening) → active ──→ completed   (guest runs unless -S; SHUT(0) on the RP)
//                           └─────→ failed      (error details + SHUT(1) on the RP; the process exits)
//
// Reads use Node's static-buffer mode (onread with one reused 1 MiB buffer): the decoder copies
// each page once from that buffer into guest RAM and keeps only a straddling record's bytes.

import type net from 'node:net';
import { Packr } from 'msgpackr';
import {
  BatchWriter,
  type Capabilities,
  ConfigError,
  type DecoderEvent,
  ErrorCode,
  LIVEMIG_HELLO_PING,
  MigCmd,
  NEED_MORE,
  type RamBlockInfo,
  StreamDecoder,
  writeRpLivemigExt,
  writeRpPong,
  writeRpShut,
} from '@livemig/protocol';
import type { Guest } from '@livemig/guest';
import { listenChannel, type ChannelListener } from '@livemig/runtime';

export type IncomingStatus = 'none' | 'setup' | 'active' | 'completed' | 'failed';

const READ_BUFFER_BYTES = 1024 * 1024;
const extPackr = new Packr({ useRecords: false });

export interface IncomingOptions {
  guest: Guest;
  capabilities: Capabilities;
  /** Start the guest after the migration (no -S) when the source was running. */
  autostart: boolean;
  /** Machine type we accept in the configuration record. */
  machineType: string;
  events: { status(s: IncomingStatus): void; resume(): void };
  log: { info(obj: object, msg?: string): void; warn(obj: object, msg?: string): void };
}

/** A failure with where it happened, as it is reported to QMP and to the source. */
function describe(err: unknown): { code: string; message: string; offset?: number } {
  const e = err as { code?: unknown; message?: string; streamOffset?: number };
  const out: { code: string; message: string; offset?: number } = {
    code: typeof e.code === 'string' ? e.code : 'LM_ERR_INTERNAL',
    message: e.message ?? String(err),
  };
  if (typeof e.streamOffset === 'number') out.offset = e.streamOffset;
  return out;
}

export class IncomingMigration {
  status: IncomingStatus = 'none';
  errorDesc: string | undefined;
  private readonly o: IncomingOptions;
  private listener: ChannelListener | undefined;
  private socket: net.Socket | undefined;
  private readonly decoder: StreamDecoder;
  /** Every non-RAM section we accept: FULL devices and iterative loaders, by idstr + instance. */
  private readonly devices = new Map<string, { layout: number | 'be32-prefixed'; load(data: Buffer, versionId: number): void }>();
  private rpOpen = false;
  private peerIsLivemig = false;
  private sawEof = false;
  private finished = false;
  private readonly readBuffer = Buffer.allocUnsafeSlow(READ_BUFFER_BYTES);
  private resolveDone!: () => void;
  /** Resolves when the migration reached completed or failed. */
  readonly done: Promise<void>;
  /** Time the stream's first byte arrived and when the guest was started (ms, performance.now()). */
  firstByteAt = 0;
  loadedAt = 0;

  constructor(options: IncomingOptions) {
    this.o = options;
    for (const d of options.guest.devices) this.devices.set(`${d.idstr}\u0000${d.instanceId}`, d);
    const vfio = options.guest.vfio;
    if (vfio !== undefined) {
      this.devices.set(`${vfio.idstr}\u0000${vfio.instanceId}`, { layout: vfio.layout, load: (data, v) => vfio.loadState(data, v) });
    }
    this.decoder = new StreamDecoder({
      ram: { attachBlocks: (blocks, offset) => this.attachBlocks(blocks, offset) },
      deviceLayout: (s) => this.devices.get(`${s.idstr}\u0000${s.instanceId}`)?.layout,
      // Guest RAM is fresh (never run) until the stream has been loaded.
      zeroedMemory: true,
    });
    this.done = new Promise((resolve) => (this.resolveDone = resolve));
  }

  get listeningAddress(): string | undefined {
    return this.listener?.addressText;
  }

  get bytesReceived(): number {
    return this.decoder.streamOffset + this.decoder.bufferedBytes;
  }

  /** Listen on tcp: or unix:; returns the bound address (port 0 resolved). */
  async listen(address: string): Promise<string> {
    if (this.listener !== undefined || this.status !== 'none') throw new Error('an incoming migration was already started');
    this.listener = await listenChannel(address, {
      allowHalfOpen: true,
      onread: { buffer: this.readBuffer, callback: (n) => this.onBytes(n) },
    });
    this.o.events.status('setup');
    this.o.log.info({ address: this.listener.addressText }, 'waiting for the incoming migration');
    this.listener.accepted.then(
      (socket) => this.onConnection(socket),
      (err: Error) => this.fail(err),
    );
    return this.listener.addressText;
  }

  private setStatus(s: IncomingStatus): void {
    if (this.status === s) return;
    this.status = s;
    this.o.events.status(s);
  }

  private onConnection(socket: net.Socket): void {
    this.socket = socket;
    this.firstByteAt = performance.now();
    this.o.guest.setRunState('inmigrate');
    // The stream writes RAM behind the dirty log: from now on any page may be non-zero.
    this.o.guest.ram.markAllWritten();
    this.setStatus('active');
    socket.on('end', () => this.onEnd());
    socket.on('error', (err) => this.fail(new Error(`migration connection failed: ${err.message}`)));
    socket.on('close', () => {
      if (!this.finished) this.fail(new Error(`the source closed the connection at stream offset ${this.bytesReceived}`));
    });
  }

  private attachBlocks(blocks: readonly RamBlockInfo[], streamOffset: number): Buffer[] {
    const ram = this.o.guest.ram;
    return blocks.map((b) => {
      const index = ram.blocks.findIndex((x) => x.idstr === b.idstr);
      if (index < 0) {
        throw new ConfigError(
          ErrorCode.CONFIG_MISMATCH,
          `RAM block "${b.idstr}" (${b.length} bytes) is not in this guest, which has ${ram.blocks.map((x) => `"${x.idstr}" (${x.length} bytes)`).join(', ')}`,
          { streamOffset, block: b.idstr },
        );
      }
      const local = ram.blocks[index]!;
      if (local.length !== b.length) {
        throw new ConfigError(
          ErrorCode.CONFIG_MISMATCH,
          `RAM block "${b.idstr}" is ${b.length} bytes in the stream but ${local.length} bytes here`,
          { streamOffset, block: b.idstr },
        );
      }
      return ram.view(index);
    });
  }

  /** onread callback: the bytes are valid only during this call. */
  private onBytes(n: number): boolean {
    if (this.finished) return false;
    try {
      this.decoder.push(this.readBuffer.subarray(0, n));
      for (let ev = this.decoder.next(); ev !== NEED_MORE; ev = this.decoder.next()) {
        this.onEvent(ev);
        if (this.finished) return false;
      }
      // Keep only the undecoded tail: the read buffer is reused by the next read.
      this.decoder.retainUnread();
      return true;
    } catch (err) {
      this.fail(err as Error);
      return false;
    }
  }

  private onEvent(ev: DecoderEvent): void {
    switch (ev.kind) {
      case 'configuration':
        // QEMU compares over the received length only (a prefix compare).
        if (!this.o.machineType.startsWith(ev.machineType) || ev.machineType.length === 0) {
          throw new ConfigError(
            ErrorCode.CONFIG_MISMATCH,
            `Machine type received is '${ev.machineType}' and local is '${this.o.machineType}'`,
            { streamOffset: ev.offset },
          );
        }
        break;
      case 'sectionStart': {
        const s = ev.section;
        if (s.idstr === 'ram' && s.instanceId === 0) break;
        if (!this.devices.has(`${s.idstr}\u0000${s.instanceId}`)) {
          throw new ConfigError(
            ErrorCode.CONFIG_MISMATCH,
            `Unknown savevm section or instance '${s.idstr}' ${s.instanceId}: this guest has no such device`,
            { streamOffset: ev.offset, sectionId: s.sectionId, idstr: s.idstr },
          );
        }
        break;
      }
      case 'sectionEnd':
        if (ev.data !== undefined) {
          const dev = this.devices.get(`${ev.idstr}\u0000${ev.instanceId}`)!;
          try {
            dev.load(ev.data, ev.versionId);
          } catch (err) {
            throw new ConfigError(ErrorCode.CONFIG_MISMATCH, (err as Error).message, {
              streamOffset: ev.dataOffset,
              sectionId: ev.sectionId,
              idstr: ev.idstr,
            });
          }
        }
        break;
      case 'command':
        this.onCommand(ev);
        break;
      case 'eof':
        if (ev.depth === 0) this.sawEof = true;
        break;
      case 'vmdescription':
        void this.finish();
        break;
      default:
        break;
    }
  }

  private onCommand(ev: Extract<DecoderEvent, { kind: 'command' }>): void {
    const c = ev.command;
    switch (c.cmd) {
      case MigCmd.OPEN_RETURN_PATH:
        this.rpOpen = true;
        break;
      case MigCmd.PING:
        if (!this.rpOpen) throw new ConfigError(ErrorCode.UNEXPECTED_COMMAND, 'PING before OPEN_RETURN_PATH', { streamOffset: ev.offset });
        if (c.pingValue === LIVEMIG_HELLO_PING) this.peerIsLivemig = true;
        this.sendRp((w) => writeRpPong(w, c.pingValue!));
        break;
      case MigCmd.POSTCOPY_ADVISE:
        if (c.length === 16 && !this.o.capabilities['postcopy-ram']) {
          throw new ConfigError(ErrorCode.CONFIG_MISMATCH, 'the source uses postcopy-ram but this destination does not have the capability on', {
            streamOffset: ev.offset,
          });
        }
        break;
      case MigCmd.POSTCOPY_RESUME:
        break;
      default:
        throw new ConfigError(ErrorCode.UNEXPECTED_COMMAND, `command ${c.name} is not supported by this destination`, { streamOffset: ev.offset });
    }
  }

  private sendRp(encode: (w: BatchWriter) => void): void {
    if (!this.rpOpen || this.socket === undefined || this.socket.destroyed) return;
    const w = new BatchWriter({ slabSize: 1024 });
    encode(w);
    this.socket.write(w.flushConcat());
  }

  /** The source half-closed (or ended) its side. */
  private onEnd(): void {
    if (this.finished) return;
    if (this.sawEof && this.decoder.bufferedBytes === 0) {
      // EOF without a VMDESCRIPTION (postcopy, or a source that sends none): complete.
      void this.finish();
      return;
    }
    try {
      this.decoder.end();
      this.fail(new Error(`the source ended the stream at offset ${this.bytesReceived} before EOF`));
    } catch (err) {
      this.fail(err as Error);
    }
  }

  private async finish(): Promise<void> {
    if (this.finished) return;
    this.finished = true;
    const guest = this.o.guest;
    this.loadedAt = performance.now();
    const sourceWasRunning = guest.globalState.loaded === undefined || guest.globalState.loaded === 'running';
    guest.setRunState('paused');
    if (this.o.autostart && sourceWasRunning) {
      await guest.start();
      this.o.events.resume();
    }
    this.setStatus('completed');
    this.o.log.info({ bytes: this.bytesReceived, running: guest.running }, 'incoming migration completed');
    this.sendRp((w) => writeRpShut(w, 0));
    this.socket?.end();
    this.resolveDone();
  }

  fail(err: Error): void {
    if (this.finished) return;
    this.finished = true;
    const d = describe(err);
    this.errorDesc = d.message;
    this.o.guest.setRunState('paused');
    this.setStatus('failed');
    this.o.log.warn({ err: d }, `incoming migration failed: ${d.message}`);
    if (this.peerIsLivemig) {
      let payload = extPackr.pack({ kind: 'error', ...d });
      if (payload.length > 512) payload = extPackr.pack({ kind: 'error', code: d.code, message: d.message.slice(0, 400), offset: d.offset });
      this.sendRp((w) => writeRpLivemigExt(w, payload));
    }
    this.sendRp((w) => writeRpShut(w, 1));
    this.socket?.end();
    void this.listener?.close();
    this.resolveDone();
  }
}
