"""Tokenizer metadata of GGUF files: a Hugging Face tokenizer folder written as llama.cpp's `tokenizer.ggml.*` keys.

Two kinds of tokenizer cover the llama-family models we export, told apart by
their `tokenizer.json` (both are BPE):

  gpt2   byte-level BPE (SmolLM2, Llama 3, Qwen2, Mistral Nemo): tokens, token
         types, merges, and `tokenizer.ggml.pre`, llama.cpp's name for how text is
         split before BPE. llama.cpp recognises a pre-tokenizer by the ids a fixed
         text encodes to; we hash the same text and name it the way llama.cpp's
         converter does, and refuse a tokenizer it would not know, since llama.cpp
         would split its text differently from the model's own tokenizer.
  llama  sentencepiece-style BPE with byte fallback (Llama 2, Mistral 7B): tokens,
         token types and scores. llama.cpp merges the adjacent pair whose result has
         the highest score, so each token's score is minus the rank of the merge that
         makes it: the same merge order as the tokenizer's BPE.

Special token ids, whether BOS/EOS are added, merges and the chat template come
from gguf's `SpecialVocab`, the reader llama.cpp's converter uses; whether BOS/EOS
are added is then set from what the tokenizer actually does.
"""

from __future__ import annotations

import json
import logging
import re
from hashlib import sha256
from pathlib import Path

from .errors import QLoRAKitError

log = logging.getLogger(__name__)

# The text llama.cpp's convert_hf_to_gguf.py encodes to fingerprint a BPE pre-tokenizer
# (whitespace runs, emoji, digit groups, scripts, contractions: where splitters differ).
PRE_TOKENIZER_CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
    "✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)

# sha256 of str(ids of the check text) -> llama.cpp's pre-tokenizer name, for the byte-level
# tokenizers of the architectures we export (values from llama.cpp's convert_hf_to_gguf.py).
PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3, 3.1, 3.2
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",  # Llama 3 fine-tunes
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5, Qwen2, Qwen2.5
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}

# gguf.TokenType values (kept as ints so this module imports without gguf).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPIECE_SPACE = "\u2581"


def add_tokenizer(writer, folder: str | Path, vocab_size: int) -> dict:
    """Write the tokenizer of `folder` into `writer`; returns a summary (kind, pre-tokenizer, token count)."""
    import gguf
    from transformers import AutoTokenizer

    folder = Path(folder)
    spec = _tokenizer_json(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    kind = tokenizer_kind(spec, folder)
    tokens, types = token_table(tokenizer, vocab_size, kind)
    writer.add_tokenizer_model(kind)
    summary = {"model": kind, "tokens": len(tokens)}
    if kind == "gpt2":
        summary["pre"] = pre_tokenizer_name(tokenizer, folder)
        writer.add_tokenizer_pre(summary["pre"])
    else:
        summary["pre"] = "default"  # what llama.cpp's converter writes for sentencepiece vocabularies
        writer.add_tokenizer_pre("default")
        writer.add_token_scores(merge_rank_scores(tokens, types, spec["model"].get("merges", [])))
        writer.add_add_space_prefix(adds_space_prefix(spec))
    writer.add_token_list(tokens)
    writer.add_token_types(types)

    special = gguf.SpecialVocab(folder, load_merges=(kind == "gpt2"), n_vocab=len(tokens))
    # What the tokenizer does, not what its config claims: llama.cpp adds BOS/EOS by these flags.
    probe = tokenizer("a")["input_ids"]
    special.add_special_token["bos"] = tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id]
    special.add_special_token["eos"] = tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id]
    if special.chat_template is None and getattr(tokenizer, "chat_template", None):
        special.chat_template = tokenizer.chat_template
    special.add_to_gguf(writer, quiet=True)
    summary.update(special_ids=dict(special.special_token_ids), add_bos=special.add_special_token["bos"],
                   chat_template=special.chat_template is not None)
    return summary


def _tokenizer_json(folder: Path) -> dict:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise QLoRAKitError(
            f"{folder} has no tokenizer.json; a GGUF file carries its tokenizer, so the export needs the "
            "fast (tokenizers) tokenizer: save it with AutoTokenizer.from_pretrained(...).save_pretrained(folder)"
        )
    return json.loads(path.read_text(encoding="utf-8"))


