"""Quantization: the plan (what is quantized, how), step-size init, fake-quant simulation, reconstruction."""
