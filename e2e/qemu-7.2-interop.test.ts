// The QEMU interop suite (helpers/qemu-interop.ts) against the system's QEMU 7.2 (Debian 12's
// qemu-system-x86, or LIVEMIG_QEMU), postcopy recovery with it (helpers/qemu-recovery.ts) and its pc
// machine types through livemig (helpers/qemu-machine-types.ts).
import './helpers/qemu-interop.ts';
import './helpers/qemu-recovery.ts';
import './helpers/qemu-machine-types.ts';
