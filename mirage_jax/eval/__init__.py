"""Evaluation: lip-sync metric for synthetic A-roll (`lipsync`) and the held-out report (`heldout`)."""
