"""The method: pure loss math, per-token log-probs, contrastive templates, token-reward sources."""
