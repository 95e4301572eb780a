// Writes src/foreign-machines.data.ts: for each QEMU machine type livemig carries (it emulates
// none of their devices), the RAM blocks QEMU creates and the VMDESCRIPTION of every device
// section, as QEMU itself writes them for one fixed command line. Run from the repo root with
// both QEMUs installed (qemu-system-x86_64 is 7.2; 10.0 unpacked by .ci/install-qemu-10.0):
//
//   node --import tsx packages/protocol/scripts/make-foreign-machines.ts [/opt/qemu-10.0]
//
// Each machine type is recorded three times — never run (-S), and after its firmware ran for 1 s
// and for 3 s — and the descriptions merged: fields must agree, subsections (sent only when
// a device needs them) are united, so a destination accepts any of them.

import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { type ForeignMachine, mergeVmsd } from '../src/foreign-devices.ts';
import { findVmdescription, parseVmdescription, type VmdescDevice, VmdescLayouts } from '../src/vmdesc.ts';
import { MigCmd } from '../src/constants.ts';
import { NEED_MORE, StreamDecoder } from '../src/stream-decoder.ts';
import { migrationEnded, withQemu } from './qemu-qmp.ts';

const here = dirname(fileURLToPath(import.meta.url));
const root10 = process.argv[2] ?? '/opt/qemu-10.0';
const QEMUS = {
  '7.2': { binary: 'qemu-system-x86_64', data: [] as string[] },
  '10.0': { binary: join(root10, 'usr/bin/qemu-system-x86_64'), data: ['-L', join(root10, 'usr/share/qemu')] },
};
type QemuName = keyof typeof QEMUS;

const MACHINES: { machineType: string; qemu: QemuName }[] = [
  { machineType: 'pc-q35-10.0', qemu: '10.0' },
  { machineType: 'pc-i440fx-10.0', qemu: '10.0' },
  { machineType: 'pc-q35-7.2', qemu: '7.2' },
  { machineType: 'pc-i440fx-7.2', qemu: '7.2' },
  // The oldest machine type QEMU 7.2 offers: no configuration record, no section footers.
  { machineType: 'pc-i440fx-1.4', qemu: '7.2' },
];
/**
 * The recordings merged per machine type: seconds the firmware runs first (0: never started),
 * and guest RAM (some subsections depend on it: fw_cfg/acpi_mr on the ACPI tables' sizes).
 */
const RUNS = [
  { seconds: 0, memory: '16M' },
  { seconds: 1, memory: '16M' },
  { seconds: 3, memory: '16M' },
  { seconds: 0, memory: '64M' },
  { seconds: 2, memory: '256M' },
];

/** The command line the descriptions hold for: -nodefaults (no NIC, no VGA), a fixed CPU model, TCG. */
export function machineArgs(machineType: string, memory = '16M'): string[] {
  return ['-nodefaults', '-display', 'none', '-machine', `${machineType},accel=tcg`, '-cpu', 'qemu64', '-m', memory];
}

/** `info ramblock` rows: name and used length. */
function ramBlocks(text: string): { idstr: string; length: number }[] {
  const out: { idstr: string; length: number }[] = [];
  for (const line of text.split('\n').slice(1)) {
    const cols = line.trim().split(/\s+/);
    if (cols.length < 6 || !cols[4]!.startsWith('0x')) continue;
    out.push({ idstr: cols[0]!, length: Number(BigInt(cols[4]!)) });
  }
  return out;
}

/** Each device section's data in hex, by "name#instance", measured by the stream's own VMDESCRIPTION. */
function sectionData(stream: Buffer, layouts: VmdescLayouts): Map<string, string> {
  const decoder = new StreamDecoder({
    ram: { attachBlocks: (blocks) => blocks.map((b) => new Uint8Array(b.length)) },
    deviceLayout: (s, kind) => layouts.take(s.idstr, s.instanceId, kind),
    maxCommand: MigCmd.SWITCHOVER_START + 1,
    expectFooters: 'auto',
  });
  const out = new Map<string, string>();
  decoder.push(stream);
  for (let ev = decoder.next(); ev !== NEED_MORE; ev = decoder.next()) {
    if (ev.kind === 'sectionEnd' && ev.data !== undefined) out.set(`${ev.idstr}#${ev.instanceId}`, ev.data.toString('hex'));
  }
  decoder.end();
  return out;
}

