"""On-device sampling: jitted prefill and a while_loop decode, with decoding constraints."""
