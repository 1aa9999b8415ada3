"""Tiny random-weight models of any Hugging Face causal-LM architecture, for tests, examples and the CLI.

``tiny_config("llama")`` starts from the architecture's own config class defaults (the released
model's shape) and shrinks each integer field by what its name says it is, never by a per-model
table (names are read through the class ``attribute_map``: gpt2's ``n_embd`` is ``hidden_size``):

==================  ======================================================  ==========================
kind of field       recognised by                                           becomes
==================  ======================================================  ==========================
hidden size         ``hidden_size``                                         ``hidden``
head count          ``num_*heads``, ``n_*head(s)``, ``num_query_groups``    times ``s_h``
head dimension      ``head_dim``, ``*_head_dim``, ``rotary_dim``, ...       times ``s_d``
other width         ``*intermediate*``, ``*ffn*``, ``*_rank``, ``*_size``   times ``s_w``, a multiple of 8
layer count         ``num_hidden_layers`` (``depth`` in vision towers)      ``layers``
per-layer list      a list as long as the layer count (``layer_types``)     the entries of kept layers
layer-index list    increasing layer indices (``moe_layers``)               renumbered, kept layers only
cycled kinds        a shorter list of kinds (``block_types``)               each kind once
run-length kinds    ``[[kinds, repeats], ...]`` spanning the layers         the kinds of kept layers, once
layer period        ``*layer*period``, ``*interval``, ``*step``, ...       at most ``layers``
special layers      other ``*layer*`` counts (``first_k_dense_replace``)    1 (else 0), or split
expert count        ``*expert*``: routed / per token / shared               at most 4 / 2 / 1 (also None)
default choice      ``default_x`` None, the config lists ``xs``             the first of them
group count         ``*group*``                                             1
vocabulary          ``*vocab*size``                                         at most ``vocab``
token id            ``*_id``, ``*_index`` at or past the vocabulary         ``vocab - 1``, ``vocab - 2``
max positions       ``max_position_embeddings`` and its aliases             at most 1024
==================  ======================================================  ==========================

``s_w = hidden / hidden_0`` and ``s_h * s_d = s_w``: the query heads shrink to ``hidden // d`` for a
head dimension ``d = hidden // 4`` clamped to 16..64, and the head dimension keeps its ratio to the
hidden size where that gives an integer (so a Mamba-2 block's ``num_heads * head_dim = expand *
hidden`` still holds), ``hidden // heads`` otherwise. Grouped-query attention stays grouped (every
key/value head count is rounded to a divisor of the query heads). Fractions (``partial_rotary_factor``,
multipliers, eps) are left alone, so rotary fields stay proportional. The layers kept cover every
kind: each is the earliest layer that adds the most unseen per-layer values, so two layers of Gemma 3
are a sliding and a full attention layer and two of Qwen3-Next a linear and a full one. Nested configs
(``text_config``, ``vision_config``, ...) shrink the same way; a width equal to some config's hidden
size (a projector's output) becomes ``hidden``. ``None`` for ``num_key_value_heads`` or ``head_dim``
(meaning "derive it") is filled in, and a causal LM's ``is_decoder`` is set. ``None`` expert counts
(left to the checkpoint) are filled in where the config is a mixture of experts (an expert width is
set), and a ``layer_types`` that the config leaves ``None`` is every layer full attention, the
transformers default.

``tiny_model`` builds the model with SDPA attention where the model supports it (eager otherwise),
seeded; ``add_lora`` wraps it with PEFT; ``sample_batch`` draws a batch that avoids special tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import inspect
import re
from typing import Any

import torch

__all__ = ["causal_lm_archs", "tiny_config", "tiny_model", "add_lora", "sample_batch"]

MAX_POSITIONS = 1024  # enough for every example; learned position tables stay small
MAX_EXPERTS = 4  # routed experts kept (and at most 2 per token, 1 shared)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 64  # target head dimension: hidden // 4 clamped to this range

# Fields every PreTrainedConfig carries; none of them is a size.
_BASE_FIELDS = frozenset(
    ("transformers_version", "architectures", "output_hidden_states", "return_dict", "dtype",
     "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id", "problem_type")
)
_LAYER_COUNT = ("num_hidden_layers", "num_layers", "depth")  # ``num_layers``: LongCat-Flash (its num_hidden_layers is a property); ``depth``: vision towers
# Integer fields whose value is a number of layers, a layer index or a layer period.
_LAYERISH = re.compile(r"layer|dense_replace|sparse_step")
_PERIOD = re.compile(r"period|interval|step|freq|every|pattern")
_OFFSET = re.compile(r"offset|start|end")
_HEADS = re.compile(r"(^|_)(num|n)_\w*heads?(_per_\w+)?$|heads(_per_\w+)?$|^heads_|query_groups")
_KV_HEADS = re.compile(r"key_value|kv|query_groups")
_HEAD_DIM = re.compile(
    r"head_dim|head_size|headdim|d_head|dim_head|rotary_dim|rope_dim|kv_channels|attention_head_dim|rotary_ndims"
)
_WIDTH = re.compile(
    r"hidden|intermediate|ffn|inner|d_model|n_embd|embed_dim|emb_dim|embedding_size|embedding_dim|"
    r"lora_rank|_rank$|width|d_ff|dim_ff|^dff$|d_ssm|_size$|_dim$"
)
_NOT_WIDTH = re.compile(
    r"patch|image|kernel|conv|chunk|window|block|batch|bucket|sample|crop|merge|vocab|position|group|cache|"
    r"pool|spatial|temporal|mel|codebook|state|channel|hash|cycle|feature|_time|topk|top_k"
)
_GROUPS = re.compile(r"group")
_EXPERTS = re.compile(r"expert")
_TOP_K = re.compile(r"per_tok|top_?k|(^|_)k$")
_VOCAB = re.compile(r"vocab")
_TOKEN_ID = re.compile(r"(_id|_ids|_index|_idx)$")
_INDEX_LIST = re.compile(r"layer|idxs$|indexes$|indices$")
_TEXT_CONFIG_FIELDS = ("text_config", "decoder", "language_config", "llm_config")
_MAX_POS = re.compile(r"^(max_position_embeddings|n_positions|max_seq_len|n_ctx|context_length|max_target_positions)$")


def causal_lm_archs() -> list[str]:
    """Every ``model_type`` registered for ``AutoModelForCausalLM`` in the installed transformers."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def check_arch(arch: str) -> None:
    """Raise ``ValueError`` naming close matches when ``arch`` is no causal-LM ``model_type``."""
    archs = causal_lm_archs()
    if arch in archs:
        return
    close = difflib.get_close_matches(arch, archs, n=5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ValueError(
        f"unknown causal-LM architecture {arch!r}; {hint}"
        f"valid: {', '.join(archs)} (the model_type names of transformers' AutoModelForCausalLM)"
    )


def tiny_config(arch: str, layers: int = 2, hidden: int = 64, vocab: int = 256, **overrides):
    """The config of ``arch`` (a ``model_type`` such as ``"llama"``), shrunk to a tiny model.

    ``overrides`` are set after shrinking, on the top-level config where it has the field and on its
    text config otherwise (``tiny_config("gemma3", sliding_window=8)``).
    """
    return next(_tiny_configs(arch, layers, hidden, vocab, overrides))


# The configs tried, best first: (special layers, layers of each kind, rope parameters per layer type).
_VARIANTS = (
    ("some", 1, False),
    ("none", 1, False),  # special layer counts at zero
    ("some", 2, False),  # two layers of each kind: a module shared by the layers of a kind (Zamba) is tied to a second
    ("some", 1, True),  # rope_parameters per layer type, where the config left one flat dict (Cohere Compass)
)


def _tiny_configs(arch: str, layers: int, hidden: int, vocab: int, overrides: dict):
    """Shrunk configs of ``arch``, best first (``_VARIANTS``). Counts of special layers
    (``first_k_dense_replace``, ``num_kv_shared_layers``, ...) are first kept at one layer of each
    kind; where the config (or later the model) rejects that, the next config has them at zero, then
    twice the layers with two of each kind, then RoPE parameters given per layer type. Raises the
    first error when no config validates."""
    from transformers import CONFIG_MAPPING

    check_arch(arch)
    if layers < 1 or hidden < 8 or vocab < 8:
        raise ValueError(f"tiny_config needs layers >= 1, hidden >= 8, vocab >= 8; got {layers}, {hidden}, {vocab}")
    with _quiet():
        base = CONFIG_MAPPING[arch]()
    first_error, built = None, 0
    for special_layers, per_kind, rope_per_type in _VARIANTS:
        shrinker = _Shrinker(layers * per_kind, hidden, vocab, _hidden_sizes(base), special_layers, per_kind, rope_per_type)
        try:
            with _quiet():
                config = shrinker.shrink(base, overrides=dict(overrides), top=True)
        except (ValueError, TypeError, KeyError, IndexError) as e:
            first_error = first_error or e
            continue
        if rope_per_type and not shrinker.rope_split:  # nothing to split: the first config again
            continue
        built += 1
        yield config
    if not built:
        raise first_error


def tiny_model(arch: str, layers: int = 2, seed: int = 0, dtype: torch.dtype = torch.float32, **kw):
    """A random-initialised ``AutoModelForCausalLM`` of ``arch``, the same for the same ``seed``.

    ``arch`` is a ``model_type`` or a config. ``kw`` go to :func:`tiny_config` (``hidden``, ``vocab``
    and config overrides). Attention is SDPA where the model supports it, eager otherwise. The global
    RNG state is left as it was.
    """
    from transformers import PreTrainedConfig

    if isinstance(arch, PreTrainedConfig):
        return _build(arch, seed, dtype)
    hidden, vocab = kw.pop("hidden", 64), kw.pop("vocab", 256)
    first_error = None
    for config in _tiny_configs(arch, layers, hidden, vocab, kw):
        try:
            return _build(config, seed, dtype)
        except (ValueError, KeyError) as e:  # the model checks what the config did not: try the next config
            first_error = first_error or e
    raise first_error


def _build(config, seed: int, dtype: torch.dtype):
    model_cls = _causal_lm_class(config)
    config = _config_for(model_cls, config)
    impl = "sdpa" if getattr(model_cls, "_supports_sdpa", False) else "eager"
    with torch.random.fork_rng(devices=[]), _quiet():
        torch.manual_seed(seed)
        try:
            return model_cls._from_config(config, attn_implementation=impl, dtype=dtype)
        except ValueError as e:  # a composite model whose parts do not all have an SDPA path
            if impl != "sdpa" or "attention implementation" not in str(e):
                raise
            torch.manual_seed(seed)
            return model_cls._from_config(config, attn_implementation="eager", dtype=dtype)


def _causal_lm_class(config):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM._model_mapping[type(config)]


def _config_for(model_cls, config):
    """The config ``model_cls`` takes: ``config`` itself, or its sub-config of ``model_cls.config_class``
    (Musicgen's causal LM is its decoder)."""
    wanted = getattr(model_cls, "config_class", None)
    if wanted is None or isinstance(config, wanted):
        return config
    for value in _field_values(config).values():
        if isinstance(value, wanted):
            return value
    return config


def enable_checkpointing(model):
    """Activation checkpointing of each decoder layer (non-reentrant, as the Trainer's default), and no
    KV cache (``config.use_cache = False``, what a training step wants anyway): with the cache on,
    transformers 5.25's checkpointed layer calls ``logger.warning_once`` inside the forward, which
    Dynamo cannot trace, so every layer would be a graph break. Returns the model."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model


def add_lora(model, r: int = 8, alpha: int = 16, target_modules="all-linear", dropout: float = 0.0, **lora_kwargs):
    """Wrap ``model`` with PEFT LoRA adapters (``task_type="CAUSAL_LM"``); ``lora_kwargs`` go to
    ``LoraConfig`` (``init_lora_weights=False`` makes B non-zero, so the adapters are not a no-op)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r, lora_alpha=alpha, target_modules=target_modules, lora_dropout=dropout, task_type="CAUSAL_LM",
        **lora_kwargs,
    )
    return get_peft_model(model, config)


