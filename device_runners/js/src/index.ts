/** edgerun-js: the edgetl device runner for JavaScript runtimes (onnxruntime-common API). */
export { RunnerError } from "./errors.js";
export { Bundle, sha256, verifySignature } from "./bundle.js";
export type { BundleFiles, BundleOptions } from "./bundle.js";
export { checkManifest, parseManifest } from "./check.js";
export * from "./manifest.js";
export { loadCsv, loadNpz, parseCsv, preprocess, splitMode, stratifiedFolds, stratifiedSplit, tensorSpec,
  windowStarts } from "./data.js";
export type { Dataset, InputArray } from "./data.js";
export { binomialTail, decide, forgetting, mix, softmaxXent } from "./gate.js";
export type { Verdict } from "./gate.js";
export { Head } from "./head.js";
export { parseNpy, parseNpz, writeNpy, writeNpz } from "./npy.js";
export type { NdArray } from "./npy.js";
export type { Backend, F32 } from "./backend.js";
export { OrtBackend } from "./ort.js";
export type { Ort, BackendOptions } from "./ort.js";
export { LiteRtBackend } from "./litert.js";
export type { LiteRt, LiteRtBackendOptions, LiteRtModel, LiteRtSignature, LiteRtTensor,
  LiteRtTensorDetails } from "./litert.js";
export { defaultRng, PCG64 } from "./rng.js";
export { adapt, chooseHead, infer, selftest, selftestForward, selftestTrain, stateFiles } from "./adapt.js";
export { loadDataBytes } from "./load.js";
export { convert, imageBytes, imageSpec, imagesToInput, manifestImageSpec, normalizeInto,
  preprocessImage, RESAMPLE, resize } from "./image.js";
export type { ImageSpec, Pixels, Resample } from "./image.js";
export { collectImages, IMAGE_EXTS, imageDataset, loadImageNpz, pyCompare } from "./imagedata.js";
export type { ImageDataLike, Skipped } from "./imagedata.js";
export { block as replayBlock, load as loadReplay } from "./replay.js";
export type { AdaptOptions, AdaptResult, EpochRecord, GateSettings, InferResult } from "./adapt.js";
export { loadTexts, pack, readTexts, TextEncoder_ as TextTokens, WordPiece } from "./text.js";
