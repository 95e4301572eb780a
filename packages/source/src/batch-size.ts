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
 * is encoded. 256 MiB random guest, 10 migrations each way alternating, against 1 MiB (one
 * stream) and 2 MiB (multifd 2): one stream total-time median 84.5 against 99 ms, then 97 against
 * 99, the source's main thread 15.8 against 24.6 ms, then 16.4 against 26.1; multifd 2 78 against
 * 84.5 ms, its main thread 17.2 against 24.5 ms.
 */
const MAX_RAM_BATCH_BYTES = 8 * 1024 * 1024;
/**
 * A batch is what the link moves in about this long at its measured rate, between BATCH_BYTES
 * and MAX_RAM_BATCH_BYTES: on a slow link a batch of 8 MiB would take most of a second to drain,
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
