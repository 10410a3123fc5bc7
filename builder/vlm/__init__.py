"""Local vision-language models: one chat format, one loader, one in-process generator."""
