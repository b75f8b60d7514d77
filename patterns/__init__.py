"""MoE idioms, one module each. Every module exposes:

  IDIOM            a short name
  is_candidate(n)  cheap check whether node n ends (anchors) a block of this idiom
  analyse(n)       -> moe_inductor.rewrite.MoEBlock, or raises Declined(reason)
  Declined         the exception carrying the reason a candidate is left alone

Order matters only for speed: idioms are tried one after another over the graph.
"""
from . import sorted_grouped_mm

IDIOMS = [sorted_grouped_mm]
