"""From a recognised block to the fused op's nodes: emission and the worth-it choice."""
