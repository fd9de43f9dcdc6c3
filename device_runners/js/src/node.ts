/** Node helpers: a bundle from a directory, data from a file, atomic writes. */
import { promises as fs } from "node:fs";
import * as path from "node:path";
import { Bundle, BundleOptions, MANIFEST, MAX_MANIFEST_BYTES, SIGNATURE } from "./bundle.js";
import { parseManifest } from "./check.js";
import { Dataset, loadCsv, loadNpz } from "./data.js";
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
    const full = path.join(root, e.path);
    if (path.dirname(path.normalize(full)) !== path.normalize(root) || e.path.includes("\0")) {
      throw new RunnerError(`manifest file ${JSON.stringify(e.path)} points outside the bundle; refusing it`);
    }
    try { await fs.access(full); } catch {
      throw new RunnerError(`bundle file ${e.path} (${role}) is missing from ${root}`);
    }
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

/** A data file: `.npz` windows or a `.csv` sensor log. */
export async function loadData(p: string, m: Manifest, maxMb = 2048): Promise<Dataset> {
  const ext = path.extname(p).toLowerCase();
  const bytes = await readRegular(p, "data file", maxMb * 2 ** 20);
  if (ext === ".npz") return loadNpz(bytes, m, p);
  if (ext === ".csv") {
    let text: string;
    try { text = new TextDecoder("utf-8", { fatal: true }).decode(bytes); } catch {
      throw new RunnerError(`${p} is not UTF-8 text; re-save it as UTF-8`);
    }
    return loadCsv(text, m, p);
  }
  throw new RunnerError(`${p}: unknown data format '${ext || "(no extension)"}'; expected .npz ` +
    "(x, y arrays) or .csv (one sensor sample per row)");
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
