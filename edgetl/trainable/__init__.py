"""Training more than the head on the device: export-time autodiff of a parameter subset.

``--trainable SPEC`` picks the tensors a bundle's train step updates (:mod:`.spec`); the
frozen prefix of the backbone before the first trainable tensor stays the cached backbone
graph (:mod:`.cut`); the trainable tail plus the head become the train and infer graphs, their
gradients written by torch autograd at export time (:mod:`.step`, :mod:`.decomp`).
``head`` (the default) never enters this package: it keeps the hand-written head graphs of
:mod:`edgetl.head`.
"""
