// A real headless browser for the report tests: Debian's `chromium` (LIVEMIG_CHROMIUM names
// another binary). Each run gets a fresh profile directory, the flags that keep it off the
// network, its own process group (killed by pid when it overstays), and a bounded wait.
// decodePng reads back what --screenshot wrote, enough to check its size and its colours.

import { spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { inflateSync } from 'node:zlib';

const CHROMIUM = process.env['LIVEMIG_CHROMIUM'] ?? 'chromium';
const MISSING = `${CHROMIUM} not found (Debian: apt-get install -y --no-install-recommends chromium; .ci/run installs it)`;

let version: string | null | undefined;

export function chromiumVersion(): string | null {
  if (version === undefined) {
    const r = spawnSync(CHROMIUM, ['--version'], { encoding: 'utf8', timeout: 30_000 });
    version = r.status === 0 ? r.stdout.trim() : null;
  }
  return version;
}

/** node:test `skip` for a browser test: the reason when chromium is missing locally; never under CI=true (it fails there). */
export function chromiumSkip(): string | false {
  if (chromiumVersion() !== null) return false;
  return process.env['CI'] === 'true' ? false : MISSING;
}

/** Flags for a headless run as root that never reaches for the network. */
const FLAGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--disable-default-apps',
  '--disable-extensions',
];

/** Run chromium with `args` in a fresh profile under `dir`; its stdout. Bounded by timeoutMs. */
export function runChromium(dir: string, args: string[], timeoutMs = 60_000): Promise<{ code: number | null; stdout: string; stderr: string }> {
  if (chromiumVersion() === null) throw new Error(MISSING);
  const profile = mkdtempSync(join(dir, 'chromium-profile-'));
  const child = spawn(CHROMIUM, [...FLAGS, `--user-data-dir=${profile}`, ...args], { stdio: ['ignore', 'pipe', 'pipe'], detached: true });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      // Its renderer and helper processes share its group: end them all, by the group's pid.
      try {
        process.kill(-child.pid!, 'SIGKILL');
      } catch {
        // already gone
      }
      reject(new Error(`chromium did not finish within ${timeoutMs} ms: ${stderr.slice(-2000)}`));
    }, timeoutMs);
    child.on('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
    child.on('exit', (code) => {
      clearTimeout(timer);
      // Helpers it left behind (if any) go with the group.
      try {
        process.kill(-child.pid!, 'SIGKILL');
      } catch {
        // none left
      }
      rmSync(profile, { recursive: true, force: true });
      resolve({ code, stdout, stderr });
    });
  });
}

export interface DecodedPng {
  width: number;
  height: number;
  /** Distinct RGB colours (counted up to `limit`). */
  distinctColours: number;
}

/** The paeth predictor of the PNG spec. */
function paeth(a: number, b: number, c: number): number {
  const p = a + b - c;
  const pa = Math.abs(p - a);
  const pb = Math.abs(p - b);
  const pc = Math.abs(p - c);
  return pa <= pb && pa <= pc ? a : pb <= pc ? b : c;
}

/** Decode an 8-bit RGB or RGBA, non-interlaced PNG (what chromium's --screenshot writes). */
export function decodePng(png: Buffer, limit = 100_000): DecodedPng {
  const SIGNATURE = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);
  if (!png.subarray(0, 8).equals(SIGNATURE)) throw new Error('not a PNG (bad signature)');
  let off = 8;
  let width = 0;
  let height = 0;
  let channels = 0;
  const idat: Buffer[] = [];
  while (off + 8 <= png.length) {
    const len = png.readUInt32BE(off);
    const type = png.toString('latin1', off + 4, off + 8);
    const data = png.subarray(off + 8, off + 8 + len);
    if (type === 'IHDR') {
      width = data.readUInt32BE(0);
      height = data.readUInt32BE(4);
      const depth = data[8];
      const colourType = data[9];
      if (depth !== 8 || (colourType !== 2 && colourType !== 6) || data[12] !== 0) throw new Error(`PNG depth ${depth} colour type ${colourType} interlace ${data[12]} not handled`);
      channels = colourType === 6 ? 4 : 3;
    } else if (type === 'IDAT') idat.push(data);
    else if (type === 'IEND') break;
    off += 12 + len;
  }
  const raw = inflateSync(Buffer.concat(idat));
  const stride = width * channels;
  const pixels = Buffer.alloc(stride * height);
  for (let y = 0; y < height; y++) {
    const filter = raw[y * (stride + 1)]!;
    const src = y * (stride + 1) + 1;
    const row = y * stride;
    for (let i = 0; i < stride; i++) {
      const x = raw[src + i]!;
      const a = i >= channels ? pixels[row + i - channels]! : 0;
      const b = y > 0 ? pixels[row - stride + i]! : 0;
      const c = i >= channels && y > 0 ? pixels[row - stride + i - channels]! : 0;
      const predicted = filter === 0 ? 0 : filter === 1 ? a : filter === 2 ? b : filter === 3 ? (a + b) >> 1 : paeth(a, b, c);
      pixels[row + i] = (x + predicted) & 0xff;
    }
  }
  const colours = new Set<number>();
  for (let p = 0; p < width * height && colours.size < limit; p++) {
    const o = p * channels;
    colours.add(pixels[o]! * 65536 + pixels[o + 1]! * 256 + pixels[o + 2]!);
  }
  return { width, height, distinctColours: colours.size };
}
