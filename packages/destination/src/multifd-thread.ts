// A multifd channel's packets read by a native thread of its own (@livemig/native's multifd
// reader), so the kernel's copy of every page runs beside the main thread and each channel on a
// core of its own, as QEMU's receive threads do. The main thread reads and judges the channel's
// init packet (and, on a TLS channel, every packet: its bytes are decrypted here), then hands a
// plain socket over at the first packet boundary; from there the thread checks each header as
// MultifdReceiver does, with the same messages, and puts the pages straight into guest RAM.

import type net from 'node:net';
import type { Guest } from '@livemig/guest';
import { native, type MultifdReaderReport } from '@livemig/native';
import { ErrorCode, type MigrationError, type MultifdReceiver, ProtocolError, TransportError } from '@livemig/protocol';
import { socketFd } from '@livemig/runtime';

export interface MultifdChannel {
  recv: MultifdReceiver;
  socket: net.Socket;
  ended: boolean;
  /** The reader thread, once the channel was handed over (closed with the channel). */
  thread?: { close(): void };
  /** SYNC packets the thread has read (the receiver counts those before the hand-over). */
  threadSyncs: number;
}

/** SYNC packets the channel has delivered. */
export function channelSyncs(c: MultifdChannel): number {
  return c.recv.syncs + c.threadSyncs;
}

export interface MultifdThreadEvents {
  /** A SYNC packet arrived, or the channel ended at a packet boundary. */
  progressed(): void;
  /** Bytes arrived (the stall check's clock). */
  bytes(): void;
  failed(err: MigrationError): void;
}

/**
 * Hand the channel's reading to a thread when it may be: the addon built, the channel's init
 * judged, at a packet boundary, a socket with a descriptor. True when it was: the caller stops
 * Node's reads of the socket at once (its onread callback returns false).
 */
export function handOverToThread(channel: MultifdChannel, guest: Guest, events: MultifdThreadEvents): boolean {
  const recv = channel.recv;
  if (!native.available || channel.thread !== undefined || recv.channelId < 0 || !recv.atPacketBoundary) return false;
  const fd = socketFd(channel.socket);
  if (fd === undefined) return false;
  const ram = guest.ram;
  const blocks = ram.blocks.map((b, i) => ({ name: b.idstr, memory: ram.view(i) }));
  let bytes = recv.streamOffset;
  channel.thread = native.openMultifdReader(fd, recv.streamOffset, blocks, (r) => {
    if (r.bytes !== bytes) {
      bytes = r.bytes;
      events.bytes();
    }
    const newSyncs = r.syncs > channel.threadSyncs;
    channel.threadSyncs = r.syncs;
    if (r.end === 0) {
      if (newSyncs) events.progressed();
      return;
    }
    channel.ended = true;
    if (r.end === 1) events.progressed();
    else events.failed(readerFailure(recv.channelId, r));
  });
  return true;
}

/** A failed reader's report as the error MultifdReceiver (or the socket) would have given. */
function readerFailure(channelId: number, r: MultifdReaderReport): MigrationError {
  const message = r.message ?? 'failed';
  if (r.lost === true) {
    return message === 'closed in the middle of a packet'
      ? TransportError.lost('multifd', `multifd channel ${channelId} closed in the middle of a packet`)
      : TransportError.lost('multifd', `multifd channel ${channelId}: ${message}`);
  }
  const ctx: { streamOffset: number; block?: string } = { streamOffset: r.offset ?? 0 };
  if (r.block !== undefined) ctx.block = r.block;
  return new ProtocolError(ErrorCode.BAD_MULTIFD, `multifd channel ${channelId}: ${message}`, ctx);
}
