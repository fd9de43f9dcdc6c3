/** Node helpers: a bundle from a directory, data from a file, atomic writes, LiteRT.js. */
import { promises as fs, readFileSync } from "node:fs";
import { createRequire } from "node:module";
import * as path from "node:path";
import vm from "node:vm";
import type { LiteRt } from "./litert.js";
import { Bundle, BundleOptions, MANIFEST, MAX_MANIFEST_BYTES, SIGNATURE } from "./bundle.js";
import { parseManifest } from "./check.js";
import { Dataset } from "./data.js";
import { loadDataBytes } from "./load.js";
import { RunnerError } from "./errors.js";
import { Manifest } from "./manifest.js";

async function readRegular(p: string, what: string, maxBytes?: number): Promise<Uint8Array> {
  let st;
  try { st = await fs.stat(p); } catch {
    throw new RunnerError(`${what} ${p} does not exist`);
  }
  if (!st.isFile()) throw new RunnerError(`${what} ${p} is not a regular file`);
  if (maxBytes !== undefined && st.size > maxBytes) {
    throw new RunnerError(`${p} is ${(st.size / 2 ** 20).toFixed(1)} MiB, above the ` +
      `${maxBytes / 2 ** 20} MiB limit for one ${what}; split it or raise --max-data-mb`);
  }
  return new Uint8Array(await fs.readFile(p));
}

/** Load and verify the bundle in folder `root` (manifest read once; files by the manifest). */
export async function loadBundleDir(root: string, opts: BundleOptions & { trustKeyPath?: string } = {}): Promise<Bundle> {
  let st;
  try { st = await fs.stat(root); } catch { st = null; }
  if (!st?.isDirectory()) {
    throw new RunnerError(`bundle ${root} is not a directory; pass the folder that \`edgetl export\` wrote`);
  }
  const mp = path.join(root, MANIFEST);
  try { await fs.access(mp); } catch {
    throw new RunnerError(`${root} has no ${MANIFEST}; is it an edgetl bundle?`);
  }
  const body = await readRegular(mp, "bundle file", MAX_MANIFEST_BYTES);
  const m: Manifest = parseManifest(body);
  const files = new Map<string, Uint8Array>([[MANIFEST, body]]);
  for (const [role, e] of Object.entries(m.files)) {
    const full = path.resolve(root, e.path);
    const outside = () => new RunnerError(`manifest file ${JSON.stringify(e.path)} points ` +
      "outside the bundle; refusing it");
    if (e.path.includes("\0") || path.isAbsolute(e.path) || path.dirname(full) !== path.resolve(root)) {
      throw outside();
    }
    try { await fs.access(full); } catch {
      throw new RunnerError(`bundle file ${e.path} (${role}) is missing from ${root}`);
    }
    if (path.dirname(await fs.realpath(full)) !== await fs.realpath(root)) throw outside();
    files.set(e.path, await readRegular(full, "bundle file"));
  }
  let trustKey = opts.trustKey;
  if (opts.trustKeyPath) {
    trustKey = new TextDecoder().decode(await readRegular(opts.trustKeyPath, "--trust-key", 64 << 10));
    const sp = path.join(root, SIGNATURE);
    try { files.set(SIGNATURE, await readRegular(sp, `bundle file`, 4096)); } catch { /* unsigned */ }
  }
  return Bundle.fromFiles(files, { ...opts, trustKey, source: root });
}

/** A data file: `.npz` windows or a `.csv` sensor log (text bundles: `.csv` / `.txt` texts). */
export async function loadData(p: string, bundle: Bundle, maxMb = 2048): Promise<Dataset> {
  if (bundle.manifest.input.modality === "image" && (await fs.stat(p).catch(() => null))?.isDirectory()) {
    throw new RunnerError(`${p} is a folder of images; this runner decodes no image files in ` +
      "Node: pass an .npz with uint8 'x' (N, H, W[, 3|4]) and label names 'y', pick the folder " +
      "on the web page (device_runners/web), or run device_runners/run.py adapt BUNDLE --data " +
      `${p}`);
  }
  return loadDataBytes(await readRegular(p, "data file", maxMb * 2 ** 20), p, bundle);
}

/** Write `bytes` to `p` atomically: a temporary file in the same folder, fsync, rename. */
export async function atomicWrite(p: string, bytes: Uint8Array | string): Promise<void> {
  const tmp = path.join(path.dirname(p), `.${path.basename(p)}.${process.pid}.tmp`);
  const fh = await fs.open(tmp, "w");
  try {
    await fh.writeFile(bytes);
    await fh.sync();
  } finally {
    await fh.close();
  }
  await fs.rename(tmp, p);
}

export const VERSIONS_FILE = "versions.json";

