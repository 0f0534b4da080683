"""The parts of code generation; lazygraph/codegen_triton.py is their front door and lists them."""