def tokenizer_kind(spec: dict, folder: Path) -> str:
    """'gpt2' (byte-level BPE) or 'llama' (BPE with byte fallback, converted from sentencepiece)."""
    model_type = spec.get("model", {}).get("type")
    if model_type != "BPE":
        raise QLoRAKitError(
            f"the tokenizer in {folder} is a {model_type} tokenizer; GGUF export supports BPE tokenizers "
            "(byte-level as in Llama 3/Qwen2/SmolLM2, or sentencepiece-style as in Llama 2/Mistral)"
        )
    return "llama" if spec["model"].get("byte_fallback") else "gpt2"


def token_table(tokenizer, vocab_size: int, kind: str) -> tuple[list[str], list[int]]:
    """Tokens by id and their llama.cpp types, padded with unused `[PADn]` up to the model's vocab size."""
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    if by_id and max(by_id) >= vocab_size:
        raise QLoRAKitError(
            f"the tokenizer has token id {max(by_id)} but the model's vocab_size is {vocab_size}; "
            "resize the model's embeddings to the tokenizer before exporting"
        )
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(UNUSED)
        elif index in added:
            text, kind_of = _added_token(tokenizer, added[index])
            tokens.append(text)
            types.append(kind_of)
        else:
            token = by_id[index]
            tokens.append(token)
            types.append(BYTE if kind == "llama" and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token) else NORMAL)
    if kind == "llama" and tokenizer.unk_token_id is not None and tokenizer.unk_token_id < vocab_size:
        types[tokenizer.unk_token_id] = UNKNOWN
    return tokens, types


def _added_token(tokenizer, added) -> tuple[str, int]:
    text = added.content
    if not added.normalized:
        # llama.cpp matches control and user-defined tokens against normalized text, so store
        # each as the tokenizer spells it after a round trip (llama.cpp's converter does the same).
        text = tokenizer.decode(tokenizer.encode(text, add_special_tokens=False))
    if added.special or looks_special(text):
        return text, CONTROL
    return text.replace(SPIECE_SPACE, " "), USER_DEFINED


def looks_special(token: str) -> bool:
    """Added tokens that are control tokens though their config does not say so (llama.cpp's list)."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>"))
            or (token.startswith("<unused") and token.endswith(">")))


def pre_tokenizer_name(tokenizer, folder: Path) -> str:
    """llama.cpp's name for this byte-level tokenizer's pre-tokenizer, or a QLoRAKitError if it has none."""
    digest = sha256(str(tokenizer.encode(PRE_TOKENIZER_CHECK_TEXT)).encode()).hexdigest()
    name = PRE_TOKENIZERS.get(digest)
    if name is None:
        raise QLoRAKitError(
            f"the tokenizer in {folder} splits text in a way this exporter does not know (fingerprint {digest}); "
            f"known: {', '.join(sorted(set(PRE_TOKENIZERS.values())))}. llama.cpp would tokenize prompts "
            "differently from the model's own tokenizer. Convert with llama.cpp's convert_hf_to_gguf.py if it "
            "knows this tokenizer"
        )
    return name


def merge_rank_scores(tokens: list[str], types: list[int], merges: list) -> list[float]:
    """Scores for a sentencepiece-style vocabulary: minus the rank of the merge that makes each token.

    Tokens no merge makes (single characters, bytes, specials) cannot be the result of a
    merge in llama.cpp either, except pieces BPE never reaches: they get the lowest score.
    """
    rank: dict[str, int] = {}
    for index, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(left + right, index)
    lowest = -float(len(merges) + 1)
    scores = []
    for token, kind in zip(tokens, types):
        if kind in (USER_DEFINED, CONTROL, UNUSED):
            scores.append(-1000.0 if kind != UNUSED else -10000.0)  # llama.cpp's converter's values
        else:
            scores.append(-float(rank[token]) if token in rank else (0.0 if len(token) == 1 else lowest))
    return scores


def adds_space_prefix(spec: dict) -> bool:
    """Whether the tokenizer puts '▁' before the text (a Prepend normalizer or a Metaspace that prepends)."""
    def walk(node) -> bool:
        if isinstance(node, dict):
            if node.get("type") == "Prepend" and node.get("prepend") == SPIECE_SPACE:
                return True
            if node.get("type") == "Metaspace" and (
                    node.get("prepend_scheme", "always" if node.get("add_prefix_space", True) else "never")
                    in ("first", "always")):
                return True
            return any(walk(value) for value in node.values())
        if isinstance(node, list):
            return any(walk(value) for value in node)
        return False

    return walk(spec.get("normalizer")) or walk(spec.get("pre_tokenizer"))
