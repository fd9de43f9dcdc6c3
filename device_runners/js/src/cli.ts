#!/usr/bin/env node
/**
 * edgerun-js: the TypeScript device runner on Node, mirroring `device_runners/run.py`:
 *
 *   node dist/cli.js adapt BUNDLE --data local.npz --out state/
 *   node dist/cli.js infer BUNDLE --data new.csv --head state/head.npz
 *   node dist/cli.js selftest BUNDLE
 *
 * Exit code 0 on success, 1 with a one-line `error:` message on bad input.
 */
import { promises as fs } from "node:fs";
import * as path from "node:path";
import { parseArgs } from "node:util";
import { setFlagsFromString } from "node:v8";
import { adapt, infer, selftestForward, selftestTrain, stateFiles } from "./adapt.js";
import { RunnerError } from "./errors.js";
import { Head } from "./head.js";
import { pyFloat } from "./data.js";
import { atomicWrite, checkVersion, loadBundleDir, loadData, loadLiteRtNode, peakRssMb, updatedVersions,
  VERSIONS_FILE } from "./node.js";
import { parseNpz } from "./npy.js";
import { Ort, OrtBackend } from "./ort.js";
import { Backend } from "./backend.js";
import { LiteRtBackend } from "./litert.js";

const USAGE = `usage: edgerun-js {adapt,infer,selftest} BUNDLE [options]
  adapt BUNDLE --data FILE --out DIR [--epochs N] [--batch-size N] [--val-fraction F]
        [--lr F] [--seed N] [--head FILE] [--[no-]class-balanced] [--[no-]freeze-absent]
        [--l2sp F] [--backbone-lr-scale F] [--gate-alpha F] [--gate-folds K] [--replay-weight F] [--max-forget PT]
        [--no-gate] [--mix W,W] [--patience N] [--max-seconds F] [--max-data-mb F]
        [--allow-downgrade]
  infer BUNDLE --data FILE [--head FILE] [--out DIR]
  selftest BUNDLE
  common: [--runtime node|web|litert] [--threads N] [--trust-key PEM] [--quiet] [--json]
  (--runtime web: onnxruntime-web's WASM build instead of onnxruntime-node; litert: LiteRT.js,
  the default for TFLite bundles)`;

const NUMS: Record<string, [number | null, boolean, number | null, boolean, boolean]> = {
  // name: [low, low inclusive, high, high inclusive, integer]
  epochs: [0, true, null, true, true], "batch-size": [1, true, null, true, true],
  seed: [0, true, 2 ** 53 - 1, true, true], "val-fraction": [0, false, 1, false, false],
  lr: [0, true, null, true, false], l2sp: [0, true, null, true, false],
  "backbone-lr-scale": [0, false, null, true, false],
  "max-data-mb": [0, false, null, true, false], "max-seconds": [0, false, null, true, false],
  threads: [0, true, 4096, true, true], "gate-alpha": [0, true, 1, true, false],
  patience: [0, true, null, true, true], "gate-folds": [1, true, 20, true, true],
};

function num(v: Record<string, unknown>, name: string): number | undefined {
  const s = v[name];
  if (s === undefined) return undefined;
  const [lo, loi, hi, hii, int] = NUMS[name];
  const x = Number(s);
  const ok = String(s).trim() !== "" && Number.isFinite(x) && (!int || Number.isInteger(x)) &&
    (lo === null || (loi ? x >= lo : x > lo)) && (hi === null || (hii ? x <= hi : x < hi));
  if (!ok) {
    const want = [lo === null ? "" : `${loi ? ">=" : ">"} ${lo}`, hi === null ? "" : `${hii ? "<=" : "<"} ${hi}`]
      .filter(Boolean).join(" and ");
    throw new RunnerError(`--${name} must be a finite ${int ? "integer" : "number"} ${want}, got ${JSON.stringify(s)}`);
  }
  return x;
}

