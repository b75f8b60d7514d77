"""Tiny random-weight Hugging Face transformers MoE models, built from config (no download).

Test helper for the ``sonic`` backend: every family in ``FAMILIES`` builds a 1-2 layer model with
hidden size 32-64, 8 experts, top-2 routing and vocabulary 128, where every decoder layer that the
config allows is a sparse-MoE layer.

API
---
``FAMILIES``                      tuple of family names (transformers ``model_type`` of the family).
``build(family, experts_impl=None, dtype=torch.float32, seed=0) -> (model, input_ids)``
                                  model in eval mode; ``model(input_ids)`` runs (checked in eager).
``moe_modules(model) -> [(qualified_name, module)]``
                                  the sparse-MoE blocks (router + experts) a rewrite should replace.
``set_experts_impl(model_or_config, impl)``
                                  "eager" / "grouped_mm" / "batched_mm" for families whose experts class
                                  is decorated with ``use_experts_implementation``.
``supports_experts_impl(family) -> bool``
                                  whether ``experts_impl`` has any effect for the family.

transformers 5.x selects the experts code from ``config._experts_implementation`` at every forward
(``integrations/moe.py: use_experts_implementation``). ``None`` at model init becomes "grouped_mm"
whenever the modeling module uses the decorator, on every device and dtype (CPU fp32 included). The
grouped_mm path then calls ``torch.nn.functional.grouped_mm`` in eager and, under torch.compile with a
non-bf16 weight, the custom op ``torch.ops.transformers.grouped_mm_fallback``.

transformers must be importable; callers usually ``pytest.importorskip("transformers")`` first.
Set ``HF_HUB_OFFLINE=1``: nothing is downloaded, but it keeps stray hub look-ups quiet.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 128
HIDDEN = 64
N_EXPERTS = 8
TOP_K = 2
SEQ = (2, 8)  # (batch, seq) of the example input: 16 tokens

EXPERTS_IMPLS = ("grouped_mm", "batched_mm", "eager")

# Settings applied to every config that has the field (unknown names are skipped).
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    d_model=HIDDEN,
    intermediate_size=64,
    ffn_hidden_size=64,
    d_ff=64,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    moe_intermediate_size=32,
    expert_intermediate_size=32,
    shared_expert_intermediate_size=32,
    moe_shared_expert_intermediate_size=32,
    num_hidden_layers=2,
    n_layers=2,
    num_layers=2,
    encoder_layers=2,
    decoder_layers=2,
    num_decoder_layers=2,
    num_attention_heads=4,
    n_heads=4,
    num_heads=4,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    num_key_value_heads=4,  # MHA: MLA families (deepseek_v3 & co.) need kv heads == heads
    head_dim=16,
    d_kv=16,
    max_position_embeddings=256,
    # experts / routing
    num_experts=N_EXPERTS,
    num_local_experts=N_EXPERTS,
    n_routed_experts=N_EXPERTS,
    moe_num_experts=N_EXPERTS,
    num_experts_per_tok=TOP_K,
    moe_topk=TOP_K,
    moe_k=TOP_K,
    # every layer sparse
    first_k_dense_replace=0,
    decoder_sparse_step=1,
    sparse_step=1,
    encoder_sparse_step=1,
    num_sparse_encoder_layers=2,
    num_sparse_decoder_layers=2,
    moe_layer_freq=1,
    mlp_only_layers=[],
    moe_layer_start_index=0,
    num_dense_layers=0,
    # deepseek-style MLA / group-limited routing, kept small
    n_group=2,
    topk_group=1,
    n_shared_experts=1,
    kv_lora_rank=16,
    q_lora_rank=32,
    qk_rope_head_dim=16,
    qk_nope_head_dim=16,
    v_head_dim=16,
    index_topk=16,
    index_head_dim=16,
    index_n_heads=4,
    # misc
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
    use_cache=False,
    sliding_window=64,
    attention_chunk_size=64,
    output_router_logits=False,
    router_jitter_noise=0.0,
    router_z_loss_coef=0.0,
    router_aux_loss_coef=0.0,
)

# family -> (config model_type to instantiate, modeling class name or None for auto, extra kwargs)
_SPEC: dict[str, tuple[str, str | None, dict]] = {}


def _spec(family, model_type=None, cls=None, post=None, **extra):
    """model_type: a transformers model_type, or "module:ConfigClass" for unregistered text configs."""
    _SPEC[family] = (model_type or family, cls, extra)
    if post is not None:
        _POST[family] = post


_POST: dict = {}


def _dbrx_post(cfg):
    # DbrxAttention reads attn_config.rope_theta, which DbrxAttentionConfig does not define in 5.23
    if not hasattr(cfg.attn_config, "rope_theta"):
        cfg.attn_config.rope_theta = (cfg.rope_parameters or {}).get("rope_theta", 10000.0)


# Families whose experts class uses @use_experts_implementation (transformers 5.23) plus the MoE
# families with hand-written expert code (dbrx, doge, jetmoe, llama4, longcat_flash, nllb_moe, step3p7,
# switch_transformers). Extra kwargs fix up configs where the common settings are not enough.
_spec("mixtral")
_spec("qwen2_moe", shared_expert_intermediate_size=32)
_spec("qwen3_moe")
_spec("olmoe")
_spec("deepseek_v2")
_spec("deepseek_v3")
_spec("gpt_oss")
_spec("llama4", "llama4_text", "Llama4ForCausalLM", interleave_moe_layer_step=1, intermediate_size_mlp=64,
      intermediate_size=32, no_rope_layers=[1, 1])
_spec("switch_transformers", "switch_transformers", "SwitchTransformersEncoderModel", num_decoder_layers=2)
_spec("dbrx", post=_dbrx_post, attn_config=dict(kv_n_heads=2, clip_qkv=8.0), ffn_config=dict(
    ffn_hidden_size=32, moe_num_experts=N_EXPERTS, moe_top_k=TOP_K))
_spec("jetmoe", kv_channels=16)
_spec("nllb_moe", "nllb-moe", "NllbMoeModel")
_spec("granitemoe")
_spec("granitemoeshared")
_spec("granitemoe_swa")
_spec("granitemoehybrid")
_spec("phimoe")
_spec("minimax")
_spec("minimax_m2")
_spec("ernie4_5_moe")
_spec("glm4_moe")
_spec("glm4_moe_lite")
_spec("hunyuan_v1_moe")
_spec("qwen3_next")
_spec("dots1")
_spec("flex_olmo")
_spec("afmoe")
_spec("aria", "aria_text")
_spec("axk1")
_spec("axk2")
_spec("bailing_hybrid")
_spec("beam")
_spec("cohere2_moe")
_spec("deepseek_v32")
_spec("deepseek_v4")
_spec("exaone_moe")
_spec("flint")
_spec("gemma4", "gemma4_text", enable_moe_block=True, top_k_experts=TOP_K)
_spec("glm_moe_dsa")
_spec("hy_v3")
_spec("hy_v4")
_spec("inkling", "inkling_text")
_spec("inkling2", "inkling2_text")
_spec("jamba", expert_layer_period=1, expert_layer_offset=0, attn_layer_period=2, attn_layer_offset=1)
_spec("kimi_linear")
_spec("kolibri1")
_spec("laguna")
_spec("lfm2_moe", layer_types=["conv", "full_attention"])
_spec("mellum")
_spec("mimo_v2_flash", num_key_value_heads=2)
_spec("minimax_m3_vl", "minimax_m3_vl_text")
_spec("mistral_large4", "mistral_large4_text")
_spec("nemotron_h")
_spec("qwen3_5_moe", "qwen3_5_moe_text")
_spec("qwen3_vl_moe", "qwen3_vl_moe_text")
_spec("qwen4_exp", "qwen4_exp_text")
_spec("solar_open")
_spec("zaya", num_experts_per_tok=1)  # ZAYA validates top-1 routing
_spec("glm4v_moe", "glm4v_moe_text",
      rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 1, 1], partial_rotary_factor=0.5))
_spec("glm5_next", "glm5_next_text", qk_rope_head_dim=0)  # DSA layers validate NoPE
_spec("dots3_note", "dots3_note_text")
_spec("muse_spark", "muse_spark_text")
_spec("ernie4_5_vl_moe", "ernie4_5_vl_moe_text", moe_intermediate_size=[32, 32],
      rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 2, 4]))
_spec("qwen3_omni_moe", "qwen3_omni_moe_text")
_spec("deepseek_ocr2", "deepseek_ocr2_text")
_spec("unlimited_ocr", "unlimited_ocr_text")
_spec("diffusion_gemma", "diffusion_gemma_text", enable_moe_block=True, top_k_experts=TOP_K)
_spec("mistral4")
_spec("openai_privacy_filter")
_spec("doge", is_moe=True, num_experts=16, num_experts_per_tok=2)
_spec("longcat_flash", zero_expert_num=2)  # default 256 identity experts: a 264-expert loop to trace
_spec("step3p7", "step3p7.configuration_step3p7:Step3p7TextConfig", "Step3p7TextModel")

CANDIDATE_FAMILIES = tuple(_SPEC)


def _transformers():
    import transformers  # noqa: F401

    return transformers


def _config_class(model_type):
    if ":" in model_type:
        mod, name = model_type.split(":")
        return getattr(importlib.import_module(f"transformers.models.{mod}"), name)
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return CONFIG_MAPPING[model_type]


def _config_fields(cfg_cls):
    names = set()
    for klass in cfg_cls.__mro__:
        if dataclasses.is_dataclass(klass):
            names |= {f.name for f in dataclasses.fields(klass)}
        try:
            names |= set(inspect.signature(klass.__init__).parameters)
        except (TypeError, ValueError):
            pass
        names |= set(getattr(klass, "attribute_map", {}) or {})
    names.discard("self")
    names.discard("kwargs")
    return names


def _make_config(family, dtype):
    model_type, _, extra = _SPEC[family]
    cfg_cls = _config_class(model_type)
    fields = _config_fields(cfg_cls)
    kw = {k: v for k, v in _COMMON.items() if k in fields}
    amap = getattr(cfg_cls, "attribute_map", {}) or {}
    # one name per target attribute (e.g. num_experts -> num_local_experts)
    for alias, target in amap.items():
        if alias in kw and target in kw:
            kw.pop(alias)
    kw.update(extra)
    # every layer MoE where the config exposes a per-layer list
    for name in ("mlp_layer_types", "moe_layers"):
        if name in fields:
            kw.pop(name, None)
    cfg = cfg_cls(**kw)
    n = getattr(cfg, "num_hidden_layers", 2)
    if hasattr(cfg, "mlp_layer_types"):
        cfg.mlp_layer_types = ["sparse"] * n
    if hasattr(cfg, "moe_layers") and isinstance(cfg.moe_layers, list):
        cfg.moe_layers = list(range(n))
    if family in _POST:
        _POST[family](cfg)
    return cfg


def _model_class(family, cfg):
    transformers = _transformers()
    model_type, cls_name, _ = _SPEC[family]
    if cls_name is not None:
        if hasattr(transformers, cls_name):
            return getattr(transformers, cls_name)
        mod = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        return getattr(mod, cls_name)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES

    for mapping in (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES):
        name = mapping.get(model_type)
        if name and hasattr(transformers, name):
            klass = getattr(transformers, name)
            if getattr(klass, "config_class", None) is type(cfg):
                return klass
    # fall back: a PreTrainedModel in the family's modeling module whose config_class matches
    mod = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    cands = [
        obj
        for obj in vars(mod).values()
        if inspect.isclass(obj)
        and getattr(obj, "config_class", None) is type(cfg)
        and hasattr(obj, "forward")
        and obj.__module__ == mod.__name__
    ]
    for suffix in ("ForCausalLM", "TextModel", "Model"):
        for obj in cands:
            if obj.__name__.endswith(suffix):
                return obj
    raise LookupError(f"no model class for {family} ({type(cfg).__name__})")


def _is_decorated(model):
    for m in model.modules():
        fwd = type(m).forward
        if getattr(fwd, "__wrapped__", None) is not None and "gate_up_proj" in dict(m.named_parameters(recurse=False)):
            return True
        if getattr(fwd, "__wrapped__", None) is not None and "up_proj" in dict(m.named_parameters(recurse=False)):
            return True
    return False


def set_experts_impl(model_or_config, impl):
    """Select the transformers experts implementation ("eager", "grouped_mm", "batched_mm").

    On a model this is ``PreTrainedModel.set_experts_implementation`` (validates and recurses into
    sub-models); on a config it sets ``config._experts_implementation`` (which also recurses into
    sub-configs). The value is read at each forward, so switching after build works without rebuilding.
    """
    if impl not in ("eager", "grouped_mm", "batched_mm", "deepgemm", "sonicmoe"):
        raise ValueError(f"unknown experts implementation {impl!r}")
    if hasattr(model_or_config, "set_experts_implementation"):
        model_or_config.set_experts_implementation(impl)
        # set_experts_implementation only touches configs of PreTrainedModel instances; make sure
        # modules that hold their own config reference agree.
        for m in model_or_config.modules():
            cfg = getattr(m, "config", None)
            if cfg is not None and hasattr(cfg, "_experts_implementation_internal"):
                cfg._experts_implementation_internal = impl
    else:
        model_or_config._experts_implementation = impl
    return model_or_config


def moe_modules(model):
    """(qualified name, module) of each sparse-MoE block: the module holding router and experts.

    A block is a module with an ``experts`` child (attention "mixtures" excluded), JetMoE's ``*MoE``
    (router + parallel experts), or Doge's ``DogeCDMoE``. Nested matches are reported once (outermost).
    """
    out = []
    for name, m in model.named_modules():
        cname = type(m).__name__
        if "Attention" in cname or cname.endswith("MoA"):
            continue
        is_block = (
            hasattr(m, "experts") and isinstance(getattr(m, "experts"), torch.nn.Module)
        ) or (cname.endswith("MoE") and hasattr(m, "router")) or cname.endswith("CDMoE")
        if not is_block:
            continue
        if any(name.startswith(prev + ".") for prev, _ in out):
            continue
        out.append((name, m))
    return out


def supports_experts_impl(family):
    model, _ = build(family)
    return _is_decorated(model)


def _check_moe_every_layer(family, model):
    blocks = moe_modules(model)
    if not blocks:
        raise AssertionError(f"{family}: no MoE block found")
    return blocks


def build(family: str, experts_impl: str | None = None, dtype=torch.float32, seed: int = 0):
    """Build a tiny random-weight ``family`` model and an example ``input_ids`` (2 x 8, int64).

    ``experts_impl`` None keeps the transformers default ("grouped_mm" for decorated families).
    The model is in eval mode, on CPU, with parameters in ``dtype``; a forward is run before returning.
    Encoder-decoder families (switch_transformers, nllb_moe) return the encoder only so that
    ``model(input_ids)`` works like for decoder-only models.
    """
    if family not in _SPEC:
        raise KeyError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    torch.manual_seed(seed)
    cfg = _make_config(family, dtype)
    if experts_impl is not None:
        cfg._experts_implementation = experts_impl
    klass = _model_class(family, cfg)
    model = klass(cfg)
    if family == "nllb_moe":
        model = model.get_encoder()
    model = model.to(dtype).eval()
    if experts_impl is not None:
        set_experts_impl(model, experts_impl)
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, SEQ, generator=gen)
    _check_moe_every_layer(family, model)
    with torch.no_grad():
        out = model(input_ids)
    t = out[0] if isinstance(out, (tuple, list)) else getattr(out, "logits", None)
    if t is None:
        t = out.last_hidden_state
    if not torch.isfinite(t).all():
        raise AssertionError(f"{family}: non-finite output")
    return model, input_ids


def _available():
    try:
        _transformers()
    except ImportError:
        return ()
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    def ok(f):
        mt = _SPEC[f][0]
        if ":" in mt:
            return importlib.util.find_spec(f"transformers.models.{mt.split(':')[0]}") is not None
        return mt in CONFIG_MAPPING_NAMES

    return tuple(f for f in CANDIDATE_FAMILIES if ok(f))


# Every MoE family of the installed transformers that this module knows how to build.
FAMILIES = _available()
