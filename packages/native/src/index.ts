/**
 * @packageDocumentation
 * Guest RAM that survives an exec (cpr-exec live update), from a small node-gyp addon: a memfd
 * mapped MAP_SHARED and handed to JS as a real SharedArrayBuffer (vCPU workers share it as any
 * other), and execve keeping chosen descriptors open; guest RAM that need not survive one, in
 * transparent huge pages (createPrivateRam); and writeRefs, a writev of guest pages in
 * place between encoded headers (the source's channels). When the addon is not built, `available`
 * is false and every call throws LM_ERR_NATIVE_UNAVAILABLE: callers fall back to plain
 * SharedArrayBuffer RAM, and the source to copying pages before Node writes them.
 *
 * @example
 * import { native } from '@livemig/native';
 * if (native.available) {
 *   const { fd, memory } = native.createSharedRam('pc.ram', 256 * 2 ** 20);
 *   native.execImage('/usr/bin/node', ['node', 'main.js'], ['RAM_FD=' + fd], [fd]);
 * }
 */

import { createRequire } from 'node:module';
import { NativeError, NativeErrorCode } from './errors.ts';

export * from './errors.ts';

interface Addon {
  createMemfd(name: string, length: number): number;
  mapShared(fd: number, length: number): SharedArrayBuffer;
  mapPrivateRam(length: number, hugePages: boolean): SharedArrayBuffer;
  closeFd(fd: number): void;
  keepPrivate(fd: number): void;
  execve(path: string, argv: readonly string[], env: readonly string[], keepFds: readonly number[]): never;
  writeRefs(fd: number, pieces: readonly ArrayBufferView[], refs: Float64Array, refCount: number, sources: readonly ArrayBufferView[], skip: number): number;
  openChannelWriter(fd: number, onDone: (written: number, errno?: string) => void): number;
  channelWriterPush(id: number, pieces: readonly ArrayBufferView[], refs: Float64Array, refCount: number, sources: readonly ArrayBufferView[]): number;
  closeChannelWriter(id: number): number | undefined;
  openMultifdReader(fd: number, streamOffset: number, names: readonly string[], memories: readonly ArrayBufferView[], onReport: (report: MultifdReaderReport) => void): number;
  closeMultifdReader(id: number): void;
  placePages(chunk: Uint8Array, from: number, to: number, mem: Uint8Array, written: Uint32Array | undefined): number;
  placeClaimedPages(chunk: Uint8Array, from: number, to: number, mem: Uint8Array, written: Uint32Array | undefined, claimed: Int32Array, received: Int32Array): number;
}

function load(): { addon: Addon | undefined; reason: string } {
  try {
    // dist/index.js → ../build/Release (node-gyp's output, built by the package's install script).
    const addon = createRequire(import.meta.url)('../build/Release/livemig_native.node') as Addon;
    return { addon, reason: '' };
  } catch (err) {
    return { addon: undefined, reason: (err as Error).message.split('\n')[0] ?? 'unknown' };
  }
}

const loaded = load();

function addon(): Addon {
  if (loaded.addon === undefined) {
    throw new NativeError(
      NativeErrorCode.NATIVE_UNAVAILABLE,
      `the native addon (@livemig/native) is not built (${loaded.reason}); build it with \`node packages/native/scripts/build.mjs\` (needs g++, make, python3)`,
    );
  }
  return loaded.addon;
}

/** The system error name an addon failure carries (ENOENT, EACCES …). */
function errnoOf(err: unknown): string | undefined {
  const e = (err as { errno?: unknown }).errno;
  return typeof e === 'string' ? e : undefined;
}

/** What a multifd reader thread has done so far (native.openMultifdReader). */
export interface MultifdReaderReport {
  /** Normal pages placed, zero pages placed, SYNC packets: since the reader opened. */
  pages: number;
  zeroPages: number;
  syncs: number;
  /** The channel's stream offset after the last whole packet (after the last byte once ended). */
  bytes: number;
  /** 0 reading, 1 the peer ended the channel at a packet boundary, 2 failed (see message). */
  end: 0 | 1 | 2;
  /** When the last byte arrived, on libuv's clock (uv_hrtime, ns); 0 before any. */
  lastByteNs: number;
  /** A failure: what was wrong, its stream offset, whether the link (not the bytes) failed, the block named. */
  message?: string;
  offset?: number;
  lost?: boolean;
  block?: string;
}