def load_in_4bit(model, compute_dtype: torch.dtype = torch.float32, device=None, quant_type: str = "nf4",
                 double_quant: bool = True):
    """``model`` as a QLoRA user loads a checkpoint: saved, then read back by ``from_pretrained`` with
    ``BitsAndBytesConfig(load_in_4bit=True)`` (bitsandbytes quantises its linears; needs bitsandbytes).
    The weights keep ``compute_dtype`` where they are not quantised."""
    import tempfile

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
                               bnb_4bit_compute_dtype=compute_dtype)
    device = torch.device(device) if device is not None else torch.device("cpu")
    with tempfile.TemporaryDirectory() as path, _quiet():
        model.save_pretrained(path)
        return AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=compute_dtype,
                                                    device_map={"": device})


def sample_batch(config, batch: int = 2, seq: int = 16, seed: int = 0, device=None) -> dict:
    """A random batch for a model of ``config``: ``input_ids``, ``attention_mask`` (all ones) and
    ``labels`` (the ids). Tokens are drawn from the vocabulary minus every special token id of the
    config tree (image, pad, eos, ...), so multimodal models see plain text."""
    vocab = config.get_text_config().vocab_size
    special = _special_ids(config)
    allowed = torch.tensor([i for i in range(vocab) if i not in special])
    g = torch.Generator().manual_seed(seed)
    input_ids = allowed[torch.randint(len(allowed), (batch, seq), generator=g)]
    out = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}
    return {k: v.to(device) for k, v in out.items()} if device is not None else out