const OPTIONS = {
  data: { type: "string" }, out: { type: "string" }, head: { type: "string" },
  epochs: { type: "string" }, "batch-size": { type: "string" },
  "val-fraction": { type: "string" }, lr: { type: "string" }, seed: { type: "string" },
  "class-balanced": { type: "boolean" }, "no-class-balanced": { type: "boolean" },
  "freeze-absent": { type: "boolean" }, "no-freeze-absent": { type: "boolean" },
  l2sp: { type: "string" }, "backbone-lr-scale": { type: "string" }, "replay-weight": { type: "string" },
  "max-forget": { type: "string" }, "gate-folds": { type: "string" },
  "gate-alpha": { type: "string" }, "no-gate": { type: "boolean" }, mix: { type: "string" },
  patience: { type: "string" }, "max-seconds": { type: "string" },
  "max-data-mb": { type: "string" }, threads: { type: "string" },
  "trust-key": { type: "string" }, runtime: { type: "string" }, quiet: { type: "boolean" }, json: { type: "boolean" },
  help: { type: "boolean", short: "h" },
  resume: { type: "boolean" }, trainer: { type: "string" }, "max-memory-mb": { type: "string" },
  unlabelled: { type: "string" }, "checkpoint-every": { type: "string" },
  "allow-downgrade": { type: "boolean" }, "bn-stats": { type: "string" },
} as const;

/** A float flag as argparse's `type=float` reads it (inf, nan, negative numbers). */
function float(v: Record<string, unknown>, name: string): number | undefined {
  const s = v[name];
  if (s === undefined) return undefined;
  try {
    return pyFloat(String(s));
  } catch {
    throw new RunnerError(`--${name} must be a number, got ${JSON.stringify(s)}`);
  }
}

/** `--flag -1` as `--flag=-1`: a negative number is a value, as argparse reads it. */
function joinNegatives(argv: string[]): string[] {
  const out: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const next = argv[i + 1];
    const opt = (OPTIONS as Record<string, { type: string }>)[a.slice(2)];
    if (a.startsWith("--") && opt?.type === "string" && next !== undefined &&
      /^-(\d|\.\d|inf|nan)/i.test(next)) {
      out.push(`${a}=${next}`);
      i++;
    } else {
      out.push(a);
    }
  }
  return out;
}

const UNSUPPORTED: Record<string, string> = {
  resume: "--resume (crash-safe training state) is not in the TypeScript runner yet; use run.py",
  trainer: "--trainer: the TypeScript runner trains with the stateless train-step graph only",
  "max-memory-mb": "--max-memory-mb is not in the TypeScript runner; use --max-seconds",
  unlabelled: "--unlabelled (AdaBN) is not in the TypeScript runner yet; use run.py",
  "checkpoint-every": "--checkpoint-every: the TypeScript runner does not checkpoint training",
  "bn-stats": "--bn-stats (AdaBN) is not in the TypeScript runner yet; use run.py",
};

async function exists(p: string): Promise<boolean> {
  try { await fs.access(p); return true; } catch { return false; }
}

async function backboneOf(p: string): Promise<string | null> {
  try {
    const z = await parseNpz(new Uint8Array(await fs.readFile(p)), p);
    const meta = JSON.parse((z.get("__meta__")?.data as string[])[0]);
    return typeof meta?.backbone_sha256 === "string" ? meta.backbone_sha256 : null;
  } catch { return null; }
}

