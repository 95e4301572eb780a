// How much RAM the source encodes between two writes to its channels: the batch. Apart from
// precopy.ts so that what imports the sizes (the warm-up, the postcopy sender, tests) does not
// import the migration with them.

import { MULTIFD_PACKET_HEADER_LENGTH, MULTIFD_PAGES_PER_PACKET, TARGET_PAGE_SIZE } from '@livemig/protocol';

/** The smallest precopy RAM batch (a slow or rate-limited link's); devices' and postcopy's batches are sized on it. */
export const BATCH_BYTES = 1024 * 1024;
/** A full multifd packet: its header and 128 pages. */
const MULTIFD_PACKET_BYTES = MULTIFD_PACKET_HEADER_LENGTH + MULTIFD_PAGES_PER_PACKET * TARGET_PAGE_SIZE;
/**
 * The most RAM bytes encoded between two writes on one stream. Each batch costs the main thread a
 * wake-up by the writer thread, a promise and an event-loop turn, and a channel can sit idle while
 * the next is encoded. 256 MiB random guest, 10 migrations each way alternating: total-time median
 * 89 ms with 4 MiB batches against 103 with 1 MiB (source main thread 18.9 against 23.2 ms). 8 MiB
 * did a little better at 256 MiB (92 against 94 ms with 4 MiB) but worse at 4 GiB (slower than 1
 * MiB in 6 of 7 pairs, 4 of 5 leaving out each source's first migration), where 4 MiB was not
 * (median 1240 against 1289.5 ms, 4 pairs).
 */
const MAX_RAM_BATCH_BYTES = 4 * 1024 * 1024;
/**
 * The same with multifd, where a batch is shared out over the channels: 8 MiB against 4, multifd
 * 2, 256 MiB (12 each): 63.5 against 70.5 ms, source main thread 13.7 against 18.8; 4 GiB (4
 * each): 864.5 against 942.5 ms; multifd 4 (4 packets a channel against 2, 12 each): 61 against
 * 68.5 ms. Before, multifd 2 sent 2 MiB batches: 78 against 84.5 ms with 8 MiB (10 each).
 */
const MAX_MULTIFD_RAM_BATCH_BYTES = 8 * 1024 * 1024;
/**
 * A batch is what the link moves in about this long at its measured rate, between BATCH_BYTES
 * and MAX_RAM_BATCH_BYTES: on a slow link a batch of 4 MiB would take a third of a second to drain,
 * and the main thread (commands, the iteration's end, the dirty sync) waits on it.
 */
const RAM_BATCH_MS = 5;

/**
 * RAM bytes to encode before the next write, for a link measured at `bytesPerMs` (0: not yet):
 * what it moves in RAM_BATCH_MS, at least BATCH_BYTES and at most MAX_RAM_BATCH_BYTES (with
 * multifd MAX_MULTIFD_RAM_BATCH_BYTES); with many multifd channels at least two packets per
 * channel, so that each write gives every channel work.
 */
export function ramBatchBytes(bytesPerMs: number, multifdChannels: number): number {
  const most = multifdChannels > 0 ? MAX_MULTIFD_RAM_BATCH_BYTES : MAX_RAM_BATCH_BYTES;
  const byRate = Math.min(most, Math.max(BATCH_BYTES, Math.floor(bytesPerMs * RAM_BATCH_MS)));
  return Math.max(byRate, 2 * multifdChannels * MULTIFD_PACKET_BYTES);
}
