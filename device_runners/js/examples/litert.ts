// The README's LiteRT.js example, type-checked (`tsc -p tsconfig.examples.json`) against
// @litertjs/core's own typings: its module is a `LiteRt` as this package types it.
import * as lrt from "@litertjs/core";
import { adapt, Bundle, infer, LiteRt, LiteRtBackend, loadCsv, selftest } from "../src/index.js";

export async function personaliseTflite(files: Record<string, Uint8Array>, csvText: string,
  wasmDir: string): Promise<Uint8Array> {
  await lrt.loadLiteRt(wasmDir); // the folder of @litertjs/core's wasm/ files, served locally
  const runtime: LiteRt = lrt;
  const bundle = await Bundle.fromFiles(files);
  const backend = await LiteRtBackend.create(runtime, bundle, { version: "2.5.3" });
  await selftest(bundle, backend);
  const ds = loadCsv(csvText, bundle.manifest, "log.csv");
  const { kept } = await adapt(bundle, backend, ds, { seed: 0 });
  console.log((await infer(bundle, backend, ds, kept)).accuracy);
  backend.delete(); // LiteRT.js memory is not garbage-collected
  return kept.toNpz(bundle);
}
