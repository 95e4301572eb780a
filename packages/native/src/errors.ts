// Error codes of the native addon and of cpr-exec. Same rules as @livemig/protocol's errors.ts:
// callers match on `err.code`; codes are never renamed or reused; docs/errors.md lists each.

export const NativeErrorCode = {
  /** The addon is not built or does not load here (not Linux, no compiler at install time). */
  NATIVE_UNAVAILABLE: 'LM_ERR_NATIVE_UNAVAILABLE',
  /** Creating or mapping shared guest RAM failed (memfd_create, ftruncate, mmap; `errno` says why). */
  SHARED_MEMORY: 'LM_ERR_SHARED_MEMORY',
  /** cpr-exec: execve of the new image failed (`errno`); the old image runs on. */
  CPR_EXEC_FAILED: 'LM_ERR_CPR_EXEC_FAILED',
  /** cpr-exec: the new image cannot take over (its RAM descriptors or state file missing or not matching its guest). */
  CPR_INCOMING: 'LM_ERR_CPR_INCOMING',
} as const;

export type NativeErrorCodeValue = (typeof NativeErrorCode)[keyof typeof NativeErrorCode];

/** A failure of the addon or of a cpr-exec step. `errno`: the system error's name, when there was one. */
export class NativeError extends Error {
  readonly code: NativeErrorCodeValue;
  readonly errno: string | undefined;
  constructor(code: NativeErrorCodeValue, message: string, options?: { cause?: unknown; errno?: string | undefined }) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'NativeError';
    this.code = code;
    this.errno = options?.errno;
  }
}
