"""Decoding through MLA's latent cache, and MTP speculative decoding (report 2.2, 5.4.3)."""
