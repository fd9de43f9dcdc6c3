/**
 * Latent replay, as `edgerun/replay.py`: a bundle may ship `replay.npz` (files role
 * `replay`), the frozen backbone's features of server-training windows with their label ids
 * into `manifest.labels`; `adapt` trains the head on the device's training windows and these
 * together (`weight`: the replay set's total sample weight relative to the device's training
 * windows; 0: off). Validation and the gate use the device's windows; the replay check of the
 * gate (`gate.forgetting`) scores both heads on them.
 */
import { Bundle } from "./bundle.js";
import { RunnerError } from "./errors.js";
import { Manifest, ReplayBlock } from "./manifest.js";
import { asFloat32, asNumbers, NdArray, parseNpz } from "./npy.js";

/** The manifest's `files` role of the replay features. */
export const ROLE = "replay";

/** The manifest's `adapt.replay` block, or null when the bundle ships no replay set. */
export function block(m: Manifest): ReplayBlock | null {
  const r = m.adapt.replay;
  return r && ROLE in m.files ? r : null;
}

/** Python's `repr(float(x))` for the numbers a message prints. */
export function floatRepr(x: number): string {
  if (Number.isNaN(x)) return "nan";
  if (!Number.isFinite(x)) return x > 0 ? "inf" : "-inf";
  if (Number.isInteger(x) && Math.abs(x) < 1e16) return x.toFixed(1);
  return String(x).replace(/e([+-])(\d)$/, "e$10$2");
}

/** The replay weight: the option given, else the bundle's, else 0 (no replay set: 0). */
export function settings(m: Manifest, weight: number | undefined): number {
  const r = block(m);
  if (weight === undefined) return r ? Number(r.weight) : 0;
  if (!(weight >= 0 && weight < Infinity)) {
    throw new RunnerError(`--replay-weight must be a finite number >= 0, got ${floatRepr(weight)}`);
  }
  if (weight > 0 && r === null) {
    throw new RunnerError("--replay-weight > 0 needs a bundle that ships a replay set (manifest " +
      "adapt.replay and files.replay); this one has none: export it with the recipe's [adapt] " +
      "replay_per_class > 0, or use --replay-weight 0");
  }
  return weight;
}

/** numpy's dtype name of an `.npy` descr (`<i8` -> `int64`). */
function dtypeName(descr: string): string {
  const kind = descr[1];
  const bytes = Number(descr.slice(2));
  const names: Record<string, string> = { f: "float", i: "int", u: "uint" };
  if (kind === "b") return "bool";
  if (kind in names) return `${names[kind]}${8 * bytes}`;
  return descr;
}

/** Python's tuple of a shape: `(5, 8)`, `(5,)`, `()`. */
function pyShape(s: readonly number[]): string {
  return `(${s.join(", ")}${s.length === 1 ? "," : ""})`;
}

function pyNumber(x: number, kind: string): string {
  return kind === "f" ? floatRepr(x) : kind === "b" ? (x ? "True" : "False") : String(x);
}

export interface ReplaySet {
  /** Features `(R, dim)`, row-major. */
  features: Float32Array;
  /** Class ids into the head's labels (`names`). */
  y: number[];
}

/**
 * The replay features and their class ids into `names` (the head's labels). Windows of
 * labels the head no longer has are dropped. A file of the wrong shape, with non-finite
 * features or with label ids outside `manifest.labels` is refused by name.
 */
export async function load(bundle: Bundle, names: readonly string[], dim: number): Promise<ReplaySet> {
  const m = bundle.manifest;
  const path = m.files[ROLE].path;
  const fixBundle = "re-export or re-download the bundle";
  const z = await parseNpz(bundle.file(ROLE), `bundle file ${path} (${ROLE})`);
  const missing = ["features", "labels"].filter((k) => !z.has(k));
  if (missing.length) {
    throw new RunnerError(`bundle file ${path} (${ROLE}) lacks the arrays ` +
      `[${missing.map((k) => `'${k}'`).join(", ")}] (it holds ` +
      `[${[...z.keys()].sort().slice(0, 12).map((k) => `'${k}'`).join(", ")}]); ${fixBundle}`);
  }
  for (const [k, v] of z) {
    if (!"biuf".includes(v.dtype[1]) || Array.isArray(v.data)) {
      throw new RunnerError(`bundle file ${path} (${ROLE}): array '${k}' is not numeric ` +
        `(${v.dtype}); ${fixBundle}`);
    }
  }
  const fa = z.get("features") as NdArray;
  const ia = z.get("labels") as NdArray;
  const where = `bundle file ${path} (replay)`;
  const fix = "re-export the bundle, or adapt with --replay-weight 0";
  const r = fa.shape[0];
  if (fa.shape.length !== 2 || fa.shape[1] !== dim || ia.shape.length !== 1 || ia.shape[0] !== r) {
    throw new RunnerError(`${where}: expected features (R, ${dim}) and labels (R,), found ` +
      `${pyShape(fa.shape)} and ${pyShape(ia.shape)}; ${fix}`);
  }
  const ids = asNumbers(ia);
  const nl = m.labels.length;
  const kind = ia.dtype[1];
  if (!"iu".includes(kind) || ids.some((i) => i < 0 || i >= nl)) {
    const lo = ids.reduce((a, b) => Math.min(a, b), Infinity);
    const hi = ids.reduce((a, b) => Math.max(a, b), -Infinity);
    throw new RunnerError(`${where}: label ids must be integers in [0, ${nl}), found ` +
      `${dtypeName(ia.dtype)} in [${pyNumber(lo, kind)}, ${pyNumber(hi, kind)}]; ${fix}`);
  }
  const f = asFloat32(fa);
  for (let i = 0; i < f.length; i++) {
    if (!Number.isFinite(f[i])) {
      throw new RunnerError(`${where}: features hold NaN or infinity; ${fix}`);
    }
  }
  const keep: number[] = [];
  const y: number[] = [];
  ids.forEach((id, i) => {
    const c = names.indexOf(m.labels[id]);
    if (c >= 0) { keep.push(i); y.push(c); }
  });
  const out = new Float32Array(keep.length * dim);
  keep.forEach((i, j) => out.set(f.subarray(i * dim, (i + 1) * dim), j * dim));
  return { features: out, y };
}

/** numpy's float32 `sum` of a contiguous array (pairwise summation, float32 accumulators). */
export function sumF32(a: Float32Array): number {
  const pairwise = (lo: number, n: number): number => {
    const fr = Math.fround;
    if (n < 8) {
      let res = 0;
      for (let i = 0; i < n; i++) res = fr(res + a[lo + i]);
      return res;
    }
    if (n <= 128) {
      const r = Array.from(a.subarray(lo, lo + 8));
      let i = 8;
      for (; i < n - (n % 8); i += 8) for (let j = 0; j < 8; j++) r[j] = fr(r[j] + a[lo + i + j]);
      let res = fr(fr(fr(r[0] + r[1]) + fr(r[2] + r[3])) + fr(fr(r[4] + r[5]) + fr(r[6] + r[7])));
      for (; i < n; i++) res = fr(res + a[lo + i]);
      return res;
    }
    let n2 = Math.floor(n / 2);
    n2 -= n2 % 8;
    return Math.fround(pairwise(lo, n2) + pairwise(lo + n2, n - n2));
  };
  return pairwise(0, a.length);
}

/** Per-window sample weights of `n` replay windows: `weight` x the local total, shared. */
export function weights(local: Float32Array, n: number, weight: number): Float32Array {
  if (n === 0) return new Float32Array(0);
  return new Float32Array(n).fill(Math.fround((weight * sumF32(local)) / n));
}
