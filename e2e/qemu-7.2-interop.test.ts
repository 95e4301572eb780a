// The QEMU interop suite (helpers/qemu-interop.ts) against the system's QEMU 7.2 (Debian 12's
// qemu-system-x86, or LIVEMIG_QEMU).
import './helpers/qemu-interop.ts';
import './helpers/qemu-machine-types.ts';
