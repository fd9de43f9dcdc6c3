/**
 * Manifest validation with the rules of `edgerun.manifest.check` (the Python module is the
 * source of truth; `SCHEMA` in manifest.ts is generated from it). Messages name the field.
 *
 * One difference JSON parsing forces: JavaScript cannot tell `1.0` from `1`, so an integer
 * field written as `1.0` passes here while the Python runner refuses it.
 */
import { RunnerError } from "./errors.js";
import { Manifest, SCHEMA, SCHEMA_VERSION, TypeDesc } from "./manifest.js";

function shown(v: unknown): string {
  let s: string;
  if (typeof v === "string") s = `'${v}'`;
  else if (v === null) s = "None";
  else if (v === undefined) s = "undefined";
  else if (v instanceof PyList) s = `[${v.items.map((x) => `'${x}'`).join(", ")}]`;
  else s = JSON.stringify(v) ?? String(v);
  return s.length > 60 ? s.slice(0, 60) + "…" : s;
}

function expect(ok: boolean, where: string, what: string, found: unknown): void {
  if (!ok) {
    throw new RunnerError(`manifest.json: ${where} must be ${what}, found ${shown(found)}; the ` +
      "bundle is damaged or not an edgetl bundle, re-export it");
  }
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

function conform(value: unknown, t: TypeDesc, where: string): void {
  if (t === "any") return;
  if (typeof t === "string") {
    switch (t) {
      case "str": return expect(typeof value === "string", where, "a str", value);
      case "bool": return expect(typeof value === "boolean", where, "a bool", value);
      case "number": return expect(typeof value === "number", where, "a number", value);
      case "int":
        return expect(typeof value === "number" && Number.isInteger(value), where,
          "an integer", value);
    }
  }
  if ("nullable" in t) {
    if (value === null) return;
    return conform(value, t.nullable, where);
  }
  if ("ref" in t) {
    const block = SCHEMA[t.ref];
    expect(isObject(value), where, "an object", value);
    const obj = value as Record<string, unknown>;
    const missing = block.required.filter((k) => !(k in obj)).sort();
    if (missing.length) {
      throw new RunnerError(`manifest.json: ${where} lacks [${missing.map((k) => `'${k}'`)
        .join(", ")}]; the bundle is damaged or was written by another edgetl version: ` +
        "re-export it");
    }
    for (const [k, v] of Object.entries(obj)) {
      if (k in block.fields) conform(v, block.fields[k], `${where}.${k}`);
    }
    return;
  }
  if ("list" in t) {
    expect(Array.isArray(value), where, "a list", value);
    (value as unknown[]).forEach((v, i) => conform(v, t.list, `${where}[${i}]`));
    return;
  }
  expect(isObject(value), where, "an object", value);
  for (const [k, v] of Object.entries(value as Record<string, unknown>)) {
    conform(v, t.dict, `${where}['${k}']`);
  }
}

/** The largest dimension a manifest may declare (`edgerun.manifest.MAX_DIM`). */
const MAX_DIM = 1 << 24;

/** The most elements a declared shape may hold (`edgerun.manifest.MAX_ELEMENTS`). */
const MAX_ELEMENTS = 1 << 26;

/**
 * A tail bundle's `trainable` block agrees with the head block and the features
 * (`edgerun.manifest._trainable`): its `params` are head parameters of the same shape (the
 * runner trains and saves `head.params`; a backbone tensor named only here would silently
 * stay frozen), and `cut.shape` holds `features.dim` values per sample.
 */
function checkTrainable(man: Manifest): void {
  const tr = man.trainable;
  if (!tr) return;
  const shapes = new Map(man.head.params.map((p) => [p.name, JSON.stringify(p.shape)]));
  const bad = tr.params.filter((p) => shapes.get(p.name) !== JSON.stringify(p.shape))
    .map((p) => p.name);
  expect(!bad.length, "trainable.params", "head.params of the same shape (the tensors the " +
    "train step updates)", pyList(bad));
  let n = 1;
  tr.cut.shape.forEach((d, i) => {
    atLeast(d, 1, `trainable.cut.shape[${i}]`, MAX_DIM);
    n *= d;
  });
  expect(n <= MAX_ELEMENTS, "trainable.cut.shape", `a shape of at most ${MAX_ELEMENTS} elements`,
    tr.cut.shape);
  const dim = man.features.dim;
  expect(n === dim, "trainable.cut.shape", `features.dim = ${dim} values per sample`, n);
}

/** `names` all in `known`, else refused naming the field (as `_subset`). */
function subset(names: readonly string[], known: readonly string[], where: string,
  what: string): void {
  const bad = names.filter((n) => !known.includes(n));
  expect(!bad.length, where, `names of ${what} ${pyRepr([...known].sort())}`, pyList(bad));
}

/** `items` as Python prints a list of strings (in a message's text). */
function pyRepr(items: string[]): string {
  return `[${items.map((x) => `'${x}'`).join(", ")}]`;
}

/**
 * The whole-run graph's block agrees with the train step (`edgerun.manifest._consistent`):
 * a fused block beside it, a listed file, the train step's inputs plus `val_input`, and the
 * loss, validation logits, `new.*` and per-epoch (`epoch_prefix`) outputs the runner reads.
 */
function checkRun(man: Manifest): void {
  const ts = man.train_step;
  const rb = ts.run;
  if (!rb) return;
  expect(ts.fused !== undefined, "train_step.run", "a train_step.fused block beside it", rb);
  const files = Object.keys(man.files).sort();
  expect(rb.file in man.files, "train_step.run.file",
    `a file role listed in files ${pyRepr(files)}`, rb.file);
  const want = [...ts.inputs, rb.val_input].sort();
  const have = [...rb.inputs].sort();
  expect(want.length === have.length && want.every((x, i) => x === have[i]),
    "train_step.run.inputs", `train_step.inputs ${pyRepr([...ts.inputs].sort())} and ` +
    "val_input", pyList(rb.inputs));
  const params = man.head.params.map((p) => p.name);
  const state = man.optimizer.state.map((s) => s.name);
  subset([rb.loss_output, rb.val_logits_output,
    ...[...params, ...state].flatMap((n) => ["new." + n, rb.epoch_prefix + n])], rb.outputs,
  "train_step.run (loss, val logits, new.* and per-epoch outputs)", "train_step.run.outputs");
}

/** A Python list of strings as `repr` prints it. */
class PyList {
  constructor(readonly items: string[]) {}
}

function pyList(items: string[]): PyList {
  return new PyList(items);
}

/** `value` is finite and in `[low, high]`, else refused (as `_at_least`). */
function atLeast(value: number, low: number, where: string, high?: number): void {
  const ok = Number.isFinite(value) && value >= low && (high === undefined || value <= high);
  const what = ["a finite number", `>= ${low}`, ...(high !== undefined ? [`<= ${high}`] : [])]
    .join(" and ");
  expect(ok, where, what, value);
}

/** Validate a parsed manifest against the schema; return it typed. */
export function checkManifest(m: unknown): Manifest {
  if (!isObject(m)) {
    const kind = Array.isArray(m) ? "list" : m === null ? "NoneType" : typeof m;
    throw new RunnerError(`manifest.json must hold a JSON object, found ${kind}; re-export ` +
      "the bundle");
  }
  if (m.schema_version !== SCHEMA_VERSION) {
    throw new RunnerError(`manifest schema_version ${shown(m.schema_version)} is not supported ` +
      `(this runner reads ${SCHEMA_VERSION}); re-export the bundle with the matching edgetl, ` +
      "or update the runner");
  }
  conform(m, { ref: "Manifest" }, "manifest");
  const man = m as unknown as Manifest;
  const rp = man.adapt.replay;
  if (rp) { // a replay block needs its file; a bundle's weight is finite and >= 0
    expect("replay" in man.files, "adapt.replay", "files.replay listed with it",
      pyList(Object.keys(man.files).sort()));
    atLeast(rp.weight, 0, "adapt.replay.weight");
    atLeast(rp.count, 0, "adapt.replay.count", MAX_DIM);
    if (rp.inputs !== undefined) atLeast(rp.inputs, 0, "adapt.replay.inputs", rp.count);
  }
  const mf = man.adapt.gate?.max_forget;
  if (mf !== undefined && mf !== null) atLeast(mf, 0, "adapt.gate.max_forget", 100);
  const folds = man.adapt.gate?.folds;
  if (folds !== undefined && folds !== null) atLeast(folds, 1, "adapt.gate.folds", 20);
  checkTrainable(man);
  checkRun(man);
  if (Object.keys(man.files).length === 0) {
    throw new RunnerError("manifest.json: 'files' is empty; re-export the bundle");
  }
  if (!man.labels.length || new Set(man.labels).size !== man.labels.length) {
    throw new RunnerError(`manifest.json: labels must be distinct names, found ` +
      `${JSON.stringify(man.labels.slice(0, 10))}; re-export the bundle`);
  }
  return man;
}

/** Parse and check the bytes of a manifest. */
export function parseManifest(body: Uint8Array): Manifest {
  let m: unknown;
  try {
    m = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(body));
  } catch (e) {
    throw new RunnerError(`manifest.json is not valid JSON (${String(e).slice(0, 120)}); ` +
      "re-export the bundle");
  }
  return checkManifest(m);
}
