"""neo's own compiled kernels, for what XLA does slowly: on CPU, a decode step's products and
its attention over the KV cache (cpu.py builds decode_product.cc and decode_attention.cc, which
share parallel.h). Each is optional: where it cannot be built, the XLA path runs."""
