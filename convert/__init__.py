"""convert: merge a LoRA adapter at FP16 and export GGUF / AWQ, then prove the export is faithful."""
