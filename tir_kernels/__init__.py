"""mlcc's hand-written TIR kernels, by operation; they import only tvm, numpy, gguf and artifacts.errors.

Each module imports only those listed above it:
    numerics               whose order of float operations a build computes in (mlcc's or llama.cpp's)
    simd                   vector expression builders, LLVM intrinsics, CPU features, the CPU matmuls' work split
    gguf_blocks            GGUF block layouts (fields, byte offsets) and the scalar, vector and numpy decoders
    repack                 GGUF rows reordered 8 rows side by side for the int8 matmuls
    activation_quant       activations to int8 (mlcc's Q8 and llama.cpp's Q8_0/Q8_1/Q8_K)
    matmul_float           GGUF weights decoded to float in a matmul or a row gather
    matmul_int8            GGUF x int8 activations in mlcc's order
    matmul_llamacpp_kquants, matmul_llamacpp
                           GGUF x int8 activations in llama.cpp's order (K-quants; Q4_1, Q5_0, Q8_0)
    ggml_math              ggml's exp, GeLU table and RoPE angle cache
    norms_activations      RMSNorm, SwiGLU, GeGLU in llama.cpp's order
    rope                   the KV cache's RoPE kernel, and the model-applied NEOX RoPE in llama.cpp's order
    attention              paged/ragged attention for TVM's KV cache on CPUs
    experts                mixture-of-experts routing, grouping and grouped matmuls

Scratch buffers (accumulators, a row's maximum) take the default scope, not "local": TVM serves a CPU "local"
buffer from its workspace pool, a call per parallel task returning a pointer LLVM cannot keep in registers,
so every accumulator update was a store. A default-scope buffer under 1 KiB is a stack array LLVM promotes.
"""
