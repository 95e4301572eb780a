// The return path, read: bytes from the destination on the main channel become the source
// machine's events (wire-format.md §5). Nothing here decides anything; a message that does not
// belong in the migration's state is refused by the machine, and that refusal (or a malformed
// message) becomes a `faulted` event.

import type { Duplex } from 'node:stream';
import {
  coded,
  decodeLivemigExt,
  decodeRequestBatch,
  type MigrationError,
  NEED_MORE_RP,
  recvBitmapBytes,
  RP_LIVEMIG_EXT,
  ReturnPathDecoder,
  RpMsg,
  type SourceEvent,
  StateError,
  TARGET_PAGE_SIZE,
} from '@livemig/protocol';

export class ReturnPathReader {
  private readonly blocks: readonly { idstr: string; pageCount: number }[];
  private readonly dispatch: (event: SourceEvent) => void;
  private channel: Duplex | undefined;
  private readonly onData = (chunk: Buffer): void => this.read(chunk);
  private decoder: ReturnPathDecoder | undefined;

  /** `dispatch` feeds the source machine; it throws what the machine refuses. */
  constructor(blocks: readonly { idstr: string; pageCount: number }[], dispatch: (event: SourceEvent) => void) {
    this.blocks = blocks;
    this.dispatch = dispatch;
  }

  /** Read the return path of this channel (a new one after a postcopy recovery), with a fresh decoder. */
  attach(channel: Duplex): void {
    this.channel?.off('data', this.onData);
    this.channel = channel;
    this.decoder = new ReturnPathDecoder({
      livemigExtensions: true,
      // SWITCHOVER_ACK (QEMU 8.1+) is read as QEMU 10.0 reads it: noted whenever it comes.
      maxType: RpMsg.SWITCHOVER_ACK + 1,
      bitmapBytes: (name) => {
        const b = this.blocks.find((x) => x.idstr === name);
        return b === undefined ? undefined : recvBitmapBytes(b.pageCount);
      },
    });
    channel.on('data', this.onData);
  }

  private read(chunk: Buffer): void {
    const rp = this.decoder!;
    try {
      this.dispatch({ type: 'returnPathHeard' });
      rp.push(chunk);
      for (let m = rp.next(); m !== NEED_MORE_RP; m = rp.next()) {
        switch (m.type) {
          case RpMsg.SHUT:
            this.dispatch({ type: 'shutReceived', status: m.value! });
            break;
          case RpMsg.PONG:
            this.dispatch({ type: 'pongReceived', value: m.value! });
            break;
          case RpMsg.REQ_PAGES_ID:
          case RpMsg.REQ_PAGES:
            this.dispatch({ type: 'pageRequested', block: m.block!, start: m.start!, length: m.pageLength! });
            break;
          case RP_LIVEMIG_EXT:
            this.extension(m.payload!);
            break;
          case RpMsg.RECV_BITMAP:
            this.dispatch({ type: 'recvBitmapReceived', block: m.block!, bitmap: m.bitmap! });
            break;
          case RpMsg.RESUME_ACK:
            this.dispatch({ type: 'resumeAckReceived' });
            break;
          case RpMsg.SWITCHOVER_ACK:
            this.dispatch({ type: 'switchoverAckReceived' });
            break;
          default:
            throw new StateError('active', m.name, `unexpected return-path message ${m.name}`);
        }
      }
    } catch (err) {
      const error = coded(err) as MigrationError;
      this.channel?.off('data', this.onData);
      this.dispatch({ type: 'faulted', error });
    }
  }

  private extension(payload: Buffer): void {
    const msg = decodeLivemigExt(payload);
    if (msg.kind === 'request-batch') {
      decodeRequestBatch(payload, (block, page) => this.dispatch({ type: 'pageRequested', block, start: page * TARGET_PAGE_SIZE, length: TARGET_PAGE_SIZE }));
    } else if (msg.kind === 'error') {
      this.dispatch({ type: 'destinationReported', report: { code: msg.code, message: msg.message, ...(msg.offset === undefined ? {} : { offset: msg.offset }) } });
    }
    // An extension we cannot read is ignored, as QEMU ignores what it does not need.
  }
}