/** `{bundle name: highest accepted version}` of a state folder (`edgerun/versions.py`). */
export async function acceptedVersions(stateDir: string): Promise<Record<string, number>> {
  const p = path.join(stateDir, VERSIONS_FILE);
  try { await fs.lstat(p); } catch { return {}; }
  const raw = await readRegular(p, "version record", 1 << 20);
  let seen: unknown;
  try { seen = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(raw)); } catch (e) {
    throw new RunnerError(`version record ${p} is not readable JSON (${String(e).slice(0, 120)}); ` +
      "it guards against old bundles replayed to this device: restore it, or delete it to " +
      "accept any version again");
  }
  if (typeof seen !== "object" || seen === null || Array.isArray(seen) ||
    !Object.values(seen).every((v) => Number.isInteger(v))) {
    throw new RunnerError(`version record ${p} must map bundle names to integer versions; ` +
      "restore it, or delete it to accept any version again");
  }
  return seen as Record<string, number>;
}

/** Refuse `m` if this state folder already accepted a newer version of it. */
export async function checkVersion(m: Manifest, stateDir: string, allowDowngrade = false): Promise<void> {
  const highest = (await acceptedVersions(stateDir))[m.name];
  if (highest !== undefined && m.version < highest && !allowDowngrade) {
    throw new RunnerError(`bundle '${m.name}' is version ${m.version}, but this device already ` +
      `accepted version ${highest} (${path.join(stateDir, VERSIONS_FILE)}): an older bundle is ` +
      "refused (replay / downgrade); pass --allow-downgrade to roll back on purpose (nothing " +
      "was written)");
  }
}

/** The record raised to `m`'s version, or null when it does not change. */
export async function updatedVersions(m: Manifest, stateDir: string,
  allowDowngrade = false): Promise<Record<string, number> | null> {
  const seen = await acceptedVersions(stateDir);
  const cur = seen[m.name];
  if (cur === m.version || ((cur ?? -1) > m.version && !allowDowngrade)) return null;
  seen[m.name] = m.version;
  return Object.fromEntries(Object.entries(seen).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)));
}

/** Peak resident memory of this process in MiB (VmHWM on Linux; else current RSS). */
export async function peakRssMb(): Promise<number> {
  try {
    const s = await fs.readFile("/proc/self/status", "ascii");
    const m = /^VmHWM:\s+(\d+)/m.exec(s);
    if (m) return Number(m[1]) / 1024;
  } catch { /* not Linux */ }
  return process.memoryUsage().rss / 2 ** 20;
}

let liteRtNode: Promise<{ lrt: LiteRt; version: string }> | undefined;

/**
 * LiteRT.js (`@litertjs/core`, installed beside this package) in Node: its loader is written
 * for browsers and workers, so `self`, `importScripts` (run in this context), `require` and
 * `__dirname` are provided for its compat WASM build (the relaxed-SIMD build does not load in
 * Node 20), whose binary is handed over as `Module.wasmBinary`. Its native INFO/WARNING log
 * lines and the "no WebGPU device" warning are dropped; other lines go to stderr.
 */
export function loadLiteRtNode(): Promise<{ lrt: LiteRt; version: string }> {
  liteRtNode ??= (async () => {
    const req = createRequire(import.meta.url);
    let pkg: string;
    try {
      pkg = req.resolve("@litertjs/core/package.json");
    } catch {
      throw new RunnerError("LiteRT.js (@litertjs/core) is not installed: npm install " +
        "@litertjs/core (TFLite bundles), or run this bundle with the Python runner");
    }
    const base = "litert_wasm_compat_internal";
    const dir = path.join(path.dirname(pkg), "wasm");
    const js = path.join(dir, `${base}.js`);
    const g = globalThis as Record<string, unknown>;
    const quiet = (s: unknown) => {
      const t = String(s);
      if (!/^(INFO|WARNING): /.test(t)) process.stderr.write(t + "\n");
    };
    Object.assign(g, { self: g.self ?? globalThis, require: g.require ?? req, __dirname: dir,
      __filename: js, importScripts: (p: string) => vm.runInThisContext(readFileSync(p, "utf8"),
        { filename: p }),
      Module: { wasmBinary: readFileSync(path.join(dir, `${base}.wasm`)), print: quiet,
        printErr: quiet } });
    const spec = "@litertjs/core"; // untyped: its typings need WebGPU's
    const lrt = await import(spec) as LiteRt & { loadLiteRt(p: string): Promise<unknown> };
    const warn = console.warn;
    console.warn = (...a: unknown[]) => {
      if (!String(a[0]).startsWith("Failed to create default WebGPU device")) warn(...a);
    };
    try {
      await lrt.loadLiteRt(js);
    } finally {
      console.warn = warn;
    }
    const version = String(JSON.parse(readFileSync(pkg, "utf8")).version);
    return { lrt, version };
  })();
  return liteRtNode;
}