# --------------------------------------------------------------------------------------------------
# The shrinking rule


@dataclasses.dataclass
class _Scale:
    """Per-config factors: widths ``s_w``, head counts ``s_h``, head dimensions ``s_d``; ``heads`` is
    the new query head count (key/value heads are rounded to its divisors)."""

    s_w: float
    s_h: float
    s_d: float
    heads: int | None
    d0: float | None = None  # the original head dimension


class _Shrinker:
    def __init__(self, layers: int, hidden: int, vocab: int, hiddens: set, special_layers: str = "some",
                 per_kind: int = 1, rope_per_type: bool = False):
        self.layers, self.hidden, self.vocab = layers, hidden, vocab
        self.special_layers = special_layers
        self.per_kind = per_kind  # layers kept of each kind (when there are enough layers)
        self.rope_per_type, self.rope_split = rope_per_type, False
        self.hiddens = hiddens  # every original hidden size in the config tree
        self.ids: dict[int, int] = {}  # original special token id -> new id, shared by the whole tree

    def shrink(self, config, overrides: dict | None = None, parent: _Scale | None = None, top: bool = False):
        """A new config of ``type(config)`` built from the shrunk fields; ``overrides`` are set on it
        where it has the field and passed down to its text config otherwise."""
        cls = type(config)
        values = _field_values(config)
        canon = _canonical_names(cls, values)
        per_layer_config = _per_layer_overrides(config)
        scale = self._scale(values, canon, parent)
        n_layers = _first(values, canon, _LAYER_COUNT)
        keep = self._select_layers(values, canon, n_layers, per_layer_config)

        overrides = dict(overrides or {})
        here = {k: overrides.pop(k) for k in list(overrides) if k in values or k in canon.values()}
        text_field = next((n for n in _TEXT_CONFIG_FIELDS if _is_config(values.get(n))), None)
        into_text: dict = {}
        if text_field is not None:
            text_values = _field_values(values[text_field])
            into_text = {k: overrides.pop(k) for k in list(overrides) if k in text_values}
        changed: dict[str, Any] = {}
        moe = _is_moe(values, canon)
        for name, value in values.items():
            key = canon[name]
            if _is_config(value):
                new = self.shrink(value, overrides=into_text if name == text_field else None, parent=scale)
            elif isinstance(value, dict) and value and all(_is_config(v) for v in value.values()):
                new = {k: self.shrink(v, parent=scale) for k, v in value.items()}
            elif value is None and key == "num_key_value_heads":  # None means one per query head
                new = scale.heads
            elif value is None and key == "head_dim":  # None means hidden_size // num_attention_heads
                new = round(scale.s_d * scale.d0) if scale.d0 else None
            elif value is None and moe and _EXPERTS.search(key) and not _WIDTH.search(key):  # left to the checkpoint
                new = _experts(key, None)
            elif value is None and _default_choices(key, values):  # default_language: one of languages
                new = _default_choices(key, values)[0]
            elif n_layers and keep is not None and _run_length(value, n_layers) is not None:
                kinds = _run_length(value, n_layers)
                new = type(value)([[[kinds[i] for i in keep], 1]])  # the kept layers' kinds, once
            elif isinstance(value, (list, tuple)) and n_layers and keep is not None:
                new = self._shrink_list(key, value, n_layers, keep, scale)
            elif isinstance(value, (list, tuple)):
                new = type(value)(self._shrink_int(key, v, n_layers, scale) for v in value)
            else:
                new = self._shrink_int(key, value, n_layers, scale)
            if _is_config(new) or isinstance(new, dict) or (new is not value and new != value):
                changed[name] = new
        if top and "is_decoder" in values:  # a causal LM decodes (BERT-like LM heads check this)
            changed["is_decoder"] = True
        self._split_layer_sums(values, canon, n_layers, changed)
        if per_layer_config is not None and keep is not None:
            overrides["per_layer_config"] = {
                keep.index(i): {k: self._shrink_int(k, v, None, scale) for k, v in layer.items()}
                for i, layer in per_layer_config.items()
                if i in keep
            }
        self._rope_per_layer_type(cls, values, canon, changed)
        config = cls(**{**changed, **here}, **overrides)
        layer_types = next((n for n in values if canon[n] == "layer_types"), None)
        if layer_types and getattr(config, layer_types, ()) is None and n_layers:  # neither given nor derived
            changed[layer_types] = ["full_attention"] * min(n_layers, self.layers)
            config = cls(**{**changed, **here}, **overrides)
        return config

    def _rope_per_layer_type(self, cls, values: dict, canon: dict, changed: dict) -> None:
        """In the per-type variant: one flat ``rope_parameters`` (or none: the class's ``default_theta``)
        becomes the same dict for each layer type (the form Gemma 3 and Cohere Compass read,
        ``rope_parameters["full_attention"]``)."""
        rope = values.get("rope_parameters")
        kinds = next((changed.get(n, v) for n, v in values.items() if canon[n] == "layer_types"), None)
        if not self.rope_per_type or not isinstance(rope, dict) or not kinds or (rope and "rope_type" not in rope):
            return
        theta = getattr(cls, "default_theta", None)
        if not rope and theta is None:
            return
        rope = rope or {"rope_type": "default", "rope_theta": theta}  # none at all: transformers' default RoPE
        changed["rope_parameters"] = {kind: dict(rope) for kind in dict.fromkeys(kinds)}
        self.rope_split = True

    # -- scale factors --------------------------------------------------------------------------

    def _scale(self, values: dict, canon: dict, parent: _Scale | None) -> _Scale:
        h0 = _first(values, canon, ("hidden_size",))
        if not h0:
            return parent or _Scale(1.0, 1.0, 1.0, None)
        s_w = self.hidden / h0
        heads0 = _first(values, canon, ("num_attention_heads",)) or _first_match(values, _HEADS, exclude=_KV_HEADS)
        if not heads0:
            return _Scale(s_w, parent.s_h if parent else s_w, parent.s_d if parent else 1.0, None)
        d0 = _first(values, canon, ("head_dim",)) or h0 / heads0
        d_target = min(d0, max(MIN_HEAD_DIM, min(MAX_HEAD_DIM, self.hidden // 4)))
        heads = max(1, min(heads0, int(self.hidden // d_target)))
        while self.hidden % heads:  # heads must divide the hidden size for models that derive head_dim
            heads -= 1
        s_h = heads / heads0
        d = d0 * s_w / s_h  # keeps heads * head_dim / hidden as it was
        if abs(d - round(d)) > 1e-6 or round(d) < 4 or round(d) % 2:
            d = self.hidden // heads
        return _Scale(s_w, s_h, round(d) / d0, heads, d0)

    # -- layers --------------------------------------------------------------------------------

    def _select_layers(self, values: dict, canon: dict, n_layers: int | None, per_layer_config: dict | None):
        """Indices of the layers kept, covering every value of every per-layer list where they can."""
        if not n_layers:
            return None
        keep_n = min(self.layers, n_layers)
        per_layer = [v for k, v in values.items() if _is_per_layer(canon[k], v, n_layers)]
        per_layer += [kinds for kinds in (_run_length(v, n_layers) for v in values.values()) if kinds is not None]
        if per_layer_config:
            per_layer.append([repr(sorted(per_layer_config.get(i, {}).items())) for i in range(n_layers)])
        index_lists = [set(v) for k, v in values.items() if _is_index_list(canon[k], v, n_layers)]
        columns = per_layer + [[i in s for i in range(n_layers)] for s in index_lists]
        # Greedy cover: each kept layer is the earliest that adds the most unseen (column, value)
        # pairs, so every kind of attention, MLP, ... appears when there are enough layers.
        seen: dict = {}  # (column, value) -> layers kept with it
        chosen: list[int] = []
        while len(chosen) < keep_n:
            def gain(i):
                return sum(seen.get((c, _hashable(col[i])), 0) < self.per_kind for c, col in enumerate(columns))

            best = max((i for i in range(n_layers) if i not in chosen), key=lambda i: (gain(i), -i))
            chosen.append(best)
            for c, col in enumerate(columns):
                seen[c, _hashable(col[best])] = seen.get((c, _hashable(col[best])), 0) + 1
        return sorted(chosen)

    def _shrink_list(self, key: str, value, n_layers: int, keep: list, scale: _Scale):
        if _is_index_list(key, value, n_layers):
            return type(value)(keep.index(i) for i in value if i in keep)
        if _is_per_layer(key, value, n_layers):
            return type(value)(self._shrink_int(key, value[i], None, scale) for i in keep)
        if _is_cycle(key, value, n_layers):  # a pattern repeated over the layers: each kind once, in order
            kinds = list(dict.fromkeys(value))
            return type(value)(kinds[: max(self.layers, 1)]) if len(kinds) > 1 else value
        return type(value)(self._shrink_int(key, v, n_layers, scale) for v in value)

    # -- one integer ---------------------------------------------------------------------------

    def _shrink_int(self, key: str, value, n_layers: int | None, scale: _Scale):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            return value
        if key == "hidden_size":
            return self.hidden
        if key in _LAYER_COUNT:
            return min(value, self.layers)
        if key == "vocab_size" or (_VOCAB.search(key) and "size" in key):
            return min(value, self.vocab)
        if _TOKEN_ID.search(key) and not _LAYERISH.search(key):
            return self._token_id(value)
        if _MAX_POS.match(key):
            return min(value, MAX_POSITIONS)
        if _LAYERISH.search(key) and not _WIDTH.search(key) and n_layers:
            return self._layer_int(key, value, n_layers)
        if key == "num_blocks" and value == n_layers:  # blocks counted like layers (xLSTM)
            return self.layers
        if _HEADS.search(key) and "dim" not in key and "size" not in key:
            return self._heads(key, value, scale)
        if _GROUPS.search(key) and "size" not in key:
            return 1
        if _EXPERTS.search(key) and not _WIDTH.search(key):
            return _experts(key, value)
        if _TOP_K.search(key) and key.startswith("moe"):
            return min(value, 2)
        if _HEAD_DIM.search(key):
            return _scaled(value, scale.s_d, multiple=2)
        if _WIDTH.search(key) and not _NOT_WIDTH.search(key):
            if value in self.hiddens:  # a projection onto some config's hidden size
                return self.hidden
            return _scaled(value, scale.s_w, multiple=8)
        return value

    def _layer_int(self, key: str, value: int, n_layers: int) -> int:
        if _PERIOD.search(key):
            return min(value, self.layers)
        if _OFFSET.search(key):
            return min(value, self.layers - 1)
        if value >= n_layers:
            return self.layers
        if self.special_layers == "none":
            return 0
        return max(1, min(value, self.layers - 1))  # e.g. first_k_dense_replace: keep one of each kind

    def _split_layer_sums(self, values: dict, canon: dict, n_layers: int | None, changed: dict) -> None:
        """Layer counts that add up to the layer count (``n_input_layers + n_recurrent_layers +
        n_output_layers``) still do: ``layers`` split in proportion, largest remainders first."""
        if not n_layers:
            return
        parts = {
            n: v for n, v in values.items()
            if canon[n] not in _LAYER_COUNT and _LAYERISH.search(canon[n]) and not _PERIOD.search(canon[n])
            and not _OFFSET.search(canon[n]) and isinstance(v, int) and not isinstance(v, bool) and 0 < v < n_layers
        }
        if len(parts) < 2 or sum(parts.values()) != n_layers:
            return
        shares = {n: self.layers * v / n_layers for n, v in parts.items()}
        new = {n: int(x) for n, x in shares.items()}
        for n in sorted(shares, key=lambda n: -(shares[n] - new[n]))[: self.layers - sum(new.values())]:
            new[n] += 1
        changed.update(new)

    def _heads(self, key: str, value: int, scale: _Scale) -> int:
        new = _scaled(value, scale.s_h, multiple=1)
        if _KV_HEADS.search(key) and scale.heads:
            new = max(d for d in range(1, scale.heads + 1) if scale.heads % d == 0 and d <= new) if new else 1
        return new

    def _token_id(self, value: int) -> int:
        if value < self.vocab:
            return value
        if value not in self.ids:
            self.ids[value] = self.vocab - 1 - len(self.ids)
        return self.ids[value]


def _experts(key: str, value: int | None) -> int:
    """An expert count at most ``MAX_EXPERTS`` routed, 2 per token, 1 shared; ``None`` becomes that bound."""
    bound = 2 if _TOP_K.search(key) else 1 if "shared" in key else MAX_EXPERTS
    return bound if value is None else min(value, bound)


def _is_moe(values: dict, canon: dict) -> bool:
    """A mixture-of-experts config: some expert width (``moe_intermediate_size``) is set and no ``*moe*``
    switch is off (Gemma 4's ``enable_moe_block=False`` with ``num_experts=None`` is dense)."""
    moe_keys = [k for k in values if re.search(r"moe|expert", canon[k])]
    if any(values[k] is False for k in moe_keys):
        return False
    return any(
        isinstance(values[k], int) and not isinstance(values[k], bool) and values[k] > 0 and _WIDTH.search(canon[k])
        for k in moe_keys
    )


def _default_choices(key: str, values: dict):
    """For ``default_language``: the config's ``languages`` (non-empty), else None."""
    if not key.startswith("default_"):
        return None
    choices = values.get(key[len("default_"):] + "s")
    return list(choices) if isinstance(choices, (list, tuple)) and choices else None


def _run_length(value, n_layers: int):
    """The per-layer kinds of a run-length spec ``[[["global", "local"], 12]]`` (GPT-Neo's
    ``attention_types``: the kinds repeated 12 times) that spans the ``n_layers`` layers, else None."""
    if not isinstance(value, (list, tuple)) or not value:
        return None
    kinds: list = []
    for item in value:
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], (list, tuple))
                and isinstance(item[1], int) and not isinstance(item[1], bool)):
            return None
        kinds += list(item[0]) * item[1]
    return kinds if len(kinds) == n_layers else None


def _scaled(value: int, factor: float, multiple: int) -> int:
    """``value * factor``, kept exact when that is an integer and a multiple of ``multiple`` (so
    products of fields still match: Mamba heads x head dim = inner width), else rounded to a multiple
    of 8 (16-byte strides for grouped GEMMs, even rotary halves), or of ``multiple`` below 8."""
    x = value * factor
    if abs(x - round(x)) < 1e-6 and round(x) >= 1 and (round(x) % multiple == 0 or round(x) == 1):
        return int(round(x))
    step = 8 if x >= 8 and multiple > 1 else multiple
    return max(multiple, step * round(x / step))


# --------------------------------------------------------------------------------------------------
# Reading configs


def _is_config(value) -> bool:
    from transformers import PreTrainedConfig

    return isinstance(value, PreTrainedConfig)


def _field_values(config) -> dict:
    """The dataclass init fields of ``config`` (their real names, e.g. ``n_embd``), base fields left out.
    Heterogeneous configs (per-layer overrides) give their global values."""
    get = getattr(config, "_getattr_without_heterogeneous_validation", functools.partial(getattr, config))
    names = [n for n in _init_fields(type(config)) if n not in _BASE_FIELDS]
    out = {}
    for n in names:
        with contextlib.suppress(AttributeError):
            out[n] = get(n)
    return out


@functools.lru_cache(None)
def _init_fields(cls) -> tuple:
    """The fields a config class takes: its dataclass init fields (transformers >= 5 declares configs
    as dataclasses), else the named parameters of its ``__init__``."""
    if dataclasses.is_dataclass(cls):
        return tuple(f.name for f in dataclasses.fields(cls) if f.init)
    params = inspect.signature(cls.__init__).parameters.values()
    return tuple(p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))


def _per_layer_overrides(config) -> dict | None:
    """``{layer index: {field: value}}`` of a heterogeneous config (``per_layer_config``), else None."""
    spec = config.__dict__.get("_heterogeneity_spec")
    return None if spec is None else {i: dict(o) for i, o in spec.per_layer_overrides.items()}


def _canonical_names(cls, values: dict) -> dict:
    """Field name -> canonical name (``n_embd`` -> ``hidden_size``), through the class attribute_map."""
    inverse = {real: canon for canon, real in getattr(cls, "attribute_map", {}).items()}
    return {name: inverse.get(name, name) for name in values}


def _first(values: dict, canon: dict, keys) -> Any:
    for name, value in values.items():
        if canon[name] in keys and isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _first_match(values: dict, pattern, exclude=None) -> Any:
    for name, value in values.items():
        if pattern.search(name) and not (exclude and exclude.search(name)):
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def _is_index_list(key: str, value, n_layers: int) -> bool:
    """Increasing layer indices, e.g. ``moe_layers=[1, 3, 5]``, ``full_attn_idxs``."""
    if not isinstance(value, (list, tuple)) or not _INDEX_LIST.search(key) or "token" in key:
        return False
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return False
    return all(0 <= v < n_layers for v in value) and all(a < b for a, b in zip(value, value[1:])) and (
        len(value) != n_layers or list(value) == list(range(n_layers))
    )


def _is_cycle(key: str, value, n_layers: int) -> bool:
    """A short list of layer kinds that the model repeats, e.g. ``block_types=["recurrent", "recurrent", "attention"]``."""
    return (
        isinstance(value, (list, tuple)) and 1 < len(value) < n_layers and "type" in key
        and all(isinstance(v, str) for v in value)
    )


def _is_per_layer(key: str, value, n_layers: int) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == n_layers and not _is_index_list(key, value, n_layers)


def _hashable(v):
    return tuple(map(_hashable, v)) if isinstance(v, (list, tuple)) else (repr(v) if isinstance(v, dict) else v)


def _hidden_sizes(config) -> set:
    out = set()
    values = _field_values(config)
    canon = _canonical_names(type(config), values)
    for name, value in values.items():
        if canon[name] == "hidden_size" and isinstance(value, int):
            out.add(value)
        elif _is_config(value):
            out |= _hidden_sizes(value)
    return out


def _special_ids(config) -> set:
    ids = set()
    for name, value in _field_values(config).items():
        if _is_config(value):
            ids |= _special_ids(value)
        elif _TOKEN_ID.search(name) and not _LAYERISH.search(name):
            for v in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(v, int) and not isinstance(v, bool):
                    ids.add(v)
    return ids


@contextlib.contextmanager
def _quiet():
    """Silence transformers' warnings about the *default* configs (ids past a vocabulary, ...)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
