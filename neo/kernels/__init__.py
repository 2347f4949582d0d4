"""neo's own compiled kernels, for what XLA does slowly: on CPU, a decode step's products
(cpu.py, decode_product.cc). Each is optional: where it cannot be built, the XLA path runs."""
