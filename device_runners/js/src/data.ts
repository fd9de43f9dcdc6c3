/**
 * Device data for time-series bundles, as the Python runner (`edgerun/data.py`) reads it:
 *
 * - `.npz`: `x` (N, T, C) numeric windows, optional `y` (N,) label names, optional `channels`
 *   (C,) names (reordered to the manifest's channel order when given);
 * - `.csv`: one row per sample, a header naming every manifest channel (any order, extra
 *   columns ignored), optional `label` and `session` columns; windows of the manifest's length
 *   and stride are cut inside runs of one label and session.
 *
 * Image, text and tensor bundles are not read by this runner yet (the Python runner reads them).
 */
import { RunnerError } from "./errors.js";
import { Manifest } from "./manifest.js";
import { asFloat32, asStrings, NdArray, parseNpz } from "./npy.js";
import { defaultRng } from "./rng.js";

/** Raw windows `x` (`[n, window, channels]`, flat) and optional label names. */
export interface Dataset {
  x: Float32Array;
  n: number;
  inner: number[];
  y: string[] | null;
  source: string;
}

export function modality(m: Manifest): string {
  const kind = m.input.modality ?? "timeseries";
  if (kind !== "timeseries") {
    throw new RunnerError(`this bundle's input.modality is '${kind}'; the TypeScript runner ` +
      "reads time-series bundles only so far (images, text and tensor inputs: use the Python " +
      "runner, device_runners/run.py)");
  }
  return kind;
}

/** How validation windows are held out: `block` for time series. */
export function splitMode(m: Manifest): "block" | "random" {
  modality(m);
  return "block";
}

export function checkLabelText(where: string, names: readonly string[]): void {
  names.forEach((v, i) => {
    const bad = Array.from(v).find((c) => c.charCodeAt(0) < 32 || c.charCodeAt(0) === 127);
    if (bad !== undefined) {
      throw new RunnerError(`${where}: label ${i + 1} ('${v.slice(0, 40)}') contains the ` +
        `control character ${JSON.stringify(bad)}; labels must be printable text`);
    }
  });
}

/** Windows from the bytes of an `.npz`. */
export async function loadNpz(bytes: Uint8Array, m: Manifest, source: string): Promise<Dataset> {
  modality(m);
  const z = await parseNpz(bytes, source);
  const xa: NdArray | undefined = z.get("x");
  if (!xa) {
    throw new RunnerError(`${source}: expected an array 'x' of windows, found keys ` +
      `${JSON.stringify([...z.keys()])}`);
  }
  if (Array.isArray(xa.data)) {
    throw new RunnerError(`${source}: 'x' must be numeric, found dtype ${xa.dtype}`);
  }
  let x = asFloat32(xa, `${source}: 'x'`);
  const shape = xa.shape;
  const chA = z.get("channels");
  if (chA) {
    const ch = asStrings(chA, `${source}: 'channels'`);
    const want = m.input.channels ?? [];
    const miss = want.filter((c) => !ch.includes(c));
    if (miss.length) {
      throw new RunnerError(`${source}: channels ${JSON.stringify(miss)} missing; the bundle ` +
        `needs ${JSON.stringify(want)}, the file has ${JSON.stringify(ch)}`);
    }
    if (shape.length === 3 && shape[2] === ch.length) {
      const idx = want.map((c) => ch.indexOf(c));
      const [n, t, c] = shape;
      const out = new Float32Array(n * t * idx.length);
      for (let r = 0; r < n * t; r++) {
        for (let j = 0; j < idx.length; j++) out[r * idx.length + j] = x[r * c + idx[j]];
      }
      x = out;
      shape[2] = idx.length;
    }
  }
  let y: string[] | null = null;
  const ya = z.get("y");
  if (ya) {
    if (!Array.isArray(ya.data)) {
      throw new RunnerError(`${source}: 'y' must hold label names (a string array, e.g. ` +
        `np.array(['walking', ...])), found dtype ${ya.dtype}`);
    }
    if (ya.shape.length !== 1) {
      throw new RunnerError(`${source}: 'y' must be a 1-D array with one label name per ` +
        `window, found shape (${ya.shape.join(", ")})`);
    }
    y = ya.data;
  }
  const ds: Dataset = { x, n: shape[0] ?? 0, inner: shape.slice(1), y, source };
  validate(ds, shape, m);
  return ds;
}

