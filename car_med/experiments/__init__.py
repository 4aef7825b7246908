"""End-to-end experiments built on the bundles (the toy inference step and the Fig. 3 sweep)."""
