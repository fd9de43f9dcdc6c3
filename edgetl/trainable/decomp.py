"""``aten.convolution_backward`` (and the pool backwards) as forward ops runtimes can run.

The core-ATen decomposition table lowers every backward op a train step needs except
``convolution_backward`` (onnxscript's version raises). This one uses only ordinary
convolutions, pads, slices and sums (1-D and 2-D, any stride, padding, dilation, groups):

- grad_input: zeros inserted for the stride, padded, then a stride-1 convolution with the
  regrouped, spatially flipped weight (a depthwise conv stays depthwise). The flip runs on a
  3-D view: litert-torch re-lays a 4-D flip feeding a conv weight out as NHWC. A transposed
  conv would also do in onnxruntime, but a strided depthwise one does not legalise in TFLite.
- grad_weight, groups 1: per kernel tap, one matmul of the output gradient with a strided
  slice of the padded input laid out channels last (:func:`_grad_weight_dense`). The former
  form, a convolution of the input (batch and channels swapped) with the output gradient as
  a whole-length filter, took onnxruntime ~3x as long at HAR size (32x32x32 input, 48
  outputs, k 3);
- grad_weight, groups > 1: one strided slice of the padded input per kernel tap, times the
  output gradient, summed (a batched matmul per group).

Matches autograd to float64 rounding (``tests/test_trainable.py``).

For LiteRT, ``table(scatter=False)`` also replaces the embedding gradient's scatter-add by
a one-hot matmul (:func:`embedding_dense_backward`).
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

aten = torch.ops.aten


def _per_dim(v, nd: int) -> list[int]:
    v = list(v)
    return v * nd if len(v) == 1 else v


def _zero_insert(t: torch.Tensor, stride: list[int]) -> torch.Tensor:
    """``stride - 1`` zeros between neighbours along every spatial axis."""
    for i, s in enumerate(stride):
        if s == 1:
            continue
        d = 2 + i
        n = t.shape[d]
        t = t.unsqueeze(d + 1)
        z = list(t.shape)
        z[d + 1] = s - 1
        t = torch.cat([t, t.new_zeros(z)], dim=d + 1)
        shape = list(t.shape[: d]) + [n * s] + list(t.shape[d + 2 :])
        t = t.reshape(shape).narrow(d, 0, (n - 1) * s + 1)
    return t


def _grad_input(go, x, w, stride, padding, dilation, groups):
    nd = x.dim() - 2
    cin, cout, ks = x.shape[1], w.shape[0], list(w.shape[2:])
    wt = w.reshape(groups, cout // groups, cin // groups, *ks).transpose(1, 2)
    wt = wt.reshape(cin, cout // groups, *ks)
    taps = 1
    for k in ks:
        taps *= k
    if taps > 1:
        wt = torch.flip(wt.reshape(cin, cout // groups, taps), [2]).reshape(wt.shape)
    g = _zero_insert(go, stride)
    for i in range(nd):
        left = dilation[i] * (ks[i] - 1) - padding[i]
        right = x.shape[2 + i] + dilation[i] * (ks[i] - 1) - g.shape[2 + i] - left
        d = 2 + i
        if left < 0:
            g = g.narrow(d, -left, g.shape[d] + left)
            left = 0
        if right < 0:
            g = g.narrow(d, 0, g.shape[d] + right)
            right = 0
        if left or right:
            pad = [0, 0] * (nd - 1 - i) + [left, right]
            g = F.pad(g, pad)
    return aten.convolution(g, wt, None, [1] * nd, [0] * nd, dilation, False, [0] * nd, groups)


def _grad_weight(go, x, w, stride, padding, dilation, groups):
    nd = x.dim() - 2
    ks, out = list(w.shape[2:]), list(go.shape[2:])
    pad = [p for i in reversed(range(nd)) for p in (padding[i], padding[i])]
    xp = F.pad(x, pad) if any(pad) else x
    if groups == 1:
        return _grad_weight_dense(go, xp, w, stride, dilation)
    p = torch.stack(list(_tap_slices(xp, 2, ks, out, stride, dilation)), -1)  # (N,Cin,*out,K)
    n, cin, cout, k = x.shape[0], x.shape[1], w.shape[0], p.shape[-1]
    if cin == groups and cout == groups:  # depthwise, multiplier 1
        return (p * go.unsqueeze(-1)).sum([0, *range(2, 2 + nd)]).reshape(w.shape)
    lo = math.prod(out)
    pg = p.reshape(n, groups, cin // groups, lo, k).permute(1, 0, 3, 2, 4)
    pg = pg.reshape(groups, n * lo, (cin // groups) * k)
    gg = go.reshape(n, groups, cout // groups, lo).permute(1, 2, 0, 3)
    gg = gg.reshape(groups, cout // groups, n * lo)
    return torch.bmm(gg, pg).reshape(w.shape)


def _grad_weight_dense(go, xp, w, stride, dilation):
    """The weight gradient of a groups-1 convolution from the padded input ``xp``.

    Per kernel tap, the output gradient (Cout, N*out) times the padded input's strided
    slice, channels last (N*out, Cin); the taps' (Cout, Cin) products stacked. The input
    goes channels-last once, so every slice copies whole channel rows and no
    (N, Cin, *out, K) im2col tensor is stacked or transposed.
    """
    nd = xp.dim() - 2
    ks, out = list(w.shape[2:]), list(go.shape[2:])
    n, cin, cout = xp.shape[0], xp.shape[1], w.shape[0]
    lo = math.prod(out)
    xl = xp.permute(0, *range(2, 2 + nd), 1)  # (N, *spatial, Cin)
    g2 = go.transpose(0, 1).reshape(cout, n * lo)
    taps = [g2 @ s.reshape(n * lo, cin) for s in _tap_slices(xl, 1, ks, out, stride, dilation)]
    return torch.stack(taps, -1).reshape(w.shape)


def _tap_slices(x, axis: int, ks, out, stride, dilation):
    """Per kernel tap (row-major), the strided slice of the padded input ``x`` it multiplies.

    ``axis``: where the spatial axes start (2 for N, C, *spatial; 1 channels last).
    """
    for tap in itertools.product(*[range(k) for k in ks]):
        s = x
        for i in range(len(ks)):
            s = s.narrow(axis + i, tap[i] * dilation[i], (out[i] - 1) * stride[i] + 1)
            if stride[i] > 1:
                s = s[(slice(None),) * (axis + i) + (slice(None, None, stride[i]),)]
        yield s


def convolution_backward(grad_output, input, weight, bias_sizes, stride, padding, dilation,
                         transposed, output_padding, groups, output_mask):
    """Drop-in for ``aten.convolution_backward.default`` (non-transposed convolutions)."""
    if transposed:
        raise NotImplementedError("convolution_backward of a transposed convolution: "
                                  "train a smaller SPEC that leaves it frozen")
    nd = input.dim() - 2
    st, pd, dl = (_per_dim(v, nd) for v in (stride, padding, dilation))
    gi = _grad_input(grad_output, input, weight, st, pd, dl, groups) if output_mask[0] else None
    gw = _grad_weight(grad_output, input, weight, st, pd, dl, groups) if output_mask[1] else None
    gb = grad_output.sum([0, *range(2, 2 + nd)]) if output_mask[2] else None
    return gi, gw, gb


def max_pool2d_with_indices_backward(grad_output, self, kernel_size, stride, padding, dilation,
                                     ceil_mode, indices):
    """Drop-in for ``aten.max_pool2d_with_indices_backward.default`` (1-D pools lower to it).

    Non-overlapping windows (stride = kernel, no padding or dilation: every pooling of the
    built-in students): each output's gradient goes to the first maximum of its window,
    found again from the input, as torch picks among ties. Each of the window's cells is a
    strided slice of the input (row-major order); a cell is the first maximum when it equals
    the window's maximum and no earlier cell did; its gradient is a select, and the cells are
    interleaved back by one stack (no scatter; cells past the last whole window get 0).
    Every op runs on whole (N, C, ho, wo) planes: the former argmax over a trailing axis of
    kh*kw cells and its broadcast compare-and-select against a zeros tensor cost onnxruntime
    ~45 % of a HAR ``bias`` train step (same values: ``tests/test_trainable.py``).
    ``indices`` are not read: litert-torch lowers ``max_pool2d_with_indices``'s indices as
    zeros. Other pools: a ``scatter_add`` of the gradient at the indices (ONNX only;
    :func:`pool_indices_used` finds it for TFLite).
    """
    ks = _per_dim(kernel_size, 2)
    st = _per_dim(stride, 2) if len(stride) else ks
    pd, dl = _per_dim(padding, 2), _per_dim(dilation, 2)
    h, w = self.shape[-2:]
    if st == ks and pd == [0, 0] and dl == [1, 1] and not ceil_mode:
        ho, wo = grad_output.shape[-2:]
        kh, kw = ks
        lead = list(self.shape[:-2])
        cells = [self[..., i : i + (ho - 1) * kh + 1 : kh, j : j + (wo - 1) * kw + 1 : kw]
                 for i in range(kh) for j in range(kw)]
        top = cells[0]
        for c in cells[1:]:
            top = torch.maximum(top, c)
        taken, grads = None, []
        for c in cells:  # the first cell equal to the window's maximum takes the gradient
            hit = c == top if taken is None else (c == top) & ~taken
            taken = hit if taken is None else taken | hit
            grads.append(torch.where(hit, grad_output, 0.0))
        gi = torch.stack(grads, -1).reshape(*lead, ho, wo, kh, kw).transpose(-3, -2).reshape(
            *lead, ho * kh, wo * kw)
        if ho * kh < h or wo * kw < w:
            gi = F.pad(gi, [0, w - wo * kw, 0, h - ho * kh])
        return gi
    flat = grad_output.new_zeros(*self.shape[:-2], h * w)
    flat = flat.scatter_add(-1, indices.flatten(-2), grad_output.flatten(-2))
    return flat.reshape(self.shape)


def _avg_divisors(n: int, k: int, s: int, p: int, out: int) -> list[tuple[int, int]]:
    """Per output position along one axis: (window size incl. padding, size inside)."""
    sizes = []
    for o in range(out):
        start = o * s - p
        end = min(start + k, n + p)
        sizes.append((end - start, min(end, n) - max(start, 0)))
    return sizes


def avg_pool2d_backward(grad_output, self, kernel_size, stride, padding, ceil_mode,
                        count_include_pad, divisor_override=None):
    """Drop-in for ``aten.avg_pool2d_backward.default`` (not in torch's tables).

    Each output's gradient, divided by its window's divisor (torch's rule: the window clipped
    to the padded input with ``count_include_pad``, else to the input; or
    ``divisor_override``), spread over its window: :func:`_grad_input` of a depthwise conv
    with an all-ones kernel, so only convs, pads and slices (as the conv backward).
    """
    ks = _per_dim(kernel_size, 2)
    st = _per_dim(stride, 2) if len(stride) else ks
    pd = _per_dim(padding, 2)
    x = self if self.dim() == 4 else self.unsqueeze(0)
    go = grad_output if grad_output.dim() == 4 else grad_output.unsqueeze(0)
    (h, w), (oh, ow) = x.shape[-2:], go.shape[-2:]
    rows = _avg_divisors(h, ks[0], st[0], pd[0], oh)
    cols = _avg_divisors(w, ks[1], st[1], pd[1], ow)
    div = [[divisor_override or (r[0] * c[0] if count_include_pad else r[1] * c[1])
            for c in cols] for r in rows]
    scale = 1.0 / torch.tensor(div, dtype=go.dtype, device=go.device)
    if (oh, ow) == (1, 1) and ks[0] - pd[0] >= h and ks[1] - pd[1] >= w:
        # one window over the whole input (HF EfficientNet's pooler: kernel 1280 on 1x1):
        # a broadcast, not a conv with a kernel far larger than the input
        gi = (go * scale).expand(x.shape)
        return gi if self.dim() == 4 else gi.squeeze(0)
    c = x.shape[1]
    ones = torch.ones(c, 1, *ks, dtype=go.dtype, device=go.device)
    gi = _grad_input(go * scale, x, ones, st, pd, [1, 1], c)
    return gi if self.dim() == 4 else gi.squeeze(0)


_VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)


def fix_permute_of_expand(gm: torch.fx.GraphModule, args: tuple) -> int:
    """Rewrite ``permute(expand(w))`` as ``expand(permute(view(w)))``; return the count.

    litert-torch lowers ``bmm(r, permute(expand(W, [B, K, N]), [0, 2, 1]))`` (the input
    gradient through a batched linear, e.g. ``MultiheadAttention``) as a RESHAPE of ``W``
    instead of a transpose: silently wrong numbers. Permuting before the expand gives the same
    values and lowers correctly. Same-shape views between the two are looked through.
    """
    from torch.fx.passes.shape_prop import ShapeProp

    ShapeProp(gm).propagate(*args)
    g, done = gm.graph, 0
    for n in list(g.nodes):
        if not (n.op == "call_function" and n.target == aten.permute.default
                and isinstance(n.args[0], torch.fx.Node)):
            continue
        e = n.args[0]
        while (e.op == "call_function" and e.target in _VIEWS
               and list(e.meta["tensor_meta"].shape) == list(e.args[0].meta["tensor_meta"].shape)):
            e = e.args[0]
        if not (e.op == "call_function" and e.target == aten.expand.default):
            continue
        x, perm = e.args[0], list(n.args[1])
        xs = list(x.meta["tensor_meta"].shape)
        size = list(e.args[1])
        off = len(size) - len(xs)
        size = [xs[i - off] if s == -1 else s for i, s in enumerate(size)]
        with g.inserting_before(n):
            v = g.call_function(aten.view.default, (x, [1] * off + xs)) if off else x
            p = g.call_function(aten.permute.default, (v, perm))
            new = g.call_function(aten.expand.default, (p, [size[i] for i in perm]))
        n.replace_all_uses_with(new)
        g.erase_node(n)
        done += 1
    g.eliminate_dead_code()
    gm.recompile()
    return done


def pool_indices_used(gm: torch.fx.GraphModule) -> bool:
    """Whether ``gm`` reads a ``max_pool2d_with_indices`` index output (see above).

    Dead nodes are removed from ``gm`` first (make_fx keeps the unused index views).
    """
    import operator

    gm.graph.eliminate_dead_code()
    gm.recompile()
    return any(n.op == "call_function" and n.target == aten.max_pool2d_with_indices.default
               and any(u.target is operator.getitem and u.args[1] == 1 and u.users
                       for u in n.users) for n in gm.graph.nodes)


#: Largest one-hot matrix :func:`embedding_dense_backward` may build in one train step: a
#: LiteRT step holds it in memory (a 30k-token vocabulary at batch 32 x 128 tokens: 477 MiB).
ONE_HOT_MAX_BYTES = 64 << 20


def embedding_dense_backward(grad_output, indices, num_weights, padding_idx,
                             scale_grad_by_freq):
    """``aten.embedding_dense_backward`` as a one-hot matmul (no scatter).

    The core decomposition is a scatter-add (``index_put`` with ``accumulate``), which
    onnxruntime runs (ScatterND, reduction add) but LiteRT does not: litert-torch lowers it to
    ``stablehlo.scatter``, whose kernel fails to prepare on an add region. Here
    ``grad_weight = onehot(ids, num_weights).T @ grad_output`` (rows of ``padding_idx`` zero,
    ``scale_grad_by_freq`` divides each row by its id's count): built-in ops only, at a cost
    of tokens x vocabulary x dim per step.
    """
    d = grad_output.shape[-1]
    ids = indices.reshape(-1)
    need = ids.numel() * num_weights * grad_output.element_size()
    if need > ONE_HOT_MAX_BYTES:
        from edgetl.errors import BundleError

        raise BundleError(
            f"--trainable: a trained embedding table of {num_weights} rows needs a "
            f"{ids.numel()} x {num_weights} one-hot matrix ({need / 2**20:.0f} MiB) per train "
            f"step on TFLite (LiteRT cannot run a scatter-add), more than "
            f"{ONE_HOT_MAX_BYTES >> 20} MiB; use --target onnx (its gradient is a scatter-add "
            "there), or a SPEC that leaves the embeddings frozen (e.g. bias or last:1)")
    g = grad_output.reshape(-1, d)
    hot = (ids.unsqueeze(1) == torch.arange(num_weights, dtype=ids.dtype).unsqueeze(0)).to(
        g.dtype)  # (tokens, vocabulary)
    if padding_idx >= 0:
        hot = hot * (ids != padding_idx).to(g.dtype).unsqueeze(1)
    if scale_grad_by_freq:
        count = (ids.unsqueeze(1) == torch.arange(num_weights, dtype=ids.dtype)
                 .unsqueeze(0)).to(g.dtype).sum(0)
        hot = hot / torch.clamp(count, min=1.0)
    return hot.t() @ g


def table(*, scatter: bool = True) -> dict:
    """Core-ATen decompositions plus :func:`convolution_backward` and the pool backwards.

    ``scatter=False``: the embedding gradient as :func:`embedding_dense_backward` (one-hot
    matmul, for LiteRT) instead of the core scatter-add.
    """
    t = dict(torch._decomp.core_aten_decompositions())
    t[aten.convolution_backward.default] = convolution_backward
    t[aten.max_pool2d_with_indices_backward.default] = max_pool2d_with_indices_backward
    t[aten.avg_pool2d_backward.default] = avg_pool2d_backward
    t[aten.empty_permuted.default] = _empty_permuted
    if not scatter:
        t[aten.embedding_dense_backward.default] = embedding_dense_backward
    return t


def _empty_permuted(size, physical_layout, dtype=None, layout=None, device=None,
                    pin_memory=None):
    """``aten.empty_permuted`` as zeros of the same logical shape.

    A channels-last ``empty_like`` in a backward; no exporter lowers it, and its values are
    always overwritten.
    """
    return torch.zeros(size, dtype=dtype, device=device)
