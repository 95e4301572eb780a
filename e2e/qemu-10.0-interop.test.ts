// The QEMU interop suite (helpers/qemu-interop.ts) against QEMU 10.0, which .ci/install-qemu-10.0
// unpacks to /opt/qemu-10.0 (LIVEMIG_QEMU_10 and LIVEMIG_QEMU_10_DATA name another). The suite
// reads the binary when it loads, so it is imported after the environment is set.
const root = '/opt/qemu-10.0';
process.env['LIVEMIG_QEMU'] = process.env['LIVEMIG_QEMU_10'] ?? `${root}/usr/bin/qemu-system-x86_64`;
process.env['LIVEMIG_QEMU_DATA'] = process.env['LIVEMIG_QEMU_10_DATA'] ?? `${root}/usr/share/qemu`;
process.env['LIVEMIG_QEMU_LABEL'] = 'QEMU 10.0';
await import('./helpers/qemu-interop.ts');
await import('./helpers/qemu-recovery.ts');
await import('./helpers/qemu-machine-types.ts');
