// docs/android.md: a React Native app personalises an edgetl ONNX bundle on the phone with
// onnxruntime-react-native and this runner. Type-checked (`tsc -p tsconfig.examples.json`,
// tests/test_js_runner.py) against onnxruntime-react-native's typings; NOT built or run on
// Android here (no Android SDK, device or emulator on the machines that wrote it).
//
// In an app, import from "@edgetl/edgerun" instead of "../src/index.js".
// React Native itself is not imported: the app implements `AppFiles` with the file-system
// module it already uses (react-native-fs, expo-file-system); docs/android.md shows both.
import * as ort from "onnxruntime-react-native";
import {
  adapt, Bundle, Head, infer, loadCsv, Ort, OrtBackend, parseManifest, RunnerError, selftest,
  stateFiles, verifySignature,
} from "../src/index.js";
import type { InferResult, Manifest, Verdict } from "../src/index.js";

/** The few file operations the runner needs; the app implements them. Paths are absolute. */
export interface AppFiles {
  /** The app's private files folder (Android `Context.getFilesDir()`). */
  readonly filesDir: string;
  exists(path: string): Promise<boolean>;
  readBytes(path: string): Promise<Uint8Array>;
  readText(path: string): Promise<string>;
  /** Replace `path` atomically (write `path.tmp`, then rename), creating its folder. */
  writeFile(path: string, data: Uint8Array | string): Promise<void>;
  /** Copy a file (used for `head.prev.npz`). */
  copy(from: string, to: string): Promise<void>;
  /** Delete a file or folder (recursively); no error if it is absent. */
  remove(path: string): Promise<void>;
  /** Fetch `url` into `path` (https; the sha256 check below decides whether it is used). */
  download(url: string, path: string): Promise<void>;
  /** Bytes of a file shipped in the APK (android/app/src/main/assets/<path>). */
  readAsset(path: string): Promise<Uint8Array>;
}

const MANIFEST = "manifest.json";
const SIGNATURE = "manifest.sig";

/** Where things live: bundles by name and version, the state folder by bundle name. */
export function paths(fs: AppFiles, m: Pick<Manifest, "name" | "version">) {
  const root = `${fs.filesDir}/edgetl`;
  const state = `${root}/state/${m.name}`;
  return {
    bundle: `${root}/bundles/${m.name}/v${m.version}`,
    state, head: `${state}/head.npz`, prev: `${state}/head.prev.npz`,
    rejected: `${state}/head.rejected.npz`, report: `${state}/report.json`,
    versions: `${state}/versions.json`,
  };
}

/** The runner needs WebCrypto (sha256, Ed25519) and TextDecoder: say so before anything. */
export function checkPlatform(): void {
  const g = globalThis as { crypto?: { subtle?: unknown }; TextDecoder?: unknown };
  if (!g.crypto?.subtle) {
    throw new RunnerError("this JavaScript engine has no crypto.subtle (WebCrypto), which " +
      "verifies the bundle's sha256 and signature; install a WebCrypto polyfill with " +
      "SHA-256 and Ed25519 before loading the bundle");
  }
  if (typeof g.TextDecoder !== "function") {
    throw new RunnerError("this JavaScript engine has no TextDecoder; install a polyfill");
  }
}

/** A bundle file name must be a plain name (no folders, no `..`): refuse anything else. */
function plainName(p: string): string {
  if (!/^[A-Za-z0-9_][A-Za-z0-9._-]*$/.test(p)) {
    throw new RunnerError(`manifest file ${JSON.stringify(p)} is not a plain file name; refusing it`);
  }
  return p;
}

/** Highest accepted version per bundle name (the Python runner's `versions.json`). */
async function acceptedVersions(fs: AppFiles, p: string): Promise<Record<string, number>> {
  if (!(await fs.exists(p))) return {};
  return JSON.parse(await fs.readText(p)) as Record<string, number>;
}

/**
 * Get a bundle into the app's files: from a server (`from.url`: the folder `edgetl export`
 * wrote, served over https) or from the APK's assets (`from.asset`). The manifest's
 * signature is checked before anything else is fetched, every file's sha256 before anything
 * is kept, and an older version than one this phone already accepted is refused.
 * Returns the verified bundle and its folder.
 */