async function record(machineType: string, qemu: QemuName, runSeconds: number, memory: string, work: string): Promise<{ devices: VmdescDevice[]; blocks: { idstr: string; length: number }[]; data: Map<string, string> }> {
  const name = `${machineType}-${runSeconds}-${memory}`;
  const sock = join(work, `${name}.qmp`);
  const mig = join(work, `${name}.mig`);
  const args = [...QEMUS[qemu].data, ...machineArgs(machineType, memory), '-S', '-qmp', `unix:${sock},server=on,wait=off`];
  return withQemu(QEMUS[qemu].binary, args, sock, async (qmp) => {
    if (runSeconds > 0) {
      await qmp.execute('cont');
      await new Promise((r) => setTimeout(r, runSeconds * 1000));
      await qmp.execute('stop');
    }
    const blocks = ramBlocks(String(await qmp.execute('human-monitor-command', { 'command-line': 'info ramblock' })));
    await qmp.execute('migrate', { uri: `exec:cat > ${mig}` });
    await migrationEnded(qmp, name);
    await qmp.execute('quit').catch(() => undefined);
    const stream = readFileSync(mig);
    const found = findVmdescription(stream.subarray(Math.max(0, stream.length - 1024 * 1024)), 0);
    if (found === undefined) throw new Error(`${name}: no VMDESCRIPTION at the end of the stream`);
    const desc = parseVmdescription(found.json, found.offset);
    return { devices: desc.devices, blocks, data: sectionData(stream, new VmdescLayouts(desc)) };
  });
}

async function machine(m: (typeof MACHINES)[number], work: string): Promise<ForeignMachine> {
  let devices: VmdescDevice[] | undefined;
  let blocks: { idstr: string; length: number }[] | undefined;
  let initial: Map<string, string> | undefined;
  for (const run of RUNS) {
    const r = await record(m.machineType, m.qemu, run.seconds, run.memory, work);
    // Only the block -m sizes may differ between recordings.
    const fixed = (bs: { idstr: string; length: number }[]): string => bs.filter((b) => b.idstr !== 'pc.ram').map((b) => `${b.idstr}:${b.length}`).join(' ');
    if (blocks !== undefined && fixed(blocks) !== fixed(r.blocks)) throw new Error(`${m.machineType}: RAM blocks differ with -m ${run.memory}: ${fixed(blocks)} vs ${fixed(r.blocks)}`);
    blocks ??= r.blocks;
    initial ??= r.data;
    if (devices === undefined) {
      devices = r.devices;
      continue;
    }
    // Some sections are optional (an old machine type's globalstate is sent only in some run
    // states): the union, each in its place after the one it followed.
    const merged = [...devices];
    let at = 0;
    for (const d of r.devices) {
      const i = merged.findIndex((x) => x.name === d.name && x.instance_id === d.instance_id);
      if (i < 0) merged.splice(at, 0, d);
      else merged[i] = mergeVmsd(merged[i]!, d, `${m.machineType} ${d.name}`);
      at = (i < 0 ? at : i) + 1;
    }
    devices = merged;
  }
  return {
    machineType: m.machineType,
    qemuVersion: m.qemu,
    commandLine: ['qemu-system-x86_64', ...machineArgs(m.machineType)].join(' '),
    // The block sized by -m is pc.ram on every pc machine type.
    ramBlocks: blocks!.map((b) => (b.idstr === 'pc.ram' ? { ...b, main: true as const } : b)),
    devices: devices!,
    initialData: devices!.map((d) => initial!.get(`${d.name}#${d.instance_id}`) ?? ''),
  };
}

/** One machine per block, one device per line: a re-recording shows as a readable diff. */
function machineText(m: ForeignMachine): string {
  const { devices, initialData, ...head } = m;
  const headText = JSON.stringify(head).slice(0, -1);
  const lines = (xs: unknown[]): string => xs.map((x) => `  ${JSON.stringify(x)}`).join(',\n');
  return `${headText},"devices":[\n${lines(devices)}\n],"initialData":[\n${lines(initialData)}\n]}`;
}

const work = mkdtempSync(join(tmpdir(), 'foreign-machines-'));
try {
  const machines: ForeignMachine[] = [];
  for (const m of MACHINES) {
    machines.push(await machine(m, work));
    process.stderr.write(`${m.machineType}: ${machines.at(-1)!.devices.length} device sections\n`);
  }
  const text =
    '// Generated by scripts/make-foreign-machines.ts from QEMU 7.2 and 10.0 (see foreign-devices.ts): do not edit.\n' +
    "import type { ForeignMachine } from './foreign-devices.ts';\n\n" +
    `export const FOREIGN_MACHINES: readonly ForeignMachine[] = [\n${machines.map(machineText).join(',\n')},\n];\n`;
  writeFileSync(join(here, '../src/foreign-machines.data.ts'), text);
} finally {
  rmSync(work, { recursive: true, force: true });
}
