// Error codes of the guest model. Same rules as @livemig/protocol's errors.ts: callers match on
// `err.code`; codes are never renamed or reused; docs/errors.md lists each.

export const GuestErrorCode = {
  /** A device could not load its section's data (DeviceLoadError). */
  DEVICE_LOAD: 'LM_ERR_DEVICE_LOAD',
  /** A guest configuration that cannot be built: RAM blocks, sizes, vCPU count, workload text. */
  BAD_GUEST_CONFIG: 'LM_ERR_BAD_GUEST_CONFIG',
  /** A vCPU worker thread exited, or did not acknowledge a stop or start in time. */
  VCPU_FAILED: 'LM_ERR_VCPU_FAILED',
  /** VFIO v1 region: a device_state write of an invalid value (101b, 111b) or of the error state (110b). EINVAL. */
  VFIO_INVALID_STATE: 'LM_ERR_VFIO_INVALID_STATE',
  /** VFIO v1 region: a device_state write the device does not take from its current state. EINVAL. */
  VFIO_BAD_TRANSITION: 'LM_ERR_VFIO_BAD_TRANSITION',
  /** VFIO v1 region: a register or data access out of the save or resume sequence, or in a state where it means nothing. EINVAL. */
  VFIO_SEQUENCE: 'LM_ERR_VFIO_SEQUENCE',
  /** VFIO v1 region: an access past data_size or the data area, of the wrong width, or a write to a read-only field. EINVAL. */
  VFIO_OUT_OF_RANGE: 'LM_ERR_VFIO_OUT_OF_RANGE',
  /** VFIO v1 region: the device is in the error state (or just entered it on resume data it cannot apply); only a reset leaves it. EIO. */
  VFIO_DEVICE_ERROR: 'LM_ERR_VFIO_DEVICE_ERROR',
} as const;

export type GuestErrorCodeValue = (typeof GuestErrorCode)[keyof typeof GuestErrorCode];

/** A guest configuration (command-line text or a GuestConfig) that cannot be used; the message says which part. */
export class GuestConfigError extends Error {
  readonly code = GuestErrorCode.BAD_GUEST_CONFIG;
  constructor(message: string) {
    super(message);
    this.name = 'GuestConfigError';
  }
}

/** A vCPU worker stopped answering (it exited, or missed the 5 s acknowledgement). `vcpu` is its index. */
export class VcpuError extends Error {
  readonly code = GuestErrorCode.VCPU_FAILED;
  readonly vcpu: number;
  constructor(vcpu: number, message: string) {
    super(message);
    this.name = 'VcpuError';
    this.vcpu = vcpu;
  }
}