/** Python's `float()` of a CSV cell (surrounding whitespace, `_` separators, inf/nan). */
function pyFloat(s: string): number {
  const t = s.trim().toLowerCase();
  if (/^[+-]?(inf|infinity)$/.test(t)) return t.startsWith("-") ? -Infinity : Infinity;
  if (/^[+-]?nan$/.test(t)) return NaN;
  if (!/^[+-]?((\d(_?\d)*)(\.(\d(_?\d)*)?)?|\.\d(_?\d)*)(e[+-]?\d(_?\d)*)?$/.test(t)) {
    throw new SyntaxError(s);
  }
  return Number(t.replace(/_/g, ""));
}

/** Rows of a CSV text (RFC 4180 quoting, as Python's csv.reader with the default dialect). */
export function parseCsv(text: string): string[][] {
  const rows: string[][] = [];
  let row: string[] = [];
  let cell = "";
  let quoted = false;
  let i = 0;
  let any = false;
  while (i < text.length) {
    const c = text[i];
    if (quoted) {
      if (c === '"') {
        if (text[i + 1] === '"') { cell += '"'; i += 2; continue; }
        quoted = false; i++; continue;
      }
      cell += c; i++; continue;
    }
    if (c === '"' && cell === "") { quoted = true; any = true; i++; continue; }
    if (c === ",") { row.push(cell); cell = ""; any = true; i++; continue; }
    if (c === "\r" || c === "\n") {
      if (any || cell !== "") row.push(cell);
      rows.push(row);
      row = []; cell = ""; any = false;
      i += c === "\r" && text[i + 1] === "\n" ? 2 : 1;
      continue;
    }
    cell += c; any = true; i++;
  }
  if (any || cell !== "") { row.push(cell); rows.push(row); }
  return rows;
}

/** `(start, run)` of every window of `win` samples inside a run of equal keys. */
export function windowStarts(keys: readonly string[], win: number, stride: number): Array<[number, number]> {
  const out: Array<[number, number]> = [];
  let start = 0;
  for (let i = 1; i <= keys.length; i++) {
    if (i === keys.length || keys[i] !== keys[start]) {
      for (let s = start; s <= i - win; s += stride) out.push([s, start]);
      start = i;
    }
  }
  return out;
}

/** Windows from a CSV sensor log (text). */
export function loadCsv(text: string, m: Manifest, source: string): Dataset {
  modality(m);
  if (text.charCodeAt(0) === 0xfeff) text = text.slice(1);
  const want = [...(m.input.channels ?? [])];
  const rows = parseCsv(text);
  if (!rows.length) {
    throw new RunnerError(`${source} is empty; expected a header row ` +
      `${JSON.stringify([...want, "label"])}`);
  }
  const header = rows[0].map((h) => h.trim());
  const miss = want.filter((c) => !header.includes(c));
  if (miss.length) {
    throw new RunnerError(`${source}: header lacks channel column(s) ${JSON.stringify(miss)}; ` +
      `expected ${JSON.stringify(want)} (+ optional 'label', 'session'), found ` +
      `${JSON.stringify(header)}`);
  }
  const cols = want.map((c) => header.indexOf(c));
  const li = header.indexOf("label");
  const si = header.indexOf("session");
  const sig: number[] = [];
  const labels: string[] = [];
  const sessions: string[] = [];
  for (let r = 1; r < rows.length; r++) {
    const row = rows[r];
    if (!row.length) continue;
    try {
      for (const i of cols) {
        if (i >= row.length) throw new SyntaxError("missing");
        sig.push(pyFloat(row[i]));
      }
    } catch {
      throw new RunnerError(`${source}:${r + 1}: expected ${want.length} numeric channel ` +
        `values, found ${JSON.stringify(row)}`);
    }
    labels.push(li >= 0 && li < row.length ? row[li].trim() : "");
    sessions.push(si >= 0 && si < row.length ? row[si].trim() : "");
  }
  const n = labels.length;
  if (!n) throw new RunnerError(`${source} has a header but no samples`);
  const c = want.length;
  const f32 = Float32Array.from(sig);
  for (let k = 0; k < f32.length; k++) {
    if (!Number.isFinite(f32[k])) {
      throw new RunnerError(`${source}:${Math.floor(k / c) + 2}: non-finite sensor value ` +
        "(NaN/inf); clean or drop those samples before adapting");
    }
  }
  const win = m.input.window ?? 0;
  const stride = m.input.stride ?? 1;
  const keys = labels.map((l, i) => JSON.stringify([l, sessions[i]]));
  const starts = windowStarts(keys, win, stride);
  if (!starts.length) {
    throw new RunnerError(`${source}: no run of ${win} samples with one label; windows are ` +
      `${win} samples (${(win / (m.input.sample_rate_hz ?? 1)).toFixed(2)} s at ` +
      `${m.input.sample_rate_hz} Hz)`);
  }
  const hasLabel = li >= 0;
  const keep = starts.filter(([, run]) => !hasLabel || labels[run] !== "");
  const x = new Float32Array(keep.length * win * c);
  keep.forEach(([s], j) => x.set(f32.subarray(s * c, (s + win) * c), j * win * c));
  const ds: Dataset = { x, n: keep.length, inner: [win, c],
    y: hasLabel ? keep.map(([, run]) => labels[run]) : null, source };
  validate(ds, [keep.length, win, c], m);
  return ds;
}

