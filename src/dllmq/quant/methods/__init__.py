"""One module per quantization method; dllmq.quant.registry lists them."""
