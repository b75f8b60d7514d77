"""transformers 4.5x ``Glm4MoeMoE`` + ``Glm4MoeTopkRouter`` + ``Glm4MoeMLP`` (github huggingface/transformers,
``src/transformers/models/glm4_moe/modeling_glm4_moe.py``), read from the released wheel v4.55.0 (PyPI
``transformers==4.55.0``). Diffed against ``DeepseekV3MoE`` / ``DeepseekV3TopkRouter`` / ``DeepseekV3MLP``
of the same release with the class names replaced: the router, the ``moe`` loop and ``forward`` are the
same op for op (GLM declares the correction-bias buffer ``dtype=torch.float32``, which is
``torch.zeros``' default), so this entry builds the classes of ``deepseek_v3_45x.py`` with
``Glm4MoeConfig``'s defaults: one group (``n_group = topk_group = 1``: the group mask keeps every
expert), ``norm_topk_prob`` True, ``routed_scaling_factor`` 1.0, one shared expert.
"""
from __future__ import annotations

from idiom_catalogue import D, E, K, N, Idiom, seeded, tokens

from .deepseek_v3_45x import DeepseekV3MoE


class Glm4MoeConfigLite:
    """The ``Glm4MoeConfig`` fields the MoE classes read, at the config's defaults (deviation: a plain
    object, not the config class; tiny sizes: the default has 128 routed experts, top-8)."""

    hidden_size = D
    intermediate_size = 2 * N
    moe_intermediate_size = N
    n_routed_experts = E
    n_shared_experts = 1
    num_experts_per_tok = K
    n_group = 1
    topk_group = 1
    norm_topk_prob = True
    routed_scaling_factor = 1.0
    hidden_act = "silu"


ENTRIES = [
    Idiom("glm4_moe_45x_moe", "transformers v4.55.0 models/glm4_moe/modeling_glm4_moe.py Glm4MoeMoE + "
          "Glm4MoeTopkRouter + Glm4MoeMLP (= DeepseekV3MoE's ops, Glm4MoeConfig defaults)",
          seeded(480, lambda: DeepseekV3MoE(Glm4MoeConfigLite())), tokens(lambda T: (1, T, D)),
          expect=1, other_gemms=4, faithful=True,
          note="as deepseek_v3_45x_moe with a single expert group (the group top-k keeps every expert), "
               "renormalised weights and scaling 1.0"),
]
