"""LoRA banks: many LoRAs trained in one batched forward (``train``), routed per sample
(``bank``), and fused per image at generation time (``fused``, LoFT Eq. 4)."""
