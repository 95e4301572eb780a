// How much RAM the source encodes between two writes to its channels: the batch. Apart from
// precopy.ts so that what imports the sizes (the warm-up, the postcopy sender, tests) does not
// import the migration with them.

import { MULTIFD_PACKET_HEADER_LENGTH, MULTIFD_PAGES_PER_PACKET, TARGET_PAGE_SIZE } from '@livemig/protocol';

/** Bytes encoded before each write to the channel (one writev). */
export const BATCH_BYTES = 1024 * 1024;
/** A full multifd packet: its header and 128 pages. */
const MULTIFD_PACKET_BYTES = MULTIFD_PACKET_HEADER_LENGTH + MULTIFD_PAGES_PER_PACKET * TARGET_PAGE_SIZE;
/**
 * The most RAM bytes encoded between two writes. Each batch costs the main thread a wake-up by
 * the writer thread, a promise and an event-loop turn, and a channel can sit idle while the next
 * is encoded. 256 MiB random guest, 10 migrations each way alternating, one stream: total-time
 * median 89 ms with 4 MiB batches against 103 with 1 MiB (source main thread 18.9 against 23.2
 * ms); multifd 2, 4 MiB against 2 MiB: 68 against 76 ms. 8 MiB did a little better at 256 MiB
 * (one stream 92 against 94 ms with 4 MiB, multifd 2 67 against 72.5) but worse at 4 GiB (slower
 * than 1 MiB in 6 of 7 pairs, 4 of 5 leaving out each source's first migration), where 4 MiB was
 * not (median 1240 against 1289.5 ms, 4 pairs).
 */
const MAX_RAM_BATCH_BYTES = 4 * 1024 * 1024;
/**
 * A batch is what the link moves in about this long at its measured rate, between BATCH_BYTES
 * and MAX_RAM_BATCH_BYTES: on a slow link a batch of 4 MiB would take a third of a second to drain,
 * and the main thread (commands, the iteration's end, the dirty sync) waits on it.
 */
const RAM_BATCH_MS = 5;

/**
 * RAM bytes to encode before the next write, for a link measured at `bytesPerMs` (0: not yet):
 * what it moves in RAM_BATCH_MS, at least BATCH_BYTES and at most MAX_RAM_BATCH_BYTES; with many
 * multifd channels at least two packets per channel, so that each write gives every channel work.
 */
export function ramBatchBytes(bytesPerMs: number, multifdChannels: number): number {
  const byRate = Math.min(MAX_RAM_BATCH_BYTES, Math.max(BATCH_BYTES, Math.floor(bytesPerMs * RAM_BATCH_MS)));
  return Math.max(byRate, 2 * multifdChannels * MULTIFD_PACKET_BYTES);
}