export async function installBundle(fs: AppFiles, from: { url: string } | { asset: string },
  trustKeyPem?: string): Promise<{ bundle: Bundle; dir: string }> {
  checkPlatform();
  const tmp = `${fs.filesDir}/edgetl/download`; // fetched files wait here until verified
  await fs.remove(tmp);
  const get = async (name: string): Promise<Uint8Array> => {
    if ("asset" in from) return fs.readAsset(`${from.asset}/${name}`);
    await fs.download(`${from.url}/${encodeURIComponent(name)}`, `${tmp}/${name}`);
    return fs.readBytes(`${tmp}/${name}`);
  };
  const files = new Map<string, Uint8Array>([[MANIFEST, await get(MANIFEST)]]);
  if (trustKeyPem) {
    const sig = await get(SIGNATURE);
    await verifySignature(files.get(MANIFEST) as Uint8Array, sig, trustKeyPem);
    files.set(SIGNATURE, sig);
  }
  const m = parseManifest(files.get(MANIFEST) as Uint8Array);
  const where = paths(fs, m);
  const highest = (await acceptedVersions(fs, where.versions))[m.name];
  if (highest !== undefined && m.version < highest) {
    throw new RunnerError(`bundle '${m.name}' is version ${m.version}, but this phone already ` +
      `accepted version ${highest}: an older bundle is refused`);
  }
  for (const e of Object.values(m.files)) files.set(e.path, await get(plainName(e.path)));
  // schema, every sha256 against the manifest, and the signature again (trust key given)
  const bundle = await Bundle.fromFiles(files, { trustKey: trustKeyPem, source: m.name });
  for (const [name, bytes] of files) {
    if (name !== MANIFEST) await fs.writeFile(`${where.bundle}/${name}`, bytes);
  }
  await fs.writeFile(`${where.bundle}/${MANIFEST}`, files.get(MANIFEST) as Uint8Array); // last
  await fs.remove(tmp);
  return { bundle, dir: where.bundle };
}

/** Open an installed bundle (sha256 of every file checked again: a few ms for HAR bundles). */
export async function openBundle(fs: AppFiles, dir: string, trustKeyPem?: string): Promise<Bundle> {
  checkPlatform();
  const body = await fs.readBytes(`${dir}/${MANIFEST}`);
  const m = parseManifest(body);
  const files = new Map<string, Uint8Array>([[MANIFEST, body]]);
  if (trustKeyPem) files.set(SIGNATURE, await fs.readBytes(`${dir}/${SIGNATURE}`));
  for (const e of Object.values(m.files)) {
    files.set(e.path, await fs.readBytes(`${dir}/${plainName(e.path)}`));
  }
  return Bundle.fromFiles(files, { trustKey: trustKeyPem, source: dir });
}

/** Sessions on onnxruntime-react-native, then the bundle's self-test (throws if it fails). */
export async function start(bundle: Bundle): Promise<{ backend: OrtBackend; maxErr: number }> {
  const runtime: Ort = ort; // onnxruntime-react-native re-exports onnxruntime-common's API
  const backend = await OrtBackend.create(runtime, bundle, { name: "onnxruntime-react-native" });
  return { backend, maxErr: await selftest(bundle, backend) };
}

/** The head to start from: the state folder's, when it was trained on this backbone. */
export async function currentHead(fs: AppFiles, bundle: Bundle): Promise<Head | undefined> {
  const p = paths(fs, bundle.manifest).head;
  if (!(await fs.exists(p))) return undefined;
  try {
    return await Head.load(await fs.readBytes(p), bundle, p);
  } catch {
    return undefined; // unreadable, or another backbone (a new bundle version): the bundle's head
  }
}

/** What the app shows after personalising. */
export interface GateView {
  kept: boolean;
  accuracyBefore: number;
  accuracyAfter: number;
  /** e.g. "kept: 0.78 -> 1.00 on 54 validation windows (p = 3.1e-05)" or the gate's reason. */
  text: string;
  verdict: Verdict;
}

