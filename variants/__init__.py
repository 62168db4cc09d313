"""Model building blocks: config, decoder, attention, FFN, precision."""
