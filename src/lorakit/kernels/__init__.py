"""lorakit's kernels: hand-written autograd nodes and native code, apart from the formulas they speed up.

Each kernel computes what a method's (or the NF4 format's) reference formula computes, and is tested
against it in that formula's tests:

- `fused_lora`: a frozen dense base and its LoRA pair as one autograd node (LoRA, LoRA-FA);
  reference `methods/lora.py` (`LoRAAdapter.forward`), tests in tests/methods/test_lora.py.
- `grouped_lora`: the LoRA layers that read one input (q/k/v, gate/up) as one node; reference the
  same formula per layer, tests in tests/kernels/test_grouped_lora.py.
- `fused_vera`: the same for VeRA, with `x A^T` shared by the layers that read one activation;
  reference `methods/vera.py` (`VeRAAdapter.forward`), tests in tests/methods/test_vera.py.
- `nf4_native` (+ `_nf4_native.c`): NF4 dequantization in C on the CPU, loaded with ctypes;
  reference `quant/nf4.py` (`dequantize_nf4_torch`), tests in tests/kernels/test_nf4_native.py.

The method files keep the formula and call these where they apply. The kernels sit in the foundation
layer (docs/ARCHITECTURE.md): they import nothing of lorakit above `base_layers` and `errors`. The
Triton NF4 kernel stays in `quant/triton_kernels.py`: it reads the format's code table and falls
back to the format's PyTorch path, both of `quant/nf4.py`, above this layer.
"""