function validate(ds: Dataset, shape: number[], m: Manifest): void {
  const t = m.input.window ?? 0;
  const c = (m.input.channels ?? []).length;
  if (shape.length !== 3 || shape[1] !== t || shape[2] !== c) {
    throw new RunnerError(`${ds.source}: windows have shape (${shape.join(", ")}), the bundle ` +
      `expects (N, ${t}, ${c}) = ${t} samples at ${m.input.sample_rate_hz} Hz x channels ` +
      `${JSON.stringify(m.input.channels)}; re-window/resample the recording (or pass the raw ` +
      ".csv log)");
  }
  if (ds.n === 0) throw new RunnerError(`${ds.source} holds no windows`);
  const per = t * c;
  let bad = 0;
  for (let i = 0; i < ds.n; i++) {
    for (let k = i * per; k < (i + 1) * per; k++) {
      if (!Number.isFinite(ds.x[k])) { bad++; break; }
    }
  }
  if (bad) {
    throw new RunnerError(`${ds.source}: ${bad} window(s) contain NaN or inf; clean or drop ` +
      "them before adapting");
  }
  if (ds.y) {
    if (ds.y.length !== ds.n) {
      throw new RunnerError(`${ds.source}: ${ds.n} windows but ${ds.y.length} labels`);
    }
    if (ds.y.some((l) => !l)) {
      throw new RunnerError(`${ds.source}: empty label names; every window needs a label`);
    }
    checkLabelText(ds.source, ds.y);
  }
}

/** Per-channel normalisation of the manifest, in float32 as numpy computes it. */
export function preprocess(x: Float32Array, m: Manifest): Float32Array {
  modality(m);
  const norm = (m.input.preprocess ?? {}).normalize as { mean: number[]; std: number[] } | undefined;
  if (!norm) return x;
  const mean = Float32Array.from(norm.mean);
  const std = Float32Array.from(norm.std);
  const c = mean.length;
  const out = new Float32Array(x.length);
  for (let i = 0; i < x.length; i++) {
    out[i] = Math.fround(x[i] - mean[i % c]) / std[i % c];
  }
  return out;
}

/**
 * Indices `[train, val]` with `frac` of every class (>= 2 windows) in validation, as
 * `edgerun.data.stratified_split`: `block` takes each class's last windows and drops the one
 * before them; `random` shuffles within each class with `default_rng(seed)`.
 */
export function stratifiedSplit(y: readonly number[], frac: number, seed: number,
  mode: "block" | "random" = "block"): [number[], number[]] {
  const rng = defaultRng(seed);
  const tr: number[] = [];
  const va: number[] = [];
  for (const c of [...new Set(y)].sort((a, b) => a - b)) {
    let idx = y.flatMap((v, i) => (v === c ? [i] : []));
    if (mode === "random") idx = rng.permutation(idx);
    const n = idx.length;
    const nVal = n < 2 ? 0 : Math.min(n - 1, Math.max(1, Math.floor(frac * n + 0.5)));
    va.push(...idx.slice(n - nVal));
    const gap = mode === "block" && n - nVal - 1 >= 1 ? 1 : 0;
    tr.push(...idx.slice(0, n - nVal - gap));
  }
  return [tr.sort((a, b) => a - b), va.sort((a, b) => a - b)];
}
