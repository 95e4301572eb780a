// The recorded QEMU machine types (foreign-devices.ts says what a recording is). Their data is half a
// megabyte of JavaScript, ~60 ms to compile: only what looks a machine type up loads it, not the
// stream decoder (`livemig analyze` has no use for it).

import type { ForeignMachine } from './foreign-devices.ts';
import { FOREIGN_MACHINES } from './foreign-machines.data.ts';

/** The recorded machine type `machineType`, or undefined when none was recorded. */
export function recordedMachine(machineType: string): ForeignMachine | undefined {
  return FOREIGN_MACHINES.find((m) => m.machineType === machineType);
}

/** Machine types with a recording, for help texts and errors. */
export function recordedMachineTypes(): string[] {
  return FOREIGN_MACHINES.map((m) => m.machineType);
}