/**
 * Adapt the head on a CSV sensor log recorded on the phone (`csvPath`: header with the
 * bundle's `input.channels`, `label`, optional `session`; one row per sample at
 * `input.sample_rate_hz`), write the state files as `run.py adapt --out STATE` does, and
 * return the gate's decision. `onEpoch` drives a progress bar.
 */
export async function personalise(fs: AppFiles, bundle: Bundle, backend: OrtBackend,
  csvPath: string, onEpoch?: (epoch: number, epochs: number) => void): Promise<GateView> {
  const m = bundle.manifest;
  const where = paths(fs, m);
  const ds = loadCsv(await fs.readText(csvPath), m, csvPath);
  const head = await currentHead(fs, bundle);
  const r = await adapt(bundle, backend, ds, {
    seed: 0, head, skipSelftest: true, // `start` ran it
    onEpoch: async (h, epochs) => {
      onEpoch?.(h.epoch, epochs);
      await new Promise((res) => setTimeout(res, 0)); // let React draw the progress bar
    },
  });
  const rep = r.report;
  const verdict = rep.gate as Verdict;
  const rolledBack = rep.rolled_back as boolean;
  const usable = head !== undefined;
  const base = csvPath.slice(csvPath.lastIndexOf("/") + 1);
  const out = stateFiles(bundle, r, base, usable);
  if (!rolledBack && usable) await fs.copy(where.head, where.prev);
  if (out.head) await fs.writeFile(where.head, out.head);
  if (out.rejected) await fs.writeFile(where.rejected, out.rejected);
  rep.checkpoint = where.head;
  rep.checkpoint_written = out.head !== null;
  await fs.writeFile(where.report, JSON.stringify(rep, null, 2));
  const seen = await acceptedVersions(fs, where.versions);
  if ((seen[m.name] ?? -1) < m.version) {
    await fs.writeFile(where.versions, JSON.stringify({ ...seen, [m.name]: m.version }, null, 2));
  }
  const before = rep.accuracy_before as number, after = rep.accuracy_after as number;
  const text = rolledBack ? `kept the current head: ${verdict.reason}`
    : `kept the new head: ${before.toFixed(2)} -> ${after.toFixed(2)} on ${rep.n_val} ` +
      `validation windows (p = ${verdict.p_value.toPrecision(2)})`;
  return { kept: !rolledBack, accuracyBefore: before, accuracyAfter: after, text, verdict };
}

/** Labels of the windows in a recent sensor log (no `label` column needed). */
export async function predict(fs: AppFiles, bundle: Bundle, backend: OrtBackend,
  csvText: string): Promise<InferResult> {
  const ds = loadCsv(csvText, bundle.manifest, "recent.csv");
  return infer(bundle, backend, ds, await currentHead(fs, bundle));
}

/** One sensor sample in the bundle's channel order and units (see docs/android.md). */
export type Sample = readonly number[];

/** CSV text of a recording, in the columns the runners read. */
export function sensorCsv(m: Manifest, samples: readonly Sample[], label?: string,
  session?: string): string {
  const channels = m.input.channels ?? [];
  const head = [...channels, ...(label ? ["label"] : []), ...(session ? ["session"] : [])];
  const rows = samples.map((s) => {
    if (s.length !== channels.length) {
      throw new RunnerError(`a sample has ${s.length} values; the bundle reads ${channels.length} ` +
        `channels (${channels.join(", ")})`);
    }
    return [...s.map(String), ...(label ? [label] : []), ...(session ? [session] : [])].join(",");
  });
  return [head.join(","), ...rows].join("\n") + "\n";
}

/** The whole flow, as a screen's button handler would run it. */
export async function demo(fs: AppFiles, bundleUrl: string, trustKeyPem: string,
  recordedCsvPath: string, show: (line: string) => void): Promise<void> {
  const { bundle } = await installBundle(fs, { url: bundleUrl }, trustKeyPem);
  const { backend, maxErr } = await start(bundle);
  show(`self-test passed (max abs err ${maxErr.toPrecision(2)})`);
  const gate = await personalise(fs, bundle, backend, recordedCsvPath,
    (e, n) => show(`epoch ${e} / ${n}`));
  show(gate.text);
  const res = await predict(fs, bundle, backend, await fs.readText(recordedCsvPath));
  show(`last window: ${res.predictions[res.predictions.length - 1]}`);
}
