// The destination's multifd receiver run once at start-up on made-up channels, so that a
// migration's first packets find its per-packet code optimised (the main channel's decoder has
// its own warm-up, MainStream.warmUp). Measured on a two-core AMD EPYC machine, 256 MiB random
// guest, multifd 2 channels, 9 migrations each into a destination with and without it,
// interleaved, medians: destination CPU (all threads) 74 -> 69 ms, total-time 102 -> 96 ms.

import {
  MULTIFD_DIRECT_RUN_PAGES,
  MULTIFD_FLAG_SYNC,
  MULTIFD_INIT_LENGTH,
  MULTIFD_PACKET_HEADER_LENGTH,
  MultifdReceiver,
  TARGET_PAGE_SIZE,
  writeMultifdInit,
  writeMultifdPacketHeader,
} from '@livemig/protocol';
import { keepForProcessLife } from '@livemig/runtime';
import { blockResolver } from './channels.ts';

/**
 * Channels the multifd warm-up decodes (each starts with its init packet), packets on each, pages
 * in a packet: a run of them as long as a packet read straight into RAM needs.
 */
const MULTIFD_WARM_UP_CHANNELS = 4;
const MULTIFD_WARM_UP_PACKETS = 512;
const MULTIFD_WARM_UP_PAGES = MULTIFD_DIRECT_RUN_PAGES;
/** Read sizes of the multifd warm-up: what a socket gives a channel, whole and in pieces. */
const MULTIFD_WARM_UP_READS = [65_536, 1_000, 262_144, 7, 20_000];

/**
 * Decode made-up multifd channel bytes through MultifdReceivers into a block of their own, as a
 * channel's reads would, so that a migration's first packets find the per-packet code (header
 * check, page copies, Buffer.copy beneath) optimised instead of compiling it while they arrive:
 * packets of contiguous pages, of scattered pages, with zero pages (QEMU 9.0+), and SYNCs, on a
 * few channels from their init packet. ~21 ms once, at start-up (two cores). With half as many
 * packets (~12.5 ms) V8 marked the per-packet parseHeader for optimisation only near the warm-up's
 * end (--trace-opt: 4-14 trace lines before it, against 26-28 now), and once in CI on a packet
 * after which none came: a function is compiled at its next call, so it never was.
 */
export function warmUpMultifd(): void {
  const pageCount = 4 * MULTIFD_WARM_UP_PAGES;
  const memory = Buffer.from(new SharedArrayBuffer(pageCount * TARGET_PAGE_SIZE));
  // One packet's bytes, its header rewritten for each packet before the pages that follow it.
  const packet = Buffer.alloc(MULTIFD_PACKET_HEADER_LENGTH + MULTIFD_WARM_UP_PAGES * TARGET_PAGE_SIZE).fill(0x5a, MULTIFD_PACKET_HEADER_LENGTH);
  const header = packet.subarray(0, MULTIFD_PACKET_HEADER_LENGTH);
  const init = Buffer.alloc(MULTIFD_INIT_LENGTH);
  const offsets = new Float64Array(MULTIFD_WARM_UP_PAGES);
  const zeros = new Float64Array(MULTIFD_WARM_UP_PAGES);
  const blocks = new Map([['warm-up', memory]]);
  let read = 0;
  for (let channel = 0; channel < MULTIFD_WARM_UP_CHANNELS; channel++) {
    const recv = new MultifdReceiver(blockResolver(blocks));
    // It stays reachable (with its block): the code it optimises would be thrown away with it.
    keepForProcessLife(recv);
    /** Hand `bytes` to the receiver as reads would: each into where it asks, at most a read's size. */
    const feed = (bytes: Buffer): void => {
      for (let at = 0; at < bytes.length; read++) {
        const into = recv.nextBuffer();
        const size = MULTIFD_WARM_UP_READS[read % MULTIFD_WARM_UP_READS.length]!;
        // As much as fits: the form the bytes read before a channel is adopted are copied in.
        const n = size >= into.length ? bytes.copy(into, 0, at) : bytes.copy(into, 0, at, Math.min(at + size, bytes.length));
        at += n;
        recv.advance(n);
      }
    };
    writeMultifdInit(init, { uuid: new Uint8Array(16), channelId: channel });
    feed(init);
    for (let p = 0; p < MULTIFD_WARM_UP_PACKETS; p++) {
      const kind = p % 4;
      if (kind === 3) {
        writeMultifdPacketHeader(header, { flags: MULTIFD_FLAG_SYNC, packetNum: p, block: '' }, offsets, 0);
        feed(header);
        continue;
      }
      // 0: contiguous pages (read straight into RAM); 1: every other page (a run per page, read
      // into scratch); 2: half normal, half zero (runs too short: scratch).
      const normal = kind === 2 ? MULTIFD_WARM_UP_PAGES / 2 : MULTIFD_WARM_UP_PAGES;
      for (let i = 0; i < normal; i++) offsets[i] = (kind === 1 ? 2 * i : i) * TARGET_PAGE_SIZE;
      const zeroCount = kind === 2 ? MULTIFD_WARM_UP_PAGES / 2 : 0;
      for (let i = 0; i < zeroCount; i++) zeros[i] = (pageCount - 1 - i) * TARGET_PAGE_SIZE;
      writeMultifdPacketHeader(header, { flags: 0, packetNum: p, block: 'warm-up' }, offsets, normal, zeros, zeroCount);
      // The whole packet at once: its header's reads stop short of the bytes there are.
      feed(packet.subarray(0, MULTIFD_PACKET_HEADER_LENGTH + normal * TARGET_PAGE_SIZE));
    }
  }
}
