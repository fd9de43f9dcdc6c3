// The TypeScript runner's LiteRtBackend in the browser: runner-plan.json names a bundle folder
// (its files), a data file and adapt options; the page runs selftest, infer with the bundle's
// head, adapt, and infer with the head adapt keeps, and leaves the results (report, head.npz
// as base64, predictions) in globalThis.__result (read by tests/web/litert_drive.mjs).
// plan: {"bundle": DIR, "files": [NAME...], "data": URL, "adapt": {seed, epochs, ...}}
import * as lrt from "@litertjs/core";
import { adapt, Bundle, infer, LiteRtBackend, loadDataBytes, selftest, stateFiles }
  from "@edgetl/edgerun";

const msg = (e) => String(e && e.message ? e.message : e);
const bytes = async (url) => new Uint8Array(await (await fetch(url)).arrayBuffer());
const b64 = (u8) => {
  let s = "";
  for (let i = 0; i < u8.length; i += 0x8000) s += String.fromCharCode(...u8.subarray(i, i + 0x8000));
  return btoa(s);
};

async function main() {
  const plan = await (await fetch("./runner-plan.json")).json();
  await lrt.loadLiteRt("./core/wasm/");
  const files = new Map();
  for (const f of plan.files) files.set(f, await bytes(`./${plan.bundle}/${f}`));
  const bundle = await Bundle.fromFiles(files, { source: plan.bundle });
  const backend = await LiteRtBackend.create(lrt, bundle, { version: plan.version });
  const out = { selftest: await selftest(bundle, backend) };
  const name = plan.data.split("/").pop();
  const ds = await loadDataBytes(await bytes(plan.data), name, bundle);
  out.infer_bundle = await infer(bundle, backend, ds);
  const r = await adapt(bundle, backend, ds, plan.adapt);
  const st = stateFiles(bundle, r, name);
  out.report = { ...r.report, checkpoint: "head.npz", checkpoint_written: st.head !== null };
  out.head = st.head ? b64(st.head) : null;
  out.infer_kept = await infer(bundle, backend, ds, r.kept);
  backend.delete();
  return out;
}

main().then((r) => { globalThis.__result = r; },
  (e) => { globalThis.__result = { error: msg(e) }; })
  .finally(() => { document.getElementById("out").textContent = "done"; });