/** A channel writer thread (native.openChannelWriter). */
export interface ChannelWriter {
  /** Queue a batch (pieces with refs into sources, as writeRefs); returns its bytes. */
  push(pieces: readonly ArrayBufferView[], refs: Float64Array, refCount: number, sources: readonly ArrayBufferView[]): number;
  /**
   * Stop the thread (what it has not written is dropped) and close its descriptor. Returns the
   * batches it wrote in all (its last reports may not have come: they never will), undefined
   * when it was closed already.
   */
  close(): number | undefined;
}

export const native = {
  /** Whether the addon loaded. */
  available: loaded.addon !== undefined,
  /** Why it did not (empty when it did). */
  unavailableReason: loaded.reason,

  /** A new memfd of `length` bytes (close-on-exec) and a SharedArrayBuffer mapping it. */
  createSharedRam(name: string, length: number): { fd: number; memory: SharedArrayBuffer } {
    const a = addon();
    let fd: number;
    try {
      fd = a.createMemfd(name, length);
    } catch (err) {
      throw new NativeError(NativeErrorCode.SHARED_MEMORY, `shared RAM "${name}" (${length} bytes): ${(err as Error).message}`, { cause: err, errno: errnoOf(err) });
    }
    try {
      return { fd, memory: a.mapShared(fd, length) };
    } catch (err) {
      a.closeFd(fd);
      throw new NativeError(NativeErrorCode.SHARED_MEMORY, `shared RAM "${name}" (${length} bytes): ${(err as Error).message}`, { cause: err, errno: errnoOf(err) });
    }
  },

  /**
   * `length` bytes (block `name`, for messages) of fresh zeroed RAM private to this process (its
   * threads share it as any SharedArrayBuffer), aligned to 2 MiB and advised to the kernel as
   * transparent huge pages with `hugePages` (where THP is "always" or "madvise"), as plain pages
   * without. Guest RAM that need not outlive an exec: the kernel copies a page into huge-page RAM
   * faster.
   */
  createPrivateRam(name: string, length: number, hugePages: boolean): SharedArrayBuffer {
    try {
      return addon().mapPrivateRam(length, hugePages);
    } catch (err) {
      if ((err as { code?: unknown }).code === NativeErrorCode.NATIVE_UNAVAILABLE) throw err;
      throw new NativeError(NativeErrorCode.SHARED_MEMORY, `RAM block "${name}" (${length} bytes): ${(err as Error).message}`, { cause: err, errno: errnoOf(err) });
    }
  },

  /** Mark an inherited descriptor close-on-exec again, so children spawned later do not get it. */
  keepPrivate(fd: number): void {
    try {
      addon().keepPrivate(fd);
    } catch (err) {
      if ((err as { code?: unknown }).code === NativeErrorCode.NATIVE_UNAVAILABLE) throw err;
      throw new NativeError(NativeErrorCode.SHARED_MEMORY, `fd ${fd}: ${(err as Error).message}`, { cause: err, errno: errnoOf(err) });
    }
  },

  /** Map an inherited memfd (at least `length` bytes) as a SharedArrayBuffer. */
  mapSharedRam(fd: number, length: number): SharedArrayBuffer {
    try {
      return addon().mapShared(fd, length);
    } catch (err) {
      if ((err as { code?: unknown }).code === NativeErrorCode.NATIVE_UNAVAILABLE) throw err;
      throw new NativeError(NativeErrorCode.SHARED_MEMORY, `mapping fd ${fd} (${length} bytes): ${(err as Error).message}`, { cause: err, errno: errnoOf(err) });
    }
  },

  closeFd(fd: number): void {
    addon().closeFd(fd);
  },

  /**
   * Write a batch to a non-blocking socket `fd` with writev, as much as the kernel takes now:
   * each of `pieces` in turn, with each ref's bytes inserted into it. Ref k is the five numbers
   * `refs[5k .. 5k+4]` = piece, at, source, offset, length: after byte `at` of `pieces[piece]`,
   * bytes `[offset, offset + length)` of `sources[source]` (refs in stream order); from the
   * batch's byte `skip` on (what an earlier call left). Returns the bytes written (fewer than
   * asked when the socket's buffer is full); a ref outside its piece or source throws RangeError
   * before anything is written; a socket error throws with its errno name in `errno`.
   */
  writeRefs(fd: number, pieces: readonly ArrayBufferView[], refs: Float64Array, refCount: number, sources: readonly ArrayBufferView[], skip = 0): number {
    return addon().writeRefs(fd, pieces, refs, refCount, sources, skip);
  },

  /**
   * A thread that writes batches (as writeRefs takes them) to the socket `fd`, in order, waiting
   * for room itself, so the kernel's copy of the pages runs beside this thread. It writes on its
   * own duplicate of `fd`: close the writer when the socket is done with (or destroyed), which
   * stops the thread at once and closes the duplicate. `onDone(written, errno)` runs on this
   * thread's event loop with the count of batches written since the writer opened, and with an
   * errno name once writing failed (nothing is written after that). A batch's memory must stay
   * as it is until it is reported written.
   */
  openChannelWriter(fd: number, onDone: (written: number, errno?: string) => void): ChannelWriter {
    const a = addon();
    const id = a.openChannelWriter(fd, onDone);
    return {
      push: (pieces, refs, refCount, sources) => a.channelWriterPush(id, pieces, refs, refCount, sources),
      close: () => a.closeChannelWriter(id),
    };
  },

  /**
   * A thread that reads multifd packets (QEMU's layout) from the socket `fd`, from stream offset
   * `streamOffset` (a packet boundary, after the init packet), and puts their pages straight
   * into the named blocks' memory, checking each header as @livemig/protocol's MultifdReceiver
   * does (same messages). It reads on its own duplicate of `fd`: stop reading the socket in Node
   * first, and close the reader when the channel is done with. `onReport` runs on this thread's
   * event loop with the counts so far (at once after each SYNC packet) and, once, how it ended.
   */
  openMultifdReader(fd: number, streamOffset: number, blocks: readonly { name: string; memory: ArrayBufferView }[], onReport: (report: MultifdReaderReport) => void): { close(): void } {
    const a = addon();
    const id = a.openMultifdReader(fd, streamOffset, blocks.map((b) => b.name), blocks.map((b) => b.memory), onReport);
    return { close: () => a.closeMultifdReader(id) };
  },

  /**
   * The destination's run of CONTINUE PAGE records in `chunk` from byte `from`, while each is
   * whole before `to` and names a page inside `mem` (the block's memory): each page copied into
   * place, its bit set in `written` (one bit per page) when given. Returns the records placed
   * (4104 bytes each); it stops at the first record it does not take.
   */
  placePages(chunk: Uint8Array, from: number, to: number, mem: Uint8Array, written?: Uint32Array): number {
    return addon().placePages(chunk, from, to, mem, written);
  },

  /**
   * placePages for postcopy, while the guest runs: each page of the run is claimed first (its bit
   * set in `claimed` with an atomic or) and copied only when this call claimed it and it is not
   * in `received`; then its `received` bit is set (atomic or, after the copy). A page another
   * thread claimed is left to it. Returns the records taken (placed or left), 4104 bytes each.
   */
  placeClaimedPages(chunk: Uint8Array, from: number, to: number, mem: Uint8Array, written: Uint32Array | undefined, claimed: Int32Array, received: Int32Array): number {
    return addon().placeClaimedPages(chunk, from, to, mem, written, claimed, received);
  },

  /**
   * Replace this process's image (same PID) with `path`, `argv` and `env` (NAME=VALUE), keeping
   * `keepFds` and stdio open. Returns only by throwing (LM_ERR_CPR_EXEC_FAILED), with this
   * process as it was.
   */
  execImage(path: string, argv: readonly string[], env: readonly string[], keepFds: readonly number[]): never {
    const a = addon();
    try {
      return a.execve(path, argv, env, keepFds);
    } catch (err) {
      throw new NativeError(NativeErrorCode.CPR_EXEC_FAILED, (err as Error).message, { cause: err, errno: errnoOf(err) });
    }
  },
};

/**
 * Where a guest's RAM blocks live when they need not outlive an exec: private huge-page RAM
 * (native.createPrivateRam) where the addon is built, else plain SharedArrayBuffers.
 */
export function guestRamAllocator(): ((idstr: string, length: number) => SharedArrayBuffer) | undefined {
  if (!native.available) return undefined;
  return (idstr, length) => native.createPrivateRam(idstr, length, true);
}

