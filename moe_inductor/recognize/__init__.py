"""What an MoE block computes, in parts: the descriptions, the normal form, the router reader."""
