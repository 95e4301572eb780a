// The source process's own coded errors (docs/errors.md).

export const SourceErrorCode = {
  /** `--load-state FILE`: the file cannot be read or does not load into this guest. */
  BAD_STATE_FILE: 'LM_ERR_BAD_STATE_FILE',
} as const;

/** `livemig-source --load-state FILE` cannot start from that file; `cause` is the decoder's or device's error. */
export class StateFileError extends Error {
  readonly code = SourceErrorCode.BAD_STATE_FILE;
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'StateFileError';
  }
}
