// @litertjs/core's typings name WebGPU's types (its GPU accelerator); this runner uses its
// WASM CPU build only, so empty stand-ins let examples/litert.ts type-check without
// @webgpu/types.
interface GPUBuffer { readonly size: number }
interface GPUDevice { readonly label: string }