async function main(argv: string[]): Promise<number> {
  const { values: v, positionals } = parseArgs({
    args: joinNegatives(argv), allowPositionals: true, strict: true,
    options: OPTIONS,
  });
  if (v.help || positionals.length !== 2) {
    console.error(USAGE);
    return v.help ? 0 : 2;
  }
  for (const k of Object.keys(UNSUPPORTED)) {
    if ((v as Record<string, unknown>)[k] !== undefined) throw new RunnerError(UNSUPPORTED[k]);
  }
  for (const k of Object.keys(NUMS)) num(v, k);
  for (const k of ["replay-weight", "max-forget"]) float(v, k);
  const [cmd, bundleDir] = positionals;
  const t0 = performance.now();
  const say = (s: string) => { if (!v.quiet) console.error(s); };
  const bundle = await loadBundleDir(bundleDir, { trustKeyPath: v["trust-key"] });
  // the runtime follows the bundle's target unless --runtime says otherwise
  const runtime = v.runtime ?? (bundle.manifest.target === "tflite" ? "litert" : "node");
  let backend: Backend;
  if (runtime === "litert") { // LiteRT.js's compat WASM build, here in Node
    const { lrt, version } = await loadLiteRtNode();
    backend = await LiteRtBackend.create(lrt, bundle, { name: "litert.js", version });
  } else {
    let ort: Ort;
    if (runtime === "node") {
      ort = await import("onnxruntime-node");
    } else if (runtime === "web") { // onnxruntime-web's WASM build, here in Node (1 thread)
      // V8 recompiles the runtime's hot WASM functions with TurboFan on background threads;
      // on 2 cores that compiling outweighs what it gains in a command of a few seconds, and
      // exiting waits for the queued jobs (0.7-0.8 s after a self-test). A budget 11x V8's
      // default (1.8M) leaves short commands on the baseline code (measured on the HAR bundle:
      // selftest 1.7 -> 0.7 s, adapt 2.1 -> 0.9 s); long runs still tier up their hot loops.
      setFlagsFromString("--wasm-tiering-budget=20000000");
      const w = await import("onnxruntime-web");
      w.env.wasm.numThreads = 1;
      ort = w;
    } else {
      throw new RunnerError(`--runtime must be 'node' (onnxruntime-node), 'web' ` +
        `(onnxruntime-web, WASM) or 'litert' (LiteRT.js, WASM; TFLite bundles), got '${runtime}'`);
    }
    backend = await OrtBackend.create(ort, bundle, { threads: num(v, "threads") ?? 0,
      name: `onnxruntime-${runtime}` });
  }
  let res: unknown;
  if (cmd === "selftest") {
    const fwd = await selftestForward(bundle, backend);
    const train = await selftestTrain(bundle, backend);
    res = { ok: true, max_abs_err: Math.max(fwd, train), train_max_abs_err: train,
      backend: backend.name, trainer: backend.trainer, trainer_version: backend.trainerVersion,
      adabn_max_abs_err: null };
    say(`self-test passed (max abs err ${Math.max(fwd, train).toPrecision(2)}, ` +
      `${backend.trainer} train steps ${train.toPrecision(2)})`);
  } else if (cmd === "infer" || cmd === "adapt") {
    if (!v.data) throw new RunnerError(`${cmd} needs --data FILE`);
    const ds = await loadData(v.data, bundle, num(v, "max-data-mb") ?? 2048);
    const head = v.head ? await Head.load(new Uint8Array(await fs.readFile(v.head)), bundle, v.head) : undefined;
    if (cmd === "infer") {
      const r = await infer(bundle, backend, ds, head);
      r.head = v.head ?? "bundle";
      if (v.out) {
        await fs.mkdir(v.out, { recursive: true });
        await atomicWrite(path.join(v.out, "predictions.json"), JSON.stringify(r, null, 2));
      }
      say(`${r.n_windows} windows in ${(r.seconds * 1000).toFixed(0)} ms` +
        (r.accuracy !== undefined ? `, accuracy ${r.accuracy.toFixed(3)}` : ""));
      res = r;
    } else {
      if (!v.out) throw new RunnerError("adapt needs --out DIR (the state folder)");
      const out = v.out;
      if (await exists(path.join(out, "bn_stats.npz"))) {
        throw new RunnerError(`${out} holds recalibrated BatchNorm statistics (bn_stats.npz, ` +
          "run.py recalibrate); the TypeScript runner cannot use them yet: adapt with run.py, " +
          "or use another state folder");
      }
      await checkVersion(bundle.manifest, out, v["allow-downgrade"]);
      let mix: number[] | undefined;
      if (v.mix !== undefined) {
        mix = v.mix.split(",").map((s) => (s.trim() === "" ? NaN : Number(s)));
        if (mix.some((x) => Number.isNaN(x))) {
          throw new RunnerError(`--mix takes comma-separated weights in (0, 1], got '${v.mix}'`);
        }
      }
      const r = await adapt(bundle, backend, ds, {
        epochs: num(v, "epochs"), batchSize: num(v, "batch-size"),
        valFraction: num(v, "val-fraction"), lr: num(v, "lr"), seed: num(v, "seed") ?? 0,
        head, classBalanced: v["no-class-balanced"] ? false : v["class-balanced"],
        freezeAbsent: v["no-freeze-absent"] ? false : v["freeze-absent"], l2sp: num(v, "l2sp"),
        backboneLrScale: num(v, "backbone-lr-scale"),
        gateAlpha: num(v, "gate-alpha"), gateFolds: num(v, "gate-folds"), gateRule: v["no-gate"] ? "none" : undefined,
        patience: num(v, "patience"), mix, replayWeight: float(v, "replay-weight"),
        maxForget: float(v, "max-forget"), maxSeconds: num(v, "max-seconds"), startedAt: t0,
      });
      await fs.mkdir(out, { recursive: true });
      const ckpt = path.resolve(out, "head.npz");
      const usable = (await exists(ckpt)) &&
        (await backboneOf(ckpt)) === bundle.manifest.files.backbone.sha256;
      const rep = r.report;
      const gate = rep.gate as { reason: string };
      const rolledBack = rep.rolled_back as boolean;
      const base = path.basename(v.data);
      rep.data = path.resolve(v.data);
      rep.checkpoint = ckpt;
      rep.checkpoint_written = !rolledBack || !usable;
      const files = stateFiles(bundle, r, base, usable);
      if (rolledBack) say(`gate: ${gate.reason}`);
      else if (usable) await fs.copyFile(ckpt, path.join(out, "head.prev.npz"));
      if (files.head) await atomicWrite(ckpt, files.head);
      if (files.rejected) await atomicWrite(path.join(out, "head.rejected.npz"), files.rejected);
      rep.peak_rss_mb = await peakRssMb();
      rep.total_seconds = (performance.now() - t0) / 1000;
      await atomicWrite(path.join(out, "report.json"), JSON.stringify(rep, null, 2));
      const record = await updatedVersions(bundle.manifest, out, v["allow-downgrade"]);
      if (record) await atomicWrite(path.join(out, VERSIONS_FILE), JSON.stringify(record, null, 2));
      await fs.rm(path.join(out, "train_state.npz"), { force: true });
      for (const w of rep.warnings as string[]) say(`warning: ${w}`);
      say(`${rolledBack ? "kept the current head" : "kept new head"}: val accuracy ` +
        `${(rep.accuracy_before as number).toFixed(3)} -> ${(rep.accuracy_after as number).toFixed(3)} ` +
        `(${rep.n_train} train / ${rep.n_val} val windows, ${rep.epochs} epochs)`);
      res = rep;
    }
  } else {
    console.error(USAGE);
    return 2;
  }
  await backend.release?.();
  if (v.json) console.log(JSON.stringify(res));
  return 0;
}

/** Exit once stdout and stderr are flushed: the work is done, and onnxruntime-web's WASM
 * runtime would keep Node alive for about a second more (its worker's timers). */
function exit(rc: number): void {
  process.stdout.write("", () => process.stderr.write("", () => process.exit(rc)));
}

main(process.argv.slice(2)).then(exit, (e: unknown) => {
  if (e instanceof RunnerError) {
    console.error(`error: ${e.message}`);
    exit(1);
  } else if (e instanceof TypeError && (e as { code?: string }).code?.startsWith("ERR_PARSE_ARGS")) {
    console.error(`error: ${e.message}\n${USAGE}`);
    exit(2);
  } else {
    throw e;
  }
});
