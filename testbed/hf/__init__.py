"""Pretrained Hugging Face MoEs: load them, reconstruct their routing from router logits, count it with the
testbed's own metrics, and intervene on it (prune, reweight). Needs the optional `transformers` (`.[hf]`)."""
