"""Pre-training of the BEiT-3 encoder on SynthRef captions (``simvg pretrain``): word-region alignment and masked
language modelling, so that the encoder arrives at grounding knowing which words name which image regions."""
