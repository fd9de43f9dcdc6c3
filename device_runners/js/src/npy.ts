/**
 * `.npy` / `.npz` reading and writing, no dependencies.
 *
 * Reads the dtypes edgetl bundles and device data use: float16/32/64, (u)int8/16/32/64, bool
 * and little-endian unicode strings (`<U`); object arrays (pickles) are refused. `.npz`
 * members may be stored or deflated (`np.savez_compressed`); deflate goes through the
 * platform's `DecompressionStream("deflate-raw")` (Node 18+, browsers). Writes uncompressed
 * `.npz` (`np.savez`) of float32 arrays and unicode strings, which numpy reads back.
 */
import { RunnerError } from "./errors.js";

export type NumericData =
  | Float32Array | Float64Array | Int8Array | Uint8Array | Int16Array | Uint16Array
  | Int32Array | Uint32Array | BigInt64Array | BigUint64Array;

/** One array: numpy dtype string (e.g. `<f4`), shape, and flat data in C order. */
export interface NdArray {
  dtype: string;
  shape: number[];
  data: NumericData | string[];
}

export function size(shape: readonly number[]): number {
  return shape.reduce((a, b) => a * b, 1);
}

function halfToFloat(h: number): number {
  const s = h & 0x8000 ? -1 : 1;
  const e = (h >> 10) & 0x1f;
  const f = h & 0x3ff;
  if (e === 0) return s * 2 ** -14 * (f / 1024);
  if (e === 31) return f ? NaN : s * Infinity;
  return s * 2 ** (e - 15) * (1 + f / 1024);
}

/** Parse one `.npy` file. */
export function parseNpy(bytes: Uint8Array, name = "array"): NdArray {
  const magic = [0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59];
  if (bytes.length < 10 || magic.some((v, i) => bytes[i] !== v)) {
    throw new RunnerError(`${name} is not a .npy array (bad magic); save it with numpy`);
  }
  const major = bytes[6];
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const hlen = major === 1 ? dv.getUint16(8, true) : dv.getUint32(8, true);
  const hstart = major === 1 ? 10 : 12;
  const header = new TextDecoder("latin1").decode(bytes.subarray(hstart, hstart + hlen));
  const descr = /'descr':\s*'([^']+)'/.exec(header)?.[1];
  const fortran = /'fortran_order':\s*(True|False)/.exec(header)?.[1];
  const shapeText = /'shape':\s*\(([^)]*)\)/.exec(header)?.[1];
  if (descr === undefined || fortran === undefined || shapeText === undefined) {
    throw new RunnerError(`${name}: unreadable .npy header ${JSON.stringify(header.slice(0, 80))}`);
  }
  if (fortran === "True") {
    throw new RunnerError(`${name} is in Fortran order; save it with np.ascontiguousarray`);
  }
  const shape = shapeText.split(",").map((s) => s.trim()).filter((s) => s !== "").map(Number);
  const n = size(shape);
  const start = hstart + hlen;
  // an aligned copy at offset 0 of its own buffer (a Node Buffer's slice() is a view into a
  // shared pool, so .buffer would not start at the data)
  const body = new Uint8Array(bytes.byteLength - start);
  body.set(bytes.subarray(start));
  const order = descr[0];
  const kind = descr[1];
  const width = Number(descr.slice(2));
  if (order === ">" && width > 1) {
    throw new RunnerError(`${name}: big-endian dtype ${descr} is not supported; save it with ` +
      "little-endian numpy (arr.astype(arr.dtype.newbyteorder('<')))");
  }
  if (descr === "|O" || kind === "O" || kind === "V") {
    throw new RunnerError(`${name}: dtype ${descr} (object/record) is not readable without ` +
      "pickle; save plain numeric or string arrays");
  }
  const need = kind === "U" ? n * width * 4 : n * width;
  if (body.length < need) {
    throw new RunnerError(`${name} is truncated: ${body.length} bytes of data, ${need} needed`);
  }
  const buf = body.buffer;
  let data: NumericData | string[];
  if (kind === "U") {
    const out: string[] = [];
    const u = new DataView(buf);
    for (let i = 0; i < n; i++) {
      let s = "";
      for (let j = 0; j < width; j++) {
        const cp = u.getUint32((i * width + j) * 4, true);
        if (cp === 0) break;
        s += String.fromCodePoint(cp);
      }
      out.push(s);
    }
    data = out;
  } else if (kind === "S") { // bytes strings (np.array([b'walk'])): decoded as latin-1
    const out: string[] = [];
    const b = new Uint8Array(buf);
    for (let i = 0; i < n; i++) {
      let s = "";
      for (let j = 0; j < width; j++) {
        const c = b[i * width + j];
        if (c === 0) break;
        s += String.fromCharCode(c);
      }
      out.push(s);
    }
    data = out;
  } else {
    const key = kind + width;
    switch (key) {
      case "f2": {
        const h = new Uint16Array(buf, 0, n);
        const f = new Float32Array(n);
        for (let i = 0; i < n; i++) f[i] = halfToFloat(h[i]);
        data = f;
        break;
      }
      case "f4": data = new Float32Array(buf, 0, n); break;
      case "f8": data = new Float64Array(buf, 0, n); break;
      case "i1": data = new Int8Array(buf, 0, n); break;
      case "u1": case "b1": data = new Uint8Array(buf, 0, n); break;
      case "i2": data = new Int16Array(buf, 0, n); break;
      case "u2": data = new Uint16Array(buf, 0, n); break;
      case "i4": data = new Int32Array(buf, 0, n); break;
      case "u4": data = new Uint32Array(buf, 0, n); break;
      case "i8": data = new BigInt64Array(buf, 0, n); break;
      case "u8": data = new BigUint64Array(buf, 0, n); break;
      default:
        throw new RunnerError(`${name}: dtype ${descr} is not supported (float, int, bool, ` +
          "unicode string arrays are)");
    }
  }
  return { dtype: descr, shape, data };
}

