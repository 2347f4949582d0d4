"""neo's own compiled kernels, for what XLA does slowly: on CPU, a decode step's products and
its attention over the KV cache, training's self-attention and its small float32 products
(cpu.py builds decode_product.cc, decode_attention.cc, attention.cc and matmul.cc, which share
parallel.h and vec.h). Each is optional: where it cannot be built, the XLA path runs."""
