// QMP x-livemig-save-state: write what this destination holds — guest RAM and every device,
// QEMU's carried ones included — as a stream file in its machine type's dialect, the form QEMU
// writes with `migrate "exec:cat > FILE"`. `livemig-source --load-state FILE` starts from it, so a
// guest a QEMU migrated into livemig goes on to another QEMU (QEMU → livemig → QEMU).
//
//   header | configuration? | RAM START: MEM_SIZE, EOS, footer? | RAM END: a PAGE or ZERO record
//   per page, EOS, footer? | FULL section per device (+ footer?) | EOF

import { open } from 'node:fs/promises';
import type { Guest } from '@livemig/guest';
import {
  BatchWriter,
  RamFlag,
  streamDialect,
  TARGET_PAGE_SIZE,
  writeConfiguration,
  writeEof,
  writeEos,
  writeMemSize,
  writeSectionFooter,
  writeSectionHeader,
  writeStreamHeader,
} from '@livemig/protocol';

const RAM_SECTION_ID = 2;
const ZERO_PAGE = Buffer.alloc(TARGET_PAGE_SIZE);
/** Written out about this often, so the writer's slabs stay few. */
const BATCH_BYTES = 4 * 1024 * 1024;

export async function saveStateFile(guest: Guest, machineType: string, path: string): Promise<number> {
  const dialect = streamDialect(machineType);
  const file = await open(path, 'w');
  let written = 0;
  const w = new BatchWriter();
  const flush = async (): Promise<void> => {
    for (const piece of w.flush()) {
      await file.write(piece);
      written += piece.length;
    }
  };
  try {
    writeStreamHeader(w);
    if (dialect.configuration) writeConfiguration(w, { machineType });
    const blocks = guest.ram.blocks;
    writeSectionHeader(w, { kind: 'start', sectionId: RAM_SECTION_ID, idstr: 'ram', instanceId: 0, versionId: 4 });
    writeMemSize(w, blocks.map((b) => ({ idstr: b.idstr, length: b.length })));
    writeEos(w);
    writeSectionFooter(w, RAM_SECTION_ID, dialect.sectionFooters);
    writeSectionHeader(w, { kind: 'end', sectionId: RAM_SECTION_ID });
    for (const b of blocks) {
      const ram = Buffer.from(b.bytes.buffer, b.bytes.byteOffset, b.length);
      for (let offset = 0; offset < b.length; offset += TARGET_PAGE_SIZE) {
        const zero = ZERO_PAGE.compare(ram, offset, offset + TARGET_PAGE_SIZE) === 0;
        const flags = (zero ? RamFlag.ZERO : RamFlag.PAGE) | (offset === 0 ? 0 : RamFlag.CONTINUE);
        w.be64(offset + flags);
        if (offset === 0) w.cstr(b.idstr);
        if (zero) w.u8(0);
        else w.bytes(ram, offset, TARGET_PAGE_SIZE);
        if (w.totalBytes - written >= BATCH_BYTES) await flush();
      }
    }
    writeEos(w);
    writeSectionFooter(w, RAM_SECTION_ID, dialect.sectionFooters);
    let sectionId = RAM_SECTION_ID + 1;
    for (const dev of guest.devices) {
      writeSectionHeader(w, { kind: 'full', sectionId, idstr: dev.idstr, instanceId: dev.instanceId, versionId: dev.versionId });
      w.bytes(dev.save());
      writeSectionFooter(w, sectionId++, dialect.sectionFooters);
    }
    writeEof(w);
    await flush();
  } finally {
    await file.close();
  }
  return written;
}