/** The values of a numeric array as float32 (any numeric dtype). */
export function asFloat32(a: NdArray, name = "array"): Float32Array {
  if (Array.isArray(a.data)) {
    throw new RunnerError(`${name} must be numeric, found dtype ${a.dtype}`);
  }
  if (a.data instanceof Float32Array) return a.data;
  const out = new Float32Array(a.data.length);
  for (let i = 0; i < out.length; i++) out[i] = Number(a.data[i]);
  return out;
}

/** The values of an integer array as plain numbers. */
export function asNumbers(a: NdArray, name = "array"): number[] {
  if (Array.isArray(a.data)) throw new RunnerError(`${name} must be numeric, found ${a.dtype}`);
  return Array.from(a.data as ArrayLike<number | bigint>, (v) => Number(v));
}

export function asStrings(a: NdArray, name = "array"): string[] {
  if (!Array.isArray(a.data)) {
    throw new RunnerError(`${name} must hold strings (e.g. np.array(['walking', ...])), found ` +
      `dtype ${a.dtype}`);
  }
  return a.data;
}

/** Inflate raw deflate data with the platform's DecompressionStream. */
export async function inflateRaw(data: Uint8Array): Promise<Uint8Array> {
  const DS = (globalThis as { DecompressionStream?: new (f: string) => TransformStream })
    .DecompressionStream;
  if (!DS) {
    throw new RunnerError("this platform has no DecompressionStream for compressed .npz files; " +
      "save the data with np.savez (uncompressed) instead of np.savez_compressed");
  }
  const stream = new Blob([data.slice() as Uint8Array<ArrayBuffer>]).stream().pipeThrough(new DS("deflate-raw"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

/** Every array of an `.npz` (a zip of `.npy` files), by name (without `.npy`). */
export async function parseNpz(bytes: Uint8Array, name = "npz"): Promise<Map<string, NdArray>> {
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  // end of central directory: search backwards for its signature
  let eocd = -1;
  for (let i = bytes.length - 22; i >= Math.max(0, bytes.length - 22 - 65535); i--) {
    if (dv.getUint32(i, true) === 0x06054b50) { eocd = i; break; }
  }
  if (eocd < 0) {
    throw new RunnerError(`${name} is not an .npz (no zip directory); save it with np.savez`);
  }
  let count = dv.getUint16(eocd + 10, true);
  let cdir = dv.getUint32(eocd + 16, true);
  if (cdir === 0xffffffff || count === 0xffff) { // zip64
    const loc = eocd - 20;
    if (loc < 0 || dv.getUint32(loc, true) !== 0x07064b50) {
      throw new RunnerError(`${name}: damaged zip64 directory`);
    }
    const z64 = Number(dv.getBigUint64(loc + 8, true));
    count = Number(dv.getBigUint64(z64 + 32, true));
    cdir = Number(dv.getBigUint64(z64 + 48, true));
  }
  const out = new Map<string, NdArray>();
  let p = cdir;
  for (let k = 0; k < count; k++) {
    if (p + 46 > bytes.length || dv.getUint32(p, true) !== 0x02014b50) {
      throw new RunnerError(`${name}: damaged zip directory (truncated or corrupt file)`);
    }
    const method = dv.getUint16(p + 10, true);
    let csize = dv.getUint32(p + 20, true);
    let usize = dv.getUint32(p + 24, true);
    const nlen = dv.getUint16(p + 28, true);
    const xlen = dv.getUint16(p + 30, true);
    const clen = dv.getUint16(p + 32, true);
    let local = dv.getUint32(p + 42, true);
    const fname = new TextDecoder().decode(bytes.subarray(p + 46, p + 46 + nlen));
    // zip64 extra field: sizes/offset that overflowed 32 bits, in this order
    let x = p + 46 + nlen;
    const xend = x + xlen;
    while (x + 4 <= xend) {
      const id = dv.getUint16(x, true);
      const len = dv.getUint16(x + 2, true);
      if (id === 0x0001) {
        let q = x + 4;
        if (usize === 0xffffffff) { usize = Number(dv.getBigUint64(q, true)); q += 8; }
        if (csize === 0xffffffff) { csize = Number(dv.getBigUint64(q, true)); q += 8; }
        if (local === 0xffffffff) { local = Number(dv.getBigUint64(q, true)); q += 8; }
      }
      x += 4 + len;
    }
    p = xend + clen;
    if (dv.getUint32(local, true) !== 0x04034b50) {
      throw new RunnerError(`${name}: damaged zip entry ${fname}`);
    }
    const start = local + 30 + dv.getUint16(local + 26, true) + dv.getUint16(local + 28, true);
    if (start + csize > bytes.length) {
      throw new RunnerError(`${name} is truncated (entry ${fname} runs past the end)`);
    }
    const raw = bytes.subarray(start, start + csize);
    let body: Uint8Array;
    if (method === 0) body = raw;
    else if (method === 8) body = await inflateRaw(raw);
    else {
      throw new RunnerError(`${name}: entry ${fname} uses zip method ${method}; only stored ` +
        "and deflated entries are read (np.savez / np.savez_compressed)");
    }
    if (body.length !== usize) {
      throw new RunnerError(`${name}: entry ${fname} is damaged (${body.length} bytes, ` +
        `${usize} declared)`);
    }
    const key = fname.endsWith(".npy") ? fname.slice(0, -4) : fname;
    out.set(key, parseNpy(body, `${name}:${fname}`));
  }
  return out;
}

function npyHeader(descr: string, shape: number[]): Uint8Array {
  const sh = shape.length === 1 ? `(${shape[0]},)` : `(${shape.join(", ")})`;
  let h = `{'descr': '${descr}', 'fortran_order': False, 'shape': ${sh}, }`;
  const total = 10 + h.length + 1;
  h += " ".repeat((64 - (total % 64)) % 64) + "\n";
  const out = new Uint8Array(10 + h.length);
  out.set([0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, 1, 0]);
  new DataView(out.buffer).setUint16(8, h.length, true);
  for (let i = 0; i < h.length; i++) out[10 + i] = h.charCodeAt(i);
  return out;
}

/** A `.npy` file of float32 data, or of unicode strings (`<U{max length}`). */
export function writeNpy(a: NdArray): Uint8Array {
  let descr: string;
  let body: Uint8Array;
  if (Array.isArray(a.data)) {
    const cps = a.data.map((s) => Array.from(s, (c) => c.codePointAt(0) as number));
    const width = Math.max(1, ...cps.map((c) => c.length));
    descr = `<U${width}`;
    const u = new Uint32Array(cps.length * width);
    cps.forEach((c, i) => u.set(c, i * width));
    body = new Uint8Array(u.buffer);
  } else if (a.data instanceof Float32Array) {
    descr = "<f4";
    body = new Uint8Array(a.data.buffer, a.data.byteOffset, a.data.byteLength);
  } else {
    throw new RunnerError("writeNpy writes float32 and string arrays only");
  }
  const head = npyHeader(descr, a.shape);
  const out = new Uint8Array(head.length + body.length);
  out.set(head);
  out.set(body, head.length);
  return out;
}

let crcTable: Uint32Array | undefined;
function crc32(b: Uint8Array): number {
  if (!crcTable) {
    crcTable = new Uint32Array(256);
    for (let n = 0; n < 256; n++) {
      let c = n;
      for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
      crcTable[n] = c >>> 0;
    }
  }
  let c = 0xffffffff;
  for (let i = 0; i < b.length; i++) c = crcTable[(c ^ b[i]) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

/** An uncompressed `.npz` (as `np.savez` writes) of the given arrays, in order. */
export function writeNpz(arrays: Array<[string, NdArray]>): Uint8Array {
  const parts: Uint8Array[] = [];
  const central: Uint8Array[] = [];
  let offset = 0;
  const enc = new TextEncoder();
  for (const [key, arr] of arrays) {
    const data = writeNpy(arr);
    const name = enc.encode(key + ".npy");
    const crc = crc32(data);
    const lh = new Uint8Array(30 + name.length);
    const l = new DataView(lh.buffer);
    l.setUint32(0, 0x04034b50, true); l.setUint16(4, 20, true); l.setUint16(8, 0, true);
    l.setUint16(10, 0, true); l.setUint16(12, 0x21, true); // 1980-01-01 00:00
    l.setUint32(14, crc, true); l.setUint32(18, data.length, true);
    l.setUint32(22, data.length, true); l.setUint16(26, name.length, true);
    lh.set(name, 30);
    const ch = new Uint8Array(46 + name.length);
    const c = new DataView(ch.buffer);
    c.setUint32(0, 0x02014b50, true); c.setUint16(4, 20, true); c.setUint16(6, 20, true);
    c.setUint16(14, 0x21, true); c.setUint32(16, crc, true);
    c.setUint32(20, data.length, true); c.setUint32(24, data.length, true);
    c.setUint16(28, name.length, true); c.setUint32(42, offset, true);
    ch.set(name, 46);
    parts.push(lh, data);
    central.push(ch);
    offset += lh.length + data.length;
  }
  const cdSize = central.reduce((a, b) => a + b.length, 0);
  const end = new Uint8Array(22);
  const e = new DataView(end.buffer);
  e.setUint32(0, 0x06054b50, true); e.setUint16(8, arrays.length, true);
  e.setUint16(10, arrays.length, true); e.setUint32(12, cdSize, true);
  e.setUint32(16, offset, true);
  const all = [...parts, ...central, end];
  const out = new Uint8Array(all.reduce((a, b) => a + b.length, 0));
  let p = 0;
  for (const b of all) { out.set(b, p); p += b.length; }
  return out;
}
