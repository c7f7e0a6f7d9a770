"""ELF in (mmap + numpy: sections, symbols, relocations) and out (an atomic writer)."""
