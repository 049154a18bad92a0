"""Peers: other engines the bench measures on the same prompts, token counts and memory cap.

- `llamacpp`: where llama.cpp is built, the model as a GGUF file (converted by llama.cpp's own converter,
  quantized by its own tool, cached), the command line of one greedy run and the parser of its timings;
- `convert_hf`: the child process that runs llama.cpp's converter with our tokenizer's pre-tokenizer named.

The bench runs the command (under its memory cap) and renders the numbers; nothing here measures."""
